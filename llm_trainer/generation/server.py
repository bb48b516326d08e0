"""`llm-trainer vllm-serve`: a generation server for the trainers' server mode (`use_vllm=True, vllm_mode="server"`).

    llm-trainer vllm-serve --model Qwen/Qwen2.5-0.5B --tensor_parallel_size 2 --port 8000
    llm-trainer vllm-serve --model path/to/model --backend transformers        # no vLLM, CPU or GPU

A standard-library HTTP server speaking JSON. Endpoints:

    GET  /health/              {"status": "ok", "backend", "model", "model_version", "lora_adapter": bool,
                                "requests_in_flight" (generating now), "requests_served"} (a heartbeat; never waits
                               for the engine)
    POST /generate/            {"prompts": [[ids]], "n": int | [int per prompt], "sampling": {SamplingConfig fields},
                                "stop_token_ids": [ids] | null, "structured_outputs_regex": str | null}
                               -> {"completion_ids": [[ids]], "logprobs": [[float]] | null, "model_version": int},
                               grouped by prompt
    POST /update_weights/      body: tensors serialized with `safetensors.torch.save`, loaded into the model by name.
                               `?version=N` sets the served model version after loading. A bucketed update sends
                               `?version=N&chunk=i&final=0` for every chunk but the last (staged on the host) and
                               `?version=N&chunk=K-1&final=1` for the last: all chunks are loaded with it, at once.
                               -> {"updated": int, "model_version": int} (a staged chunk: {"staged": int, ...})
    POST /update_lora_adapter/ body: a LoRA adapter's tensors (safetensors, named as peft's
                               `get_peft_model_state_dict`), its LoraConfig fields as JSON in the `X-LoRA-Config`
                               header (or `?config=`), `?version=N`: served on the base model as a peft adapter
                               (vLLM: a LoRA request, needs `--enable_lora`), replacing the previous one; no merge.
                               A later full update removes the adapter.
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
                               (both replies also carry "model_version", an extra field OpenAI clients ignore)
    POST /start_weight_update/, /finish_weight_update/   accepted; HTTP weight updates need no session

The two `/v1/` generation routes are also what an OpenAI client sends (`model`, `messages`, `max_tokens` or
`max_completion_tokens`, `temperature`, `top_p`, `n`, `stop`, `seed`), so the server can stand in for an OpenAI
endpoint, e.g. as a local judge; any `model` name is answered by the served model. Their bad requests get HTTP 400
with OpenAI's body, `{"error": {"message", "type": "invalid_request_error", "param": <the bad field>, "code"}}`.

Every request that touches the engine holds one lock from start to end, so a generation request in flight when a
weight update arrives finishes on the old weights, and its reply's `model_version` says which ones produced it
(replies are never produced by a mix of versions). The model version starts at 0.

Only the sampled token's log-prob is reported (`logprobs=N` lists it alone); multimodal messages, streaming and
`prompt_logprobs` are refused with HTTP 400. Weights travel over HTTP as safetensors, which works for both back
ends; TRL's NCCL broadcast straight to the vLLM workers (`/init_weight_transfer_engine`, JSON `/update_weights`) is
faster for large models, is not served here, and is refused with a message saying so. Requests are handled one at a
time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import torch

from .base import GenerationResult, SamplingConfig, as_id_list
from .http_json import JSONRequestHandler, serve_until_interrupted

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
        self.lora_config: dict | None = None  # the LoRA adapter being served (peft), if any
        self._adapter: str | None = None  # its peft adapter name
        self._shapes = {name: t.shape for name, t in self.model.state_dict().items()}  # of the base model
        self._adapters = 0

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

    def check_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """ValueError unless every tensor names a weight of the served base model, with its shape; loads nothing."""
        unknown = sorted(set(tensors) - set(self._shapes))
        if unknown:
            raise ValueError(
                f"{len(unknown)} tensor name(s) are not parameters of the served model, e.g. {unknown[:3]}; it has "
                f"e.g. {list(self._shapes)[:3]}. Serve the same architecture as the policy being trained."
            )
        wrong = [
            f"{n}: {tuple(t.shape)} != {self._shapes[n]}" for n, t in tensors.items() if t.shape != self._shapes[n]
        ]
        if wrong:
            raise ValueError(
                f"size mismatch for {len(wrong)} tensor(s) (sent != served), e.g. {wrong[:2]}. Serve the same "
                "architecture as the policy being trained."
            )

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load full weights by name; a LoRA adapter being served is removed first (the update replaces the policy)."""
        self.check_weights(tensors)
        if self._adapter is not None:
            self.model = self.model.unload()  # the base model without LoRA layers (nothing merged)
            self.model.eval()
            self._adapter = self.lora_config = None
        self.model.load_state_dict(tensors, strict=False)

    def load_lora_adapter(self, tensors: dict[str, torch.Tensor], config: dict) -> None:
        """Serve the base model with this LoRA adapter (peft), replacing the previous adapter; nothing is merged.

        `tensors` are named as `peft.get_peft_model_state_dict` names them; `config` holds `LoraConfig` fields.
        The same config as the adapter being served reloads its tensors in place; another one is added beside it and
        replaces it once loaded. Tensors that do not fit are refused before anything changes.
        """
        from peft import get_peft_model, set_peft_model_state_dict

        fresh = self.lora_config != config
        if fresh:
            lora = lora_config_from_dict(config)
            self._adapters += 1
            name = f"adapter-{self._adapters}"
            if self._adapter is None:
                self.model = get_peft_model(self.model, lora, adapter_name=name)
            else:
                self.model.add_adapter(name, lora)
        else:
            name = self._adapter
        try:
            _check_adapter_tensors(self.model, name, tensors)
            set_peft_model_state_dict(self.model, tensors, adapter_name=name)
        except Exception:
            if fresh:  # back to what was served
                if self._adapter is None:
                    self.model = self.model.unload()
                else:
                    self.model.set_adapter(self._adapter)
                    self.model.delete_adapter(name)
            raise
        if fresh and self._adapter is not None:
            self.model.set_adapter(name)
            self.model.delete_adapter(self._adapter)
        self._adapter, self.lora_config = name, config
        self.model.eval()

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
        self.lora_enabled = bool(engine_args.get("enable_lora"))
        self.lora_config: dict | None = None
        self._lora_request = None
        self._lora_dir: str | None = None
        self._lora_id = 0

    def generate(self, prompts, counts, sampling, stop_token_ids, structured_outputs_regex) -> GenerationResult:
        from .vllm_backend import generate_runs

        llm = self.llm if self._lora_request is None else _WithLoRA(self.llm, self._lora_request)
        return generate_runs(llm, prompts, counts, sampling, stop_token_ids, structured_outputs_regex)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """vLLM's own `load_weights` on every worker (`collective_rpc`); a served LoRA adapter is dropped first."""
        from .vllm_backend import load_weights_into_vllm

        self._drop_lora()
        load_weights_into_vllm(self.llm, list(tensors.items()))

    def load_lora_adapter(self, tensors: dict[str, torch.Tensor], config: dict) -> None:
        """Write the adapter as a peft folder and serve it as vLLM's LoRA request (vLLM loads it on first use);
        the previous adapter is removed. Needs `--enable_lora`."""
        import shutil
        import tempfile

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if not self.lora_enabled:
            raise ValueError(
                "this vLLM server was started without LoRA support: restart it with `--enable_lora true` (and "
                "`--max_lora_rank` at least the adapter's r) to take adapter-only updates."
            )
        folder = tempfile.mkdtemp(prefix="llm-trainer-lora-")
        save_file(
            {name: t.contiguous() for name, t in tensors.items()}, os.path.join(folder, "adapter_model.safetensors")
        )
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", **config}, f)
        self._lora_id += 1
        request = LoRARequest(f"adapter-{self._lora_id}", self._lora_id, folder)
        add_lora = getattr(self.llm.llm_engine, "add_lora", None)  # load now, so a bad adapter fails this update
        if add_lora is not None:
            try:
                add_lora(request)
            except Exception as err:
                shutil.rmtree(folder, ignore_errors=True)
                raise ValueError(f"vLLM could not load the adapter ({type(err).__name__}: {err}).") from err
        previous, previous_dir = self._lora_request, self._lora_dir
        self._lora_request, self._lora_dir, self.lora_config = request, folder, config
        if previous is not None:
            with contextlib.suppress(Exception):  # best effort: vLLM evicts unused adapters anyway
                self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous_dir, ignore_errors=True)

    def _drop_lora(self) -> None:
        import shutil

        if self._lora_request is not None:
            with contextlib.suppress(Exception):
                self.llm.llm_engine.remove_lora(self._lora_request.lora_int_id)
            shutil.rmtree(self._lora_dir, ignore_errors=True)
        self._lora_request = self._lora_dir = self.lora_config = None

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()


class _WithLoRA:
    """A `vllm.LLM` whose `generate` uses one LoRA request."""

    def __init__(self, llm, lora_request):
        self.llm, self.lora_request = llm, lora_request

    def generate(self, *args, **kwargs):
        return self.llm.generate(*args, lora_request=self.lora_request, **kwargs)


# The request header carrying an adapter's LoraConfig as JSON on POST /update_lora_adapter/.
LORA_CONFIG_HEADER = "X-LoRA-Config"


def lora_config_from_dict(config: dict):
    """A `peft.LoraConfig` from JSON fields (`LoraConfig.to_dict()`'s); fields this peft does not know are logged and
    left out, a non-LoRA `peft_type` is refused."""
    import dataclasses as dc

    from peft import LoraConfig

    peft_type = str(config.get("peft_type") or "LORA").split(".")[-1].upper()
    if peft_type != "LORA":
        raise ValueError(
            f"only LoRA adapters can be served as adapters, got peft_type {config.get('peft_type')!r}; send merged "
            "weights with update_weights instead."
        )
    known = {f.name for f in dc.fields(LoraConfig) if f.init}
    unknown = sorted(set(config) - known)
    if unknown:
        logger.warning("LoRA config fields not known to this peft version, ignored: %s", unknown)
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init == "gaussian"):
        raise ValueError(
            f"an adapter initialized with init_lora_weights={init!r} changed its base weights too, so the served base "
            "model cannot take it alone; send merged weights with update_weights instead."
        )
    drop = ("peft_type", "inference_mode", "init_lora_weights")  # the adapter's tensors are overwritten anyway
    kwargs = {k: v for k, v in config.items() if k in known and k not in drop}
    return LoraConfig(**kwargs, inference_mode=True)


def _check_adapter_tensors(model, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
    """ValueError unless `tensors` are exactly adapter `adapter`'s tensors of the peft `model`, in shape."""
    from peft import get_peft_model_state_dict

    want = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    unknown = sorted(set(tensors) - set(want))
    missing = sorted(set(want) - set(tensors))
    shapes = [
        f"{n}: {tuple(tensors[n].shape)} != {want[n]}"
        for n in want
        if n in tensors and tuple(tensors[n].shape) != want[n]
    ]
    if unknown or missing or shapes:
        raise ValueError(
            f"the adapter does not fit the served model: {len(unknown)} unknown tensor(s), e.g. {unknown[:3]}; "
            f"{len(missing)} missing, e.g. {missing[:3]}; {len(shapes)} of another shape, e.g. {shapes[:2]}. Send "
            "the tensors of `peft.get_peft_model_state_dict(model)` with that adapter's LoraConfig, for the served "
            "base model."
        )


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
                    "multimodal messages (image parts) are not supported by llm-trainer vllm-serve: send text parts "
                    "only (to train on images, generate with vllm_mode='colocate' or use_vllm=False).",
                    f"messages[{i}]",
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


class ServerState:
    """What the server holds besides the engine: the served model version and the weight update in progress.

    `lock` serializes every request that touches the engine, so a generation request runs start to end on one set
    of weights and is tagged with their version. Chunks of a versioned, bucketed update (`?version=N&final=0`) are
    staged on the host and loaded together with the final chunk, under the lock: a generation never sees half an
    update.
    """

    def __init__(self, model_version: int = 0):
        self.lock = threading.Lock()
        self.model_version = model_version
        self.in_flight = 0  # generation requests running on the engine now
        self.served = 0  # generation requests done (answered or failed)
        self._counter_lock = threading.Lock()
        self._staging_lock = threading.Lock()
        self._staged: list[dict[str, torch.Tensor]] = []
        self._staged_version: int | None = None

    @contextlib.contextmanager
    def generating(self):
        """Count a generation request while it runs on the engine (`in_flight`) and once it is done (`served`)."""
        with self._counter_lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._counter_lock:
                self.in_flight -= 1
                self.served += 1

    def stage(self, version: int, chunk: int, tensors: dict[str, torch.Tensor]) -> int:
        """Keep a non-final chunk of update `version`; returns how many chunks of it are staged."""
        with self._staging_lock:
            if self._staged_version != version or chunk == 0:
                if self._staged:
                    logger.warning(
                        "Dropping %d staged chunk(s) of weight update version %s: a new update (version %d) started "
                        "before its final chunk arrived.",
                        len(self._staged),
                        self._staged_version,
                        version,
                    )
                self._staged, self._staged_version = [], version
            if chunk != len(self._staged):
                expected = len(self._staged)
                self._staged, self._staged_version = [], None
                raise ValueError(
                    f"weight update version {version}: got chunk {chunk}, expected chunk {expected} (a chunk was "
                    "lost or the server restarted mid-update); resend the whole update."
                )
            self._staged.append(tensors)
            return len(self._staged)

    def take_staged(self, version: int, chunk: int) -> list[dict[str, torch.Tensor]]:
        """The staged chunks 0..chunk-1 of update `version` (the final chunk is `chunk`); cleared."""
        with self._staging_lock:
            staged = self._staged if self._staged_version == version else []
            if self._staged and self._staged_version != version:
                logger.warning(
                    "Dropping %d staged chunk(s) of weight update version %s: update version %d arrived instead.",
                    len(self._staged),
                    self._staged_version,
                    version,
                )
            self._staged, self._staged_version = [], None
        if len(staged) != chunk:
            raise ValueError(
                f"weight update version {version}: the final chunk is chunk {chunk}, but {len(staged)} earlier "
                "chunk(s) are staged (a chunk was lost, another update interleaved, or the server restarted); resend "
                "the whole update."
            )
        return staged


def make_server(engine, host: str = "0.0.0.0", port: int = 8000, model_version: int = 0) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) that answers the endpoints above with `engine`, starting at `model_version`.

    The returned server's `state` (a `ServerState`) holds the served model version.
    """
    state = ServerState(model_version)

    class Handler(JSONRequestHandler):
        logger = logger

        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            replies = {
                "health": lambda: {
                    "status": "ok",
                    "backend": engine.backend,
                    "model": engine.name,
                    "model_version": state.model_version,
                    "lora_adapter": getattr(engine, "lora_config", None) is not None,
                    "requests_in_flight": state.in_flight,
                    "requests_served": state.served,
                },
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
                "update_lora_adapter": self._update_lora_adapter,
                "reset_prefix_cache": self._locked(self._reset_prefix_cache),
                "close_communicator": lambda body: {"success": True},
                "start_weight_update": lambda body: {"success": True},
                "finish_weight_update": lambda body: {"success": True},
                "init_weight_transfer_engine": self._refuse_nccl,
                "v1/completions": self._tagged(lambda body: openai_completions(engine, _request_object(body))),
                "v1/chat/completions": self._tagged(
                    lambda body: openai_chat_completions(engine, _request_object(body))
                ),
            }
            if route not in actions:
                self._not_found()
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                reply = actions[route](body)
            except (ValueError, TypeError, KeyError) as err:
                self._error(route, err, HTTPStatus.BAD_REQUEST)
            except Exception as err:  # report it to the client rather than drop the connection
                logger.exception("%s failed", self.path)
                self._error(route, err, HTTPStatus.INTERNAL_SERVER_ERROR)
            else:
                self._reply(reply)

        @staticmethod
        def _locked(action):
            def run(body: bytes) -> dict:
                with state.lock:
                    return action(body)

            return run

        @staticmethod
        def _tagged(action):
            """`action` under the engine lock, its reply tagged with the version that produced it."""

            def run(body: bytes) -> dict:
                with state.lock, state.generating():
                    reply = action(body)
                    reply["model_version"] = state.model_version
                return reply

            return run

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
            with state.lock, state.generating():
                result = engine.generate(prompts, counts, sampling, stops, request.get("structured_outputs_regex"))
                version = state.model_version
            return {"completion_ids": result.completion_ids, "logprobs": result.logprobs, "model_version": version}

        def _refuse_nccl(self, body: bytes) -> dict:
            raise ValueError(NCCL_REFUSED)

        def _query(self) -> dict[str, str]:
            query = parse_qs(urlsplit(self.path).query)
            return {key: values[-1] for key, values in query.items()}

        def _version(self, query: dict[str, str]) -> int | None:
            if "version" not in query:
                return None
            try:
                return int(query["version"])
            except ValueError:
                raise ValueError(f"?version= must be an integer, got {query['version']!r}.") from None

        def _update_weights(self, body: bytes) -> dict:
            if (self.headers.get("Content-Type") or "").startswith("application/json"):
                self._refuse_nccl(body)  # TRL's NCCL announcement, {"update_info": ...}
            tensors = _load_safetensors(body)
            query = self._query()
            version = self._version(query)
            try:
                chunk = int(query.get("chunk", 0))
            except ValueError:
                raise ValueError(f"?chunk= must be an integer, got {query['chunk']!r}.") from None
            if version is not None and query.get("final", "1") in ("0", "false"):
                staged = state.stage(version, chunk, tensors)
                return {"staged": staged, "model_version": state.model_version}
            chunks = state.take_staged(version, chunk) if version is not None else []
            check = getattr(engine, "check_weights", None)
            for part in [*chunks, tensors] if check is not None else ():
                check(part)  # every chunk fits before any is loaded: a refused update changes nothing
            with state.lock:
                for part in [*chunks, tensors]:
                    engine.load_weights(part)
                if version is not None:
                    state.model_version = version
                return {"updated": sum(len(part) for part in [*chunks, tensors]), "model_version": state.model_version}

        def _update_lora_adapter(self, body: bytes) -> dict:
            tensors = _load_safetensors(body)
            query = self._query()
            raw = self.headers.get(LORA_CONFIG_HEADER) or query.get("config")
            if not raw:
                raise ValueError(
                    f"the LoRA config is missing: send it as JSON in the {LORA_CONFIG_HEADER} header (or ?config=), "
                    'e.g. {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}.'
                )
            try:
                config = json.loads(raw)
            except ValueError:
                raise ValueError(f"the LoRA config is not JSON: {raw[:200]!r}.") from None
            if not isinstance(config, dict) or "r" not in config:
                raise ValueError(f"the LoRA config must be a JSON object with at least `r`, got {raw[:200]!r}.")
            version = self._version(query)
            with state.lock:
                engine.load_lora_adapter(tensors, config)
                if version is not None:
                    state.model_version = version
                return {"updated": len(tensors), "model_version": state.model_version}

        def _reset_prefix_cache(self, body: bytes) -> dict:
            engine.reset_prefix_cache()
            return {"success": True}

        def _route(self) -> str:
            return self.path.split("?", 1)[0].strip("/")

        def _not_found(self) -> None:
            endpoints = (
                "GET /health/, /v1/models, /get_world_size/, /server_info/; POST /generate/, /v1/completions, "
                "/v1/chat/completions, /update_weights/, /update_lora_adapter/, /reset_prefix_cache/, "
                "/close_communicator/"
            )
            self._reply({"error": f"no endpoint {self.command} {self.path}; try {endpoints}"}, HTTPStatus.NOT_FOUND)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.state = state
    return server


def _load_safetensors(body: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(body)
    except Exception as err:
        raise ValueError(f"the body is not a safetensors blob ({err}).") from None


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
    serve_until_interrupted(server)


def _torch_dtype(name: str):
    if name == "auto":
        return "auto"
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown dtype {name!r}; use 'auto', 'float32', 'bfloat16' or 'float16'.")
    return dtype
