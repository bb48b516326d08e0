"""`RLOOTrainer`: REINFORCE Leave-One-Out, each completion's baseline being the mean reward of its siblings."""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import gather
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback

from ..generation.loop import OnlineBatch
from ..losses import policy_gradient as pg
from .online_trainer import OnlineRLTrainer
from .reward_functions import RewardFunc
from .rloo_config import RLOOConfig


class RLOOTrainer(OnlineRLTrainer):
    """Train a causal LM with RLOO: `num_generations` completions per prompt, the advantage of each being its reward
    (minus `beta` times its KL to the reference) minus the mean reward of the other completions of its prompt, with a
    clipped sequence-level importance ratio.

    Drop-in for TRL's `RLOOTrainer`: same arguments, dataset format, reward-function contract and logged metrics.
    See `GRPOTrainer` for the arguments.
    """

    config_class = RLOOConfig
    loss_is_scaled_for_ga = False  # `compute_loss` returns a per-batch mean; `Trainer` divides it for accumulation
    _name = "RLOO"
    _tag_names = ["llm-trainer", "rloo"]
    needs_sampling_logps = True  # the KL penalty in the reward is measured on the sampling policy

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: RewardFunc | list[RewardFunc],
        args: RLOOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
    ):
        super().__init__(
            model,
            reward_funcs,
            args,
            train_dataset,
            eval_dataset,
            processing_class,
            reward_processing_classes,
            callbacks,
            optimizers,
            peft_config,
            quantization_config,
        )
        self.normalize_advantages = self.args.normalize_advantages
        self.reward_clip_range = self.args.reward_clip_range

    def advantages(self, rewards_per_func, batch, num_generations):
        """RLOO's advantages, the KL penalty (measured on the sampling policy, summed per sequence) charged to the
        rewards."""
        sequence_kl = None
        if self.beta != 0.0:  # first-order estimate (k1), summed over the sequence and charged to the reward
            mode = "train" if self.model.training else "eval"
            mask = batch.completion_mask
            kl = pg.rloo_sequence_kl(batch.old_per_token_logps, batch.ref_per_token_logps, mask)
            totals = self.accelerator.reduce(torch.stack([kl.sum(), mask.sum().float()]), reduction="sum")
            self._metrics[mode]["kl"].append((totals[0] / totals[1].clamp(min=1.0)).item())
            sequence_kl = gather(kl)
        rewards = pg.rloo_rewards(
            rewards_per_func,
            self.reward_functions.weights.to(rewards_per_func.device),
            reward_clip_range=self.reward_clip_range,
            beta=self.beta,
            sequence_kl=sequence_kl,
        )
        advantages = pg.rloo_advantages(rewards, num_generations, self.normalize_advantages)
        return advantages, pg.zero_std_groups(rewards, num_generations)

    def compute_loss(self, model, inputs: OnlineBatch, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("RLOOTrainer does not return model outputs from `compute_loss`.")
        mode = "train" if self.model.training else "eval"
        mask = inputs.completion_mask
        per_token_logps, entropies, aux_loss = self._logps(model, inputs, entropy=True)
        logps = (per_token_logps * mask).sum(1)
        old_logps = (inputs.old_per_token_logps * mask).sum(1)
        advantages = inputs.advantages
        loss, coef_1 = pg.rloo_loss(logps, old_logps, advantages, self.epsilon_low, self.epsilon_high)
        metrics = self._metrics[mode]
        if aux_loss is not None and self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        local = {"entropy": pg.masked_sum_count(entropies.detach(), mask)}
        local |= pg.clip_metrics(coef_1, advantages, None, self.epsilon_low, self.epsilon_high, loss_type="grpo")
        for name, value in pg.reduce_metrics(
            local, lambda t: self.accelerator.reduce(t, reduction="sum"), gather
        ).items():
            metrics[name].append(value)
        return loss
