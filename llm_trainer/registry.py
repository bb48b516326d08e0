"""The one list of training algorithms, each declared once with its trainer and the simple API's options: `api`
(`list_algorithms`, `get_algorithm`, `register_algorithm`), the `llm-trainer <name>` commands, the nested-dict form's
section key and the table in docs/simple_api.md read `ALGORITHMS` (tests/test_architecture.py checks they agree)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ALGORITHMS", "Algorithm", "SimpleSpec", "algorithm_of", "simple_spec"]


@dataclass(frozen=True)
class SimpleSpec:
    """How a trainer reads the simple API's options.

    Args:
        defaults: `from_pretrained`'s defaults (friendly names or config fields).
        aliases: friendly name -> config field, or -> a function of the value returning config fields.
        batch_unit: what `batch_size` counts: dataset rows, or prompts (then it is `num_prompts_per_step`; each prompt
            is sampled `num_generations` times, one prompt's group per micro-batch).
        reward_param: the constructor argument `fit(reward_fn=...)` fills; "reward_funcs" also takes the simple
            `reward_fn(prompt, response) -> float` form.
        init_defaults: constructor arguments without a default that `fit` sets.
    """

    defaults: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, str | Callable[[Any], dict[str, Any]]] = field(default_factory=dict)
    batch_unit: Literal["rows", "prompts"] = "rows"
    reward_param: str | None = None
    init_defaults: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Algorithm:
    """One algorithm: its `name`, its trainer (a class, or its name in `llm_trainer.trainer`, imported on first use),
    its simple-API options (None: those of the nearest registered parent class) and whether `llm-trainer <name>` runs
    it from flags (`llm_trainer.scripts._training` knows the arguments each one needs)."""

    name: str
    trainer: type | str
    simple: SimpleSpec | None = None
    cli: bool = True

    def trainer_class(self) -> type:
        if isinstance(self.trainer, str):
            return getattr(importlib.import_module("llm_trainer.trainer"), self.trainer)
        return self.trainer


def _scale_rewards(normalize: bool | str) -> dict[str, str]:
    """GRPO's `scale_rewards` for `normalize_rewards`: True is "group", False "none"; a string passes through."""
    return {"scale_rewards": normalize if isinstance(normalize, str) else ("group" if normalize else "none")}


_ONLINE_DEFAULTS = dict(
    num_prompts_per_step=32, num_generations_per_prompt=16, learning_rate=1e-6, max_sequence_length=512
)
_ONLINE = {"defaults": _ONLINE_DEFAULTS, "batch_unit": "prompts", "reward_param": "reward_funcs"}
_ONLINE_ALIASES = {"num_generations_per_prompt": "num_generations", "max_sequence_length": "max_completion_length"}
_GRPO = SimpleSpec(aliases={**_ONLINE_ALIASES, "normalize_rewards": _scale_rewards}, **_ONLINE)
_RLOO = SimpleSpec(aliases={**_ONLINE_ALIASES, "normalize_rewards": "normalize_advantages"}, **_ONLINE)
_PPO = SimpleSpec(reward_param="reward_model", init_defaults={"processing_class": None, "ref_model": None})

ALGORITHMS: dict[str, Algorithm] = {
    algorithm.name: algorithm
    for algorithm in [
        Algorithm("async_grpo", "AsyncGRPOTrainer"),
        Algorithm("bco", "BCOTrainer"),
        Algorithm("cpo", "CPOTrainer"),
        Algorithm("distillation", "DistillationTrainer"),
        Algorithm("dpo", "DPOTrainer", SimpleSpec(defaults={"beta": 0.1})),
        Algorithm("gkd", "GKDTrainer"),
        Algorithm("grpo", "GRPOTrainer", _GRPO),
        Algorithm("kto", "KTOTrainer"),
        Algorithm("nash_md", "NashMDTrainer"),
        Algorithm("online_dpo", "OnlineDPOTrainer"),
        Algorithm("orpo", "ORPOTrainer"),
        Algorithm("ppo", "PPOTrainer", _PPO),
        Algorithm("prm", "PRMTrainer"),
        Algorithm("reward", "RewardTrainer"),
        Algorithm("rloo", "RLOOTrainer", _RLOO),
        Algorithm("sft", "SFTTrainer", SimpleSpec(defaults={"batch_size": 8, "learning_rate": 2e-5})),
        Algorithm("teacher_grpo", "TeacherGRPOTrainer"),
        Algorithm("xpo", "XPOTrainer"),
    ]
}


def _registered(trainer_class: type) -> list[Algorithm]:
    """The algorithms of the classes in `trainer_class`'s MRO, nearest first (without importing other trainers)."""

    def declares(algorithm: Algorithm, klass: type) -> bool:
        if isinstance(algorithm.trainer, str):
            return klass.__name__ == algorithm.trainer and klass.__module__.startswith("llm_trainer.")
        return klass is algorithm.trainer

    return [a for klass in trainer_class.__mro__ for a in ALGORITHMS.values() if declares(a, klass)]


def algorithm_of(trainer_class: type) -> str:
    """The name a trainer class goes by (its nearest registered class's): the nested-dict form's section key."""
    registered = _registered(trainer_class)
    return registered[0].name if registered else trainer_class._name.lower()


def simple_spec(trainer_class: type) -> SimpleSpec:
    """The simple-API options of `trainer_class`: those of its nearest registered class that declares some."""
    return next((a.simple for a in _registered(trainer_class) if a.simple is not None), SimpleSpec())
