"""What GRPO and RLOO share: sample prompts in groups, generate, score with reward functions, log.

One training generation batch is generated and scored at once by `_make_batch` (rows -> `Rollout` -> `OnlineBatch`
-> rewards -> advantages), then buffered and served a micro-batch at a time by the trainer's `GenerationLoop`
(`llm_trainer.generation.loop`). Subclasses give the advantages (`advantages`) and the loss (`compute_loss`).
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Any

import torch
from accelerate.utils import gather, gather_object, is_peft_model, set_seed
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from transformers.utils import logging

from ..callbacks import SyncRefModelCallback
from ..environments.rollout import rollout_and_rewards
from ..environments.tools import EnvironmentToolRollout, ToolRollout, check_tool_template
from ..generation import make_generator
from ..generation.base import Generator
from ..generation.factory import eos_token_ids
from ..generation.loop import (
    BatchGeometry,
    GenerationLoop,
    OnlineBatch,
    Rollout,
    RolloutFunc,
    completion_logps,
    configure_streaming,
    prompt_columns,
    save_completions_table,
    streaming_loader,
)
from ..losses.policy_gradient import nanstd
from ..modeling import add_reference_adapter, add_token_logprob_head, reference_adapter
from .base_trainer import BaseTrainer
from .reference_policy import ReferencePolicy
from .reward_functions import RewardFunc, RewardFunctions
from .utils import disable_dropout_in_model, identity

logger = logging.get_logger(__name__)


class OnlineRLTrainer(BaseTrainer):
    """The generate-score-train loop of the online RL trainers (`GRPOTrainer`, `RLOOTrainer`).

    Subclasses implement `advantages(rewards_per_func, batch, num_generations)` (a pure function of the rewards
    and the batch's log-probs, returning the advantages and which rows have a zero-spread group) and `compute_loss`.
    """

    _skip_nan_metrics = True
    _warned_zero_reward_spread = False  # see `_warn_zero_reward_spread`
    _step_time = 0.0  # seconds spent in this optimizer step's micro-steps
    needs_sampling_logps = False
    """Whether the loss always needs the sampling policy's log-probs (else only when the policy moves mid-batch)."""

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
        tools: list | None = None,
        environment_factory: Any = None,
        environment: Any = None,
    ):
        args = self.resolve_args(args, model)
        rollout_func, reward_funcs, train_dataset = _rollout_source(
            rollout_func, reward_funcs, train_dataset, args, tools, environment_factory, environment
        )
        _check_reward_source(reward_funcs, rollout_func)
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
        configure_streaming(train_dataset, eval_dataset, args)
        self.check_train_dataset(train_dataset, "a dataset with a 'prompt' column")
        columns = prompt_columns(train_dataset, eval_dataset, type(self).__name__, rollout_func is not None)
        if args.use_transformers_continuous_batching:
            raise NotImplementedError(
                "`use_transformers_continuous_batching` is not supported yet; generation uses batched `generate` with "
                "a KV cache (or vLLM with `use_vllm=True`)."
            )
        self.reward_functions.check_signatures(columns, exact=rollout_func is None)
        self.rollout_func = rollout_func
        self.tools = list(rollout_func.tools) if isinstance(rollout_func, ToolRollout) else []
        if self.tools:
            check_tool_template(self._tokenizer)
        if isinstance(rollout_func, EnvironmentToolRollout):  # environments that score themselves (`get_reward`)
            for func in rollout_func.reward_funcs():
                self.reward_functions.append(func)
        self.num_generations = args.num_generations
        self.num_generations_eval = args.num_generations_eval or args.num_generations
        self.max_completion_length = args.max_completion_length
        self.temperature = args.temperature
        self.chat_template_kwargs = args.chat_template_kwargs or {}
        self.num_iterations = args.num_iterations
        self.epsilon_low = args.epsilon
        self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        self.use_vllm = args.use_vllm
        self.router_aux_loss_coef = self.configure_router_aux_loss(model, args.router_aux_loss_coef)
        self.aux_loss_enabled = bool(self.router_aux_loss_coef)  # TRL's switch: False leaves the router loss out
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
        _refuse_data_parallel(self)
        self._setup_reference(model, args)
        for i, reward_model in enumerate(self.reward_functions.funcs):
            if isinstance(reward_model, torch.nn.Module):
                self.reward_functions.funcs[i] = self.accelerator.prepare_model(reward_model, evaluation_mode=True)

        self.log_completions = args.log_completions
        self.num_completions_to_print = args.num_completions_to_print
        size = args.generation_batch_size
        self._logs: dict[str, Any] = {
            "prompt": deque(maxlen=size),
            "completion": deque(maxlen=size),
            "rewards": defaultdict(lambda: deque(maxlen=size)),
            "advantages": deque(maxlen=size),
            "extra": defaultdict(lambda: deque(maxlen=size)),
        }
        self._pending_extra_logs: defaultdict[str, list] = defaultdict(list)
        self._pending_metrics: defaultdict[str, list[float]] = defaultdict(list)
        set_seed(args.seed, device_specific=True)
        generator = make_generator(
            args, self.model, processing_class, accelerator=self.accelerator, unwrap=self.unwrapped_for_generation
        )
        self.generation = GenerationLoop(
            generator,
            processing_class,
            BatchGeometry.from_args(args, self.accelerator.num_processes),
            self.accelerator.device,
            eos_token_ids=self.eos_token_ids,
            chat_template_kwargs=self.chat_template_kwargs,
            pad_to_multiple_of=args.pad_to_multiple_of,
            mask_truncated_completions=args.mask_truncated_completions,
            seed=args.seed,
            shuffle=args.shuffle_dataset,
        )

    # TRL's attribute names, for code that inspects the trainer
    @property
    def generator(self) -> Generator:
        """The generation back end (TRL's attribute), owned by `generation`."""
        return self.generation.generator

    @generator.setter
    def generator(self, generator: Generator) -> None:
        self.generation.generator = generator

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
        self.ref_model = ReferencePolicy.for_policy(model).model if self.beta != 0.0 else None
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
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt", "image", "images"]

    def get_train_dataloader(self) -> DataLoader:
        return self._get_dataloader(**self.generation.train_loader_kwargs(self.train_dataset, self._train_batch_size))

    def _get_eval_sampler(self, eval_dataset: Dataset):
        return self.generation.eval_sampler(eval_dataset)

    def get_eval_dataloader(self, eval_dataset: str | Dataset | IterableDataset | None = None) -> DataLoader:
        """As `Trainer.get_eval_dataloader`; a streamed dataset is repeated in the stream (see `streaming_loader`)."""
        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        dataset = dataset if dataset is not None else self.eval_dataset
        if not isinstance(dataset, IterableDataset):
            return super().get_eval_dataloader(eval_dataset)
        configure_streaming(None, dataset, self.args)
        with streaming_loader(self.args, self.accelerator):
            return self._get_dataloader(
                dataset=self.generation.eval_stream(dataset),
                description="Evaluation",
                batch_size=self.args.eval_batch_size,
                dataloader_key=eval_dataset if isinstance(eval_dataset, str) else "eval",
            )

    def min_train_rows(self) -> tuple[int, str, str]:
        return self.generation.geometry.min_train_rows()

    def _prepare_inputs(self, generation_batch: list[dict[str, Any]]) -> OnlineBatch:
        """Training: a new generation batch every `steps_per_generation * num_iterations` micro-steps, and this
        micro-step's slice of it; evaluation: the batch as is."""
        if not self.model.training:
            return self._make_batch(generation_batch)
        if self.generation.needs_generation():
            self.generation.fill(self._make_batch(generation_batch))
        return self.generation.next_batch()

    def training_step(self, model, inputs, num_items_in_batch=None):
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_time += time.perf_counter() - start
        if self.generation.step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._step_time)
            self._step_time = 0.0
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.mean().detach(), None, None

    def _save_extra_state(self, folder: str) -> None:
        super()._save_extra_state(folder)
        self.generation.save(folder, self.accelerator.process_index, self.accelerator.num_processes)

    def _load_extra_state(self, folder: str) -> None:
        super()._load_extra_state(folder)
        step = self.state.global_step * self.args.gradient_accumulation_steps
        self.generation.load(folder, self.accelerator.process_index, self.accelerator.num_processes, step)

    # ----------------------------------------------------------------------------------------------- rollouts
    def _generate(self, rows: list[dict[str, Any]]) -> Rollout:
        """The rollout of the batch's `rows`, with the completion-length metrics recorded."""
        mode = "train" if self.model.training else "eval"
        # A rollout function generates through the back end only when it is vLLM (a transformers back end generates
        # with the live model, so there is nothing to sync).
        if self.rollout_func is None or self.use_vllm:
            self.generation.sync_weights(self.accelerator.unwrap_model(self.model), self.state.global_step)
        prompts = [row["prompt"] for row in rows]
        rollout = self.generation.generate(prompts, rows, self.rollout_func, self)
        self._record_lengths(rollout, mode)
        return rollout

    def _record_lengths(self, rollout: Rollout, mode: str) -> None:
        tokens, metrics = self.generation.completion_metrics(rollout)
        if mode == "train":
            self.state.num_input_tokens_seen += tokens
        self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)

    def _logps(self, model: torch.nn.Module, batch: OnlineBatch, chunk: int | None = None, entropy: bool = False):
        return completion_logps(model, batch, chunk, entropy, self.accelerator.autocast)

    def _make_batch(self, rows: list[dict[str, Any]]) -> OnlineBatch:
        """Generate for `rows`, pad, add the old / reference log-probs the loss needs, score and take advantages."""
        mode = "train" if self.model.training else "eval"
        rollout = self._generate(rows)
        batch = self.generation.pad(rollout)
        chunk = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        geometry = self.generation.geometry
        with torch.no_grad():
            if self.needs_sampling_logps or geometry.needs_old_logps(self.args.gradient_accumulation_steps):
                batch.old_per_token_logps = self._logps(self.model, batch, chunk)[0]
            if self.beta != 0.0:
                if self.ref_model is not None:
                    batch.ref_per_token_logps = self._logps(self.ref_model, batch, chunk)[0]
                else:
                    with reference_adapter(self.accelerator.unwrap_model(self.model)):
                        batch.ref_per_token_logps = self._logps(self.model, batch, chunk)[0]
        rewards_per_func = gather(self._score(rows, rollout))
        num_generations = geometry.num_generations if mode == "train" else geometry.num_generations_eval
        advantages, is_std_zero = self.advantages(rewards_per_func, batch, num_generations)
        start = self.accelerator.process_index * len(rows)
        batch.advantages = advantages[start : start + len(rows)]
        self._log_rewards(rewards_per_func, is_std_zero, mode)
        self._log_samples([row["prompt"] for row in rows], rollout.completions, rewards_per_func, advantages)
        return batch

    def _score(self, rows: list[dict[str, Any]], rollout: Rollout) -> torch.Tensor:
        columns = self.reward_functions.columns(rows, rollout.extra) | {
            "trainer_state": self.state,
            "log_extra": self.log_extra,
            "log_metric": self.log_metric,
        }
        prompts = [row["prompt"] for row in rows]
        return self.reward_functions.score(
            prompts,
            rollout.completions,
            rollout.completion_ids,
            columns,
            self.accelerator.device,
            self.chat_template_kwargs,
        )

    def log_extra(self, column: str, values: list) -> None:
        """`log_extra(column, values)`, for reward functions: an extra column in the completions table."""
        self._pending_extra_logs[column].extend(values)

    def log_metric(self, name: str, value: float) -> None:
        """`log_metric(name, value)`, for reward functions: a scalar averaged into the logs."""
        self._pending_metrics[name].append(value)

    def advantages(
        self, rewards_per_func: torch.Tensor, batch: OnlineBatch, num_generations: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The advantages of every process's completions (rewards are gathered) and, for logging, which rows belong
        to a group whose rewards have zero std. Reads the batch, never writes it."""
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

    # ----------------------------------------------------------------------------------------------- logs
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self.accelerator.is_main_process and self.log_completions and self._logs["prompt"]:
            table = {
                "step": [self.state.global_step] * len(self._logs["prompt"]),
                "prompt": list(self._logs["prompt"]),
                "completion": list(self._logs["completion"]),
                **{name: list(values) for name, values in self._logs["rewards"].items()},
                **{name: list(values) for name, values in self._logs["extra"].items()},
                "advantage": list(self._logs["advantages"]),
            }
            save_completions_table(
                table, self.args, self.state.global_step, self.num_completions_to_print, tuple(self._logs["rewards"])
            )

    def close(self) -> None:
        """Stop the generation back end."""
        self.generation.close()


def _rollout_source(
    rollout_func: Any,
    reward_funcs: Any,
    train_dataset: Any,
    args: Any,
    tools: Any,
    environment_factory: Any,
    environment: Any,
) -> tuple[Any, Any, Any]:
    """The rollout function that `tools`, `environment_factory` (TRL's) or `environment` (llm_trainer's) make, the
    reward functions with an environment's, and a placeholder dataset for environments that write their prompts."""
    max_tool_calls = getattr(args, "max_tool_calling_iterations", None)
    if environment_factory is not None:
        if rollout_func is not None or environment is not None:
            raise ValueError(
                "Pass `environment_factory` or `rollout_func` / `environment`, not both: the factory's environments "
                "make the rollout."
            )
        rollout_func = EnvironmentToolRollout(environment_factory, tools, max_tool_calls)
        if train_dataset is None:
            train_dataset = _placeholder_dataset(rollout_func, args)
    elif tools:
        if rollout_func is not None or environment is not None:
            raise ValueError("Pass `tools` or `rollout_func` / `environment`, not both: tools make the rollout.")
        rollout_func = ToolRollout(tools, max_tool_calls)
    if environment is not None:
        if rollout_func is not None:
            raise ValueError("Pass `environment` or `rollout_func`, not both: an environment is a rollout.")
        rollout_func, reward_funcs = rollout_and_rewards(environment, reward_funcs)
    return rollout_func, reward_funcs, train_dataset


def _placeholder_dataset(rollout: EnvironmentToolRollout, args: Any) -> Dataset:
    """Empty prompts driving a run whose environments make the prompts in `reset` (TRL's no-dataset path): one
    generation's worth of rows, cycled for `max_steps`."""
    if rollout.multi_environment:
        raise ValueError(
            "A dict `environment_factory` needs a `train_dataset` whose 'environment' column routes each row to its "
            "environment; pass one, or a single factory."
        )
    if args.max_steps <= 0:
        raise ValueError(
            "Without a `train_dataset` (the environment writes the prompt in `reset`), set `GRPOConfig(max_steps=...)` "
            "to a positive number: it is the length of training."
        )
    rows = max(1, args.generation_batch_size // args.num_generations)
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": ""}]] * rows})


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


def _refuse_data_parallel(trainer: BaseTrainer) -> None:
    """`nn.DataParallel` splits a generation batch arbitrarily: refused."""
    if trainer.args.n_gpu > 1:
        raise ValueError(
            f"{type(trainer).__name__} does not support `nn.DataParallel`; launch with `accelerate launch` or "
            "`torchrun`, or make one GPU visible with `CUDA_VISIBLE_DEVICES`."
        )
