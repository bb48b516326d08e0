"""TRL's public trainer helpers at TRL's path (`trl.trainer.utils`); each delegates to where it lives."""

from __future__ import annotations

import torch

from ..data.collators import pad
from ..data.sampling import RepeatSampler
from ..kernels import entropy_from_logits, selective_log_softmax
from ..losses.policy_gradient import nanmax, nanmin, nanstd

__all__ = [
    "RepeatSampler",
    "disable_dropout_in_model",
    "entropy_from_logits",
    "nanmax",
    "nanmin",
    "nanstd",
    "pad",
    "selective_log_softmax",
]


def disable_dropout_in_model(model: torch.nn.Module) -> None:
    """Set the probability of every dropout layer in `model` to 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
