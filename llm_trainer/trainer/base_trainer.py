"""The `transformers.Trainer` subclass every llm_trainer algorithm extends."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Self

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..distributed import warn_if_not_sharded
from ..generation.base import Generator
from ..generation.loop import GenerationLoop, OnlineBatch, check_streaming, streaming_loader
from ..modeling import (
    add_token_logprob_head,
    configure_router_aux_loss,
    prepare_model,
    prepare_peft,
    prepare_processing_class,
)
from ..models.vision import (
    allow_unused_vision_parameters,
    freeze_vision_tower,
    is_vision_model,
    load_checkpoint_weights,
)
from . import reference_cache, simple
from .checkpointing import (
    full_model_save,
    last_complete_checkpoint,
    remove_stale_staging,
    rotate_checkpoints,
    staged_folder,
)
from .reference_policy import ReferencePolicy
from .utils import disable_dropout_in_model

logger = logging.getLogger(__name__)
_TRAINER_PARAMETERS = inspect.signature(Trainer.__init__).parameters

NUM_TOKENS_NAME = "num_tokens.json"
"""A checkpoint's running total of training tokens (the `num_tokens` metric)."""


def init_arguments(local_variables: dict[str, Any]) -> dict[str, Any]:
    """A trainer `__init__`'s arguments, from `locals()` taken before anything else, as the keywords it forwards to
    `BaseTrainer.__init__`: `super().__init__(**init_arguments(locals()))` keeps TRL's signature on the trainer
    and every step of the construction in `BaseTrainer`."""
    return {name: value for name, value in local_variables.items() if name not in ("self", "__class__")}


class BaseTrainer(Trainer):
    """What every trainer shares: config resolution, model and tokenizer loading, PEFT, metrics and the model card.

    Subclasses set `config_class`, `_name` and `_tag_names`, and record per-step metrics with
    `self._metrics[mode][name].append(value)`; `log` averages them, with an `eval_` prefix during evaluation.
    """

    config_class: type[TrainingArguments] = TrainingArguments
    _skip_nan_metrics = False  # average the non-NaN values only (a metric that is NaN throughout logs None)
    _name = "Base"
    _tag_names: list[str] = []

    maybe_activation_offload_context: contextlib.AbstractContextManager = nullcontext()
    """Entered around each `training_step` (TRL's attribute): with `args.activation_offloading` (SFT, reward, DPO,
    KTO configs), `__init__` sets it to `get_act_offloading_ctx_manager(model)`, which keeps the activations saved for
    backward in CPU memory; a reusable no-op otherwise."""

    loss_is_scaled_for_ga: bool | None = None
    """Whether `compute_loss` already divides by the gradient-accumulation steps (`Trainer` reads it from 5.19 on)."""

    reference: ReferencePolicy | None = None  # built by the `reference_policy` hook
    reference_columns: tuple[str, ...] = ()  # filled by `reference_batch_logps` when precomputed
    dataset_description = "the dataset to train on"  # for the error about a missing `train_dataset`

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        args: TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        *,
        ref_model: str | PreTrainedModel | None = None,
        peft_config: Any = None,
        quantization_config: Any = None,
        model_init: Callable[[], PreTrainedModel] | None = None,
        compute_loss_func: Callable | None = None,
        **options: Any,
    ):
        """Build the trainer, once, through hooks a trainer overrides, in the order they run below. Trainers keep
        TRL's signature and forward every argument here (`init_arguments`); `options` holds `Trainer.__init__`'s
        other keywords (`callbacks`, `optimizers`, ...) and the trainer's own (`set_options`)."""
        if isinstance(model, Mapping):  # the simple API's nested-dict form: a trainer that `fit` builds
            self._pending_build = simple.pending_from_dict(type(self), model)
            return
        trainer_kwargs = {key: options.pop(key) for key in list(options) if key in _TRAINER_PARAMETERS}
        self.args = args = self.resolve_args(args, model)  # hooks may read `self.args` before `Trainer.__init__`
        self.set_options(args, **options)
        self.check_inputs(
            args,
            model=model,
            ref_model=ref_model,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            model_init=model_init,
            compute_loss_func=compute_loss_func,
        )
        if isinstance(train_dataset, IterableDataset):  # each process reads its own batches of a stream
            args.accelerator_config.dispatch_batches = False
        model = self.load_model(
            model if model is not None or model_init is None else model_init(), args, quantization_config
        )
        if isinstance(ref_model, str):
            ref_model = self.prepare_model(ref_model, args, quantization_config)
        processing_class = self.prepare_processing_class(model, processing_class, args)
        self._tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.configure_tokenizer(model, args)
        model = self.prepare_peft(model, peft_config, args)
        self.prepare_vision_tower(model, args)
        self.reference = self.reference_policy(model, ref_model, peft_config, args)
        self.configure(model, args, train_dataset)
        if getattr(args, "disable_dropout", False):
            for module in (model, self.ref_model):
                if module is not None:
                    disable_dropout_in_model(module)
        if data_collator is None:
            data_collator = self.default_collator(args)
        if train_dataset is not None:
            train_dataset = self._prepare(train_dataset, "train", args)
        if eval_dataset is not None:
            eval_dataset = self.prepare_eval_dataset(eval_dataset, args)
        super().__init__(
            model=self.trainer_model(model, args),
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            **trainer_kwargs,
        )
        warn_if_not_sharded(self.accelerator, args)  # FSDP/ZeRO asked but not happening (e.g. CPU: DDP instead)
        if self.loss_is_scaled_for_ga is not None and not hasattr(Trainer, "loss_is_scaled_for_ga"):
            self.model_accepts_loss_kwargs = False  # transformers < 5.19 reads these two instead
            if self.loss_is_scaled_for_ga:
                self.compute_loss_func = lambda *args, **kwargs: None
        self._metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._total_train_tokens = 0  # see `_log_num_tokens`
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        self._tp_size = parallelism.tp_size if parallelism is not None else 1  # TP ranks see the same batch
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(["llm-trainer", *self._tag_names])
        if getattr(self.args, "activation_offloading", False):
            from ..models.activation_offloading import get_act_offloading_ctx_manager

            self.maybe_activation_offload_context = get_act_offloading_ctx_manager(model=self.model)
        self.router_aux_loss_coef = self.router_aux_loss(model, args)
        self.aux_loss_enabled = bool(self.router_aux_loss_coef)  # TRL's switch: False leaves the router loss out
        head = self.logprob_head(args)
        if head is not None:
            add_token_logprob_head(model.get_base_model() if is_peft_model(model) else model, **head)
        if self.reference is not None:
            self.reference.place(self, head, prepare=self.prepare_reference)
            if self.reference.precompute:
                self.train_dataset = self.precompute_reference(self.train_dataset, "train")
                if self.eval_dataset is not None:
                    self.eval_dataset = self.precompute_reference(self.eval_dataset, "eval")
        self.finish_init(args)

    # ------------------------------------------------------------------------------------- constructor hooks
    def set_options(self, args: TrainingArguments, **options: Any) -> None:
        """Keep the trainer's own constructor arguments; none here."""
        if options:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(options)}.")

    def check_inputs(self, args: TrainingArguments, *, train_dataset: Any, **inputs: Any) -> None:
        """Reject unusable constructor arguments (`inputs`: the others, as given) before anything loads; checks only."""
        self.check_train_dataset(train_dataset, self.dataset_description)

    def load_model(self, model: Any, args: TrainingArguments, quantization_config: Any) -> PreTrainedModel:
        """The policy, loaded by name or path, or checked when loaded (`prepare_model`)."""
        return self.prepare_model(model, args, quantization_config)

    def configure_tokenizer(self, model: PreTrainedModel, args: TrainingArguments) -> None:
        """Make `self._tokenizer` and `model` agree on special tokens, before PEFT wrapping; nothing here."""

    def prepare_vision_tower(self, model: PreTrainedModel, args: TrainingArguments) -> None:
        """`freeze_vision_tower=True` (SFT, DPO, KTO, GRPO, RLOO): no gradient into the VLM's vision encoder and
        projector (adapters put there included); a `ValueError` on a text-only model. A VLM lets DDP look for unused
        parameters, as TRL sets it: a batch without images leaves the vision tower without gradients."""
        allow_unused_vision_parameters(args, model)
        if getattr(args, "freeze_vision_tower", False):
            count = freeze_vision_tower(model)
            logger.info("freeze_vision_tower: froze %d vision-encoder and projector parameters.", count)

    def reference_policy(
        self, model: PreTrainedModel, ref_model: PreTrainedModel | None, peft_config: Any, args: TrainingArguments
    ) -> ReferencePolicy | None:
        """The trainer's reference policy (`ReferencePolicy.for_policy`), None for trainers without one."""
        return None

    prepare_reference = True  # a separate reference model is placed by `accelerator.prepare_model`, else `.to`

    def configure(self, model: PreTrainedModel, args: TrainingArguments, train_dataset: Any) -> None:
        """Own set-up from the (PEFT) policy and the raw training set, before the datasets and `Trainer.__init__`."""

    def default_collator(self, args: TrainingArguments) -> Any:
        """The collator used when none is passed; None lets `Trainer` pick its default."""
        return None

    def trainer_model(self, model: PreTrainedModel, args: TrainingArguments) -> torch.nn.Module:
        """The module `Trainer` trains and saves: the policy itself, unless a trainer wraps it (PPO)."""
        return model

    def router_aux_loss(self, model: PreTrainedModel, args: TrainingArguments) -> float:
        """The MoE load-balancing loss coefficient (0: off): `args.router_aux_loss_coef` where the config has it, else
        the model config's when it outputs router logits (TRL's experimental trainers)."""
        if hasattr(args, "router_aux_loss_coef"):
            return self.configure_router_aux_loss(model, args.router_aux_loss_coef)
        config = model.config.get_text_config()
        return getattr(config, "router_aux_loss_coef", 0.0) if getattr(config, "output_router_logits", False) else 0.0

    def logprob_head(self, args: TrainingArguments) -> dict[str, Any] | None:
        """`add_token_logprob_head` keywords for the policy (the reference gets no per-token `outputs`); None: none."""
        return None

    def reference_batch_logps(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """The reference log-probs of one collated batch, by `reference_columns` name (to precompute)."""
        raise NotImplementedError(f"{type(self).__name__} does not precompute reference log-probs.")

    cache_reference_logps = True
    """Whether `precompute_reference` caches the columns on disk (`reference_cache`; `LLM_TRAINER_REF_CACHE=0` too)."""

    def precompute_reference(self, dataset: Any, name: str) -> Any:
        """`dataset` (or a dict of them) with the reference log-prob columns added: loaded from the on-disk cache
        when an earlier run computed them for the same reference, data, tokenizer and config, else computed
        (`ReferencePolicy.precompute_columns`) and cached (`reference_cache.cached_reference_columns`)."""
        if isinstance(dataset, dict):
            return {key: self.precompute_reference(part, key) for key, part in dataset.items()}

        def compute(data: Any) -> Any:
            return self.reference.precompute_columns(
                self, data, name, self.reference_columns, self.reference_batch_logps
            )

        columns = self.reference_columns
        if (
            not reference_cache.cache_enabled(self)
            or not isinstance(dataset, Dataset)
            or (columns and columns[0] in dataset.column_names)
        ):
            return compute(dataset)  # also raises the clear errors (a stream, `evaluate` after training started)
        model = self.ref_model if self.ref_model is not None else self.model
        return reference_cache.cached_reference_columns(self, dataset, name, columns, compute, model)

    def finish_init(self, args: TrainingArguments) -> None:
        """The trainer's own set-up, last; nothing here."""

    @property
    def ref_model(self) -> torch.nn.Module | None:
        """TRL's attribute: the separate frozen reference model, if any."""
        return self.reference.model if self.reference is not None else None

    @property
    def precompute_ref_logps(self) -> bool:
        """TRL's attribute: whether the reference log-probs are precomputed."""
        return self.reference is not None and self.reference.precompute

    def add_router_aux_loss(
        self, loss: torch.Tensor, aux_loss: torch.Tensor | None, mode: str, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """`loss` plus the MoE load-balancing term `router_aux_loss_coef * aux_loss`, recorded as `aux_loss`, divided
        by the accumulation steps iff the loss already is (`loss_is_scaled_for_ga`; when None, iff normalised by
        `num_items_in_batch` in training); otherwise `Trainer` divides the sum."""
        if not self.aux_loss_enabled or aux_loss is None:
            return loss
        self.log_router_aux_loss(aux_loss, mode)
        return loss + self.router_aux_weight(mode, num_items_in_batch) * aux_loss

    def router_aux_weight(self, mode: str, num_items_in_batch: Any = None) -> float:
        """The weight `add_router_aux_loss` gives the MoE load-balancing loss (0.0 when it is left out)."""
        if not self.aux_loss_enabled:
            return 0.0
        scaled = self.loss_is_scaled_for_ga
        scaled = num_items_in_batch is not None if scaled is None else scaled
        steps = self.current_gradient_accumulation_steps if scaled and mode == "train" else 1
        return self.router_aux_loss_coef / steps

    def log_router_aux_loss(self, aux_loss: torch.Tensor, mode: str) -> None:
        """Record the MoE load-balancing loss as the `aux_loss` metric, averaged over processes."""
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())

    @classmethod
    def resolve_args(cls, args: TrainingArguments | None, model: str | PreTrainedModel) -> TrainingArguments:
        """Return `args` as this trainer's config: a default one named after the model when None, converted from
        plain `TrainingArguments` otherwise."""
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            return cls.config_class(f"{Path(str(name or 'model')).name}-{cls._name}")
        if not isinstance(args, cls.config_class):
            values = args.to_dict()
            values["hub_token"] = args.hub_token  # `to_dict` hides it
            return cls.config_class(**values)
        return args

    @staticmethod
    def check_train_dataset(train_dataset: Any, what: str = "the dataset to train on") -> None:
        """Require a non-empty `datasets.Dataset` or an `IterableDataset`; `what` says what to pass."""
        if train_dataset is None:
            raise ValueError(f"`train_dataset` is required: pass {what}.")
        if not isinstance(train_dataset, Dataset | IterableDataset):
            raise TypeError(
                f"`train_dataset` must be a `datasets.Dataset` or `IterableDataset`, got {type(train_dataset).__name__}."
            )
        if isinstance(train_dataset, Dataset) and len(train_dataset) == 0:
            raise ValueError(f"The train dataset is empty (0 rows): pass {what}, with at least one row.")

    def check_enough_rows(self) -> None:
        """Raise a `ValueError` when the (prepared) training set cannot fill one batch that its sampler keeps: training
        would take no step, or fail inside `transformers` on an empty dataloader."""
        dataset = self.train_dataset
        rule = self.min_train_rows()
        if not isinstance(dataset, Dataset) or rule is None:
            return
        needed, why, fix = rule
        if len(dataset) < needed:
            raise ValueError(
                f"The train dataset has {len(dataset)} rows once prepared, too few for one batch: {why}. {fix}"
            )

    def min_train_rows(self) -> tuple[int, str, str] | None:
        """The fewest training rows that fill one batch the sampler keeps, with why and how to fix a shortfall; None
        when any non-empty dataset trains (an incomplete last batch is kept)."""
        if self.generation is not None:
            return self.generation.geometry.min_train_rows()
        if not self.args.dataloader_drop_last:
            return None
        needed = self.args.per_device_train_batch_size * self.args.world_size
        why = f"`dataloader_drop_last=True` drops a batch of fewer than {needed} rows (per device x processes)"
        return needed, why, "Lower `per_device_train_batch_size`, add rows, or set `dataloader_drop_last=False`."

    def prepare_dataset(self, dataset: Dataset | IterableDataset, name: str, args: TrainingArguments):
        """Turn a raw dataset into this trainer's model inputs; `name` is "train", "eval" or an eval-dict key.

        Trainers override it; `prepare_eval_dataset` and `evaluate` route every eval dataset through it.
        """
        return dataset

    def prepare_eval_dataset(self, eval_dataset: Any, args: TrainingArguments | None = None) -> Any:
        """`prepare_dataset` applied to an eval dataset, or to each dataset of a dict of them."""
        args = args or self.args
        if isinstance(eval_dataset, dict):
            return {name: self._prepare(dataset, name, args) for name, dataset in eval_dataset.items()}
        return self._prepare(eval_dataset, "eval", args)

    def _prepare(self, dataset: Any, name: str, args: TrainingArguments) -> Any:
        with args.distributed_state.local_main_process_first():  # the others then read the main's `datasets` cache
            return self.prepare_dataset(dataset, name, args)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """As `Trainer.evaluate`, preparing (and scoring by the reference, when precomputed) a raw dataset passed
        here the same way as at construction; a dict of them is evaluated one dataset at a time."""
        if eval_dataset is None or isinstance(eval_dataset, str):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        eval_dataset = self.prepare_eval_dataset(eval_dataset)
        if self.precompute_ref_logps:
            eval_dataset = self.precompute_reference(eval_dataset, "eval")
        if not isinstance(eval_dataset, dict):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = {}
        for name, dataset in eval_dataset.items():  # prepared: not through `self.evaluate`, which would redo it
            metrics.update(super().evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
        return metrics

    def training_step(self, *args, **kwargs):
        """As `Trainer.training_step`, under `maybe_activation_offload_context` (see `__init__`); a trainer with a
        `generation` loop also logs `step_time`, the seconds of an optimizer step's micro-steps."""
        start = time.perf_counter()
        with self.maybe_activation_offload_context:
            loss = super().training_step(*args, **kwargs)
        if self.generation is not None:
            seconds = self.generation.time_step(time.perf_counter() - start, self.current_gradient_accumulation_steps)
            if seconds is not None:
                self._metrics["train"]["step_time"].append(seconds)
        return loss

    @contextlib.contextmanager
    def unwrapped_for_generation(self, select: Callable[[Any], Any] | None = None) -> Iterator[Any]:
        """The model as `generate` needs it (`llm_trainer.models.unwrap_model_for_generation`: unwrapped, gradient
        checkpointing paused, ZeRO-3 parameters gathered when `ds3_gather_for_generation` is set), then
        `select(model)` when given (e.g. the policy of a policy-and-value wrapper)."""
        from ..models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(
            self.model_wrapped,
            self.accelerator,
            gather_deepspeed3_params=getattr(self.args, "ds3_gather_for_generation", True),
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        ) as model:
            yield select(model) if select is not None else model

    # Loading, shared with trainers that load further models (reward, value, teacher): see `modeling`.
    configure_router_aux_loss = staticmethod(configure_router_aux_loss)
    prepare_model = staticmethod(prepare_model)
    prepare_processing_class = staticmethod(prepare_processing_class)
    prepare_peft = staticmethod(prepare_peft)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged per-step metrics of the current mode to `logs`, then log as `Trainer` does."""
        mode = "train" if self.model.training else "eval"
        metrics = {}
        for key, values in self._metrics[mode].items():
            if self._skip_nan_metrics:
                values = [value for value in values if not math.isnan(value)]
                metrics[key] = sum(values) / len(values) if values else None
            elif values:
                metrics[key] = sum(values) / len(values)
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{key}": value for key, value in metrics.items()})
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def _log_num_tokens(self, mode: str, local_tokens: torch.Tensor) -> None:
        """Record the `num_tokens` metric: the training tokens seen so far. In training, this process's
        `local_tokens` for the batch are first summed over processes (once per tensor-parallel group, whose ranks
        share a batch) and added. The total is saved with checkpoints, so a resumed run continues it."""
        if mode == "train":
            self._total_train_tokens += int(gather_sum(self, local_tokens).item()) // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    # ------------------------------------------------------------------------------------------- checkpoints
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any):
        """As `Trainer.train`; `resume_from_checkpoint=True` resumes from the newest *complete* checkpoint in
        `output_dir`, skipping (with a warning) a newer one whose save was cut off."""
        self.require_built()
        self.check_enough_rows()
        checkpoint = self.checkpoint_to_resume(resume_from_checkpoint, trial)
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)

    def checkpoint_to_resume(self, resume_from_checkpoint: str | bool | None, trial: Any = None) -> str | None:
        """The checkpoint folder `train(resume_from_checkpoint=...)` resumes from: the one given, the newest complete
        one in `output_dir` for True, None for None/False. Clears staging folders left by a killed save."""
        output_dir = self._get_output_dir(trial)
        if self.args.should_save:
            remove_stale_staging(output_dir)
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True:
            checkpoint = last_complete_checkpoint(output_dir)
            if checkpoint is None:
                raise ValueError(
                    f"No complete checkpoint found in output directory ({output_dir}) to resume from; pass a "
                    "checkpoint path, or `resume_from_checkpoint=None` to start from scratch."
                )
            return checkpoint
        checkpoint = os.fspath(resume_from_checkpoint)
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"The checkpoint folder {checkpoint} to resume from does not exist.")
        return checkpoint

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        """As `Trainer._init_training_state`, except that a run resumed at or past `max_steps` trains nothing more
        (transformers would run one step past `max_steps` when the run ended mid-epoch)."""
        epochs_trained, steps_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if resume_from_checkpoint is not None and self.state.global_step >= max_steps:
            logger.warning(
                f"The checkpoint {resume_from_checkpoint} is at step {self.state.global_step}, which already reaches "
                f"the {max_steps} steps of this run: nothing left to train. Raise `max_steps` (or "
                "`num_train_epochs`) to train further."
            )
            return num_train_epochs, 0  # no epoch left to run
        return epochs_trained, steps_trained

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As `Trainer.save_model`; under FSDP with sharded state dicts a user's call still writes the gathered,
        `from_pretrained`-loadable model (transformers would silently write none)."""
        with full_model_save(self, _internal_call):
            super().save_model(output_dir, _internal_call=_internal_call)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """As `Trainer._load_from_checkpoint`; a full (non-PEFT, unsharded) VLM reads its weights through
        `from_pretrained`'s key conversions, which transformers' plain `load_state_dict` would miss silently."""
        target = self.model if model is None else model
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if isinstance(target, PreTrainedModel) and is_vision_model(target) and not sharded:
            load_checkpoint_weights(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_checkpoint(self, model, trial):
        """As `Trainer._save_checkpoint`, but written into a staging folder and renamed into place when complete, so
        that a kill at any moment leaves whole checkpoints only (see `checkpointing`)."""
        self.create_model_card(model_name=self.args.hub_model_id or Path(self.args.output_dir).name)
        run_dir = self._get_output_dir(trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self._pending_push = None
        with staged_folder(final, self.accelerator, self.args.should_save) as staged:
            self._staging_root = os.path.dirname(staged)
            try:
                super()._save_checkpoint(model, trial)  # into `staged` (see `_get_output_dir`)
            finally:
                self._staging_root = None
            self._save_extra_state(staged)
            best = self.state.best_model_checkpoint
            if best is not None and os.path.normpath(best) == os.path.normpath(staged):
                self.state.best_model_checkpoint = final
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        if self.args.should_save:
            rotate_checkpoints(self, run_dir)
        if self._pending_push is not None:
            self._pending_push = None
            super()._push_from_checkpoint(final)

    def _get_output_dir(self, trial) -> str:
        staging_root = getattr(self, "_staging_root", None)
        return staging_root if staging_root is not None else super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if getattr(self, "_staging_root", None) is not None:
            self._pending_push = checkpoint_folder  # pushed from its final place once renamed there
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_extra_state(checkpoint)

    def _save_extra_state(self, folder: str) -> None:
        """Write trainer-specific state (running statistics, buffered generations, ...) into the checkpoint `folder`
        while it is still being staged: here the `num_tokens` total. Trainers with more state override this and
        `_load_extra_state`, calling super() first."""
        if self._total_train_tokens and self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, NUM_TOKENS_NAME), "w", encoding="utf-8") as f:
                json.dump({"num_tokens": self._total_train_tokens}, f)
        if self.generation is not None:
            self.generation.save(folder, self.accelerator.process_index, self.accelerator.num_processes)

    def _load_extra_state(self, folder: str) -> None:
        """Restore what `_save_extra_state` wrote, when training resumes from the checkpoint `folder`."""
        path = os.path.join(folder, NUM_TOKENS_NAME)
        self._total_train_tokens = 0
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self._total_train_tokens = json.load(f)["num_tokens"]
        if self.generation is not None:
            step = self.state.global_step * self.args.gradient_accumulation_steps
            self.generation.load(folder, self.accelerator.process_index, self.accelerator.num_processes, step)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ) -> None:
        """Write a `README.md` model card in `output_dir` (`llm_trainer.trainer.utils.generate_model_card`): base
        model, dataset, trainer, tags, tracker links and framework versions."""
        if not self.is_world_process_zero():
            return
        from .utils import generate_model_card, get_comet_experiment_url, get_trackio_space_url

        base_model = getattr(self.model.config, "_name_or_path", None)
        base_model = base_model if base_model and not os.path.isdir(base_model) else None
        tags = {tags} if isinstance(tags, str) else set(tags or ())
        tags |= {"llm-trainer", *self._tag_names}
        vision = is_vision_model(self.model)
        if vision:
            tags.add("vision-language-model")
        wandb_url = None
        if "wandb" in (self.args.report_to or []):
            import wandb

            wandb_url = wandb.run.url if wandb.run is not None else None
        model_name = model_name or Path(self.args.output_dir).name
        hub_model_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id or model_name
        card = generate_model_card(
            base_model=base_model,
            model_name=model_name,
            hub_model_id=hub_model_id,
            dataset_name=dataset_name,
            tags=sorted(tags),
            wandb_url=wandb_url,
            trackio_url=get_trackio_space_url(),
            comet_url=get_comet_experiment_url(),
            trainer_name=self._name,
        )
        if vision:
            mark_vision_language_card(card, hub_model_id)
        os.makedirs(self.args.output_dir, exist_ok=True)
        card.save(os.path.join(self.args.output_dir, "README.md"))

    # ---- on-policy generation (H4): trainers that own a `GenerationLoop` (GRPO, RLOO, distillation, teacher GRPO)
    generation: GenerationLoop | None = None
    """The generation loop of an on-policy trainer (set in `finish_init`); None for the offline trainers. With one,
    the dataloaders yield whole generation batches of rows, `_prepare_inputs` turns them into this micro-step's
    `OnlineBatch` (through the trainer's `make_batch`), and checkpoints carry the generation buffer."""

    def make_batch(self, rows: list[dict[str, Any]]) -> OnlineBatch:
        """An on-policy trainer's batch for its loss, generated for the dataset `rows`."""
        raise NotImplementedError(f"{type(self).__name__} does not generate its batches.")

    @property
    def generator(self) -> Generator | None:
        """The generation back end (TRL's attribute), owned by `generation`."""
        return self.generation.generator if self.generation is not None else None

    @generator.setter
    def generator(self, generator: Generator) -> None:
        self.generation.generator = generator

    def _set_signature_columns_if_needed(self):
        if self.generation is not None and self._signature_columns is None:
            self._signature_columns = ["prompt", "image", "images"]  # rows reach `make_batch` as they are
        super()._set_signature_columns_if_needed()

    def get_train_dataloader(self) -> DataLoader:
        if self.generation is None:
            return super().get_train_dataloader()
        return self._get_dataloader(**self.generation.train_loader_kwargs(self.train_dataset, self._train_batch_size))

    def _get_eval_sampler(self, eval_dataset: Dataset):
        if self.generation is None:
            return super()._get_eval_sampler(eval_dataset)
        return self.generation.eval_sampler(eval_dataset)

    def get_eval_dataloader(self, eval_dataset: str | Dataset | IterableDataset | None = None) -> DataLoader:
        """As `Trainer.get_eval_dataloader`; an on-policy trainer's streamed dataset is repeated in the stream and
        read as `streaming_loader` says."""
        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        dataset = dataset if dataset is not None else self.eval_dataset
        if self.generation is None or not isinstance(dataset, IterableDataset):
            return super().get_eval_dataloader(eval_dataset)
        check_streaming(None, dataset, self.args)
        key = eval_dataset if isinstance(eval_dataset, str) else "eval"
        with streaming_loader(self.args, self.accelerator):
            stream = self.generation.eval_stream(dataset)
            return self._get_dataloader(stream, "Evaluation", self.args.eval_batch_size, dataloader_key=key)

    def _prepare_inputs(self, inputs: Any) -> Any:
        """On-policy training: a new generation batch every `steps_per_generation * num_iterations` micro-steps, and
        this micro-step's slice of it; evaluation: the batch as is."""
        if self.generation is None:
            return super()._prepare_inputs(inputs)
        if not self.model.training:
            return self.make_batch(inputs)
        if self.generation.needs_generation():
            self.generation.fill(self.make_batch(inputs))
        return self.generation.next_batch()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.generation is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.mean().detach(), None, None

    def record_generation(self, mode: str, tokens: int, metrics: dict[str, float]) -> None:
        """Add a generation batch's `tokens` to the `num_tokens` count (training) and record its `metrics`."""
        if mode == "train":
            self.state.num_input_tokens_seen += tokens
        self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)

    def close(self) -> None:
        """Stop the generation back end (on-policy trainers)."""
        if self.generation is not None:
            self.generation.close()

    # ---- simple API: short delegations to `llm_trainer.trainer.simple`, which holds the logic (docs/simple_api.md)
    _pending_build: simple.PendingBuild | None = None  # set until `fit` builds a trainer from `from_pretrained`
    _resume_from: str | None = None  # the checkpoint the next `fit` resumes from (`load_checkpoint`)

    @classmethod
    def from_pretrained(cls, model_name_or_path: Any, **kwargs: Any) -> Self:
        """A trainer for `model_name_or_path` (a name, a path or a loaded model) that `fit` builds; `kwargs` are its
        config fields, its constructor arguments and the simple API's friendly names (`simple.split_options`)."""
        return simple.pending(cls, simple.pending_build(cls, model_name_or_path, **kwargs))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> Self:
        """A trainer from the nested dict `{"policy": ..., "<algorithm>": ..., "data": ...}`, built by `fit` (as
        `cls(config)`, without running the constructor)."""
        return simple.pending(cls, simple.pending_from_dict(cls, config))

    def require_built(self) -> None:
        """Raise when `fit` has yet to build this trainer; bind its `llm_trainer.callbacks.Callback`s (`train`)."""
        simple.require_built(self)

    def fit(
        self,
        dataset: Any = None,
        reward_fn: Any = None,
        environment: Any = None,
        max_steps: int | None = None,
        max_epochs: float | None = None,
        callbacks: list[TrainerCallback] | None = None,
    ) -> simple.TrainingResult:
        """Build the trainer when `from_pretrained` made it (from `dataset`, `reward_fn`, `environment`), train at
        most `max_steps` / `max_epochs` (resuming from `load_checkpoint`'s checkpoint) and return the result."""
        return simple.fit(self, dataset, reward_fn, environment, max_steps, max_epochs, callbacks)

    @property
    def config(self) -> TrainingArguments:
        """The training config (`self.args`), available before `fit` too."""
        return self.args if self._pending_build is None else self._pending_build.config

    @property
    def current_step(self) -> int:
        """Optimizer steps taken (those of a loaded checkpoint before `fit`)."""
        return self.state.global_step if self._pending_build is None else self._pending_build.step

    def save_checkpoint(self, path: str | os.PathLike) -> str:
        """Save the model, tokenizer, optimizer, scheduler, RNG and trainer state to `path`; return `path`."""
        return simple.save_checkpoint(self, path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a checkpoint of `save_checkpoint` (or a `checkpoint-N`): the weights now, the rest at `fit`."""
        simple.load_checkpoint(self, path)


_VLM_QUICK_START = """```python
from transformers import pipeline

pipe = pipeline("image-text-to-text", model="{hub_model_id}", device_map="auto")
messages = [
    {{
        "role": "user",
        "content": [
            {{"type": "image", "url": "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/bee.jpg"}},
            {{"type": "text", "text": "What is in this image?"}},
        ],
    }}
]
print(pipe(text=messages, max_new_tokens=128, return_full_text=False)[0]["generated_text"])
```"""


def mark_vision_language_card(card: Any, hub_model_id: str) -> None:
    """Make a text-generation model card (`generate_model_card`) describe a vision-language model: the
    `image-text-to-text` pipeline tag, and a quick start that passes an image."""
    card.data.pipeline_tag = "image-text-to-text"
    start, end = "## Quick start\n\n", "\n\n## Training"
    head, found, rest = card.text.partition(start)
    if found and end in rest:
        body = _VLM_QUICK_START.format(hub_model_id=hub_model_id)
        card.text = head + start + body + rest[rest.index(end) :]


def gather_sum(trainer: Trainer, value: torch.Tensor) -> torch.Tensor:
    """Sum of `value` over all processes."""
    return trainer.accelerator.gather_for_metrics(value.detach().reshape(1)).sum()
