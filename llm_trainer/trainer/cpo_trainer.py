"""Contrastive Preference Optimization (with SimPO and AlphaPO), drop-in for TRL 1.16's
`trl.experimental.cpo.CPOTrainer`."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..losses import cpo_loss
from .cpo_config import CPOConfig
from .reference_free_trainer import PairedForward, ReferenceFreePreferenceTrainer

__all__ = ["CPOTrainer"]


class CPOTrainer(ReferenceFreePreferenceTrainer):
    """CPO (Xu et al., 2024) and its relatives SimPO and AlphaPO: a reference-free preference loss plus `cpo_alpha` ×
    the NLL of the chosen completion. Same signature, dataset formats, metrics and numerics as TRL 1.16's experimental
    `CPOTrainer`.

    `loss_type` picks the preference loss (`sigmoid`, `hinge`, `ipo`, `simpo`; `alphapo` is `simpo` with
    `cpo_alpha=0`); `ipo` and `simpo` use per-token average log-probs, the others sums. Datasets: preference (`prompt`,
    `chosen`, `rejected`) or implicit-prompt preference, standard or conversational. Logged metrics:
    `rewards/{chosen,rejected,accuracies,margins}`, `logps/{chosen,rejected}`, `logits/{chosen,rejected}`,
    `nll_loss`.

    >>> from llm_trainer.experimental.cpo import CPOConfig, CPOTrainer
    >>> trainer = CPOTrainer(model="path/to/model", args=CPOConfig("out", loss_type="simpo"), train_dataset=dataset)
    >>> trainer.train()
    """

    config_class = CPOConfig
    _name = "CPO"
    _tag_names = ["cpo"]

    logits_include_last = True

    @property
    def average_logps(self) -> bool:
        return self.args.loss_type in ("ipo", "simpo")

    @property
    def nll_tokens(self) -> str | None:
        return "completion" if self.args.cpo_alpha != 0 else None

    def configure_tokenizer(self, model: PreTrainedModel, args: CPOConfig) -> None:
        """Pad with the tokenizer's pad token, mirrored onto the model's configs (as TRL's CPO does)."""
        self.padding_value = self._tokenizer.pad_token_id
        model.config.get_text_config().pad_token_id = self.padding_value
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = self.padding_value

    def preference_loss(self, forward: PairedForward) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        args = self.args
        out = cpo_loss(
            forward.chosen_logps,
            forward.rejected_logps,
            forward.nll_loss if args.cpo_alpha != 0 else None,
            beta=args.beta,
            loss_type=args.loss_type,
            label_smoothing=args.label_smoothing,
            simpo_gamma=args.simpo_gamma,
            alpha=args.alpha,
            cpo_alpha=args.cpo_alpha,
        )
        return out.loss, out.chosen_rewards, out.rejected_rewards, {}
