"""Server mode: the HTTP client of `llm-trainer vllm-serve`, and the generator that uses it.

Only the standard library and `safetensors` are used here, so server mode needs no vLLM on the training side.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any

import torch

from .base import GenerationResult, Generator, SamplingConfig, as_id_list, check_prompts, consecutive_runs
from .weights import iter_named_weights

START_HINT = "Start one with `llm-trainer vllm-serve --model <the policy's name or path>`"


class GenerationClient:
    """Client of an `llm-trainer vllm-serve` server at `base_url` (or `http://{host}:{port}`).

    The constructor waits up to `connection_timeout` seconds for the server to answer `/health/`, then raises a
    ConnectionError. Every request gives up after `request_timeout` seconds, a weight update after
    `weight_sync_timeout` seconds in all, with a `TimeoutError` naming the URL and the timeout; a server that is gone
    (refused or dropped connection) raises a `ConnectionError` naming the URL. Nothing waits forever. HTTP proxies
    are bypassed: the server is expected on the training cluster's own network.
    """

    def __init__(
        self,
        base_url: str | None = None,
        host: str = "0.0.0.0",
        port: int = 8000,
        connection_timeout: float = 0.0,
        request_timeout: float = 600.0,
        weight_sync_timeout: float = 1800.0,
    ):
        for name, value in (("request_timeout", request_timeout), ("weight_sync_timeout", weight_sync_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}.")
        self.base_url = (base_url or f"http://{host}:{port}").rstrip("/")
        self.request_timeout = request_timeout
        self.weight_sync_timeout = weight_sync_timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.check_server(connection_timeout)

    def check_server(self, total_timeout: float = 0.0, retry_interval: float = 1.0) -> dict:
        """Poll `/health/` until the server answers (returning its reply) or `total_timeout` seconds have passed."""
        deadline = time.monotonic() + total_timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                return self._request("GET", "/health/", timeout=max(1.0, min(10.0, remaining)))
            except (OSError, RuntimeError) as err:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConnectionError(
                        f"The generation server at {self.base_url} is not reachable after {total_timeout:g} s "
                        f"({err}). {START_HINT}, and point the trainer at it with vllm_server_base_url (or "
                        "vllm_server_host and vllm_server_port); raise vllm_server_timeout if it is still loading."
                    ) from err
                time.sleep(min(retry_interval, remaining))

    def health(self, timeout: float | None = None) -> dict:
        """The server's `/health/` reply, for heartbeats: `{"status": "ok", "model_version", "backend", "model",
        "lora_adapter", "requests_in_flight", "requests_served"}`. TimeoutError / ConnectionError as any request."""
        return self._request("GET", "/health/", timeout=timeout)

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int | list[int] = 1,
        sampling: SamplingConfig | None = None,
        stop_token_ids: list[int] | None = None,
        structured_outputs_regex: str | None = None,
        timeout: float | None = None,
    ) -> GenerationResult:
        """`n` completions of each prompt (`n` may differ per prompt), grouped by prompt in order, with the
        `model_version` of the weights that produced all of them.

        `stop_token_ids` end completions in addition to the served model's own eos tokens. `timeout` (default
        `request_timeout`) bounds the wait for the reply.
        """
        body = {
            "prompts": [list(map(int, ids)) for ids in prompt_ids],
            "n": n,
            "sampling": (sampling or SamplingConfig()).to_dict(),
            "stop_token_ids": stop_token_ids,
            "structured_outputs_regex": structured_outputs_regex,
        }
        reply = self._request("POST", "/generate/", json.dumps(body).encode(), "application/json", timeout=timeout)
        return GenerationResult(reply["completion_ids"], reply.get("logprobs"), reply.get("model_version"))

    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        chunk_bytes: int = 256 * 2**20,
        version: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """Send tensors to the served model, `chunk_bytes` at a time; return how many were sent.

        Each chunk travels as one safetensors blob over HTTP. With `version`, the server stages the chunks and loads
        them all with the last one, which also sets its model version: generation never sees half an update, and
        replies name the version they were produced with. Without it, each chunk is loaded on arrival and the
        version is unchanged. The whole update must finish within `timeout` seconds (default
        `weight_sync_timeout`), else TimeoutError. This works for every back end but copies the weights through the
        host; TRL's NCCL broadcast to the vLLM workers is faster for large models and is future work.
        """
        from safetensors.torch import save

        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive number of bytes, got {chunk_bytes!r}.")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise ValueError(f"version must be an integer (the policy's optimizer step) or None, got {version!r}.")
        timeout = self.weight_sync_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        sent = index = 0

        def send(chunk: dict[str, torch.Tensor], final: bool) -> None:
            nonlocal sent, index
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"Weight update to {self.base_url} did not finish within weight_sync_timeout={timeout:g} s "
                    f"({sent} tensors sent); the server may be overloaded or stuck."
                )
            path = "/update_weights/"
            if version is not None:
                path += f"?version={version}&chunk={index}&final={int(final)}"
            self._request(
                "POST",
                path,
                save(chunk),
                "application/octet-stream",
                timeout=remaining,
                timeout_name="weight_sync_timeout",
                total_timeout=timeout,
            )
            sent, index = sent + len(chunk), index + 1

        # A full chunk waits until the next tensor shows there is more: only the last one is sent as final.
        chunk: dict[str, torch.Tensor] = {}
        full: dict[str, torch.Tensor] | None = None
        size = 0
        for name, tensor in named_tensors:
            if full is not None:
                send(full, final=False)
                full = None
            chunk[name] = tensor.detach().to("cpu", copy=True).contiguous()  # copy: ZeRO-3 frees it afterwards
            size += tensor.numel() * tensor.element_size()
            if size >= chunk_bytes:
                full, chunk, size = chunk, {}, 0
        if full is not None:
            send(full, final=True)
        elif chunk or (version is not None and index == 0):  # an empty versioned update still sets the version
            send(chunk, final=True)
        return sent

    def update_lora_adapter(self, model, version: int | None = None, timeout: float | None = None) -> int:
        """Serve `model`'s active LoRA adapter (a peft model) on the server's base model, replacing its previous
        adapter; nothing is merged and the base weights do not travel. Returns how many tensors were sent.

        The adapter's tensors (as `peft.get_peft_model_state_dict` names them) go as one safetensors blob, its
        `LoraConfig` as JSON in the `X-LoRA-Config` header; `version` becomes the served model version.
        """
        from safetensors.torch import save

        from .server import LORA_CONFIG_HEADER
        from .weights import lora_adapter_state

        tensors, config = lora_adapter_state(model)
        path = "/update_lora_adapter/" + (f"?version={int(version)}" if version is not None else "")
        timeout = self.weight_sync_timeout if timeout is None else timeout
        headers = {LORA_CONFIG_HEADER: json.dumps(config)}
        self._request(
            "POST",
            path,
            save(tensors),
            "application/octet-stream",
            timeout=timeout,
            timeout_name="weight_sync_timeout",
            headers=headers,
        )
        return len(tensors)

    def reset_prefix_cache(self) -> None:
        """Drop the server's cached prefixes (computed with the previous weights)."""
        self._request("POST", "/reset_prefix_cache/")

    def close_communicator(self) -> None:
        """TRL's name for ending a weight-sync session; weights travel over HTTP here, so nothing to close."""
        self._request("POST", "/close_communicator/")

    def close(self) -> None:
        """Nothing persistent is held: each request opens its own connection."""

    def get_json(self, path: str) -> Any:
        """GET `path` (e.g. `/v1/models`) and return the decoded JSON reply; RuntimeError on an HTTP error."""
        return self._request("GET", path)

    def post_json(self, path: str, payload: Any = None, timeout: float | None = None) -> Any:
        """POST `payload` as JSON to `path` and return the decoded JSON reply; RuntimeError on an HTTP error."""
        data = json.dumps(payload if payload is not None else {}).encode()
        return self._request("POST", path, data, "application/json", timeout=timeout)

    def _request(
        self,
        method: str,
        path: str,
        data: bytes | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
        timeout_name: str = "request_timeout",
        total_timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        url = self.base_url + path
        timeout = timeout or self.request_timeout
        headers = dict(headers or {})
        if content_type:
            headers["Content-Type"] = content_type
        if data is None and method == "POST":
            data = b""
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                message = json.loads(raw).get("error", raw.decode(errors="replace"))
            except ValueError:
                message = raw.decode(errors="replace")
            raise RuntimeError(f"{method} {url} failed with HTTP {err.code}: {message}") from None
        except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException) as err:
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            if isinstance(reason, TimeoutError):
                raise TimeoutError(
                    f"{method} {url}: the generation server did not answer within {timeout_name}="
                    f"{total_timeout or timeout:g} s; it may be overloaded, stuck or unreachable (raise "
                    f"{timeout_name} if it is only slow)."
                ) from err
            raise ConnectionError(
                f"{method} {url}: the generation server is not reachable ({reason or type(err).__name__}); it may "
                f"have stopped or crashed. {START_HINT}."
            ) from err


class VLLMServerGenerator(Generator):
    """Generates with an `llm-trainer vllm-serve` server (TRL's vLLM server mode).

    Identical consecutive prompts go as one prompt with `n` completions. With an `accelerator` running several
    processes, the main process gathers every process's prompts, generates them in one request and broadcasts the
    completions, and each process keeps its own slice; only the main process talks to the server. `sync_weights`
    must be called on every process (gathering sharded weights is a collective).
    """

    def __init__(
        self,
        sampling: SamplingConfig,
        *,
        base_url: str | None = None,
        host: str = "0.0.0.0",
        port: int = 8000,
        connection_timeout: float = 240.0,
        request_timeout: float = 600.0,
        weight_sync_timeout: float = 1800.0,
        accelerator=None,
        eos_token_id: int | list[int] | None = None,
        structured_outputs_regex: str | None = None,
    ):
        self.sampling = sampling
        self.accelerator = accelerator
        self.eos_token_ids = as_id_list(eos_token_id)
        self.structured_outputs_regex = structured_outputs_regex
        self.client = None
        if self._is_main:
            self.client = GenerationClient(
                base_url, host, port, connection_timeout, request_timeout, weight_sync_timeout
            )

    @property
    def _is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def _distributed(self) -> bool:
        return self.accelerator is not None and self.accelerator.num_processes > 1

    def generate(self, prompt_ids: list[list[int]]) -> GenerationResult:
        check_prompts(prompt_ids)
        if not self._distributed:
            return self._generate_all(prompt_ids)
        from accelerate.utils import broadcast_object_list, gather_object

        per_process = gather_object([list(prompt_ids)])
        payload = [None]
        if self._is_main:
            result = self._generate_all([ids for part in per_process for ids in part])
            payload = [(result.completion_ids, result.logprobs, result.model_version)]
        broadcast_object_list(payload, from_process=0)
        completion_ids, logprobs, model_version = payload[0]
        start = sum(len(part) for part in per_process[: self.accelerator.process_index])
        part = slice(start, start + len(prompt_ids))
        return GenerationResult(completion_ids[part], logprobs[part] if logprobs is not None else None, model_version)

    def _generate_all(self, prompt_ids: list[list[int]]) -> GenerationResult:
        if not prompt_ids:
            return GenerationResult([], None)
        prompts, counts = consecutive_runs(prompt_ids)
        n = counts[0] if len(set(counts)) == 1 else counts
        return self.client.generate(prompts, n, self.sampling, self.eos_token_ids, self.structured_outputs_regex)

    def sync_weights(self, model) -> None:
        weights = iter_named_weights(model)
        if self.client is None:
            for _ in weights:  # take part in the gathers of sharded weights
                pass
            return
        try:
            self.client.update_weights(weights)
        except BaseException:
            for _ in weights:  # the other processes are still gathering: finish the collectives, then fail
                pass
            raise
        self.client.reset_prefix_cache()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
