"""What `ORPOTrainer` and `CPOTrainer` share: loading, data, the concatenated chosen + rejected forward, metrics.

Both are TRL 1.16 experimental trainers without a reference model. A subclass says how its sequence log-probs are
reduced (`average_logps`), which tokens its NLL term covers (`nll_tokens`), whether `logits/*` includes the last
position (`logits_include_last`), and turns a `PairedForward` into a loss with `preference_loss`.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import random
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from transformers import (
    AutoModelForCausalLM,
    DataCollator,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    TrainerCallback,
    TrainingArguments,
    is_comet_available,
)
from transformers.trainer_utils import EvalPrediction

from ..data.collators import DataCollatorForPreference, pad
from ..data.reference_free_dataset import prepare_reference_free_dataset
from ..data.vision import refuse_image_columns
from ..losses import masked_mean_nll, preference_metrics, sequence_logps
from ..models import packed_attention
from .base_trainer import BaseTrainer, init_arguments
from .preference_forward import pack_rows, packed_token_outputs
from .reference_free_config import ReferenceFreeConfig
from .utils import log_table_to_comet_experiment

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512  # what TRL's ORPO / CPO fall back to when `max_length=None`


class PairedForward(NamedTuple):
    """The policy's view of a batch of B pairs, from one forward pass over its 2B sequences (chosen first)."""

    chosen_logps: torch.Tensor
    """[B] sequence log-probs of the chosen completions (sum or per-token average, see `average_logps`)."""
    rejected_logps: torch.Tensor
    """[B] the same for the rejected completions."""
    nll_loss: torch.Tensor
    """Token-mean NLL of the chosen sequences (see `nll_tokens`); 0 when the trainer needs none."""
    chosen_mean_logits: torch.Tensor
    """Detached mean logit of the chosen rows, over the vocabulary and every position, padding included (TRL's
    `logits/chosen`); over the real positions only when packed (no padding is computed)."""
    rejected_mean_logits: torch.Tensor
    """The same for the rejected rows."""
    aux_loss: torch.Tensor | None
    """MoE load-balancing loss, when the model returns one."""


class ReferenceFreePreferenceTrainer(BaseTrainer):
    """Base of `ORPOTrainer` and `CPOTrainer`; the signature is TRL 1.16's experimental one.

    Subclasses set `config_class`, `_name`, `_tag_names`, `average_logps` and `nll_tokens` (attributes or
    properties), and implement `preference_loss`.
    """

    config_class = ReferenceFreeConfig
    dataset_description = "a preference dataset ('chosen' / 'rejected')"
    loss_is_scaled_for_ga = False  # `compute_loss` returns a per-batch mean; `Trainer` divides it for accumulation
    logits_include_last = False
    """Whether `logits/*` averages over every position (TRL's CPO) or every position but the last (TRL's ORPO)."""

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        args: ReferenceFreeConfig | TrainingArguments | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        model_init: Callable[[], PreTrainedModel] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        peft_config: Any = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
    ):
        super().__init__(**init_arguments(locals()))

    # ----------------------------------------------------------------------------------------------- setup
    def check_inputs(self, args: ReferenceFreeConfig, *, model, model_init, train_dataset, **inputs) -> None:
        if model is None and model_init is None:
            raise ValueError(
                f"{type(self).__name__} needs a model: pass `model` (a name, a path or a PreTrainedModel) or "
                "`model_init`."
            )
        super().check_inputs(args, train_dataset=train_dataset)
        if not isinstance(model, str) and args.model_init_kwargs is not None:
            raise ValueError(
                "`model_init_kwargs` is set but the model is already instantiated; pass the model's name or path, or "
                "unset `model_init_kwargs`."
            )
        if args.generate_during_eval and not _loggers_for_generations(args.report_to):
            raise ValueError(
                "`generate_during_eval=True` logs completions to Weights & Biases or Comet: install `wandb` or "
                "`comet-ml` and include it in `report_to`, or set `generate_during_eval=False`."
            )
        if args.max_length is None:
            logger.warning("`max_length` is None; using %d, as TRL does. Set it explicitly.", DEFAULT_MAX_LENGTH)

    def load_model(self, model: Any, args: ReferenceFreeConfig, quantization_config: Any) -> PreTrainedModel:
        """A causal LM, loaded in the checkpoint's dtype (as TRL's experimental trainers)."""
        load_args = copy.copy(args)
        load_args.model_init_kwargs = {"dtype": "auto", **(args.model_init_kwargs or {})}
        model = self.prepare_model(model, load_args, auto_class=AutoModelForCausalLM)
        if model.config.is_encoder_decoder or args.is_encoder_decoder:
            raise ValueError(
                f"{type(self).__name__} trains decoder-only causal LMs; {type(model).__name__} is an encoder-decoder. "
                "Use a causal LM (AutoModelForCausalLM)."
            )
        return model

    def configure_tokenizer(self, model: PreTrainedModel, args: ReferenceFreeConfig) -> None:
        padding_value = getattr(args, "padding_value", None)
        self.padding_value = self._tokenizer.pad_token_id if padding_value is None else padding_value

    @property
    def max_length(self) -> int:
        """`max_length`, or TRL's fallback when it is None."""
        return self.args.max_length or DEFAULT_MAX_LENGTH

    @property
    def aux_loss_coef(self) -> float:
        """TRL's name of `router_aux_loss_coef` here."""
        return self.router_aux_loss_coef

    def configure(self, model: PreTrainedModel, args: ReferenceFreeConfig, train_dataset: Any) -> None:
        where = f"{type(args).__name__}.packed_forward"
        self._packed = packed_attention.prepare((model,), getattr(args, "packed_forward", None), where)

    _packed = False
    """Whether the forward runs on packed rows (`packed_forward`)."""

    def default_collator(self, args: ReferenceFreeConfig) -> DataCollatorForPreference:
        return DataCollatorForPreference(pad_token_id=self.padding_value)

    def logprob_head(self, args: ReferenceFreeConfig) -> dict[str, Any]:
        return {"outputs": ("mean_logits",)}

    # ----------------------------------------------------------------------------------------- subclass hooks
    average_logps: bool
    """Whether sequence log-probs are per-token averages (True) or sums (False); set by each subclass."""
    nll_tokens: Literal["sequence", "completion"] | None
    """The tokens of the chosen sequences the NLL term averages over (every real token, or the completion's); None
    when there is no NLL term. Set by each subclass."""

    def preference_loss(
        self, forward: PairedForward
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """`(loss, chosen_rewards, rejected_rewards, extra_metrics)` for one batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement `preference_loss`.")

    # ------------------------------------------------------------------------------------------------- data
    def prepare_dataset(self, dataset, name: str, args: ReferenceFreeConfig):
        refuse_image_columns(dataset, type(self).__name__, name)
        return prepare_reference_free_dataset(
            dataset, self._tokenizer, max_length=self.max_length, num_proc=args.dataset_num_proc, name=name
        )

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids"]

    # ------------------------------------------------------------------------------------------------ loss
    def concatenated_forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> PairedForward:
        """One fused forward over the 2B chosen-then-rejected rows, without building the logits.

        Packed (`packed_forward`), each pair's prompt runs once and no padding is computed: the losses are the padded
        ones, and `logits/*` averages over the real positions (the padded layout's TRL value also counts the padding).
        """
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        length = input_ids.size(1)
        # One more (masked) padding column, so the head also projects the last position of every row: TRL's
        # `logits/*` averages over it (CPO). Causal attention leaves the other positions unchanged.
        padded_ids = F.pad(input_ids, (0, 1), value=self.padding_value)
        kwargs = {"output_router_logits": True} if self.aux_loss_enabled else {}
        targets = padded_ids[:, 1:]  # every position is scored: the masks below pick what each term needs
        rows = None
        if self._packed:
            rows = pack_rows(input_ids, attention_mask, targets, share_pairs=not self.aux_loss_enabled)
        if rows is not None:
            outputs = packed_token_outputs(model, rows, targets, **kwargs)
        else:
            outputs = model(
                input_ids=padded_ids,
                attention_mask=F.pad(attention_mask, (0, 1), value=0),
                labels=padded_ids,
                token_logprobs=True,
                **kwargs,
            )
        # Position t scores token t + 1; the last one scores the added column and is in no mask. (Prompt-learning
        # PEFT prepends virtual tokens to the outputs: keep the positions of the real tokens.)
        log_probs, mean_logits = outputs.log_probs[:, -length:], outputs.mean_logits[:, -length:].detach()
        next_in_completion = F.pad(batch["completion_mask"][:, 1:], (0, 1))
        logps = sequence_logps(log_probs, next_in_completion, average=self.average_logps)
        num_pairs = input_ids.size(0) // 2
        if self.nll_tokens is None:
            nll_loss = log_probs.new_zeros(())
        else:
            nll_mask = next_in_completion if self.nll_tokens == "completion" else F.pad(attention_mask[:, 1:], (0, 1))
            nll_loss = masked_mean_nll(log_probs[:num_pairs], nll_mask[:num_pairs])
        if rows is not None:  # the real positions (the last one of each row when `logits_include_last`)
            last = rows.lengths if self.logits_include_last else rows.lengths - 1
            kept = torch.arange(length, device=last.device) < last[:, None]
            chosen_mean_logits = mean_logits[:num_pairs][kept[:num_pairs]].mean()
            rejected_mean_logits = mean_logits[num_pairs:][kept[num_pairs:]].mean()
        else:
            mean_logits = mean_logits[:, : length if self.logits_include_last else length - 1]
            chosen_mean_logits, rejected_mean_logits = mean_logits[:num_pairs].mean(), mean_logits[num_pairs:].mean()
        return PairedForward(
            chosen_logps=logps[:num_pairs],
            rejected_logps=logps[num_pairs:],
            nll_loss=nll_loss,
            chosen_mean_logits=chosen_mean_logits,
            rejected_mean_logits=rejected_mean_logits,
            aux_loss=outputs.aux_loss,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        forward = self.concatenated_forward(model, inputs)
        loss, chosen_rewards, rejected_rewards, extra = self.preference_loss(forward)
        loss = self.add_router_aux_loss(loss, forward.aux_loss, mode)
        gather = self.accelerator.gather_for_metrics
        metrics = preference_metrics(
            chosen_rewards, rejected_rewards, forward.chosen_logps, forward.rejected_logps, gather=gather
        )
        scalars = {
            "logits/chosen": forward.chosen_mean_logits,
            "logits/rejected": forward.rejected_mean_logits,
            "nll_loss": forward.nll_loss,
            **extra,
        }
        metrics.update({key: gather(value.detach().reshape(1)).mean().item() for key, value in scalars.items()})
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval loss, and as "logits" the batch's `[logits/chosen, logits/rejected]` (TRL's layout)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, metrics = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        if ignore_keys is None:
            ignore_keys = getattr(getattr(model, "config", None), "keys_to_ignore_at_inference", None) or []
        keys = [key for key in ("logits/chosen", "logits/rejected") if f"eval_{key}" not in ignore_keys]
        logits = torch.tensor([metrics[key] for key in keys], device=self.accelerator.device)
        return loss.detach(), logits, torch.zeros(logits.shape[0], device=self.accelerator.device)

    # ----------------------------------------------------------------------------------------------- eval
    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        if self.args.generate_during_eval and self.is_world_process_zero():
            self.log_generations(dataloader.dataset)
        return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)

    def log_generations(self, dataset: Dataset) -> list[list[str]]:
        """Sample a completion for `eval_batch_size` random prompts of `dataset` and log a `game_log` table of
        (prompt, completion) rows to the W&B / Comet runs `report_to` names; return the rows."""
        indices = random.sample(range(len(dataset)), k=min(self.args.eval_batch_size, len(dataset)))
        prompts = [torch.as_tensor(dataset[i]["prompt_ids"]) for i in indices]
        device = self.accelerator.device
        input_ids = pad(prompts, self.padding_value, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(p) for p in prompts], 0, padding_side="left").to(device)
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_length=self.max_length,
                do_sample=True,
                pad_token_id=self.padding_value,
            )
        decode = self._tokenizer.batch_decode
        rows = [
            [prompt, completion]
            for prompt, completion in zip(
                decode(input_ids, skip_special_tokens=True),
                decode(output[:, input_ids.size(1) :], skip_special_tokens=True),
            )
        ]
        for log_table in _loggers_for_generations(self.args.report_to):
            log_table(rows)
        return rows


def _loggers_for_generations(report_to: list[str] | str | None) -> list[Callable[[list[list[str]]], None]]:
    """Table loggers for the integrations in `report_to` that are installed (W&B, Comet)."""
    report_to = [report_to] if isinstance(report_to, str) else list(report_to or [])
    loggers = []
    if ("wandb" in report_to or "all" in report_to) and importlib.util.find_spec("wandb") is not None:
        loggers.append(_log_wandb_table)
    if ("comet_ml" in report_to or "all" in report_to) and is_comet_available():
        loggers.append(_log_comet_table)
    return loggers


def _log_wandb_table(rows: list[list[str]]) -> None:
    import wandb

    wandb.log({"game_log": wandb.Table(columns=["Prompt", "Policy"], data=rows)})


def _log_comet_table(rows: list[list[str]]) -> None:
    import pandas as pd

    log_table_to_comet_experiment("game_log.csv", pd.DataFrame(rows, columns=["Prompt", "Policy"]))
