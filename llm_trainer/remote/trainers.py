"""Trainers that run the asynchronous engine's loop against a remote training service (`llm-trainer train-serve`).

The loop (`llm_trainer.async_rl.AsyncTrainer`: pool → `train` → weight-sync controller) runs here; the model, its
gradients and the optimizer live on the service. A step is `forward_backward` + `optim_step`; publishing weights is
`save_weights_for_sampler` (`SamplerPublisher`, the controller's publisher), and rollout workers sample the newest
snapshot through `ServiceSamplingGenerator`.

- `RemoteApiTrainer`: the base; subclasses turn trajectories into `Datum`s (`_prepare_trajectories`).
- `RemoteApiGrpoTrainer`: GRPO's group advantages as `importance_sampling` or `ppo` data, scaled so the summed
  service loss equals GRPO's `dapo` loss (token sum over the batch's completion tokens).
- `RemoteApiCrossEntropyTrainer`: SFT (prompt/completion or text rows, or trajectories from the pool), the token
  mean of the completion tokens' cross-entropy, as `SFTTrainer`.

    client = ServiceClient("http://gpu-host:8100").create_lora_training_client("Qwen/Qwen2.5-0.5B", rank=16)
    trainer = RemoteApiGrpoTrainer(client, num_generations=8, batch_size=64, max_steps=100, loss_fn="ppo",
                                   adam_params=AdamParams(learning_rate=1e-5))
    trainer.attach_rollouts(dataset, reward_funcs, tokenizer, SamplingParams(max_tokens=256),
                            weight_sync_mode="batch-async", staleness_threshold=1, max_staleness=2)
    trainer.run()        # or start() / stop()

Not supported remotely: a KL penalty to a reference model (GRPO's `beta`), which would need a second model on the
service.
"""

from __future__ import annotations

import logging
import math
import threading
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..async_rl.rollout_worker import RolloutWorker
from ..async_rl.trainer_base import AsyncTrainer
from ..async_rl.trajectory import Trajectory
from ..generation.base import GenerationResult, Generator, check_prompts, consecutive_runs
from ..losses import policy_gradient as pg
from .client import SamplingClient, TrainingClient
from .types import AdamParams, Datum, ModelInput, SamplingParams

logger = logging.getLogger(__name__)

AdamSchedule = AdamParams | Callable[[int], AdamParams]
"""Fixed AdamW settings, or a function of the step index (0-based) returning them (a learning-rate schedule)."""


class SamplerPublisher:
    """The weight publisher of remote trainers: `push` snapshots the service's weights with
    `save_weights_for_sampler("{prefix}{version}")`; `path` and `version` name the newest snapshot.

    `timeout` bounds each save (TimeoutError naming the service and the timeout)."""

    def __init__(self, training_client: TrainingClient, prefix: str = "step-", timeout: float = 600.0) -> None:
        self.training_client, self.prefix, self.timeout = training_client, prefix, timeout
        self._lock = threading.Lock()
        self.path: str | None = None
        self.version = -1

    def push(self, model: Any, version: int) -> None:
        """Snapshot the service's current weights as `version` (`model` is unused: the weights live remotely)."""
        from concurrent.futures import TimeoutError as FutureTimeout

        future = self.training_client.save_weights_for_sampler(f"{self.prefix}{version}")
        try:
            path = future.result(timeout=self.timeout).path
        except FutureTimeout:
            raise TimeoutError(
                f"save_weights_for_sampler on the training service at {self.training_client.base_url} did "
                f"not finish within {self.timeout:g} s"
            ) from None
        with self._lock:
            self.path, self.version = path, version

    def latest(self) -> tuple[str | None, int]:
        """`(path, version)` of the newest snapshot (None, -1 before the first push)."""
        with self._lock:
            return self.path, self.version


class ServiceSamplingGenerator(Generator):
    """A `Generator` for rollout workers that samples the newest snapshot `publisher` made, through the service's
    `sample` route; results carry that snapshot's version as `model_version`.

    Identical consecutive prompts (one group) are one request with `num_samples`. `sampling_params.seed`, when set,
    is sent with every request (as GRPO's `generation_kwargs={"seed": ...}`)."""

    def __init__(self, sampling_client_factory: Callable[[str | None], SamplingClient], publisher: SamplerPublisher,
                 sampling_params: SamplingParams) -> None:  # fmt: skip
        self.factory, self.publisher, self.sampling_params = sampling_client_factory, publisher, sampling_params

    @property
    def base_url(self) -> str:
        return self.publisher.training_client.base_url

    def generate(self, prompt_ids: list[list[int]]) -> GenerationResult:
        check_prompts(prompt_ids)
        path, version = self.publisher.latest()
        client = self.factory(path)
        prompts, counts = consecutive_runs(prompt_ids)
        completions, logprobs = [], []
        for prompt, count in zip(prompts, counts):
            reply = client.sample(ModelInput.from_ints(prompt), count, self.sampling_params).result()
            completions += [seq.tokens for seq in reply.sequences]
            logprobs += [seq.logprobs for seq in reply.sequences]
        result = GenerationResult(completions, logprobs)
        result.model_version = max(version, 0)
        return result


def _datum(prompt_ids: Sequence[int], completion_ids: Sequence[int], **per_target: Sequence[float]) -> Datum:
    """A datum over `prompt + completion`: model_input = tokens[:-1], target_tokens = tokens[1:]; `per_target`
    values are given for the completion tokens only and are 0 on the prompt's targets."""
    tokens = list(prompt_ids) + list(completion_ids)
    pad = [0.0] * (len(prompt_ids) - 1) if prompt_ids else []
    inputs: dict[str, Any] = {"target_tokens": tokens[1:]}
    for name, values in per_target.items():
        values = list(values)
        inputs[name] = pad + (values if prompt_ids else values[1:])
    return Datum(ModelInput.from_ints(tokens[:-1]), inputs)


class RemoteApiTrainer(AsyncTrainer):
    """An `AsyncTrainer` whose step runs on a training service: `forward_backward(data, loss_fn)` then `optim_step`.

    Args:
        training_client: from `ServiceClient.create_training_client` / `create_lora_training_client`.
        batch_size, max_steps, workers, heartbeat_stale_after_s, batch_timeout: as `AsyncTrainer`.
        loss_fn: the service loss ("cross_entropy", "importance_sampling" or "ppo").
        loss_fn_config: its options (ppo: `clip_low_threshold`, `clip_high_threshold`).
        adam_params: `AdamParams`, or a function of the step index returning them.
        sampler_prefix: snapshots are named `{sampler_prefix}{version}`.
        request_timeout: seconds to wait for each service call (TimeoutError naming the service).

    `publisher` is the `SamplerPublisher` to give the `WeightSyncController`; `sampling_generator` a generator for
    rollout workers that samples its newest snapshot.
    """

    def __init__(
        self,
        training_client: TrainingClient,
        *,
        batch_size: int,
        max_steps: int,
        loss_fn: str,
        loss_fn_config: dict[str, float] | None = None,
        adam_params: AdamSchedule | None = None,
        workers: Sequence[RolloutWorker] = (),
        heartbeat_stale_after_s: float = 300.0,
        batch_timeout: float | None = None,
        sampler_prefix: str = "step-",
        request_timeout: float = 600.0,
    ) -> None:
        super().__init__(batch_size, max_steps, workers, heartbeat_stale_after_s, batch_timeout)
        self.training_client = training_client
        self.loss_fn, self.loss_fn_config = loss_fn, loss_fn_config
        self.adam_params = adam_params if adam_params is not None else AdamParams()
        self.request_timeout = request_timeout
        self.publisher = SamplerPublisher(training_client, sampler_prefix, request_timeout)

    def sampling_generator(self, sampling_params: SamplingParams) -> ServiceSamplingGenerator:
        """A generator sampling the newest published snapshot (the current weights before the first)."""
        http = self.training_client._http
        return ServiceSamplingGenerator(lambda path: SamplingClient(http, path), self.publisher, sampling_params)

    def initialize_workers(self) -> None:
        """Publish version 0 (so workers sample a named snapshot, never weights changing under them), then start
        the workers."""
        if not self._workers_started and self.workers and self.publisher.path is None:
            self.publisher.push(None, self.version)
        super().initialize_workers()

    def _result(self, future: Any, what: str) -> Any:
        from concurrent.futures import TimeoutError as FutureTimeout

        try:
            return future.result(timeout=self.request_timeout)
        except FutureTimeout:
            raise TimeoutError(
                f"{what} on the training service at {self.training_client.base_url} did not finish within "
                f"{self.request_timeout:g} s"
            ) from None

    def adam_params_for(self, step: int) -> AdamParams:
        return self.adam_params(step) if callable(self.adam_params) else self.adam_params

    @abstractmethod
    def _prepare_trajectories(self, trajectories: list[Trajectory]) -> list[Datum]:
        """The `Datum`s of one step; may record metrics in `self._batch_metrics`."""

    def train(self, trajectories: list[Trajectory]) -> dict[str, float]:
        """`forward_backward` on the step's data, then `optim_step`; returns `loss` (the summed service loss, already
        normalised by the data's weights/advantages), `grad_norm`, `learning_rate` and the batch's metrics."""
        self._batch_metrics: dict[str, float] = {}
        data = self._prepare_trajectories(trajectories)
        adam = self.adam_params_for(self.version)
        # one after the other: a failed forward_backward must not be followed by a step on no gradients
        out = self._result(
            self.training_client.forward_backward(data, self.loss_fn, self.loss_fn_config), "forward_backward"
        )
        stepped = self._result(self.training_client.optim_step(adam), "optim_step")
        return {
            "loss": out.metrics["loss:sum"],
            "grad_norm": stepped.metrics.get("grad_norm", math.nan),
            "learning_rate": adam.learning_rate,
            **self._batch_metrics,
        }


class RemoteApiGrpoTrainer(RemoteApiTrainer):
    """GRPO on a training service: group advantages (`losses.policy_gradient.group_advantages`) per completion token,
    sent as `importance_sampling` or `ppo` data with the generator's log-probs.

    Advantages are divided by the batch's completion-token count, so the summed service loss is GRPO's `dapo` loss:
    on-policy both are −Σ A·(tokens)/N with gradient −Σ A·∇logp / N; off-policy, `ppo` clips the ratio to the
    sampler at [1 − epsilon, 1 + epsilon_high] (GRPO's ε), `importance_sampling` weights by the unclipped ratio.
    Trajectories without generator log-probs are scored by the service first (`forward`: the on-policy case).

    Args:
        num_generations: completions per prompt; a batch is whole groups of them.
        loss_fn: "importance_sampling" (default) or "ppo".
        epsilon, epsilon_high: ppo's clipping range (`epsilon_high` None: `epsilon`).
        reward_weights: per reward function (default all 1).
        scale_rewards, multi_objective_aggregation: as `GRPOConfig`.
        mask_truncated_completions: completions that hit the length limit carry no loss and are left out of N (as
            GRPO's completion mask does).
        Others as `RemoteApiTrainer`.
    """

    def __init__(
        self,
        training_client: TrainingClient,
        *,
        num_generations: int,
        batch_size: int,
        max_steps: int,
        loss_fn: str = "importance_sampling",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        reward_weights: Sequence[float] | None = None,
        scale_rewards: str = "group",
        multi_objective_aggregation: str = "sum_then_normalize",
        mask_truncated_completions: bool = False,
        **kwargs: Any,
    ) -> None:
        if loss_fn not in ("importance_sampling", "ppo"):
            raise ValueError(f"loss_fn must be 'importance_sampling' or 'ppo' for GRPO, got {loss_fn!r}.")
        if num_generations < 1 or batch_size % num_generations:
            raise ValueError(
                f"batch_size={batch_size} must be a positive multiple of num_generations={num_generations} (whole "
                "groups per step)."
            )
        high = epsilon if epsilon_high is None else epsilon_high
        config = {"clip_low_threshold": 1.0 - epsilon, "clip_high_threshold": 1.0 + high} if loss_fn == "ppo" else None
        super().__init__(
            training_client,
            batch_size=batch_size,
            max_steps=max_steps,
            loss_fn=loss_fn,
            loss_fn_config=config,
            **kwargs,
        )
        self.num_generations = num_generations
        self.reward_weights = None if reward_weights is None else list(reward_weights)
        self.scale_rewards, self.multi_objective_aggregation = scale_rewards, multi_objective_aggregation
        self.mask_truncated_completions = mask_truncated_completions

    def attach_rollouts(
        self,
        dataset: Any,
        reward_funcs: Any,
        tokenizer: Any,
        sampling_params: SamplingParams,
        *,
        weight_sync_mode: str = "sync",
        staleness_threshold: int = 1,
        max_staleness: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 1,
        pool_size: int = 1024,
    ) -> None:
        """Wire the engine around this trainer: prompts from `dataset` (GRPO's order for `seed`), `num_workers`
        rollout workers sampling the service's newest snapshot, scored by `reward_funcs` (GRPO's reward functions:
        callables, or reward-model names), a grouped pool (dropping samples more than `max_staleness` versions old)
        and a weight-sync controller in `weight_sync_mode` publishing through `save_weights_for_sampler`. Then
        `run()` (or `start()`) trains."""
        from ..async_rl.pool import GroupedTrajectoryPool
        from ..async_rl.rollout_worker import PromptSource, reward_scorer
        from ..async_rl.weight_sync import WeightSyncController
        from ..trainer.reward_functions import RewardFunctions

        rewards = RewardFunctions(reward_funcs, self.reward_weights, None)
        source = PromptSource(dataset, seed, shuffle, batch_size=self.batch_size // self.num_generations)
        pool = GroupedTrajectoryPool(self.num_generations, pool_size, max_staleness)
        samples = self.batch_size if weight_sync_mode == "sync" else None
        run_ahead = {}  # generation runs at most max_staleness steps ahead (no sample generated only to be dropped)
        if weight_sync_mode != "sync" and max_staleness is not None:
            run_ahead = {"max_staleness": max_staleness, "samples_per_step": self.batch_size}
        controller = WeightSyncController(weight_sync_mode, staleness_threshold, self.publisher, samples, **run_ahead)
        generator = self.sampling_generator(sampling_params)
        self.workers = [
            RolloutWorker(f"remote-{i}", source, generator, reward_scorer(rewards), pool, controller,
                          tokenizer=tokenizer, num_generations=self.num_generations)
            for i in range(num_workers)
        ]  # fmt: skip
        self.set_module_references(pool, controller)

    def _grouped(self, trajectories: list[Trajectory]) -> list[Trajectory]:
        """Members of a group made consecutive (first-appearance order), each group exactly `num_generations`."""
        groups: dict[int, list[Trajectory]] = {}
        for t in trajectories:
            groups.setdefault(t.group_id, []).append(t)
        sizes = {gid: len(members) for gid, members in groups.items() if len(members) != self.num_generations}
        if sizes:
            raise ValueError(
                f"every group needs num_generations={self.num_generations} completions, got sizes {sizes}; feed the "
                "trainer from a GroupedTrajectoryPool"
            )
        return [t for members in groups.values() for t in members]

    def _prepare_trajectories(self, trajectories: list[Trajectory]) -> list[Datum]:
        trajectories = self._grouped(trajectories)
        if any(t.rewards_per_func is None for t in trajectories):
            raise ValueError("every trajectory needs rewards_per_func (score it before it reaches the trainer)")
        rewards_per_func = torch.tensor([t.rewards_per_func for t in trajectories], dtype=torch.float32)
        weights = (
            torch.ones(rewards_per_func.shape[1]) if self.reward_weights is None else torch.tensor(self.reward_weights)
        )
        advantages, rewards, zero_std = pg.group_advantages(
            rewards_per_func, weights, self.num_generations, self.scale_rewards, self.multi_objective_aggregation
        )
        kept = [not (self.mask_truncated_completions and t.truncated) for t in trajectories]
        num_tokens = sum(len(t.completion_ids) for t, keep in zip(trajectories, kept) if keep)
        normalizer = max(num_tokens, 1)

        logprobs = [t.logprobs for t in trajectories]
        missing = [i for i, lp in enumerate(logprobs) if lp is None and trajectories[i].completion_ids]
        if missing:  # on-policy: the service's own log-probs stand in for the sampler's
            probe = [_datum(trajectories[i].prompt_ids, trajectories[i].completion_ids) for i in missing]
            out = self._result(self.training_client.forward(probe), "forward")
            for i, result in zip(missing, out.loss_fn_outputs):
                logprobs[i] = result["logprobs"].tolist()[-len(trajectories[i].completion_ids) :]

        data = []
        for t, advantage, keep, lp in zip(trajectories, advantages.tolist(), kept, logprobs):
            n = len(t.completion_ids)
            if n == 0 or len(t.prompt_ids) + n < 2:
                continue  # nothing to train on
            if len(lp) != n:
                raise ValueError(f"a trajectory has {n} completion tokens but {len(lp)} generator log-probs")
            per_token = (advantage / normalizer) if keep else 0.0
            data.append(_datum(t.prompt_ids, t.completion_ids, logprobs=lp, advantages=[per_token] * n))
        lengths = [float(len(t.completion_ids)) for t in trajectories]
        self._batch_metrics = {
            "reward": torch.nanmean(rewards).item(),
            "reward_std": pg.nanstd(rewards).item() if len(trajectories) > 1 else 0.0,
            "frac_reward_zero_std": zero_std.float().mean().item(),
            "num_tokens": float(num_tokens),
            "completions/mean_length": sum(lengths) / len(lengths),
            "completions/max_length": max(lengths),
            "completions/clipped_ratio": sum(t.truncated for t in trajectories) / len(trajectories),
            "remote/logprobs_from_forward": float(len(missing)),
        }
        return data


class RemoteApiCrossEntropyTrainer(RemoteApiTrainer):
    """SFT on a training service: cross-entropy over the completion tokens (all tokens of text rows), weighted
    1/N with N the step's trained-token count, so the summed loss is `SFTTrainer`'s token-mean loss.

    Two ways to feed it: `fit()` reads `dataset` (rows as `SFTTrainer` takes them: prompt/completion or text,
    tokenized by the same preparation, `batch_size` rows per step, in order or shuffled with `seed`); or `run()`
    with a pool of trajectories (e.g. rejection sampling), whose completion tokens are trained on.

    Args:
        dataset: a `datasets.Dataset` of SFT rows (for `fit`).
        tokenizer: tokenizes `dataset`.
        max_length: truncation, as `SFTConfig.max_length`.
        completion_only_loss: train on completions only (prompt/completion rows), as `SFTConfig`.
        shuffle, seed: row order of `fit` (dataset order when `shuffle` is False).
        Others as `RemoteApiTrainer`.
    """

    def __init__(
        self,
        training_client: TrainingClient,
        *,
        batch_size: int,
        max_steps: int,
        dataset: Any = None,
        tokenizer: Any = None,
        max_length: int | None = 1024,
        completion_only_loss: bool = True,
        shuffle: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            training_client, batch_size=batch_size, max_steps=max_steps, loss_fn="cross_entropy", **kwargs
        )
        if dataset is not None and tokenizer is None:
            raise ValueError("a dataset needs its tokenizer: pass tokenizer= (the served model's)")
        self.dataset, self.tokenizer = dataset, tokenizer
        self.max_length, self.completion_only_loss = max_length, completion_only_loss
        self.shuffle, self.seed = shuffle, seed

    def rows_as_trajectories(self) -> list[Trajectory]:
        """`dataset` tokenized and masked as `SFTTrainer` prepares it, one trajectory per row (`row["labels"]` holds
        the loss mask: -100 where a token is not trained on)."""
        from ..data.sft import prepare_sft_dataset

        prepared = prepare_sft_dataset(
            self.dataset, self.tokenizer, max_length=self.max_length, completion_only_loss=self.completion_only_loss
        )
        trajectories = []
        for index, row in enumerate(prepared):
            ids, labels = list(row["input_ids"]), list(row["labels"])
            first = next((i for i, label in enumerate(labels) if label != -100), len(ids))
            trajectories.append(
                Trajectory(ids[:first], ids[first:], model_version=0, group_id=index, row={"labels": labels},
                           prompt_index=index)
            )  # fmt: skip
        return trajectories

    def fit(self) -> list[dict[str, float]]:
        """Train `max_steps` steps on `dataset` (epochs repeat it), without a pool; returns `history`."""
        if self.dataset is None:
            raise ValueError("fit() needs dataset= (or feed trajectories through a pool and run())")
        rows = self.rows_as_trajectories()
        generator = torch.Generator().manual_seed(self.seed)
        order: list[int] = []
        while self.version < self.max_steps and not self._stop.is_set():
            if not order:
                order = (
                    torch.randperm(len(rows), generator=generator).tolist() if self.shuffle else list(range(len(rows)))
                )
            batch, order = [rows[i] for i in order[: self.batch_size]], order[self.batch_size :]
            metrics = self.train(batch)
            self.version += 1
            metrics["step"] = float(self.version)
            self.history.append(metrics)
            self.on_step_end(metrics)
        return self.history

    def _prepare_trajectories(self, trajectories: list[Trajectory]) -> list[Datum]:
        masks = []
        for t in trajectories:
            tokens = list(t.prompt_ids) + list(t.completion_ids)
            labels = t.row.get("labels") if isinstance(t.row, dict) else None
            if labels is None or len(labels) != len(tokens):
                labels = [-100] * len(t.prompt_ids) + list(t.completion_ids)
            masks.append((tokens, [0.0 if label == -100 else 1.0 for label in labels[1:]]))
        num_tokens = sum(sum(mask) for _, mask in masks)
        if num_tokens == 0:
            raise ValueError("no trained token in this batch (every label is -100): nothing to learn from")
        data = [
            Datum(
                ModelInput.from_ints(tokens[:-1]),
                {"target_tokens": tokens[1:], "weights": [m / num_tokens for m in mask]},
            )
            for tokens, mask in masks
            if len(tokens) >= 2
        ]
        self._batch_metrics = {"num_tokens": float(num_tokens)}
        return data
