"""`XPOTrainer`: Online DPO on (policy completion, reference completion) pairs plus XPO's exploration bonus."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback

from ..generation.loop import completion_logps
from ..losses.online_preference import xpo_loss
from .base_trainer import init_arguments
from .online_dpo_trainer import OnlineDPOTrainer
from .online_pairs import reference_for_generation, sample_against, scheduled, second_generator
from .reward_functions import RewardFunc
from .xpo_config import XPOConfig


class XPOTrainer(OnlineDPOTrainer):
    """Exploratory Preference Optimization: for each prompt, one completion from the policy and one from the
    reference policy, ranked by `reward_funcs` (or a pairwise `judge`); the loss is Online DPO's on that pair plus
    `alpha` times the policy's log-prob of the reference's completion (`alpha` and `beta` may change per epoch).

    Drop-in for TRL 1.13's `trl.experimental.xpo.XPOTrainer` (removed from TRL in 1.14): same arguments, dataset
    format (a 'prompt' column) and logged metrics (`loss/dpo`, `loss/xpo`, `objective/*`, `rewards/*`, `logps/*`,
    `val/model_contain_eos_token`, `val/ref_contain_eos_token`, `alpha`, `beta`). Generation uses `transformers`
    `generate` (the reference's completion cannot come from the policy's vLLM engine: `use_vllm` is refused).
    Arguments are `OnlineDPOTrainer`'s.
    """

    config_class = XPOConfig
    _name = "XPO"
    _tag_names = ["llm-trainer", "xpo"]

    def __init__(
        self,
        model: PreTrainedModel | torch.nn.Module | str,
        ref_model: PreTrainedModel | torch.nn.Module | None = None,
        reward_funcs: RewardFunc | list[RewardFunc] | None = None,
        args: XPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase] | None = None,
        peft_config: Any = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        judge: Any = None,
    ):
        super().__init__(**init_arguments(locals()))

    def check_inputs(self, args: XPOConfig, **inputs) -> None:
        if args.use_vllm:
            raise ValueError(
                f"{self._name} samples the second completion of each pair with `transformers` `generate` (from the "
                "reference policy); `use_vllm=True` is not supported. Set `use_vllm=False`."
            )
        super().check_inputs(args, **inputs)

    def finish_init(self, args: XPOConfig) -> None:
        super().finish_init(args)
        self.second_sampler = second_generator(self, args, unwrap=lambda: reference_for_generation(self))

    @property
    def alpha(self) -> float:
        """α for the current epoch (a list gives one per epoch, the last for later epochs)."""
        return scheduled(self.args.alpha, self.state.epoch)

    @property
    def beta(self) -> float:
        """β for the current epoch (a list gives one per epoch, the last for later epochs)."""
        return scheduled(self.args.beta, self.state.epoch)

    def compute_loss(self, model, inputs: list[dict[str, Any]], return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError(f"{type(self).__name__} does not return model outputs from `compute_loss`.")
        mode = "train" if self.model.training else "eval"
        size = len(inputs)
        texts, batch = sample_against(self, inputs, model, self.second_sampler)
        mask = batch.completion_mask
        eos = torch.tensor(self.eos_token_ids, device=batch.completion_ids.device)
        contains_eos = (torch.isin(batch.completion_ids, eos) & mask.bool()).any(dim=1)
        packed = getattr(self.args, "packed_forward", None)
        logps_of = functools.partial(completion_logps, autocast=self.accelerator.autocast, packed_forward=packed)
        logps = logps_of(model, batch)[0] * mask
        with torch.no_grad():
            unwrapped = self.accelerator.unwrap_model(model)
            reference = self.reference.model if self.reference.model is not None else model
            with self.reference.context(unwrapped):
                ref_logps = logps_of(reference, batch)[0] * mask
        rewards = self.pair_scores(inputs, texts, batch, contains_eos)
        if rewards is not None:
            policy_scores, ref_scores = rewards.split(size)
            policy_chosen = policy_scores >= ref_scores  # a tie chooses the policy's completion, as TRL does
            decided = torch.ones(size, dtype=torch.bool, device=rewards.device)
        else:
            second, decided = self.judge_pairs(inputs, texts)
            policy_chosen = ~second
            self._metrics[mode]["judge/undecided"].append(
                self.accelerator.gather_for_metrics((~decided).float()).mean().item()
            )
        seq, ref_seq = logps.sum(1), ref_logps.sum(1)
        beta, alpha = self.beta, self.alpha
        losses, dpo, bonus = xpo_loss(
            seq[:size],
            seq[size:],
            ref_seq[:size],
            ref_seq[size:],
            policy_chosen,
            beta=beta,
            alpha=alpha,
            loss_type=self.args.loss_type,
        )
        weights = decided.float()
        loss = (losses * weights).sum() / weights.sum().clamp(min=1.0)
        self.log_xpo(mode, logps, ref_logps, policy_chosen, dpo, bonus, contains_eos, rewards, beta, alpha)
        return loss

    def log_xpo(self, mode, logps, ref_logps, policy_chosen, dpo, bonus, contains_eos, rewards, beta, alpha) -> None:
        """TRL 1.13's XPO metrics."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        size = policy_chosen.size(0)
        with torch.no_grad():
            logps = logps.detach()
            seq, ref_seq = logps.sum(1), ref_logps.sum(1)
            metrics["loss/dpo"].append(gather(dpo.detach()).mean().item())
            metrics["loss/xpo"].append(gather(bonus.detach()).mean().item())
            if rewards is not None:
                policy_scores, ref_scores = rewards.split(size)
                metrics["objective/model_scores"].append(gather(policy_scores).mean().item())
                metrics["objective/ref_scores"].append(gather(ref_scores).mean().item())
                metrics["objective/scores_margin"].append(gather(policy_scores - ref_scores).mean().item())
            chosen = torch.where(policy_chosen, seq[:size], seq[size:])
            chosen_ref = torch.where(policy_chosen, ref_seq[:size], ref_seq[size:])
            rejected = torch.where(policy_chosen, seq[size:], seq[:size])
            rejected_ref = torch.where(policy_chosen, ref_seq[size:], ref_seq[:size])
            # TRL 1.13 logs the sum of the policy's and the reference's mean log-probs under these names
            metrics["logps/chosen"].append(gather(chosen.mean() + chosen_ref.mean()).mean().item())
            metrics["logps/rejected"].append(gather(rejected.mean() + rejected_ref.mean()).mean().item())
            chosen_rewards, rejected_rewards = beta * (chosen - chosen_ref), beta * (rejected - rejected_ref)
            metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
            metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
            kl = (seq - ref_seq).view(2, size).sum(0) / 2
            metrics["objective/kl"].append(gather(kl).mean().item())
            metrics["objective/entropy"].append(gather(-seq).mean().item())
            margins = chosen_rewards - rejected_rewards
            metrics["rewards/margins"].append(gather(margins).mean().item())
            metrics["rewards/accuracies"].append(gather((margins > 0).float()).mean().item())
            metrics["val/model_contain_eos_token"].append(gather(contains_eos[:size].float()).mean().item())
            metrics["val/ref_contain_eos_token"].append(gather(contains_eos[size:].float()).mean().item())
            metrics["alpha"].append(alpha)
            metrics["beta"].append(beta)
