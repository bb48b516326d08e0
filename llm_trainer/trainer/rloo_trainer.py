"""`RLOOTrainer`: REINFORCE Leave-One-Out, each completion's baseline being the mean reward of its siblings."""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import gather
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback

from ..generation.loop import OnlineBatch, configure_streaming
from ..losses import policy_gradient as pg
from . import online_rl, packed_rl
from .base_trainer import BaseTrainer, init_arguments
from .reward_functions import OnlineRL, RewardFunc
from .rloo_config import RLOOConfig
from .utils import identity


class RLOOTrainer(BaseTrainer):
    """Train a causal LM with RLOO: `num_generations` completions per prompt, the advantage of each being its reward
    (minus `beta` times its KL to the reference) minus the mean reward of the other completions of its prompt, with a
    clipped sequence-level importance ratio.

    Drop-in for TRL's `RLOOTrainer`: same arguments, dataset format, reward-function contract and logged metrics.
    See `GRPOTrainer` for the arguments and for vision-language models (`image` / `images` columns).
    """

    config_class = RLOOConfig
    loss_is_scaled_for_ga = False  # `compute_loss` returns a per-batch mean; `Trainer` divides it for accumulation
    _name = "RLOO"
    _tag_names = ["llm-trainer", "rloo"]
    _skip_nan_metrics = True
    dataset_description = "a dataset with a 'prompt' column"
    rollout_func = None

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
        super().__init__(**init_arguments(locals()))

    # ----------------------------------------------------------------------------------------------- set-up hooks
    def set_options(self, args: RLOOConfig, *, reward_funcs: Any, reward_processing_classes: Any = None) -> None:
        self._reward_source, self._reward_processing_source = reward_funcs, reward_processing_classes
        self.beta = args.beta

    def check_inputs(self, args: RLOOConfig, *, train_dataset: Any, eval_dataset: Any = None, **inputs: Any) -> None:
        online_rl.check_online_inputs("RLOOTrainer", args, train_dataset, eval_dataset, self._reward_source, None)
        self._eval_source = eval_dataset  # its images are checked once the model is loaded (`configure`)

    def reference_policy(self, model, ref_model, peft_config, args):
        return online_rl.online_reference(model, peft_config, args)

    def configure(self, model: PreTrainedModel, args: RLOOConfig, train_dataset: Any) -> None:
        self._vision_data = online_rl.check_vision_data(type(self).__name__, model, train_dataset, self._eval_source)
        configure_streaming(train_dataset, args)
        self.reward_functions = online_rl.online_reward_functions(
            args, self._reward_source, self._reward_processing_source, None, train_dataset
        )
        vars(self).update(online_rl.online_attributes(args, self.reward_functions))
        self.normalize_advantages = args.normalize_advantages
        self.reward_clip_range = args.reward_clip_range

    def default_collator(self, args: RLOOConfig) -> Any:
        return identity  # the rows reach `make_batch` as they are

    def logprob_head(self, args: RLOOConfig) -> dict[str, Any]:
        return {"temperature": args.temperature, "outputs": ("entropy",)}

    def finish_init(self, args: RLOOConfig) -> None:
        """The generation loop and the scoring collaborator (`online`); the sampling policy's log-probs are always
        kept: the KL penalty in the reward is measured on them."""
        packed_rl.check_trainer(self)
        self.online = OnlineRL.build(self, needs_old_logps=True)
        self.generation, self._logs = self.online.generation, self.online.logs
        online_rl.check_image_generation(self, self._vision_data)
        self.eos_token_ids = self.generation.eos_token_ids

    # ----------------------------------------------------------------------------------------------- rollouts
    def make_batch(self, rows: list[dict[str, Any]]) -> OnlineBatch:
        """Generate and score `rows`, and take RLOO's advantages."""
        scored = self.online.generate_and_score(rows, self.model, self.state, self)
        advantages, is_std_zero = self.advantages(scored.rewards_per_func, scored.batch, scored.num_generations)
        metrics = self.online.finish(scored, advantages, is_std_zero, self.state.global_step)
        self.record_generation(scored.mode, scored.tokens, metrics)
        return scored.batch

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self.accelerator.is_main_process and self.args.log_completions and self._logs["prompt"]:
            self.online.save_completions(self.args, self.state.global_step)

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

    def training_step(self, model, inputs, num_items_in_batch=None):  # TRL's signature
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs: OnlineBatch, return_outputs=False, num_items_in_batch=None):
        """RLOO's clipped sequence-level loss plus the MoE aux loss; the forward runs packed where the model allows
        it and, with `max_tokens_per_batch`, in token-budget chunks backpropagated here (`packed_rl.TokenBudget`)."""
        if return_outputs:
            raise ValueError("RLOOTrainer does not return model outputs from `compute_loss`.")
        mode = "train" if self.model.training else "eval"
        mask = inputs.completion_mask
        old_logps = (inputs.old_per_token_logps * mask).sum(1)
        advantages = inputs.advantages
        aux_weight = self.router_aux_weight(mode)
        coef_1 = None

        def objective(per_token_logps, entropies, aux_loss):
            nonlocal coef_1
            logps = (per_token_logps * mask).sum(1)
            loss, coef_1 = pg.rloo_loss(logps, old_logps, advantages, self.epsilon_low, self.epsilon_high)
            return loss + aux_weight * aux_loss if aux_weight and aux_loss is not None else loss

        forward = packed_rl.trainer_token_budget(self, model).run(
            model, inputs, objective, entropy=True, autocast=self.accelerator.autocast
        )
        metrics = self._metrics[mode]  # `coef_1` is the last `objective`'s: the whole micro-batch's
        if aux_weight and forward.aux_loss is not None:
            self.log_router_aux_loss(forward.aux_loss, mode)
        local = {"entropy": pg.masked_sum_count(forward.entropies.detach(), mask)}
        local |= pg.clip_metrics(coef_1, advantages, None, self.epsilon_low, self.epsilon_high, loss_type="grpo")
        for name, value in pg.reduce_metrics(
            local, lambda t: self.accelerator.reduce(t, reduction="sum"), gather
        ).items():
            metrics[name].append(value)
        return forward.loss
