"""Configuration for `DPOTrainer`: the fields and defaults of TRL 1.16's `DPOConfig`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..losses import DPO_LOSS_TYPES, F_DIVERGENCE_TYPES, check_dpo_options
from .base_config import check_choices, check_field_types, check_number, option, shared
from .reference_config import ReferenceModelConfig


@dataclass
class DPOConfig(ReferenceModelConfig):
    """Configuration for [`DPOTrainer`]; every other argument is a `transformers.TrainingArguments` field.

    Field names and defaults are TRL 1.16's (`learning_rate=1e-6`, `beta=0.1`, `loss_type=["sigmoid"]`,
    `max_length=1024`, ...), so a TRL script keeps working after swapping the import. `loss_type` may be one name or a
    list; it is stored as a list. Longer sequences are truncated (see `truncation_mode`); `max_length=None` disables
    truncation.
    """

    learning_rate: float = shared("learning_rate", 1e-6)

    # Data
    truncation_mode: str = shared("truncation_mode", "keep_start")
    padding_free: bool = option(
        False,
        "Flatten each batch into packed rows without padding: the same as `packed_forward=True` (TRL 1.16 "
        "temporarily disables it and pads; here it works, with any attention implementation that can pack).",
    )

    # Loss
    loss_type: list[str] = option(
        ["sigmoid"],
        f"DPO loss type, or a list of them combined with `loss_weights`. One of: {', '.join(DPO_LOSS_TYPES)}.",
    )
    loss_weights: list[float] | None = option(
        None, "One weight per loss type when combining several (e.g. [0.8, 0.2, 1.0] for MPO); None = 1.0."
    )
    ld_alpha: float | None = option(
        None,
        "LD-DPO α in [0, 1]: weight of the log-probs of the longer response's tokens beyond the shorter one's length. "
        "None (or 1.0) is plain DPO, 0.0 masks those tokens.",
    )
    f_divergence_type: str = option(
        "reverse_kl",
        "f-divergence regularizer (f-DPO): 'reverse_kl' (standard DPO), 'forward_kl', 'js_divergence' or "
        "'alpha_divergence'. A non-default value needs loss types built on the chosen − rejected difference: sigmoid, "
        "sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft.",
        choices=list(F_DIVERGENCE_TYPES),
    )
    f_alpha_divergence_coef: float = option(
        0.5, "α of the α-divergence, used when `f_divergence_type='alpha_divergence'`."
    )
    label_smoothing: float = option(
        0.0,
        "Label smoothing ε: the preference-flip probability of 'robust' (in [0, 0.5), e.g. 0.1), the ε of 'exo_pair' "
        "(must be > 0, e.g. 1e-3) and the conservative smoothing of 'aot'/'aot_unpaired'.",
    )
    beta: float = option(
        0.1, "β: how far the policy may move from the reference (higher stays closer). For 'ipo' it is the paper's τ."
    )
    use_weighting: bool = option(
        False, "Weight each pair by the policy's length-normalised sequence probabilities (WPO)."
    )
    discopop_tau: float = option(0.05, "τ of the 'discopop' loss (the paper's default).")

    # Deprecated
    pad_token: str | None = shared("pad_token", None)
    freeze_vision_tower: bool = shared("freeze_vision_tower", False)

    def __post_init__(self):
        check_field_types(self)  # before `loss_weights` is read below
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        if self.loss_weights is not None:
            self.loss_weights = [float(weight) for weight in self.loss_weights]
        if self.truncation_mode == "keep_end":
            warnings.warn("`truncation_mode='keep_end'` is deprecated; use 'keep_start'.", FutureWarning, stacklevel=3)
        super().__post_init__()
        self._validate()

    def _validate(self) -> None:
        check_dpo_options(
            self.loss_type,
            self.loss_weights,
            f_divergence_type=self.f_divergence_type,
            label_smoothing=self.label_smoothing,
            use_weighting=self.use_weighting,
        )
        if self.loss_type != ["sft"]:  # β scales every preference loss; the SFT term alone ignores it
            check_number(
                self,
                "beta",
                0,
                "β scales the preference margin: 0 gives no gradient and a negative value prefers the rejected "
                "completions. Use a positive value, e.g. 0.1 (the default).",
                exclusive=True,
            )
        check_choices(self, "truncation_mode")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(
                f"`ld_alpha` must lie in [0.0, 1.0] (1.0 = plain DPO, 0.0 = ignore the longer response's extra "
                f"tokens), got {self.ld_alpha}. Use None to turn LD-DPO off."
            )
