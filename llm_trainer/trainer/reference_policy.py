"""The frozen reference policy of the trainers whose loss compares against one (DPO, KTO, BCO, PPO; GRPO/RLOO's KL):
one object, built by `BaseTrainer.__init__` from the trainer's `reference_policy` hook."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import IterableDataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..modeling import add_reference_adapter, add_token_logprob_head, reference_adapter
from ..models.utils import zero3_copy, zero3_layerwise_gathered
from .utils import use_adapter


@dataclass
class ReferencePolicy:
    """What a loss compares the policy with: a separate frozen `model`; else, with a PEFT policy, the policy itself
    run through `context(policy)`; and/or log-probs computed once per dataset before training (`precompute`)."""

    model: torch.nn.Module | None = None
    adapter_name: str | None = None
    """The PEFT adapter that runs as the reference; None: the "ref" copy of a given adapter, else adapters off."""
    precompute: bool = False

    @classmethod
    def for_policy(
        cls,
        policy: torch.nn.Module,
        ref_model: torch.nn.Module | None = None,
        args: Any = None,
        *,
        copy_given_adapter: bool = False,
        adapter_name: str | None = None,
        policy_adapter: str | None = None,
    ) -> ReferencePolicy:
        """The reference of `policy` (after PEFT wrapping): `ref_model` frozen when given; none to run for a PEFT
        `policy` (given a frozen "ref" copy of its adapter when `copy_given_adapter`: TRL's rule for a `PeftModel`
        passed as the model, with `policy_adapter` made active) or with `args.precompute_ref_log_probs`; else a frozen
        copy of `policy`. `args.sync_ref_model` (TR-DPO) needs a separate model."""
        precompute = bool(getattr(args, "precompute_ref_log_probs", False))
        if ref_model is not None and ref_model is policy:
            raise ValueError(
                "`model` and `ref_model` are the same object. Omit `ref_model` to use a frozen copy of the initial "
                "model, or pass a separate model: the reference must not train along (to share the base weights, "
                "omit `ref_model` and train a PEFT adapter)."
            )
        peft = is_peft_model(policy)
        if peft and getattr(args, "sync_ref_model", False):
            raise ValueError(
                "`sync_ref_model=True` needs a separate reference model, but with PEFT the reference is the model "
                "with its adapter disabled. Set `sync_ref_model=False`, or train without PEFT."
            )
        if peft and policy_adapter:
            policy.set_adapter(policy_adapter)
        if ref_model is not None:
            model = ref_model.eval().requires_grad_(False)
        else:
            if peft and copy_given_adapter:
                add_reference_adapter(policy)
            model = None if peft or precompute else zero3_copy(policy)
        return cls(model, adapter_name, precompute)

    def context(self, policy: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Entered around a forward of the unwrapped `policy` that must compute reference log-probs: selects the
        reference adapter of a PEFT policy (see the class docstring); a no-op otherwise."""
        if self.model is not None or not is_peft_model(policy):
            return contextlib.nullcontext()
        return use_adapter(policy, self.adapter_name) if self.adapter_name else reference_adapter(policy)

    def place(self, trainer: Any, head: dict[str, Any] | None, prepare: bool = True) -> None:
        """Once `Trainer.__init__` has set up the accelerator: the log-prob head (the policy's `head` options without
        per-token outputs), then the placement (`shard_reference`: sharded like the policy under FSDP2 and DeepSpeed
        ZeRO-3; else through `accelerator.prepare_model`, or only moved to the device when `prepare` is False) and
        TR-DPO's `SyncRefModelCallback` with `sync_ref_model`."""
        if self.model is None:
            return
        if head is not None:
            add_token_logprob_head(self.model, **{**head, "outputs": ()})
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            self.model = shard_reference(self.model, trainer.accelerator)
        elif not prepare:
            self.model = self.model.to(trainer.accelerator.device)
        else:
            self.model = trainer.accelerator.prepare_model(self.model, evaluation_mode=True)
        if getattr(trainer.args, "sync_ref_model", False):
            from .callbacks import SyncRefModelCallback

            trainer.add_callback(SyncRefModelCallback(ref_model=self.model, accelerator=trainer.accelerator))

    def precompute_columns(
        self,
        trainer: Any,
        dataset: Any,
        name: str,
        columns: tuple[str, ...],
        batch_logps: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor | None]],
    ) -> Any:
        """`dataset` (or each of a dict of them) with the reference log-prob `columns` that `batch_logps(batch)`
        returns for a collated batch; unchanged where they are present already."""
        if isinstance(dataset, dict):
            return {
                key: self.precompute_columns(trainer, ds, key, columns, batch_logps) for key, ds in dataset.items()
            }
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                f"`precompute_ref_log_probs=True` is not supported with IterableDataset (the {name} dataset): it "
                "needs a map-style `Dataset`. Load the dataset without streaming, or set "
                "`precompute_ref_log_probs=False`."
            )
        if columns[0] in dataset.column_names:
            return dataset
        if self.model is None and not is_peft_model(trainer.model) and trainer.state.global_step > 0:
            raise ValueError(
                "Cannot compute reference log-probs for a dataset passed to `evaluate()` after training started: "
                "with `precompute_ref_log_probs=True` and no `ref_model`, the initial policy is gone. Pass the "
                "dataset as `eval_dataset` when creating the trainer, pass a `ref_model`, or set "
                "`precompute_ref_log_probs=False`."
            )
        args = trainer.args
        batch_size = getattr(args, "precompute_ref_batch_size", None) or (
            args.per_device_train_batch_size if name == "train" else args.per_device_eval_batch_size
        )
        loader = trainer.accelerator.prepare(
            DataLoader(
                dataset,
                batch_size=batch_size,
                collate_fn=trainer.data_collator,
                num_workers=args.dataloader_num_workers,
                pin_memory=args.dataloader_pin_memory,
                shuffle=False,
            )
        )
        found: dict[str, list[torch.Tensor]] = {}
        disable = not trainer.is_local_process_zero() or bool(os.environ.get("TQDM_DISABLE"))
        scorer = self.model if self.model is not None else trainer.model
        with zero3_layerwise_gathered(scorer):  # a policy partitioned at load time has no engine hooks yet
            for batch in tqdm(loader, desc=f"Computing reference log probs for {name} dataset", disable=disable):
                for column, logps in batch_logps(batch).items():
                    if logps is not None:
                        logps = trainer.accelerator.gather_for_metrics(logps)
                        found.setdefault(column, []).append(logps.float().cpu())
        for column, parts in found.items():
            dataset = dataset.add_column(column, torch.cat(parts).tolist())
        return dataset


def shard_reference(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """A frozen model (reference, teacher) placed the way the policy is sharded, in eval mode.

    - FSDP2: `fully_shard` with Accelerate's own preparation of the policy (same plugin: per decoder layer, the
      embeddings, and the final norm with the LM head), so each process holds 1/world of every weight and a forward
      gathers one layer at a time; every group then frees its gathered weights after its forward (no backward
      follows). Its forward is a collective: every process must run it, for every batch.
    - DeepSpeed: `prepare_deepspeed` (partitioned under ZeRO-3, replicated otherwise).
    - FSDP v1: replicated on every device (FSDP1 wrapping of a frozen model is not supported here).
    """
    from accelerate.utils import DistributedType

    model = model.eval().requires_grad_(False)
    state = accelerator.state
    if state.distributed_type == DistributedType.DEEPSPEED:
        from ..models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    if state.distributed_type == DistributedType.FSDP and getattr(state.fsdp_plugin, "fsdp_version", 1) == 2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        model = fsdp2_prepare_model(accelerator, model.to(accelerator.device))
        model.set_reshard_after_forward(True)  # Accelerate keeps the head group gathered for a backward; none here
        return model.eval()
    return model.to(accelerator.device)


def loss_prediction_step(self: Any, model, inputs, prediction_loss_only, ignore_keys=None):
    """`prediction_step` through `compute_loss`, for trainers whose batches carry no `labels` (DPO, KTO, BCO assign
    it as their method): the loss, and with `return_outputs` the logits and `input_ids`."""
    inputs = self._prepare_inputs(inputs)
    with torch.no_grad(), self.compute_loss_context_manager():
        if prediction_loss_only:
            return self.compute_loss(model, inputs).detach(), None, None
        loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
    return loss.detach(), outputs.logits, inputs["input_ids"]
