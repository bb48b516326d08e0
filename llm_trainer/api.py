"""The simple API: `train(model, dataset, reward_fn)` in one call, and the registry of algorithms behind it."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .callbacks import TrainingResult
from .registry import ALGORITHMS, Algorithm, SimpleSpec, simple_spec

__all__ = ["TrainResult", "create_trainer", "get_algorithm", "list_algorithms", "register_algorithm", "train"]

TrainResult = TrainingResult
"""What `train` returns: the `TrainingResult` of `fit`, whose `trainer` holds the trained model and whose
`checkpoint_path` is its `best_checkpoint_path`."""


def list_algorithms() -> list[str]:
    """The names `train(algorithm=...)`, `create_trainer` and `get_algorithm` accept (`llm_trainer.registry`)."""
    return sorted(ALGORITHMS)


def get_algorithm(name: str) -> type:
    """The trainer class of algorithm `name` (case-insensitive), e.g. `get_algorithm("grpo") is GRPOTrainer`."""
    key = name.lower() if isinstance(name, str) else name
    if key not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm {name!r}; choose one of {list_algorithms()}.")
    return ALGORITHMS[key].trainer_class()


def register_algorithm(name: str, trainer_class: type, simple: SimpleSpec | None = None) -> None:
    """Make `trainer_class` (a `BaseTrainer` subclass) available as `algorithm=name`, with the simple API's options
    `simple` (by default those of the class it extends)."""
    from .trainer.base_trainer import BaseTrainer

    if not (isinstance(trainer_class, type) and issubclass(trainer_class, BaseTrainer)):
        raise TypeError(f"`trainer_class` must be a subclass of llm_trainer's BaseTrainer, got {trainer_class!r}.")
    ALGORITHMS[name.lower()] = Algorithm(name.lower(), trainer_class, simple, cli=False)


def create_trainer(name: str, model: Any, **kwargs: Any) -> Any:
    """`get_algorithm(name).from_pretrained(model, **kwargs)`: a trainer built when you call its `fit(dataset, ...)`.

    `use_leave_one_out_baseline=True` with "grpo" selects RLOO (GRPO with the leave-one-out baseline).
    """
    name = _leave_one_out(name, kwargs)
    return get_algorithm(name).from_pretrained(model, **kwargs)


def train(
    model: Any,
    dataset: Any = None,
    reward_fn: Any = None,
    algorithm: str = "grpo",
    max_steps: int | None = 1000,
    max_epochs: float | None = 1,
    learning_rate: float = 1e-6,
    batch_size: int = 32,
    num_generations_per_prompt: int = 16,
    output_dir: str | None = None,
    callbacks: list[TrainerCallback] | None = None,
    **kwargs: Any,
) -> TrainResult:
    """Train `model` (a name, a path or a loaded model) with `algorithm` and return its `TrainResult`.

    Args:
        dataset: a dataset name or local path (its "train" split), a data file, a list of dicts, or a
            `datasets.Dataset`, in the algorithm's format (GRPO: a "prompt" column; SFT: "messages", "text" or
            prompt/completion; DPO: prompt/chosen/rejected).
        reward_fn: for GRPO and RLOO, `reward_fn(prompt: str, response: str) -> float`; parameters after the first
            two named after dataset columns get that column's value. TRL's batched form works too.
        algorithm: one of `list_algorithms()`.
        max_steps / max_epochs: training stops at whichever comes first (None: no cap of that kind).
        batch_size: examples per optimizer step; for GRPO and RLOO, prompts per step (each sampled
            `num_generations_per_prompt` times).
        num_generations_per_prompt: completions per prompt (GRPO, RLOO).
        output_dir: where checkpoints go; `./outputs/{model_name}` by default.
        callbacks: `llm_trainer.callbacks.Callback`s or `transformers.TrainerCallback`s.
        **kwargs: the trainer's config fields and constructor arguments (`beta`, `peft_config`, `eval_dataset`,
            ...), `normalize_rewards` (GRPO: scale rewards by their group's std), `use_leave_one_out_baseline`
            (True: RLOO's baseline) and `environment` (a multi-turn environment for GRPO).
    """
    name = _leave_one_out(algorithm, kwargs)
    trainer_class = get_algorithm(name)
    environment = kwargs.pop("environment", None)
    options = {"learning_rate": learning_rate, "batch_size": batch_size, **kwargs}
    if simple_spec(trainer_class).batch_unit == "prompts":
        options["num_generations_per_prompt"] = num_generations_per_prompt
    elif num_generations_per_prompt != 16:
        raise TypeError(f"`num_generations_per_prompt` applies to online RL (grpo, rloo), not {name!r}.")
    if output_dir is not None:
        options["output_dir"] = output_dir
    trainer = trainer_class.from_pretrained(model, **options)
    return trainer.fit(dataset, reward_fn, environment, max_steps, max_epochs, callbacks)


def _leave_one_out(algorithm: str, kwargs: dict[str, Any]) -> str:
    """The algorithm once `use_leave_one_out_baseline` (popped from `kwargs`) is applied."""
    name = algorithm.lower() if isinstance(algorithm, str) else algorithm
    leave_one_out = kwargs.pop("use_leave_one_out_baseline", None)
    if leave_one_out is None:
        return name
    if name == "grpo":
        return "rloo" if leave_one_out else name
    if name == "rloo":
        if not leave_one_out:
            raise ValueError("RLOO always uses the leave-one-out baseline; use algorithm='grpo' for group baselines.")
        return name
    raise TypeError(f"`use_leave_one_out_baseline` applies to 'grpo' and 'rloo', not {algorithm!r}.")
