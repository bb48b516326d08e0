"""`llm-trainer train-serve`: a remote training service hosting one model, with a Tinker-style HTTP API.

    llm-trainer train-serve --model path/to/model --port 8100                 # full fine-tuning
    llm-trainer train-serve --model path/to/model --lora_rank 16 --port 8100  # LoRA (peft) adapters only

The training loop runs elsewhere (`llm_trainer.remote.ServiceClient`); the server owns the weights, the gradients
and the optimizer. Routes (JSON in, JSON out; tensors as `{"data": [...], "dtype", "shape"}`):

    GET  /health/                   {"status": "ok", "model", "lora_rank"}
    POST /create_model/             {"base_model", "lora_rank": int | null, "seed": int | null} -> {"session_id", ...}
                                    starts a fresh session (base weights, new adapter, new optimizer)
    POST /get_info/                 {"session_id"} -> model name, LoRA rank, step, parameter counts, tokens
    POST /forward/                  {"session_id", "data": [Datum]} -> {"loss_fn_outputs": [{"logprobs"}], ...}
    POST /forward_backward/         {"session_id", "data", "loss_fn", "loss_fn_config"} -> logprobs and
                                    {"metrics": {"loss:sum"}}; gradients accumulate until optim_step
    POST /optim_step/               {"session_id", "adam_params": AdamParams} -> {"step", "metrics": {"grad_norm"}}
    POST /save_weights_for_sampler/ {"session_id", "name"} -> {"path"}: a snapshot `sample` can use
    POST /save_state/               {"session_id", "name"} -> {"path"}: weights + optimizer state on disk
    POST /load_state/               {"session_id", "path"} -> {"step"}
    POST /sample/                   {"model_path": path | null, "prompt": ModelInput, "num_samples",
                                     "sampling_params"} -> {"sequences": [{"tokens", "logprobs", "stop_reason"}]}
    POST /compute_logprobs/         {"model_path", "prompt"} -> {"logprobs": [null, float, ...]} (one per token)

Requests are served one at a time (a lock), so a client's calls apply in the order they arrive. A malformed request
gets HTTP 400 with `{"error": message, "field": the offending field}`; an unknown route 404. Loss maths live in
`llm_trainer.losses.service`. Sampling uses the transformers generator, seeded per request like `llm-trainer
vllm-serve --backend transformers`, so both give the same samples from the same weights and seed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import uuid
from collections import OrderedDict
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from typing import Any

import torch

from ..generation.base import SamplingConfig, as_id_list
from ..generation.http_json import JSONRequestHandler, serve_until_interrupted
from ..losses.service import LOSS_INPUTS, SERVICE_LOSSES, check_loss_config, service_loss

logger = logging.getLogger("llm_trainer.train_serve")

SAMPLER_PREFIX = "llm-trainer://sampler/"
"""The path prefix of `save_weights_for_sampler` snapshots."""


class BadRequest(ValueError):
    """A malformed request; `field` names the offending request field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _require(request: dict, name: str, check, rule: str, default: Any = ...) -> Any:
    """`request[name]` if `check` accepts it (booleans never pass), `default` when absent or null; else BadRequest
    naming the field and the `rule` it breaks (also when it is required: no `default`)."""
    if name not in request or request[name] is None:
        if default is ...:
            raise BadRequest(f"`{name}` is required ({rule}).", name)
        return default
    value = request[name]
    if isinstance(value, bool) or not check(value):
        raise BadRequest(f"`{name}` must be {rule}, got {value!r}.", name)
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class TrainingService:
    """One model (full fine-tuning, or LoRA when `lora_rank` is set) with its optimizer, driven by requests.

    Args:
        model: local folder or Hub id of the base model.
        lora_rank: serve LoRA adapters of this rank only; None lets each session choose (full FT or any rank).
        lora_alpha: LoRA alpha; None uses 2 × rank.
        target_modules: peft `target_modules` ("all-linear" by default).
        dtype: weights' dtype ("float32" by default: the optimizer updates these weights).
        state_dir: where `save_state` writes; a new temporary folder when None.
        max_sampler_snapshots: sampler snapshots kept in memory; older ones are evicted (logged, and a request for
            one gets a 400 saying so).
        micro_batch_size: data per forward pass (a request's data are run in chunks of this many, gradients summed);
            None runs each request's data as one batch.
    """

    def __init__(
        self,
        model: str,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        target_modules: str | list[str] = "all-linear",
        dtype: str = "float32",
        state_dir: str | None = None,
        trust_remote_code: bool = False,
        max_sampler_snapshots: int = 8,
        micro_batch_size: int | None = None,
    ):
        from transformers import AutoTokenizer

        if lora_rank is not None and lora_rank < 1:
            raise ValueError(f"lora_rank must be a positive integer, got {lora_rank}")
        self.name, self.lora_rank, self.lora_alpha = model, lora_rank, lora_alpha
        self.target_modules, self.dtype, self.trust_remote_code = target_modules, dtype, trust_remote_code
        self.state_dir = state_dir or tempfile.mkdtemp(prefix="llm-trainer-train-serve-")
        self.max_sampler_snapshots = max_sampler_snapshots
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive integer or None, got {micro_batch_size}")
        self.micro_batch_size = micro_batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.model = self._load_base()
        self.device = next(self.model.parameters()).device
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.eos_token_ids = as_id_list(self.model.generation_config.eos_token_id)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in self.eos_token_ids:
            self.eos_token_ids.insert(0, self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids or [0])[0]
        self.session_id: str | None = None
        self.session_rank: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.step = 0
        self.version = 0  # bumped by every change of the weights (optim_step, load_state)
        self.snapshots: OrderedDict[str, tuple[int, dict[str, torch.Tensor]]] = OrderedDict()
        self.evicted: set[str] = set()

    # ------------------------------------------------------------------------------------------------ model
    def _load_base(self):
        from ..modeling import add_token_logprob_head, load_model

        model = load_model(self.name, dtype=self.dtype, trust_remote_code=self.trust_remote_code)
        add_token_logprob_head(model, outputs=())  # target log-probs without building vocabulary-sized logits
        return model.to("cuda" if torch.cuda.is_available() else "cpu")

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def create_model(self, request: dict) -> dict:
        base_model = _require(request, "base_model", lambda v: isinstance(v, str), "the served model's name")
        if base_model not in (self.name, os.path.basename(os.path.normpath(self.name))):
            raise BadRequest(
                f"`base_model` {base_model!r} is not served here; this server hosts {self.name!r}.", "base_model"
            )
        rank = _require(request, "lora_rank", lambda v: _is_int(v) and v >= 1, "a positive integer or null", None)
        seed = _require(request, "seed", _is_int, "an integer or null", None)
        if self.lora_rank is not None and rank != self.lora_rank:
            raise BadRequest(
                f"`lora_rank` must be {self.lora_rank}: this server was started with --lora_rank {self.lora_rank} "
                f"(got {rank!r}); restart it without --lora_rank to choose per session.",
                "lora_rank",
            )
        if self.session_id is not None:  # a fresh base model; the old session's is freed first (peak memory)
            self.session_id, self.optimizer, self.model = None, None, None
            self.snapshots.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.model = self._load_base()
        model = self.model
        if rank is not None:
            from peft import LoraConfig, get_peft_model

            if seed is not None:  # the adapter's random initialisation
                torch.manual_seed(seed)

            config = LoraConfig(
                r=rank,
                lora_alpha=self.lora_alpha if self.lora_alpha is not None else 2 * rank,
                target_modules=self.target_modules,
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, config)
        self.model, self.session_rank = model, rank
        self.session_id = uuid.uuid4().hex
        self.optimizer, self.step = None, 0
        self.version += 1
        self.snapshots.clear()
        self.evicted.clear()
        logger.info("New session %s (%s)", self.session_id, f"LoRA rank {rank}" if rank else "full fine-tuning")
        return {"session_id": self.session_id, **self.info()}

    def info(self) -> dict:
        trainable = sum(p.numel() for p in self._trainable().values())
        return {
            "model_name": self.name,
            "lora_rank": self.session_rank,
            "is_lora": self.session_rank is not None,
            "step": self.step,
            "trainable_parameters": trainable,
            "total_parameters": sum(p.numel() for p in self.model.parameters()),
            "vocab_size": self.vocab_size,
            "eos_token_ids": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
        }

    def _check_session(self, request: dict) -> None:
        session = _require(request, "session_id", lambda v: isinstance(v, str), "the id create_model returned")
        if self.session_id is None:
            raise BadRequest("no training session: call create_model first.", "session_id")
        if session != self.session_id:
            raise BadRequest(
                f"`session_id` {session!r} is not the current session (a later create_model replaced it).",
                "session_id",
            )

    # ------------------------------------------------------------------------------------------------ data
    def _datums(self, request: dict, needed: tuple[str, ...]) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
        data = request.get("data")
        if not isinstance(data, list) or not data:
            raise BadRequest("`data` must be a non-empty list of Datum objects.", "data")
        parsed = []
        for i, datum in enumerate(data):
            where = f"data[{i}]"
            if not isinstance(datum, dict) or not isinstance(datum.get("model_input"), dict):
                raise BadRequest(
                    f"{where} must be a Datum: {{'model_input': {{'chunks': [...]}}, 'loss_fn_inputs'}}.", where
                )
            chunks = datum["model_input"].get("chunks")
            if not isinstance(chunks, list):
                raise BadRequest(
                    f"{where}.model_input.chunks must be a list of {{'tokens': [ids]}}.", f"{where}.model_input"
                )
            tokens = []
            for chunk in chunks:
                ids = chunk.get("tokens") if isinstance(chunk, dict) else None
                if not isinstance(ids, list) or not all(_is_int(t) and 0 <= t < self.vocab_size for t in ids):
                    raise BadRequest(
                        f"{where}.model_input tokens must be token ids in [0, {self.vocab_size}).",
                        f"{where}.model_input",
                    )
                tokens += ids
            if not tokens:
                raise BadRequest(
                    f"{where}.model_input is empty; a datum needs at least one token.", f"{where}.model_input"
                )
            inputs = datum.get("loss_fn_inputs") or {}
            if not isinstance(inputs, dict):
                raise BadRequest(f"{where}.loss_fn_inputs must be an object of tensors.", f"{where}.loss_fn_inputs")
            tensors = {}
            for name in needed:
                field = f"{where}.loss_fn_inputs.{name}"
                if name not in inputs:
                    raise BadRequest(f"{field} is missing.", field)
                tensors[name] = self._tensor(inputs[name], field, len(tokens), integer=name == "target_tokens")
            parsed.append((tokens, tensors))
        return parsed

    def _tensor(self, payload: Any, field: str, length: int, integer: bool) -> torch.Tensor:
        values = payload.get("data") if isinstance(payload, dict) else payload
        if not isinstance(values, list) or not all(_is_number(v) for v in values):
            raise BadRequest(f"{field} must be a list of finite numbers (or {{'data': [...]}}).", field)
        if len(values) != length:
            raise BadRequest(
                f"{field} has {len(values)} values but model_input has {length} tokens: one per target token "
                "(target_tokens[t] follows model_input[: t + 1]).",
                field,
            )
        if integer:
            if not all(_is_int(v) and 0 <= v < self.vocab_size for v in values):
                raise BadRequest(f"{field} must be token ids in [0, {self.vocab_size}).", field)
            return torch.tensor(values, dtype=torch.long)
        return torch.tensor(values, dtype=torch.float32)

    def _target_logprobs(self, datums, grad: bool) -> list[torch.Tensor]:
        """Log-probs of each datum's target tokens, one right-padded batch through the model."""
        lengths = [len(tokens) for tokens, _ in datums]
        width = max(lengths)
        input_ids = torch.full((len(datums), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        targets = torch.full_like(input_ids, -100)
        for row, (tokens, inputs) in enumerate(datums):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            attention_mask[row, : len(tokens)] = 1
            targets[row, : len(tokens)] = inputs["target_tokens"]
        self.model.train(grad)
        with torch.set_grad_enabled(grad):
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                shift_labels=targets.to(self.device),
                token_logprobs=True,
            )
            logps = out.log_probs.float()
        return [logps[row, :n] for row, n in enumerate(lengths)]

    @staticmethod
    def _outputs(logprobs: list[torch.Tensor]) -> list[dict]:
        return [
            {"logprobs": {"data": lp.detach().cpu().tolist(), "dtype": "float32", "shape": [lp.numel()]}}
            for lp in logprobs
        ]

    # ------------------------------------------------------------------------------------------------ routes
    def forward(self, request: dict) -> dict:
        self._check_session(request)
        datums = self._datums(request, ("target_tokens",))
        logprobs = [lp for chunk in self._chunks(datums) for lp in self._target_logprobs(chunk, grad=False)]
        return {"loss_fn_outputs": self._outputs(logprobs), "metrics": {}}

    def _chunks(self, datums: list) -> list[list]:
        step = self.micro_batch_size or len(datums)
        return [datums[start : start + step] for start in range(0, len(datums), step)]

    def forward_backward(self, request: dict) -> dict:
        self._check_session(request)
        loss_fn = request.get("loss_fn")
        if loss_fn not in SERVICE_LOSSES:
            raise BadRequest(f"`loss_fn` must be one of {', '.join(SERVICE_LOSSES)}, got {loss_fn!r}.", "loss_fn")
        config = request.get("loss_fn_config") or {}
        if not isinstance(config, dict) or not all(_is_number(v) for v in config.values()):
            raise BadRequest("`loss_fn_config` must be an object of numbers.", "loss_fn_config")
        try:
            config = check_loss_config(loss_fn, config)
        except ValueError as err:
            raise BadRequest(str(err), "loss_fn_config") from None
        datums = self._datums(request, LOSS_INPUTS[loss_fn])
        logprobs, total = [], 0.0
        for chunk in self._chunks(datums):  # gradients of the chunks' sums add up to the sum's
            chunk_logprobs = self._target_logprobs(chunk, grad=True)
            losses = [
                service_loss(loss_fn, lp, {k: v.to(self.device) for k, v in inputs.items()}, config)
                for lp, (_, inputs) in zip(chunk_logprobs, chunk)
            ]
            loss = torch.stack(losses).sum()
            loss.backward()
            total += loss.item()
            logprobs += [lp.detach() for lp in chunk_logprobs]
        metrics = {"loss:sum": total, "num_tokens:sum": float(sum(lp.numel() for lp in logprobs))}
        return {"loss_fn_outputs": self._outputs(logprobs), "metrics": metrics}

    def optim_step(self, request: dict) -> dict:
        self._check_session(request)
        params = request.get("adam_params")
        if not isinstance(params, dict):
            raise BadRequest("`adam_params` must be an AdamParams object.", "adam_params")
        rules = {
            "learning_rate": (lambda v: v >= 0, "a number >= 0"),
            "beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
            "beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
            "eps": (lambda v: v >= 0, "a number >= 0"),
            "weight_decay": (lambda v: v >= 0, "a number >= 0"),
            "grad_clip_norm": (lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
        }
        unknown = sorted(set(params) - set(rules))
        if unknown:
            raise BadRequest(f"adam_params has unknown fields {unknown}; it takes {sorted(rules)}.", "adam_params")
        defaults = {
            "learning_rate": 1e-4,
            "beta1": 0.9,
            "beta2": 0.95,
            "eps": 1e-12,
            "weight_decay": 0.0,
            "grad_clip_norm": 0.0,
        }
        values = {}
        for name, (check, rule) in rules.items():
            value = params.get(name)
            if value is None:
                value = defaults[name]
            elif not (_is_number(value) and check(value)):
                raise BadRequest(f"adam_params.{name} must be {rule}, got {value!r}.", f"adam_params.{name}")
            values[name] = value
        trainable = list(self._trainable().values())
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(trainable, lr=values["learning_rate"])
        for group in self.optimizer.param_groups:
            group.update(
                lr=values["learning_rate"],
                betas=(values["beta1"], values["beta2"]),
                eps=values["eps"],
                weight_decay=values["weight_decay"],
            )
        grads = [p.grad for p in trainable if p.grad is not None]
        norm = (
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if grads
            else torch.tensor(0.0)
        )
        if values["grad_clip_norm"] > 0 and grads:
            torch.nn.utils.clip_grad_norm_(trainable, values["grad_clip_norm"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.version += 1
        return {"step": self.step, "metrics": {"grad_norm": norm.item(), "learning_rate": values["learning_rate"]}}

    def save_weights_for_sampler(self, request: dict) -> dict:
        self._check_session(request)
        name = _require(
            request, "name", lambda v: isinstance(v, str) and v and "/" not in v, "a non-empty name without '/'"
        )
        snapshot = {k: p.detach().to("cpu", copy=True) for k, p in self._trainable().items()}
        self.snapshots.pop(name, None)
        self.snapshots[name] = (self.version, snapshot)
        self.evicted.discard(name)
        while len(self.snapshots) > self.max_sampler_snapshots:
            old, _ = self.snapshots.popitem(last=False)
            self.evicted.add(old)
            logger.info("Evicted sampler snapshot %r (max_sampler_snapshots=%d)", old, self.max_sampler_snapshots)
        return {"path": SAMPLER_PREFIX + name, "step": self.step}

    def save_state(self, request: dict) -> dict:
        self._check_session(request)
        name = _require(
            request, "name", lambda v: isinstance(v, str) and v and "/" not in v, "a non-empty name without '/'"
        )
        path = os.path.join(self.state_dir, name)
        os.makedirs(path, exist_ok=True)
        weights = {k: p.detach().cpu() for k, p in self._trainable().items()}
        torch.save(
            {
                "weights": weights,
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "step": self.step,
                "lora_rank": self.session_rank,
                "model": self.name,
            },
            os.path.join(path, "state.pt"),
        )
        return {"path": path}

    def load_state(self, request: dict) -> dict:
        self._check_session(request)
        path = _require(request, "path", lambda v: isinstance(v, str) and v, "a path save_state returned")
        file = os.path.join(path if os.path.isabs(path) else os.path.join(self.state_dir, path), "state.pt")
        if not os.path.isfile(file):
            raise BadRequest(
                f"`path` {path!r} holds no saved state ({file} does not exist); pass what save_state returned.", "path"
            )
        state = torch.load(file, map_location="cpu", weights_only=True)
        if state["lora_rank"] != self.session_rank:
            raise BadRequest(
                f"`path` {path!r} was saved with lora_rank={state['lora_rank']}, this session has {self.session_rank}.",
                "path",
            )
        trainable = self._trainable()
        if set(state["weights"]) != set(trainable):
            raise BadRequest(f"`path` {path!r} holds different parameters than this session trains.", "path")
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(state["weights"][name])
                param.grad = None
        self.optimizer = None
        if state["optimizer"] is not None:
            self.optimizer = torch.optim.AdamW(list(trainable.values()))
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.version += 1
        return {"step": self.step}

    def _prompt_ids(self, request: dict) -> list[int]:
        if self.session_id is None and request.get("model_path") is not None:
            raise BadRequest("no training session: call create_model first.", "model_path")
        prompt = request.get("prompt")
        chunks = prompt.get("chunks") if isinstance(prompt, dict) else None
        if not isinstance(chunks, list):
            raise BadRequest("`prompt` must be a ModelInput: {'chunks': [{'tokens': [ids]}]}.", "prompt")
        prompt_ids = [
            t for chunk in chunks for t in (chunk.get("tokens") or [] if isinstance(chunk, dict) else [None])
        ]
        if not prompt_ids or not all(_is_int(t) and 0 <= t < self.vocab_size for t in prompt_ids):
            raise BadRequest(f"`prompt` must hold at least one token id in [0, {self.vocab_size}).", "prompt")
        return prompt_ids

    def compute_logprobs(self, request: dict) -> dict:
        """Log-prob of each prompt token given the ones before it (None for the first), with the weights
        `model_path` names."""
        prompt_ids = self._prompt_ids(request)
        with self._sampler_weights(request.get("model_path")):
            datum = (prompt_ids[:-1] or prompt_ids[:1], {"target_tokens": torch.tensor(prompt_ids[1:] or [0])})
            logprobs = self._target_logprobs([datum], grad=False)[0].tolist() if len(prompt_ids) > 1 else []
        return {"logprobs": [None, *logprobs]}

    def sample(self, request: dict) -> dict:
        from ..generation.transformers_backend import TransformersGenerator

        prompt_ids = self._prompt_ids(request)
        num_samples = _require(request, "num_samples", lambda v: _is_int(v) and v >= 1, "a positive integer", 1)
        params = request.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise BadRequest("`sampling_params` must be a SamplingParams object.", "sampling_params")
        known = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise BadRequest(
                f"sampling_params has unknown fields {unknown}; it takes {sorted(known)}.", "sampling_params"
            )
        stop = params.get("stop") or []
        if not isinstance(stop, list) or not all(_is_int(t) for t in stop):
            raise BadRequest("sampling_params.stop must be a list of token ids.", "sampling_params.stop")
        seed = params.get("seed")
        if seed is not None and not _is_int(seed):
            raise BadRequest(f"sampling_params.seed must be an integer, got {seed!r}.", "sampling_params.seed")
        try:
            sampling = SamplingConfig(
                max_tokens=params.get("max_tokens", 16),
                temperature=params.get("temperature", 1.0),
                top_p=params.get("top_p", 1.0),
                top_k=params.get("top_k", 0),
            )
        except (TypeError, ValueError) as err:
            raise BadRequest(f"sampling_params: {err}", "sampling_params") from None
        eos = self.eos_token_ids + [t for t in stop if t not in self.eos_token_ids]
        with self._sampler_weights(request.get("model_path")):
            if seed is not None:
                torch.manual_seed(seed)
            generator = TransformersGenerator(
                self.model, sampling, pad_token_id=self.pad_token_id, eos_token_id=eos, return_logprobs=True
            )
            result = generator.generate([prompt_ids] * num_samples)
        sequences = []
        for ids, logprobs in zip(result.completion_ids, result.logprobs):
            reason = "stop" if ids and ids[-1] in eos else "length"
            sequences.append({"tokens": ids, "logprobs": logprobs, "stop_reason": reason})
        return {"sequences": sequences}

    def _sampler_weights(self, model_path: Any):
        """A context in which the model holds the weights `model_path` names (None: the current weights)."""
        import contextlib

        if model_path is None:
            return contextlib.nullcontext()
        if not isinstance(model_path, str) or not model_path.startswith(SAMPLER_PREFIX):
            raise BadRequest(
                f"`model_path` must be a path save_weights_for_sampler returned ({SAMPLER_PREFIX}<name>), got {model_path!r}.",
                "model_path",
            )
        name = model_path[len(SAMPLER_PREFIX) :]
        if name not in self.snapshots:
            why = (
                f"it was evicted: the server keeps the last {self.max_sampler_snapshots} (--max_sampler_snapshots)"
                if name in self.evicted
                else "no such snapshot in this session"
            )
            raise BadRequest(f"`model_path` {model_path!r} cannot be sampled: {why}.", "model_path")
        version, snapshot = self.snapshots[name]
        if version == self.version:
            return contextlib.nullcontext()
        return self._swapped(snapshot)

    def _swapped(self, snapshot: dict[str, torch.Tensor]):
        import contextlib

        @contextlib.contextmanager
        def swap():
            trainable = self._trainable()
            current = {k: p.detach().clone() for k, p in trainable.items()}
            try:
                with torch.no_grad():
                    for k, p in trainable.items():
                        p.copy_(snapshot[k])
                yield
            finally:
                with torch.no_grad():
                    for k, p in trainable.items():
                        p.copy_(current[k])

        return swap()


ROUTES = (
    "create_model", "get_info", "forward", "forward_backward", "optim_step", "save_weights_for_sampler",
    "save_state", "load_state", "sample", "compute_logprobs",
)  # fmt: skip


def make_server(service: TrainingService, host: str = "127.0.0.1", port: int = 8100) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) answering the routes above with `service`."""
    lock = threading.Lock()

    def get_info(request: dict) -> dict:
        service._check_session(request)
        return service.info()

    actions = {
        "create_model": service.create_model,
        "get_info": get_info,
        "forward": service.forward,
        "forward_backward": service.forward_backward,
        "optim_step": service.optim_step,
        "save_weights_for_sampler": service.save_weights_for_sampler,
        "save_state": service.save_state,
        "load_state": service.load_state,
        "sample": service.sample,
        "compute_logprobs": service.compute_logprobs,
    }

    class Handler(JSONRequestHandler):
        logger = logger

        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self._route() == "health":
                self._reply({"status": "ok", "model": service.name, "lora_rank": service.lora_rank})
            else:
                self._not_found()

        def do_POST(self) -> None:
            route = self._route()
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if route not in actions:
                self._not_found()
                return
            try:
                try:
                    request = json.loads(body or b"{}")
                except ValueError:
                    request = None
                if not isinstance(request, dict):
                    raise BadRequest("the request body must be a JSON object.")
                with lock:
                    reply = actions[route](request)
            except BadRequest as err:
                self._reply({"error": str(err), "field": err.field}, HTTPStatus.BAD_REQUEST)
            except Exception as err:  # report it rather than drop the connection
                logger.exception("%s failed", self.path)
                self._reply({"error": f"{type(err).__name__}: {err}", "field": None}, HTTPStatus.INTERNAL_SERVER_ERROR)
            else:
                self._reply(reply)

        def _route(self) -> str:
            return self.path.split("?", 1)[0].strip("/")

        def _not_found(self) -> None:
            routes = ", ".join(f"/{r}/" for r in ROUTES)
            self._reply(
                {"error": f"no endpoint {self.command} {self.path}; GET /health/, POST {routes}", "field": None},
                HTTPStatus.NOT_FOUND,
            )

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(
    model: str, host: str = "127.0.0.1", port: int = 8100, log_level: str = "info", **service_kwargs: Any
) -> None:
    """Load `model` and serve it until interrupted (SIGINT or SIGTERM)."""
    import signal

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = TrainingService(model, **service_kwargs)
    server = make_server(service, host, port)

    def stop(signum, frame):  # serve_forever returns; shutdown() must come from another thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    logger.info(
        "Training service for %s on http://%s:%d (state in %s)", model, host, server.server_port, service.state_dir
    )
    serve_until_interrupted(server)
