"""Configuration for `OnlineDPOTrainer`: the fields and defaults of TRL 1.16's `OnlineDPOConfig`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from .base_config import check_choices, check_number, option, shared
from .online_config import OnPolicyConfig

ONLINE_DPO_LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class OnlineDPOConfig(OnPolicyConfig):
    """Configuration for [`OnlineDPOTrainer`]: two completions per prompt sampled from the policy, ranked by reward
    functions or a pairwise judge, and the DPO loss on the (chosen, rejected) pair.

    Field names and defaults are TRL 1.16's (`learning_rate=5e-7`, `max_new_tokens=64`, `max_length=512`,
    `temperature=0.9`, `beta=[0.1]`, `loss_type="sigmoid"`, `disable_dropout=True`); the sampling and vLLM fields are
    shared with `GRPOConfig`. `max_new_tokens` sets `max_completion_length`. A `beta` list gives one value per
    epoch (the last one for later epochs).
    """

    _algorithm = "Online DPO"

    learning_rate: float = shared("learning_rate", 5e-7)
    disable_dropout: bool = shared("disable_dropout", True)
    reward_model_path: str | None = option(
        None, "Reward model (sequence classification) name or path, used when no `reward_funcs` are passed."
    )
    max_new_tokens: int = option(64, "Maximum number of tokens generated per completion.")
    max_length: int = option(
        512, "Maximum length of prompt plus completion in the loss forward; longer prompts lose their left end."
    )
    temperature: float = option(0.9, "Sampling temperature (higher is more random).")
    missing_eos_penalty: float | None = option(
        None, "Subtracted from the score of a completion that does not end with an eos token; None: no penalty."
    )
    beta: list[float] = option(
        [0.1], "KL coefficient of the DPO loss; a list gives one value per epoch (the last for later epochs)."
    )
    loss_type: str = option(
        "sigmoid",
        "'sigmoid' (DPO's log-sigmoid) or 'ipo' (squared distance to 1/(2β)).",
        choices=ONLINE_DPO_LOSS_TYPES,
    )
    reward_weights: list[float] | None = option(None, "One weight per reward function; None weighs every reward 1.0.")
    vllm_gpu_memory_utilization: float = option(
        0.55, "Fraction of GPU memory vLLM may take (colocate mode; pass it to the server otherwise)."
    )

    def __post_init__(self):
        if isinstance(self.beta, int | float) and not isinstance(self.beta, bool):
            self.beta = [self.beta]  # a number is accepted, as TRL does
        self.max_completion_length = self.max_new_tokens
        super().__post_init__()
        if isinstance(self.beta, list | tuple) and len(self.beta) == 1:
            self.beta = float(self.beta[0])
        check_number(self, "max_new_tokens", 1, "It is the number of tokens generated per completion.")
        check_choices(self, "loss_type")
        betas = self.beta if isinstance(self.beta, list | tuple) else [self.beta]
        if not betas or any(b <= 0 for b in betas):
            raise ValueError(f"`beta` must be positive (a number or a non-empty list of them), got {self.beta!r}.")
        if self.max_new_tokens >= self.max_length:
            warnings.warn(
                f"`max_new_tokens` ({self.max_new_tokens}) >= `max_length` ({self.max_length}): the loss forward "
                "truncates prompts from the left to fit `max_length`, so prompts may be cut entirely. Raise "
                "`max_length`.",
                UserWarning,
                stacklevel=3,
            )
