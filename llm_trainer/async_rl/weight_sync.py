"""When rollout workers may generate, and when the trainer's weights go to the generation servers.

Three modes (NexRL's names):

- `sync`: workers generate at most `samples_per_version` samples with each weights version, then wait for the next
  push. With `samples_per_version` equal to the samples one optimizer step consumes, every sample is consumed by the
  version that generated it (on-policy, staleness 0), and generation and training alternate.
- `batch-async`: workers never run more than `staleness_threshold` versions behind the trainer: the trainer pushes
  once the lag exceeds the threshold, and workers wait while it does.
- `fully-async`: workers never wait; the trainer pushes every `weight_sync_steps` steps (optionally from a
  background thread, on a CPU snapshot, so the trainer does not wait either).

In the two asynchronous modes, a controller given `max_staleness` and `samples_per_step` also bounds how far
generation runs ahead: the i-th sample (counting from 0, in the order they are granted) may start with weights
version v only if `i < (v - v0 + max_staleness + 1) * samples_per_step`, v0 the trainer's version when generation
starts. Samples are consumed in that order,
`samples_per_step` per optimizer step, so every sample is at most `max_staleness` versions old when consumed and
none is generated only to be dropped as stale; samples that never reach the trainer (`release`, `forget`) give
their place back.

Versions count optimizer steps: 0 is the initial weights, which the servers are assumed to serve at the start.
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
import time
from typing import Any, Protocol, runtime_checkable

import torch

logger = logging.getLogger(__name__)

SYNC_MODES = ("sync", "fully-async", "batch-async")
_WAIT_SLICE_S = 0.5


@runtime_checkable
class WeightPublisher(Protocol):
    """Something that makes `model`'s weights the ones the generators serve, tagged `version`."""

    def push(self, model: torch.nn.Module, version: int) -> None:
        """Publish the weights; raise `TimeoutError` naming the destination and the timeout if it takes too long."""


class WeightSyncController:
    """Gates rollout workers by weights version and publishes the trainer's weights (see the module docstring).

    Args:
        mode: one of `SYNC_MODES`.
        staleness_threshold: `batch-async`: the most versions the served weights may lag behind the trainer's.
        publisher: where weights go; None keeps only the bookkeeping (tests, or servers updated elsewhere).
        samples_per_version: `sync`: samples generated with each version (the samples consumed between two pushes:
            batch size × `weight_sync_steps`); required in `sync` mode.
        weight_sync_steps: `sync`/`fully-async`: push every this many optimizer steps (`batch-async` pushes by lag).
        background_push: `fully-async` only: snapshot the weights to CPU and push from a background thread, so the
            trainer's next step overlaps the transfer (the snapshot costs one CPU copy of the weights). A push error
            is raised at the next `on_train_step` or `close`.
        max_staleness / samples_per_step: `batch-async`/`fully-async`: bound generation's run-ahead (module
            docstring); both or neither. `samples_per_step` is the samples one optimizer step consumes.
    """

    def __init__(
        self,
        mode: str = "batch-async",
        staleness_threshold: int = 1,
        publisher: WeightPublisher | None = None,
        samples_per_version: int | None = None,
        weight_sync_steps: int = 1,
        *,
        background_push: bool = False,
        max_staleness: int | None = None,
        samples_per_step: int | None = None,
    ) -> None:
        if mode not in SYNC_MODES:
            raise ValueError(f"weight_sync_mode must be one of {', '.join(map(repr, SYNC_MODES))}, got {mode!r}.")
        if not isinstance(staleness_threshold, int) or staleness_threshold < 0:
            raise ValueError(f"staleness_threshold must be an integer >= 0, got {staleness_threshold!r}.")
        if not isinstance(weight_sync_steps, int) or weight_sync_steps < 1:
            raise ValueError(f"weight_sync_steps must be a positive integer, got {weight_sync_steps!r}.")
        if mode == "sync" and (not isinstance(samples_per_version, int) or samples_per_version < 1):
            raise ValueError(
                "weight_sync_mode='sync' needs samples_per_version, the samples generated with each weights version "
                f"(the batch size times weight_sync_steps), as a positive integer; got {samples_per_version!r}."
            )
        if background_push and mode != "fully-async":
            raise ValueError(
                f"background_push only applies to weight_sync_mode='fully-async' (got mode {mode!r}): the other modes "
                "wait for the new weights anyway."
            )
        if (max_staleness is None) != (samples_per_step is None):
            raise ValueError(
                "Bounding generation's run-ahead needs both max_staleness and samples_per_step (or neither); got "
                f"max_staleness={max_staleness!r}, samples_per_step={samples_per_step!r}."
            )
        if max_staleness is not None and (not isinstance(max_staleness, int) or max_staleness < 0):
            raise ValueError(f"max_staleness must be an integer >= 0, got {max_staleness!r}.")
        if samples_per_step is not None and (not isinstance(samples_per_step, int) or samples_per_step < 1):
            raise ValueError(f"samples_per_step must be a positive integer, got {samples_per_step!r}.")
        self.max_staleness, self.samples_per_step = max_staleness, samples_per_step
        self.mode, self.staleness_threshold, self.publisher = mode, staleness_threshold, publisher
        self.samples_per_version, self.weight_sync_steps = samples_per_version, weight_sync_steps
        self.background_push = background_push
        self.train_model_version = 0
        """The trainer's newest version (optimizer steps done)."""
        self.rollout_model_version = 0
        """The version the generation servers hold."""
        self._cond = threading.Condition()
        self._issued = 0  # samples issued with rollout_model_version (sync mode)
        self._started = 0  # samples granted in all, less those given back (run-ahead bound of the async modes)
        self._first_step: int | None = None  # the trainer's version at the first grant: the step of the first batch
        self._closed = False
        self._pushes = 0
        self._last_push_s = 0.0
        self._push_thread: threading.Thread | None = None
        self._pending: tuple[Any, int] | None = None  # fully-async background: newest snapshot not yet pushed
        self._push_error: BaseException | None = None

    # ----------------------------------------------------------------------------------------------- workers
    def acquire(self, num_samples: int, stop: threading.Event) -> int:
        """Block until a worker may generate `num_samples` samples (per the mode); return the weights version they
        will be generated with, or -1 as soon as `stop` is set or the controller is closed."""
        return self.acquire_samples(num_samples, stop, unit=num_samples)[0]

    def acquire_samples(self, num_samples: int, stop: threading.Event, unit: int = 1) -> tuple[int, int]:
        """`acquire` that may grant fewer samples: `(version, granted)`, `granted` a positive multiple of `unit` up to
        `num_samples` (`sync` mode grants what is left of the version's quota; the other modes grant all), or
        `(-1, 0)` once `stop` is set or the controller is closed. Workers ask in units of one group, so a quota
        given back by `release` can always be filled."""
        if unit < 1 or num_samples < unit or num_samples % unit:
            raise ValueError(f"acquire needs num_samples a positive multiple of unit={unit}, got {num_samples}.")
        if self.mode == "sync" and self.samples_per_version % unit:
            raise ValueError(
                f"In sync mode samples_per_version={self.samples_per_version} must be a multiple of the group size "
                f"{unit} (else a version's quota can never be filled with whole groups): make the batch size a "
                "multiple of num_generations."
            )
        with self._cond:
            while True:
                if stop.is_set() or self._closed:
                    return -1, 0
                granted = self._grant(num_samples, unit)
                if granted:
                    return self.rollout_model_version, granted
                self._cond.wait(_WAIT_SLICE_S)

    def _grant(self, num_samples: int, unit: int) -> int:
        if self.mode == "sync":
            left = self.samples_per_version - self._issued
            granted = min(num_samples, left - left % unit)
            self._issued += granted
            return granted
        if not self._may_generate():
            return 0
        if self.max_staleness is None:
            return num_samples
        if self._first_step is None:  # a resumed run's first batch is consumed at the step it resumes from
            self._first_step = self.train_model_version
        steps_ahead = self.rollout_model_version - self._first_step + self.max_staleness + 1
        room = steps_ahead * self.samples_per_step - self._started
        granted = min(num_samples, max(0, room - room % unit))
        self._started += granted
        return granted

    def _may_generate(self) -> bool:
        if self.mode == "batch-async":
            return self.train_model_version - self.rollout_model_version <= self.staleness_threshold
        return True

    def release(self, num_samples: int, version: int) -> None:
        """Give back the quota of `num_samples` samples acquired at `version` that never reach the pool (dropped, e.g.
        because a reward function raised), so `sync` mode can regenerate them for the same version (and the async
        modes' run-ahead bound lets others take their place)."""
        if self.mode != "sync":
            self.forget(num_samples)
            return
        with self._cond:
            if version == self.rollout_model_version:
                self._issued = max(0, self._issued - num_samples)
                self._cond.notify_all()

    def forget(self, num_samples: int) -> None:
        """`num_samples` granted samples will never be consumed (e.g. the pool dropped them as stale): in the async
        modes with a run-ahead bound, their places go to new samples. Wire it as the pool's `on_drop`."""
        if self.mode == "sync" or self.max_staleness is None:
            return
        with self._cond:
            self._started = max(0, self._started - num_samples)
            self._cond.notify_all()

    # ----------------------------------------------------------------------------------------------- trainer
    def on_train_step(self, model: torch.nn.Module | None, version: int) -> None:
        """Record that the trainer reached `version` (call it after every optimizer step) and publish the weights
        when the mode says so; waiting workers wake once the servers hold them."""
        self._raise_push_error()
        with self._cond:
            self.train_model_version = version
            lag = version - self.rollout_model_version
            if self._closed:  # stopping: no more pushes
                return
        if self.mode == "batch-async":
            due = lag > self.staleness_threshold
        else:
            due = lag > 0 and version % self.weight_sync_steps == 0
        if not due:
            return
        if self.background_push:
            self._push_in_background(model, version)
            return
        self._push(model, version)

    def publish(self, model: torch.nn.Module | None, version: int | None = None) -> None:
        """Push the weights now, tagged `version` (default: the trainer's), whatever the mode: e.g. the initial
        weights as version 0 at the start of a run, so servers that served an earlier run are reset."""
        version = self.train_model_version if version is None else version
        self._push(model, version)
        with self._cond:  # servers now hold exactly `version` (which may be older: a reset)
            self.train_model_version = max(self.train_model_version, version)
            self.rollout_model_version = version

    def _push(self, model: Any, version: int) -> None:
        start = time.perf_counter()
        if self.publisher is not None:
            self.publisher.push(model, version)
        with self._cond:
            self._last_push_s = time.perf_counter() - start
            self._pushes += 1
            self.rollout_model_version = max(self.rollout_model_version, version)
            if self.rollout_model_version == version:
                self._issued = 0
            self._cond.notify_all()

    def _push_in_background(self, model: torch.nn.Module | None, version: int) -> None:
        snapshot = _cpu_snapshot(model) if (model is not None and self.publisher is not None) else None
        with self._cond:
            self._pending = (snapshot, version)  # a newer snapshot replaces one not yet sent
            if self._push_thread is None or not self._push_thread.is_alive():
                self._push_thread = threading.Thread(target=self._push_loop, name="weight-push", daemon=True)
                self._push_thread.start()
            self._cond.notify_all()

    def _push_loop(self) -> None:
        while True:
            with self._cond:
                if self._pending is None or self._closed:
                    return
                snapshot, version = self._pending
                self._pending = None
            try:
                self._push(snapshot, version)
            except BaseException as err:  # surfaced to the trainer at its next step
                logger.error("Background weight push of version %d failed: %s", version, err)
                with self._cond:
                    self._push_error = err
                return

    def flush(self, timeout: float | None = None) -> None:
        """Wait until a background push (and the snapshot queued behind it) is published; raise its error."""
        thread = self._push_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._raise_push_error()

    def _raise_push_error(self) -> None:
        err, self._push_error = self._push_error, None
        if err is not None:
            raise RuntimeError(f"Publishing the weights failed: {err}") from err

    def stats(self) -> dict[str, float]:
        """`perf/weight_sync_s` (the last push), `weight_sync/pushes`, and both versions."""
        with self._cond:
            return {
                "perf/weight_sync_s": self._last_push_s,
                "weight_sync/pushes": float(self._pushes),
                "weight_sync/train_model_version": float(self.train_model_version),
                "weight_sync/rollout_model_version": float(self.rollout_model_version),
            }

    def close(self, timeout: float = 10.0) -> None:
        """Wake every waiting worker (their `acquire` returns -1); a background push in flight finishes, a snapshot
        queued behind it is dropped (`flush()` first to publish it)."""
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify_all()
            thread = self._push_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._raise_push_error()

    @property
    def closed(self) -> bool:
        return self._closed


class WeightSnapshot:
    """A model's weights copied to CPU under their checkpoint names (`iter_named_weights`, PEFT merged): what a
    background push publishes for a model on an accelerator."""

    def __init__(self, model: torch.nn.Module) -> None:
        from ..generation.weights import iter_named_weights

        self.named_weights = [
            (name, tensor.detach().to("cpu", copy=True)) for name, tensor in iter_named_weights(model)
        ]


def _cpu_snapshot(model: torch.nn.Module) -> torch.nn.Module | WeightSnapshot:
    """A copy of `model`'s weights that later optimizer steps do not touch: a deep copy of a CPU model, else a
    `WeightSnapshot` (no second copy on the accelerator)."""
    if all(p.device.type == "cpu" for p in model.parameters()):
        return copy.deepcopy(model)
    return WeightSnapshot(model)


class GenerationPublisher:
    """Publishes weights to `llm-trainer vllm-serve` servers over HTTP, tagged with the version.

    Full models go through `GenerationClient.update_weights` (bucketed, `chunk_bytes` per request); a PEFT model
    sends only its adapter (`update_lora_adapter`) when the client has that route. Several servers (scale-out) are
    updated one after another.

    Args:
        clients: one `GenerationClient` or several (one per server).
        timeout: `weight_sync_timeout`: seconds one server's update may take before `TimeoutError`.
        chunk_bytes: bucket size of full updates.
        lora_adapter_only: send only a PEFT model's adapter (no merge, no full sync) when possible.
    """

    def __init__(
        self,
        clients: Any,
        timeout: float | None = None,
        chunk_bytes: int = 256 * 2**20,
        lora_adapter_only: bool = True,
    ) -> None:
        self.clients = list(clients) if isinstance(clients, list | tuple) else [clients]
        if not self.clients:
            raise ValueError("GenerationPublisher needs at least one GenerationClient.")
        self.timeout, self.chunk_bytes, self.lora_adapter_only = timeout, chunk_bytes, lora_adapter_only

    def push(self, model: torch.nn.Module | WeightSnapshot, version: int) -> None:
        from accelerate.utils import is_peft_model

        from ..generation.weights import iter_named_weights

        for client in self.clients:
            try:
                if isinstance(model, WeightSnapshot):
                    _call(
                        client.update_weights,
                        iter(model.named_weights),
                        chunk_bytes=self.chunk_bytes,
                        version=version,
                        timeout=self.timeout,
                    )
                elif self.lora_adapter_only and is_peft_model(model) and hasattr(client, "update_lora_adapter"):
                    _call(client.update_lora_adapter, model, version=version, timeout=self.timeout)
                else:
                    _call(
                        client.update_weights,
                        iter_named_weights(model),
                        chunk_bytes=self.chunk_bytes,
                        version=version,
                        timeout=self.timeout,
                    )
                client.reset_prefix_cache()
            except TimeoutError as err:
                url = getattr(client, "base_url", "?")
                if url in str(err):
                    raise
                raise TimeoutError(
                    f"Pushing weights version {version} to the generation server at {url} exceeded "
                    f"weight_sync_timeout={self.timeout} s ({err})."
                ) from err


def _call(method: Any, *args: Any, **kwargs: Any) -> Any:
    """`method(*args, **kwargs)`, leaving out the keywords an older client does not take (`version`, `timeout`)."""
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return method(*args, **kwargs)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {key: value for key, value in kwargs.items() if key in params}
    return method(*args, **kwargs)
