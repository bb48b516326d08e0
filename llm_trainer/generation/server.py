"""`llm-trainer vllm-serve`: a generation server for the trainers' server mode (`use_vllm=True, vllm_mode="server"`).

    llm-trainer vllm-serve --model Qwen/Qwen2.5-0.5B --tensor_parallel_size 2 --port 8000
    llm-trainer vllm-serve --model path/to/model --backend transformers        # no vLLM, CPU or GPU

A standard-library HTTP server speaking JSON. Endpoints:

    GET  /health/              {"status": "ok", "backend", "model"}
    POST /generate/            {"prompts": [[ids]], "n": int | [int per prompt], "sampling": {SamplingConfig fields},
                                "stop_token_ids": [ids] | null, "structured_outputs_regex": str | null}
                               -> {"completion_ids": [[ids]], "logprobs": [[float]] | null}, grouped by prompt
    POST /update_weights/      body: tensors serialized with `safetensors.torch.save`, loaded into the model by name
    POST /reset_prefix_cache/  forget cached prefixes (after a weight update)
    POST /close_communicator/  accepted for TRL compatibility; nothing to close

Weights travel over HTTP as safetensors, which works for both back ends; TRL's NCCL broadcast straight to the vLLM
workers is faster for large models and is future work. Requests are handled one at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from .base import GenerationResult, SamplingConfig, as_id_list

logger = logging.getLogger("llm_trainer.vllm_serve")


class TransformersEngine:
    """Serves a `transformers` causal LM (GPU when available, else CPU); for tests and machines without vLLM."""

    backend = "transformers"

    def __init__(self, model: str, dtype: str = "auto", revision: str | None = None, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = model
        kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=_torch_dtype(dtype), **kwargs).to(device)
        self.model.eval()
        tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
        self.eos_token_ids = as_id_list(self.model.generation_config.eos_token_id)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in self.eos_token_ids:
            self.eos_token_ids.insert(0, tokenizer.eos_token_id)
        if not self.eos_token_ids:
            raise ValueError(f"{model} declares no eos token (neither its tokenizer nor its generation config).")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    def generate(self, prompts, counts, sampling, stop_token_ids, structured_outputs_regex) -> GenerationResult:
        from .transformers_backend import TransformersGenerator

        if structured_outputs_regex is not None:
            raise ValueError("structured_outputs_regex needs the vLLM back end (`--backend vllm`).")
        eos = self.eos_token_ids + [t for t in stop_token_ids if t not in self.eos_token_ids]
        generator = TransformersGenerator(
            self.model, sampling, pad_token_id=self.pad_token_id, eos_token_id=eos, return_logprobs=True
        )
        return generator.generate([ids for ids, count in zip(prompts, counts) for _ in range(count)])

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        known = self.model.state_dict().keys()
        unknown = sorted(set(tensors) - set(known))
        if unknown:
            raise ValueError(
                f"{len(unknown)} tensor name(s) are not parameters of the served model, e.g. {unknown[:3]}; it has "
                f"e.g. {list(known)[:3]}. Serve the same architecture as the policy being trained."
            )
        try:
            self.model.load_state_dict(tensors, strict=False)
        except RuntimeError as err:  # shape mismatch
            raise ValueError(str(err)) from None

    def reset_prefix_cache(self) -> None:
        """There is no cache across requests."""


class VLLMEngine:
    """Serves a model with a `vllm.LLM` engine."""

    backend = "vllm"

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        max_model_len: int | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        enable_prefix_caching: bool | None = None,
    ):
        from .vllm_backend import require_vllm

        vllm = require_vllm()
        self.name = model
        # Weight updates run a function on the engine's worker processes, which vLLM must be allowed to pickle.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self.llm = vllm.LLM(
            model=model,
            revision=revision,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            trust_remote_code=trust_remote_code,
            logprobs_mode="processed_logprobs",
        )

    def generate(self, prompts, counts, sampling, stop_token_ids, structured_outputs_regex) -> GenerationResult:
        from .vllm_backend import result_from_outputs, vllm_sampling_params

        params = [vllm_sampling_params(sampling, c, stop_token_ids, structured_outputs_regex) for c in counts]
        requests = [{"prompt_token_ids": ids} for ids in prompts]
        return result_from_outputs(self.llm.generate(requests, sampling_params=params, use_tqdm=False))

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        from .vllm_backend import load_weights_into_vllm

        load_weights_into_vllm(self.llm, list(tensors.items()))

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()


def make_server(engine, host: str = "0.0.0.0", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) that answers the endpoints above with `engine`."""
    lock = threading.Lock()  # one model, one request at a time

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self._route() == "health":
                self._reply({"status": "ok", "backend": engine.backend, "model": engine.name})
            else:
                self._not_found()

        def do_POST(self) -> None:
            route = self._route()
            actions = {
                "generate": self._generate,
                "update_weights": self._update_weights,
                "reset_prefix_cache": self._reset_prefix_cache,
                "close_communicator": lambda body: {"success": True},
            }
            if route not in actions:
                self._not_found()
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                with lock:
                    reply = actions[route](body)
            except (ValueError, TypeError, KeyError) as err:
                self._reply({"error": f"{type(err).__name__}: {err}"}, HTTPStatus.BAD_REQUEST)
            except Exception as err:  # report it to the client rather than drop the connection
                logger.exception("%s failed", self.path)
                self._reply({"error": f"{type(err).__name__}: {err}"}, HTTPStatus.INTERNAL_SERVER_ERROR)
            else:
                self._reply(reply)

        def _generate(self, body: bytes) -> dict:
            request = json.loads(body)
            prompts, n = request["prompts"], request.get("n", 1)
            counts = [n] * len(prompts) if isinstance(n, int) else list(n)
            if len(counts) != len(prompts) or any(not isinstance(c, int) or c < 1 for c in counts):
                raise ValueError(f"n must be a positive integer or one per prompt ({len(prompts)}), got {n!r}.")
            if any(not ids for ids in prompts):
                raise ValueError("every prompt needs at least one token id.")
            sampling = SamplingConfig(**(request.get("sampling") or {}))
            stops = list(request.get("stop_token_ids") or [])
            result = engine.generate(prompts, counts, sampling, stops, request.get("structured_outputs_regex"))
            return {"completion_ids": result.completion_ids, "logprobs": result.logprobs}

        def _update_weights(self, body: bytes) -> dict:
            from safetensors.torch import load

            try:
                tensors = load(body)
            except Exception as err:
                raise ValueError(f"the body is not a safetensors blob ({err}).") from None
            engine.load_weights(tensors)
            return {"updated": len(tensors)}

        def _reset_prefix_cache(self, body: bytes) -> dict:
            engine.reset_prefix_cache()
            return {"success": True}

        def _route(self) -> str:
            return self.path.split("?", 1)[0].strip("/")

        def _not_found(self) -> None:
            endpoints = "GET /health/, POST /generate/, /update_weights/, /reset_prefix_cache/, /close_communicator/"
            self._reply({"error": f"no endpoint {self.command} {self.path}; try {endpoints}"}, HTTPStatus.NOT_FOUND)

        def _reply(self, payload: dict, status: HTTPStatus = HTTPStatus.OK) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:
            logger.debug("%s - %s", self.address_string(), format % args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(
    model: str,
    backend: str = "vllm",
    host: str = "0.0.0.0",
    port: int = 8000,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    dtype: str = "auto",
    max_model_len: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    enable_prefix_caching: bool | None = None,
    log_level: str = "info",
) -> None:
    """Load `model` with `backend` ("vllm" or "transformers") and serve it until interrupted."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if backend == "vllm":
        engine = VLLMEngine(
            model,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            max_model_len=max_model_len,
            revision=revision,
            trust_remote_code=trust_remote_code,
            enable_prefix_caching=enable_prefix_caching,
        )
    elif backend == "transformers":
        engine = TransformersEngine(model, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)
    else:
        raise ValueError(f"backend must be 'vllm' or 'transformers', got {backend!r}.")
    server = make_server(engine, host, port)
    logger.info("Serving %s (%s back end) on http://%s:%d", model, backend, host, server.server_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _torch_dtype(name: str):
    if name == "auto":
        return "auto"
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown dtype {name!r}; use 'auto', 'float32', 'bfloat16' or 'float16'.")
    return dtype


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-trainer vllm-serve", description="Serve a model for the trainers' server generation mode."
    )

    def add(name: str, **kwargs) -> None:
        parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", **kwargs)

    add("model", required=True, help="Model name or local folder (the policy's starting checkpoint).")
    add("backend", choices=["vllm", "transformers"], default="vllm", help="Generation engine.")
    add("host", default="0.0.0.0", help="Address to listen on.")
    add("port", type=int, default=8000, help="Port to listen on.")
    add("tensor_parallel_size", type=int, default=1, help="vLLM tensor-parallel GPUs.")
    add("gpu_memory_utilization", type=float, default=0.9, help="Share of GPU memory vLLM may use.")
    add("dtype", default="auto", help="'auto', 'float32', 'bfloat16' or 'float16'.")
    add("max_model_len", type=int, default=None, help="vLLM context length (prompt + completion).")
    add("revision", default=None, help="Model revision (branch, tag or commit).")
    add("trust_remote_code", type=_flag, nargs="?", const=True, default=False, help="Allow the model's own code.")
    add("enable_prefix_caching", type=_flag, nargs="?", const=True, default=None, help="vLLM prefix caching.")
    add("log_level", default="info", choices=["debug", "info", "warning", "error", "critical"], help="Log level.")
    return parser


def main(argv: list[str] | None = None) -> None:
    serve(**vars(build_parser().parse_args(argv)))
