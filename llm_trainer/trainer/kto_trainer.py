"""Kahneman-Tversky Optimization, drop-in for TRL 1.16's `KTOTrainer`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import DataCollator, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from transformers.trainer_utils import EvalPrediction

from ..data.collators import DataCollatorForVisionUnpairedPreference
from ..data.unpaired import DataCollatorForUnpairedPreference, recommend_loss_weights
from ..losses import kto_kl, kto_loss
from .base_trainer import init_arguments
from .kto_config import KTOConfig
from .unpaired_base import UnpairedForward, UnpairedPreferenceTrainer

__all__ = ["DataCollatorForUnpairedPreference", "DataCollatorForVisionUnpairedPreference", "KTOTrainer"]


class KTOTrainer(UnpairedPreferenceTrainer):
    """KTO (Ethayarajh et al., 2024) with the signature, dataset formats, metrics and numerics of TRL 1.16's
    `KTOTrainer`.

    Datasets: unpaired preference (`prompt`, `completion`, `label`, standard or conversational), or paired preference
    (`chosen` / `rejected`, with or without an explicit `prompt`), unpaired automatically. Every completion is scored
    by its summed log-prob ratio to the reference policy; the 'kto' loss compares it with a KL reference point
    estimated from mismatched pairs (each prompt with its batch neighbour's completion). The reference is `ref_model`,
    a frozen copy of the initial model, or with PEFT the model with its adapter disabled. Logged metrics: `kl`,
    `rewards/{chosen,rejected,margins}`, `logps/{chosen,rejected}`, `logits/{chosen,rejected}`, `entropy`,
    `num_tokens`.

    Vision-language models train on rows with an `image` or `images` column (conversational, TRL's zen-image
    formats; paired rows are unpaired too): the processor runs per batch, each row's images once, the vision encoder
    once per model and batch for both the completion and its KL completion. Precomputed reference log-probs work.

    >>> from llm_trainer import KTOConfig, KTOTrainer
    >>> trainer = KTOTrainer(model="path/to/model", args=KTOConfig("out"), train_dataset=dataset)
    >>> trainer.train()
    """

    config_class = KTOConfig
    _name = "KTO"
    _tag_names = ["kto"]
    supports_vision = True

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: PreTrainedModel | None = None,
        args: KTOConfig | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
    ):
        super().__init__(**init_arguments(locals()))

    def set_options(self, args: KTOConfig) -> None:
        self.calculate_kl = args.loss_type != "apo_zero_unpaired"

    @property
    def beta(self) -> float:
        return self.args.beta

    @property
    def calculate_KL(self) -> bool:  # noqa: N802 - TRL's name
        """Whether the loss estimates KL(policy || reference) on mismatched pairs (False for `apo_zero_unpaired`)."""
        return self.calculate_kl

    @calculate_KL.setter
    def calculate_KL(self, value: bool) -> None:  # noqa: N802 - TRL's name
        self.calculate_kl = value

    def _check_balance(self, labels: list[bool], args: KTOConfig) -> None:
        recommend_loss_weights(labels, args.desirable_weight, args.undesirable_weight)

    def unpaired_loss(
        self, forward: UnpairedForward, batch: dict[str, torch.Tensor], mode: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.calculate_kl:
            kl = kto_kl(forward.kl_logps, forward.ref_kl_logps, self.accelerator.gather_for_metrics)
        else:
            kl = torch.zeros(1, device=forward.chosen_logps.device)
        out = kto_loss(
            forward.chosen_logps,
            forward.rejected_logps,
            forward.ref_chosen_logps,
            forward.ref_rejected_logps,
            kl,
            beta=self.args.beta,
            loss_type=self.args.loss_type,
            desirable_weight=self.args.desirable_weight,
            undesirable_weight=self.args.undesirable_weight,
        )
        self._metrics[mode]["kl"].append(kl.item())
        return out.loss, out.chosen_rewards, out.rejected_rewards
