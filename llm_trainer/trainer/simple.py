"""The simple API every trainer carries: `from_pretrained(...)` then `fit(...)`, checkpoints, and the nested-dict form.

`GRPOTrainer.from_pretrained(model, ...)` returns a `GRPOTrainer` whose construction waits for `fit(dataset, ...)`,
which brings the dataset and the reward function; `GRPOTrainer({"policy": ..., "grpo": ..., "data": ...})` does the
same from one nested dict. Friendly option names (`batch_size`, `num_generations_per_prompt`, ...) become config fields
through each trainer's `SimpleSpec` in `SIMPLE_SPECS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import numbers
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from transformers import TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME

from ..callbacks import Callback
from .checkpointing import STAGING_PREFIX, staged_folder

_MANAGED_PARAMS = {"self", "model", "args"}  # constructor arguments `from_pretrained` fills itself
_SHARED_ALIASES: dict[str, str] = {"max_epochs": "num_train_epochs", "max_sequence_length": "max_length"}
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class TrainingResult:
    """What `fit` returns (and `Callback.on_train_end` receives).

    `metrics` holds the latest logged value of every metric; `best_checkpoint_path` is the best checkpoint when
    `metric_for_best_model` tracks one, else the checkpoint saved at the last step (None when none was saved).
    """

    metrics: dict[str, float]
    best_checkpoint_path: str | None
    total_steps: int
    total_epochs: float

    @classmethod
    def from_state(cls, state: TrainerState, output_dir: str | None) -> TrainingResult:
        metrics: dict[str, float] = {}
        for entry in state.log_history:
            metrics.update(entry)
        metrics.pop("step", None)
        path = state.best_model_checkpoint
        if path is None and output_dir:
            last = os.path.join(output_dir, f"checkpoint-{state.global_step}")
            path = last if os.path.isdir(last) else None
        return cls(metrics, path, state.global_step, float(state.epoch or 0.0))


@dataclass(frozen=True)
class SimpleSpec:
    """How a trainer reads the simple API's options.

    Args:
        defaults: `from_pretrained`'s defaults (friendly names or config fields).
        aliases: friendly name -> config field, or -> a function of the value returning config fields.
        synonyms: friendly name -> the friendly name it stands for.
        batch_unit: what `batch_size` counts: dataset rows, or prompts (each sampled `num_generations` times; one
            optimizer step then covers `num_prompts_per_step` prompts, one prompt's group per micro-batch).
        reward_param: the constructor argument `fit(reward_fn=...)` fills; "reward_funcs" also takes the simple
            `reward_fn(prompt, response) -> float` form.
        init_defaults: constructor arguments without a default that `fit` sets.
    """

    defaults: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, str | Callable[[Any], dict[str, Any]]] = field(default_factory=dict)
    synonyms: dict[str, str] = field(default_factory=dict)
    batch_unit: Literal["rows", "prompts"] = "rows"
    reward_param: str | None = None
    init_defaults: dict[str, Any] = field(default_factory=dict)


_ONLINE_DEFAULTS = {
    "num_prompts_per_step": 32,
    "num_generations_per_prompt": 16,
    "learning_rate": 1e-6,
    "max_sequence_length": 512,
}
_ONLINE_ALIASES = {"num_generations_per_prompt": "num_generations", "max_sequence_length": "max_completion_length"}

SIMPLE_SPECS: dict[str, SimpleSpec] = {  # keyed by the trainer's `_name`; subclasses inherit their parent's
    "GRPO": SimpleSpec(
        defaults=_ONLINE_DEFAULTS,
        aliases={**_ONLINE_ALIASES, "normalize_rewards": lambda on: {"scale_rewards": _scale_rewards(on)}},
        synonyms={"batch_size": "num_prompts_per_step"},
        batch_unit="prompts",
        reward_param="reward_funcs",
    ),
    "RLOO": SimpleSpec(
        defaults=_ONLINE_DEFAULTS,
        aliases={**_ONLINE_ALIASES, "normalize_rewards": "normalize_advantages"},
        synonyms={"batch_size": "num_prompts_per_step"},
        batch_unit="prompts",
        reward_param="reward_funcs",
    ),
    "SFT": SimpleSpec(defaults={"batch_size": 8, "learning_rate": 2e-5}),
    "DPO": SimpleSpec(defaults={"beta": 0.1}),
    "PPO": SimpleSpec(reward_param="reward_model", init_defaults={"processing_class": None, "ref_model": None}),
}


@dataclass
class _Pending:
    """A trainer from `from_pretrained` before `fit` builds it."""

    model: Any
    config: Any
    init_kwargs: dict[str, Any]
    resume_from: str | None = None
    step: int = 0


class _SimpleAPIMeta(type):
    """Routes `Trainer(config_dict)` to `Trainer.from_dict(config_dict)`."""

    def __call__(cls, *args: Any, **kwargs: Any):
        if len(args) == 1 and not kwargs and isinstance(args[0], Mapping):
            return cls.from_dict(args[0])
        return super().__call__(*args, **kwargs)

    @property
    def __signature__(cls) -> inspect.Signature:
        """The constructor's signature for `inspect.signature(Trainer)`, which would otherwise show `__call__`'s."""
        signature = inspect.signature(cls.__init__)
        return signature.replace(parameters=list(signature.parameters.values())[1:])


class _EpochLimit(TrainerCallback):
    """Stop (and save, with `save_strategy="steps"`) after `max_epochs` epochs when `max_steps` is also set."""

    def __init__(self, max_epochs: float):
        self.max_epochs = max_epochs

    def on_epoch_end(self, args, state, control, **kwargs):
        if (state.epoch or 0) >= self.max_epochs - 1e-9:
            control.should_training_stop = True
            control.should_save = control.should_save or args.save_strategy == "steps"


class SimpleAPIMixin(metaclass=_SimpleAPIMeta):
    """`from_pretrained`, `fit`, `save_checkpoint`, `load_checkpoint`, `config`, `current_step` and the nested-dict
    constructor, for every `BaseTrainer`. Also binds `llm_trainer.callbacks.Callback`s to the trainer."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._bind_callbacks()

    def require_built(self) -> None:
        """Raise when this trainer comes from `from_pretrained` and `fit` has not built it yet."""
        if "_simple_pending" in self.__dict__:
            raise RuntimeError(
                f"This {type(self).__name__} comes from `from_pretrained` (or a config dict) and is built by "
                "`fit(dataset, ...)`; call `fit` instead of `train`."
            )

    def add_callback(self, callback: type[TrainerCallback] | TrainerCallback) -> None:
        super().add_callback(callback)
        self._bind_callbacks()

    def _bind_callbacks(self) -> None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, Callback):
                callback.trainer = self

    # ------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, model_name_or_path: Any, **kwargs: Any):
        """A trainer for `model_name_or_path` (a name, a path or a loaded model), built when `fit` is called.

        Keywords are this trainer's config fields, its constructor arguments (`peft_config`, `processing_class`,
        `eval_dataset`, `train_dataset`, ...) and the friendly names: `batch_size`, `learning_rate`, `max_epochs`,
        `max_sequence_length`; for GRPO and RLOO also `num_prompts_per_step`, `num_generations_per_prompt` and
        `normalize_rewards`. Defaults per trainer (`SIMPLE_SPECS`): GRPO and RLOO `num_prompts_per_step=32,
        num_generations_per_prompt=16, learning_rate=1e-6, max_sequence_length=512`; SFT `batch_size=8,
        learning_rate=2e-5`; DPO `beta=0.1`. `output_dir` defaults to `./outputs/{model_name}`.
        """
        kwargs.setdefault("output_dir", os.path.join("outputs", _model_name(model_name_or_path)))
        config_values, init_kwargs = cls._split_options(kwargs)
        trainer = cls.__new__(cls)
        trainer.__dict__["_simple_pending"] = _Pending(
            model_name_or_path, cls.config_class(**config_values), init_kwargs
        )
        return trainer

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]):
        """A trainer from the nested-dict form, built when `fit` is called; also reached as `Trainer(config)`.

        Keys: `"policy"`: the model as `model_name_or_path` (or `model_name`, or `model` for a loaded model), plus
        constructor arguments such as `tokenizer` (`processing_class`) or `peft_config`, and model-loading config
        fields such as `model_init_kwargs`; `"<algorithm>"` (`"grpo"`, `"sft"`, ... : the trainer's name in lower case):
        any `from_pretrained` keyword; `"data"` (optional): the training dataset, as anything `fit` takes or as
        `{"dataset": ..., "split": "train"}`.
        """
        section = cls._name.lower()
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
        return cls.from_pretrained(model, **options)

    @classmethod
    def _simple_spec(cls) -> SimpleSpec:
        for klass in cls.__mro__:
            spec = SIMPLE_SPECS.get(vars(klass).get("_name"))
            if spec is not None:
                return spec
        return SimpleSpec()

    @classmethod
    def _split_options(cls, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Config values and constructor arguments from `from_pretrained`'s keywords and this trainer's defaults."""
        spec = cls._simple_spec()
        for synonym, target in spec.synonyms.items():
            if synonym in options:
                if target in options:
                    raise ValueError(f"`{synonym}` and `{target}` mean the same here; pass one.")
                options[target] = options.pop(synonym)
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
            num_generations = config.get("num_generations", _field_default(cls.config_class, "num_generations"))
            config.setdefault("per_device_train_batch_size", num_generations)
            config.setdefault(
                "gradient_accumulation_steps", _per_process(friendly["num_prompts_per_step"], "num_prompts_per_step")
            )
        elif "batch_size" in friendly:
            config.setdefault("per_device_train_batch_size", _per_process(friendly["batch_size"], "batch_size"))
        return config, init

    # ------------------------------------------------------------------------------------------- training
    def fit(
        self,
        dataset: Any = None,
        reward_fn: Any = None,
        environment: Any = None,
        max_steps: int | None = None,
        max_epochs: float | None = None,
        callbacks: list[TrainerCallback] | None = None,
    ) -> TrainingResult:
        """Train and return a `TrainingResult`.

        On a trainer from `from_pretrained` (or a config dict), this builds it first: `dataset` is a dataset name or
        local path (its "train" split), a data file, a list of dicts or a `datasets.Dataset`; `reward_fn` (GRPO,
        RLOO) is `reward_fn(prompt, response) -> float` (conversational prompts and responses arrive as the text of
        their messages; further parameters named after dataset columns get that column's value), TRL's
        `f(prompts, completions, **kwargs) -> list[float]`, a reward model, or a list of these; `environment` goes to
        the trainer's `environment` argument. On a trainer built the usual way these three must be None.

        `max_steps` and `max_epochs` cap training (whichever comes first when both are given; None keeps the
        config's). Training resumes from a checkpoint given to `load_checkpoint`.
        """
        for value, what in ((max_steps, "max_steps"), (max_epochs, "max_epochs")):
            if value is not None and not value > 0:
                raise ValueError(f"`{what}` must be positive, got {value}; pass None to keep the config's.")
        check_callbacks(callbacks)
        pending = self.__dict__.get("_simple_pending")
        if pending is not None:
            self._build(pending, dataset, reward_fn, environment, callbacks)
        else:
            if dataset is not None or reward_fn is not None or environment is not None:
                raise ValueError(
                    f"This {type(self).__name__} already has its dataset and rewards; `fit(dataset, reward_fn, "
                    f"environment)` builds a trainer from `{type(self).__name__}.from_pretrained(...)`. Call `fit()` "
                    "without them, or create a new trainer with `from_pretrained`."
                )
            for callback in callbacks or []:
                self.add_callback(callback)
        self._apply_limits(max_steps, max_epochs)
        resume = self.__dict__.pop("_simple_resume_from", None)
        if resume is None and self.state.global_step > 0:  # a later `fit` continues where the last one stopped
            with self._continuation_checkpoint() as resume:
                self.train(resume_from_checkpoint=resume)
        else:
            self.train(resume_from_checkpoint=resume)
        return TrainingResult.from_state(self.state, self.args.output_dir)

    @contextlib.contextmanager
    def _continuation_checkpoint(self) -> Iterator[str]:
        """A checkpoint of the trainer as it is now (weights, optimizer, scheduler, RNG, step), deleted afterwards:
        resuming from it makes a second `fit` take up the data, optimizer and schedule where the first stopped."""
        path = os.path.join(self.args.output_dir, f"{STAGING_PREFIX}continue-{self.state.global_step}")
        self.save_checkpoint(path)
        try:
            yield path
        finally:
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                shutil.rmtree(path, ignore_errors=True)

    def _build(self, pending: _Pending, dataset: Any, reward_fn: Any, environment: Any, callbacks: Any) -> None:
        name, spec = type(self).__name__, self._simple_spec()
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
                reward_fn = simple_reward_functions(reward_fn, _column_names(train_dataset))
            init[spec.reward_param] = reward_fn
        if spec.reward_param and init.get(spec.reward_param) is None and environment is None:
            raise ValueError(
                f"{name} needs a reward: pass `reward_fn`, e.g. `def reward_fn(prompt: str, response: str) -> float`"
                + (", or an `environment` that scores the rollouts." if spec.reward_param == "reward_funcs" else ".")
            )
        if environment is not None:
            if "environment" not in inspect.signature(type(self).__init__).parameters:
                raise NotImplementedError(f"{name} does not take an `environment`; use GRPOTrainer.")
            init["environment"] = environment
        init["callbacks"] = [*(init.get("callbacks") or []), *(callbacks or [])]
        del self.__dict__["_simple_pending"]
        try:
            type(self).__init__(self, model=pending.model, args=pending.config, train_dataset=train_dataset, **init)
        except BaseException:
            self.__dict__["_simple_pending"] = pending
            raise
        if pending.resume_from is not None:
            self._simple_resume_from = pending.resume_from

    def _apply_limits(self, max_steps: int | None, max_epochs: float | None) -> None:
        if max_steps is not None:
            self.args.max_steps = max_steps
        if max_epochs is not None:
            self.args.num_train_epochs = max_epochs
            if max_steps is None:
                self.args.max_steps = -1
        self.pop_callback(_EpochLimit)
        if max_steps is not None and max_epochs is not None:
            self.add_callback(_EpochLimit(max_epochs))

    # ------------------------------------------------------------------------------------------- state
    @property
    def config(self):
        """The training config (`self.args`), available before `fit` too."""
        pending = self.__dict__.get("_simple_pending")
        return pending.config if pending is not None else self.args

    @property
    def current_step(self) -> int:
        """Optimizer steps taken (those of a loaded checkpoint before `fit`)."""
        pending = self.__dict__.get("_simple_pending")
        return pending.step if pending is not None else self.state.global_step

    def save_checkpoint(self, path: str | os.PathLike) -> str:
        """Save the model, tokenizer, optimizer, scheduler, RNG and trainer state to `path`; return `path`."""
        if "_simple_pending" in self.__dict__:
            raise RuntimeError("Nothing to save yet: the trainer is built (and its model loaded) by `fit`.")
        path = os.fspath(path)
        # written whole, then renamed to `path`: a kill never leaves half a checkpoint
        with staged_folder(path, self.accelerator, self.args.should_save) as staged:
            self.save_model(staged)
            if self.optimizer is not None and self.lr_scheduler is not None:
                self._save_optimizer_and_scheduler(staged)
            self._save_rng_state(staged)
            self._save_extra_state(staged)
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a checkpoint from `save_checkpoint` (or a `checkpoint-N` folder): the weights now, and the optimizer,
        scheduler and step count when `fit` resumes from it."""
        path = os.fspath(path)
        state_file = os.path.join(path, TRAINER_STATE_NAME)
        if not os.path.isfile(state_file):
            raise FileNotFoundError(
                f"{path!r} is not a checkpoint (no {TRAINER_STATE_NAME}); pass a folder written by `save_checkpoint` "
                "or a `checkpoint-N` folder."
            )
        state = TrainerState.load_from_json(state_file)
        pending = self.__dict__.get("_simple_pending")
        if pending is not None:
            pending.model, pending.resume_from, pending.step = path, path, state.global_step
            return
        self._load_from_checkpoint(path)
        self.state = state
        self._simple_resume_from = path


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


def _column_names(dataset: Dataset | IterableDataset) -> list[str]:
    return list(dataset.column_names or [])


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


def _scale_rewards(normalize: bool | str) -> str:
    """GRPO's `scale_rewards` for `normalize_rewards`: True is "group", False "none"; a string passes through."""
    if isinstance(normalize, str):
        return normalize
    return "group" if normalize else "none"


def _field_default(config_class: type, name: str) -> Any:
    for f in dataclasses.fields(config_class):
        if f.name == name:
            return f.default
    raise KeyError(name)
