"""The trainer loop of the asynchronous engine (NexRL's shape): a thread that takes batches from the trajectory pool,
trains on them (`train`, abstract) and hands every new version to the weight-sync controller.

Not a `transformers.Trainer`: subclasses decide what a step is (a local optimizer step in `SelfHostedGrpoTrainer`,
`forward_backward` + `optim_step` on a remote service in the remote trainers).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from .pool import PoolClosed, TrajectoryPool
from .rollout_worker import RolloutWorker
from .trajectory import Trajectory
from .weight_sync import WeightSyncController

logger = logging.getLogger(__name__)


class PromptsExhausted(Exception):
    """Every worker ran out of prompts and the pool cannot fill another batch: the run ends early."""


class AsyncTrainer(ABC):
    """Consumes batches of `batch_size` trajectories for `max_steps` optimizer steps.

    Args:
        batch_size: trajectories per step (whole groups with a `GroupedTrajectoryPool`).
        max_steps: steps to train.
        workers: the rollout workers feeding the pool (started by `initialize_workers`, stopped by `stop`).
        heartbeat_stale_after_s: a worker busy generating or scoring without progress for this long fails the run.
        batch_timeout: seconds to wait for one batch before `TimeoutError`; None waits as long as workers are healthy.
    """

    def __init__(
        self,
        batch_size: int,
        max_steps: int,
        workers: Sequence[RolloutWorker] = (),
        heartbeat_stale_after_s: float = 300.0,
        batch_timeout: float | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer (trajectories per step), got {batch_size!r}.")
        if not isinstance(max_steps, int) or max_steps < 0:
            raise ValueError(f"max_steps must be an integer >= 0, got {max_steps!r}.")
        if heartbeat_stale_after_s <= 0:
            raise ValueError(f"heartbeat_stale_after_s must be > 0 seconds, got {heartbeat_stale_after_s}.")
        self.batch_size, self.max_steps = batch_size, max_steps
        self.workers = list(workers)
        self.heartbeat_stale_after_s, self.batch_timeout = heartbeat_stale_after_s, batch_timeout
        self.pool: TrajectoryPool | None = None
        self.weight_sync_controller: WeightSyncController | None = None
        self.version = 0
        """Optimizer steps done: the version of the trainer's weights."""
        self.history: list[dict[str, float]] = []
        """Metrics of every step, with `staleness/{mean,max}` of its batch."""
        self.consumed_versions: list[list[int]] = []
        """Per step, the `model_version` of every trajectory it trained on."""
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._workers_started = False

    # ----------------------------------------------------------------------------------------------- wiring
    def set_module_references(self, pool: TrajectoryPool, weight_sync_controller: WeightSyncController) -> None:
        """The pool batches come from and the controller new versions go to."""
        controller = weight_sync_controller
        if (
            controller.mode == "sync"
            and controller.samples_per_version != self.batch_size * controller.weight_sync_steps
        ):
            raise ValueError(
                f"In sync mode the controller's samples_per_version ({controller.samples_per_version}) must be the "
                f"samples consumed between two pushes: batch_size x weight_sync_steps = {self.batch_size} x "
                f"{controller.weight_sync_steps}; fewer never fill a batch, more are consumed by a later version."
            )
        if pool.maxsize < self.batch_size:
            raise ValueError(
                f"The pool holds at most {pool.maxsize} trajectories, fewer than one batch ({self.batch_size}): raise "
                "its maxsize (queue_maxsize)."
            )
        pool.on_drop = controller.forget  # a sample dropped as stale frees its place in generation's run-ahead
        self.pool, self.weight_sync_controller = pool, controller

    def initialize_workers(self) -> None:
        """Start the rollout workers (once)."""
        if self._workers_started:
            return
        self._workers_started = True
        for worker in self.workers:
            worker.start()

    @property
    def model(self) -> torch.nn.Module | None:
        """What `on_train_step` publishes (None for a trainer whose weights live elsewhere)."""
        return None

    # ----------------------------------------------------------------------------------------------- loop
    @abstractmethod
    def train(self, trajectories: list[Trajectory]) -> dict[str, float]:
        """One optimizer step on `trajectories`; return its metrics."""

    def health_check(self) -> None:
        """Raise if a worker failed or stalled (`RuntimeError` naming its server), or `PromptsExhausted` when every
        worker ran out of prompts and the pool cannot fill a batch."""
        for worker in self.workers:
            worker.check_health(self.heartbeat_stale_after_s)
        if self.workers and all(w.finished and not w.alive for w in self.workers):
            if self.pool is not None and len(self.pool) < self.batch_size:
                raise PromptsExhausted

    def run(self) -> None:
        """Train until `max_steps`, `stop()`, or the end of the prompts; stops the workers when done. Re-raises (and
        keeps in `error`) what ended the run otherwise."""
        if self.pool is None or self.weight_sync_controller is None:
            raise RuntimeError(
                f"{type(self).__name__}.run() needs set_module_references(pool, weight_sync_controller) first."
            )
        try:
            self.initialize_workers()
            while self.version < self.max_steps and not self._stop.is_set():
                try:
                    self.health_check()  # a failed worker ends the run even while others keep the pool full
                    batch = self.pool.get_batch(
                        self.batch_size, self.version, timeout=self.batch_timeout, health_check=self.health_check
                    )
                except PoolClosed:
                    if self._stop.is_set():
                        break
                    raise
                except PromptsExhausted:
                    logger.warning(
                        "The prompts ran out after %d of max_steps=%d steps; ending the run.",
                        self.version,
                        self.max_steps,
                    )
                    break
                self._step(batch)
        except BaseException as err:
            self.error = err
            raise
        finally:
            self._shutdown()

    def _step(self, batch: list[Trajectory]) -> None:
        start = time.perf_counter()
        versions = [t.model_version for t in batch]
        staleness = [self.version - v for v in versions]
        metrics = dict(self.train(batch))
        self.version += 1
        self.weight_sync_controller.on_train_step(self.model, self.version)
        metrics.update(self.pool.stats())
        metrics.update(self.weight_sync_controller.stats())
        for name in ("rollout/generated", "rollout/dropped_reward_errors"):
            metrics[name] = float(sum(w.metrics()[name] for w in self.workers))
        metrics["staleness/mean"] = sum(staleness) / len(staleness)
        metrics["staleness/max"] = float(max(staleness))
        metrics["step"] = float(self.version)
        metrics["perf/step_s"] = time.perf_counter() - start
        self.consumed_versions.append(versions)
        self.history.append(metrics)
        self.on_step_end(metrics)

    def on_step_end(self, metrics: dict[str, float]) -> None:  # noqa: B027 - a hook
        """Called with each step's metrics (log them here)."""

    def start(self) -> threading.Thread:
        """Run `run()` in its own thread; `wait()` joins it and re-raises its error."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} was already started.")

        def target() -> None:
            try:
                self.run()
            except BaseException:  # kept in self.error, re-raised by wait()
                logger.exception("The trainer loop failed")

        self._thread = threading.Thread(target=target, name=f"{type(self).__name__}-run", daemon=True)
        self._thread.start()
        return self._thread

    def wait(self, timeout: float | None = None) -> None:
        """Join the thread `start()` started; re-raise the error that ended the run, if any."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error

    def stop(self, timeout: float = 10.0) -> None:
        """Stop promptly: end the loop, stop the workers, close the pool and the controller, join every thread."""
        self._stop.set()
        self._shutdown(timeout)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _shutdown(self, timeout: float = 10.0) -> None:
        for worker in self.workers:
            worker.request_stop()  # all at once, then join each
        if self.weight_sync_controller is not None:
            try:
                self.weight_sync_controller.close(timeout)
            except Exception as err:  # a failed background push: keep it unless the run already failed
                logger.error("Closing the weight-sync controller: %s", err)
                self.error = self.error or err
        if self.pool is not None:
            self.pool.close()
        for worker in self.workers:
            worker.stop(timeout)
