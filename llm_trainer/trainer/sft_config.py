"""Configuration for `SFTTrainer`: the fields and defaults of TRL 1.16's `SFTConfig`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from .base_config import BaseConfig, resolve_pad_to_multiple_of

TRUNCATION_MODES = ("keep_start", "keep_end")
PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")
SFT_LOSS_TYPES = ("nll", "dft")


@dataclass
class SFTConfig(BaseConfig):
    """Configuration for [`SFTTrainer`]; every other argument is a `transformers.TrainingArguments` field.

    Field names and defaults are TRL 1.16's, so a TRL script keeps working after swapping the import.
    """

    learning_rate: float = field(default=2e-5, metadata={"help": "Initial learning rate for AdamW."})
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of the MoE load-balancing loss; None uses the model config's own coefficient."},
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={"help": "A `.jinja` file, or a tokenizer path whose chat template (and special tokens) to use."},
    )

    # Dataset preparation
    dataset_text_field: str = field(default="text", metadata={"help": "Column holding the text of LM datasets."})
    dataset_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Dataset preparation options; `{'skip_prepare_dataset': True}` skips tokenization."},
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preparation."})
    eos_token: str | None = field(
        default=None, metadata={"help": "Token appended to each text; defaults to the tokenizer's eos token."}
    )
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Deprecated. Set `tokenizer.pad_token` and pass it as `processing_class` instead."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Maximum tokenized length; longer sequences are truncated. None disables truncation."},
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Which end to keep when truncating.", "choices": list(TRUNCATION_MODES)},
    )
    shuffle_dataset: bool = field(default=False, metadata={"help": "Shuffle the dataset after preparation."})
    packing: bool = field(
        default=False, metadata={"help": "Pack several sequences into each row of length `max_length`."}
    )
    packing_strategy: str = field(
        default="bfd",
        metadata={
            "help": "'bfd' (best-fit decreasing, truncates long sequences), 'bfd_split' (splits them instead) or "
            "'wrapped' (concatenate and cut, sequences may attend across boundaries).",
            "choices": list(PACKING_STRATEGIES),
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Flatten each batch into one row with per-sequence position ids (no padding)."},
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto", metadata={"help": "Pad sequence lengths to a multiple of this value; 'auto' means None."}
    )
    eval_packing: bool | None = field(
        default=None, metadata={"help": "Pack the eval dataset; None follows `packing`."}
    )

    # Training
    completion_only_loss: bool | None = field(
        default=None,
        metadata={"help": "Train only on completion tokens; None means yes for prompt-completion datasets."},
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={"help": "Train only on assistant tokens (needs `{%% generation %%}` markers in the chat template)."},
    )
    loss_type: str = field(
        default="nll",
        metadata={"help": "'nll' (cross-entropy) or 'dft' (Dynamic Fine-Tuning).", "choices": list(SFT_LOSS_TYPES)},
    )
    activation_offloading: bool = field(
        default=False, metadata={"help": "Offload saved activations to CPU memory during the forward pass."}
    )

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
        if self.pad_token is not None:
            warnings.warn(
                "`pad_token` is deprecated: set `tokenizer.pad_token` and pass it as `processing_class` instead.",
                FutureWarning,
                stacklevel=3,
            )
        if self.truncation_mode == "keep_end":
            warnings.warn("`truncation_mode='keep_end'` is deprecated; use 'keep_start'.", FutureWarning, stacklevel=3)
        self._validate()

    def _validate(self) -> None:
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(
                f"`max_length` must be a positive number of tokens or None (no truncation), got {self.max_length}."
            )
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"`truncation_mode` must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}.")
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(f"`packing_strategy` must be one of {PACKING_STRATEGIES}, got {self.packing_strategy!r}.")
        if self.loss_type not in SFT_LOSS_TYPES:
            raise ValueError(f"`loss_type` must be one of {SFT_LOSS_TYPES}, got {self.loss_type!r}.")
        if (self.packing or self.eval_packing) and self.max_length is None:
            raise ValueError("Packing needs a row length: set `max_length` (e.g. 1024) or turn `packing` off.")
