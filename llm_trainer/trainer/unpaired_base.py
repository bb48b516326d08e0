"""What KTO and BCO share: unpaired (prompt, completion, label) data, the reference policy, and the forward pass.

`UnpairedPreferenceTrainer` fills `BaseTrainer`'s constructor hooks (datasets from `data.unpaired`, the reference
policy: a given model, a frozen copy, the PEFT model as its reference, or precomputed log-probs), and runs the
forward: summed completion log-probs of the policy and of the reference, split into desirable (chosen) and
undesirable (rejected) examples, plus the KL completions' log-probs when `calculate_kl`. A subclass turns that into
a loss in `unpaired_loss`; the shared metrics (`rewards/*`, `logps/*`, `logits/*`, `entropy`, `num_tokens`) are
recorded here. With `packed_forward` (on where the model's attention supports it), every forward runs on packed
rows, without padding (`preference_forward.pack_rows`); same log-probs and metrics as padded.

Vision-language datasets (`image` / `images` columns; `supports_vision` trainers) stay raw and are collated by the
processor (`data.unpaired.VisionUnpairedCollator`); each model (policy, reference) runs its vision encoder once per
batch, and the completion and KL passes share the features (`preference_forward.encode_images`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel

from ..data.preference_vision import IMAGE_INPUTS_KEY, flat_image_inputs, is_vision_dataset_row, require_processor
from ..data.unpaired import (
    DataCollatorForUnpairedPreference,
    VisionUnpairedCollator,
    prepare_unpaired_dataset,
)
from ..data.vision import check_vision_dataset, refuse_image_columns
from ..losses import unpaired_metrics
from ..modeling import completion_labels
from ..models import packed_attention
from ..models.vision import is_vision_model
from .base_trainer import BaseTrainer, gather_sum
from .preference_forward import ImageFeatures, encode_images, encodes_images_once, pack_rows, packed_token_outputs
from .reference_policy import ReferencePolicy, loss_prediction_step
from .special_tokens import configure_special_tokens

_TOKEN_TYPE_FIELDS = ("token_type_ids", "mm_token_type_ids")
"""Per-token fields some processors add (Gemma, Qwen2.5-VL), passed to the model with the ids."""


class UnpairedForward(NamedTuple):
    """One batch through the policy and the reference; `*_logps` are summed over completion tokens."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    kl_logps: torch.Tensor | None
    """Policy log-probs of the mismatched KL completions (no gradient), None without `calculate_kl`."""
    ref_kl_logps: torch.Tensor | None
    outputs: Any
    """The policy's `TokenLogprobOutput` on the batch."""
    chosen_idx: torch.Tensor
    rejected_idx: torch.Tensor


class UnpairedPreferenceTrainer(BaseTrainer):
    """Base of the trainers that learn from completions labelled desirable / undesirable (KTO, BCO).

    Subclasses set `config_class`, `_name`, `_tag_names` and `calculate_kl`, and implement `unpaired_loss`.
    """

    _signature_extra: tuple[str, ...] = ()
    calculate_kl: bool = False
    """Whether each batch also scores mismatched (KL) completions; set by the subclass."""
    model_adapter_name: str | None = None  # BCO's options: the PEFT adapters trained and run as the reference
    ref_adapter_name: str | None = None
    reference_columns = ("ref_logps", "ref_KL_logps")
    supports_vision: bool = False
    """Whether the trainer takes vision-language datasets (`image` / `images` columns); set by the subclass."""
    _vision_dataset = False
    _is_vlm = False

    # ----------------------------------------------------------------------------------------------- setup
    def check_inputs(self, args: Any, *, train_dataset: Any, **inputs: Any) -> None:
        super().check_inputs(args, train_dataset=train_dataset)
        if not self.supports_vision:
            refuse_image_columns(train_dataset, type(self).__name__)
        self._vision_dataset = is_vision_dataset_row(next(iter(train_dataset), {}))

    def prepare_processing_class(self, model: PreTrainedModel, processing_class: Any, args: Any) -> Any:
        self._processor = BaseTrainer.prepare_processing_class(model, processing_class, args)
        return self._processor

    def configure_tokenizer(self, model: PreTrainedModel, args: Any) -> None:
        configure_special_tokens(model, self._tokenizer)  # the model agrees with the tokenizer on the pad token

    def reference_policy(self, model, ref_model, peft_config, args: Any) -> ReferencePolicy:
        return ReferencePolicy.for_policy(
            model,
            ref_model,
            args,
            copy_given_adapter=peft_config is None,
            adapter_name=self.ref_adapter_name,
            policy_adapter=self.model_adapter_name,
        )

    def configure(self, model: PreTrainedModel, args: Any, train_dataset: Any) -> None:
        where = f"{type(args).__name__}.packed_forward"
        self._packed = packed_attention.prepare(
            (model, self.reference.model), getattr(args, "packed_forward", None), where
        )
        self._is_vlm = is_vision_model(model)
        if self._vision_dataset and not self._is_vlm:  # the text-only model's error before the processor's
            check_vision_dataset(train_dataset, model_is_vlm=False, message_columns=[], trainer=type(self).__name__)

    _packed = False
    """Whether the forwards run on packed rows (`packed_forward`)."""

    def default_collator(self, args: Any) -> DataCollatorForUnpairedPreference | VisionUnpairedCollator:
        if self._vision_dataset:
            return VisionUnpairedCollator(
                require_processor(self._processor, type(self).__name__),
                max_length=args.max_length,
                calculate_kl=self.calculate_kl,
                pad_to_multiple_of=getattr(args, "pad_to_multiple_of", None),
            )
        return DataCollatorForUnpairedPreference(
            pad_token_id=self._tokenizer.pad_token_id,
            max_length=args.max_length,
            pad_to_multiple_of=getattr(args, "pad_to_multiple_of", None),
        )

    def logprob_head(self, args: Any) -> dict[str, Any]:
        return {"outputs": ("entropy", "mean_logits")}  # what the metrics read

    def prepare_dataset(self, dataset: Dataset | IterableDataset, name: str, args: Any) -> Dataset | IterableDataset:
        """Tokenize one dataset (KL completions in batches of `per_device_train_batch_size`, as TRL); a vision
        dataset is checked and stays raw (the collator tokenizes it)."""
        vision = None
        if self._vision_dataset:
            image_token = getattr(self._processor, "image_token", None)
            vision = {"model_is_vlm": self._is_vlm, "trainer": type(self).__name__, "image_token": image_token}
        dataset = prepare_unpaired_dataset(
            dataset,
            self._tokenizer,
            max_length=args.max_length,
            kl_batch_size=args.per_device_train_batch_size if self.calculate_kl and vision is None else None,
            num_proc=args.dataset_num_proc,
            name=name,
            require_both_labels=name == "train",
            vision=vision,
        )
        if name == "train" and isinstance(dataset, Dataset):
            self._check_balance(dataset["label"], args)
        return dataset

    def _check_balance(self, labels: list[bool], args: Any) -> None:
        """Hook for a subclass's own label-balance advice (KTO's loss-weight ranges)."""

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None and self._vision_dataset:
            self._signature_columns = [
                "prompt",
                "completion",
                "label",
                "image",
                "images",
                "tools",
                "chat_template_kwargs",
                "ref_logps",
                "ref_KL_logps",
            ]
        if self._signature_columns is None:
            self._signature_columns = [
                "prompt_ids",
                "completion_ids",
                "KL_completion_ids",
                "label",
                "ref_logps",
                "ref_KL_logps",
                *self._signature_extra,
            ]

    # ------------------------------------------------------------------------------------------- reference
    @property
    def _reference_or_policy(self):
        """What runs as the reference: `ref_model`, else the policy (as its PEFT reference, or the policy itself
        before training, to precompute)."""
        return self.ref_model if self.ref_model is not None else self.model

    def _completion_logps(self, model, input_ids, attention_mask, completion_mask, **kwargs):
        """The model's token-log-prob outputs on prompt+completion (`[rows, T - 1]`, the padded layout, also when
        the forward runs packed) and the summed completion log-probs."""
        labels = completion_labels(input_ids, completion_mask)
        packable = self._packed and set(kwargs) <= {"output_router_logits"}  # images and token types run padded
        rows = pack_rows(input_ids, attention_mask) if packable else None
        if rows is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            outputs = packed_token_outputs(model, rows, targets, next_token_layout=True, **kwargs)
        else:
            outputs = model(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, token_logprobs=True, **kwargs
            )
        seq_len = input_ids.size(1) - 1  # prompt-learning PEFT prepends virtual tokens: keep the real positions
        return outputs, outputs.log_probs[:, -seq_len:].sum(-1)

    def _image_features(self, model, batch: dict[str, Any]) -> ImageFeatures | None:
        """The batch's images encoded by `model` (once, for the completion and the KL pass; `encodes_images_once`),
        None without images."""
        images = batch.get(IMAGE_INPUTS_KEY) or flat_image_inputs(batch)  # ours, or a TRL vision collator's
        if images is None:
            return None
        return encode_images(model, images, once=encodes_images_once(self))

    @staticmethod
    def _sequence_kwargs(batch: dict[str, Any], prefix: str, images: ImageFeatures | None) -> dict[str, Any]:
        """Model keywords besides ids and mask for the `prefix` sequences ("" or "KL_"): per-token type ids where the
        processor made them, and the images."""
        kwargs = {name: batch[prefix + name] for name in _TOKEN_TYPE_FIELDS if prefix + name in batch}
        if images is not None:
            kwargs.update(images.model_kwargs())
        return kwargs

    def _kl_logps(self, model, batch, images: ImageFeatures | None = None) -> torch.Tensor:
        kwargs = self._sequence_kwargs(batch, "KL_", None if images is None else images.detach())
        with torch.no_grad():
            return self._completion_logps(
                model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"], **kwargs
            )[1]

    def compute_ref_log_probs(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference log-probs (no gradient) of a collated batch's completions and, with `calculate_kl`, of its KL
        completions (else None). `model` is `ref_model`, or the policy: without a `ref_model`, a PEFT policy runs
        as its reference adapter (or with adapters disabled)."""
        with torch.no_grad(), self.reference.context(self.accelerator.unwrap_model(self.model)):
            images = self._image_features(model, inputs)
            ref_kl_logps = self._kl_logps(model, inputs, images) if self.calculate_kl else None
            _, ref_logps = self._completion_logps(
                model,
                inputs["input_ids"],
                inputs["attention_mask"],
                inputs["completion_mask"],
                **self._sequence_kwargs(inputs, "", images),
            )
        return ref_logps, ref_kl_logps

    def reference_batch_logps(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        with self.accelerator.autocast():
            logps, kl_logps = self.compute_ref_log_probs(self._reference_or_policy, batch)
        return {"ref_logps": logps, "ref_KL_logps": kl_logps}

    prediction_step = loss_prediction_step

    # ------------------------------------------------------------------------------------------------ loss
    def unpaired_forward(self, model, batch: dict[str, torch.Tensor]) -> UnpairedForward:
        """Policy (and, unless precomputed, reference) log-probs of a collated batch."""
        labels = batch["label"].bool()
        chosen_idx = labels.nonzero().view(-1)
        rejected_idx = (~labels).nonzero().view(-1)
        images = self._image_features(model, batch)  # with gradient; the KL pass reads them detached
        kl_logps = self._kl_logps(model, batch, images) if self.calculate_kl else None
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        extra.update(self._sequence_kwargs(batch, "", images))
        outputs, logps = self._completion_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], **extra
        )
        if "ref_logps" in batch:
            ref_logps, ref_kl_logps = batch["ref_logps"].to(logps.dtype), batch.get("ref_KL_logps")
        else:
            ref_logps, ref_kl_logps = self.compute_ref_log_probs(self._reference_or_policy, batch)
        return UnpairedForward(
            chosen_logps=logps.index_select(0, chosen_idx),
            rejected_logps=logps.index_select(0, rejected_idx),
            ref_chosen_logps=ref_logps.index_select(0, chosen_idx),
            ref_rejected_logps=ref_logps.index_select(0, rejected_idx),
            kl_logps=kl_logps,
            ref_kl_logps=ref_kl_logps,
            outputs=outputs,
            chosen_idx=chosen_idx,
            rejected_idx=rejected_idx,
        )

    def unpaired_loss(
        self, forward: UnpairedForward, batch: dict[str, torch.Tensor], mode: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(loss, chosen_rewards, rejected_rewards)` of a collated `batch`; record algorithm-specific metrics in
        `self._metrics[mode]`."""
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        forward = self.unpaired_forward(model, inputs)
        loss, chosen_rewards, rejected_rewards = self.unpaired_loss(forward, inputs, mode)
        self._record_metrics(mode, inputs, forward, chosen_rewards, rejected_rewards)
        loss = self.add_router_aux_loss(loss, forward.outputs.aux_loss, mode)
        if return_outputs:  # the logits, for `compute_metrics`, need an extra forward pass
            with torch.no_grad():
                kwargs = self._sequence_kwargs(inputs, "", self._image_features(model, inputs))
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs)
            return loss, outputs
        return loss

    def _record_metrics(self, mode, batch, forward: UnpairedForward, chosen_rewards, rejected_rewards) -> None:
        metrics = self._metrics[mode]
        gather = self.accelerator.gather_for_metrics
        mask = batch["completion_mask"][:, 1:]
        seq_len = mask.size(1)
        outputs = forward.outputs
        num_completion_tokens = gather_sum(self, mask.sum())
        entropy = gather_sum(self, (outputs.entropy[:, -seq_len:].detach() * mask).sum())
        metrics["entropy"].append((entropy / num_completion_tokens).item() if num_completion_tokens > 0 else 0.0)
        self._log_num_tokens(mode, batch["attention_mask"].sum())

        mean_logits = outputs.mean_logits[:, -seq_len:].detach()
        for side, idx in (("chosen", forward.chosen_idx), ("rejected", forward.rejected_idx)):
            side_mask = mask.index_select(0, idx).bool()
            total = gather_sum(self, mean_logits.index_select(0, idx)[side_mask].sum())
            count = gather_sum(self, side_mask.sum())
            if count > 0:
                metrics[f"logits/{side}"].append((total / count).item())

        for key, value in unpaired_metrics(
            chosen_rewards, rejected_rewards, forward.chosen_logps, forward.rejected_logps, gather
        ).items():
            metrics[key].append(value)
