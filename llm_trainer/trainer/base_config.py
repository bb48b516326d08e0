"""Defaults shared by every llm_trainer config (TRL's `_BaseConfig`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import numbers
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

logger = logging.getLogger(__name__)


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with its command-line `help`; `metadata` holds further `add_argument` keywords (`choices`).
    List and dict defaults are copied per instance."""
    metadata = {"help": help, **metadata}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


SHARED_OPTIONS: dict[str, dict[str, Any]] = {
    "learning_rate": {"help": "Initial learning rate for AdamW."},
    "dataset_num_proc": {"help": "Processes for dataset preparation."},
    "disable_dropout": {"help": "Disable dropout in the model (and in the reference model, where there is one)."},
    "router_aux_loss_coef": {
        "help": "Weight of the MoE load-balancing loss; None uses the model config's own coefficient."
    },
    "activation_offloading": {"help": "Offload saved activations to CPU memory during the forward pass."},
    "pad_to_multiple_of": {
        "help": "Pad sequence lengths to a multiple of this value; 'auto' means 128 on Neuron, no padding elsewhere."
    },
    "pad_token": {"help": "Deprecated. Set `tokenizer.pad_token` and pass it as `processing_class` instead."},
    "eos_token": {"help": "Token appended to each text; defaults to the tokenizer's eos token."},
    "chat_template_path": {
        "help": "A `.jinja` file, or a tokenizer path whose chat template (and special tokens) to use."
    },
    "truncation_mode": {
        "help": "Which end to keep when truncating: 'keep_start' (supported) or 'keep_end' (deprecated).",
        "choices": ["keep_start", "keep_end"],
    },
    "train_sampling_strategy": {
        "help": "Order of the training examples; the unpaired losses pair each example with its neighbour within a "
        "fixed-order ('sequential') batch.",
        "choices": ["random", "sequential", "group_by_length"],
    },
    "packed_forward": {
        "help": "Run training forwards on packed rows: padding stripped, sequences concatenated with their own "
        "positions and no attention across them (a shared prompt computed once for its completions). None: wherever "
        "the model's attention supports it (plain causal attention, no sliding window), else padded. True: required "
        "(an error names why a model cannot). False: padded batches, the TRL-identical layout. Same losses either "
        "way, up to summation order."
    },
    "freeze_vision_tower": {
        "help": "Vision-language models: freeze the vision encoder and its projector, training only the language "
        "model (their parameters get no gradient and no optimizer state). No effect on a text-only dataset; an error "
        "on a text-only model."
    },
    "precompute_ref_log_probs": {
        "help": "Compute the reference log-probs of the whole dataset before training, so no reference model is kept "
        "in memory."
    },
    "sync_ref_model": {
        "help": "TR-DPO: every `ref_model_sync_steps` steps, move the reference model towards the policy by "
        "`ref_model_mixup_alpha`. Not compatible with PEFT or precomputed reference log-probs."
    },
    "ref_model_mixup_alpha": {"help": "TR-DPO α in π_ref ← α·π_θ + (1 − α)·π_ref; used with `sync_ref_model=True`."},
    "ref_model_sync_steps": {"help": "TR-DPO τ: optimizer steps between reference syncs; used with `sync_ref_model`."},
    "ds3_gather_for_generation": {
        "help": "Under DeepSpeed ZeRO-3, gather the full weights for generation (faster). False lets models larger "
        "than one GPU train, generating slowly (not with vLLM)."
    },
    "generate_during_eval": {
        "help": "Sample completions for a batch of eval prompts and log them to W&B or Comet at each evaluation."
    },
    "is_encoder_decoder": {"help": "Whether a `model_init` model is an encoder-decoder (not supported)."},
    "max_completion_length": {"help": "Maximum completion length of encoder-decoder models."},
}
"""Help (and choices) of the fields several configs declare with their own defaults, written once."""

ENCODER_DECODER_ONLY = "it applies to encoder-decoder models only, and llm_trainer trains decoder-only models."

DEPRECATED_FIELDS: dict[str, tuple[str, str | None]] = {
    "pad_token": ("set `tokenizer.pad_token` and pass it as `processing_class` instead.", None),
    "use_transformers_paged": ("use `use_transformers_continuous_batching`.", "use_transformers_continuous_batching"),
    "vllm_importance_sampling_cap": ("use `vllm_importance_sampling_clip_max`.", "vllm_importance_sampling_clip_max"),
}
"""Deprecated fields: what to use instead, and the field that receives a value set on them (None: nothing does)."""


def shared(name: str, default: Any) -> Any:
    """The field `SHARED_OPTIONS[name]` with `default`."""
    return option(default, **SHARED_OPTIONS[name])


def inert_fields(config_class: type) -> dict[str, str]:
    """The fields of `config_class` that do nothing by design, with the reason: the `_inert_fields` of its classes."""
    return {
        name: why
        for klass in reversed(config_class.__mro__)
        for name, why in vars(klass).get("_inert_fields", {}).items()
    }


def warn_unused_fields(config: Any) -> None:
    """Warn about each field set away from its default that is deprecated (`DEPRECATED_FIELDS`, moving its value to
    the field replacing it) or inert (`inert_fields`: accepted for TRL compatibility, doing nothing here)."""
    inert = inert_fields(type(config))
    for f in dataclasses.fields(config):
        if f.name not in DEPRECATED_FIELDS and f.name not in inert:
            continue
        value = getattr(config, f.name)
        if value == (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default):
            continue
        if f.name in DEPRECATED_FIELDS:
            advice, replaced_by = DEPRECATED_FIELDS[f.name]
            warnings.warn(f"`{f.name}` is deprecated: {advice}", FutureWarning, stacklevel=4)
            if replaced_by is not None:
                setattr(config, replaced_by, value)
        if f.name in inert:
            warnings.warn(f"`{f.name}={value!r}` has no effect: {inert[f.name]}", UserWarning, stacklevel=4)


def check_choices(config: Any, *names: str) -> None:
    """Raise a `ValueError` naming the field when one of `names` holds a value outside its field's `choices`."""
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(config)}
    for name in names:
        if getattr(config, name) not in choices[name]:
            raise ValueError(f"`{name}` must be one of {tuple(choices[name])}, got {getattr(config, name)!r}.")


@dataclass
class BaseConfig(TrainingArguments):
    """`TrainingArguments` with the defaults TRL's trainers share.

    Differences from `TrainingArguments`: `logging_steps=10`, `gradient_checkpointing=True`, and `bf16=None`, which
    resolves to `not fp16` where bf16 can run (a bf16-capable accelerator, or `use_cpu=True`) and to False
    elsewhere, where TRL's config raises instead. Adds the model-loading fields every trainer reads (`model_init_kwargs`,
    `trust_remote_code`).
    """

    _inert_fields: ClassVar[dict[str, str]] = {}
    """Fields a subclass accepts for TRL compatibility that do nothing here, with the reason; setting one warns."""

    logging_steps: float = option(
        10, "Log every X update steps: an integer, or a float in [0, 1) read as a ratio of total steps."
    )
    gradient_checkpointing: bool = option(
        True, "Recompute activations in the backward pass to save memory, at about 20%% more compute."
    )
    bf16: bool | None = option(None, "Use bf16 (mixed) precision. Unset means `True` unless `fp16` is set.")
    model_init_kwargs: dict[str, Any] | str | None = option(
        None,
        "Keyword arguments for `from_pretrained` when the model is given as a name or path. `dtype` defaults to "
        "float32 ('auto', the checkpoint's dtype, for ORPO and CPO).",
    )
    trust_remote_code: bool = option(
        False, "Allow custom model code from the model's repository when loading by name or path."
    )

    def __post_init__(self):
        warn_unused_fields(self)
        check_field_types(self)
        check_number(
            self, "learning_rate", 0, "A negative rate climbs the loss instead of descending it; use e.g. 1e-5."
        )
        if self.learning_rate == 0:
            logger.warning("`learning_rate=0`: the optimizer will not change the weights, so training learns nothing.")
        if self.max_steps != -1:
            check_number(self, "max_steps", 1, "Use -1 (the default) to train for `num_train_epochs` epochs instead.")
        else:
            check_number(
                self,
                "num_train_epochs",
                0,
                "With `max_steps=-1` (the default) training lasts `num_train_epochs` epochs, so this trains nothing. "
                "Set `num_train_epochs` (e.g. 1, or 0.5 for half the data) or a positive `max_steps`.",
                exclusive=True,
            )
        check_number(
            self,
            "gradient_accumulation_steps",
            1,
            "It is the number of micro-batches per optimizer step: use 1 for no accumulation.",
        )
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            check_number(self, name, 1, "Use a batch size of 1 or more.")
        if self.bf16 is None:
            self.bf16 = not self.fp16 and _bf16_available(self.use_cpu)
        if isinstance(self.model_init_kwargs, str):  # from the CLI
            self.model_init_kwargs = json.loads(self.model_init_kwargs)
        super().__post_init__()


_BaseConfig = BaseConfig
"""TRL's name for the shared config base (`trl.trainer.base_config._BaseConfig`); TRL's test fixtures patch it."""


@dataclass
class OfflineConfig(BaseConfig):
    """Base of the configs of the trainers that learn from a tokenized dataset (SFT, reward, PRM and the preference
    trainers): the sequence-length limit and the preparation processes, with the same defaults everywhere."""

    _max_length_none: ClassVar[str] = "no truncation"
    """What `max_length=None` means, for the error message."""

    max_length: int | None = option(
        1024,
        "Maximum tokens of a tokenized example; the config's documentation says whether longer ones are truncated or "
        "dropped. None: no limit (512 for ORPO and CPO).",
    )
    dataset_num_proc: int | None = shared("dataset_num_proc", None)

    def __post_init__(self):
        super().__post_init__()
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(
                f"`max_length` must be a positive number of tokens or None ({self._max_length_none}), got "
                f"{self.max_length}."
            )


def check_number(
    config: Any, name: str, minimum: float, fix: str, *, exclusive: bool = False, maximum: float | None = None
) -> None:
    """Raise a `ValueError` naming the field `name` when its value is below `minimum` (or equal to it, when
    `exclusive`) or above `maximum`; None (and anything not a number, left to `check_field_types`) passes. `fix` says
    what to set instead."""
    value = getattr(config, name)
    if not isinstance(value, numbers.Real):
        return
    low = value > minimum or (value == minimum and not exclusive)
    if low and (maximum is None or value <= maximum):
        return
    bound = f"{'>' if exclusive else '>='} {minimum}" + ("" if maximum is None else f" and <= {maximum}")
    raise ValueError(f"`{name}={value!r}` is invalid: it must be {bound}. {fix}")


_FIELD_KINDS: dict[type, dict[str, frozenset[str]]] = {}


def _annotation_kinds(annotation: Any) -> frozenset[str]:
    """The top-level types a field annotation allows, by name: 'int | None' -> {'int', 'None'}; `list[float]` is
    'list[float]', anything else keeps its bare name ('str', 'dict', 'Literal', ...)."""
    if isinstance(annotation, str):
        parts = [part.strip() for part in annotation.split("|")]
    else:
        args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
        parts = [_annotation_name(arg) for arg in args] if args else [_annotation_name(annotation)]
    return frozenset("None" if part in ("None", "NoneType") else part.replace(" ", "") for part in parts)


def _annotation_name(annotation: Any) -> str:
    if annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    if origin is list:
        return f"list[{','.join(_annotation_name(arg) for arg in typing.get_args(annotation))}]"
    return getattr(origin or annotation, "__name__", str(annotation))


def _field_kinds(config_class: type) -> dict[str, frozenset[str]]:
    """The checked fields of `config_class` and their kinds, read from the classes' own annotations (argument parsers
    rewrite `Field.type`), leaving out fields whose default would not pass its own annotation."""
    kinds = _FIELD_KINDS.get(config_class)
    if kinds is None:
        annotations: dict[str, Any] = {}
        for klass in reversed(config_class.__mro__):
            annotations.update(vars(klass).get("__annotations__", {}))
        kinds = {}
        for f in dataclasses.fields(config_class):
            if f.init and f.name in annotations:
                kind = _annotation_kinds(annotations[f.name])
                default = f.default if f.default is not dataclasses.MISSING else None
                if default is None or _type_error(f.name, default, kind) is None:
                    kinds[f.name] = kind
        _FIELD_KINDS[config_class] = kinds
    return kinds


def check_field_types(config: Any) -> None:
    """Raise a `TypeError` naming the field when a number, boolean or list-of-numbers field holds a value of another
    kind: a string where a number goes (`learning_rate="1e-5"` would fail deep inside the optimizer; `"false"` in a
    boolean field reads as True), a fraction where an integer goes, or a scalar where a list goes. Fields that also
    accept strings, and None values, are left alone."""
    for name, kind in _field_kinds(type(config)).items():
        value = getattr(config, name, None)
        error = None if value is None else _type_error(name, value, kind)
        if error is not None:
            raise error


def _type_error(name: str, value: Any, kind: frozenset[str]) -> TypeError | None:
    """The `TypeError` for `value` in a field of `kind` (see `_annotation_kinds`), or None when it fits."""
    expected = kind - {"None"}
    if not expected:
        return None
    if expected <= {"bool"}:
        if isinstance(value, str):
            return TypeError(
                f"`{name}={value!r}` is a string, but `{name}` is a boolean: pass {name}=True or {name}=False "
                "(any non-empty string, 'false' included, would read as True)."
            )
    elif expected <= {"int", "float"}:
        integer = expected == {"int"}
        if isinstance(value, numbers.Real) and not (integer and not isinstance(value, numbers.Integral)):
            return None
        return TypeError(
            f"`{name}={value!r}` ({type(value).__name__}) is invalid: `{name}` takes "
            f"{'an integer' if integer else 'a number'}. {_as_number(value, integer, name)}"
        )
    elif expected <= {"list[float]", "list[int]"} and not isinstance(value, list | tuple):
        return TypeError(f"`{name}={value!r}` is invalid: `{name}` takes a list of numbers, e.g. {name}=[{value!r}].")
    return None


def _as_number(value: Any, integer: bool, name: str) -> str:
    """What to pass instead of `value` for a number field."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"Pass {'an integer' if integer else 'a number'}, e.g. {name}=1."
    if integer and not number.is_integer():
        return f"Pass a whole number, e.g. {name}={max(1, round(number))}."
    suggestion = int(number) if integer else number
    hint = " (YAML reads 1e-5 as a string: write 1.0e-5)" if isinstance(value, str) and "e" in value.lower() else ""
    return f"Pass {name}={suggestion!r}{hint}."


def _bf16_available(use_cpu: bool) -> bool:
    """Whether `TrainingArguments` accepts `bf16=True` here (the same test it validates with)."""
    return use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available()


def resolve_pad_to_multiple_of(value: int | str | None, device_type: str) -> int | None:
    """`pad_to_multiple_of` as an int or None: "auto" is 128 on Neuron (one compilation per shape) and None elsewhere;
    strings from the CLI ("8", "none") are parsed."""
    if value == "auto":
        return 128 if device_type == "neuron" else None
    if isinstance(value, str):
        return None if value.lower() in ("none", "null") else int(value)
    return value
