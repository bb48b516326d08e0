"""Reward functions of the online RL trainers (GRPO, RLOO): loading, naming, calling, as TRL does; and `OnlineRL`,
which generates a batch of rows and scores it (one step of GRPO / RLOO up to the advantages).

A reward function is either a callable `f(prompts, completions, completion_ids, **kwargs) -> list[float | None]`
(sync or `async def`), receiving every other dataset column as a keyword plus `trainer_state`, `log_extra` and
`log_metric`; or a sequence-classification model (or its name or path), scoring the prompt + completion text by its
first logit. `None` means "not applicable to this sample" and becomes NaN.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import numbers
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from accelerate.utils import gather, gather_object
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from .._background_loop import background_loop
from ..data.formats import is_conversational
from ..data.validation import short_repr
from ..data_utils import apply_chat_template
from ..environments.tools import ToolRollout
from ..generation.loop import (
    GenerationLoop,
    OnlineBatch,
    Rollout,
    RolloutFunc,
    completion_logps,
    save_completions_table,
)
from ..losses.policy_gradient import nanstd
from ..modeling import check_model_path
from .reference_policy import ReferencePolicy
from .utils import get_callable_name, is_async_callable, strip_images_from_messages

logger = logging.getLogger(__name__)

RewardFunc = str | nn.Module | Callable[..., list[float | None]]
_PASSED_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def reward_function_name(func: Any) -> str:
    """The name a reward function's metrics are logged under (`rewards/<name>/mean`)."""
    if isinstance(func, nn.Module):
        return str(getattr(func.config, "_name_or_path", type(func).__name__)).rstrip("/").split("/")[-1]
    return get_callable_name(func)


class RewardFunctions:
    """The trainer's reward functions with their weights and tokenizers; `score` returns rewards per function."""

    def __init__(
        self,
        funcs: RewardFunc | Sequence[RewardFunc] | None,
        weights: Sequence[float] | None,
        processing_classes: PreTrainedTokenizerBase | Sequence[PreTrainedTokenizerBase | None] | None,
        model_init_kwargs: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
    ):
        funcs = [] if funcs is None else list(funcs) if isinstance(funcs, list | tuple) else [funcs]
        init_kwargs = {"trust_remote_code": trust_remote_code, **(model_init_kwargs or {})}
        self.funcs = [self._load(func, init_kwargs) if isinstance(func, str) else func for func in funcs]
        for func in self.funcs:
            if not isinstance(func, nn.Module) and not callable(func):
                raise TypeError(
                    f"Reward functions must be callables, models or model names; got {type(func).__name__}."
                )
            if isinstance(func, type):
                raise TypeError(
                    f"The reward function {func.__name__} is a class: pass an instance, `{func.__name__}()`, whose "
                    "`__call__(completions, **kwargs)` returns the rewards."
                )
            if isinstance(func, nn.Module) and callable(getattr(func, "get_output_embeddings", None)):
                if func.get_output_embeddings() is not None:
                    raise ValueError(
                        f"The reward model {type(func).__name__} is a language model (it has an LM head), so its "
                        "first logit is no score. Pass a sequence-classification model "
                        "(`AutoModelForSequenceClassification`, `num_labels=1`), or the model's name or path, "
                        "which loads it with a score head."
                    )
        self.names = [reward_function_name(func) for func in self.funcs]
        if weights is not None and len(weights) != len(self.funcs):
            raise ValueError(
                f"`reward_weights` has {len(weights)} values but there are {len(self.funcs)} reward functions; give one "
                "weight per reward function."
            )
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(self.funcs), dtype=torch.float32)
        if processing_classes is None:
            processing_classes = [None] * len(self.funcs)
        elif not isinstance(processing_classes, list):  # one tokenizer stands for a list of one, as in TRL
            processing_classes = [processing_classes]
        if len(processing_classes) != len(self.funcs):
            raise ValueError(
                f"The number of reward processing classes ({len(processing_classes)}) must match the number of reward "
                f"functions ({len(self.funcs)}): give a list with one per reward function (None for plain functions "
                "and for reward models whose own tokenizer should be loaded)."
            )
        self.processing_classes = [
            self._tokenizer_for(func, tokenizer, init_kwargs) if isinstance(func, nn.Module) else tokenizer
            for func, tokenizer in zip(self.funcs, processing_classes)
        ]

    def __len__(self) -> int:
        return len(self.funcs)

    def append(self, func: Callable) -> None:
        """Add a plain reward function of weight 1 (e.g. an environment's own `get_reward`)."""
        self.funcs.append(func)
        self.names.append(func.__name__)
        self.processing_classes.append(None)
        self.weights = torch.cat([self.weights, torch.ones(1)])

    @staticmethod
    def columns(rows: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, list[Any]]:
        """Reward-function keywords: every dataset column but 'prompt', 'completion' and 'completion_ids', then the
        rollout's `extra` fields (a list per row, or one value for all), which take precedence. `rows` are read,
        never written."""
        skip = ("prompt", "completion", "completion_ids")
        columns = {key: [row[key] for row in rows] for key in rows[0] if key not in skip}
        for key, values in extra.items():
            if key != "completion_ids":
                columns[key] = values if isinstance(values, list) else [values] * len(rows)
        return columns

    def check_signatures(self, columns: Sequence[str], exact: bool = True) -> None:
        """Raise a `TypeError` naming the reward function and the keywords when a function cannot be called the way
        `score` calls it: with `prompts`, `completions`, `completion_ids`, `trainer_state`, `log_extra`,
        `log_metric` and every dataset column but 'prompt' and 'completion' (`columns`), all as keywords. With
        `exact=False` (a rollout function may add keywords), required parameters outside these are not checked."""
        passed = set(_PASSED_KEYWORDS) | {column for column in columns if column not in ("prompt", "completion")}
        for name, func in zip(self.names, self.funcs):
            if isinstance(func, nn.Module):
                continue
            try:
                signature = inspect.signature(func)
            except (TypeError, ValueError):
                continue
            params = signature.parameters.values()
            keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            accepted = {p.name for p in params if p.kind in keyword_kinds}
            unexpected = passed - accepted
            if unexpected and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                raise TypeError(
                    f"The reward function '{name}{signature}' does not accept {sorted(unexpected)}, which the trainer "
                    f"passes as keywords to every reward function (along with {sorted(passed - unexpected)}). Add "
                    f"`**kwargs`, e.g. `def {name}(completions, **kwargs) -> list[float]`."
                )
            required = [
                p.name
                for p in params
                if p.default is p.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
                and (p.name not in passed or p.kind is inspect.Parameter.POSITIONAL_ONLY)
            ]
            if required and exact:
                dataset_columns = sorted(set(columns) - {"prompt", "completion"})
                raise TypeError(
                    f"The reward function '{name}{signature}' needs {required}, but the trainer passes only "
                    f"{sorted(_PASSED_KEYWORDS)} and the dataset columns {dataset_columns}, all as keywords. Add the "
                    "column(s) to the dataset, rename the parameter(s) after a column, or give them a default."
                )

    @staticmethod
    def _load(name: str, init_kwargs: dict[str, Any]) -> nn.Module:
        from .. import rewards

        if name in rewards.__all__:
            raise TypeError(
                f"{name!r} in `reward_funcs` is a string, which names a reward model; to score with the function, "
                f"pass it: `from llm_trainer.rewards import {name}`, then `reward_funcs=[{name}]`."
            )
        check_model_path(name, "reward model")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, **init_kwargs)
        except OSError as error:
            raise OSError(
                f"Could not load the reward model {name!r} ({error}). A string in `reward_funcs` is a reward model's "
                "Hub id or local folder; to score with a function, pass the function itself."
            ) from error
        return model.eval().requires_grad_(False)

    @staticmethod
    def _tokenizer_for(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, init_kwargs: dict[str, Any]):
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(
                model.config._name_or_path,
                revision=init_kwargs.get("revision"),
                trust_remote_code=init_kwargs.get("trust_remote_code", False),
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        return tokenizer

    def score(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        columns: dict[str, list[Any]],
        device: torch.device,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Rewards of shape `(len(prompts), len(self))`, NaN where a function returned None.

        Plain functions get `prompts`, `completions`, `completion_ids` and every entry of `columns` as keywords;
        async ones run concurrently on a background event loop while the sync ones run here.
        """
        rewards = torch.full((len(prompts), len(self.funcs)), torch.nan, device=device)
        kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
        pending = {}
        for i, func in enumerate(self.funcs):
            if not isinstance(func, nn.Module) and is_async_callable(func):
                pending[i] = asyncio.run_coroutine_threadsafe(func(**kwargs), background_loop())
        for i, func in enumerate(self.funcs):
            if isinstance(func, nn.Module):
                scores = self._model_scores(
                    func, self.processing_classes[i], prompts, completions, device, chat_template_kwargs or {}
                )
                rewards[:, i] = self._check_finite(i, scores, scores.tolist())
            elif i not in pending:
                with self._naming(i):
                    values = func(**kwargs)
                rewards[:, i] = self._as_tensor(i, values, len(prompts), device)
        for i, future in pending.items():
            with self._naming(i):
                values = future.result()
            rewards[:, i] = self._as_tensor(i, values, len(prompts), device)
        unscored = torch.isnan(rewards).all(dim=1)
        if len(self.funcs) and unscored.any():
            row = int(unscored.nonzero()[0, 0])
            logger.warning(
                "All reward functions returned None for the following kwargs: completion %r of the prompt %r. Return "
                "a reward from at least one function for each sample.",
                completions[row],
                prompts[row],
            )
        return rewards

    @contextlib.contextmanager
    def _naming(self, index: int) -> Iterator[None]:
        """Add a note naming the reward function to an exception it raises."""
        try:
            yield
        except Exception as error:
            error.add_note(f"(raised by the reward function '{self.names[index]}' while scoring a batch)")
            raise

    def _as_tensor(self, index: int, values: Any, expected: int, device: torch.device) -> torch.Tensor:
        name = self.names[index]
        if isinstance(values, str | bytes | dict) or not isinstance(values, Iterable):
            raise TypeError(
                f"The reward function '{name}' returned {short_repr(values)} ({type(values).__name__}) instead of a list "
                f"of {expected} rewards; return one float (or None to skip) per completion, e.g. [1.0, 0.0, None]."
            )
        values = list(values)
        if len(values) != expected:
            raise ValueError(
                f"The reward function '{name}' returned {len(values)} rewards for {expected} completions; "
                "return exactly one reward (or None) per completion."
            )
        for position, value in enumerate(values):
            if not (value is None or isinstance(value, numbers.Real) or _is_scalar_tensor(value)):
                raise TypeError(
                    f"The reward function '{name}' returned a list holding {short_repr(value)} ({type(value).__name__}) "
                    f"at position {position}; each reward must be a number, or None to skip that completion."
                )
        rewards = [torch.nan if v is None else float(v) for v in values]
        return self._check_finite(index, torch.tensor(rewards, dtype=torch.float32, device=device), values)

    def _check_finite(self, index: int, rewards: torch.Tensor, values: list[Any]) -> torch.Tensor:
        """`rewards`, or a `ValueError` naming the function and the value when one is infinite (`values` are the
        rewards as returned, `rewards` as float32, where huge finite values overflow too)."""
        infinite = torch.isinf(rewards).nonzero()
        if len(infinite):
            position = int(infinite[0, 0])
            raise ValueError(
                f"The reward function '{self.names[index]}' returned {values[position]!r} for completion {position}: "
                "rewards must be finite (float32) numbers, since one infinite reward makes the whole group's "
                "advantages NaN. Clip it to a finite range (e.g. -10 to 10), or return None to skip the completion."
            )
        return rewards

    @staticmethod
    @torch.no_grad()
    def _model_scores(model, tokenizer, prompts, completions, device, chat_template_kwargs) -> torch.Tensor:
        if is_conversational({"prompt": prompts[0]}):
            texts = [
                apply_chat_template({"messages": p + c}, tokenizer, **chat_template_kwargs)["text"]
                for p, c in zip(prompts, completions)
            ]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        inputs = tokenizer(
            text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
        ).to(device)
        return model(**inputs).logits[:, 0].float()


def _is_scalar_tensor(value: Any) -> bool:
    """Whether `value` is a one-element tensor or array (`float(value)` reads it)."""
    if not hasattr(value, "item"):
        return False
    size = value.numel() if callable(getattr(value, "numel", None)) else getattr(value, "size", None)
    return size == 1


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
            "images": deque(maxlen=size),
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
            self.generation.sync_weights(policy, state.global_step)  # FSDP1: its wrapper summons the full weights
        prompts = [row["prompt"] for row in rows]
        rollout = self.generation.generate(prompts, rows, self.rollout_func, trainer)
        prompts = rollout.prompts if rollout.prompts is not None else prompts  # with the rows' images, as TRL's
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
        packed = getattr(self.args, "packed_forward", None)
        return completion_logps(model, batch, chunk, autocast=self.accelerator.autocast, packed_forward=packed)[0]

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
        if scored.rollout.images is not None and getattr(self.args, "log_multimodal", False):
            self.logs["images"].extend(gather_object(scored.rollout.images))
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
            "prompt": [strip_images_from_messages(prompt) for prompt in logs["prompt"]],
            "completion": list(logs["completion"]),
            **{name: list(values) for name, values in logs["rewards"].items()},
            **{name: list(values) for name, values in logs["extra"].items()},
            "advantage": list(logs["advantages"]),
        }
        images = list(logs["images"]) if len(logs["images"]) == len(logs["prompt"]) else None
        save_completions_table(table, args, step, args.num_completions_to_print, tuple(logs["rewards"]), images)
