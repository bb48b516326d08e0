"""The client of `llm-trainer train-serve`: a Tinker-style API over HTTP (standard library only).

    service = ServiceClient("http://trainer-host:8100")
    training = service.create_lora_training_client(base_model="path/to/model", rank=16)
    fwd_bwd = training.forward_backward(data, "cross_entropy")      # futures: queue several, then wait
    step = training.optim_step(AdamParams(learning_rate=1e-4))
    fwd_bwd.result(); step.result()
    sampler = training.save_weights_and_get_sampling_client("step-1")
    sampler.sample(ModelInput.from_ints(prompt), 4, SamplingParams(max_tokens=32, seed=0)).result()

Calls return `concurrent.futures.Future`s. A training client's calls run in the order they were made, one at a time,
on its own worker thread; `close()` (or `with`) stops that thread. Errors the server reports (HTTP 400, naming the bad
field) are raised by `.result()` as `ValueError`; an unreachable server as `ConnectionError` naming the URL.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    ModelInput,
    OptimStepResponse,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    SaveWeightsResponse,
    TensorData,
)

CustomLossFn = Callable[[list[Datum], list[Any]], tuple[Any, dict[str, float]]]
"""`fn(data, logprobs) -> (loss, metrics)`: `logprobs` are torch tensors (one per datum, requiring grad) of the
target tokens' log-probs; `loss` a scalar torch tensor built from them."""


class _Http:
    """JSON over HTTP to one server; HTTP proxies are bypassed (the service is on the training network)."""

    def __init__(self, base_url: str, timeout: float):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, route: str) -> dict:
        return self._send(urllib.request.Request(f"{self.base_url}/{route}/", method="GET"), route)

    def post(self, route: str, payload: dict) -> dict:
        request = urllib.request.Request(
            f"{self.base_url}/{route}/",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        return self._send(request, route)

    def _send(self, request: urllib.request.Request, route: str) -> dict:
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                message = json.loads(raw).get("error")
            except ValueError:
                message = raw.decode(errors="replace")
            kind = ValueError if err.code == 400 else RuntimeError
            raise kind(f"{route} at {self.base_url} failed (HTTP {err.code}): {message}") from None
        except (urllib.error.URLError, OSError) as err:
            if isinstance(err, TimeoutError) or "timed out" in str(err):
                raise TimeoutError(f"{route} at {self.base_url} did not answer within {self.timeout:g} s") from None
            raise ConnectionError(
                f"the training service at {self.base_url} is not reachable ({err}); start one with "
                "`llm-trainer train-serve --model <path>`"
            ) from None


class ServiceClient:
    """Entry point: connects to a `train-serve` server at `base_url` and creates training and sampling clients.

    `timeout` bounds every request, in seconds.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8100", timeout: float = 600.0):
        self._http = _Http(base_url, timeout)
        self.base_url = self._http.base_url

    def health(self) -> dict:
        """The server's `/health/` reply (model name, LoRA rank); ConnectionError if it does not answer."""
        return self._http.get("health")

    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None) -> TrainingClient:
        """A new training session on `base_model` (the served model's path or name) training a LoRA adapter of
        `rank` (initialised from `seed` when given); it replaces any earlier session on that server."""
        return self._create(base_model, rank, seed)

    def create_training_client(self, base_model: str) -> TrainingClient:
        """A new full fine-tuning session on `base_model`; it replaces any earlier session on that server."""
        return self._create(base_model, None)

    def get_server_capabilities(self) -> dict:
        """`{"supported_models": [{"model_name": ...}]}`: the one model this server trains."""
        return {"supported_models": [{"model_name": self.health()["model"]}]}

    def create_sampling_client(self, model_path: str | None = None) -> SamplingClient:
        """A client sampling the weights `model_path` names (`save_weights_for_sampler`'s path), or the current
        weights when None."""
        return SamplingClient(self._http, model_path)

    def _create(self, base_model: str, rank: int | None, seed: int | None = None) -> TrainingClient:
        reply = self._http.post("create_model", {"base_model": base_model, "lora_rank": rank, "seed": seed})
        return TrainingClient(self._http, reply["session_id"], reply)


class TrainingClient:
    """A training session: every call returns a Future, and calls run in the order they were made."""

    def __init__(self, http: _Http, session_id: str, info: dict):
        self._http, self.session_id, self.info = http, session_id, info
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="llm-trainer-remote")

    @property
    def base_url(self) -> str:
        """The service's URL."""
        return self._http.base_url

    def __enter__(self) -> TrainingClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Wait for queued calls and stop the worker thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _submit(self, fn: Callable[[], Any]) -> Future:
        if self._executor is None:
            raise RuntimeError("this TrainingClient is closed")
        return self._executor.submit(fn)

    def _post(self, route: str, **payload: Any) -> dict:
        return self._http.post(route, {"session_id": self.session_id, **payload})

    @staticmethod
    def _data(data: Sequence[Datum]) -> list[dict]:
        if isinstance(data, Datum):
            raise TypeError("data must be a list of Datum, got a single Datum")
        return [datum.to_json() for datum in data]

    def get_info(self) -> dict:
        """Model name, LoRA rank, step, parameter counts, eos/pad token ids (synchronous)."""
        return self._post("get_info")

    def get_tokenizer(self):
        """The base model's tokenizer, loaded here from the model's name or path."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.info["model_name"])

    def forward(self, data: Sequence[Datum]) -> Future[ForwardBackwardOutput]:
        """Log-probs of each datum's `target_tokens` (no gradient)."""
        payload = self._data(data)
        return self._submit(lambda: ForwardBackwardOutput.from_json(self._post("forward", data=payload)))

    def forward_backward(
        self, data: Sequence[Datum], loss_fn: str = "cross_entropy", loss_fn_config: dict[str, float] | None = None
    ) -> Future[ForwardBackwardOutput]:
        """Accumulate the gradient of `loss_fn` ("cross_entropy", "importance_sampling" or "ppo", summed over the
        target tokens of every datum); its log-probs and `metrics["loss:sum"]`."""
        payload = self._data(data)
        return self._submit(
            lambda: ForwardBackwardOutput.from_json(
                self._post("forward_backward", data=payload, loss_fn=loss_fn, loss_fn_config=loss_fn_config)
            )
        )

    def forward_backward_custom(self, data: Sequence[Datum], loss_fn: CustomLossFn) -> Future[ForwardBackwardOutput]:
        """Accumulate the gradient of a loss computed here from the server's log-probs.

        The server returns the log-probs; `loss_fn` turns them into a scalar; its gradient g = dloss/dlogprobs is sent
        back as the linear loss Σ g·logp (cross-entropy with weights −g), whose gradient equals the custom loss's. The
        model does not change between the two requests (calls are serialized), so this is exact.
        `metrics["loss:sum"]` is the custom loss.
        """
        data = list(data)

        def run() -> ForwardBackwardOutput:
            import torch

            forward = ForwardBackwardOutput.from_json(self._post("forward", data=self._data(data)))
            logprobs = [out["logprobs"].to_torch().requires_grad_(True) for out in forward.loss_fn_outputs]
            loss, metrics = loss_fn(data, logprobs)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("the custom loss_fn must return (a scalar torch tensor, a dict of metrics)")
            grads = torch.autograd.grad(loss, logprobs, allow_unused=True)
            linear = [
                Datum(
                    datum.model_input,
                    {
                        "target_tokens": datum.loss_fn_inputs["target_tokens"],
                        "weights": TensorData.from_torch(-(g if g is not None else torch.zeros_like(lp))),
                    },
                )
                for datum, g, lp in zip(data, grads, logprobs)
            ]
            out = ForwardBackwardOutput.from_json(
                self._post("forward_backward", data=self._data(linear), loss_fn="cross_entropy")
            )
            metrics = {**{k: float(v) for k, v in (metrics or {}).items()}, "loss:sum": loss.item()}
            return ForwardBackwardOutput(forward.loss_fn_outputs, {**out.metrics, **metrics})

        return self._submit(run)

    def optim_step(self, adam_params: AdamParams | None = None) -> Future[OptimStepResponse]:
        """One AdamW step on the accumulated gradients, which are then cleared."""
        params = (adam_params or AdamParams()).to_json()

        def run() -> OptimStepResponse:
            reply = self._post("optim_step", adam_params=params)
            return OptimStepResponse(reply["step"], reply.get("metrics", {}))

        return self._submit(run)

    def save_weights_for_sampler(self, name: str) -> Future[SaveWeightsResponse]:
        """Snapshot the current weights under `name`, for `create_sampling_client(model_path=...)`."""
        return self._submit(lambda: SaveWeightsResponse(self._post("save_weights_for_sampler", name=name)["path"]))

    def save_weights_and_get_sampling_client(self, name: str) -> SamplingClient:
        """Snapshot the weights (after every queued call) and return a client sampling them."""
        path = self.save_weights_for_sampler(name).result().path
        return SamplingClient(self._http, path)

    def save_state(self, name: str) -> Future[SaveWeightsResponse]:
        """Write weights and optimizer state to the server's state folder; the path is for `load_state`."""
        return self._submit(lambda: SaveWeightsResponse(self._post("save_state", name=name)["path"]))

    def load_state(self, path: str) -> Future[dict]:
        """Restore weights, optimizer state and step count saved by `save_state`."""
        return self._submit(lambda: self._post("load_state", path=path))


class SamplingClient:
    """Samples continuations of a prompt with the weights `model_path` names (None: the current weights)."""

    def __init__(self, http: _Http, model_path: str | None = None):
        self._http, self.model_path = http, model_path

    def sample(
        self, prompt: ModelInput, num_samples: int = 1, sampling_params: SamplingParams | None = None
    ) -> Future[SampleResponse]:
        """`num_samples` continuations of `prompt`, each with its tokens' sampling log-probs. The request runs now
        (sampling is synchronous on the server); the returned future is already done."""
        future: Future = Future()
        try:
            reply = self._http.post(
                "sample",
                {
                    "model_path": self.model_path,
                    "prompt": prompt.to_json(),
                    "num_samples": num_samples,
                    "sampling_params": (sampling_params or SamplingParams()).to_json(),
                },
            )
            sequences = [SampledSequence(s["tokens"], s["logprobs"], s["stop_reason"]) for s in reply["sequences"]]
            future.set_result(SampleResponse(sequences))
        except Exception as err:
            future.set_exception(err)
        return future

    def compute_logprobs(self, prompt: ModelInput) -> Future[list[float | None]]:
        """Each prompt token's log-prob given the tokens before it (None for the first); the future is done."""
        future: Future = Future()
        try:
            reply = self._http.post("compute_logprobs", {"model_path": self.model_path, "prompt": prompt.to_json()})
            future.set_result(reply["logprobs"])
        except Exception as err:
            future.set_exception(err)
        return future
