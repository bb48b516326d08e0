"""Reference log-probs computed once over a dataset and stored as columns (`precompute_ref_log_probs`).

Shared by the trainers with a reference policy (DPO, KTO, BCO): setting the reference up, the precompute pass, and
the `evaluate` / `prediction_step` that go with a batch carrying no `labels`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import IterableDataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Trainer

from ..callbacks import SyncRefModelCallback
from ..modeling import add_token_logprob_head
from .utils import disable_dropout_in_model


class PrecomputedReferenceMixin:
    """Mixed into a `BaseTrainer` subclass that sets `precompute_ref_logps` and `ref_model`, names the columns it
    adds in `reference_columns`, and implements `reference_batch_logps(batch) -> {column: tensor or None}` for one
    collated batch."""

    reference_columns: tuple[str, ...] = ()

    def setup_reference(self, model: Any, ref_model: Any, args: Any, policy_outputs: tuple[str, ...]) -> None:
        """After `Trainer.__init__`: the reference policy (as given, a frozen copy of the initial model, or None
        under PEFT / precomputation), dropout off where asked, the fused log-prob head on the policy (with the
        per-token `policy_outputs` its metrics read) and the reference, the TR-DPO sync callback, and the
        precomputed reference columns."""
        self.precompute_ref_logps = bool(args.precompute_ref_log_probs)
        # Copy the initial policy before its forward is patched: a deep copy would keep calling the original's.
        self.ref_model = self.prepare_reference_model(model, ref_model, precomputed=self.precompute_ref_logps)
        if args.disable_dropout:
            disable_dropout_in_model(model)
            if self.ref_model is not None:
                disable_dropout_in_model(self.ref_model)
        add_token_logprob_head(
            self.model.get_base_model() if is_peft_model(self.model) else self.model, outputs=policy_outputs
        )
        if self.ref_model is not None:
            add_token_logprob_head(self.ref_model, outputs=())
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                self.ref_model = self.ref_model.to(self.accelerator.device)
            else:
                self.ref_model = self.accelerator.prepare_model(self.ref_model, evaluation_mode=True)
        if getattr(args, "sync_ref_model", False):
            self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))
        if self.precompute_ref_logps:
            self.train_dataset = self._precompute_reference(self.train_dataset, "train", train=True)
            if self.eval_dataset is not None:
                self.eval_dataset = self._precompute_eval(self.eval_dataset)

    def reference_batch_logps(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        raise NotImplementedError(f"{type(self).__name__} must implement `reference_batch_logps`.")

    def _precompute_reference(self, dataset: Any, name: str, train: bool) -> Any:
        """`dataset` with the reference log-prob columns added (unchanged when it has them already)."""
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                f"`precompute_ref_log_probs=True` is not supported with IterableDataset (the {name} dataset): it "
                "needs a map-style `Dataset`. Load the dataset without streaming, or set "
                "`precompute_ref_log_probs=False`."
            )
        if self.reference_columns[0] in dataset.column_names:
            return dataset
        args = self.args
        batch_size = getattr(args, "precompute_ref_batch_size", None) or (
            args.per_device_train_batch_size if train else args.per_device_eval_batch_size
        )
        loader = self.accelerator.prepare(
            DataLoader(
                dataset,
                batch_size=batch_size,
                collate_fn=self.data_collator,
                num_workers=args.dataloader_num_workers,
                pin_memory=args.dataloader_pin_memory,
                shuffle=False,
            )
        )
        columns: dict[str, list[torch.Tensor]] = {}
        disable = not self.is_local_process_zero() or bool(os.environ.get("TQDM_DISABLE"))
        for batch in tqdm(loader, desc=f"Computing reference log probs for {name} dataset", disable=disable):
            for column, logps in self.reference_batch_logps(batch).items():
                if logps is not None:
                    columns.setdefault(column, []).append(self.accelerator.gather_for_metrics(logps).float().cpu())
        for column, parts in columns.items():
            dataset = dataset.add_column(column, torch.cat(parts).tolist())
        return dataset

    def _precompute_eval(self, eval_dataset: Any) -> Any:
        if isinstance(eval_dataset, dict):
            return {key: self._precompute_reference(ds, key, train=False) for key, ds in eval_dataset.items()}
        return self._precompute_reference(eval_dataset, "eval", train=False)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluate through `compute_loss` (the batch has no `labels`)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs).detach(), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), outputs.logits, inputs["input_ids"]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """As `Trainer.evaluate`, preparing (and, with `precompute_ref_log_probs`, scoring) a raw dataset passed
        here the same way as at construction."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            if (
                self.precompute_ref_logps
                and self.ref_model is None
                and not is_peft_model(self.model)
                and self.state.global_step > 0
            ):
                raise ValueError(
                    "Cannot compute reference log-probs for a dataset passed to `evaluate()` after training started: "
                    "with `precompute_ref_log_probs=True` and no `ref_model`, the initial policy is gone. Pass the "
                    "dataset as `eval_dataset` when creating the trainer, pass a `ref_model`, or set "
                    "`precompute_ref_log_probs=False`."
                )
            eval_dataset = self.prepare_eval_dataset(eval_dataset)
            if self.precompute_ref_logps:
                eval_dataset = self._precompute_eval(eval_dataset)
            if isinstance(eval_dataset, dict):  # one prepared dataset at a time, so none is prepared twice
                metrics = {}
                for name, dataset in eval_dataset.items():
                    metrics.update(Trainer.evaluate(self, dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
                return metrics
        # Prepared above: skip `BaseTrainer.evaluate`, which would prepare it again
        return Trainer.evaluate(
            self, eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )
