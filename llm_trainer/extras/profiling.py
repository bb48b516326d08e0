"""Timing of code blocks and trainer methods, logged to Weights & Biases, MLflow and Trackio (TRL's
`trl.extras.profiling`).

Each timed block logs `{"<metric_prefix>: <name>": seconds}` from the main process to the trackers in `report_to`
that are installed and have an active run. Nothing is logged elsewhere, and timing never changes what the block does.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ProfilingContext", "profiling_context", "profiling_decorator"]


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


class ProfilingContext:
    """Time the `with` block and log its duration in seconds as `"{metric_prefix}: {name}"`.

    Args:
        name: what is timed, e.g. `"GRPOTrainer._generate"`.
        report_to: trackers to log to, among `"wandb"` (needs an active run), `"mlflow"` (an active run) and
            `"trackio"`; others are ignored.
        is_main_process: only the main process logs.
        step: training step passed to MLflow and Trackio.
        metric_prefix: start of the metric name.
    """

    def __init__(
        self,
        name: str,
        report_to: list[str],
        is_main_process: bool = True,
        step: int | None = None,
        metric_prefix: str = "profiling/Time taken",
    ):
        self.name = name
        self.report_to = report_to
        self.is_main_process = is_main_process
        self.step = step
        self.metric_prefix = metric_prefix
        self._start_time: float | None = None

    def __enter__(self) -> ProfilingContext:
        self._start_time = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        if self._start_time is not None:
            self._log_metrics(time.perf_counter() - self._start_time)
        return False  # exceptions propagate

    def _log_metrics(self, duration: float) -> None:
        """Log `duration` (seconds) to the trackers in `report_to`, from the main process only."""
        if not self.is_main_process:
            return
        metrics = {f"{self.metric_prefix}: {self.name}": duration}
        report_to = self.report_to or []
        if "wandb" in report_to and _installed("wandb"):
            import wandb

            if wandb.run is not None:
                wandb.log(metrics)
        if "mlflow" in report_to and _installed("mlflow"):
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_metrics(metrics, step=self.step)
        if "trackio" in report_to and _installed("trackio"):
            import trackio

            trackio.log(metrics, step=self.step)


def profiling_context(trainer: Any, name: str) -> ProfilingContext:
    """A `ProfilingContext` for `trainer`: named `"<TrainerClass>.<name>"`, logging to `trainer.args.report_to` at
    `trainer.state.global_step`, from the accelerator's main process."""
    return ProfilingContext(
        name=f"{type(trainer).__name__}.{name}",
        report_to=trainer.args.report_to,
        is_main_process=trainer.accelerator.is_main_process,
        step=trainer.state.global_step,
    )


def profiling_decorator(func: Callable) -> Callable:
    """Time each call of the method `func` with `profiling_context(self, func.__name__)`.

    On objects without a trainer's `args` and `state` but with an `accelerator`, the call is timed without being
    reported; on anything else it just runs.
    """

    @functools.wraps(func)
    def wrapper(self, *args, **kwargs):
        if hasattr(self, "state") and hasattr(self, "args"):
            context = profiling_context(self, func.__name__)
        elif hasattr(self, "accelerator"):
            context = ProfilingContext(
                f"{type(self).__name__}.{func.__name__}",
                report_to=[],
                is_main_process=self.accelerator.is_main_process,
            )
        else:
            return func(self, *args, **kwargs)
        with context:
            return func(self, *args, **kwargs)

    return wrapper
