"""Direct Preference Optimization, drop-in for TRL 1.16's `DPOTrainer`."""

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

from ..data.chat_template import extract_prompt
from ..data.collators import DataCollatorForPreference, DataCollatorForVisionPreference
from ..data.preference_dataset import check_preference_dataset, prepare_preference_dataset
from ..data.preference_vision import VisionPreferenceCollator, is_vision_dataset_row, require_processor
from ..data.vision import check_vision_dataset
from ..losses import dpo_loss, masked_mean_nll, preference_metrics, wpo_weights
from ..models import packed_attention
from ..models.vision import is_vision_model
from .base_trainer import BaseTrainer, gather_sum, init_arguments
from .dpo_config import DPOConfig
from .preference_forward import (
    POLICY_OUTPUTS,
    PairedLogps,
    concatenated_forward,
    encodes_images_once,
    forward_inputs,
    paired_token_metrics,
)
from .reference_policy import ReferencePolicy, loss_prediction_step
from .special_tokens import configure_special_tokens

__all__ = ["DPOTrainer", "DataCollatorForPreference", "DataCollatorForVisionPreference"]

logger = logging.getLogger(__name__)


class DPOTrainer(BaseTrainer):
    """DPO (Rafailov et al., 2023) with the signature, dataset formats, metrics and numerics of TRL 1.16's
    `DPOTrainer`.

    Datasets: preference (`prompt`, `chosen`, `rejected`) or implicit-prompt preference (`chosen`, `rejected`, the
    shared prefix becoming the prompt), standard or conversational. Each step runs the chosen and rejected sequences
    through the policy in one concatenated pass, and through the reference policy (`ref_model`, a frozen copy of the
    initial model, or with PEFT the model with its adapter disabled) unless `precompute_ref_log_probs`. Every TRL loss
    type is supported, alone or weighted (`loss_type=[...]`, `loss_weights=[...]`), with f-DPO, LD-DPO, WPO and
    TR-DPO (`sync_ref_model`). The log-probs come from `llm_trainer.kernels`, so the logits are never built. Logged
    metrics: `rewards/{chosen,rejected,accuracies,margins}`, `logps/{chosen,rejected}`, `logits/{chosen,rejected}`,
    `entropy`, `mean_token_accuracy`, `num_tokens`.

    Vision-language models train on rows with an `image` or `images` column (TRL's zen-image formats, multi-image
    rows, rows without images mixed in): the rows stay raw and `VisionPreferenceCollator` runs the processor per
    batch, on each pair's images once; each model (policy, reference) runs its vision encoder once per pair, the
    chosen and rejected rows sharing the features, and the log-probs still come from the fused head on the language
    model. Precomputed reference log-probs work (TRL refuses them for VLMs). VLMs run padded.

    With `packed_forward` (on by default where the model's attention supports it; `padding_free=True` requires it),
    the policy and reference passes run on packed rows: no padding, and each pair's prompt computed once for its
    chosen and rejected continuations (see `preference_forward.pack_rows`). Same losses and metrics as padded.

    >>> from llm_trainer import DPOConfig, DPOTrainer
    >>> trainer = DPOTrainer(model="path/to/model", args=DPOConfig("out"), train_dataset=dataset)
    >>> trainer.train()
    """

    config_class = DPOConfig
    _name = "DPO"
    _tag_names = ["dpo"]
    # The loss is a per-batch mean: `Trainer` divides it by the gradient accumulation steps.
    loss_is_scaled_for_ga = False
    reference_columns = ("ref_chosen_logps", "ref_rejected_logps")
    dataset_description = "a preference dataset ('chosen', 'rejected')"

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: str | PreTrainedModel | None = None,
        args: DPOConfig | TrainingArguments | None = None,
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

    # ----------------------------------------------------------------------------------------------- setup
    def check_inputs(self, args: DPOConfig, *, train_dataset, **inputs) -> None:
        super().check_inputs(args, train_dataset=train_dataset)
        sample = next(iter(train_dataset), {})  # checked as a preference dataset when prepared
        self._vision_dataset = is_vision_dataset_row(sample)
        if self._vision_dataset and args.max_length is not None and args.truncation_mode == "keep_end":
            raise ValueError(
                "truncation_mode='keep_end' is not supported for vision-language models: the image tokens are in the "
                "prompt, which keep_end may cut, leaving pixel values without their image tokens. Use "
                "truncation_mode='keep_start' (the default) or set max_length=None."
            )
        if args.padding_free and getattr(args, "packed_forward", None) is False:
            raise ValueError(
                "`padding_free=True` asks for packed batches, but `packed_forward=False` asks for padded ones. Set "
                "one of them: `padding_free=True` alone means `packed_forward=True`."
            )

    def prepare_processing_class(self, model: PreTrainedModel, processing_class: Any, args: DPOConfig) -> Any:
        self._processor = BaseTrainer.prepare_processing_class(model, processing_class, args)
        return self._processor

    def configure_tokenizer(self, model: PreTrainedModel, args: DPOConfig) -> None:
        configure_special_tokens(model, self._tokenizer, pad_token=args.pad_token)

    def reference_policy(self, model, ref_model, peft_config, args: DPOConfig) -> ReferencePolicy:
        return ReferencePolicy.for_policy(model, ref_model, args, copy_given_adapter=peft_config is None)

    def configure(self, model: PreTrainedModel, args: DPOConfig, train_dataset: Any) -> None:
        setting = True if args.padding_free else getattr(args, "packed_forward", None)
        where = "DPOConfig.padding_free" if args.padding_free else "DPOConfig.packed_forward"
        self._packed = packed_attention.prepare((model, self.reference.model), setting, where)
        self._is_vlm = is_vision_model(model)
        if self._vision_dataset and not self._is_vlm:  # the text-only model's error before the processor's
            check_vision_dataset(train_dataset, model_is_vlm=False, message_columns=[], trainer="DPOTrainer")

    _vision_dataset = False
    """Whether the training rows hold images (`image` / `images`): raw rows, collated by the processor."""
    _is_vlm = False

    def default_collator(self, args: DPOConfig) -> DataCollatorForPreference | VisionPreferenceCollator:
        if self._vision_dataset:
            return VisionPreferenceCollator(
                require_processor(self._processor, "DPOTrainer"),
                max_length=args.max_length,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        return DataCollatorForPreference(
            pad_token_id=self._tokenizer.pad_token_id,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            pad_to_multiple_of=args.pad_to_multiple_of,
        )

    def logprob_head(self, args: DPOConfig) -> dict[str, Any]:
        """The per-token outputs the metrics (and WPO) read."""
        return {"outputs": POLICY_OUTPUTS + (("log_sum_sq_probs",) if args.use_weighting else ())}

    _packed = False

    @property
    def padding_free(self) -> bool:
        """TRL's attribute: whether the forwards run on packed rows (`packed_forward`, `padding_free`)."""
        return self._packed

    @property
    def beta(self) -> float:
        return self.args.beta

    @property
    def loss_types(self) -> list[str]:
        return list(self.args.loss_type)

    # ------------------------------------------------------------------------------------------------ data
    def prepare_dataset(
        self, dataset: Dataset | IterableDataset, name: str, args: DPOConfig
    ) -> Dataset | IterableDataset:
        """Tokenize one preference dataset into `prompt_ids` / `chosen_ids` / `rejected_ids` (idempotent). A vision
        dataset is checked (`check_vision_dataset`) and stays raw: the collator runs the processor on each batch."""
        if self._vision_dataset:
            return self._prepare_vision_dataset(dataset, name)
        return prepare_preference_dataset(
            dataset,
            self._tokenizer,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            num_proc=args.dataset_num_proc,
            name=name,
        )

    def _prepare_vision_dataset(self, dataset: Dataset | IterableDataset, name: str) -> Dataset | IterableDataset:
        first = check_preference_dataset(dataset, name)
        check_vision_dataset(
            dataset,
            model_is_vlm=self._is_vlm,
            message_columns=["prompt", "chosen", "rejected"],
            trainer="DPOTrainer",
            dataset_name=name,
            image_token=getattr(self._processor, "image_token", None),
        )
        if "prompt" not in first:  # the shared prefix becomes the prompt; the images stay with the row
            kwargs = {"desc": f"Extracting prompt from {name} dataset"} if isinstance(dataset, Dataset) else {}
            dataset = dataset.map(extract_prompt, **kwargs)
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None and self._vision_dataset:
            self._signature_columns = [
                "prompt",
                "chosen",
                "rejected",
                "image",
                "images",
                "tools",
                "chat_template_kwargs",
                "ref_chosen_logps",
                "ref_rejected_logps",
            ]
        if self._signature_columns is None:
            self._signature_columns = [
                "prompt_ids",
                "chosen_ids",
                "rejected_ids",
                "ref_chosen_logps",
                "ref_rejected_logps",
            ]

    # ------------------------------------------------------------------------------------------- reference
    def reference_batch_logps(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        chosen, rejected = self.compute_ref_log_probs(self.ref_model or self.model, batch)
        return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def compute_ref_log_probs(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
        """Reference sequence log-probs `(chosen, rejected)` of one collated batch, without gradient.

        `model` is the reference model, or the policy: a PEFT policy runs as its reference (`ReferencePolicy`); a
        full policy is its own reference only before training (to precompute).
        """
        context = self.reference.context(self.accelerator.unwrap_model(model))
        with torch.no_grad(), context, self.accelerator.autocast():
            forward = concatenated_forward(model, inputs, **self._forward_options)
        return forward.chosen_logps, forward.rejected_logps

    prediction_step = loss_prediction_step

    @property
    def _forward_options(self) -> dict[str, Any]:
        """`concatenated_forward` options: LD-DPO, packing, and the vision encoder run once per pair of rows."""
        return {
            "ld_alpha": self.args.ld_alpha,
            "packed": self._packed,
            "encode_images_once": encodes_images_once(self),
        }

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        args = self.args
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        policy = concatenated_forward(model, inputs, **self._forward_options, **extra)
        if "ref_chosen_logps" in inputs:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else self.model, inputs
            )
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            policy.chosen_logps,
            policy.rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            beta=args.beta,
            loss_type=self.loss_types,
            loss_weights=list(args.loss_weights or [1.0] * len(self.loss_types)),
            label_smoothing=args.label_smoothing,
            f_divergence_type=args.f_divergence_type,
            f_alpha_divergence_coef=args.f_alpha_divergence_coef,
            discopop_tau=args.discopop_tau,
            **self._loss_inputs(policy, inputs),
        )
        loss = self.add_router_aux_loss(loss, policy.outputs.aux_loss, mode)
        self._record_metrics(mode, inputs, policy, chosen_rewards, rejected_rewards)
        if return_outputs:
            warnings.warn(
                "`return_outputs=True` (the logits `compute_metrics` receives) needs an extra forward pass: the fused "
                "log-prob head never builds the logits. TRL deprecates it too.",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                return loss, model(**forward_inputs(model, inputs), use_cache=False)
        return loss

    def _loss_inputs(self, policy: PairedLogps, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The extra `dpo_loss` arguments the configured loss types need."""
        extra: dict[str, Any] = {}
        if {"ipo", "sigmoid_norm"} & set(self.loss_types):
            extra["chosen_lengths"], extra["rejected_lengths"] = inputs["completion_mask"].sum(dim=1).chunk(2)
        if "sft" in self.loss_types:
            chosen_token_logps = policy.per_token_logps.chunk(2, dim=0)[0]
            extra["chosen_nll"] = masked_mean_nll(chosen_token_logps, policy.mask.chunk(2, dim=0)[0])
        if self.args.use_weighting:
            log_sum_sq_probs = policy.outputs.log_sum_sq_probs[:, -policy.mask.size(1) :]
            extra["pair_weights"] = wpo_weights(policy.per_token_logps, log_sum_sq_probs, policy.mask)
        return extra

    def _record_metrics(self, mode: str, inputs, policy: PairedLogps, chosen_rewards, rejected_rewards) -> None:
        metrics = self._metrics[mode]
        for key, value in paired_token_metrics(policy, lambda value: gather_sum(self, value)).items():
            metrics[key].append(value)
        self._log_num_tokens(mode, inputs["attention_mask"].sum())
        for key, value in preference_metrics(
            chosen_rewards, rejected_rewards, policy.chosen_logps, policy.rejected_logps, self.accelerator.gather
        ).items():
            metrics[key].append(value)
