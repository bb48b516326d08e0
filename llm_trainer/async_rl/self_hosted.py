"""`SelfHostedGrpoTrainer`: GRPO on the asynchronous engine with the policy and its optimizer in this process.

Each step takes whole groups from the pool, prepares them with `prepare_grpo_batch` (old log-probs from the current
weights, reference log-probs for the KL, group advantages, importance-sampling correction of stale samples) and
takes one optimizer step on `grpo_loss`, in micro-batches when asked; the controller then publishes the weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..generation.loop import OnlineBatch, completion_logps
from ..losses import policy_gradient as pg
from ..modeling import add_token_logprob_head
from .grpo import DEFAULT_IMPORTANCE_SAMPLING, prepare_grpo_batch, slice_batch
from .rollout_worker import RolloutWorker
from .trainer_base import AsyncTrainer
from .trajectory import Trajectory


class SelfHostedGrpoTrainer(AsyncTrainer):
    """GRPO on pool batches with a local model and optimizer.

    Args:
        model: the policy (a causal LM); the log-prob head is installed at `temperature`.
        tokenizer: its tokenizer (the pad token id).
        batch_size: trajectories per optimizer step, a multiple of `num_generations`.
        max_steps: optimizer steps.
        num_generations: completions per prompt (group size).
        workers: the rollout workers.
        reward_weights: one per reward function (default: 1 each, from the first batch).
        reward_names: for the `rewards/<name>/*` metrics.
        optimizer: default `AdamW(model.parameters(), lr=learning_rate)`.
        learning_rate: the default optimizer's.
        loss_type, epsilon, epsilon_high, beta, scale_rewards, aggregation: GRPO's.
        ref_model: the KL reference when `beta != 0` (default: a frozen copy of the initial policy).
        importance_sampling: `{"mode", "clip_min", "clip_max"}` (GRPO's `vllm_importance_sampling_*`), None to turn
            the correction off.
        temperature: the sampling temperature (log-probs are computed at it, as GRPO does).
        micro_batch_size: rows per forward/backward (gradient accumulation within the step); default all.
        max_grad_norm: gradient clipping (None: none).
        max_completion_length: `dr_grpo`'s constant.
        mask_truncated_completions: GRPO's.
        heartbeat_stale_after_s, batch_timeout: see `AsyncTrainer`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        batch_size: int,
        max_steps: int,
        num_generations: int,
        workers: Sequence[RolloutWorker] = (),
        reward_weights: Sequence[float] | None = None,
        reward_names: Sequence[str] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        learning_rate: float = 1e-6,
        loss_type: str = "dapo",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        ref_model: torch.nn.Module | None = None,
        scale_rewards: str = "group",
        aggregation: str = "sum_then_normalize",
        importance_sampling: dict[str, Any] | None = DEFAULT_IMPORTANCE_SAMPLING,
        temperature: float = 1.0,
        micro_batch_size: int | None = None,
        max_grad_norm: float | None = 1.0,
        max_completion_length: int | None = None,
        mask_truncated_completions: bool = False,
        heartbeat_stale_after_s: float = 300.0,
        batch_timeout: float | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        super().__init__(batch_size, max_steps, workers, heartbeat_stale_after_s, batch_timeout)
        if num_generations < 1 or batch_size % num_generations:
            raise ValueError(
                f"batch_size={batch_size} must be a positive multiple of num_generations={num_generations} (a batch "
                "is whole groups of one prompt's completions)."
            )
        pg._check_choice("loss_type", loss_type, pg.GRPO_LOSS_TYPES)
        pg._check_choice("scale_rewards", scale_rewards, pg.SCALE_REWARDS)
        if loss_type == "dr_grpo" and not max_completion_length:
            raise ValueError("loss_type='dr_grpo' normalizes by max_completion_length: pass max_completion_length.")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be None (the whole batch) or >= 1, got {micro_batch_size}.")
        if importance_sampling is not None:
            unknown = set(importance_sampling) - {"mode", "clip_min", "clip_max"}
            if unknown:
                raise ValueError(
                    f"importance_sampling takes the keys 'mode', 'clip_min', 'clip_max'; got unknown {sorted(unknown)}."
                )
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            raise ValueError("The tokenizer has no pad token: set `tokenizer.pad_token` (e.g. to its eos token).")
        self._model, self.tokenizer, self.pad_token_id = model, tokenizer, pad_token_id
        self.num_generations = num_generations
        from accelerate.utils import is_peft_model

        peft = is_peft_model(model)
        add_token_logprob_head(
            model.get_base_model() if peft else model, temperature=temperature, outputs=("entropy",)
        )
        self.optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=learning_rate)
        self.reward_weights = None if reward_weights is None else list(reward_weights)
        self.reward_names = reward_names
        self.loss_type, self.beta = loss_type, beta
        self.epsilon_low, self.epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
        self.scale_rewards, self.aggregation = scale_rewards, aggregation
        self.importance_sampling = importance_sampling
        self.micro_batch_size, self.max_grad_norm = micro_batch_size, max_grad_norm
        self.max_completion_length = max_completion_length
        self.mask_truncated_completions = mask_truncated_completions
        self.autocast = autocast
        self.ref_model, self._ref_context = ref_model, None
        if beta != 0.0 and ref_model is None:
            if peft:  # the base model is the reference: no copy
                self._ref_context = model.disable_adapter
            else:
                import copy

                self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if self.ref_model is not None:
            add_token_logprob_head(self.ref_model, temperature=temperature, outputs=())
        self._batch_metrics: dict[str, float] = {}

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def _prepare_batch(self, trajectories: list[Trajectory]) -> OnlineBatch:
        """Old and reference log-probs, group advantages and the importance-sampling ratio of `trajectories`."""
        weights = self.reward_weights
        if weights is None:
            weights = [1.0] * len(trajectories[0].rewards_per_func or [])
        batch, metrics = prepare_grpo_batch(
            trajectories,
            self._model,
            pad_token_id=self.pad_token_id,
            num_generations=self.num_generations,
            reward_weights=weights,
            scale_rewards=self.scale_rewards,
            aggregation=self.aggregation,
            ref_model=self.ref_model if self.beta != 0.0 else None,
            ref_context=self._ref_context,
            importance_sampling=self.importance_sampling,
            current_version=self.version,
            reward_names=self.reward_names,
            logps_batch_size=self.micro_batch_size,
            mask_truncated_completions=self.mask_truncated_completions,
            autocast=self.autocast,
        )
        self._batch_metrics = metrics
        return batch

    def train(self, trajectories: list[Trajectory]) -> dict[str, float]:
        model = self._model
        batch = self._prepare_batch(trajectories)
        metrics = dict(self._batch_metrics)
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        rows = batch.prompt_ids.size(0)
        size = self.micro_batch_size or rows
        chunks = [(start, min(start + size, rows)) for start in range(0, rows, size)]
        scale = pg.loss_scale(batch.num_items_in_batch, 1, len(chunks), len(chunks), training=True)
        total_loss, kl_sum, entropy_sum, clip = 0.0, [], [], {}
        for start, stop in chunks:
            part = slice_batch(batch, start, stop)
            logps, entropies, _ = completion_logps(model, part, entropy=True, autocast=self.autocast)
            mask = part.loss_mask
            out = pg.grpo_loss(
                logps,
                part.old_per_token_logps,
                part.advantages,
                mask,
                loss_type=self.loss_type,
                epsilon_low=self.epsilon_low,
                epsilon_high=self.epsilon_high,
                beta=self.beta,
                ref_per_token_logps=part.ref_per_token_logps,
                importance_sampling_ratio=part.importance_sampling_ratio,
                sampling_per_token_logps=part.sampling_per_token_logps,
                max_completion_length=self.max_completion_length,
                accumulation_steps=scale.accumulation_steps,
                token_normalizer=scale.token_normalizer,
            )
            out.loss.backward()
            total_loss += out.loss.item()
            entropy_sum.append(pg.masked_sum_count(entropies.detach(), mask))
            if out.per_token_kl is not None:
                kl_sum.append(pg.masked_sum_count(out.per_token_kl.detach(), mask))
            for name, value in pg.clip_metrics(
                out.coef_1, part.advantages, mask, self.epsilon_low, self.epsilon_high, self.loss_type
            ).items():
                clip.setdefault(name, []).append(value)
        if not math.isfinite(total_loss):  # before the step: the weights stay usable
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"The GRPO loss is {total_loss} at step {self.version}: lower the learning rate.")
        if self.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
            metrics["grad_norm"] = float(grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        model.eval()
        metrics["loss"] = total_loss
        metrics.update(pg.reduce_metrics({"entropy": torch.stack(entropy_sum).sum(0)}))
        if kl_sum:
            metrics.update(pg.reduce_metrics({"kl": torch.stack(kl_sum).sum(0)}))
        for name, values in clip.items():
            merged = torch.cat(values) if name.endswith(("_min", "_max")) else sum(values)
            metrics.update(pg.reduce_metrics({name: merged}))
        return metrics
