"""Configuration for `KTOTrainer`: the fields and defaults of TRL 1.16's `KTOConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses import KTO_LOSS_TYPES
from .base_config import BaseConfig, resolve_pad_to_multiple_of

SAMPLING_STRATEGIES = ("random", "sequential", "group_by_length")


@dataclass
class KTOConfig(BaseConfig):
    """Configuration for [`KTOTrainer`]; every other argument is a `transformers.TrainingArguments` field.

    Field names and defaults are TRL 1.16's (`learning_rate=1e-6`, `beta=0.1`, `loss_type="kto"`,
    `train_sampling_strategy="sequential"`, ...), so a TRL script keeps working after swapping the import.
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial learning rate for AdamW."})
    train_sampling_strategy: str = field(
        default="sequential",
        metadata={
            "help": "Order of the training examples. The 'kto' loss needs 'sequential': each example's KL completion "
            "is its neighbour's within a fixed-order batch, which any other order breaks.",
            "choices": list(SAMPLING_STRATEGIES),
        },
    )

    # Model
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of the MoE load-balancing loss; None uses the model config's own coefficient."},
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Disable dropout in the model and the reference model."}
    )

    # Data
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preparation."})
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Maximum tokens of prompt + completion; longer sequences lose their end, and examples whose "
            "prompt alone fills it are dropped. None disables truncation."
        },
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto", metadata={"help": "Pad sequence lengths to a multiple of this value; 'auto' means None."}
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs of the whole dataset before training, so no reference model is "
            "kept in memory."
        },
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Batch size of the reference precomputation; None uses `per_device_train_batch_size` (train) "
            "and `per_device_eval_batch_size` (eval)."
        },
    )

    # Loss
    loss_type: str = field(
        default="kto",
        metadata={
            "help": "'kto' (KTO paper, Eq. 7, with the KL reference point) or 'apo_zero_unpaired' (unpaired APO-zero).",
            "choices": list(KTO_LOSS_TYPES),
        },
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "Strength of the tie to the reference model: higher β means less deviation from it."},
    )
    desirable_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the desirable examples' losses, to offset unequal desirable/undesirable counts."},
    )
    undesirable_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the undesirable examples' losses, to offset unequal desirable/undesirable counts."
        },
    )
    activation_offloading: bool = field(
        default=False, metadata={"help": "Offload saved activations to CPU memory during the forward pass."}
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={
            "help": "Every `ref_model_sync_steps` steps, mix the policy into the reference model (TR-DPO). Not "
            "compatible with PEFT or `precompute_ref_log_probs`."
        },
    )
    ref_model_mixup_alpha: float = field(
        default=0.6,
        metadata={"help": "α of the TR-DPO update π_ref = α·π_θ + (1 − α)·π_ref_prev (needs `sync_ref_model`)."},
    )
    ref_model_sync_steps: int = field(
        default=512,
        metadata={"help": "τ of TR-DPO: steps between two reference-model updates (needs `sync_ref_model`)."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of, self.device.type)
        self._validate()

    def _validate(self) -> None:
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"`loss_type` must be one of {KTO_LOSS_TYPES}, got {self.loss_type!r}.")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(
                f"`max_length` must be a positive number of tokens or None (no truncation), got {self.max_length}."
            )
        if self.beta <= 0:
            raise ValueError(f"`beta` must be positive (e.g. the default 0.1), got {self.beta}.")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError(
                "`desirable_weight` and `undesirable_weight` must be non-negative, got "
                f"{self.desirable_weight} and {self.undesirable_weight}."
            )
        if self.loss_type != "apo_zero_unpaired":
            if self.train_sampling_strategy != "sequential":
                raise ValueError(
                    f"`loss_type={self.loss_type!r}` estimates the KL term from each example's neighbour in a "
                    "fixed-order batch, so it needs `train_sampling_strategy='sequential'`, got "
                    f"{self.train_sampling_strategy!r}. Shuffle the dataset beforehand instead."
                )
            if self.per_device_train_batch_size <= 1:
                raise ValueError(
                    f"`loss_type={self.loss_type!r}` pairs each prompt with another example's completion within the "
                    "batch to estimate the KL term, so `per_device_train_batch_size` must be at least 2, got "
                    f"{self.per_device_train_batch_size}."
                )
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise ValueError(
                f"`precompute_ref_batch_size` must be positive or None, got {self.precompute_ref_batch_size}."
            )
        if self.sync_ref_model:
            if self.precompute_ref_log_probs:
                raise ValueError(
                    "`sync_ref_model=True` updates the reference model during training, which makes precomputed "
                    "reference log-probs stale: set `precompute_ref_log_probs=False` or `sync_ref_model=False`."
                )
            if not 0 < self.ref_model_mixup_alpha <= 1:
                raise ValueError(f"`ref_model_mixup_alpha` must be in (0, 1], got {self.ref_model_mixup_alpha}.")
            if self.ref_model_sync_steps < 1:
                raise ValueError(
                    f"`ref_model_sync_steps` must be a positive step count, got {self.ref_model_sync_steps}."
                )
