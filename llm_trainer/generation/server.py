"""`llm-trainer vllm-serve`: a generation server for the trainers' server mode (`use_vllm=True, vllm_mode="server"`).

    llm-trainer vllm-serve --model Qwen/Qwen2.5-0.5B --tensor_parallel_size 2 --port 8000
    llm-trainer vllm-serve --model path/to/model --backend transformers        # no vLLM, CPU or GPU

A standard-library HTTP server speaking JSON. Endpoints:

    GET  /health/              {"status": "ok", "backend", "model"}
    POST /generate/            {"prompts": [[ids]], "n": int | [int per prompt], "sampling": {SamplingConfig fields},
                                "stop_token_ids": [ids] | null, "structured_outputs_regex": str | null}
                               -> {"completion_ids": [[ids]], "logprobs": [[float]] | null}, grouped by prompt
    POST /update_weights/      body: tensors serialized with `safetensors.torch.save`, loaded into the model by name
    POST /reset_prefix_cache/  forget cached prefixes (after a weight update) -> {"success": true}
    POST /close_communicator/  accepted for TRL compatibility; nothing to close

and the subset of vLLM's OpenAI-compatible server (`vllm serve`, which `trl vllm-serve` runs) that TRL's `VLLMClient`
uses, with the same request and response JSON:

    GET  /v1/models            {"data": [{"id": model}]}
    GET  /get_world_size/      {"world_size": int}
    GET  /server_info/         {"vllm_config": {"model", "backend", "weight_transfer_config": {"backend": "http"}}}
    POST /v1/completions       text or token-id prompts; choices prompt-major with "token_ids", "prompt_token_ids"
                               and "logprobs" {"tokens", "token_logprobs", "top_logprobs"}
    POST /v1/chat/completions  one conversation, chat template applied here; "prompt_token_ids", choices with
                               "message", "token_ids" and "logprobs" {"content": [...]}
    POST /start_weight_update/, /finish_weight_update/   accepted; HTTP weight updates need no session

The two `/v1/` generation routes are also what an OpenAI client sends (`model`, `messages`, `max_tokens` or
`max_completion_tokens`, `temperature`, `top_p`, `n`, `stop`, `seed`), so the server can stand in for an OpenAI
endpoint, e.g. as a local judge; any `model` name is answered by the served model. Their bad requests get HTTP 400
with OpenAI's body, `{"error": {"message", "type": "invalid_request_error", "param": <the bad field>, "code"}}`.

Only the sampled token's log-prob is reported (`logprobs=N` lists it alone); multimodal messages, streaming and
`prompt_logprobs` are refused with HTTP 400. Weights travel over HTTP as safetensors, which works for both back
ends; TRL's NCCL broadcast straight to the vLLM workers (`/init_weight_transfer_engine`, JSON `/update_weights`) is
faster for large models, is not served here, and is refused with a message saying so. Requests are handled one at a
time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import uuid
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
        self.tokenizer = tokenizer
        self.world_size = 1

    def generate(self, prompts, counts, sampling, stop_token_ids, structured_outputs_regex) -> GenerationResult:
        from .transformers_backend import TransformersGenerator

        if structured_outputs_regex is not None:
            raise ValueError("structured_outputs_regex needs the vLLM back end (`--backend vllm`).")
        eos = self.eos_token_ids + [t for t in stop_token_ids if t not in self.eos_token_ids]
        kwargs = dict(sampling.generation_kwargs or {})
        if "seed" in kwargs:  # vLLM's per-request seed; transformers samples from the global generator
            torch.manual_seed(kwargs.pop("seed"))
            sampling = dataclasses.replace(sampling, generation_kwargs=kwargs)
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
    """Serves a model with a `vllm.LLM` engine; `engine_args` are `vllm.LLM`'s keyword arguments."""

    backend = "vllm"

    def __init__(self, model: str, **engine_args):
        from .vllm_backend import load_vllm

        self.name = model
        # Weight updates run a function on the engine's worker processes, which vLLM must be allowed to pickle.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self.llm = load_vllm(model, **engine_args)
        self.tokenizer = self.llm.get_tokenizer()
        self.eos_token_ids = as_id_list(self.tokenizer.eos_token_id)
        self.world_size = engine_args.get("tensor_parallel_size", 1) * engine_args.get("data_parallel_size", 1)

    def generate(self, prompts, counts, sampling, stop_token_ids, structured_outputs_regex) -> GenerationResult:
        from .vllm_backend import generate_runs

        return generate_runs(self.llm, prompts, counts, sampling, stop_token_ids, structured_outputs_regex)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        from .vllm_backend import load_weights_into_vllm

        load_weights_into_vllm(self.llm, list(tensors.items()))

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()


NCCL_REFUSED = (
    "llm-trainer vllm-serve receives weights over HTTP, not through vLLM's NCCL weight-transfer engine: use "
    "`llm_trainer.generation.vllm_client.VLLMClient` (its update_named_param / update_model_params send safetensors), "
    'or TRL\'s client against `vllm serve --weight-transfer-config \'{"backend": "nccl"}\'`.'
)
# Request fields of vLLM's OpenAI routes that are not back-end sampling parameters (`seed` goes to the back end).
_OPENAI_FIELDS = {
    "model", "prompt", "messages", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "repetition_penalty", "logprobs", "top_logprobs", "structured_outputs", "return_token_ids",
    "return_tokens_as_token_ids", "stream", "tools", "tool_choice", "chat_template", "chat_template_kwargs",
    "add_generation_prompt", "continue_final_message", "user", "stop_token_ids", "prompt_logprobs", "echo", "stop",
}  # fmt: skip
_ROLES = ("system", "developer", "user", "assistant", "tool")


class BadRequest(ValueError):
    """A malformed request to an OpenAI route; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _field(request: dict, name: str, default, valid, rule: str):
    """`request[name]` checked by `valid` (`default` when absent or null); BadRequest naming the field otherwise."""
    value = request.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not valid(value):
        raise BadRequest(f"`{name}` must be {rule}, got {value!r}.", name)
    return value


def _positive_int(value) -> bool:
    return isinstance(value, int) and value >= 1


def _number(value) -> bool:
    return isinstance(value, (int, float))


def _stop_strings(request: dict) -> list[str]:
    stop = request.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(f"`stop` must be a non-empty string or a list of them, got {request['stop']!r}.", "stop")
    return stop


def _openai_sampling(request: dict) -> tuple[int, SamplingConfig, list[int], str | None]:
    """`(n, sampling, stop_token_ids, regex)` from an OpenAI-style request; unknown fields go to the back end."""
    for unsupported in ("stream", "prompt_logprobs", "echo"):
        if request.get(unsupported):
            raise BadRequest(f"`{unsupported}` is not supported by llm-trainer vllm-serve.", unsupported)
    n = _field(request, "n", 1, _positive_int, "a positive integer")
    max_tokens = _field(request, "max_tokens", 16, _positive_int, "a positive integer")
    _field(request, "seed", None, lambda v: isinstance(v, int), "an integer")
    min_p = request.get("min_p") or None  # 0 disables it, as None does here
    sampling = SamplingConfig(
        max_tokens=_field(request, "max_completion_tokens", max_tokens, _positive_int, "a positive integer"),
        temperature=_field(request, "temperature", 1.0, lambda v: _number(v) and v >= 0, "a number >= 0 (0: greedy)"),
        top_p=_field(request, "top_p", 1.0, lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
        top_k=max(request.get("top_k") or 0, 0),  # vLLM disables top-k with 0 or -1
        min_p=min_p,
        repetition_penalty=request.get("repetition_penalty", 1.0),
        generation_kwargs={k: v for k, v in request.items() if k not in _OPENAI_FIELDS} or None,
    )
    regex = (request.get("structured_outputs") or {}).get("regex")
    return n, sampling, list(request.get("stop_token_ids") or []), regex


def _token_label(engine, token: int, as_ids: bool) -> str:
    return f"token_id:{token}" if as_ids else engine.tokenizer.decode([token])


def _finish(engine, ids: list[int], stops: list[int], stop_strings: list[str]) -> tuple[list[int], str, str]:
    """`(ids, text, finish_reason)` of a completion cut at its first stop string: the text without it, the ids through
    the token that completed it."""
    text = _decode(engine, ids)
    cuts = [text.find(s) for s in stop_strings if s in text]
    if cuts:
        kept = next(k for k in range(1, len(ids) + 1) if any(s in _decode(engine, ids[:k]) for s in stop_strings))
        return ids[:kept], text[: min(cuts)], "stop"
    stopped = ids and (ids[-1] in engine.eos_token_ids or ids[-1] in stops)
    return ids, text, "stop" if stopped else "length"


def _decode(engine, ids: list[int]) -> str:
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def openai_completions(engine, request: dict) -> dict:
    """Answer vLLM's `/v1/completions`: `n` completions of each prompt (text or token ids), prompt-major."""
    prompt = request.get("prompt")
    stop_strings = _stop_strings(request)
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest(
            "`prompt` must be a string, a list of strings, a token-id list or a list of token-id lists.", "prompt"
        )
    prompts = [engine.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompt]
    if any(not ids for ids in prompts):
        raise BadRequest("every prompt needs at least one token.", "prompt")
    n, sampling, stops, regex = _openai_sampling(request)
    result = engine.generate(prompts, [n] * len(prompts), sampling, stops, regex)
    as_ids = bool(request.get("return_tokens_as_token_ids"))
    choices = []
    for index, ids in enumerate(result.completion_ids):
        ids, text, finish_reason = _finish(engine, ids, stops, stop_strings)
        logprobs = None
        if request.get("logprobs") is not None and result.logprobs is not None:
            labels = [_token_label(engine, t, as_ids) for t in ids]
            token_logprobs = result.logprobs[index][: len(ids)]
            logprobs = {
                "tokens": labels,
                "token_logprobs": token_logprobs,
                "top_logprobs": [{label: lp} for label, lp in zip(labels, token_logprobs)],
            }
        choices.append(
            {
                "index": index,
                "text": text,
                "token_ids": ids,
                "prompt_token_ids": prompts[index // n],
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        )
    return _openai_reply("text_completion", engine, choices, prompts, n)


def openai_chat_completions(engine, request: dict) -> dict:
    """Answer vLLM's (and OpenAI's) `/v1/chat/completions`: render one conversation with the chat template (and the
    generation prompt), then generate."""
    flat = _chat_messages(request.get("messages"))
    stop_strings = _stop_strings(request)
    if request.get("chat_template") is None and not getattr(engine.tokenizer, "chat_template", None):
        raise BadRequest(
            f"the served model {engine.name} has no chat template (its tokenizer_config.json sets none): serve a chat "
            "model, send `chat_template` with the request, or send plain text to /v1/completions.",
            "messages",
        )
    text = engine.tokenizer.apply_chat_template(
        flat,
        tools=request.get("tools") or None,
        chat_template=request.get("chat_template"),
        add_generation_prompt=request.get("add_generation_prompt", True),
        continue_final_message=request.get("continue_final_message", False),
        tokenize=False,
        **(request.get("chat_template_kwargs") or {}),
    )
    prompt_ids = engine.tokenizer.encode(text, add_special_tokens=False)
    request = {**request, "logprobs": None if not request.get("logprobs") else request.get("top_logprobs", 0)}
    n, sampling, stops, regex = _openai_sampling(request)
    result = engine.generate([prompt_ids], [n], sampling, stops, regex)
    as_ids = bool(request.get("return_tokens_as_token_ids"))
    choices = []
    for index, ids in enumerate(result.completion_ids):
        ids, content, finish_reason = _finish(engine, ids, stops, stop_strings)
        logprobs = None
        if request["logprobs"] is not None and result.logprobs is not None:
            entries = []
            for token, lp in zip(ids, result.logprobs[index]):
                label = _token_label(engine, token, as_ids)
                entries.append({"token": label, "logprob": lp, "top_logprobs": [{"token": label, "logprob": lp}]})
            logprobs = {"content": entries}
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": content},
                "token_ids": ids,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        )
    reply = _openai_reply("chat.completion", engine, choices, [prompt_ids], n)
    reply["prompt_token_ids"] = prompt_ids
    return reply


def _chat_messages(messages) -> list[dict]:
    """OpenAI `messages` as chat-template messages: text content parts joined, `developer` read as `system`."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list of {'role', 'content'} messages.", "messages")
    flat = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}.", f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: text only here
            if any(not isinstance(part, dict) or part.get("type") != "text" for part in content):
                raise BadRequest(
                    "multimodal messages (image parts) are not supported by llm-trainer vllm-serve.", f"messages[{i}]"
                )
            content = "".join(part.get("text", "") for part in content)
        elif not isinstance(content, str) and not (role == "assistant" and content is None):
            raise BadRequest(
                f"messages[{i}].content must be a string or text parts, got {content!r}.", f"messages[{i}]"
            )
        flat.append({**message, "role": "system" if role == "developer" else role, "content": content})
    return flat


def _request_object(body: bytes) -> dict:
    try:
        request = json.loads(body)
    except ValueError:
        request = None
    if not isinstance(request, dict):
        raise BadRequest("the request body must be a JSON object.")
    return request


def _openai_reply(kind: str, engine, choices: list[dict], prompts: list[list[int]], n: int) -> dict:
    prompt_tokens = sum(len(ids) for ids in prompts)
    completion_tokens = sum(len(choice["token_ids"]) for choice in choices)
    return {
        "id": f"{kind.split('.')[0]}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": engine.name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def make_server(engine, host: str = "0.0.0.0", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) that answers the endpoints above with `engine`."""
    lock = threading.Lock()  # one model, one request at a time

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            replies = {
                "health": lambda: {"status": "ok", "backend": engine.backend, "model": engine.name},
                "v1/models": lambda: {
                    "object": "list",
                    "data": [{"id": engine.name, "object": "model", "owned_by": "llm_trainer", "root": engine.name}],
                },
                "get_world_size": lambda: {"world_size": engine.world_size},
                "server_info": lambda: {
                    "vllm_config": {
                        "model": engine.name,
                        "backend": engine.backend,
                        "weight_transfer_config": {"backend": "http"},
                    }
                },
            }
            route = self._route()
            if route in replies:
                self._reply(replies[route]())
            else:
                self._not_found()

        def do_POST(self) -> None:
            route = self._route()
            actions = {
                "generate": self._generate,
                "update_weights": self._update_weights,
                "reset_prefix_cache": self._reset_prefix_cache,
                "close_communicator": lambda body: {"success": True},
                "start_weight_update": lambda body: {"success": True},
                "finish_weight_update": lambda body: {"success": True},
                "init_weight_transfer_engine": self._refuse_nccl,
                "v1/completions": lambda body: openai_completions(engine, _request_object(body)),
                "v1/chat/completions": lambda body: openai_chat_completions(engine, _request_object(body)),
            }
            if route not in actions:
                self._not_found()
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                with lock:
                    reply = actions[route](body)
            except (ValueError, TypeError, KeyError) as err:
                self._error(route, err, HTTPStatus.BAD_REQUEST)
            except Exception as err:  # report it to the client rather than drop the connection
                logger.exception("%s failed", self.path)
                self._error(route, err, HTTPStatus.INTERNAL_SERVER_ERROR)
            else:
                self._reply(reply)

        def _error(self, route: str, err: Exception, status: HTTPStatus) -> None:
            message = str(err) if isinstance(err, BadRequest) else f"{type(err).__name__}: {err}"
            if not route.startswith("v1/"):
                self._reply({"error": message}, status)
                return
            kind = "invalid_request_error" if status == HTTPStatus.BAD_REQUEST else "server_error"
            param = getattr(err, "param", None)
            self._reply({"error": {"message": message, "type": kind, "param": param, "code": status.value}}, status)

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

        def _refuse_nccl(self, body: bytes) -> dict:
            raise ValueError(NCCL_REFUSED)

        def _update_weights(self, body: bytes) -> dict:
            from safetensors.torch import load

            if (self.headers.get("Content-Type") or "").startswith("application/json"):
                self._refuse_nccl(body)  # TRL's NCCL announcement, {"update_info": ...}

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
            endpoints = (
                "GET /health/, /v1/models, /get_world_size/, /server_info/; POST /generate/, /v1/completions, "
                "/v1/chat/completions, /update_weights/, /reset_prefix_cache/, /close_communicator/"
            )
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
    engine_args: dict | None = None,
) -> None:
    """Load `model` with `backend` ("vllm" or "transformers") and serve it until interrupted.

    `engine_args` are further `vllm.LLM` arguments (vLLM back end only).
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {"dtype": dtype, "revision": revision, "trust_remote_code": trust_remote_code}  # both back ends
    if backend == "vllm":
        engine = VLLMEngine(
            model,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            **options,
            **(engine_args or {}),
        )
    elif backend == "transformers":
        engine = TransformersEngine(model, **options)
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
