"""TRL's `VLLMClient` (`trl.generation.vllm_client`), talking to `llm-trainer vllm-serve`.

Scripts written against `trl vllm-serve` (vLLM's OpenAI-compatible server) keep working: `generate`, `chat`,
`get_world_size`, `reset_prefix_cache` and the weight-update methods have TRL's signatures and return values, and
go through the same OpenAI-style routes, which `llm-trainer vllm-serve` serves (see `llm_trainer.generation.server`).

Where we differ: weights travel over HTTP as safetensors (`GenerationClient.update_weights`), not through vLLM's
NCCL weight-transfer engine, so `init_communicator` opens no process group, works on CPU and only checks that the
server takes HTTP weight updates (a real `vllm serve` does not: use TRL's own client there). Multimodal prompts
(`image_features`, `features=`) are not supported, and logprobs list the sampled token only. Needs no vLLM and no
`requests` on the client side.
"""

from __future__ import annotations

import atexit
import base64
import copy
import logging
import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from io import BytesIO
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .remote import GenerationClient
from .weights import iter_named_weights

logger = logging.getLogger(__name__)

_DEFAULT_GENERATION_CONCURRENCY = 64
_NO_MULTIMODAL = "Multimodal prompts (images) are not supported by llm-trainer vllm-serve; send text or token ids."


def pil_to_base64(image) -> str:
    """A PIL image as base64-encoded PNG bytes (the payload of a `data:image/png;base64,` URL)."""
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def to_openai_messages(messages: list[dict]) -> list[dict]:
    """A copy of TRL-style `messages` with PIL image parts (`image` / `image_pil`) turned into OpenAI `image_url`
    parts carrying a data URL, as OpenAI-compatible servers expect."""
    converted = copy.deepcopy(messages)
    for message in converted:
        if not isinstance(message["content"], list):
            continue
        for i, part in enumerate(message["content"]):
            kind = part.get("type")
            if kind in ("image", "image_pil"):
                url = "data:image/png;base64," + pil_to_base64(part[kind])
                message["content"][i] = {"type": "image_url", "image_url": {"url": url}}
    return converted


def _token_id(label: str) -> int:
    return int(label.removeprefix("token_id:"))


def parse_logprobs(choices_logprobs: list[dict | None]) -> tuple[list | None, list | None]:
    """Per-choice logprobs of an OpenAI-style reply as `(logprobs, logprob_token_ids)`, each shaped
    (sequences, positions, candidates) with candidates sorted by descending log-prob; `(None, None)` when the reply
    carries none.

    Tokens must be `"token_id:<id>"` labels (`return_tokens_as_token_ids`). Completion replies hold
    `{"tokens", "token_logprobs", "top_logprobs"}`, chat replies `{"content": [{"token", "logprob", "top_logprobs"}]}`;
    the sampled token is always among the candidates, and NaN log-probs become None.
    """
    if not choices_logprobs or choices_logprobs[0] is None:
        return None, None
    all_logprobs, all_ids = [], []
    for choice in choices_logprobs:
        if "content" in choice:
            positions = [
                (entry["token"], entry["logprob"], {top["token"]: top["logprob"] for top in entry["top_logprobs"]})
                for entry in choice["content"]
            ]
        else:
            positions = list(zip(choice["tokens"], choice["token_logprobs"], choice["top_logprobs"], strict=True))
        sequence_logprobs, sequence_ids = [], []
        for token, logprob, top in positions:
            candidates = dict(top or {})
            candidates[token] = logprob
            ranked = sorted(candidates.items(), key=lambda item: -item[1])
            sequence_ids.append([_token_id(label) for label, _ in ranked])
            sequence_logprobs.append([None if math.isnan(value) else value for _, value in ranked])
        all_logprobs.append(sequence_logprobs)
        all_ids.append(sequence_ids)
    return all_logprobs, all_ids


class VLLMClient:
    """Client of a generation server: `llm-trainer vllm-serve` (either back end), with TRL's `VLLMClient` API.

    Args:
        base_url: The server's URL, e.g. `"http://localhost:8000"`; when given, `host` and `server_port` are ignored.
        host: The server's address.
        server_port: The server's port.
        group_port: Kept for TRL compatibility (TRL's NCCL group port); weights go over HTTP here.
        connection_timeout: Seconds to wait for the server to come up before raising a `ConnectionError`.

        client = VLLMClient(base_url="http://localhost:8000")
        client.generate(["Hello, AI!"], max_tokens=32)   # {"prompt_ids", "completion_ids", "logprobs", ...}
        client.init_communicator()
        client.update_model_params(model)                # the served model now has `model`'s weights
        client.reset_prefix_cache()
    """

    def __init__(
        self,
        base_url: str | None = None,
        host: str = "0.0.0.0",
        server_port: int = 8000,
        group_port: int = 51216,
        connection_timeout: float = 0.0,
    ):
        if base_url is not None:
            parsed = urlparse(base_url)
            self.host = parsed.hostname
            self.server_port = parsed.port
            self.base_url = f"{parsed.scheme or 'http'}://{parsed.netloc}{parsed.path}".rstrip("/")
        else:
            self.host = host
            self.server_port = server_port
            self.base_url = f"http://{host}:{server_port}"
        self.group_port = group_port
        self.communicator = None
        self._http = GenerationClient(self.base_url, connection_timeout=connection_timeout)
        self.model = self._http.get_json("/v1/models")["data"][0]["id"]

    def check_server(self, total_timeout: float = 0.0, retry_interval: float = 2.0) -> None:
        """Wait up to `total_timeout` seconds for the server to answer, then raise a `ConnectionError`."""
        self._http.check_server(total_timeout, retry_interval)

    def get_server_info(self) -> dict:
        """The server's configuration (`/server_info`'s `vllm_config`)."""
        return self._http.get_json("/server_info")["vllm_config"]

    def get_world_size(self) -> int:
        """How many workers the server runs the model on (vLLM's tensor x data parallel size; 1 for transformers)."""
        return self._http.get_json("/get_world_size")["world_size"]

    def image_features(self, images: list[list | None], max_concurrent_requests: int = 64) -> list[dict | None]:
        """TRL's server-side image processing; not available here."""
        raise NotImplementedError(_NO_MULTIMODAL)

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        features: list[dict | None] | None = None,
        n: int = 1,
        repetition_penalty: float = 1.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        max_tokens: int = 16,
        logprobs: int | None = 0,
        structured_outputs_regex: str | None = None,
        generation_kwargs: dict | None = None,
    ) -> dict[str, list]:
        """`n` completions of each prompt (text or token ids), prompt-major.

        Returns `{"prompt_ids", "completion_ids", "logprobs", "logprob_token_ids"}`; `logprobs` is None when
        `logprobs=None`. `generation_kwargs` (e.g. `seed`) go into the request as-is and win over the other fields.
        """
        if features is not None:
            raise NotImplementedError(_NO_MULTIMODAL)
        payload = {
            "model": self.model,
            "prompt": prompts,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            **self._sampling(n, repetition_penalty, temperature, top_p, top_k, min_p, max_tokens),
            "logprobs": logprobs,
        }
        self._add_extras(payload, structured_outputs_regex, generation_kwargs)
        choices = self._http.post_json("/v1/completions", payload)["choices"]
        return self._result([choice["prompt_token_ids"] for choice in choices[:: payload["n"]]], choices)

    def chat(
        self,
        messages: list[list[dict]],
        n: int = 1,
        repetition_penalty: float = 1.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        max_tokens: int = 16,
        logprobs: int | None = 0,
        structured_outputs_regex: str | None = None,
        generation_kwargs: dict | None = None,
        chat_template_kwargs: dict | None = None,
        tools: list | None = None,
        chat_template: str | None = None,
        max_concurrent_requests: int = _DEFAULT_GENERATION_CONCURRENCY,
    ) -> dict[str, list]:
        """`n` completions of each conversation, the chat template applied by the server; same return as `generate`.

        `tools` (functions or JSON schemas) are rendered into the prompt only; tool calls are left to the caller.
        """
        from transformers.utils import get_json_schema

        payload: dict[str, Any] = {
            "model": self.model,
            **self._sampling(n, repetition_penalty, temperature, top_p, top_k, min_p, max_tokens),
            "logprobs": logprobs is not None,
            "top_logprobs": logprobs,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
        }
        if tools:
            payload["tools"] = [get_json_schema(tool) if callable(tool) else tool for tool in tools]
            payload["tool_choice"] = "none"
        if chat_template is not None:
            payload["chat_template"] = chat_template
        if chat_template_kwargs:
            payload["chat_template_kwargs"] = chat_template_kwargs
        self._add_extras(payload, structured_outputs_regex, generation_kwargs)

        def send(conversation: list[dict]) -> dict:
            return self._http.post_json(
                "/v1/chat/completions", {**payload, "messages": to_openai_messages(conversation)}
            )

        with ThreadPoolExecutor(max_workers=max(1, min(max_concurrent_requests, len(messages)))) as pool:
            replies = list(pool.map(send, messages))
        choices = [choice for reply in replies for choice in reply["choices"]]
        return self._result([reply["prompt_token_ids"] for reply in replies], choices)

    def get_sequence_logprobs(
        self,
        sequences: list[list[int]],
        prompt_lengths: list[int],
        top_logprobs: int = 100,
        temperature: float = 1.0,
        chunk_size: int = 0,
        max_concurrent_requests: int = 4,
    ) -> dict[str, list]:
        """TRL's teacher scoring of existing sequences (vLLM's `prompt_logprobs`); not served by llm-trainer."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        raise NotImplementedError(
            "get_sequence_logprobs needs vLLM's prompt_logprobs, which llm-trainer vllm-serve does not serve; use "
            "DistillationTrainer's in-process teacher instead."
        )

    def init_communicator(self, device: torch.device | str | int = 0) -> None:
        """Prepare weight updates. They travel over HTTP here, so no process group is opened and any device works;
        a server that does not take HTTP weight updates (a real `vllm serve`) raises a RuntimeError."""
        transfer = self.get_server_info().get("weight_transfer_config") or {}
        if transfer.get("backend") != "http":
            raise RuntimeError(
                f"The server at {self.base_url} does not take weight updates over HTTP (its weight transfer is "
                f"{transfer or 'not configured'}). This client pushes weights to `llm-trainer vllm-serve`; for "
                "`vllm serve` with an NCCL weight-transfer engine, use TRL's own VLLMClient."
            )
        atexit.register(self.close_communicator)

    @contextmanager
    def weight_update(self) -> Iterator[None]:
        """Group several `update_named_param` calls into one update: the server is told when it starts and ends."""
        self._http.post_json("/start_weight_update")
        try:
            yield
        finally:
            self._http.post_json("/finish_weight_update")

    def update_named_param(self, name: str, weights: torch.Tensor) -> None:
        """Replace the served model's parameter `name` with `weights`."""
        self._http.update_weights([(name, weights)])

    def update_named_params(
        self, metadata: list[tuple[str, str, list[int]]], named_params: Iterable[tuple[str, torch.Tensor]]
    ) -> None:
        """Send the `(name, tensor)` pairs of `named_params`, announced by `metadata`'s `(name, dtype, shape)` in
        the same order (checked: a mismatch raises a ValueError)."""
        expected = [entry[0] for entry in metadata]

        def checked() -> Iterator[tuple[str, torch.Tensor]]:
            count = 0
            for count, (name, tensor) in enumerate(named_params, start=1):
                if count > len(expected) or name != expected[count - 1]:
                    announced = expected[count - 1] if count <= len(expected) else "nothing"
                    raise ValueError(f"Tensor {count} is {name!r}, but metadata announced {announced}.")
                yield name, tensor
            if count != len(expected):
                raise ValueError(f"metadata announced {len(expected)} tensors, but {count} were sent.")

        self._http.update_weights(checked())

    def update_model_params(self, model: nn.Module) -> None:
        """Send every parameter of `model` (PEFT adapters merged, wrappers and shards handled) to the server."""
        self._http.update_weights(iter_named_weights(model))

    def reset_prefix_cache(self) -> None:
        """Drop the server's cached prefixes, computed with the previous weights."""
        self._http.reset_prefix_cache()

    def close_communicator(self) -> None:
        """End the weight-update session (nothing is held open over HTTP)."""
        self.communicator = None

    @staticmethod
    def _add_extras(payload: dict[str, Any], regex: str | None, generation_kwargs: dict | None) -> None:
        """The structured-output regex, then `generation_kwargs`, which win over every other field."""
        if regex is not None:
            payload["structured_outputs"] = {"regex": regex}
        payload.update(generation_kwargs or {})

    @staticmethod
    def _result(prompt_ids: list[list[int]], choices: list[dict]) -> dict[str, list]:
        """TRL's return shape from the server's choices (prompt-major, `n` per prompt)."""
        sampled_logprobs, logprob_token_ids = parse_logprobs([choice["logprobs"] for choice in choices])
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": [choice["token_ids"] for choice in choices],
            "logprobs": sampled_logprobs,
            "logprob_token_ids": logprob_token_ids,
        }

    @staticmethod
    def _sampling(n, repetition_penalty, temperature, top_p, top_k, min_p, max_tokens) -> dict[str, Any]:
        return {
            "n": n,
            "repetition_penalty": repetition_penalty,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "max_tokens": max_tokens,
        }
