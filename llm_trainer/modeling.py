"""Model plumbing shared by every trainer: loading, PEFT wrapping, and the fused token log-prob forward."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import os
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    TrainingArguments,
    set_seed,
)
from transformers.utils import ModelOutput

from . import kernels
from .models.vision import is_vision_model, language_model, load_processor

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def check_model_path(model_id: str, role: str = "model") -> None:
    """Raise a `ValueError` when `model_id` is neither a local folder nor a valid Hub id (`name` or `namespace/name`),
    instead of the Hub's repo-id syntax error. A valid Hub id is left to `from_pretrained`, which reports its own
    errors (not found, offline, gated)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if os.path.isdir(model_id):
        markers = ("config.json", "adapter_config.json", "params.json")  # a model, a PEFT adapter, or a mistral folder
        if not any(os.path.isfile(os.path.join(model_id, name)) for name in markers):
            files = sorted(os.listdir(model_id))
            shown = f"it holds {files[:8]}{' ...' if len(files) > 8 else ''}" if files else "it is empty"
            raise ValueError(
                f"no model at {model_id!r}: the folder has no config.json ({shown}). Pass, as the {role}, the folder "
                "`save_pretrained` wrote (with config.json and the weights), e.g. a `checkpoint-N` folder, or a Hub id."
            )
        return
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        where = "it is a file" if os.path.exists(model_id) else "nothing is there"
        if not os.path.exists(model_id) and not os.path.isabs(os.path.expanduser(model_id)):
            where += f", relative to {os.getcwd()}"
        raise ValueError(
            f"no model at {model_id!r}: not a local directory ({where}), and not a valid Hugging Face Hub id "
            f"('name' or 'namespace/name'). Pass, as the {role}, the folder it was saved to with `save_pretrained`, "
            "or a Hub id such as 'Qwen/Qwen2.5-0.5B'."
        ) from None


_CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def check_causal_lm(model: Any, role: str = "model") -> Any:
    """Return `model`, or raise a `ValueError` when it has no language-modeling head (e.g. a sequence-classification
    model), which the trainers that score or sample tokens need."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_output_embeddings = getattr(base, "get_output_embeddings", None)
    if get_output_embeddings is None or get_output_embeddings() is not None:
        return model
    headless = getattr(base, "base_model", None) is base  # e.g. a bare `Qwen2Model`
    if not headless and not type(base).__name__.endswith(_CLASSIFIER_SUFFIXES):
        return model  # remote code may name its head otherwise
    raise ValueError(
        f"The {role} is a {type(base).__name__}, which has no language-modeling head, but this trainer scores and "
        "generates tokens: pass a causal language model (`AutoModelForCausalLM`), e.g. the base model the classifier "
        "was built from. Sequence-classification models are reward models (`RewardTrainer`, or GRPO's `reward_funcs`)."
    )


def _architecture_class(config: Any) -> Any:
    """The transformers class `config.architectures` names; else `AutoModelForImageTextToText` for a
    vision-language config, `AutoModelForCausalLM` otherwise."""
    import transformers

    architectures = getattr(config, "architectures", None) or []
    found = getattr(transformers, architectures[0], None) if architectures else None
    return found or (AutoModelForImageTextToText if is_vision_model(config) else AutoModelForCausalLM)


def load_model(model_id: str, auto_class: Any = None, **init_kwargs: Any) -> PreTrainedModel:
    """Load `model_id` (a local folder or Hub id) with `from_pretrained`, in float32 unless `dtype` says otherwise.

    `auto_class` defaults to the architecture named in the model's config (falling back to `AutoModelForCausalLM`,
    or `AutoModelForImageTextToText` for a vision-language model). A vision-language checkpoint asked for as a causal
    LM loads with its own class too, so its vision tower and processor keep working.
    """
    check_model_path(model_id)
    dtype = init_kwargs.get("dtype", "float32")
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(
                f"Invalid `dtype` {dtype!r} in `model_init_kwargs`: use 'auto', {', '.join(map(repr, _DTYPES))} or a "
                "torch.dtype."
            )
        init_kwargs["dtype"] = _DTYPES[dtype]
    config_kwargs = {"trust_remote_code": init_kwargs.get("trust_remote_code", False)}
    if "revision" in init_kwargs:
        config_kwargs["revision"] = init_kwargs["revision"]
    if auto_class is None:
        auto_class = _architecture_class(AutoConfig.from_pretrained(model_id, **config_kwargs))
    elif auto_class is AutoModelForCausalLM:
        try:
            config = AutoConfig.from_pretrained(model_id, **config_kwargs)
        except (OSError, ValueError):  # e.g. a PEFT adapter folder, which AutoModelForCausalLM resolves itself
            config = None
        if is_vision_model(config):
            auto_class = _architecture_class(config)
    return auto_class.from_pretrained(model_id, **init_kwargs)


def language_model_lora_targets(model: PreTrainedModel) -> str:
    """PEFT `target_modules` (a regex over module names) matching every linear layer of a VLM's language model: not
    the vision encoder, its projector or the LM head."""
    decoder = language_model(model)
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    leaves = {
        name.rsplit(".", 1)[-1] for name, module in decoder.named_modules() if isinstance(module, torch.nn.Linear)
    }
    if not leaves:
        raise ValueError(f"The language model of {type(model).__name__} has no linear layer to put a LoRA adapter on.")
    return rf"{re.escape(prefix)}\..*\.(?:{'|'.join(sorted(leaves))})"


def wrap_with_peft(model: PreTrainedModel, peft_config: Any, gradient_checkpointing: bool) -> PreTrainedModel:
    """Wrap `model` with a PEFT adapter built from `peft_config` (a `peft.PeftConfig`).

    On a vision-language model a LoRA-style config whose `target_modules` is None or `"all-linear"` adapts every
    linear layer of the language model, and nothing else (`language_model_lora_targets`); explicit targets are used
    as given.
    """
    try:
        from peft import PeftConfig, get_peft_model
    except ImportError as e:
        raise ImportError('`peft_config` needs the peft library: pip install "llm-trainer[peft]"') from e

    if not isinstance(peft_config, PeftConfig):
        raise TypeError(
            f"`peft_config` must be a `peft.PeftConfig` (e.g. `peft.LoraConfig`), got {type(peft_config).__name__}."
        )
    if is_peft_model(model):
        raise ValueError(
            "You passed a `PeftModel` together with a `peft_config`. Merge and unload the existing adapter first, "
            "or pass the PeftModel alone."
        )
    if is_vision_model(model) and hasattr(peft_config, "target_modules"):
        targets = peft_config.target_modules
        if targets is None or targets == "all-linear":
            peft_config = copy.copy(peft_config)  # the caller's config keeps its value
            peft_config.target_modules = language_model_lora_targets(model)
    model = get_peft_model(model, peft_config)
    if gradient_checkpointing:  # checkpointed layers need an input that requires grad to backprop into the adapter
        model.enable_input_require_grads()
    return model


@dataclass
class FusedCausalLMOutput(ModelOutput):
    """What a model given `add_fused_lm_head` (TRL's interface) returns when called with `fused_lm_head=True`.

    Per-token tensors have the shape of the (shifted) labels, `(batch, seq_len - 1)`, and are 0 where the label is
    -100; the ones not asked for are None. `label_mask` is True where the label counts. `loss` is the summed negative
    log-likelihood (at the head's temperature) over the kept tokens, divided by `num_items_in_batch` (default: their
    count), plus the MoE load-balancing loss times the config's `router_aux_loss_coef` when router logits are returned
    (`aux_loss`, unweighted). `mean_logits` and `log_sum_sq_probs` carry no gradient.
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class TokenLogprobOutput(FusedCausalLMOutput):
    """What a model given `add_token_logprob_head` returns when called with `token_logprobs=True`: the same fields,
    without the `loss` (None)."""


TOKEN_OUTPUTS = ("entropy", "is_top1", "mean_logits", "log_sum_sq_probs")


def logit_transform(config: Any) -> tuple[float | None, float | None]:
    """The `(logit_scale, softcap)` a model applies to its logits, read from its config (None when it does not)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text_config, name, None)
        if scale is not None:
            break
    logits_scaling = getattr(text_config, "logits_scaling", None)
    if scale is None and logits_scaling is not None:  # Granite / MiniCPM divide, HyperCLOVA X multiplies
        scale = logits_scaling if text_config.model_type == "hyperclovax" else 1 / logits_scaling
    return scale, getattr(text_config, "final_logit_softcapping", None)


def _unsharded_type(module: torch.nn.Module) -> type:
    """`module`'s class, seen through FSDP2's `fully_shard`, which swaps it for a subclass `FSDP<Name>`."""
    cls = type(module)
    fsdp_module = _fsdp_module_class()
    if fsdp_module is not None and issubclass(cls, fsdp_module):
        bases = [base for base in cls.__bases__ if base is not fsdp_module]
        if len(bases) == 1:
            return bases[0]
    return cls


@functools.cache
def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed
        return None
    return FSDPModule


def _splittable(model: PreTrainedModel) -> bool:
    """Whether the forward can be run as backbone + a plain linear head (FSDP2-sharded or not)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (
        isinstance(head, torch.nn.Linear)
        and getattr(model, "base_model", model) is not model
        and _unsharded_type(head) is torch.nn.Linear  # an adapter-wrapped head would be bypassed
    )


def run_in_head(model: PreTrainedModel, compute: Callable[[torch.Tensor, kernels.LMHead], Any], hidden: torch.Tensor):
    """`compute(hidden, lm_head_of(model))`, run as the forward of `model`'s LM head module, so that the hooks a
    sharding wrapper put on that module run around it, exactly as for `lm_head(hidden)`.

    Under FSDP2 the head's parameters are sharded DTensors between forwards: the head module's pre-forward hook
    all-gathers its FSDP group (with Accelerate's wrapping, the final norm and `lm_head`, plus the input embeddings
    when they are tied: one layer, never the whole model), `compute` sees plain full tensors, the post-forward hook
    reshards when the group is set to, and the backward re-gathers the group and reduce-scatters its gradients. Under
    DeepSpeed ZeRO-3 the head's hooks fetch and release its partitioned weight the same way. Unwrapped, it is a
    plain call.
    """
    module = model.get_output_embeddings()

    def forward(states: torch.Tensor) -> Any:
        head = lm_head_of(model)
        if _is_dtensor(head.weight):
            raise RuntimeError(
                f"{type(model).__name__}'s LM head weight is still a sharded DTensor inside the head's forward: its "
                "FSDP2 group does not include the head module. Shard the head with `fully_shard(lm_head)` (or in one "
                "group with the modules sharing its weight), as Accelerate's FSDP2 preparation does."
            )
        return compute(states, head)

    installed = module.__dict__.get("forward")
    module.forward = forward
    try:
        return module(hidden)
    finally:
        if installed is None:
            del module.forward
        else:
            module.forward = installed


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def lm_head_of(model: PreTrainedModel) -> kernels.LMHead:
    """`model`'s LM head as the kernels take it: weight, bias and the logit transform of its config."""
    head = model.get_output_embeddings()
    return kernels.LMHead(head.weight, head.bias, *logit_transform(model.config))


@dataclass
class LogprobHeadOptions:
    """The options of the forward `add_token_logprob_head` installs; a second call replaces them."""

    temperature: float = 1.0
    outputs: tuple[str, ...] = ("entropy", "is_top1", "mean_logits")
    cast_lm_head_to_fp32: bool = False


class TokenLogprobForward:
    """`model.forward` once `add_token_logprob_head` ran: the model's own forward, plus routes that run the backbone
    and the LM head apart (see `add_token_logprob_head`).

    An object holding the model and its `LogprobHeadOptions` options, not a closure over the original bound forward: a
    `copy.deepcopy` of the model gets a forward bound to the copy (the plain route calls `type(model).forward` on
    it), and a second `add_token_logprob_head` updates `options` instead of wrapping again. `__signature__` is the
    model's own, which `Trainer` (unused-column removal) and `generate` (keyword validation) read.
    """

    def __init__(self, model: PreTrainedModel, options: LogprobHeadOptions) -> None:
        self.model, self.options = model, options

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(types.MethodType(type(self.model).forward, self.model))

    def __call__(
        self,
        *args: Any,
        token_logprobs: bool = False,
        fused_lm_head: bool = False,
        head_fn: Callable[[torch.Tensor, kernels.LMHead], Any] | None = None,
        labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> Any:
        model = self.model
        if head_fn is not None:
            if not _splittable(model):
                raise ValueError(
                    f"{type(model).__name__} has no backbone (`base_model`) with a plain `nn.Linear` LM head, which "
                    "`head_fn` needs. An adapter on `lm_head` is not supported: remove 'lm_head' from the PEFT "
                    "`target_modules`."
                )
            kwargs["use_cache"] = False
            return run_in_head(model, head_fn, model.base_model(*args, **kwargs).last_hidden_state)
        if not (token_logprobs or fused_lm_head):
            passed = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            kwargs.update({key: value for key, value in passed.items() if value is not None})
            return type(model).forward(model, *args, **kwargs)
        targets = labels[:, 1:] if shift_labels is None else shift_labels
        log_probs, fields, aux_loss = self._score(args, kwargs, targets, drop_last=shift_labels is None)
        label_mask = targets.to(log_probs.device) != -100
        if token_logprobs:
            return TokenLogprobOutput(log_probs=log_probs, label_mask=label_mask, aux_loss=aux_loss, **fields)
        loss = -log_probs.sum() / (label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        if aux_loss is not None:
            coef = getattr(model.config.get_text_config(), "router_aux_loss_coef", 0.0)
            loss = loss + coef * aux_loss.to(loss.device)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=label_mask, aux_loss=aux_loss, **fields)

    def _score(self, args: tuple, kwargs: dict[str, Any], targets: torch.Tensor, drop_last: bool):
        """Run the backbone on `args`/`kwargs` and score `targets` (next-token labels, -100 to skip) against its
        hidden states (without the last position when `drop_last`): `(log_probs, fields, aux_loss)`, `fields` the
        asked `TOKEN_OUTPUTS`, `aux_loss` the unweighted MoE load-balancing loss or None."""
        model, options = self.model, self.options
        wanted = [name for name in TOKEN_OUTPUTS if name in options.outputs]
        kwargs["use_cache"] = False
        if getattr(model.config.get_text_config(), "output_router_logits", False):  # MoE: the backbone's router logits
            kwargs.setdefault("output_router_logits", True)
        if not _splittable(model):
            _warn_unsplittable(type(model).__name__)
            out = type(model).forward(model, *args, **kwargs)
            logits = out.logits[:, :-1] if drop_last else out.logits
            log_probs, fields = _stats_from_logits(logits, targets.to(logits.device), options.temperature)
            return log_probs, {name: fields[name] for name in wanted}, getattr(out, "aux_loss", None)
        out = model.base_model(*args, **kwargs)
        hidden = out.last_hidden_state[:, :-1] if drop_last else out.last_hidden_state

        def project(states: torch.Tensor, head: kernels.LMHead) -> tuple[torch.Tensor, ...]:
            states = states.to(head.weight.device)
            context = contextlib.nullcontext()
            if options.cast_lm_head_to_fp32:
                states = states.float()
                context = torch.autocast(states.device.type, enabled=False)
            with context:
                return _as_tuple(
                    kernels.token_logprobs(
                        states,
                        head.weight,
                        targets.to(head.weight.device),
                        temperature=options.temperature,
                        bias=head.bias,
                        logit_scale=head.logit_scale,
                        softcap=head.softcap,
                        return_entropy="entropy" in wanted,
                        return_accuracy="is_top1" in wanted,
                        return_mean_logits="mean_logits" in wanted,
                        return_log_sum_sq_probs="log_sum_sq_probs" in wanted,
                    )
                )

        log_probs, *extras = run_in_head(model, project, hidden)
        return log_probs, dict(zip(wanted, extras)), _router_aux_loss(model.config, out, kwargs.get("attention_mask"))


def add_token_logprob_head(
    model: PreTrainedModel,
    temperature: float = 1.0,
    outputs: tuple[str, ...] = ("entropy", "is_top1", "mean_logits"),
    cast_lm_head_to_fp32: bool = False,
) -> None:
    """Let `model(..., labels=..., token_logprobs=True)` return per-token log-probs without building the logits.

    Installs a `TokenLogprobForward` as the instance's `forward` (a second call only updates its options). With
    `token_logprobs=True` it runs the backbone, then projects the hidden states through the LM head chunk by chunk
    with `llm_trainer.kernels.token_logprobs`, returning a `TokenLogprobOutput` with the log-probs of the next-token
    labels (or of pre-shifted `shift_labels`) and the per-token fields named in `outputs` (among `TOKEN_OUTPUTS`;
    the others are None): `entropy`, `is_top1` (label ranked first), `mean_logits` (mean logit over the vocabulary)
    and `log_sum_sq_probs` (`log sum_v p_v^2`). `fused_lm_head=True` returns TRL's `FusedCausalLMOutput` (the same,
    plus the loss; see `llm_trainer.trainer.utils.add_fused_lm_head`). `head_fn=f` returns `f(hidden_states,
    lm_head_of(model))`, the backbone's final hidden states and the head, for losses that project themselves
    (distillation). Without these keywords it is the model's own forward, so generation and user code are unchanged.
    `cast_lm_head_to_fp32` projects in float32 outside autocast (TRL's GRPO/RLOO option).

    The routes are keywords of `forward` itself (rather than calls of submodules) so that `wrapped(...,
    token_logprobs=True)` keeps DDP, FSDP and DeepSpeed wrappers, and PEFT models around the patched one, in the
    loop. Install it on the causal LM before wrapping (on a PEFT model's `get_base_model()`). The projection runs as
    the forward of the LM head module (`run_in_head`), so FSDP2 gathers only the head's group for it (the final norm
    and `lm_head`; not the model) and ZeRO-3 fetches only the head. Models whose head is not a plain linear layer fall
    back to the logits with a one-line warning.
    """
    unknown = set(outputs) - set(TOKEN_OUTPUTS)
    if unknown:
        raise ValueError(f"Unknown token outputs {sorted(unknown)}; choose among {TOKEN_OUTPUTS}.")
    options = LogprobHeadOptions(temperature, tuple(outputs), cast_lm_head_to_fp32)
    installed = model.__dict__.get("forward")
    if isinstance(installed, TokenLogprobForward):
        installed.options = options
    else:
        model.forward = TokenLogprobForward(model, options)


def _router_aux_loss(config: Any, backbone_out: Any, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The MoE load-balancing loss the causal-LM forward would add (unweighted), from the backbone's router logits."""
    router_logits = getattr(backbone_out, "router_logits", None)
    if router_logits is None:
        return None
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from .models.packed_attention import is_placeholder_mask

    if is_placeholder_mask(attention_mask):  # a packed row: every token is real
        attention_mask = None
    text_config = config.get_text_config()
    num_experts = getattr(text_config, "num_experts", None) or getattr(text_config, "num_local_experts", None)
    return load_balancing_loss_func(router_logits, num_experts, text_config.num_experts_per_tok, attention_mask)


def _as_tuple(result):
    """`kernels.token_logprobs` returns a bare tensor when no extra output is asked for."""
    return result if isinstance(result, tuple) else (result,)


@functools.cache
def _warn_unsplittable(name: str) -> None:
    logger.warning("%s's LM head is not a plain linear layer: log-probs are computed from the full logits.", name)


def _stats_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """Per-token log-prob and the `TOKEN_OUTPUTS` fields from materialized logits (the fallback path)."""
    mask = labels != -100
    safe = labels.clamp(min=0)
    logits = logits.float() / temperature
    log_probs = kernels.selective_log_softmax(logits, safe) * mask
    with torch.no_grad():
        logp_all = logits.log_softmax(-1)
        fields = {
            "entropy": -(logp_all.exp() * logp_all).sum(-1) * mask,
            "is_top1": (logits.argmax(-1) == safe) & mask,
            "mean_logits": logits.mean(-1) * mask,
            "log_sum_sq_probs": torch.logsumexp(2 * logp_all, -1) * mask,
        }
    return log_probs, fields


def create_reference_model(
    model: PreTrainedModel, num_shared_layers: int | None = None, pattern: str | None = None
) -> PreTrainedModel:
    """A frozen copy of `model` in eval mode: the reference policy of DPO, KTO, GRPO's KL term, ...

    TRL's signature; sharing the first `num_shared_layers` layers with the policy is not supported.
    """
    if num_shared_layers is not None or pattern is not None:
        raise NotImplementedError(
            "`create_reference_model` makes a full frozen copy; sharing layers (`num_shared_layers`, `pattern`) is not "
            "supported. Omit them."
        )
    import copy

    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def reference_adapter(model: Any) -> contextlib.AbstractContextManager:
    """Run a PEFT `model` as its reference: the adapter named "ref" when it has one, else with adapters disabled."""
    from .trainer.utils import use_adapter

    return use_adapter(model, "ref" if "ref" in getattr(model, "peft_config", {}) else None)


def add_reference_adapter(model: Any) -> None:
    """Give a PEFT `model` a frozen "ref" adapter, a copy of its "default" one, so `reference_adapter` runs the
    policy as it was before training rather than the bare base model (TRL does this when handed a `PeftModel`)."""
    if "ref" in model.peft_config or "default" not in model.peft_config:
        return
    if not _can_add_second_adapter(model.peft_config["default"]):
        logger.warning(
            "PEFT<0.20.0 can't add a frozen reference adapter alongside one that uses `target_parameters` "
            "(peft#3340), so the reference log-probs come from the base model (adapters disabled); that is the "
            "policy before training only if the adapter is freshly initialised (LoRA's zero init). Upgrade to "
            "`peft>=0.20.0` to use a copy of the adapter as the reference, or pass `peft_config` to the trainer "
            "instead of a wrapped model."
        )
        return
    model.add_adapter("ref", model.peft_config["default"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".default." in name:
                ref_param = model.get_parameter(name.replace(".default.", ".ref."))
                ref_param.copy_(param)
                ref_param.requires_grad_(False)


def _can_add_second_adapter(config: Any) -> bool:
    """False where PEFT holds only one adapter per model: a LoRA with `target_parameters` (MoE expert weights) on
    PEFT 0.17 to 0.19 (peft#3340, fixed in 0.20.0; the option itself arrived in 0.17.0)."""
    import peft
    from packaging.version import Version

    if not getattr(config, "target_parameters", None):
        return True
    return not Version("0.17.0") <= Version(peft.__version__) < Version("0.20.0")


def completion_labels(
    input_ids: torch.Tensor, completion_mask: torch.Tensor, attention_mask: torch.Tensor | None = None
):
    """`input_ids` with -100 wherever the token is not a (real) completion token: the labels whose log-probs a
    preference or policy-gradient loss needs."""
    keep = completion_mask.bool() if attention_mask is None else completion_mask.bool() & attention_mask.bool()
    return input_ids.masked_fill(~keep, -100)


def configure_router_aux_loss(model: PreTrainedModel, coef: float | None) -> float:
    """Enable the MoE load-balancing loss when the model has one and its coefficient is non-zero."""
    config = model.config.get_text_config()
    if coef and not hasattr(config, "output_router_logits"):
        raise ValueError(
            f"`router_aux_loss_coef={coef}`, but {type(model).__name__} is not a Mixture-of-Experts model with a "
            "router loss; unset it."
        )
    coef = getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef
    if hasattr(config, "router_aux_loss_coef"):
        config.output_router_logits = bool(coef)
        config.router_aux_loss_coef = coef
    return coef if hasattr(config, "output_router_logits") else 0.0


def prepare_model(
    model: str | PreTrainedModel,
    args: TrainingArguments,
    quantization_config: Any = None,
    auto_class: Any = None,
) -> PreTrainedModel:
    """Load `model` when it is a name or path (with `args.model_init_kwargs`), after seeding for reproducibility."""
    set_seed(args.seed)
    init_kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
    model = os.fspath(model) if isinstance(model, os.PathLike) else model
    causal = auto_class is None or auto_class is AutoModelForCausalLM
    if not isinstance(model, str):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                "`model` must be a model name or local path (a string), or a loaded model (`PreTrainedModel`); "
                f"got {type(model).__name__} {model!r:.60}."
            )
        if init_kwargs:
            logger.warning("`model_init_kwargs` is ignored: the model is already instantiated.")
        if quantization_config is not None:
            logger.warning("`quantization_config` is ignored: the model is already instantiated.")
        return check_causal_lm(model, "model") if causal else model
    if quantization_config is not None:
        if "quantization_config" in init_kwargs:
            raise ValueError(
                "`quantization_config` is set both as a trainer argument and in `model_init_kwargs`; keep one."
            )
        init_kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        init_kwargs["device_map"] = None
    init_kwargs.setdefault("trust_remote_code", getattr(args, "trust_remote_code", False))
    loaded = load_model(model, auto_class, **init_kwargs)
    return check_causal_lm(loaded, f"model {model!r}") if causal else loaded


def prepare_processing_class(
    model: PreTrainedModel, processing_class: PreTrainedTokenizerBase | ProcessorMixin | None, args: Any
) -> PreTrainedTokenizerBase | ProcessorMixin:
    """Load the model's processor when none is given (`models.vision.load_processor`: a VLM's full processor), and
    make sure its tokenizer has a pad token."""
    if processing_class is None:
        revision = (getattr(args, "model_init_kwargs", None) or {}).get("revision")
        processing_class = load_processor(
            model.config._name_or_path,
            revision=revision,
            trust_remote_code=getattr(args, "trust_remote_code", False),
        )
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(
            "`processing_class` must be a tokenizer (`PreTrainedTokenizerBase`) or a processor (`ProcessorMixin`), "
            f"got {type(processing_class).__name__}."
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None and getattr(args, "pad_token", None) is None:
            raise ValueError(
                f"The tokenizer ({type(tokenizer).__name__}) has neither a pad token nor an eos token to pad with. "
                "Set one before passing it as `processing_class`, e.g. `tokenizer.pad_token = tokenizer.unk_token` "
                "(any token of its vocabulary)."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return processing_class


def prepare_peft(model: PreTrainedModel, peft_config: Any, args: TrainingArguments) -> PreTrainedModel:
    """Wrap `model` with `peft_config` when one is given; a given PEFT model is readied for gradient checkpointing."""
    if peft_config is not None:
        return wrap_with_peft(model, peft_config, args.gradient_checkpointing)
    if is_peft_model(model) and args.gradient_checkpointing:  # checkpointed layers need an input with grad
        model.enable_input_require_grads()
    return model
