"""What KTO and BCO share: unpaired (prompt, completion, label) data, the reference policy, and the forward pass.

`UnpairedPreferenceTrainer` loads the model and tokenizer, prepares the datasets (`data.unpaired`), sets up the
reference policy (a given model, a frozen copy, the adapter-disabled PEFT model, or precomputed log-probs), and runs
the forward: summed completion log-probs of the policy and of the reference, split into desirable (chosen) and
undesirable (rejected) examples, plus the KL completions' log-probs when `calculate_kl`. A subclass turns that into
a loss in `unpaired_loss`; the shared metrics (`rewards/*`, `logps/*`, `logits/*`, `entropy`, `num_tokens`) are
recorded here.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel

from ..data.unpaired import (
    DataCollatorForUnpairedPreference,
    check_unpaired_dataset,
    prepare_unpaired_dataset,
)
from ..losses import unpaired_metrics
from ..modeling import add_reference_adapter, completion_labels, reference_adapter
from .base_trainer import BaseTrainer, gather_sum
from .reference_logps import PrecomputedReferenceMixin
from .special_tokens import configure_special_tokens


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


class UnpairedPreferenceTrainer(PrecomputedReferenceMixin, BaseTrainer):
    """Base of the trainers that learn from completions labelled desirable / undesirable (KTO, BCO).

    Subclasses set `config_class`, `_name`, `_tag_names`, call `__init__` with `calculate_kl`, and implement
    `unpaired_loss`.
    """

    _signature_extra: tuple[str, ...] = ()

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: str | PreTrainedModel | None,
        args: Any,
        data_collator: Any,
        train_dataset: Dataset | IterableDataset | None,
        eval_dataset: Any,
        processing_class: Any,
        compute_metrics: Any,
        callbacks: Any,
        optimizers: tuple,
        quantization_config: Any = None,
        peft_config: Any = None,
        preprocess_logits_for_metrics: Any = None,
        *,
        calculate_kl: bool,
    ):
        args = self.resolve_args(args, model)
        self.check_train_dataset(train_dataset, args)
        check_unpaired_dataset(train_dataset, "train")
        self.calculate_kl = calculate_kl

        model = self.prepare_model(model, args, quantization_config)
        if isinstance(ref_model, str):
            ref_model = self.prepare_model(ref_model, args, quantization_config)
        processing_class = self.prepare_processing_class(model, processing_class, args)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        configure_special_tokens(model, tokenizer)  # the model agrees with the tokenizer on the pad token
        self._tokenizer = tokenizer

        if peft_config is not None:
            model = self.prepare_peft(model, peft_config, args)
        elif is_peft_model(model):
            if ref_model is None:
                add_reference_adapter(model)
            if args.gradient_checkpointing:
                model.enable_input_require_grads()
        if getattr(args, "sync_ref_model", False) and is_peft_model(model):
            raise ValueError(
                "`sync_ref_model=True` needs a separate reference model, but with PEFT the reference is the model "
                "with its adapter disabled. Set `sync_ref_model=False`, or train without PEFT."
            )

        if data_collator is None:
            data_collator = self._default_collator(tokenizer, args)
        train_dataset = self.prepare_dataset(train_dataset, "train", args)
        if isinstance(train_dataset, Dataset):
            self._check_balance(train_dataset["label"], args)
        if eval_dataset is not None:
            eval_dataset = self.prepare_eval_dataset(eval_dataset, args)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )

        self.router_aux_loss_coef = self.configure_router_aux_loss(model, getattr(args, "router_aux_loss_coef", None))
        self.aux_loss_enabled = bool(self.router_aux_loss_coef)
        self.setup_reference(model, ref_model, args, ("entropy", "mean_logits"))  # what the metrics read

    # ------------------------------------------------------------------------------------------------ data
    def _default_collator(self, tokenizer: Any, args: Any) -> DataCollatorForUnpairedPreference:
        return DataCollatorForUnpairedPreference(
            pad_token_id=tokenizer.pad_token_id,
            max_length=args.max_length,
            pad_to_multiple_of=getattr(args, "pad_to_multiple_of", None),
        )

    def prepare_dataset(self, dataset: Dataset | IterableDataset, name: str, args: Any) -> Dataset | IterableDataset:
        """Tokenize one dataset (KL completions in batches of `per_device_train_batch_size`, as TRL)."""
        with args.main_process_first(desc=f"preparing {name} dataset"):
            return prepare_unpaired_dataset(
                dataset,
                self._tokenizer,
                max_length=args.max_length,
                kl_batch_size=args.per_device_train_batch_size if self.calculate_kl else None,
                num_proc=args.dataset_num_proc,
                name=name,
                require_both_labels=name == "train",
            )

    def _check_balance(self, labels: list[bool], args: Any) -> None:
        """Hook for a subclass's own label-balance advice (KTO's loss-weight ranges)."""

    def _set_signature_columns_if_needed(self):
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
        """What runs as the reference: `ref_model`, else the policy (as its PEFT reference adapter, or the policy
        itself before training, to precompute)."""
        return self.ref_model if self.ref_model is not None else self.model

    def _reference_adapter(self, peft_model: Any):
        return reference_adapter(peft_model)

    @staticmethod
    def _completion_logps(model, input_ids, attention_mask, completion_mask, **kwargs):
        """The model's token-log-prob outputs on prompt+completion and the summed completion log-probs."""
        labels = completion_labels(input_ids, completion_mask)
        outputs = model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, token_logprobs=True, **kwargs
        )
        seq_len = input_ids.size(1) - 1  # prompt-learning PEFT prepends virtual tokens: keep the real positions
        return outputs, outputs.log_probs[:, -seq_len:].sum(-1)

    def _kl_logps(self, model, batch) -> torch.Tensor:
        with torch.no_grad():
            return self._completion_logps(
                model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]
            )[1]

    def compute_ref_log_probs(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference log-probs (no gradient) of a collated batch's completions and, with `calculate_kl`, of its KL
        completions (else None). `model` is `ref_model`, or the policy: without a `ref_model`, a PEFT policy runs
        as its reference adapter (or with adapters disabled)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        as_reference = self.ref_model is None and is_peft_model(unwrapped)
        adapter = self._reference_adapter(unwrapped) if as_reference else contextlib.nullcontext()
        with torch.no_grad(), adapter:
            ref_kl_logps = self._kl_logps(model, inputs) if self.calculate_kl else None
            _, ref_logps = self._completion_logps(
                model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
            )
        return ref_logps, ref_kl_logps

    # ------------------------------------------------------------------------------------------------ loss
    reference_columns = ("ref_logps", "ref_KL_logps")

    def reference_batch_logps(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        with self.accelerator.autocast():
            logps, kl_logps = self.compute_ref_log_probs(self._reference_or_policy, batch)
        return {"ref_logps": logps, "ref_KL_logps": kl_logps}

    def unpaired_forward(self, model, batch: dict[str, torch.Tensor]) -> UnpairedForward:
        """Policy (and, unless precomputed, reference) log-probs of a collated batch."""
        labels = batch["label"].bool()
        chosen_idx = labels.nonzero().view(-1)
        rejected_idx = (~labels).nonzero().view(-1)
        kl_logps = self._kl_logps(model, batch) if self.calculate_kl else None
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
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
        aux_loss = forward.outputs.aux_loss
        if self.aux_loss_enabled and aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item()
            )
        if return_outputs:  # the logits, for `compute_metrics`, need an extra forward pass
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
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
