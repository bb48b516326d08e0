"""Process reward modelling, with the API of TRL 1.13's `experimental.prm.PRMTrainer` (removed from TRL in 1.14)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import (
    AutoModelForTokenClassification,
    DataCollator,
    DataCollatorForTokenClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    TrainerCallback,
)
from transformers.trainer_utils import EvalPrediction

from ..data.stepwise import prepare_stepwise_dataset, tokenize_stepwise
from ..data.vision import refuse_image_columns
from .base_trainer import BaseTrainer, init_arguments
from .prm_config import PRMConfig
from .utils import compute_accuracy

__all__ = ["PRMTrainer", "compute_accuracy"]


class PRMTrainer(BaseTrainer):
    """Process reward model training with the signature, dataset format and defaults of TRL 1.13's `PRMTrainer`.

    Dataset: stepwise supervision, `prompt` (text), `completions` (list of step texts) and `labels` (one bool per
    step, True when the step is correct), or pre-tokenized `input_ids` / `labels`. Each step is followed by
    `step_separator` and its label sits on the step's last token, so a token-classification model
    (`AutoModelForTokenClassification`, 2 labels) learns to score every step; the loss is the model's own
    cross-entropy. `compute_metrics` defaults to `compute_accuracy` (step accuracy).

    >>> from llm_trainer import PRMConfig, PRMTrainer
    >>> model = AutoModelForTokenClassification.from_pretrained("path/to/model", num_labels=2)
    >>> trainer = PRMTrainer(model=model, args=PRMConfig("out"), processing_class=tokenizer, train_dataset=dataset)
    >>> trainer.train()
    """

    config_class = PRMConfig
    _name = "PRM"
    _tag_names = ["prm"]
    dataset_description = "the stepwise dataset to train on"

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        args: PRMConfig | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        model_init: Callable[[], PreTrainedModel] | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        peft_config: Any = None,
    ):
        super().__init__(**init_arguments(locals()))

    def finish_init(self, args: PRMConfig) -> None:
        if self.compute_metrics is None:
            self.compute_metrics = compute_accuracy

    def check_inputs(self, args: PRMConfig, *, model, model_init, train_dataset, **inputs) -> None:
        if model is None or model_init is not None:
            raise ValueError(
                "PRMTrainer needs `model` (a token-classification model, or its name/path); `model_init` is not "
                "supported."
            )
        super().check_inputs(args, train_dataset=train_dataset)

    def load_model(self, model: Any, args: PRMConfig, quantization_config: Any) -> PreTrainedModel:
        return self.prepare_model(model, args, auto_class=AutoModelForTokenClassification)

    def default_collator(self, args: PRMConfig) -> DataCollatorForTokenClassification:
        return DataCollatorForTokenClassification(self._tokenizer)

    def prepare_dataset(self, dataset: Dataset | IterableDataset, name: str, args: PRMConfig):
        """Tokenize a stepwise dataset into `input_ids` and per-token step `labels` (see `data.stepwise`)."""
        refuse_image_columns(dataset, "PRMTrainer", name)
        return prepare_stepwise_dataset(
            dataset,
            self._tokenizer,
            step_separator=args.step_separator,
            max_length=args.max_length,
            max_completion_length=args.max_completion_length,
            train_on_last_step_only=args.train_on_last_step_only,
            is_eval=name != "train",
            num_proc=args.dataset_num_proc,
            name=name,
        )

    @staticmethod
    def tokenize_row(
        features: dict[str, Any],
        tokenizer: PreTrainedTokenizerBase,
        step_separator: str,
        max_length: int | None,
        max_completion_length: int | None,
        train_on_last_step_only: bool,
        is_eval: bool,
    ) -> dict[str, list[int]]:
        """Tokenize one stepwise row into `input_ids` and per-token `labels` (see `data.stepwise.tokenize_stepwise`)."""
        return tokenize_stepwise(
            features, tokenizer, step_separator, max_length, max_completion_length, train_on_last_step_only, is_eval
        )
