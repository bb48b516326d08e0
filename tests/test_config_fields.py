"""Every config field takes effect, or is one of the fields that do nothing by design and warns when set.

A field counts as read when library code outside the config modules reads it from a config object (`args.beta`,
`self.args.beta`, `model_config.lora_r`) or names it as a string (`getattr(args, "beta")`, a keyword table). The scan
is static and by name, so it catches a field nothing reads at all (as `GRPOConfig.cast_lm_head_to_fp32` once was),
not one read by another trainer only. Fields inherited from `transformers.TrainingArguments` are transformers'
business and are left out; deprecated fields whose value the config moves to their replacement count as read.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pathlib
import re
import types
import typing
import warnings

import pytest
from transformers import HfArgumentParser, TrainingArguments

import llm_trainer
from llm_trainer.trainer.base_config import DEPRECATED_FIELDS, BaseConfig, inert_fields

PACKAGE = pathlib.Path(llm_trainer.__file__).parent
CONFIG_MODULES = [f"llm_trainer.trainer.{path.stem}" for path in sorted((PACKAGE / "trainer").glob("*_config.py"))]
SCRIPT_MODULES = ["llm_trainer.scripts.utils", "llm_trainer.scripts._training", "llm_trainer.scripts.vllm_serve"]

# Fields that do nothing by design, per class that declares them (subclasses inherit them); each warns when set.
INERT = {
    "OnPolicyConfig": {"vllm_group_port"},
    "OnlineRLConfig": {"transformers_continuous_batching_config"},
    "GRPOConfig": {"log_completions_hub_repo"},
    "AsyncGRPOConfig": {"fork_threshold_tokens", "token_budget", "fast_generation", "generation_compact_finished"},
    "DistillationConfig": {"max_tool_calling_iterations"},
    "ReferenceFreeConfig": {"max_completion_length"},
    "BCOConfig": {"max_completion_length"},
    "PPOConfig": {"sft_model_path"},
}
# Settings a value of an inert field needs to pass the config's own checks.
NEEDS = {"log_completions_hub_repo": {"log_completions": True}}


def _config_classes() -> list[type]:
    """Every dataclass the config and script modules define (once, though `_BaseConfig` names `BaseConfig` again)."""
    classes = set()
    for name in CONFIG_MODULES + SCRIPT_MODULES:
        module = importlib.import_module(name)
        classes |= {
            value
            for value in vars(module).values()
            if dataclasses.is_dataclass(value) and isinstance(value, type) and value.__module__ == name
        }
    return sorted(classes, key=lambda cls: (cls.__module__, cls.__name__))


CLASSES = _config_classes()
TRAINING_ARGUMENTS = {f.name for f in dataclasses.fields(TrainingArguments)}


@functools.cache
def _library_source() -> str:
    """The library's code outside the config modules, where a field must be read to take effect."""
    paths = [path for path in PACKAGE.rglob("*.py") if not path.name.endswith("_config.py")]
    return "\n".join(path.read_text(encoding="utf-8") for path in paths)


def _read(name: str, source: str) -> bool:
    """Whether `source` reads `name` from a config (`args.x`, `self.args.x`, `model_config.x`, ...) or names it as a
    string (`getattr(args, "x")`, a keyword table)."""
    return re.search(rf"\b\w*(?:args|config|cfg|arguments)\.{name}\b|[\"']{name}[\"']", source) is not None


def _expected_inert(cls: type) -> set[str]:
    return {name for klass in cls.__mro__ for name in INERT.get(klass.__name__, ())}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}")
def test_every_field_is_read_or_declared_inert(cls):
    source = _library_source()
    inert = inert_fields(cls) if issubclass(cls, BaseConfig) else {}
    assert set(inert) == _expected_inert(cls), "update INERT with the fields this class declares inert"
    forwarded = {name for name, (_, replaced_by) in DEPRECATED_FIELDS.items() if replaced_by is not None}
    own = [f.name for f in dataclasses.fields(cls) if f.name not in TRAINING_ARGUMENTS]
    unread = [name for name in own if name not in inert and name not in forwarded and not _read(name, source)]
    assert unread == [], (
        f"{cls.__name__} fields that no library code reads: {unread}. Make each take effect, or list it in the "
        "class's `_inert_fields` (with the reason, so setting it warns) and in INERT here."
    )
    if cls.__module__ in CONFIG_MODULES:  # the script dataclasses keep TRL's exact metadata instead
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls) if f.name not in TRAINING_ARGUMENTS)


def _other_value(cls: type, name: str):
    """A value of field `name` other than its default."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    hint = typing.get_type_hints(cls)[name]
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kind = next(kind for kind in kinds if kind is not type(None))
    kind = typing.get_origin(kind) or kind
    value = {bool: not f.default, int: 7, float: 0.5, str: "other", dict: {"key": 1}}[kind]
    assert value != f.default
    return value


INERT_CASES = sorted(
    {(cls, name) for cls in CLASSES if issubclass(cls, BaseConfig) for name in inert_fields(cls)},
    key=lambda case: (case[0].__name__, case[1]),
)


@pytest.mark.parametrize(("cls", "name"), INERT_CASES, ids=[f"{cls.__name__}.{name}" for cls, name in INERT_CASES])
def test_inert_field_warns_when_set(cls, name, tmp_path):
    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", **NEEDS.get(name, {}))
    value = _other_value(cls, name)
    with pytest.warns(UserWarning, match=rf"`{name}=.*` has no effect: .+"):
        config = cls(**common, **{name: value})
    assert getattr(config, name) == value  # accepted as given, for TRL compatibility
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*has no effect", category=UserWarning)
        cls(**common)  # the default does not warn


@pytest.mark.parametrize(("name", "replacement"), [(n, r) for n, (_, r) in DEPRECATED_FIELDS.items() if r is not None])
def test_deprecated_field_warns_and_moves_its_value(name, replacement, tmp_path):
    cls = next(cls for cls in CLASSES if {name, replacement} <= {f.name for f in dataclasses.fields(cls)})
    value = _other_value(cls, name)
    with pytest.warns(FutureWarning, match=rf"`{name}` is deprecated: use `{replacement}`"):
        config = cls(output_dir=str(tmp_path), use_cpu=True, report_to="none", **{name: value})
    assert getattr(config, replacement) == value


@pytest.mark.parametrize("cls", [cls for cls in CLASSES if cls.__module__ in CONFIG_MODULES], ids=lambda c: c.__name__)
def test_the_command_line_sees_every_field(cls):
    text = HfArgumentParser(cls).format_help()
    assert [f.name for f in dataclasses.fields(cls) if f.init and f"--{f.name}" not in text] == []


def test_async_grpo_config_has_every_trl_field_with_its_default():
    """`AsyncGRPOConfig` has each field of TRL 1.16's `trl.experimental.async_grpo.AsyncGRPOConfig`, with TRL's default
    (its own additions, e.g. `weight_sync_mode`, come on top)."""
    theirs = pytest.importorskip("trl.experimental.async_grpo").AsyncGRPOConfig
    from llm_trainer.experimental.async_grpo import AsyncGRPOConfig

    def default(f):
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    ours = {f.name: f for f in dataclasses.fields(AsyncGRPOConfig)}
    missing = [f.name for f in dataclasses.fields(theirs) if f.name not in ours]
    assert missing == []
    differ = {
        f.name: (default(ours[f.name]), default(f))
        for f in dataclasses.fields(theirs)
        if default(ours[f.name]) != default(f)
    }
    assert differ == {}
