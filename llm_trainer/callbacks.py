"""`Callback`: simple hooks for the simple API, and `TrainingResult`, what training returns and `on_train_end`
receives; TRL's callbacks (`llm_trainer.trainer.callbacks`) re-exported."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback, TrainerState, TrainingArguments

from .trainer.callbacks import (
    BEMACallback,
    LogCompletionsCallback,
    MergeConfig,
    MergeModelCallback,
    RichProgressCallback,
    SyncRefModelCallback,
    WeaveCallback,
    WinRateCallback,
)

__all__ = [
    "BEMACallback",
    "Callback",
    "LogCompletionsCallback",
    "MergeConfig",
    "MergeModelCallback",
    "RichProgressCallback",
    "SyncRefModelCallback",
    "TrainingResult",
    "WeaveCallback",
    "WinRateCallback",
]


@dataclass
class TrainingResult:
    """What `fit` and `llm_trainer.train` return (`TrainResult` is this class) and `on_train_end` receives: the latest
    value of every logged metric; the best checkpoint when `metric_for_best_model` tracks one, else the last step's
    (None when none was saved; also `checkpoint_path`); steps; epochs; and the trainer (its model is the trained one)."""

    metrics: dict[str, float]
    best_checkpoint_path: str | None
    total_steps: int
    total_epochs: float
    trainer: Any = field(default=None, compare=False, repr=False)

    @property
    def checkpoint_path(self) -> str | None:
        return self.best_checkpoint_path

    @classmethod
    def from_state(cls, state: TrainerState, output_dir: str | None, trainer: Any = None) -> TrainingResult:
        metrics: dict[str, float] = {}
        for entry in state.log_history:
            metrics.update(entry)
        metrics.pop("step", None)
        path = state.best_model_checkpoint
        if path is None and output_dir:
            last = os.path.join(output_dir, f"checkpoint-{state.global_step}")
            path = last if os.path.isdir(last) else None
        return cls(metrics, path, state.global_step, float(state.epoch or 0.0), trainer)


_SIMPLE_HOOKS = ("on_train_begin", "on_step_begin", "on_step_end", "on_epoch_end", "on_train_end")


class Callback(TrainerCallback):
    """Training hooks with plain arguments instead of `transformers`' `(args, state, control, **kwargs)`.

    Subclass it, override any of these hooks, and pass instances in `callbacks=[...]` to `llm_trainer.train`, `fit` or
    any trainer. It is a `TrainerCallback`, so a plain `transformers.Trainer` takes it too.

    - `on_train_begin(trainer)`
    - `on_step_begin(trainer, step)`: `step` counts optimizer steps from 1.
    - `on_step_end(trainer, step, metrics)`: `metrics` maps every metric logged so far to its latest value (this
      step's when the step logs; called after that log).
    - `on_epoch_end(trainer, epoch, metrics)`: `epoch` counts from 1 (a partial last epoch counts).
    - `on_train_end(trainer, result)`: `result` is a `TrainingResult` (metrics, best checkpoint, steps, epochs).

    `trainer` is the llm_trainer trainer running the callback, bound when the callback is added to it; under a plain
    `transformers.Trainer` it is None unless you set `callback.trainer` yourself.
    """

    trainer: Any = None
    _pending_step_end: tuple[Callable, int] | None = None

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        for name in _SIMPLE_HOOKS:
            hook = vars(cls).get(name)
            if hook is not None and not getattr(hook, "_dispatches", False):
                setattr(cls, name, _dispatching(name, hook))

    def on_train_begin(self, trainer: Any) -> None:
        """Called once, before the first step."""

    def on_step_begin(self, trainer: Any, step: int) -> None:
        """Called before optimizer step `step` (1-based)."""

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        """Called after optimizer step `step`, with the latest logged value of every metric."""

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        """Called after epoch `epoch` (1-based), with the latest logged value of every metric."""

    def on_train_end(self, trainer: Any, result: Any) -> None:
        """Called once at the end of training with its `TrainingResult`."""

    # ------------------------------------------------------------------ transformers' events, translated
    def on_log(self, args, state, control, logs=None, **kwargs):
        self._latest_metrics = {**getattr(self, "_latest_metrics", {}), **(logs or {})}
        self._flush_step_end()

    def _flush_step_end(self) -> None:
        """Run an `on_step_end` held back until its step's log (or the next event, when the step does not log)."""
        if self._pending_step_end is not None:
            hook, step = self._pending_step_end
            self._pending_step_end = None
            hook(self, self.trainer, step, dict(getattr(self, "_latest_metrics", {})))

    def _transformers_event(self, name: str, hook: Callable, args, state, control, **kwargs) -> None:
        if name == "on_train_begin":
            self._latest_metrics, self._pending_step_end = {}, None
            hook(self, self.trainer)
            return
        if name == "on_step_end":  # the step's metrics are logged right after this event
            self._flush_step_end()
            self._pending_step_end = (hook, state.global_step)
            return
        self._flush_step_end()
        metrics = dict(getattr(self, "_latest_metrics", {}))
        if name == "on_step_begin":
            hook(self, self.trainer, state.global_step + 1)
        elif name == "on_epoch_end":
            hook(self, self.trainer, math.ceil(state.epoch or 0), metrics)
        else:  # on_train_end
            hook(self, self.trainer, TrainingResult.from_state(state, args.output_dir, self.trainer))


def _dispatching(name: str, hook: Callable) -> Callable:
    """`hook` as a method that also answers transformers' `(args, state, control, **kwargs)` call of the same name."""

    @functools.wraps(hook)
    def method(self, *args, **kwargs):
        if args and isinstance(args[0], TrainingArguments):
            return self._transformers_event(name, hook, *args, **kwargs)
        return hook(self, *args, **kwargs)

    method._dispatches = True
    return method


for _name in _SIMPLE_HOOKS:
    setattr(Callback, _name, _dispatching(_name, vars(Callback)[_name]))
del _name
