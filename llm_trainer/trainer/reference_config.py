"""Config fields of the trainers that score completions against a frozen reference policy (DPO, KTO)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import BaseConfig, resolve_pad_to_multiple_of


@dataclass
class ReferenceModelConfig(BaseConfig):
    """`BaseConfig` plus the reference-model, data and memory fields `DPOConfig` and `KTOConfig` share, with
    TRL 1.16's defaults, and their checks."""

    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of the MoE load-balancing loss; None uses the model config's own coefficient."},
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Disable dropout in the model and the reference model."}
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preparation."})
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
            "help": "Batch size for precomputing reference log-probs; None uses `per_device_train_batch_size` "
            "(training) or `per_device_eval_batch_size` (evaluation)."
        },
    )
    activation_offloading: bool = field(
        default=False, metadata={"help": "Offload saved activations to CPU memory during the forward pass."}
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={
            "help": "TR-DPO: every `ref_model_sync_steps` steps, move the reference model towards the policy by "
            "`ref_model_mixup_alpha`. Not compatible with PEFT or `precompute_ref_log_probs`."
        },
    )
    ref_model_mixup_alpha: float = field(
        default=0.6,
        metadata={"help": "TR-DPO α in π_ref ← α·π_θ + (1 − α)·π_ref; used with `sync_ref_model=True`."},
    )
    ref_model_sync_steps: int = field(
        default=512,
        metadata={"help": "TR-DPO τ: optimizer steps between reference syncs; used with `sync_ref_model=True`."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of, self.device.type)
        self._validate_reference()

    def _validate_reference(self) -> None:
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise ValueError(
                f"`precompute_ref_batch_size` must be a positive batch size or None, got "
                f"{self.precompute_ref_batch_size}."
            )
        if not self.sync_ref_model:
            return
        if self.precompute_ref_log_probs:
            raise ValueError(
                "`sync_ref_model=True` cannot be combined with `precompute_ref_log_probs=True`: the reference model "
                "changes during training, so precomputed log-probs would go stale. Set one of them to False."
            )
        if self.ref_model_sync_steps < 1:
            raise ValueError(f"`ref_model_sync_steps` must be at least 1 step, got {self.ref_model_sync_steps}.")
        if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"`ref_model_mixup_alpha` must lie in [0.0, 1.0], got {self.ref_model_mixup_alpha}.")
