"""Config fields of the trainers that score completions against a frozen reference policy (DPO, KTO)."""

from __future__ import annotations

from dataclasses import dataclass

from .base_config import OfflineConfig, option, resolve_pad_to_multiple_of, shared


@dataclass
class ReferenceModelConfig(OfflineConfig):
    """`OfflineConfig` plus the reference-model and memory fields `DPOConfig` and `KTOConfig` share, with TRL 1.16's
    defaults, and their checks. Longer examples lose their end; those whose prompt alone fills `max_length` are
    dropped."""

    router_aux_loss_coef: float | None = shared("router_aux_loss_coef", None)
    disable_dropout: bool = shared("disable_dropout", True)
    pad_to_multiple_of: int | str | None = shared("pad_to_multiple_of", "auto")
    precompute_ref_log_probs: bool = shared("precompute_ref_log_probs", False)
    precompute_ref_batch_size: int | None = option(
        None,
        "Batch size for precomputing reference log-probs; None uses `per_device_train_batch_size` (training) or "
        "`per_device_eval_batch_size` (evaluation).",
    )
    activation_offloading: bool = shared("activation_offloading", False)
    packed_forward: bool | None = shared("packed_forward", None)
    sync_ref_model: bool = shared("sync_ref_model", False)
    ref_model_mixup_alpha: float = shared("ref_model_mixup_alpha", 0.6)
    ref_model_sync_steps: int = shared("ref_model_sync_steps", 512)

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
