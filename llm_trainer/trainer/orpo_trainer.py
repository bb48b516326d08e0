"""Odds Ratio Preference Optimization, drop-in for TRL 1.16's `trl.experimental.orpo.ORPOTrainer`."""

from __future__ import annotations

import torch

from ..losses import odds_ratio_loss
from .orpo_config import ORPOConfig
from .reference_free_trainer import PairedForward, ReferenceFreePreferenceTrainer

__all__ = ["ORPOTrainer"]


class ORPOTrainer(ReferenceFreePreferenceTrainer):
    """ORPO (Hong et al., 2024): supervised fine-tuning on the chosen sequence plus an odds-ratio preference term, no
    reference model. Same signature, dataset formats, metrics and numerics as TRL 1.16's experimental `ORPOTrainer`.

    The loss is `nll_loss − β·mean(logσ(log_odds))`, where `nll_loss` covers the chosen prompt and completion and the
    odds use per-token average log-probs of the completions. Datasets: preference (`prompt`, `chosen`, `rejected`) or
    implicit-prompt preference (`chosen`, `rejected`), standard or conversational. Logged metrics:
    `rewards/{chosen,rejected,accuracies,margins}`, `logps/{chosen,rejected}`, `logits/{chosen,rejected}`,
    `nll_loss`, `log_odds_ratio`, `log_odds_chosen`.

    >>> from llm_trainer.experimental.orpo import ORPOConfig, ORPOTrainer
    >>> trainer = ORPOTrainer(model="path/to/model", args=ORPOConfig("out"), train_dataset=dataset)
    >>> trainer.train()
    """

    config_class = ORPOConfig
    _name = "ORPO"
    _tag_names = ["orpo"]

    average_logps = True
    nll_tokens = "sequence"  # ORPO's NLL covers the prompt too

    def preference_loss(self, forward: PairedForward) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        out = odds_ratio_loss(forward.chosen_logps, forward.rejected_logps, forward.nll_loss, beta=self.args.beta)
        extra = {"log_odds_ratio": out.log_odds_ratio, "log_odds_chosen": out.log_odds_chosen}
        return out.loss, out.chosen_rewards, out.rejected_rewards, extra
