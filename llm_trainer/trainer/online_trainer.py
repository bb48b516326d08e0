"""What GRPO and RLOO share: sample prompts in groups, generate, score with reward functions, buffer, log.

`OnPolicyGenerationMixin` holds the parts that do not involve rewards, shared with `DistillationTrainer`.

One training "generation batch" (`generation_batch_size` rows: every prompt repeated `num_generations` times) is
generated and scored at once, then split into `steps_per_generation` micro-batches and reused for
`num_iterations` passes. Subclasses turn rewards into advantages (`compute_advantages`) and advantages into a loss
(`compute_loss`).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import gather, gather_object, is_peft_model, set_seed
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from transformers.utils import logging

from ..callbacks import SyncRefModelCallback
from ..data.collators import pad
from ..data.formats import is_conversational
from ..data.sampling import RepeatSampler, repeat_iterable_dataset
from ..data.validation import check_text_columns
from ..generation import make_generator
from ..generation.factory import eos_token_ids
from ..losses.policy_gradient import nanstd
from ..modeling import add_reference_adapter, add_token_logprob_head, reference_adapter
from .base_trainer import BaseTrainer
from .reward_functions import RewardFunc, RewardFunctions
from .utils import (
    disable_dropout_in_model,
    identity,
    print_prompt_completions_sample,
    shuffle_sequence_dict,
    split_tensor_dict,
)

RolloutFunc = Callable[[list[Any], Any], dict[str, Any]]

logger = logging.get_logger(__name__)

GENERATION_BUFFER_NAME = "generation_buffer_{}.pt"
"""A checkpoint's buffered generation batch, one file per process (by process index)."""


class OnPolicyGenerationMixin:
    """What every trainer that samples its own completions shares (`OnlineRLTrainer`, `DistillationTrainer`):
    prompt tokenization, padding, completion-length metrics, step timing and label-free evaluation.

    Expects `chat_template_kwargs`, `eos_token_ids`, `_tokenizer` and `pad_to_multiple_of` on the trainer, and
    `_generate_and_score_completions(rows)` to return a batch `compute_loss` accepts; batches are generated and
    buffered as `num_generations`, `steps_per_generation` and `num_iterations` say.
    """

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt", "image", "images"]

    def init_trainer(self, model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers) -> None:
        """`Trainer.__init__` without collation (the rows reach `_prepare_inputs` as they are); `nn.DataParallel`,
        which splits a generation batch arbitrarily, is refused."""
        self._step = 0
        self._step_time = 0.0
        self._buffered_inputs: list[dict[str, Any]] | None = None
        super().__init__(
            model=model,
            args=args,
            data_collator=identity,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        if args.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__} does not support `nn.DataParallel`; launch with `accelerate launch` or "
                "`torchrun`, or make one GPU visible with `CUDA_VISIBLE_DEVICES`."
            )

    # How completions are grouped and reused; GRPO/RLOO set their own in `__init__`.
    num_generations = 1
    num_generations_eval = 1
    num_iterations = 1

    @property
    def generation_batch_size(self) -> int:
        """Rows generated at once, over every process: `steps_per_generation` micro-batches' worth."""
        size = getattr(self.args, "generation_batch_size", None)
        return (
            size or self.args.per_device_train_batch_size * self.accelerator.num_processes * self.steps_per_generation
        )

    @property
    def steps_per_generation(self) -> int:
        return self.args.steps_per_generation

    @staticmethod
    def check_iterable_datasets(train_dataset: Any, eval_dataset: Any, args: Any) -> None:
        """Streamed (`IterableDataset`) prompts are repeated and grouped in the stream itself, so every process must
        read its own batches (`dispatch_batches=False`) and the training stream a single loader process."""
        evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        if not any(isinstance(dataset, IterableDataset) for dataset in (train_dataset, *evals)):
            return
        if args.accelerator_config.dispatch_batches:
            raise ValueError(
                "Iterable datasets require `dispatch_batches=False` (each process reads its own slice of the prompt "
                "stream), but `accelerator_config` sets it to True: set it to False or leave it unset."
            )
        args.accelerator_config.dispatch_batches = False
        if isinstance(train_dataset, IterableDataset) and args.dataloader_num_workers != 0:
            logger.warning(
                f"An `IterableDataset` is read with `dataloader_num_workers=0` (not {args.dataloader_num_workers}): "
                "several workers would interleave the stream and split the groups of repeated prompts."
            )
            args.dataloader_num_workers = 0

    @staticmethod
    def check_prompts(train_dataset: Any, eval_dataset: Any) -> None:
        """Every 'prompt' cell of the training and evaluation datasets is a string or a conversation."""
        evals = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]
        for name, dataset in [("train", train_dataset), *evals]:
            if isinstance(dataset, Dataset | IterableDataset):
                check_text_columns(dataset, ["prompt"], name)

    @staticmethod
    def dataset_columns(dataset: Dataset | IterableDataset) -> list[str]:
        """The dataset's columns; for a stream of unknown features, the keys of its first record."""
        if dataset.column_names is not None:
            return dataset.column_names
        return list(next(iter(dataset.take(1)), {}))

    def get_train_dataloader(self) -> DataLoader:
        """Batches of `steps_per_generation` micro-batches: one generation batch per `_prepare_inputs` refill. A
        streamed dataset, which a sampler cannot index, is reordered as the sampler would (buffered shuffle)."""
        dataset = self.train_dataset
        if isinstance(dataset, IterableDataset):
            seed = self.args.seed if self.args.shuffle_dataset else None
            dataset = repeat_iterable_dataset(dataset, **self._repeat_counts(), seed=seed)
        return self._get_dataloader(
            dataset=dataset,
            description="Training",
            batch_size=self._train_batch_size * self.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _repeat_counts(self) -> dict[str, int]:
        """Each prompt once per generation, `generation_batch_size` rows at a time, each batch once per step."""
        return {
            "mini_repeat_count": self.num_generations,
            "batch_size": self.generation_batch_size // self.num_generations,
            "repeat_count": self.num_iterations * self.steps_per_generation,
        }

    def min_train_rows(self) -> tuple[int, str, str]:
        """Whole generation batches only: an incomplete one is dropped."""
        needed = self._repeat_counts()["batch_size"]
        why = (
            f"one generation batch takes {needed} prompts (generation_batch_size={self.generation_batch_size} / "
            f"num_generations={self.num_generations}), and an incomplete one is dropped"
        )
        fix = "Add prompts, or lower `per_device_train_batch_size`, `steps_per_generation` or `generation_batch_size`."
        return needed, why, fix

    def _get_train_sampler(self, dataset: Dataset | None = None) -> RepeatSampler:
        dataset = dataset if dataset is not None else self.train_dataset
        return RepeatSampler(dataset, **self._repeat_counts(), shuffle=self.args.shuffle_dataset, seed=self.args.seed)

    def _get_eval_sampler(self, eval_dataset) -> RepeatSampler:
        return RepeatSampler(eval_dataset, mini_repeat_count=self.num_generations_eval, seed=self.args.seed)

    def get_eval_dataloader(self, eval_dataset: str | Dataset | IterableDataset | None = None) -> DataLoader:
        """As `Trainer.get_eval_dataloader`; a streamed dataset is shuffled (buffered) and repeated in the stream,
        as `_get_eval_sampler` does by index, and read by a single loader process."""
        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        dataset = dataset if dataset is not None else self.eval_dataset
        if not isinstance(dataset, IterableDataset):
            return super().get_eval_dataloader(eval_dataset)
        self.check_iterable_datasets(None, dataset, self.args)
        self.accelerator.dataloader_config.dispatch_batches = False
        dataset = repeat_iterable_dataset(dataset, self.num_generations_eval, seed=self.args.seed)
        num_workers, self.args.dataloader_num_workers = self.args.dataloader_num_workers, 0
        try:
            return self._get_dataloader(
                dataset=dataset,
                description="Evaluation",
                batch_size=self.args.eval_batch_size,
                dataloader_key=eval_dataset if isinstance(eval_dataset, str) else "eval",
            )
        finally:
            self.args.dataloader_num_workers = num_workers

    def _prepare_inputs(self, generation_batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Training: sample for a whole generation batch every `steps_per_generation * num_iterations` steps and
        return this step's slice of it; evaluation: sample for the batch as is."""
        if not self.model.training:
            return self._generate_and_score_completions(generation_batch)
        if not self._buffer_in_use():
            batch = shuffle_sequence_dict(self._generate_and_score_completions(generation_batch))
            self._buffered_inputs = split_tensor_dict(batch, self.steps_per_generation)
        return self._buffered_inputs[self._step % self.steps_per_generation]

    def _buffer_in_use(self) -> bool:
        """Whether the next micro-step still trains on the buffered generation batch (else it samples a new one)."""
        generate_every = self.steps_per_generation * self.num_iterations
        return self._buffered_inputs is not None and self._step % generate_every != 0

    def _save_extra_state(self, folder: str) -> None:
        """Also save this process's generation buffer, with the micro-step counter, when the checkpoint falls while
        it is being consumed: a resumed run then trains on the very generations the uninterrupted run does, instead
        of sampling anew (as TRL does) with the dataloader's prompts out of step with the buffer."""
        super()._save_extra_state(folder)
        if not self._buffer_in_use():
            return
        os.makedirs(folder, exist_ok=True)
        state = {"step": self._step, "num_processes": self.accelerator.num_processes, "buffer": self._buffered_inputs}
        torch.save(state, os.path.join(folder, GENERATION_BUFFER_NAME.format(self.accelerator.process_index)))

    def _load_extra_state(self, folder: str) -> None:
        """Restore the generation buffer saved with the checkpoint `folder`; without one (the checkpoint fell between
        generation batches), the next micro-step samples a new batch."""
        super()._load_extra_state(folder)
        self._step = self.state.global_step * self.args.gradient_accumulation_steps
        self._buffered_inputs = None
        path = os.path.join(folder, GENERATION_BUFFER_NAME.format(self.accelerator.process_index))
        if not os.path.isfile(path):
            return
        device = self.accelerator.device
        location = "cpu" if device.type == "cpu" else device  # torch.load cannot map to "cpu:0" (CPU under DDP)
        state = torch.load(path, map_location=location, weights_only=True)
        saved = (state["num_processes"], len(state["buffer"]))
        now = (self.accelerator.num_processes, self.steps_per_generation)
        if saved != now:
            logger.warning(
                f"The generation buffer in {folder} was saved with {saved[0]} processes and {saved[1]} steps per "
                f"generation, not {now[0]} and {now[1]}: sampling a new generation batch instead of resuming from it."
            )
            return
        self._step, self._buffered_inputs = state["step"], state["buffer"]

    def training_step(self, model, inputs, num_items_in_batch=None):
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        self._step_time += time.perf_counter() - start
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._step_time)
            self._step_time = 0.0
        return loss

    def _tokenize_prompts(self, prompts: list[Any]) -> list[list[int]]:
        return tokenize_prompts(self.processing_class, prompts, self.chat_template_kwargs)

    def _log_lengths(self, prompt_ids, completion_ids, mode: str, env_mask=None) -> None:
        """Token counts and completion-length metrics; with an environment mask, only the policy's tokens count."""
        device = self.accelerator.device
        prompt_lengths = gather(torch.tensor([len(ids) for ids in prompt_ids], device=device))
        written = [sum(mask) for mask in env_mask] if env_mask is not None else [len(ids) for ids in completion_ids]
        lengths = gather(torch.tensor(written, device=device))
        if lengths.numel() == 0:
            raise RuntimeError("No completions were generated; see the generation logs above for the cause.")
        if mode == "train":
            self.state.num_input_tokens_seen += int(prompt_lengths.sum() + lengths.sum())
        metrics = self._metrics[mode]
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        ends = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        truncated = gather(torch.tensor([not ids or ids[-1] not in ends for ids in completion_ids], device=device))
        terminated = lengths[~truncated].float()
        terminated = terminated if terminated.numel() else torch.zeros(1, device=device)
        lengths = lengths.float()
        for prefix, values in (("", lengths), ("terminated_", terminated)):
            metrics[f"completions/mean_{prefix}length"].append(values.mean().item())
            metrics[f"completions/min_{prefix}length"].append(values.min().item())
            metrics[f"completions/max_{prefix}length"].append(values.max().item())
        metrics["completions/clipped_ratio"].append(truncated.float().mean().item())

    def _pad(self, rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        values = pad(rows, self._tokenizer.pad_token_id, side, self.pad_to_multiple_of).to(device)
        mask = pad([torch.ones(len(row), dtype=torch.long) for row in rows], 0, side, self.pad_to_multiple_of)
        return values, mask.to(device)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.mean().detach(), None, None

    def _save_completions_table(self, table: dict[str, list], reward_columns: tuple[str, ...] = ()) -> None:
        """Print a sample of `table` (rich) and save it all to `completions/*.parquet`; also log it to wandb /
        trackio when those are in `report_to`. `table` needs the columns `step`, `prompt` and `completion`; it may
        have `advantage`, the `reward_columns` and other (extra) columns."""
        import pandas as pd

        frame = pd.DataFrame(table)
        shown = {"step", "prompt", "completion", "advantage", *reward_columns}
        print_prompt_completions_sample(
            table["prompt"],
            table["completion"],
            {name: table[name] for name in reward_columns},
            table.get("advantage"),
            self.state.global_step,
            self.num_completions_to_print,
            extra={name: values for name, values in table.items() if name not in shown},
        )
        folder = os.path.join(self.args.output_dir, "completions")
        os.makedirs(folder, exist_ok=True)
        frame.astype({"prompt": str, "completion": str}).to_parquet(
            os.path.join(folder, f"completions_{self.state.global_step:05d}.parquet")
        )
        report_to = self.args.report_to or []
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({"completions": wandb.Table(dataframe=frame.astype(str))})
        if "trackio" in report_to:
            import trackio

            trackio.log({"completions": trackio.Table(dataframe=frame.astype(str))})


class OnlineRLTrainer(OnPolicyGenerationMixin, BaseTrainer):
    """The generate-score-train loop of the online RL trainers (`GRPOTrainer`, `RLOOTrainer`).

    Subclasses implement `compute_advantages(rewards_per_func, batch)` (which may add what their loss needs to the
    batch) and `compute_loss`, and override `needs_old_logps` when their loss always needs the sampling policy's
    log-probs.
    """

    _skip_nan_metrics = True
    _warned_zero_reward_spread = False  # see `_warn_zero_reward_spread`

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: RewardFunc | list[RewardFunc] | None = None,
        args: Any = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        peft_config: Any = None,
        quantization_config: Any = None,
        rollout_func: RolloutFunc | None = None,
    ):
        args = self.resolve_args(args, model)
        self._check_reward_source(reward_funcs, rollout_func)
        model = self.prepare_model(model, args, quantization_config)
        processing_class = self.prepare_processing_class(model, processing_class, args)
        self._tokenizer = getattr(processing_class, "tokenizer", processing_class)
        model.config.get_text_config().pad_token_id = self._tokenizer.pad_token_id
        model.generation_config.pad_token_id = self._tokenizer.pad_token_id
        self.eos_token_ids = eos_token_ids(model, self._tokenizer)

        self.beta = args.beta
        model = self.prepare_peft(model, peft_config, args)
        if peft_config is None and is_peft_model(model) and self.beta != 0.0:
            add_reference_adapter(model)  # the reference is the adapter as given, not the bare base model
        self.reward_functions = RewardFunctions(
            reward_funcs,
            args.reward_weights,
            reward_processing_classes,
            model_init_kwargs=args.model_init_kwargs,
            trust_remote_code=args.trust_remote_code,
        )
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: pass a dataset with a 'prompt' column.")
        self.check_iterable_datasets(train_dataset, eval_dataset, args)
        self.check_train_dataset(train_dataset, args, "a dataset with a 'prompt' column")
        columns = self.dataset_columns(train_dataset)
        if {"image", "images"} & set(columns):
            raise NotImplementedError(
                f"{type(self).__name__} does not train vision-language models yet: drop the image column(s) or use TRL."
            )
        if args.use_transformers_continuous_batching:
            raise NotImplementedError(
                "`use_transformers_continuous_batching` is not supported yet; generation uses batched `generate` with "
                "a KV cache (or vLLM with `use_vllm=True`)."
            )
        if "prompt" not in columns and rollout_func is None:
            raise ValueError(
                f"The training dataset has no 'prompt' column (columns: {columns}); rename the "
                "column holding the prompts to 'prompt'."
            )
        self.check_prompts(train_dataset, eval_dataset)
        self.reward_functions.check_signatures(columns, exact=rollout_func is None)
        self.rollout_func = rollout_func
        self.num_generations = args.num_generations
        self.num_generations_eval = args.num_generations_eval or args.num_generations
        self.max_completion_length = args.max_completion_length
        self.temperature = args.temperature
        self.chat_template_kwargs = args.chat_template_kwargs or {}
        self.num_iterations = args.num_iterations
        self.epsilon_low = args.epsilon
        self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        self.mask_truncated_completions = args.mask_truncated_completions
        self.pad_to_multiple_of = args.pad_to_multiple_of
        self.shuffle_dataset = args.shuffle_dataset
        self.router_aux_loss_coef = self.configure_router_aux_loss(model, args.router_aux_loss_coef)
        self.aux_loss_enabled = bool(self.router_aux_loss_coef)  # TRL's switch: False leaves the router loss out
        self.init_trainer(model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers)
        self._setup_reference(model, args)
        for i, reward_model in enumerate(self.reward_functions.funcs):
            if isinstance(reward_model, torch.nn.Module):
                self.reward_functions.funcs[i] = self.accelerator.prepare_model(reward_model, evaluation_mode=True)

        self.log_completions = args.log_completions
        self.num_completions_to_print = args.num_completions_to_print
        self._logs: dict[str, Any] = {
            "prompt": deque(maxlen=args.generation_batch_size),
            "completion": deque(maxlen=args.generation_batch_size),
            "rewards": defaultdict(lambda: deque(maxlen=args.generation_batch_size)),
            "advantages": deque(maxlen=args.generation_batch_size),
            "extra": defaultdict(lambda: deque(maxlen=args.generation_batch_size)),
        }
        self._pending_extra_logs: defaultdict[str, list] = defaultdict(list)
        self._pending_metrics: defaultdict[str, list[float]] = defaultdict(list)
        set_seed(args.seed, device_specific=True)
        self.generator = make_generator(
            args, self.model, processing_class, accelerator=self.accelerator, unwrap=self.unwrapped_for_generation
        )
        self._last_loaded_step = -1
        self.use_vllm = args.use_vllm
        self.rollout_rows: list[dict[str, Any]] = []

    @staticmethod
    def _check_reward_source(reward_funcs: Any, rollout_func: Any) -> None:
        """Refuse to train without rewards: every advantage would be 0 and the policy would never move. A rollout
        function with a `reward_funcs()` method (environments that define `get_reward`) is a reward source too."""
        if reward_funcs is not None and not (isinstance(reward_funcs, list | tuple) and not reward_funcs):
            return
        rollout_rewards = getattr(rollout_func, "reward_funcs", None)
        if callable(rollout_rewards) and rollout_rewards():
            return
        raise ValueError(
            f"No reward source provided: `reward_funcs` is {reward_funcs!r}, so every completion would score 0 and the policy "
            "would get no gradient. Pass `reward_funcs` (a function, a reward model's name or path, or a list of "
            "them), or, with GRPOTrainer, an `environment_factory` whose environment defines `get_reward`."
        )

    # TRL's attribute names, for code that inspects the trainer
    @property
    def reward_funcs(self) -> list[Any]:
        return self.reward_functions.funcs

    @property
    def reward_func_names(self) -> list[str]:
        return self.reward_functions.names

    @property
    def reward_weights(self) -> torch.Tensor:
        return self.reward_functions.weights

    @property
    def reward_processing_classes(self) -> list[Any]:
        return self.reward_functions.processing_classes

    # ----------------------------------------------------------------------------------------------- set-up
    def _setup_reference(self, model: PreTrainedModel, args: Any) -> None:
        """Frozen reference policy (when `beta != 0`), dropout, and the fused log-prob heads."""
        self.ref_model = self.prepare_reference_model(model, None) if self.beta != 0.0 else None
        if args.disable_dropout:
            disable_dropout_in_model(model)
            if self.ref_model is not None:
                disable_dropout_in_model(self.ref_model)
        add_token_logprob_head(
            model.get_base_model() if is_peft_model(model) else model, self.temperature, outputs=("entropy",)
        )
        if self.ref_model is not None:
            add_token_logprob_head(self.ref_model, self.temperature, outputs=())
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                self.ref_model = self.ref_model.to(self.accelerator.device)
            else:
                self.ref_model = self.accelerator.prepare_model(self.ref_model, evaluation_mode=True)
        if args.sync_ref_model:
            if self.beta == 0.0:
                raise ValueError(
                    "`sync_ref_model=True` needs a reference model, but `beta=0.0` uses none; set `beta` > 0 or "
                    "`sync_ref_model=False`."
                )
            if is_peft_model(model):
                raise NotImplementedError(
                    "`sync_ref_model=True` is not supported with a PEFT model: the reference is the adapter-free base "
                    "model. Set `sync_ref_model=False`."
                )
            self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))

    # ----------------------------------------------------------------------------------------------- data
    # ----------------------------------------------------------------------------------------------- rollouts
    def _generate(self, prompts: list[Any]) -> tuple[list[list[int]], list[list[int]], list[Any], Any, Any, dict]:
        """Prompt ids, completion ids, decoded completions, sampling log-probs (or None), the environment mask (1
        where the policy wrote the token, 0 where an environment did; None without one) and extra rollout fields."""
        mode = "train" if self.model.training else "eval"
        # A rollout function generates through the back end only when it is vLLM (a transformers back end generates
        # with the live model, so there is nothing to sync).
        needs_sync = self.rollout_func is None or self.use_vllm
        if needs_sync and self.state.global_step != self._last_loaded_step:
            self.generator.sync_weights(self.accelerator.unwrap_model(self.model))
            self._last_loaded_step = self.state.global_step
        extra_fields: dict[str, Any] = {}
        if self.rollout_func is not None:
            output = self.rollout_func(copy.deepcopy(prompts), self)
            missing = {"prompt_ids", "completion_ids", "logprobs"} - output.keys()
            if missing:
                raise ValueError(
                    f"rollout_func must return keys {sorted(missing)} in its output dict (it returned "
                    f"{sorted(output)})."
                )
            prompt_ids, completion_ids, logprobs = output["prompt_ids"], output["completion_ids"], output["logprobs"]
            extra_fields = {k: v for k, v in output.items() if k not in ("prompt_ids", "completion_ids", "logprobs")}
        else:
            prompt_ids = self._tokenize_prompts(prompts)
            result = self.generator.generate(prompt_ids)
            completion_ids, logprobs = result.completion_ids, result.logprobs
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": text}] for text in texts]
        else:
            completions = texts
        env_mask = extra_fields.pop("env_mask", None)
        self._log_lengths(prompt_ids, completion_ids, mode, env_mask)
        return prompt_ids, completion_ids, completions, logprobs, env_mask, extra_fields

    def _token_logps(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_length: int,
        batch_size: int | None = None,
        entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Log-probs (and entropies, and the MoE aux loss) of the last `completion_length` tokens, in chunks of
        `batch_size` rows, through the fused log-prob head: the vocabulary-sized logits are never built."""
        batch_size = batch_size or input_ids.size(0)
        logps, entropies, aux_losses = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, : ids.size(1) - completion_length] = -100
            with self.accelerator.autocast():
                out = model(input_ids=ids, attention_mask=mask, labels=labels, token_logprobs=True)
            logps.append(out.log_probs[:, -completion_length:])
            if entropy:
                entropies.append(out.entropy[:, -completion_length:])
            if out.aux_loss is not None:
                aux_losses.append(out.aux_loss)
        return (
            torch.cat(logps),
            torch.cat(entropies) if entropy else None,
            torch.stack(aux_losses).mean() if aux_losses else None,
        )

    def _reference_logps(self, input_ids, attention_mask, completion_length, batch_size) -> torch.Tensor:
        if self.ref_model is not None:
            return self._token_logps(self.ref_model, input_ids, attention_mask, completion_length, batch_size)[0]
        with reference_adapter(self.accelerator.unwrap_model(self.model)):
            return self._token_logps(self.model, input_ids, attention_mask, completion_length, batch_size)[0]

    def needs_old_logps(self) -> bool:
        """Whether the sampling policy's log-probs must be stored (the policy moves before the batch is used up)."""
        return self.args.gradient_accumulation_steps % (self.args.steps_per_generation * self.num_iterations) != 0

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        prompts = [row["prompt"] for row in inputs]
        self.rollout_rows = inputs  # the batch's dataset rows, for rollout functions that need more than prompts
        generated = self._generate(prompts)
        prompt_ids_list, completion_ids_list, completions, sampling_logps, env_mask, extra_fields = generated

        prompt_ids, prompt_mask = self._pad([torch.tensor(ids) for ids in prompt_ids_list], "left")
        completion_ids, completion_mask = self._pad([torch.tensor(ids) for ids in completion_ids_list], "right")
        batch: dict[str, Any] = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
        }
        if env_mask is not None:  # tokens an environment wrote are attended to but not trained on
            rows = [torch.tensor(mask, dtype=torch.long) for mask in env_mask]
            batch["tool_mask"] = pad(rows, 1, "right", self.pad_to_multiple_of).to(device)
        if self.mask_truncated_completions:
            ends = {*self.eos_token_ids, self._tokenizer.pad_token_id}
            truncated = torch.tensor([not ids or ids[-1] not in ends for ids in completion_ids_list], device=device)
            completion_mask = completion_mask * (~truncated).unsqueeze(1).int()
            if env_mask is not None:
                batch["tool_mask"] = batch["tool_mask"] * (~truncated).unsqueeze(1).int()
        batch["completion_mask"] = completion_mask
        if sampling_logps is not None:
            rows = [torch.tensor([math.nan if x is None else x for x in row]) for row in sampling_logps]
            batch["sampling_per_token_logps"] = self._pad(rows, "right")[0].float()

        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        chunk = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        with torch.no_grad():
            if self.needs_old_logps():
                batch["old_per_token_logps"] = self._token_logps(
                    self.model, input_ids, attention_mask, completion_ids.size(1), chunk
                )[0]
            if self.beta != 0.0:
                batch["ref_per_token_logps"] = self._reference_logps(
                    input_ids, attention_mask, completion_ids.size(1), chunk
                )

        for i, row in enumerate(inputs):  # extra rollout fields become reward-function keywords
            for key, values in extra_fields.items():
                row[key] = values[i] if isinstance(values, list) else values
        rewards_per_func = gather(self._score(inputs, prompts, completions, completion_ids_list))
        advantages, is_std_zero = self.compute_advantages(rewards_per_func, batch)
        process = self.accelerator.process_index
        batch["advantages"] = advantages[process * len(prompts) : (process + 1) * len(prompts)]
        self._log_rewards(rewards_per_func, is_std_zero, mode)
        self._log_samples(prompts, completions, rewards_per_func, advantages)
        return batch

    @staticmethod
    def loss_mask(batch: dict[str, Any]) -> torch.Tensor:
        """The completion tokens the loss trains on: the completion mask, without environment-written tokens."""
        mask = batch["completion_mask"]
        return mask if "tool_mask" not in batch else mask * batch["tool_mask"]

    def _score(self, inputs, prompts, completions, completion_ids) -> torch.Tensor:
        columns = {key: [row[key] for row in inputs] for key in inputs[0] if key not in ("prompt", "completion")}
        columns.pop("completion_ids", None)
        columns |= {
            "trainer_state": self.state,
            "log_extra": self._pending_extra_logs_extend,
            "log_metric": self._pending_metric_append,
        }
        return self.reward_functions.score(
            prompts, completions, completion_ids, columns, self.accelerator.device, self.chat_template_kwargs
        )

    def _pending_extra_logs_extend(self, column: str, values: list) -> None:
        """`log_extra(column, values)`, for reward functions: an extra column in the completions table."""
        self._pending_extra_logs[column].extend(values)

    def _pending_metric_append(self, name: str, value: float) -> None:
        """`log_metric(name, value)`, for reward functions: a scalar averaged into the logs."""
        self._pending_metrics[name].append(value)

    def compute_advantages(
        self, rewards_per_func: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The advantages of every process's completions (rewards are gathered) and, for logging, which rows belong
        to a group whose rewards have zero std. May add what the loss needs to `batch`."""
        raise NotImplementedError

    def _log_rewards(self, rewards_per_func: torch.Tensor, is_std_zero: torch.Tensor, mode: str) -> None:
        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_functions.names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, i]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[:, i]).item())
        weights = self.reward_functions.weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        metrics["frac_reward_zero_std"].append(is_std_zero.float().mean().item())
        if mode == "train" and is_std_zero.numel() and bool(is_std_zero.all()):
            self._warn_zero_reward_spread()
        device = self.accelerator.device
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            stats = gather(torch.tensor([sum(values), len(values)], dtype=torch.float32, device=device))
            total, count = stats.view(-1, 2).sum(dim=0).tolist()
            metrics[name].append(total / count)
        self._pending_metrics.clear()

    def _warn_zero_reward_spread(self) -> None:
        """Warn, once per trainer, that a whole generation batch had identical rewards within every group."""
        if self._warned_zero_reward_spread or not self.accelerator.is_main_process:
            return
        self._warned_zero_reward_spread = True
        logger.warning(
            f"At step {self.state.global_step}, all {self.num_generations} completions of every prompt got the same "
            "reward (frac_reward_zero_std=1.0): every advantage is 0, so the policy gets no gradient from these "
            "rewards (only the KL penalty acts, when `beta` > 0). Make the reward functions tell completions apart "
            "(partial credit rather than all-or-nothing), check that they read the right columns, or raise "
            "`temperature` / `num_generations` for more varied completions. frac_reward_zero_std is logged each step."
        )

    def _log_samples(self, prompts, completions, rewards_per_func, advantages) -> None:
        self._logs["prompt"].extend(gather_object(prompts))
        self._logs["completion"].extend(gather_object(completions))
        for i, name in enumerate(self.reward_functions.names):
            self._logs["rewards"][name].extend(rewards_per_func[:, i].tolist())
        self._logs["advantages"].extend(advantages.tolist())
        for column in sorted(set(gather_object(list(self._pending_extra_logs)))):
            values = self._pending_extra_logs.get(column, [None] * len(prompts))
            self._logs["extra"][column].extend(gather_object(values))
        self._pending_extra_logs.clear()

    # ----------------------------------------------------------------------------------------------- loss, logs
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self.accelerator.is_main_process and self.log_completions and self._logs["prompt"]:
            self._write_completions()

    def _write_completions(self) -> None:
        """Print, save and report the latest completions with their rewards (see `_save_completions_table`)."""
        table = {
            "step": [self.state.global_step] * len(self._logs["prompt"]),
            "prompt": list(self._logs["prompt"]),
            "completion": list(self._logs["completion"]),
            **{name: list(values) for name, values in self._logs["rewards"].items()},
            **{name: list(values) for name, values in self._logs["extra"].items()},
            "advantage": list(self._logs["advantages"]),
        }
        self._save_completions_table(table, reward_columns=tuple(self._logs["rewards"]))

    def close(self) -> None:
        """Stop the generation back end."""
        self.generator.close()


def tokenize_prompts(
    processing_class: Any, prompts: list[Any], chat_template_kwargs: dict[str, Any]
) -> list[list[int]]:
    """Token ids of each prompt: plain text as is, conversations through the chat template with the generation
    prompt appended."""
    if is_conversational({"prompt": prompts[0]}):
        return processing_class.apply_chat_template(
            conversation=prompts,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **chat_template_kwargs,
        )["input_ids"]
    return processing_class(text=prompts)["input_ids"]
