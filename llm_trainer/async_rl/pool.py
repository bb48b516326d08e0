"""Trajectory pools: the thread-safe buffer between rollout workers (producers) and a trainer (the consumer).

A pool hands out batches oldest first and drops samples whose staleness (trainer version minus the version that
generated them) exceeds `max_staleness`; every drop is counted (`pool/dropped_stale`) and logged. Waiting is
`threading.Condition`-based, in short slices, so a trainer can abort through `health_check` and `close()` wakes
everyone at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from .trajectory import Trajectory

logger = logging.getLogger(__name__)

WAIT_SLICE_S = 0.5
"""The longest single wait: `get_batch` calls its `health_check` at least this often."""


class PoolClosed(RuntimeError):
    """The pool was closed (the run is stopping): no more samples go in or come out."""


class TrajectoryPool:
    """A FIFO of trajectories with bounded size and bounded staleness.

    Args:
        maxsize: most trajectories held; `put` blocks while the pool is full (back-pressure on the workers).
        max_staleness: drop samples more than this many versions older than the trainer's version when a batch is
            taken; None keeps every sample.
    """

    def __init__(self, maxsize: int = 1024, max_staleness: int | None = None) -> None:
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be a positive integer (trajectories held at most), got {maxsize!r}.")
        if max_staleness is not None and (not isinstance(max_staleness, int) or max_staleness < 0):
            raise ValueError(
                f"max_staleness must be None (no bound) or an integer >= 0 (0 keeps only on-policy samples), got "
                f"{max_staleness!r}."
            )
        self.maxsize, self.max_staleness = maxsize, max_staleness
        self._cond = threading.Condition()
        self._ready: deque[list[Trajectory]] = deque()  # units released to get_batch: one sample, or one whole group
        self._ready_count = 0
        self._held = 0  # every trajectory held, ready or not
        self._closed = False
        self._dropped_stale = 0
        self.on_drop: Callable[[int], None] | None = None
        """Called with the number of trajectories each time some are dropped as stale (e.g. the weight-sync
        controller's `forget`, so generation replaces them)."""
        self._staleness_mean = 0.0
        self._staleness_max = 0.0

    # ----------------------------------------------------------------------------------------------- producers
    def put(self, trajectories: Sequence[Trajectory], timeout: float | None = None) -> None:
        """Add `trajectories`, blocking while the pool is full; raises `PoolClosed` once closed and `TimeoutError`
        after `timeout` seconds (None waits as long as it takes)."""
        trajectories = list(trajectories)
        if not trajectories:
            return
        for item in trajectories:
            if not isinstance(item, Trajectory):
                raise TypeError(f"TrajectoryPool.put takes Trajectory objects, got {type(item).__name__}.")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            # Room for at least one more sample admits the whole call, so a group larger than the free space (or
            # than maxsize) never deadlocks.
            while not self._closed and self._held >= self.maxsize:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"TrajectoryPool.put waited {timeout:g} s for room (the pool holds {self._held} of "
                        f"maxsize={self.maxsize} trajectories): the trainer is not consuming; raise the timeout or "
                        "the pool's maxsize."
                    )
                self._cond.wait(WAIT_SLICE_S if remaining is None else min(WAIT_SLICE_S, remaining))
            if self._closed:
                raise PoolClosed("The trajectory pool is closed; the run is stopping.")
            self._add(trajectories)
            self._cond.notify_all()

    def _add(self, trajectories: list[Trajectory]) -> None:
        for item in trajectories:
            self._ready.append([item])
        self._ready_count += len(trajectories)
        self._held += len(trajectories)

    # ----------------------------------------------------------------------------------------------- consumer
    def get_batch(
        self,
        n: int,
        current_version: int,
        timeout: float | None = None,
        health_check: Callable[[], None] | None = None,
    ) -> list[Trajectory]:
        """Exactly `n` trajectories, oldest first, none staler than `max_staleness` relative to `current_version`.

        Stale samples met on the way are dropped and counted. Waits in slices of at most 0.5 s, calling
        `health_check()` after each (it raises to abort the wait); raises `TimeoutError` after `timeout` seconds
        and `PoolClosed` once the pool is closed.
        """
        self._check_n(n)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise PoolClosed("The trajectory pool is closed; the run is stopping.")
                self._drop_stale(current_version)
                if self._ready_count >= n:
                    batch = self._take(n)
                    staleness = [current_version - item.model_version for item in batch]
                    self._staleness_mean = sum(staleness) / len(staleness)
                    self._staleness_max = float(max(staleness))
                    self._cond.notify_all()
                    return batch
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"No batch of {n} trajectories within {timeout:g} s: the pool has {self._ready_count} ready "
                        f"({self._held} held in all, {self._dropped_stale} dropped as stale so far). Generation is "
                        "slower than expected or stalled; check the generation servers, or raise the timeout."
                    )
                self._cond.wait(WAIT_SLICE_S if remaining is None else min(WAIT_SLICE_S, remaining))
                if health_check is not None:
                    health_check()

    def _check_n(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"get_batch needs n >= 1 trajectories, got {n!r}.")
        if n > self.maxsize:
            raise ValueError(
                f"get_batch(n={n}) asks for more than the pool holds (maxsize={self.maxsize}), so it could never be "
                "filled: raise maxsize (queue_maxsize) to at least the batch size."
            )

    def _take(self, n: int) -> list[Trajectory]:
        batch: list[Trajectory] = []
        while len(batch) < n:
            unit = self._ready.popleft()
            batch.extend(unit)
        self._ready_count -= len(batch)
        self._held -= len(batch)
        return batch

    def _drop_stale(self, current_version: int) -> None:
        if self.max_staleness is None:
            return
        limit = current_version - self.max_staleness  # oldest version still allowed
        kept: deque[list[Trajectory]] = deque()
        dropped = 0
        for unit in self._ready:
            if min(item.model_version for item in unit) < limit:
                dropped += len(unit)
            else:
                kept.append(unit)
        if dropped:
            self._ready = kept
            self._ready_count -= dropped
            self._held -= dropped
            self._dropped_stale += dropped
            self._cond.notify_all()
            if self.on_drop is not None:
                self.on_drop(dropped)
            logger.warning(
                "Dropped %d trajectories older than max_staleness=%d (trainer version %d); %d dropped so far.",
                dropped,
                self.max_staleness,
                current_version,
                self._dropped_stale,
            )

    # ----------------------------------------------------------------------------------------------- state
    def close(self) -> None:
        """Refuse further puts and gets and wake every waiter (they raise `PoolClosed`)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        """Trajectories ready to be taken."""
        with self._cond:
            return self._ready_count

    @property
    def dropped_stale(self) -> int:
        """Trajectories dropped as stale so far."""
        return self._dropped_stale

    def stats(self) -> dict[str, float]:
        """`pool/size` (ready now), `pool/dropped_stale` (cumulative), and the staleness of the last batch
        (`pool/staleness_mean`, `pool/staleness_max`)."""
        with self._cond:
            return {
                "pool/size": float(self._ready_count),
                "pool/dropped_stale": float(self._dropped_stale),
                "pool/staleness_mean": self._staleness_mean,
                "pool/staleness_max": self._staleness_max,
            }


class GroupedTrajectoryPool(TrajectoryPool):
    """A pool that releases a group (the trajectories sharing a `group_id`) only once all `group_size` are in.

    `get_batch(n)` returns whole groups (`n` a multiple of `group_size`); a group is as stale as its oldest member,
    and a stale group is dropped whole. Incomplete groups count towards `maxsize`, so producers should put each
    group in one call (as `RolloutWorker` does).
    """

    def __init__(self, group_size: int, maxsize: int = 1024, max_staleness: int | None = None) -> None:
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer (completions per prompt), got {group_size!r}.")
        super().__init__(maxsize, max_staleness)
        self.group_size = group_size
        self._partial: dict[int, list[Trajectory]] = {}

    def _add(self, trajectories: list[Trajectory]) -> None:
        for item in trajectories:
            members = self._partial.setdefault(item.group_id, [])
            members.append(item)
            self._held += 1
            if len(members) == self.group_size:
                del self._partial[item.group_id]
                self._ready.append(members)
                self._ready_count += self.group_size

    def _check_n(self, n: int) -> None:
        super()._check_n(n)
        if n % self.group_size:
            raise ValueError(
                f"get_batch(n={n}) must ask for whole groups: n must be a multiple of group_size={self.group_size}."
            )

    @property
    def partial_groups(self) -> int:
        """Groups still waiting for members."""
        with self._cond:
            return len(self._partial)
