"""Configuration for `PPOTrainer`: the fields and defaults of TRL 1.12's `trl.experimental.ppo.PPOConfig`, the last
TRL release with PPO (removed in 1.13)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base_config import BaseConfig, option, shared


@dataclass
class PPOConfig(BaseConfig):
    """Configuration for [`PPOTrainer`] (Ziegler et al., 2019, https://huggingface.co/papers/1909.08593).

    Field names and defaults are TRL 1.12's: `learning_rate=3e-6`, `num_ppo_epochs=4`, `num_mini_batches=1`,
    `response_length=53`, `temperature=0.7`, `kl_coef=0.05`, `kl_estimator="k1"`, `cliprange=0.2`, `vf_coef=0.1`,
    `cliprange_value=0.2`, `gamma=1.0`, `lam=0.95`. The batch-size fields (`world_size`, `local_batch_size`,
    `micro_batch_size`, `batch_size`, `local_mini_batch_size`, `mini_batch_size`, `num_total_batches`, and
    `total_episodes` when unset) are filled in by the trainer. Every other argument is a
    `transformers.TrainingArguments` field.
    """

    _inert_fields = {
        "sft_model_path": "TRL's example scripts read it; pass the policy to `PPOTrainer(model=...)` instead.",
    }

    learning_rate: float = shared("learning_rate", 3e-6)
    dataset_num_proc: int | None = shared("dataset_num_proc", None)
    num_mini_batches: int = option(
        1, "Number of mini-batches (one optimizer step each) to split a rollout batch into."
    )
    total_episodes: int | None = option(
        None, "Total number of episodes (prompts) to train on; unset means `num_train_epochs` epochs."
    )
    local_rollout_forward_batch_size: int = option(
        64, "Rows per generation call and per no-grad forward pass in the rollout phase, per process."
    )
    num_sample_generations: int = option(
        10,
        "Number of times sample completions of the eval dataset are generated and shown during training (0 disables "
        "them).",
    )
    response_length: int = option(53, "Maximum number of tokens generated per response.")
    stop_token: Literal["eos"] | None = option(
        None,
        "Stop token: 'eos' for the tokenizer's eos token, None for none (unless `stop_token_id` is set). Mutually "
        "exclusive with `stop_token_id`.",
    )
    stop_token_id: int | None = option(
        None,
        "Id of the token that ends a response; None for none (unless `stop_token` is set). Mutually exclusive with "
        "`stop_token`.",
    )
    temperature: float = option(0.7, "Sampling temperature.")
    missing_eos_penalty: float | None = option(
        None,
        "Subtracted from the score of responses without an eos token, to encourage responses shorter than "
        "`response_length`. Must be positive.",
    )
    sft_model_path: str = option("EleutherAI/pythia-160m", "Path to the SFT model (read by example scripts).")
    world_size: int | None = option(None, "Number of processes; set by the trainer.")
    num_total_batches: int | None = option(None, "Number of rollout batches to train on; set by the trainer.")
    micro_batch_size: int | None = option(None, "`per_device_train_batch_size` * `world_size`; set by the trainer.")
    local_batch_size: int | None = option(
        None,
        "Rollout batch per process: `per_device_train_batch_size` * `gradient_accumulation_steps`; set by the trainer.",
    )
    batch_size: int | None = option(
        None, "Rollout batch across processes: `local_batch_size` * `world_size`; set by the trainer."
    )
    local_mini_batch_size: int | None = option(None, "Mini-batch per process; set by the trainer.")
    mini_batch_size: int | None = option(None, "Mini-batch across processes; set by the trainer.")
    reward_model_path: str = option("EleutherAI/pythia-160m", "Path to the reward model (read by example scripts).")
    model_adapter_name: str | None = option(None, "Name of the PEFT adapter to train, when the model has several.")
    ref_adapter_name: str | None = option(
        None, "Name of the PEFT adapter to use as the reference; None disables the adapters instead."
    )
    num_ppo_epochs: int = option(4, "Number of passes of PPO updates over each rollout batch.")
    whiten_rewards: bool = option(False, "Whether to whiten the per-token rewards before computing advantages.")
    kl_coef: float = option(0.05, "Weight of the per-token KL penalty in the reward.")
    kl_estimator: Literal["k1", "k3"] = option(
        "k1",
        "KL estimator from http://joschu.net/blog/kl-approx.html: 'k1' (unbiased) or 'k3' (unbiased, lower variance).",
    )
    cliprange: float = option(0.2, "Clip range ε of the policy ratio.")
    vf_coef: float = option(0.1, "Weight of the value loss.")
    cliprange_value: float = option(0.2, "Clip range of the value predictions.")
    gamma: float = option(1.0, "Discount factor.")
    lam: float = option(0.95, "Lambda of generalized advantage estimation.")
    ds3_gather_for_generation: bool = shared("ds3_gather_for_generation", True)

    def __post_init__(self):
        super().__post_init__()
        if self.stop_token is not None and self.stop_token_id is not None:
            raise ValueError("You cannot set both `stop_token` and `stop_token_id`; keep one.")
        if self.stop_token not in (None, "eos"):
            raise ValueError(
                f"Unknown `stop_token` {self.stop_token!r}. Allowed values are 'eos' and None (no stop token); use "
                "`stop_token_id` for any other token."
            )
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(
                f"`kl_estimator` must be 'k1' (unbiased) or 'k3' (unbiased, lower variance), got {self.kl_estimator!r}. "
                "See http://joschu.net/blog/kl-approx.html."
            )
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(
                f"`missing_eos_penalty` must be positive (it is subtracted from the score), got "
                f"{self.missing_eos_penalty}."
            )
        for name in ("num_mini_batches", "num_ppo_epochs", "response_length", "local_rollout_forward_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
