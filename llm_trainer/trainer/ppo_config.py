"""Configuration for `PPOTrainer`: the fields and defaults of TRL 1.12's `trl.experimental.ppo.PPOConfig`, the last
TRL release with PPO (removed in 1.13)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base_config import BaseConfig


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

    learning_rate: float = field(default=3e-6, metadata={"help": "The initial learning rate for AdamW."})
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Number of processes to use for processing the dataset."}
    )
    num_mini_batches: int = field(
        default=1, metadata={"help": "Number of mini-batches (one optimizer step each) to split a rollout batch into."}
    )
    total_episodes: int | None = field(
        default=None,
        metadata={"help": "Total number of episodes (prompts) to train on; unset means `num_train_epochs` epochs."},
    )
    local_rollout_forward_batch_size: int = field(
        default=64,
        metadata={"help": "Rows per generation call and per no-grad forward pass in the rollout phase, per process."},
    )
    num_sample_generations: int = field(
        default=10,
        metadata={
            "help": "Number of times sample completions of the eval dataset are generated and shown during training "
            "(0 disables them)."
        },
    )
    response_length: int = field(default=53, metadata={"help": "Maximum number of tokens generated per response."})
    stop_token: Literal["eos"] | None = field(
        default=None,
        metadata={
            "help": "Stop token: 'eos' for the tokenizer's eos token, None for none (unless `stop_token_id` is set). "
            "Mutually exclusive with `stop_token_id`."
        },
    )
    stop_token_id: int | None = field(
        default=None,
        metadata={
            "help": "Id of the token that ends a response; None for none (unless `stop_token` is set). Mutually "
            "exclusive with `stop_token`."
        },
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={
            "help": "Subtracted from the score of responses without an eos token, to encourage responses shorter than "
            "`response_length`. Must be positive."
        },
    )
    sft_model_path: str = field(
        default="EleutherAI/pythia-160m", metadata={"help": "Path to the SFT model (read by example scripts)."}
    )
    world_size: int | None = field(default=None, metadata={"help": "Number of processes; set by the trainer."})
    num_total_batches: int | None = field(
        default=None, metadata={"help": "Number of rollout batches to train on; set by the trainer."}
    )
    micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "`per_device_train_batch_size` * `world_size`; set by the trainer."},
    )
    local_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rollout batch per process: `per_device_train_batch_size` * `gradient_accumulation_steps`; set by "
            "the trainer."
        },
    )
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Rollout batch across processes: `local_batch_size` * `world_size`; set by the trainer."},
    )
    local_mini_batch_size: int | None = field(
        default=None, metadata={"help": "Mini-batch per process; set by the trainer."}
    )
    mini_batch_size: int | None = field(
        default=None, metadata={"help": "Mini-batch across processes; set by the trainer."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Whether to push the model to the Hub after training."})
    reward_model_path: str = field(
        default="EleutherAI/pythia-160m", metadata={"help": "Path to the reward model (read by example scripts)."}
    )
    model_adapter_name: str | None = field(
        default=None, metadata={"help": "Name of the PEFT adapter to train, when the model has several."}
    )
    ref_adapter_name: str | None = field(
        default=None,
        metadata={"help": "Name of the PEFT adapter to use as the reference; None disables the adapters instead."},
    )
    num_ppo_epochs: int = field(
        default=4, metadata={"help": "Number of passes of PPO updates over each rollout batch."}
    )
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Whether to whiten the per-token rewards before computing advantages."}
    )
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty in the reward."})
    kl_estimator: Literal["k1", "k3"] = field(
        default="k1",
        metadata={
            "help": "KL estimator from http://joschu.net/blog/kl-approx.html: 'k1' (unbiased) or 'k3' (unbiased, "
            "lower variance)."
        },
    )
    cliprange: float = field(default=0.2, metadata={"help": "Clip range ε of the policy ratio."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value predictions."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of generalized advantage estimation."})
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={
            "help": "DeepSpeed ZeRO-3: gather the policy weights for generation (faster); False generates with "
            "sharded weights, for models larger than one GPU."
        },
    )

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
