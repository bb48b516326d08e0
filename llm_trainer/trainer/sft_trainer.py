"""Supervised fine-tuning, drop-in for TRL 1.16's `SFTTrainer`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import (
    DataCollator,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import EvalPrediction

from ..chat_template_utils import get_training_chat_template, is_chat_template_stop_token_trained
from ..data.chat_template import read_chat_template
from ..data.collators import DataCollatorForLanguageModeling, DataCollatorForVisionLanguageModeling
from ..data.formats import get_dataset_column_names, is_conversational
from ..data.sft import check_sft_dataset, check_vision_sft_options, has_generation_markers, prepare_sft_dataset
from ..data.vision import IMAGE_COLUMNS, check_vision_dataset
from ..models.selective_activation_checkpointing import enable_selective_activation_checkpointing
from ..models.vision import is_vision_model
from .base_trainer import BaseTrainer, gather_sum, init_arguments
from .sft_config import SFTConfig
from .special_tokens import configure_special_tokens

logger = logging.getLogger(__name__)

__all__ = ["DataCollatorForLanguageModeling", "DataCollatorForVisionLanguageModeling", "SFTTrainer"]


class SFTTrainer(BaseTrainer):
    """Supervised fine-tuning with the signature, dataset formats, metrics and numerics of TRL 1.16's `SFTTrainer`.

    Datasets: language modeling (`text` or `messages`), prompt-completion (standard or conversational, with the loss
    on the completion by default), or pre-tokenized (`input_ids`, optional `labels` / `completion_mask` /
    `assistant_masks`). The loss is computed from the hidden states by `llm_trainer.kernels`, so the
    `(batch, seq_len, vocab)` logits are never built. Logged metrics: `entropy`, `mean_token_accuracy`,
    `num_tokens`.

    Vision-language models (a processor as `processing_class`, or loaded with the model): a dataset with an `image`
    or `images` column is kept raw and `DataCollatorForVisionLanguageModeling` runs the processor on each batch
    (images into `pixel_values` & co., padding); rows without images may be mixed in. The loss still goes through
    the fused head on the language model's hidden states. No packing, padding-free batches or `keep_end`
    truncation with images, as in TRL.

    >>> from llm_trainer import SFTConfig, SFTTrainer
    >>> trainer = SFTTrainer(model="path/to/model", args=SFTConfig("out"), train_dataset=dataset)
    >>> trainer.train()
    """

    config_class = SFTConfig
    _name = "SFT"
    _tag_names = ["sft"]

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: SFTConfig | TrainingArguments | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        quantization_config: Any = None,
        peft_config: Any = None,
        formatting_func: Callable[[dict], str] | None = None,
    ):
        super().__init__(**init_arguments(locals()))

    # ----------------------------------------------------------------------------------------------- setup
    @property
    def padding_free(self) -> bool:
        """Whether batches are padding-free: `padding_free`, or packing with a best-fit-decreasing strategy."""
        args = self.args
        return args.padding_free or (args.packing and args.packing_strategy in ("bfd", "bfd_split"))

    _is_vision_dataset = False  # the training set has an image column (set by `check_inputs`)
    _processor: PreTrainedTokenizerBase | ProcessorMixin | None = None  # the processing class (tokenizer or processor)
    _model_is_vlm = False  # the policy has a vision tower (set by `configure`)

    def set_options(self, args: SFTConfig, formatting_func: Callable[[dict], str] | None = None) -> None:
        self._formatting_func = formatting_func

    def check_inputs(self, args, *, train_dataset, eval_dataset, data_collator, compute_loss_func, **inputs) -> None:
        """Reject datasets and option combinations that cannot work, naming the fix."""
        super().check_inputs(args, train_dataset=train_dataset)
        formatted = self._formatting_func is not None
        sample = check_sft_dataset(train_dataset, args.dataset_text_field, formatted=formatted)
        self._is_vision_dataset = any(column in sample for column in IMAGE_COLUMNS)
        if self._is_vision_dataset:
            check_vision_sft_options(args, sample, formatted)
        if self.padding_free and data_collator is not None:
            raise ValueError(
                "A custom `data_collator` cannot be used with padding-free batches (`padding_free` or bfd packing)."
            )
        if self.padding_free and not args.packing and args.max_length is not None:
            raise ValueError(
                "`padding_free=True` without packing does not truncate to `max_length`. Enable packing "
                "(`packing=True`), set `max_length=None`, or pass already truncated inputs."
            )
        if args.assistant_only_loss and not is_conversational(sample):
            raise ValueError(
                "`assistant_only_loss=True` needs a conversational dataset ('messages', or 'prompt'/'completion' "
                "as lists of messages); this one holds plain text."
            )
        completion_only = args.completion_only_loss
        if formatted and (completion_only or (completion_only is None and "completion" in sample)):
            if "input_ids" not in sample:
                raise ValueError(
                    "A `formatting_func` turns the dataset into plain text, which conflicts with completion-only loss. "
                    "Apply the function to the dataset yourself, or set `completion_only_loss=False`."
                )
        if args.loss_type == "dft" and compute_loss_func is not None:
            raise ValueError(
                "`compute_loss_func` cannot be combined with `loss_type='dft'`, which sets the loss itself."
            )
        if (args.dataset_kwargs or {}).get("skip_prepare_dataset", False) and not self._is_vision_dataset:
            self._check_skipped_preparation({"train": train_dataset, "eval": eval_dataset}, data_collator)
        if compute_loss_func is not None:
            warnings.warn(
                "`compute_loss_func` is deprecated (as in TRL): subclass `SFTTrainer` and override `compute_loss`. "
                "It needs the full logits, so each step runs an extra forward pass.",
                FutureWarning,
                stacklevel=4,
            )

    def prepare_processing_class(
        self,
        model: PreTrainedModel,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None,
        args: SFTConfig,
    ) -> PreTrainedTokenizerBase | ProcessorMixin:
        """As `BaseTrainer.prepare_processing_class`, keeping the result: the vision collator needs the processor."""
        self._processor = super().prepare_processing_class(model, processing_class, args)
        return self._processor

    def configure_tokenizer(self, model: PreTrainedModel, args: SFTConfig) -> None:
        """Special tokens and `chat_template_path`, then the template that masks assistant turns (see
        `_assistant_masking_template`). With images, the chat template is the processor's."""
        tokenizer = self._tokenizer
        configure_special_tokens(model, tokenizer, args.eos_token, args.pad_token)
        template_owner = self._processor if self._uses_vision_collator else tokenizer
        if args.chat_template_path is not None:
            template_owner.chat_template = read_chat_template(args.chat_template_path)
        if args.assistant_only_loss and not template_owner.chat_template:
            raise ValueError(
                f"`assistant_only_loss=True` needs a chat template; this {type(template_owner).__name__} has none. "
                "Set `chat_template_path`."
            )
        self.chat_template = self._assistant_masking_template(args, template_owner)

    @property
    def _uses_vision_collator(self) -> bool:
        """Whether batches are built by `DataCollatorForVisionLanguageModeling`: image data and a processor."""
        return self._is_vision_dataset and isinstance(self._processor, ProcessorMixin)

    def _check_vision_dataset(self, dataset: Any, name: str, model_is_vlm: bool) -> bool:
        """`check_vision_dataset` with SFT's columns; True when `dataset` holds images."""
        return check_vision_dataset(
            dataset,
            model_is_vlm=model_is_vlm,
            message_columns=["messages", self.args.dataset_text_field, "prompt", "completion"],
            trainer=type(self).__name__,
            dataset_name=name,
            image_token=getattr(self._processor, "image_token", None),
        )

    def configure(self, model: PreTrainedModel, args: SFTConfig, train_dataset: Any) -> None:
        """Selective checkpointing, and the loss on completions only for a prompt-completion dataset (TRL's
        default when `completion_only_loss` is None)."""
        self._configure_selective_checkpointing(model, args)
        self._model_is_vlm = is_vision_model(model)
        if self._is_vision_dataset:
            self._check_vision_dataset(train_dataset, "train", self._model_is_vlm)
            if not isinstance(self._processor, ProcessorMixin):
                raise ValueError(
                    f"The train dataset has images, but `processing_class` is a {type(self._processor).__name__}, which "
                    "cannot process them. Pass the model's processor (`AutoProcessor.from_pretrained(...)`), or leave "
                    "`processing_class` unset to load it with the model."
                )
        sample = next(iter(train_dataset))
        self.completion_only_loss = (
            "prompt" in sample and "completion" in sample
            if args.completion_only_loss is None
            else args.completion_only_loss
        )

    def default_collator(
        self, args: SFTConfig
    ) -> DataCollatorForLanguageModeling | DataCollatorForVisionLanguageModeling:
        if self._uses_vision_collator:
            return DataCollatorForVisionLanguageModeling(
                processor=self._processor,
                max_length=args.max_length,
                completion_only_loss=self.completion_only_loss,
                pad_to_multiple_of=args.pad_to_multiple_of,
                dataset_text_field=args.dataset_text_field,
                assistant_only_loss=args.assistant_only_loss,
                chat_template=self.chat_template,
            )
        return DataCollatorForLanguageModeling(
            pad_token_id=self._tokenizer.pad_token_id,
            padding_free=self.padding_free,
            pad_to_multiple_of=args.pad_to_multiple_of,
        )

    def logprob_head(self, args: SFTConfig) -> dict[str, Any]:
        return {"outputs": ("entropy", "is_top1")}

    @staticmethod
    def _configure_selective_checkpointing(model: PreTrainedModel, args: SFTConfig) -> None:
        """With `gradient_checkpointing_kwargs={"selective": True}`, make the model's checkpointing selective (attention
        outputs kept, the rest recomputed; `enable_selective_activation_checkpointing`) before `Trainer` turns it on.
        `selective` is not a `torch.utils.checkpoint` argument: otherwise it is dropped here."""
        checkpoint_kwargs = args.gradient_checkpointing_kwargs or {}
        if not checkpoint_kwargs.get("selective"):
            checkpoint_kwargs.pop("selective", None)
            return
        if not args.gradient_checkpointing:
            raise ValueError(
                "`gradient_checkpointing_kwargs={'selective': True}` requires `gradient_checkpointing=True`."
            )
        if checkpoint_kwargs.get("use_reentrant"):
            raise ValueError(
                "`gradient_checkpointing_kwargs={'selective': True}` requires non-reentrant gradient checkpointing. "
                "Set `use_reentrant` to `False`, or leave it unset."
            )
        enable_selective_activation_checkpointing(model)

    def _assistant_masking_template(self, args: SFTConfig, tokenizer) -> str | None:
        """For `assistant_only_loss`, the template to tokenize with when the tokenizer's has no generation markers: a
        training variant derived from it (rendering the same text, assistant turns marked), as TRL swaps in its
        training templates. Raises `ValueError` when none can be derived; warns when the end-of-turn token falls
        outside the assistant mask, since the model would then not learn to stop."""
        if not args.assistant_only_loss:
            return None
        template = None if has_generation_markers(tokenizer.chat_template) else get_training_chat_template(tokenizer)
        if not is_chat_template_stop_token_trained(tokenizer, chat_template=template):
            logger.warning(
                "The chat template does not include the assistant turn's end-of-turn token in the loss mask; the "
                "model may not learn to stop. Set `assistant_only_loss=False`, or edit the chat template so the "
                "end-of-turn token falls inside `{% generation %}...{% endgeneration %}`."
            )
        return template

    def prepare_dataset(self, dataset, name: str, args: SFTConfig):
        """Tokenize, mask, and truncate or pack `dataset`; a raw dataset passed to `evaluate` goes through it too.
        Vision datasets stay raw (checked only): the collator processes their images per batch."""
        if name != "train" and self._check_vision_dataset(dataset, name, self._model_is_vlm):
            if not self._uses_vision_collator:
                raise ValueError(
                    f"The {name} dataset has images but the train dataset has none, so batches are built by the "
                    "text collator, which cannot process them. Drop the image column of the evaluation set "
                    "(`dataset.remove_columns(...)`), or train on images too."
                )
            return dataset
        if self._uses_vision_collator:
            return dataset
        if (args.dataset_kwargs or {}).get("skip_prepare_dataset", False):
            return dataset
        packing = args.packing if name == "train" or args.eval_packing is None else args.eval_packing
        if name != "train":  # `check_inputs` checked the training set
            check_sft_dataset(dataset, args.dataset_text_field, name, formatted=self._formatting_func is not None)
        return prepare_sft_dataset(
            dataset,
            self._tokenizer,
            text_field=args.dataset_text_field,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            packing=packing,
            packing_strategy=args.packing_strategy,
            completion_only_loss=self.completion_only_loss,
            assistant_only_loss=args.assistant_only_loss,
            chat_template=self.chat_template,
            formatting_func=self._formatting_func,
            num_proc=args.dataset_num_proc,
            shuffle_seed=args.seed if args.shuffle_dataset else None,
            name=name,
        )

    def _check_skipped_preparation(self, datasets: dict[str, Any], data_collator: Any) -> None:
        """A skipped preparation never builds labels, so mask columns without `labels` would be silently ignored; and
        the default collator (`data_collator` None) needs `input_ids`, which a raw dataset lacks."""
        for name, dataset in datasets.items():
            for key, ds in dataset.items() if isinstance(dataset, dict) else [(name, dataset)]:
                columns = get_dataset_column_names(ds) if ds is not None else []
                if (
                    columns
                    and "input_ids" not in columns
                    and (data_collator is None or isinstance(data_collator, DataCollatorForLanguageModeling))
                ):
                    raise ValueError(
                        f"The {key} dataset has no 'input_ids' (columns: {sorted(columns)}), and "
                        "`dataset_kwargs={'skip_prepare_dataset': True}` skips tokenizing it. Drop "
                        "`skip_prepare_dataset`, pass a tokenized dataset, or a `data_collator` that tokenizes."
                    )
                if "labels" not in columns and {"completion_mask", "assistant_masks"} & set(columns):
                    raise ValueError(
                        f"The {key} dataset has mask columns but no 'labels', and `skip_prepare_dataset=True` skips "
                        "building them, so it would train on every token. Add a 'labels' column (-100 where the "
                        "loss is off) or drop `skip_prepare_dataset`."
                    )

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None and self._uses_vision_collator:  # raw rows reach the collator
            self._signature_columns = [
                "messages",
                "prompt",
                "completion",
                *IMAGE_COLUMNS,
                self.args.dataset_text_field,
            ]
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "labels", "seq_lengths"]

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        try:
            return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)
        except ValueError as error:
            if "Image features and image tokens do not match" in str(error) and self.args.max_length is not None:
                raise ValueError(
                    f"`max_length={self.args.max_length}` cuts image tokens out of a sequence whose image is kept, so "
                    "the model finds fewer image tokens than image features. Raise `max_length`, or set it to None."
                ) from error
            raise

    def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if self.compute_loss_func is not None or self.label_smoother is not None:
            # These need the full logits; the fused pass below only feeds the metrics.
            logits_out = model(**model_inputs, use_cache=False)
            if self.compute_loss_func is not None:
                loss = self.compute_loss_func(logits_out, inputs["labels"], num_items_in_batch=num_items_in_batch)
            else:
                loss = self.label_smoother(logits_out, inputs["labels"], shift_labels=True)
            with torch.no_grad():
                outputs = model(**inputs, token_logprobs=True)
        else:
            outputs = model(**inputs, token_logprobs=True)
            per_token_loss = -outputs.log_probs
            if self.args.loss_type == "dft":  # Dynamic Fine-Tuning: weight each token by its (detached) probability
                per_token_loss = per_token_loss * outputs.log_probs.detach().exp()
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            loss = self.add_router_aux_loss(loss, outputs.aux_loss, mode, num_items_in_batch)
        self._record_metrics(mode, inputs, outputs)
        if return_outputs:
            with torch.no_grad():
                return loss, model(**model_inputs, use_cache=False)
        return loss

    def _record_metrics(self, mode: str, inputs: dict, outputs) -> None:
        num_valid = gather_sum(self, outputs.label_mask.sum())
        entropy = gather_sum(self, outputs.entropy.sum())
        correct = gather_sum(self, outputs.is_top1.sum())
        metrics = self._metrics[mode]
        metrics["entropy"].append((entropy / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((correct / num_valid).item() if num_valid > 0 else 0.0)
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        else:
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        self._log_num_tokens(mode, local)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluate without the extra logits pass unless `compute_metrics` needs the logits."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss, outputs.logits, inputs.get("labels")
