"""The simple API beside the trainers (`BaseTrainer`'s "simple API" section delegates here): `from_pretrained(...)`
returns a *pending* trainer, whose construction waits for `fit(dataset, ...)` to bring the dataset and the reward;
`GRPOTrainer({"policy": ..., "grpo": ..., "data": ...})` does the same from one nested dict; friendly option names
become config fields through the algorithm's `SimpleSpec` (`llm_trainer.registry`); checkpoints; dataset loading."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import numbers
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from transformers import TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME

from ..callbacks import Callback, TrainingResult
from ..registry import algorithm_of, simple_spec
from .checkpointing import STAGING_PREFIX, staged_folder

_MANAGED_PARAMS = {"self", "model", "args"}  # constructor arguments `from_pretrained` fills itself
_SHARED_ALIASES: dict[str, str] = {"max_epochs": "num_train_epochs", "max_sequence_length": "max_length"}
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class PendingBuild:
    """What a pending trainer (from `from_pretrained` or a config dict) holds until `fit` builds it."""

    model: Any
    config: Any
    init_kwargs: dict[str, Any]
    resume_from: str | None = None
    step: int = 0


class _EpochLimit(TrainerCallback):
    """Stop (and save, with `save_strategy="steps"`) after `max_epochs` epochs when `max_steps` is also set."""

    def __init__(self, max_epochs: float):
        self.max_epochs = max_epochs

    def on_epoch_end(self, args, state, control, **kwargs):
        if (state.epoch or 0) >= self.max_epochs - 1e-9:
            control.should_training_stop = True
            control.should_save = control.should_save or args.save_strategy == "steps"


# ----------------------------------------------------------------------------------------------- construction
def pending(cls: type, build: PendingBuild) -> Any:
    """A pending `cls`: an instance whose constructor has not run yet; `fit` runs it with `build` and the data."""
    trainer = cls.__new__(cls)
    trainer._pending_build = build
    return trainer


def pending_build(cls: type, model_name_or_path: Any, **kwargs: Any) -> PendingBuild:
    """What `cls.from_pretrained(model_name_or_path, **kwargs)` holds (a model name, path or loaded model) until `fit`.

    Keywords: `cls`'s config fields and constructor arguments (`peft_config`, `eval_dataset`, ...) and the friendly
    names `batch_size`, `learning_rate`, `max_epochs`, `max_sequence_length` (GRPO and RLOO also
    `num_prompts_per_step`, `num_generations_per_prompt`, `normalize_rewards`), over the defaults of its algorithm's
    `SimpleSpec` (`llm_trainer.registry`); `output_dir` defaults to `./outputs/{model_name}`.
    """
    kwargs.setdefault("output_dir", os.path.join("outputs", _model_name(model_name_or_path)))
    config_values, init_kwargs = split_options(cls, kwargs)
    return PendingBuild(model_name_or_path, cls.config_class(**config_values), init_kwargs)


def pending_from_dict(cls: type, config: Mapping[str, Any]) -> PendingBuild:
    """The pending build of `cls` from the nested-dict form (keys "policy", the algorithm's name, optionally "data")."""
    section = algorithm_of(cls)
    unknown = sorted(set(config) - {"policy", section, "data"})
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in the {cls.__name__} config dict; expected 'policy', '{section}' and "
            "optionally 'data'."
        )
    policy = dict(config.get("policy") or {})
    model_keys = [key for key in ("model_name_or_path", "model_name", "model") if key in policy]
    if len(model_keys) != 1:
        raise ValueError(
            "The config dict's 'policy' must name the model once, as 'model_name_or_path' (or 'model_name', or "
            f"'model' for a loaded model); got {sorted(policy) or 'no keys'}."
        )
    model = policy.pop(model_keys[0])
    if "tokenizer" in policy:
        policy["processing_class"] = policy.pop("tokenizer")
    options = dict(config.get(section) or {})
    both = sorted(set(policy) & set(options))
    if both:
        raise ValueError(f"{both} set both under 'policy' and under '{section}'; keep one.")
    options.update(policy)
    if config.get("data") is not None:
        options["train_dataset"] = _dataset_from_data_section(config["data"])
    return pending_build(cls, model, **options)


def split_options(cls: type, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Config values and constructor arguments of `cls` from `from_pretrained`'s keywords and its defaults."""
    spec = simple_spec(cls)
    if spec.batch_unit == "prompts" and "batch_size" in options:
        if "num_prompts_per_step" in options:
            raise ValueError("`batch_size` and `num_prompts_per_step` mean the same here; pass one.")
        options["num_prompts_per_step"] = options.pop("batch_size")
    config_fields = {f.name for f in dataclasses.fields(cls.config_class) if f.init}
    init_params = set(inspect.signature(cls.__init__).parameters) - _MANAGED_PARAMS
    aliases = {**_SHARED_ALIASES, **spec.aliases}
    batch_names = {"num_prompts_per_step"} if spec.batch_unit == "prompts" else {"batch_size"}
    config, init, friendly = {}, dict(spec.init_defaults), {}
    unknown = []
    for name, value in {**spec.defaults, **options}.items():
        if name in config_fields:
            config[name] = value
        elif name in init_params:
            init[name] = value
        elif name in aliases or name in batch_names:
            friendly[name] = value
        else:
            unknown.append(name)
    if unknown:
        raise TypeError(
            f"{cls.__name__}.from_pretrained got unknown keyword(s) {sorted(unknown)}: they are neither "
            f"{cls.config_class.__name__} fields, {cls.__name__} arguments, nor the simple API's names "
            f"({', '.join(sorted(aliases.keys() | batch_names))})."
        )
    for name, value in friendly.items():
        if name in batch_names:
            continue
        target = aliases[name]
        fields = {target: value} if isinstance(target, str) else target(value)
        for field_name, field_value in fields.items():
            if field_name not in config_fields:
                raise TypeError(f"`{name}` does not apply to {cls.__name__} (its config has no `{field_name}`).")
            if field_name in config and field_name in options and name in options:
                raise ValueError(f"`{name}` sets `{field_name}`, which is also given; pass one of them.")
            config.setdefault(field_name, field_value)
    if spec.batch_unit == "prompts" and "num_prompts_per_step" in friendly:
        num_generations = config.get(
            "num_generations", cls.config_class.__dataclass_fields__["num_generations"].default
        )
        config.setdefault("per_device_train_batch_size", num_generations)
        config.setdefault(
            "gradient_accumulation_steps", _per_process(friendly["num_prompts_per_step"], "num_prompts_per_step")
        )
    elif "batch_size" in friendly:
        config.setdefault("per_device_train_batch_size", _per_process(friendly["batch_size"], "batch_size"))
    return config, init


def require_built(trainer: Any) -> None:
    """Raise when `trainer` is pending (`fit` builds it); else bind its `llm_trainer.callbacks.Callback`s to it."""
    if trainer._pending_build is not None:
        raise RuntimeError(
            f"This {type(trainer).__name__} comes from `from_pretrained` (or a config dict) and is built by "
            "`fit(dataset, ...)`; call `fit` instead of `train`."
        )
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, Callback):
            callback.trainer = trainer


# ----------------------------------------------------------------------------------------------- training
def fit(
    trainer: Any, dataset: Any, reward_fn: Any, environment: Any, max_steps: Any, max_epochs: Any, callbacks: Any
) -> TrainingResult:
    """`trainer.fit(...)`: build a pending `trainer`, train, and return a `TrainingResult`.

    A pending trainer is built first: `dataset` is a dataset name or path (its "train" split), a data file, a list of
    dicts or a `datasets.Dataset`; `reward_fn` (GRPO, RLOO) is `reward_fn(prompt, response, [column, ...]) -> float`,
    TRL's `f(prompts, completions, **kwargs)`, a reward model, or a list of these; `environment` goes to the
    trainer's `environment`. A trainer built the usual way takes none of the three. `max_steps` and `max_epochs` cap
    training (whichever comes first; None keeps the config's); it resumes from `load_checkpoint`'s checkpoint.
    """
    for value, what in ((max_steps, "max_steps"), (max_epochs, "max_epochs")):
        if value is not None and not value > 0:
            raise ValueError(f"`{what}` must be positive, got {value}; pass None to keep the config's.")
    check_callbacks(callbacks)
    pending = trainer._pending_build
    if pending is not None:
        _build(trainer, pending, dataset, reward_fn, environment, callbacks)
    else:
        if dataset is not None or reward_fn is not None or environment is not None:
            name = type(trainer).__name__
            raise ValueError(
                f"This {name} already has its dataset and rewards; `fit(dataset, reward_fn, environment)` builds a "
                f"trainer from `{name}.from_pretrained(...)`. Call `fit()` without them, or create a new trainer "
                "with `from_pretrained`."
            )
        for callback in callbacks or []:
            trainer.add_callback(callback)
    _apply_limits(trainer, max_steps, max_epochs)
    resume, trainer._resume_from = trainer._resume_from, None
    continuing = resume is None and trainer.state.global_step > 0  # a later `fit` continues where the last stopped
    with _continuation_checkpoint(trainer) if continuing else contextlib.nullcontext(resume) as checkpoint:
        trainer.train(resume_from_checkpoint=checkpoint)
    return TrainingResult.from_state(trainer.state, trainer.args.output_dir, trainer)


@contextlib.contextmanager
def _continuation_checkpoint(trainer: Any) -> Iterator[str]:
    """A checkpoint of `trainer` as it is now (weights, optimizer, scheduler, RNG, step), deleted afterwards: resuming
    from it makes a second `fit` take up the data, optimizer and schedule where the first stopped."""
    path = os.path.join(trainer.args.output_dir, f"{STAGING_PREFIX}continue-{trainer.state.global_step}")
    save_checkpoint(trainer, path)
    try:
        yield path
    finally:
        trainer.accelerator.wait_for_everyone()
        if trainer.args.should_save:
            shutil.rmtree(path, ignore_errors=True)


def _build(
    trainer: Any, pending: PendingBuild, dataset: Any, reward_fn: Any, environment: Any, callbacks: Any
) -> None:
    """Run the constructor of the pending `trainer` with its model, config and what `fit` brings."""
    name, spec = type(trainer).__name__, simple_spec(type(trainer))
    init = dict(pending.init_kwargs)
    dataset = init.pop("train_dataset", None) if dataset is None else dataset
    if dataset is None:
        raise ValueError(
            f"{name} needs a dataset: pass `dataset` (a dataset name or path, a list of dicts, or a "
            "`datasets.Dataset`)."
        )
    train_dataset = load_training_dataset(dataset)
    if reward_fn is not None:
        if spec.reward_param is None:
            raise ValueError(f"{name} does not use a reward function; drop `reward_fn`.")
        if spec.reward_param == "reward_funcs":
            reward_fn = simple_reward_functions(reward_fn, list(train_dataset.column_names or []))
        init[spec.reward_param] = reward_fn
    if spec.reward_param and init.get(spec.reward_param) is None and environment is None:
        raise ValueError(
            f"{name} needs a reward: pass `reward_fn`, e.g. `def reward_fn(prompt: str, response: str) -> float`"
            + (", or an `environment` that scores the rollouts." if spec.reward_param == "reward_funcs" else ".")
        )
    if environment is not None:
        if "environment" not in inspect.signature(type(trainer).__init__).parameters:
            raise NotImplementedError(f"{name} does not take an `environment`; use GRPOTrainer.")
        init["environment"] = environment
    init["callbacks"] = [*(init.get("callbacks") or []), *(callbacks or [])]
    trainer._pending_build = None
    try:
        type(trainer).__init__(trainer, model=pending.model, args=pending.config, train_dataset=train_dataset, **init)
    except BaseException:
        trainer._pending_build = pending
        raise
    trainer._resume_from = pending.resume_from


def _apply_limits(trainer: Any, max_steps: int | None, max_epochs: float | None) -> None:
    if max_steps is not None:
        trainer.args.max_steps = max_steps
    if max_epochs is not None:
        trainer.args.num_train_epochs = max_epochs
        if max_steps is None:
            trainer.args.max_steps = -1
    trainer.pop_callback(_EpochLimit)
    if max_steps is not None and max_epochs is not None:
        trainer.add_callback(_EpochLimit(max_epochs))


# ----------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(trainer: Any, path: str | os.PathLike) -> str:
    """`trainer.save_checkpoint(path)`: what `train(resume_from_checkpoint=path)` reads, written whole and then renamed
    to `path` (a kill never leaves half a checkpoint). No public API writes the optimizer's or the RNG's state in the
    format `train` resumes from, so `Trainer`'s own writers do."""
    if trainer._pending_build is not None:
        raise RuntimeError("Nothing to save yet: the trainer is built (and its model loaded) by `fit`.")
    path = os.fspath(path)
    with staged_folder(path, trainer.accelerator, trainer.args.should_save) as staged:
        trainer.save_model(staged)
        if trainer.optimizer is not None and trainer.lr_scheduler is not None:
            trainer._save_optimizer_and_scheduler(staged)
        trainer._save_rng_state(staged)
        trainer._save_extra_state(staged)
        if trainer.args.should_save:
            trainer.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
    return path


def load_checkpoint(trainer: Any, path: str | os.PathLike) -> None:
    """`trainer.load_checkpoint(path)`: the weights now (`Trainer`'s loader: no public API loads a checkpoint into a
    live, possibly wrapped model), the optimizer, scheduler, RNG and step at the next `fit` (`train`'s resume)."""
    path = os.fspath(path)
    state_file = os.path.join(path, TRAINER_STATE_NAME)
    if not os.path.isfile(state_file):
        raise FileNotFoundError(
            f"{path!r} is not a checkpoint (no {TRAINER_STATE_NAME}); pass a folder written by `save_checkpoint` "
            "or a `checkpoint-N` folder."
        )
    state = TrainerState.load_from_json(state_file)
    pending = trainer._pending_build
    if pending is not None:
        pending.model, pending.resume_from, pending.step = path, path, state.global_step
        return
    trainer._load_from_checkpoint(path)
    trainer.state = state
    trainer._resume_from = path


def check_callbacks(callbacks: Any) -> None:
    """Raise a `TypeError` unless `callbacks` is None or a list of callbacks (instances or classes)."""
    if callbacks is None:
        return
    if not isinstance(callbacks, list | tuple):
        raise TypeError(f"`callbacks` must be a list of callbacks, got {type(callbacks).__name__}: wrap it in [...].")
    for callback in callbacks:
        kind = callback if isinstance(callback, type) else type(callback)
        if not issubclass(kind, TrainerCallback):
            raise TypeError(
                f"`callbacks` holds {callback!r:.60}, which is no callback: pass `llm_trainer.callbacks.Callback` "
                "subclasses (overriding e.g. `on_step_end(self, trainer, step, metrics)`) or "
                "`transformers.TrainerCallback`s."
            )


# ----------------------------------------------------------------------------------------------- data
def load_training_dataset(dataset: Any, split: str = "train") -> Dataset | IterableDataset:
    """A `datasets.Dataset` from a dataset name or local path (`load_dataset`, or `load_from_disk` for a folder saved
    with `save_to_disk`), a data file (.json, .jsonl, .csv, .parquet, .txt), a list of dicts, or a dataset."""
    if isinstance(dataset, Dataset | IterableDataset):
        return dataset
    if isinstance(dataset, DatasetDict | IterableDatasetDict):
        if split not in dataset:
            raise ValueError(f"The dataset has no {split!r} split (splits: {sorted(dataset)}); pass one split.")
        return dataset[split]
    if isinstance(dataset, list | tuple):
        if not dataset or not all(isinstance(row, Mapping) for row in dataset):
            raise ValueError("A dataset given as a list must be a non-empty list of dicts, one per example.")
        return Dataset.from_list([dict(row) for row in dataset])
    if isinstance(dataset, str | os.PathLike):
        path = os.fspath(dataset)
        saved = ("dataset_info.json", "dataset_dict.json", "state.json")
        if os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in saved):
            return load_training_dataset(datasets.load_from_disk(path), split)
        if os.path.isfile(path):
            builder = _FILE_BUILDERS.get(Path(path).suffix.lower())
            if builder is None:
                raise ValueError(f"Cannot read {path!r}: use a {', '.join(_FILE_BUILDERS)} file or a dataset folder.")
            with dataset_read_errors(path):
                return datasets.load_dataset(builder, data_files=path, split=split)
        return load_named_dataset(path, split=split)
    raise TypeError(
        "`dataset` must be a dataset name or path, a list of dicts, or a `datasets.Dataset`; got "
        f"{type(dataset).__name__}."
    )


def load_named_dataset(path: str, **kwargs: Any) -> Any:
    """`datasets.load_dataset(path, **kwargs)` for a Hub dataset id or a local folder of data files, failing with the
    path and the fix when nothing is at a local-looking path, a folder holds no data files, or a file does not parse."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not os.path.exists(path):
        local = path.startswith((".", "/", "~")) or Path(path).suffix.lower() in (*_FILE_BUILDERS, ".tsv", ".arrow")
        try:
            validate_repo_id(path)
        except HFValidationError:
            local = True
        if local:
            where = "" if os.path.isabs(os.path.expanduser(path)) else f", relative to {os.getcwd()}"
            raise FileNotFoundError(
                f"No dataset at {path!r}: nothing is there{where}, and it is no Hub dataset id. Pass a "
                f"{'/'.join(_FILE_BUILDERS)} file, a folder of such files or one written by `save_to_disk`, or a Hub "
                "dataset id such as 'trl-lib/Capybara'."
            )
    with dataset_read_errors(path):
        return datasets.load_dataset(path, **kwargs)


@contextlib.contextmanager
def dataset_read_errors(path: str) -> Iterator[None]:
    """Turn `datasets`' errors for a folder without data files, or a file that does not parse, into a `ValueError`
    naming `path` and the cause."""
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DatasetGenerationError

    try:
        yield
    except EmptyDatasetError as error:
        raise ValueError(
            f"The dataset folder {path!r} holds no data files: put {'/'.join(_FILE_BUILDERS)} files in it, or pass "
            "one file, or a folder written by `save_to_disk`."
        ) from error
    except DatasetGenerationError as error:
        cause = error.__cause__ or error
        raise ValueError(
            f"Could not read the dataset at {path!r}: {type(cause).__name__}: {cause}. Fix that row (JSON Lines files "
            "hold one JSON object per line), or drop it."
        ) from error


def _dataset_from_data_section(data: Any) -> Dataset | IterableDataset:
    if not isinstance(data, Mapping):
        return load_training_dataset(data)
    keys = [key for key in ("dataset", "dataset_name") if key in data]
    if len(keys) != 1 or set(data) - {keys[0], "split"}:
        raise ValueError(
            "The config dict's 'data' must be a dataset, or {'dataset': <name, path, list or Dataset>, 'split': "
            f"'train'}}; got keys {sorted(data)}."
        )
    return load_training_dataset(data[keys[0]], data.get("split", "train"))


# ----------------------------------------------------------------------------------------------- rewards
_SIGNATURE_HELP = (
    "`reward_fn(prompt: str, response: str) -> float` (further parameters named after dataset columns get that "
    "column's value), or TRL's `reward_fn(prompts, completions, **kwargs) -> list[float]`"
)


def simple_reward_functions(reward_fn: Any, columns: list[str]) -> Any:
    """`reward_fn` (or each of a list) in the trainers' reward-function contract.

    A function taking `completions` is already in TRL's form, and reward models (or their names) pass through; a
    `reward_fn(prompt, response, [column, ...]) -> float | None` is called once per completion.
    """
    if isinstance(reward_fn, list | tuple):
        return [simple_reward_functions(func, columns) for func in reward_fn]
    if isinstance(reward_fn, str | torch.nn.Module):
        return reward_fn
    if not callable(reward_fn):
        raise TypeError(f"`reward_fn` must be a function {_SIGNATURE_HELP}; got {type(reward_fn).__name__}.")
    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    try:
        signature = inspect.signature(reward_fn)
    except (TypeError, ValueError) as error:
        raise TypeError(f"Cannot read the signature of `reward_fn` {name}; it must be {_SIGNATURE_HELP}.") from error
    params = signature.parameters
    if "completions" in params:
        return reward_fn
    kinds = inspect.Parameter
    positional = [p for p in params.values() if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind is kinds.VAR_POSITIONAL for p in params.values()):
        raise TypeError(f"`reward_fn` {name}{signature} does not fit: it must be {_SIGNATURE_HELP}.")
    columns = [column for column in columns if column not in ("prompt", "completion")]
    extra = positional[2:] + [p for p in params.values() if p.kind is kinds.KEYWORD_ONLY]
    missing = [
        p.name for p in extra if p.default is p.empty and (p.name not in columns or p.kind is kinds.POSITIONAL_ONLY)
    ]
    if missing:
        raise TypeError(
            f"`reward_fn` {name}{signature} does not fit: {missing} are not dataset columns (columns: {columns}). It "
            f"must be {_SIGNATURE_HELP}."
        )
    if any(p.kind is kinds.VAR_KEYWORD for p in params.values()):
        wanted = columns
    else:
        wanted = [p.name for p in extra if p.name in columns and p.kind is not kinds.POSITIONAL_ONLY]

    def rewards(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        return [
            _as_reward(reward_fn(_as_text(p), _as_text(c), **{k: kwargs[k][i] for k in wanted}), name)
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
        ]

    rewards.__name__ = rewards.__qualname__ = name
    return rewards


def _as_text(value: Any) -> str:
    """A prompt or completion as text: conversational ones are the contents of their messages, one per line."""
    if isinstance(value, str):
        return value
    lines = []
    for message in value:
        content = message.get("content", "")
        if not isinstance(content, str):  # a list of typed parts
            content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        lines.append(content)
    return "\n".join(lines)


def _as_reward(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return float(value)
    raise TypeError(f"`reward_fn` {name} returned {value!r}; return a float (or None to skip the sample).")


# ----------------------------------------------------------------------------------------------- helpers
def _model_name(model: Any) -> str:
    if isinstance(model, str | os.PathLike):
        return Path(os.fspath(model).rstrip("/")).name or "model"
    config = getattr(model, "config", None)
    return Path(str(getattr(config, "_name_or_path", "") or "")).name or type(model).__name__


def _per_process(count: int, name: str) -> int:
    """`count` examples per step split over `WORLD_SIZE` processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not isinstance(count, numbers.Integral):
        raise TypeError(f"`{name}={count!r}` ({type(count).__name__}) is invalid: pass a whole number of examples.")
    if count < 1 or count % world_size:
        raise ValueError(f"`{name}={count}` must be a positive multiple of the number of processes ({world_size}).")
    return count // world_size
