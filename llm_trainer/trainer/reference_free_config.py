"""The fields `ORPOConfig` and `CPOConfig` share (TRL 1.16 `trl.experimental.orpo` / `trl.experimental.cpo`)."""

from __future__ import annotations

from dataclasses import dataclass

from .base_config import ENCODER_DECODER_ONLY, OfflineConfig, option, shared


@dataclass
class ReferenceFreeConfig(OfflineConfig):
    """Base of the configs of the preference trainers without a reference model (ORPO, CPO / SimPO / AlphaPO).

    Differences from `TrainingArguments` besides `BaseConfig`'s: `learning_rate=1e-6`. A model given by name loads
    in the checkpoint's own dtype (`dtype="auto"`), as TRL's experimental trainers do, and its `revision` also picks
    the tokenizer. Completions are cut to fit `max_length`, prompts are kept whole; None means 512, with a warning.
    """

    _max_length_none = "512, as in TRL"
    _inert_fields = {"max_completion_length": ENCODER_DECODER_ONLY}

    learning_rate: float = shared("learning_rate", 1e-6)
    max_completion_length: int | None = shared("max_completion_length", None)
    packed_forward: bool | None = shared("packed_forward", None)
    beta: float = option(
        0.1,
        "Weight of the preference term: ORPO's λ (the odds-ratio term against the NLL term; `alpha` in the paper's "
        "code), CPO's inverse temperature (for `loss_type='ipo'`, the IPO paper's τ).",
    )
    disable_dropout: bool = shared("disable_dropout", True)
    generate_during_eval: bool = shared("generate_during_eval", False)
    is_encoder_decoder: bool | None = shared("is_encoder_decoder", None)

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"`beta` must be >= 0 (0.1 is TRL's default), got {self.beta}.")
