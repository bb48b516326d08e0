"""Defaults shared by every llm_trainer config (TRL's `_BaseConfig`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

logger = logging.getLogger(__name__)


@dataclass
class BaseConfig(TrainingArguments):
    """`TrainingArguments` with the defaults TRL's trainers share.

    Differences from `TrainingArguments`: `logging_steps=10`, `gradient_checkpointing=True`, and `bf16=None`, which
    resolves to `not fp16` where bf16 can run (a bf16-capable accelerator, or `use_cpu=True`) and to False
    elsewhere, where TRL's config raises instead. Adds the model-loading fields every trainer reads (`model_init_kwargs`,
    `trust_remote_code`).
    """

    logging_steps: float = field(
        default=10,
        metadata={
            "help": "Log every X update steps: an integer, or a float in [0, 1) read as a ratio of total steps."
        },
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "Recompute activations in the backward pass to save memory, at about 20%% more compute."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "Use bf16 (mixed) precision. Unset means `True` unless `fp16` is set."},
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra keyword arguments for the learning-rate scheduler, e.g. {'num_cycles': 1}."},
    )
    use_liger_kernel: bool = field(
        default=False,
        metadata={
            "help": "Patch the model's layers with Liger's Triton kernels (deprecated in TRL; kept for scripts)."
        },
    )
    torch_empty_cache_steps: int | None = field(
        default=None,
        metadata={"help": "Call `torch.<device>.empty_cache()` every N steps (slower, lowers peak memory)."},
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `from_pretrained` when the model is given as a name or path. `dtype` "
            "defaults to float32."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow custom model code from the model's repository when loading by name or path."},
    )

    def __post_init__(self):
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
