"""`GRPOTrainer`: Group Relative Policy Optimization and its variants (DAPO, Dr. GRPO, GSPO, CISPO, SAPO, ...)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from accelerate.utils import gather
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback

from ..environments.tools import ToolRollout, check_tool_template
from ..generation.loop import OnlineBatch, RolloutFunc, configure_streaming
from ..losses import policy_gradient as pg
from . import online_rl, packed_rl
from .base_trainer import BaseTrainer, init_arguments
from .grpo_config import GRPOConfig
from .reward_functions import OnlineRL, RewardFunc
from .utils import identity

ENTROPY_STATE_NAME = "entropy_ctrl_state.json"


class GRPOTrainer(BaseTrainer):
    """Train a causal LM with GRPO: sample `num_generations` completions per prompt, score them with reward functions,
    and push up the log-probability of completions better than their group's mean.

    Drop-in for TRL's `GRPOTrainer`: same arguments, dataset format (a "prompt" column, standard or conversational;
    other columns reach the reward functions as keywords), reward-function contract and logged metrics. The
    log-probs come from `llm_trainer.kernels` (the vocabulary-sized logits are never materialized).

    Vision-language models train as in TRL: with the model's processor as `processing_class` (loaded from the model
    when None), an `image` or `images` column puts each row's images into its conversational prompt
    (`prepare_multimodal_messages`; rows without images may be mixed in), the images go to generation (transformers,
    or colocated vLLM) and to every log-prob pass, and reward functions get the column as a keyword. The forwards run
    padded (no packing) and the fused head scores the language model's hidden states. `freeze_vision_tower=True`
    freezes the vision encoder and projector.

    Args:
        model: model id or path, or a loaded `PreTrainedModel` (or `PeftModel`).
        reward_funcs: a reward function, a sequence-classification model (or its id), or a list of them.
        args: the `GRPOConfig`; a default one is made when None.
        train_dataset / eval_dataset: datasets with a "prompt" column (an `IterableDataset` stream needs `max_steps`).
        processing_class: the tokenizer; loaded from the model when None.
        reward_processing_classes: tokenizers of the reward models (loaded from them when None).
        callbacks / optimizers: as for `transformers.Trainer`.
        peft_config: a `peft.PeftConfig` to train an adapter.
        quantization_config: passed to `from_pretrained` when `model` is a name or path.
        rollout_func: `f(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs", ...}` replacing generation;
            extra keys reach the reward functions; one declaring a `rows` parameter also gets the batch's dataset rows.
        tools: functions (sync or async, with type hints and a docstring) the model may call; each completion runs
            up to `args.max_tool_calling_iterations` rounds of tool calls, and the tool results are masked out of the
            loss (see `llm_trainer.environments.ToolRollout`).
        environment_factory: TRL's environments: a class or zero-argument callable making one (pooled) instance per
            rollout, or a `{name: factory}` dict picked by an 'environment' dataset column; the instance's public
            methods are the rollout's tools, `reset(**row)` may return text appended to the prompt, reward functions
            get `environments=[...]`, and a `get_reward` method adds a reward (see
            `llm_trainer.environments.EnvironmentToolRollout`). Without `train_dataset`, `max_steps` sets the length.
        environment: llm_trainer's multi-turn environments (not in TRL): an `EnvironmentInterface` class or factory,
            or an `EnvironmentRollout`; its rewards are added to `reward_funcs` (see `llm_trainer.environments`).
    """

    config_class = GRPOConfig
    loss_is_scaled_for_ga = True  # `compute_loss` divides by the accumulation steps (or the window's token count)
    _name = "GRPO"
    _tag_names = ["llm-trainer", "grpo"]
    _skip_nan_metrics = True
    dataset_description = "a dataset with a 'prompt' column"

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: RewardFunc | list[RewardFunc] | None = None,
        args: GRPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: list | None = None,
        rollout_func: RolloutFunc | None = None,
        environment_factory: Any = None,
        environment: Any = None,
    ):
        super().__init__(**init_arguments(locals()))

    # ----------------------------------------------------------------------------------------------- set-up hooks
    def set_options(self, args: GRPOConfig, *, reward_funcs=None, reward_processing_classes=None, **rollout) -> None:
        self.rollout_func, self._reward_source = online_rl.rollout_source(args, reward_funcs, **rollout)
        self._reward_processing_source = reward_processing_classes
        self.beta = args.beta

    def check_inputs(self, args: GRPOConfig, *, train_dataset: Any, eval_dataset: Any = None, **inputs: Any) -> None:
        online_rl.check_online_inputs(
            type(self).__name__, args, train_dataset, eval_dataset, self._reward_source, self.rollout_func
        )
        self._eval_source = eval_dataset  # its images are checked once the model is loaded (`configure`)

    def reference_policy(self, model, ref_model, peft_config, args):
        return online_rl.online_reference(model, peft_config, args)

    def configure(self, model: PreTrainedModel, args: GRPOConfig, train_dataset: Any) -> None:
        """The reward functions and the rollout's tools, and the settings TRL exposes as attributes."""
        self._vision_data = online_rl.check_vision_data(type(self).__name__, model, train_dataset, self._eval_source)
        self.tools = list(self.rollout_func.tools) if isinstance(self.rollout_func, ToolRollout) else []
        if self.tools:
            check_tool_template(self._tokenizer)
        configure_streaming(train_dataset, args)
        self.reward_functions = online_rl.online_reward_functions(
            args, self._reward_source, self._reward_processing_source, self.rollout_func, train_dataset
        )
        vars(self).update(online_rl.online_attributes(args, self.reward_functions))
        self.chat_template_kwargs = args.chat_template_kwargs or {}
        self.use_vllm = args.use_vllm
        self.loss_type = args.loss_type
        self.scale_rewards = args.scale_rewards
        self.multi_objective_aggregation = args.multi_objective_aggregation
        self.importance_sampling_level = args.importance_sampling_level
        self.top_entropy_quantile = args.top_entropy_quantile
        self.vllm_importance_sampling_correction = args.use_vllm and args.vllm_importance_sampling_correction
        self.entropy_coef = args.entropy_coef
        self.use_adaptive_entropy = args.use_adaptive_entropy
        self._entropy_bonus_enabled = self.entropy_coef != 0.0 or self.use_adaptive_entropy
        self._last_world_entropy = math.inf
        self._entropy_window: torch.Tensor | None = None

    def default_collator(self, args: GRPOConfig) -> Any:
        return identity  # the rows reach `make_batch` as they are

    def logprob_head(self, args: GRPOConfig) -> dict[str, Any]:
        fp32 = args.cast_lm_head_to_fp32
        return {"temperature": args.temperature, "outputs": ("entropy",), "cast_lm_head_to_fp32": fp32}

    def finish_init(self, args: GRPOConfig) -> None:
        """The generation loop and the scoring collaborator (`online`)."""
        packed_rl.check_trainer(self)
        if self.train_dataset is None:  # environments that write their prompts in `reset`
            self.train_dataset = online_rl.placeholder_dataset(self.rollout_func, args)
        self.online = OnlineRL.build(self, self.vllm_importance_sampling_correction)
        self.generation, self._logs = self.online.generation, self.online.logs
        online_rl.check_image_generation(self, self._vision_data)
        self.eos_token_ids = self.generation.eos_token_ids

    # ----------------------------------------------------------------------------------------------- rollouts
    def make_batch(self, rows: list[dict[str, Any]]) -> OnlineBatch:
        """Generate and score `rows`; the loss-token count, the vLLM importance-sampling ratio and the advantages."""
        scored = self.online.generate_and_score(rows, self.model, self.state, self)
        batch = scored.batch
        batch.num_items_in_batch = gather(batch.loss_mask.sum()).sum()
        if self.vllm_importance_sampling_correction:
            batch.importance_sampling_ratio = self._importance_sampling_ratio(batch)
        advantages, _, is_std_zero = pg.group_advantages(
            scored.rewards_per_func,
            self.reward_functions.weights.to(scored.rewards_per_func.device),
            scored.num_generations,
            scale_rewards=self.scale_rewards,
            aggregation=self.multi_objective_aggregation,
        )
        self.record_generation(
            scored.mode, scored.tokens, self.online.finish(scored, advantages, is_std_zero, self.state.global_step)
        )
        return batch

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self.accelerator.is_main_process and self.args.log_completions and self._logs["prompt"]:
            self.online.save_completions(self.args, self.state.global_step)

    def _importance_sampling_ratio(self, batch: OnlineBatch) -> torch.Tensor:
        """The vLLM importance-sampling correction (`exp(old - sampling)`, truncated or masked); logs how far the
        sampler's log-probs are from the trainer's."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        mask = batch.completion_mask.bool()
        old, sampling = batch.old_per_token_logps, batch.sampling_per_token_logps
        ratio = pg.vllm_importance_sampling_ratio(
            old,
            sampling,
            batch.completion_mask,
            args.vllm_importance_sampling_mode,
            args.vllm_importance_sampling_clip_min,
            args.vllm_importance_sampling_clip_max,
        )
        delta = (old - sampling).abs()[mask & ~torch.isnan(old - sampling)]
        flat = ratio.flatten() if ratio.size(1) == 1 else ratio[mask]
        zero = ratio.new_zeros(())
        stats = {
            "sampling/sampling_logp_difference/mean": (delta.mean() if delta.numel() else zero, torch.nanmean),
            "sampling/sampling_logp_difference/max": (delta.max() if delta.numel() else zero, pg.nanmax),
            "sampling/importance_sampling_ratio/min": (flat.min() if flat.numel() else zero, pg.nanmin),
            "sampling/importance_sampling_ratio/mean": (flat.mean() if flat.numel() else zero, torch.nanmean),
            "sampling/importance_sampling_ratio/max": (flat.max() if flat.numel() else zero, pg.nanmax),
        }
        for name, (value, reduce) in stats.items():
            self._metrics[mode][name].append(reduce(gather(value.reshape(1))).item())
        return ratio

    # ----------------------------------------------------------------------------------------------- loss
    def training_step(self, model, inputs, num_items_in_batch=None):  # TRL's signature
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs: OnlineBatch, return_outputs=False, num_items_in_batch=None):
        """GRPO's loss on a micro-batch (see `pg.grpo_loss`), minus the entropy bonus, plus the MoE aux loss; the
        forward runs packed where the model allows it and, with `max_tokens_per_batch`, in token-budget chunks that
        are backpropagated here (`packed_rl.TokenBudget`)."""
        if return_outputs:
            raise ValueError("GRPOTrainer does not return model outputs from `compute_loss`.")
        mode = "train" if self.model.training else "eval"
        mask = inputs.loss_mask
        advantages = inputs.advantages
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        training = mode == "train"
        scale = pg.loss_scale(
            inputs.num_items_in_batch,
            self.accelerator.num_processes,
            self.current_gradient_accumulation_steps if training else 1,
            self.args.steps_per_generation,
            training,
        )
        args = self.args
        coef = self._entropy_coef_now() if self._entropy_bonus_enabled else 0.0  # before this batch's update
        aux_weight = self.router_aux_weight(mode)
        entropy_mask, out = None, None

        def set_entropy_mask(entropies: torch.Tensor) -> None:
            nonlocal entropy_mask
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)

        def objective(per_token_logps, entropies, aux_loss):
            nonlocal out
            out = pg.grpo_loss(
                per_token_logps,
                inputs.old_per_token_logps,
                advantages,
                mask,
                loss_type=self.loss_type,
                epsilon_low=self.epsilon_low,
                epsilon_high=self.epsilon_high,
                delta=args.delta,
                importance_sampling_level=self.importance_sampling_level,
                beta=self.beta,
                ref_per_token_logps=inputs.ref_per_token_logps,
                use_bias_correction_kl=args.use_bias_correction_kl,
                sapo_temperature_pos=args.sapo_temperature_pos,
                sapo_temperature_neg=args.sapo_temperature_neg,
                vespo_k_pos=args.vespo_k_pos,
                vespo_lambda_pos=args.vespo_lambda_pos,
                vespo_k_neg=args.vespo_k_neg,
                vespo_lambda_neg=args.vespo_lambda_neg,
                importance_sampling_ratio=inputs.importance_sampling_ratio,
                off_policy_mask_threshold=args.off_policy_mask_threshold,
                sampling_per_token_logps=inputs.sampling_per_token_logps,
                entropy_mask=entropy_mask,
                max_completion_length=self.max_completion_length,
                accumulation_steps=scale.accumulation_steps,
                token_normalizer=scale.token_normalizer,
            )
            loss = out.loss
            if self._entropy_bonus_enabled:
                bonus = pg.entropy_bonus(entropies, mask, entropy_mask, accumulation_steps=scale.accumulation_steps)
                loss = loss - coef * bonus
            return loss + aux_weight * aux_loss if aux_weight and aux_loss is not None else loss

        forward = packed_rl.trainer_token_budget(self, model).run(
            model,
            inputs,
            objective,
            entropy=True,
            autocast=self.accelerator.autocast,
            prepare=set_entropy_mask if self.top_entropy_quantile < 1.0 else None,
        )
        entropies = forward.entropies.detach()  # `out` is the last `objective`: the whole micro-batch's
        metrics = self._metrics[mode]
        if self._entropy_bonus_enabled:
            effective = mask if entropy_mask is None else mask * entropy_mask
            if self.use_adaptive_entropy and training:
                self._update_entropy_coef(entropies, effective)
            if training and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
            metrics["policy_loss"].append(gather(out.policy_loss.reshape(1)).nanmean().item())
        if aux_weight and forward.aux_loss is not None:
            self.log_router_aux_loss(forward.aux_loss, mode)
        self._log_loss_metrics(out, entropies, advantages, mask, mode)
        return forward.loss

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """Bool `(B, T)` mask of the tokens whose entropy reaches the `threshold` quantile (in [0, 1]) of every
        process's unpadded entropies; padding is never selected. GRPO passes `1 - top_entropy_quantile`."""
        accelerator = self.accelerator

        def gather_all(local: torch.Tensor) -> torch.Tensor:
            # Lengths differ across processes: pad with a sentinel no entropy can take (they are >= 0), then drop it.
            sentinel = -1e9
            everyone = accelerator.gather(accelerator.pad_across_processes(local, dim=0, pad_index=sentinel))
            return everyone[everyone != sentinel]

        return pg.high_entropy_mask(entropies, mask, threshold, gather=gather_all)

    @staticmethod
    def get_off_policy_mask(
        advantages: torch.Tensor,
        per_token_logps: torch.Tensor,
        sampling_per_token_logps: torch.Tensor,
        mask: torch.Tensor,
        off_policy_threshold: float,
    ) -> torch.Tensor:
        """`(B, 1)` keep (1) / drop (0) mask of `off_policy_mask_threshold`: a sequence is dropped when its advantage
        is negative and its mean KL(sampler || policy) exceeds `off_policy_threshold` (see `losses.off_policy_mask`)."""
        return pg.off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold)

    @staticmethod
    def get_gamma_weights(
        advantages: torch.Tensor,
        log_ratio_per_token: torch.Tensor,
        mask: torch.Tensor,
        importance_sampling_ratio: torch.Tensor | None,
        k_pos: float = 2.0,
        lambda_pos: float = 3.0,
        k_neg: float = 3.0,
        lambda_neg: float = 2.0,
    ) -> torch.Tensor:
        """VESPO's detached `(B, 1)` gamma weights φ(w) of the sequence importance weight w (`loss_type="vespo"`;
        see `losses.vespo_gamma_weights`)."""
        return pg.vespo_gamma_weights(
            advantages, log_ratio_per_token, mask, importance_sampling_ratio, k_pos, lambda_pos, k_neg, lambda_neg
        )

    def _entropy_coef_now(self) -> float:
        """The entropy-bonus coefficient of this micro-batch. With `use_adaptive_entropy`, the coefficient steps by
        `entropy_coef_delta` towards keeping the window's entropy above `entropy_target` (updated at each optimizer
        step by `_update_entropy_coef`, applied from the next), and the bonus is on only while the last window's
        entropy is at most the target."""
        if self.use_adaptive_entropy:
            return self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        return self.entropy_coef

    def _update_entropy_coef(self, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        args = self.args
        stats = pg.masked_sum_count(entropies, mask).detach()
        self._entropy_window = stats if self._entropy_window is None else self._entropy_window + stats
        if not self.accelerator.sync_gradients:
            return
        total = self.accelerator.reduce(self._entropy_window, reduction="sum")
        self._last_world_entropy = (total[0] / total[1].clamp(min=1.0)).item()
        low = self._last_world_entropy <= args.entropy_target
        coef = self.entropy_coef + (args.entropy_coef_delta if low else -args.entropy_coef_delta)
        self.entropy_coef = min(max(coef, args.entropy_coef_min), args.entropy_coef_max)
        self._entropy_window = None

    def _log_loss_metrics(self, out, entropies, advantages, mask, mode: str) -> None:
        local = {"entropy": pg.masked_sum_count(entropies.detach(), mask)}
        if out.per_token_kl is not None:
            local["kl"] = pg.masked_sum_count(out.per_token_kl.detach(), mask)
        local |= pg.clip_metrics(out.coef_1, advantages, mask, self.epsilon_low, self.epsilon_high, self.loss_type)
        if out.phi_seq is not None:
            local["vespo/phi_seq_mean"] = pg.masked_sum_count(out.phi_seq, mask)
        reduced = pg.reduce_metrics(local, lambda t: self.accelerator.reduce(t, reduction="sum"), gather)
        for name, value in reduced.items():
            self._metrics[mode][name].append(value)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _save_extra_state(self, folder: str) -> None:
        super()._save_extra_state(folder)
        if self.use_adaptive_entropy and self.args.should_save:
            with open(os.path.join(folder, ENTROPY_STATE_NAME), "w") as f:
                json.dump({"entropy_coef": self.entropy_coef, "last_world_entropy": self._last_world_entropy}, f)

    def _load_extra_state(self, folder: str) -> None:
        super()._load_extra_state(folder)
        path = os.path.join(folder, ENTROPY_STATE_NAME)
        if self.use_adaptive_entropy and os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            self.entropy_coef, self._last_world_entropy = state["entropy_coef"], state["last_world_entropy"]
