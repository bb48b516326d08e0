"""What GRPO and RLOO share, as functions and one collaborator each trainer owns (`trainer.online`), no base class.

`OnlineRL.generate_and_score` takes a generation batch of dataset rows to a padded `OnlineBatch` with the old and
reference log-probs the loss needs, and the rewards of every process's completions; the trainer turns the rewards
into advantages (`losses.policy_gradient`) and `OnlineRL.finish` logs them. Both return values; the trainer
records them.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, replace
from typing import Any

import torch
from accelerate.utils import gather, gather_object, is_peft_model
from datasets import Dataset
from transformers.utils import logging

from ..environments.rollout import rollout_and_rewards
from ..environments.tools import EnvironmentToolRollout, ToolRollout
from ..generation.loop import (
    GenerationLoop,
    OnlineBatch,
    Rollout,
    RolloutFunc,
    check_streaming,
    completion_logps,
    dataset_columns,
    prompt_columns,
    save_completions_table,
)
from ..losses.policy_gradient import nanstd
from .base_trainer import BaseTrainer
from .reference_policy import ReferencePolicy
from .reward_functions import RewardFunctions

logger = logging.get_logger(__name__)


@dataclass
class ScoredRollout:
    """A generation batch generated and scored: the loss batch, the rollout, the rewards of every process's
    completions (`(N, num_funcs)`, gathered), the metrics to record and the tokens seen."""

    mode: str
    num_generations: int
    prompts: list[Any]
    batch: OnlineBatch
    rollout: Rollout
    rewards_per_func: torch.Tensor
    metrics: dict[str, float]
    tokens: int


class OnlineRL:
    """Generation and scoring of an online RL trainer, and its reward and completion logs.

    Args:
        args: the trainer's config (`per_device_{train,eval}_batch_size` chunk the log-prob forwards; with
            `use_vllm`, weights are pushed to the back end before a rollout function generates).
        generation / reward_functions / accelerator: the trainer's.
        rollout_func: TRL's `rollout_func` (or tools / an environment made into one), None to generate.
        reference: the KL reference (None when `beta == 0`).
        needs_old_logps: keep the sampling policy's log-probs always (else when the policy moves mid-batch).
    """

    def __init__(
        self,
        args: Any,
        generation: GenerationLoop,
        reward_functions: RewardFunctions,
        rollout_func: RolloutFunc | None,
        accelerator: Any,
        reference: ReferencePolicy | None,
        needs_old_logps: bool,
    ):
        self.args, self.generation, self.reward_functions = args, generation, reward_functions
        self.rollout_func, self.accelerator, self.reference = rollout_func, accelerator, reference
        self.needs_old_logps = needs_old_logps
        size = args.generation_batch_size
        self.logs: dict[str, Any] = {
            "prompt": deque(maxlen=size),
            "completion": deque(maxlen=size),
            "rewards": defaultdict(lambda: deque(maxlen=size)),
            "advantages": deque(maxlen=size),
            "extra": defaultdict(lambda: deque(maxlen=size)),
        }
        self.pending_extra_logs: defaultdict[str, list] = defaultdict(list)
        self.pending_metrics: defaultdict[str, list[float]] = defaultdict(list)
        self.warned_zero_reward_spread = False

    @classmethod
    def build(cls, trainer: Any, needs_old_logps: bool) -> OnlineRL:
        """GRPO's / RLOO's, once `Trainer.__init__` ran, with a new generation loop; reward models are placed."""
        args, accelerator, rewards = trainer.args, trainer.accelerator, trainer.reward_functions
        for i, func in enumerate(rewards.funcs):
            if isinstance(func, torch.nn.Module):
                rewards.funcs[i] = accelerator.prepare_model(func, evaluation_mode=True)
        generation = GenerationLoop.from_args(args, trainer, args.mask_truncated_completions)
        return cls(args, generation, rewards, trainer.rollout_func, accelerator, trainer.reference, needs_old_logps)

    def log_extra(self, column: str, values: list) -> None:
        """For reward functions (and rollouts): an extra column in the completions table."""
        self.pending_extra_logs[column].extend(values)

    def log_metric(self, name: str, value: float) -> None:
        """For reward functions (and rollouts): a scalar averaged into the logs."""
        self.pending_metrics[name].append(value)

    # ----------------------------------------------------------------------------------------------- rollouts
    def generate_and_score(
        self, rows: list[dict[str, Any]], policy: torch.nn.Module, state: Any, trainer: Any
    ) -> ScoredRollout:
        """Generate for `rows` (the rollout function gets `trainer`, TRL's contract), pad, add the old and reference
        log-probs, and score every process's completions (reward functions get `trainer_state=state`)."""
        training, geometry = policy.training, self.generation.geometry
        unwrapped = self.accelerator.unwrap_model(policy)
        if self.rollout_func is None or self.args.use_vllm:
            self.generation.sync_weights(unwrapped, state.global_step)
        prompts = [row["prompt"] for row in rows]
        rollout = self.generation.generate(prompts, rows, self.rollout_func, trainer)
        rollout, metrics = self._tool_metrics(rollout)
        tokens, length_metrics = self.generation.completion_metrics(rollout)
        batch = self.generation.pad(rollout)
        args = self.args
        chunk = args.per_device_train_batch_size if training else args.per_device_eval_batch_size
        with torch.no_grad():
            if self.needs_old_logps or geometry.needs_old_logps(args.gradient_accumulation_steps):
                batch.old_per_token_logps = self._logps(policy, batch, chunk)
            if self.reference is not None:
                model = self.reference.model if self.reference.model is not None else policy
                with self.reference.context(unwrapped):
                    batch.ref_per_token_logps = self._logps(model, batch, chunk)
        rewards_per_func = gather(self._score(prompts, rows, rollout, state))
        group = geometry.num_generations if training else geometry.num_generations_eval
        mode = "train" if training else "eval"
        return ScoredRollout(mode, group, prompts, batch, rollout, rewards_per_func, length_metrics | metrics, tokens)

    def _logps(self, model: torch.nn.Module, batch: OnlineBatch, chunk: int) -> torch.Tensor:
        return completion_logps(model, batch, chunk, autocast=self.accelerator.autocast)[0]

    def _tool_metrics(self, rollout: Rollout) -> tuple[Rollout, dict[str, float]]:
        """With tools: conversational completions become the assistant and tool messages (like TRL), and the
        tool-call and failure frequencies are measured."""
        if not isinstance(self.rollout_func, ToolRollout):
            return rollout, {}
        extra = dict(rollout.extra)
        messages = extra.pop("completion_messages")
        completions = rollout.completions if isinstance(rollout.completions[0], str) else messages
        device = self.accelerator.device
        calls = gather(torch.tensor(extra.pop("tool_call_count"), device=device, dtype=torch.float))
        failures = gather(torch.tensor(extra.pop("tool_failure_count"), device=device, dtype=torch.float))
        metrics = {
            "tools/call_frequency": (calls.sum() / calls.numel()).item(),
            "tools/failure_frequency": (failures.sum() / calls.sum()).item() if calls.sum() > 0 else 0.0,
        }
        return replace(rollout, completions=completions, extra=extra), metrics

    def _score(self, prompts: list[Any], rows: list[dict[str, Any]], rollout: Rollout, state: Any) -> torch.Tensor:
        columns = self.reward_functions.columns(rows, rollout.extra) | {
            "trainer_state": state,
            "log_extra": self.log_extra,
            "log_metric": self.log_metric,
        }
        return self.reward_functions.score(
            prompts,
            rollout.completions,
            rollout.completion_ids,
            columns,
            self.accelerator.device,
            self.generation.chat_template_kwargs,
        )

    # ----------------------------------------------------------------------------------------------- logs
    def finish(
        self, scored: ScoredRollout, advantages: torch.Tensor, is_std_zero: torch.Tensor, step: int
    ) -> dict[str, float]:
        """Give the batch this process's `advantages` (of every process's completions), log the samples, and return
        the reward metrics (TRL's names, with what reward functions logged through `log_metric`)."""
        batch, rewards_per_func = scored.batch, scored.rewards_per_func
        num_rows = batch.prompt_ids.size(0)
        start = self.accelerator.process_index * num_rows
        batch.advantages = advantages[start : start + num_rows]
        metrics = dict(scored.metrics)  # the generation's, then the rewards'
        for i, name in enumerate(self.reward_functions.names):
            metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, i]).item()
            metrics[f"rewards/{name}/std"] = nanstd(rewards_per_func[:, i]).item()
        weights = self.reward_functions.weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        metrics["reward"] = torch.nanmean(rewards).item()
        metrics["reward_std"] = nanstd(rewards).item()
        metrics["frac_reward_zero_std"] = is_std_zero.float().mean().item()
        if scored.mode == "train" and is_std_zero.numel() and bool(is_std_zero.all()):
            self._warn_zero_reward_spread(step)
        device = self.accelerator.device
        for name in sorted(set(gather_object(list(self.pending_metrics)))):
            values = self.pending_metrics.get(name, [])
            stats = gather(torch.tensor([sum(values), len(values)], dtype=torch.float32, device=device))
            total, count = stats.view(-1, 2).sum(dim=0).tolist()
            metrics[name] = total / count
        self.pending_metrics.clear()
        self._log_samples(scored.prompts, scored.rollout.completions, rewards_per_func, advantages)
        return metrics

    def _warn_zero_reward_spread(self, step: int) -> None:
        """Warn, once, that a whole generation batch had identical rewards within every group."""
        if self.warned_zero_reward_spread or not self.accelerator.is_main_process:
            return
        self.warned_zero_reward_spread = True
        logger.warning(
            f"At step {step}, all {self.generation.geometry.num_generations} completions of every prompt got the same "
            "reward (frac_reward_zero_std=1.0): every advantage is 0, so the policy gets no gradient from these "
            "rewards (only the KL penalty acts, when `beta` > 0). Make the reward functions tell completions apart "
            "(partial credit rather than all-or-nothing), check that they read the right columns, or raise "
            "`temperature` / `num_generations` for more varied completions. frac_reward_zero_std is logged each step."
        )

    def _log_samples(self, prompts, completions, rewards_per_func, advantages) -> None:
        self.logs["prompt"].extend(gather_object(prompts))
        self.logs["completion"].extend(gather_object(completions))
        for i, name in enumerate(self.reward_functions.names):
            self.logs["rewards"][name].extend(rewards_per_func[:, i].tolist())
        self.logs["advantages"].extend(advantages.tolist())
        for column in sorted(set(gather_object(list(self.pending_extra_logs)))):
            values = self.pending_extra_logs.get(column, [None] * len(prompts))
            self.logs["extra"][column].extend(gather_object(values))
        self.pending_extra_logs.clear()

    def save_completions(self, args: Any, step: int) -> None:
        """Print, save and report the latest completions with their rewards (`save_completions_table`)."""
        logs = self.logs
        table = {
            "step": [step] * len(logs["prompt"]),
            "prompt": list(logs["prompt"]),
            "completion": list(logs["completion"]),
            **{name: list(values) for name, values in logs["rewards"].items()},
            **{name: list(values) for name, values in logs["extra"].items()},
            "advantage": list(logs["advantages"]),
        }
        save_completions_table(table, args, step, args.num_completions_to_print, tuple(logs["rewards"]))


def rollout_source(
    args: Any,
    reward_funcs: Any,
    rollout_func: Any = None,
    tools: Any = None,
    environment_factory: Any = None,
    environment: Any = None,
) -> tuple[Any, Any]:
    """The rollout function that `tools`, `environment_factory` (TRL's) or `environment` (llm_trainer's) make, and
    the reward functions with an environment's."""
    max_tool_calls = getattr(args, "max_tool_calling_iterations", None)
    if environment_factory is not None:
        if rollout_func is not None or environment is not None:
            raise ValueError(
                "Pass `environment_factory` or `rollout_func` / `environment`, not both: the factory's environments "
                "make the rollout."
            )
        rollout_func = EnvironmentToolRollout(environment_factory, tools, max_tool_calls)
    elif tools:
        if rollout_func is not None or environment is not None:
            raise ValueError("Pass `tools` or `rollout_func` / `environment`, not both: tools make the rollout.")
        rollout_func = ToolRollout(tools, max_tool_calls)
    if environment is not None:
        if rollout_func is not None:
            raise ValueError("Pass `environment` or `rollout_func`, not both: an environment is a rollout.")
        rollout_func, reward_funcs = rollout_and_rewards(environment, reward_funcs)
    return rollout_func, reward_funcs


def placeholder_dataset(rollout: EnvironmentToolRollout, args: Any) -> Dataset:
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


def check_reward_source(reward_funcs: Any, rollout_func: Any) -> None:
    """Refuse to train without rewards: every advantage would be 0 and the policy would never move. A rollout
    function with a `reward_funcs()` method (environments that define `get_reward`) is a reward source too."""
    if reward_funcs is not None and not (isinstance(reward_funcs, list | tuple) and not reward_funcs):
        return
    rollout_rewards = getattr(rollout_func, "reward_funcs", None)
    if callable(rollout_rewards) and rollout_rewards():
        return
    raise ValueError(
        f"No reward source provided: `reward_funcs` is {reward_funcs!r}, so every completion would score 0 and the "
        "policy would get no gradient. Pass `reward_funcs` (a function, a reward model's name or path, or a list of "
        "them), or, with GRPOTrainer, an `environment_factory` whose environment defines `get_reward`."
    )


def check_online_inputs(
    trainer_name: str, args: Any, train_dataset: Any, eval_dataset: Any, reward_funcs: Any, rollout_func: Any
) -> None:
    """What GRPO and RLOO refuse before loading anything: no reward source, streams with `dispatch_batches`, a bad
    training set (none is fine for environments that write their prompts), unsupported options."""
    check_reward_source(reward_funcs, rollout_func)
    check_streaming(train_dataset, eval_dataset, args)
    if train_dataset is not None or not isinstance(rollout_func, EnvironmentToolRollout):
        BaseTrainer.check_train_dataset(train_dataset, "a dataset with a 'prompt' column")
        prompt_columns(train_dataset, eval_dataset, trainer_name, rollout_func is not None)
    if args.use_transformers_continuous_batching:
        raise NotImplementedError(
            "`use_transformers_continuous_batching` is not supported yet; generation uses batched `generate` with "
            "a KV cache (or vLLM with `use_vllm=True`)."
        )
    if args.sync_ref_model and args.beta == 0.0:
        raise ValueError(
            "`sync_ref_model=True` needs a reference model, but `beta=0.0` uses none; set `beta` > 0 or "
            "`sync_ref_model=False`."
        )


def online_reference(model: Any, peft_config: Any, args: Any) -> ReferencePolicy | None:
    """The KL reference of GRPO / RLOO (None when `beta == 0`): a frozen copy, or under PEFT the adapter-free
    policy (a given adapter is copied as the frozen "ref" adapter)."""
    if args.beta == 0.0:
        return None
    if args.sync_ref_model and is_peft_model(model):
        raise NotImplementedError(
            "`sync_ref_model=True` is not supported with a PEFT model: the reference is the adapter-free base "
            "model. Set `sync_ref_model=False`."
        )
    return ReferencePolicy.for_policy(model, copy_given_adapter=peft_config is None)


def online_reward_functions(
    args: Any, reward_funcs: Any, processing_classes: Any, rollout_func: Any, train_dataset: Any
) -> RewardFunctions:
    """The reward functions, their signatures checked against the dataset's columns, with the `get_reward` of
    environments that score themselves."""
    rewards = RewardFunctions(
        reward_funcs,
        args.reward_weights,
        processing_classes,
        model_init_kwargs=args.model_init_kwargs,
        trust_remote_code=args.trust_remote_code,
    )
    columns = dataset_columns(train_dataset) if train_dataset is not None else ["prompt"]
    rewards.check_signatures(columns, exact=rollout_func is None)
    if isinstance(rollout_func, EnvironmentToolRollout):
        for func in rollout_func.reward_funcs():
            rewards.append(func)
    return rewards
