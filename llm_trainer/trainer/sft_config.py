"""Configuration for `SFTTrainer`: the fields and defaults of TRL 1.16's `SFTConfig`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from .base_config import OfflineConfig, check_choices, option, resolve_pad_to_multiple_of, shared

PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")
SFT_LOSS_TYPES = ("nll", "dft")


@dataclass
class SFTConfig(OfflineConfig):
    """Configuration for [`SFTTrainer`]; every other argument is a `transformers.TrainingArguments` field.

    Field names and defaults are TRL 1.16's, so a TRL script keeps working after swapping the import. Sequences
    longer than `max_length` are truncated (see `truncation_mode`); None disables truncation.
    """

    learning_rate: float = shared("learning_rate", 2e-5)
    router_aux_loss_coef: float | None = shared("router_aux_loss_coef", None)
    chat_template_path: str | None = shared("chat_template_path", None)

    # Dataset preparation
    dataset_text_field: str = option("text", "Column holding the text of LM datasets.")
    dataset_kwargs: dict[str, Any] | str | None = option(
        None, "Dataset preparation options; `{'skip_prepare_dataset': True}` skips tokenization."
    )
    eos_token: str | None = shared("eos_token", None)
    pad_token: str | None = shared("pad_token", None)
    truncation_mode: str = shared("truncation_mode", "keep_start")
    shuffle_dataset: bool = option(False, "Shuffle the dataset after preparation.")
    packing: bool = option(False, "Pack several sequences into each row of length `max_length`.")
    packing_strategy: str = option(
        "bfd",
        "'bfd' (best-fit decreasing, truncates long sequences), 'bfd_split' (splits them instead) or 'wrapped' "
        "(concatenate and cut, sequences may attend across boundaries).",
        choices=list(PACKING_STRATEGIES),
    )
    padding_free: bool = option(False, "Flatten each batch into one row with per-sequence position ids (no padding).")
    pad_to_multiple_of: int | str | None = shared("pad_to_multiple_of", "auto")
    eval_packing: bool | None = option(None, "Pack the eval dataset; None follows `packing`.")

    # Training
    completion_only_loss: bool | None = option(
        None, "Train only on completion tokens; None means yes for prompt-completion datasets."
    )
    assistant_only_loss: bool = option(
        False, "Train only on assistant tokens (needs `{%% generation %%}` markers in the chat template)."
    )
    loss_type: str = option(
        "nll", "'nll' (cross-entropy) or 'dft' (Dynamic Fine-Tuning).", choices=list(SFT_LOSS_TYPES)
    )
    activation_offloading: bool = shared("activation_offloading", False)
    freeze_vision_tower: bool = shared("freeze_vision_tower", False)

    def __post_init__(self):
        super().__post_init__()
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of, self.device.type)
        if isinstance(self.dataset_kwargs, str):
            import json

            self.dataset_kwargs = json.loads(self.dataset_kwargs)
        if self.loss_type == "chunked_nll":
            warnings.warn(
                "`loss_type='chunked_nll'` is deprecated: 'nll' already never builds the full logits.",
                FutureWarning,
                stacklevel=3,
            )
            self.loss_type = "nll"
        if self.packing_strategy == "bfd-requeue":
            warnings.warn("`bfd-requeue` was renamed `bfd_split`.", FutureWarning, stacklevel=3)
            self.packing_strategy = "bfd_split"
        if self.truncation_mode == "keep_end":
            warnings.warn("`truncation_mode='keep_end'` is deprecated; use 'keep_start'.", FutureWarning, stacklevel=3)
        self._validate()

    def _validate(self) -> None:
        check_choices(self, "truncation_mode", "packing_strategy", "loss_type")
        if (self.packing or self.eval_packing) and self.max_length is None:
            raise ValueError("Packing needs a row length: set `max_length` (e.g. 1024) or turn `packing` off.")
