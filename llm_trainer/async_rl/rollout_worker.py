"""Rollout workers: threads that draw prompts, generate completions on a generation server, score them and fill the
trajectory pool, gated by the weight-sync controller.

A worker that cannot generate (server down, request timeout) stops and keeps the error; the trainer's
`health_check` turns it into a `RuntimeError` naming the server. A reward function that raises drops only the
group it was scoring (logged, counted in `dropped_reward_errors`); the run goes on.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..data.formats import is_conversational
from ..generation.base import Generator, as_id_list
from ..generation.loop import tokenize_prompts
from .pool import PoolClosed, TrajectoryPool
from .trajectory import Trajectory
from .weight_sync import WeightSyncController

logger = logging.getLogger(__name__)

Scorer = Callable[[list[Trajectory]], Any]
"""`score(trajectories) -> rewards_per_func`: one list of rewards (one per reward function) per trajectory, or an
`(N, K)` tensor; None entries mean "not applicable" (NaN)."""

_group_ids = itertools.count()  # unique across workers: next() on a count is atomic under the GIL
_tokenizer_lock = threading.Lock()  # a fast tokenizer shared by worker threads can fail with "Already borrowed"


class PromptSource:
    """A thread-safe stream of `(prompt_index, row)` in the order of GRPO's `RepeatSampler(seed)`.

    Each epoch is a fresh permutation from one `torch.Generator` seeded with `seed` (as `RepeatSampler` across
    epochs), cut to a multiple of `batch_size` prompts (the trailing partial chunk is dropped, as the sampler
    does). A dataset without `__getitem__` (a stream) is read in order. `prompt_index` counts prompts drawn since
    the start, across epochs; `start_index` skips that many (resume).

    Args:
        dataset: rows (dicts), e.g. a `datasets.Dataset`.
        seed: the shuffle seed (the trainer's `seed`).
        shuffle: permute each epoch (`shuffle_dataset`).
        num_epochs: epochs to yield; None repeats forever.
        batch_size: prompts per generation batch (GRPO's `generation_batch_size // num_generations`).
    """

    def __init__(
        self,
        dataset: Any,
        seed: int,
        shuffle: bool = True,
        num_epochs: int | None = None,
        *,
        batch_size: int = 1,
        start_index: int = 0,
    ) -> None:
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be None (repeat forever) or >= 1, got {num_epochs}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.dataset, self.seed, self.shuffle, self.num_epochs = dataset, seed, shuffle, num_epochs
        self.batch_size = batch_size
        self._indexed = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
        if self._indexed and len(dataset) < batch_size:
            raise ValueError(
                f"The dataset has {len(dataset)} prompts, fewer than one generation batch ({batch_size} prompts): "
                "add prompts or lower the batch size."
            )
        self._generator = torch.Generator()
        self._generator.manual_seed(seed)
        self._lock = threading.Lock()
        self._epoch = 0
        self._order: list[int] = []
        self._iterator = None
        self._position = 0
        self.next_index = 0
        """The `prompt_index` of the next row."""
        self._exhausted = False
        if start_index:
            self._skip(start_index)

    def _new_epoch(self) -> bool:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            return False
        self._epoch += 1
        self._position = 0
        if self._indexed:
            n = len(self.dataset)
            order = torch.randperm(n, generator=self._generator).tolist() if self.shuffle else list(range(n))
            self._order = order[: n - n % self.batch_size]
            if n % self.batch_size:
                logger.info(
                    "Each epoch uses %d of the %d prompts (whole generation batches of %d).",
                    len(self._order),
                    n,
                    self.batch_size,
                )
        else:
            self._iterator = iter(self.dataset)
        return True

    def _next_row(self) -> dict | None:
        while True:
            if self._epoch == 0 and not self._new_epoch():
                return None
            if self._indexed:
                if self._position < len(self._order):
                    row = self.dataset[self._order[self._position]]
                    self._position += 1
                    return row
            else:
                row = next(self._iterator, None)
                if row is not None:
                    return row
            if not self._new_epoch():
                return None

    def _skip(self, n: int) -> None:
        """Advance past `n` prompts without reading them (a stream must be read)."""
        with self._lock:
            while n > 0:
                if self._indexed and self._epoch and self._position < len(self._order):
                    step = min(n, len(self._order) - self._position)
                    self._position += step
                elif self._next_row() is not None:
                    step = 1
                else:
                    self._exhausted = True
                    return
                n -= step
                self.next_index += step

    def take(self, k: int) -> list[tuple[int, dict]]:
        """The next `k` rows with their prompt indices; `StopIteration` when fewer than `k` are left (the tail is
        not split across requests: a group of rows is drawn whole or not at all)."""
        with self._lock:
            if self._exhausted:
                raise StopIteration
            rows = []
            for _ in range(k):
                row = self._next_row()
                if row is None:
                    self._exhausted = True
                    if rows:
                        logger.warning(
                            "The prompt stream ended with %d prompts short of a request of %d.", len(rows), k
                        )
                    raise StopIteration
                rows.append((self.next_index, dict(row)))
                self.next_index += 1
            return rows

    @property
    def exhausted(self) -> bool:
        return self._exhausted


def reward_scorer(
    reward_functions: Any,
    *,
    chat_template_kwargs: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    trainer_state: Any = None,
    log_metric: Callable[[str, float], None] | None = None,
    log_extra: Callable[[str, list], None] | None = None,
) -> Scorer:
    """A `Scorer` over a `RewardFunctions` (GRPO's reward functions, weights and keywords): the functions get the
    group's prompts, completions, completion ids and every other dataset column, plus `trainer_state`,
    `log_metric` and `log_extra`, exactly as in `GRPOTrainer`."""

    def score(trajectories: list[Trajectory]) -> torch.Tensor:
        rows = [t.row for t in trajectories]
        columns = reward_functions.columns(rows, {}) | {
            "trainer_state": trainer_state,
            "log_extra": log_extra or (lambda column, values: None),
            "log_metric": log_metric or (lambda name, value: None),
        }
        return reward_functions.score(
            [t.prompt for t in trajectories],
            [t.completion for t in trajectories],
            [t.completion_ids for t in trajectories],
            columns,
            torch.device(device),
            chat_template_kwargs,
        )

    return score


class RolloutWorker:
    """One thread: acquire → draw prompts → generate `num_generations` completions each → score each group → put.

    Several workers may share a source, pool and controller (e.g. one per generation server).

    Args:
        name: the thread's name (logs, errors).
        source: the prompt stream.
        generator: a `Generator` for the server (e.g. `VLLMServerGenerator`); a reply's `model_version`, when the
            result carries one, tags the samples, else the version `acquire` returned.
        score: `Scorer`, called once per group.
        pool: where scored trajectories go.
        controller: gates generation by weights version.
        tokenizer: the policy's tokenizer (prompts in, completions out).
        num_generations: completions per prompt (one group).
        prompts_per_request: prompts (groups) per generation request.
        server_url: named in errors.
        eos_token_ids: ids that end a completion (a completion ending otherwise is `truncated`); default the
            tokenizer's eos and pad tokens.
        chat_template_kwargs: for conversational prompts.
    """

    def __init__(
        self,
        name: str,
        source: PromptSource,
        generator: Generator,
        score: Scorer,
        pool: TrajectoryPool,
        controller: WeightSyncController,
        *,
        tokenizer: Any,
        num_generations: int,
        prompts_per_request: int = 1,
        server_url: str | None = None,
        eos_token_ids: Sequence[int] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if num_generations < 1 or prompts_per_request < 1:
            raise ValueError(
                f"num_generations and prompts_per_request must be >= 1, got {num_generations} and "
                f"{prompts_per_request}."
            )
        self.name, self.source, self.generator, self.score = name, source, generator, score
        self.pool, self.controller, self.tokenizer = pool, controller, tokenizer
        self.num_generations, self.prompts_per_request = num_generations, prompts_per_request
        self.server_url = server_url or _url_of(generator)
        if eos_token_ids is None:
            eos_token_ids = as_id_list(tokenizer.eos_token_id) + as_id_list(tokenizer.pad_token_id)
        self.eos_token_ids = set(eos_token_ids)
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.last_heartbeat = time.monotonic()
        """When the worker last made progress (or started waiting on the pool or the controller)."""
        self.error: BaseException | None = None
        """The generation error that stopped the worker, if one did."""
        self.generated = 0
        """Trajectories generated."""
        self.dropped_reward_errors = 0
        """Trajectories dropped because a reward function raised on their group."""
        self.finished = False
        """The prompt stream ran out."""
        self._waiting = True  # blocked on the controller or the pool: not a stall
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the worker's thread."""
        if self._thread is not None:
            raise RuntimeError(f"Rollout worker {self.name} was already started.")
        self.last_heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"rollout-{self.name}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to stop, without waiting."""
        self._stop.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to stop and wait up to `timeout` s for it (a request in flight finishes first)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning(
                    "Rollout worker %s did not stop within %g s (a request is in flight).", self.name, timeout
                )

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check_health(self, stale_after_s: float) -> None:
        """Raise a `RuntimeError` naming the server when the worker stopped on an error, or when it has made no
        progress for `stale_after_s` seconds while generating or scoring (a hung server)."""
        if self.error is not None:
            raise RuntimeError(
                f"Rollout worker {self.name} (generation server at {self.server_url}) stopped on "
                f"{type(self.error).__name__}: {self.error}"
            ) from self.error
        idle = time.monotonic() - self.last_heartbeat
        if not self._waiting and self.alive and idle > stale_after_s:
            raise RuntimeError(
                f"Rollout worker {self.name} has made no progress for {idle:.0f} s (heartbeat_stale_after_s="
                f"{stale_after_s:g}): the generation server at {self.server_url} is not answering."
            )

    def metrics(self) -> dict[str, float]:
        return {
            "rollout/generated": float(self.generated),
            "rollout/dropped_reward_errors": float(self.dropped_reward_errors),
        }

    # ----------------------------------------------------------------------------------------------- loop
    def _run(self) -> None:
        per_request = self.num_generations * self.prompts_per_request
        try:
            while not self._stop.is_set():
                self._beat(waiting=True)
                version, granted = self.controller.acquire_samples(per_request, self._stop, unit=self.num_generations)
                if version < 0:
                    break
                try:
                    rows = self.source.take(granted // self.num_generations)
                except StopIteration:
                    self.controller.release(granted, version)
                    self.finished = True
                    break
                self._beat(waiting=False)
                trajectories = self._generate(rows, version)
                self._beat(waiting=False)
                kept = self._score_groups(trajectories, version)
                self._beat(waiting=True)
                if kept and not self._put(kept):
                    break
        except PoolClosed:
            pass
        except BaseException as err:  # a generation error is fatal: kept for the trainer's health check
            self.error = err
            logger.error("Rollout worker %s stopped (server %s): %s", self.name, self.server_url, err)
        finally:
            self._waiting = True

    def _beat(self, waiting: bool) -> None:
        self.last_heartbeat = time.monotonic()
        self._waiting = waiting

    def _put(self, trajectories: list[Trajectory]) -> bool:
        """Put into the pool, in slices so `stop()` is noticed; False once stopping."""
        while not self._stop.is_set():
            try:
                self.pool.put(trajectories, timeout=0.5)
                return True
            except TimeoutError:
                self._beat(waiting=True)
        return False

    def _generate(self, rows: list[tuple[int, dict]], version: int) -> list[Trajectory]:
        missing = [index for index, row in rows if "prompt" not in row]
        if missing:
            raise KeyError(f"the dataset rows {missing[:5]} have no 'prompt' column")
        prompts = [row["prompt"] for _, row in rows]
        with _tokenizer_lock:
            prompt_ids = tokenize_prompts(self.tokenizer, prompts, self.chat_template_kwargs)
        repeated = [list(ids) for ids in prompt_ids for _ in range(self.num_generations)]
        result = self.generator.generate(repeated)
        served = getattr(result, "model_version", None)
        model_version = version if served is None else int(served)
        if len(result.completion_ids) != len(repeated):
            raise RuntimeError(
                f"the server returned {len(result.completion_ids)} completions for {len(repeated)} requested"
            )
        with _tokenizer_lock:
            texts = self.tokenizer.batch_decode(result.completion_ids, skip_special_tokens=True)
        conversational = is_conversational({"prompt": prompts[0]})
        trajectories = []
        for p, (index, row) in enumerate(rows):
            group_id = next(_group_ids)
            for g in range(self.num_generations):
                i = p * self.num_generations + g
                ids = list(result.completion_ids[i])
                text = texts[i]
                trajectories.append(
                    Trajectory(
                        prompt_ids=repeated[i],
                        completion_ids=ids,
                        model_version=model_version,
                        group_id=group_id,
                        logprobs=None if result.logprobs is None else list(result.logprobs[i]),
                        prompt=row["prompt"],
                        completion=[{"role": "assistant", "content": text}] if conversational else text,
                        row=row,
                        truncated=not ids or ids[-1] not in self.eos_token_ids,
                        prompt_index=index,
                    )
                )
        self.generated += len(trajectories)
        return trajectories

    def _score_groups(self, trajectories: list[Trajectory], version: int) -> list[Trajectory]:
        kept = []
        for start in range(0, len(trajectories), self.num_generations):
            group = trajectories[start : start + self.num_generations]
            try:
                rewards = self.score(group)
                rewards = rewards.tolist() if isinstance(rewards, torch.Tensor) else [list(r) for r in rewards]
                if len(rewards) != len(group):
                    raise ValueError(f"the scorer returned {len(rewards)} reward rows for {len(group)} completions")
            except Exception as err:
                self.dropped_reward_errors += len(group)
                self.controller.release(len(group), version)
                logger.warning(
                    "Dropped the %d completions of prompt %d: scoring raised %s: %s (%d dropped so far).",
                    len(group),
                    group[0].prompt_index,
                    type(err).__name__,
                    err,
                    self.dropped_reward_errors,
                )
                continue
            for item, values in zip(group, rewards):
                item.rewards_per_func = [math.nan if v is None else float(v) for v in values]
            kept.extend(group)
        return kept


def _url_of(generator: Any) -> str:
    client = getattr(generator, "client", None)
    return getattr(client, "base_url", None) or getattr(generator, "base_url", None) or "(unknown)"
