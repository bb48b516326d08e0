"""Outcome reward-model training, drop-in for TRL 1.16's `RewardTrainer`."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import (
    AutoModelForSequenceClassification,
    DataCollator,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainingArguments,
)
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from transformers.trainer_utils import EvalPrediction

from ..data.chat_template import read_chat_template
from ..data.reward_dataset import DataCollatorForReward, prepare_reward_dataset
from ..losses import reward_model_loss, reward_model_metrics
from ..models import packed_attention
from .base_trainer import BaseTrainer, init_arguments
from .preference_forward import pack_rows
from .reward_config import RewardConfig
from .special_tokens import configure_special_tokens

__all__ = ["DataCollatorForPreference", "RewardTrainer", "suppress_seqcls_warning"]

DataCollatorForPreference = DataCollatorForReward
"""TRL's name for the reward collator (`trl.trainer.reward_trainer.DataCollatorForPreference`)."""


class RewardTrainer(BaseTrainer):
    """Bradley–Terry reward-model training with the signature, dataset formats, metrics and numerics of TRL 1.16's
    `RewardTrainer`.

    The model is a sequence classifier with one label (a name or path loads as
    `AutoModelForSequenceClassification(num_labels=1)`); it scores each whole sequence from its last non-padding
    token. Datasets: preference with an explicit (`prompt`, `chosen`, `rejected`) or implicit (`chosen`, `rejected`)
    prompt, standard or conversational, with an optional per-pair `margin`; or tokenized (`chosen_ids`,
    `rejected_ids`). Pairs longer than `max_length` are dropped. The loss is `−logσ(r_c − r_r − margin)`, plus
    `center_rewards_coefficient · mean((r_c + r_r)²)` when set. Logged metrics: `accuracy`, `margin`,
    `{min,mean,max}_reward`, `num_tokens`.

    With `packed_forward` (on by default where the model's attention supports it), each batch runs as one packed
    row: no padding, and the prompt a chosen and a rejected sequence share computed once. The score is read at the
    token transformers' sequence classifiers pick (the last one that is not the pad token), so the rewards are the
    padded forward's.

    >>> from llm_trainer import RewardConfig, RewardTrainer
    >>> trainer = RewardTrainer(model="path/to/model", args=RewardConfig("out"), train_dataset=dataset)
    >>> trainer.train()
    """

    config_class = RewardConfig
    _name = "Reward"
    _tag_names = ["reward-trainer"]
    loss_is_scaled_for_ga = False  # `compute_loss` returns a per-batch mean; `Trainer` divides it for accumulation
    dataset_description = "a preference dataset ('chosen' / 'rejected')"

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: RewardConfig | TrainingArguments | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        quantization_config: Any = None,
        peft_config: Any = None,
    ):
        super().__init__(**init_arguments(locals()))

    def check_inputs(self, args: RewardConfig, *, model, train_dataset, **inputs) -> None:
        super().check_inputs(args, train_dataset=train_dataset)
        if not isinstance(model, str) and getattr(model.config, "num_labels", None) != 1:
            raise ValueError(
                f"The model has `num_labels={model.config.num_labels}`, but reward models require `num_labels=1`: "
                "they output one score per sequence; load it with `num_labels=1`, or pass its name or path to have "
                "it loaded that way."
            )
        if args.n_gpu > 1:
            raise ValueError(
                "RewardTrainer does not support `nn.DataParallel` (several GPUs visible to one process): launch with "
                "`accelerate launch` or `torchrun`, or make one GPU visible with `CUDA_VISIBLE_DEVICES`."
            )

    def load_model(self, model: Any, args: RewardConfig, quantization_config: Any) -> PreTrainedModel:
        """A one-label sequence classifier; a causal LM checkpoint gets a new `score` head."""
        load_args = copy.copy(args)
        load_args.model_init_kwargs = {**(args.model_init_kwargs or {}), "num_labels": 1}
        with suppress_seqcls_warning():
            return self.prepare_model(model, load_args, quantization_config, AutoModelForSequenceClassification)

    def configure_tokenizer(self, model: PreTrainedModel, args: RewardConfig) -> None:
        # Sequence classification reads the score at the last token that is not padding: the model needs the pad id.
        configure_special_tokens(model, self._tokenizer, args.eos_token, args.pad_token)
        if args.chat_template_path is not None:
            self._tokenizer.chat_template = read_chat_template(args.chat_template_path)

    def configure(self, model: PreTrainedModel, args: RewardConfig, train_dataset: Any) -> None:
        """QLoRA: the adapters in bf16, as the paper recommends; whether the forward runs packed."""
        base = model.get_base_model() if is_peft_model(model) else model
        if is_peft_model(model) and (
            getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
        ):
            for name, param in model.named_parameters():
                if param.requires_grad and "lora_magnitude_vector" not in name:
                    param.data = param.data.to(torch.bfloat16)
        reason = None if _score_head(model) is not None else f"{type(base).__name__} has no `score` head"
        setting = getattr(args, "packed_forward", None)
        self._packed = packed_attention.prepare((model,), setting, "RewardConfig.packed_forward", reason)

    _packed = False
    """Whether the forward runs on packed rows (`packed_forward`)."""

    def default_collator(self, args: RewardConfig) -> DataCollatorForReward:
        return DataCollatorForReward(
            pad_token_id=self._tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of
        )

    def finish_init(self, args: RewardConfig) -> None:
        # Evaluation calls `compute_loss` only when the loss needs no labels.
        self.can_return_loss = True
        self.label_names = []

    def prepare_dataset(self, dataset, name: str, args: RewardConfig):
        return prepare_reward_dataset(
            dataset, self._tokenizer, max_length=args.max_length, num_proc=args.dataset_num_proc, name=name
        )

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        scores = self._packed_scores(model, inputs) if self._packed else None
        if scores is not None:
            outputs = SequenceClassifierOutputWithPast(logits=scores)
        else:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        chosen_rewards, rejected_rewards = outputs.logits.squeeze(-1).chunk(2)
        loss = reward_model_loss(
            chosen_rewards, rejected_rewards, inputs.get("margin"), self.args.center_rewards_coefficient
        )
        self._log_num_tokens(mode, inputs["attention_mask"].sum())
        metrics = self._metrics[mode]
        gathered = reward_model_metrics(chosen_rewards, rejected_rewards, gather=self.accelerator.gather_for_metrics)
        for key, value in gathered.items():
            metrics[key].append(value)
        return (loss, outputs) if return_outputs else loss

    def _packed_scores(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The `[rows, 1]` scores of a batch from one packed forward, or None when it must run padded (no pad token,
        not right-padded, or the scored token in the padding)."""
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        head = _score_head(self.model)
        pad_token_id = self.model.config.get_text_config().pad_token_id
        rows = pack_rows(input_ids, attention_mask, share_pairs=True) if pad_token_id is not None else None
        if rows is None:
            return None
        # transformers' choice: the rightmost token that is not the pad token (the first one if all are).
        columns = torch.arange(input_ids.size(1), device=input_ids.device)
        last = (columns * (input_ids != pad_token_id)).argmax(dim=-1)
        if bool((last >= rows.lengths).any()):
            return None
        captured: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            kwargs = packed_attention.forward_kwargs(rows.layout, input_ids.device)
            model(input_ids=rows.input_ids[None], **kwargs, use_cache=False)
        finally:
            handle.remove()
        scores = captured[-1].reshape(rows.total, -1)
        return scores.index_select(0, rows.index.gather(1, last[:, None]).squeeze(1))


@contextlib.contextmanager
def suppress_seqcls_warning() -> Iterator[None]:
    """Keep `from_pretrained` quiet about the two keys a causal LM checkpoint loaded as a sequence classifier always
    reports: the new `score` head (missing) and the unused `lm_head` (unexpected). A load report listing anything
    else is still logged. A context manager (TRL's name)."""
    modeling_logger = logging.getLogger("transformers.modeling_utils")
    quiet = _ExpectedSeqclsKeys()
    modeling_logger.addFilter(quiet)
    try:
        yield
    finally:
        modeling_logger.removeFilter(quiet)


def _score_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The per-token classification head (`score`) of a (PEFT) sequence classifier, None when it has none."""
    base = model.get_base_model() if is_peft_model(model) else model
    head = getattr(base, "score", None)
    return head if isinstance(head, torch.nn.Module) else None


class _ExpectedSeqclsKeys(logging.Filter):
    """Drops a `from_pretrained` load report whose rows are all `score.weight` MISSING or `lm_head.*` UNEXPECTED."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [line.split("|") for line in message.splitlines() if line.count("|") >= 2][1:]  # after the header
        expected = [
            (key.strip() == "score.weight" and status.strip() == "MISSING")
            or (key.strip().startswith("lm_head.") and status.strip() == "UNEXPECTED")
            for key, status, *_ in rows
        ]
        return not (expected and all(expected))
