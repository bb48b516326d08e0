"""Multi-turn rollouts against an environment, as a `rollout_func` for `GRPOTrainer`."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .base import EnvironmentFactory, EnvironmentInterface, EnvironmentStep

RewardReduction = Literal["sum", "last"]


@dataclass
class _Rollout:
    """One rollout in progress: its environment, conversation, tokens and rewards."""

    environment: Any
    messages: list[dict[str, Any]]
    prompt_ids: list[int]
    num_prompt_messages: int
    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    done: bool = False

    def extend(self, ids: list[int], written_by_policy: bool, logprobs: Sequence[float] | None = None) -> None:
        self.completion_ids += ids
        self.env_mask += [int(written_by_policy)] * len(ids)
        self.logprobs += list(logprobs[: len(ids)]) if logprobs is not None else [None] * len(ids)


class EnvironmentRollout:
    """Plays each prompt as a multi-turn episode against its own environment; a `rollout_func(prompts, trainer)`.

    Per prompt: a fresh environment from `environment_factory` (a class or zero-argument callable), `reset(**row)`,
    then turns until the environment says done, `max_turns` turns were played, or the trainer's
    `max_completion_length` (the budget for all turns and observations together) is spent; a turn that overflows it
    is cut. Each turn, the still-running rollouts are generated in one `trainer.generator.generate` call; every
    reply is decoded, appended as an assistant message and passed to `environment.step`, whose observation is
    appended as a user message.

    Returns `prompt_ids` (the chat-templated prompt with its generation prompt), `completion_ids` (every assistant
    token followed, between turns, by the chat-template tokens carrying the observation and the next generation
    prompt: `prompt_ids + completion_ids` is exactly the input of the policy's last turn plus that turn, and, for a
    prefix-preserving template, the tokenized conversation through the last reply), `logprobs` (the generator's,
    `None` for template tokens; `None` altogether when the back end reports none), `env_mask` (1 for tokens the
    policy wrote, 0 for the rest, which the loss skips), `environment_reward` (per rollout, reduced by
    `reward_reduction`: `"sum"` or `"last"`) and `num_turns`. The last two reach reward functions as keyword
    columns: score with `environment_reward`.

    `reset` receives each prompt's dataset row: `rows` (the trainer passes them), else just the prompt.
    """

    def __init__(
        self,
        environment_factory: EnvironmentFactory,
        max_turns: int = 4,
        reward_reduction: RewardReduction = "sum",
    ):
        if isinstance(environment_factory, EnvironmentInterface) or not callable(environment_factory):
            raise TypeError(
                "`environment_factory` must be an environment class or a zero-argument callable returning a new "
                f"environment (each rollout needs its own state), got {environment_factory!r}."
            )
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"`max_turns` must be a positive integer, got {max_turns!r}.")
        if reward_reduction not in ("sum", "last"):
            raise ValueError(f"`reward_reduction` must be 'sum' or 'last', got {reward_reduction!r}.")
        self.environment_factory = environment_factory
        self.max_turns = max_turns
        self.reward_reduction = reward_reduction

    def __call__(self, prompts: list[Any], trainer: Any, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """One rollout per prompt; `rows`, when given, are the prompts' dataset rows (passed to `reset`)."""
        rows = _dataset_rows(prompts, rows)
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        eos_ids = set(getattr(trainer, "eos_token_ids", None) or [tokenizer.eos_token_id])
        rollouts = [self._start(prompt, row, trainer) for prompt, row in zip(prompts, rows)]
        with_logprobs = True
        for turn in range(1, self.max_turns + 1):
            active = [rollout for rollout in rollouts if not rollout.done]
            if not active:
                break
            result = trainer.generator.generate([rollout.prompt_ids + rollout.completion_ids for rollout in active])
            with_logprobs = with_logprobs and result.logprobs is not None
            for i, rollout in enumerate(active):
                logprobs = result.logprobs[i] if result.logprobs is not None else None
                self._play_turn(rollout, list(result.completion_ids[i]), logprobs, turn, trainer, tokenizer, eos_ids)
        return self._output(rollouts, with_logprobs)

    def _output(self, rollouts: list[_Rollout], with_logprobs: bool) -> dict[str, Any]:
        return {
            "prompt_ids": [rollout.prompt_ids for rollout in rollouts],
            "completion_ids": [rollout.completion_ids for rollout in rollouts],
            "logprobs": [rollout.logprobs for rollout in rollouts] if with_logprobs else None,
            "env_mask": [rollout.env_mask for rollout in rollouts],
            "environment_reward": [
                float(sum(rollout.rewards) if self.reward_reduction == "sum" else rollout.rewards[-1])
                for rollout in rollouts
            ],
            "num_turns": [len(rollout.rewards) for rollout in rollouts],
        }

    # ----------------------------------------------------------------------------------------------- turns
    def _start(self, prompt: Any, row: dict[str, Any], trainer: Any) -> _Rollout:
        environment = self.environment_factory()
        if not callable(getattr(environment, "step", None)) or not callable(getattr(environment, "reset", None)):
            raise TypeError(
                f"`environment_factory` returned {type(environment).__name__!r}, which lacks `reset` and/or `step`; "
                "subclass `llm_trainer.environments.EnvironmentInterface`."
            )
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else copy.deepcopy(list(prompt))
        observation = environment.reset(**row)
        if observation is not None:
            if not isinstance(observation, str):
                raise TypeError(
                    f"{type(environment).__name__}.reset must return a string or None, got {observation!r}."
                )
            if messages and messages[-1]["role"] == "user":
                messages[-1] = {**messages[-1], "content": messages[-1]["content"] + observation}
            else:
                messages.append({"role": "user", "content": observation})
        tools = getattr(environment, "tools", None)
        return _Rollout(environment, messages, _render(trainer, messages, True, tools), len(messages))

    def _play_turn(self, rollout, ids, logprobs, turn, trainer, tokenizer, eos_ids) -> None:
        budget = trainer.max_completion_length
        ids = ids[: budget - len(rollout.completion_ids)]
        closed = bool(ids) and ids[-1] in eos_ids
        rollout.extend(ids, written_by_policy=True, logprobs=logprobs)
        text = tokenizer.decode(ids[:-1] if closed else ids, skip_special_tokens=True)
        rollout.messages.append(self._reply_message(text, tokenizer, ids))
        step = _check_step(rollout.environment.step(copy.deepcopy(rollout.messages)), rollout.environment)
        rollout.rewards.append(step.reward)
        if step.done or turn == self.max_turns or len(rollout.completion_ids) >= budget:
            rollout.done = True
            return
        if step.observation is None:
            raise ValueError(
                f"{type(rollout.environment).__name__}.step returned observation=None with done=False; return the "
                "text the policy should answer next, or done=True to end the rollout."
            )
        observation = step.observation
        if isinstance(observation, str):
            observation = [{"role": "user", "content": observation}]
        elif isinstance(observation, dict):
            observation = [observation]
        tools = getattr(rollout.environment, "tools", None)
        observation_ids = _observation_ids(trainer, rollout.messages, observation, eos_ids, closed, tools)
        if len(rollout.completion_ids) + len(observation_ids) >= budget:  # no room left for another reply
            rollout.done = True
            return
        rollout.extend(observation_ids, written_by_policy=False)
        rollout.messages += observation

    def _reply_message(self, text: str, tokenizer: Any, ids: list[int]) -> dict[str, Any]:
        """The assistant message a reply becomes (`text` is `ids` decoded without special tokens)."""
        return {"role": "assistant", "content": text}


def environment_reward(
    completions: list[Any], environment_reward: list[float] | None = None, **kwargs: Any
) -> list[float]:
    """The reward the environment gave each rollout (the `environment_reward` column `EnvironmentRollout` returns).

    Also logs the mean number of turns as `environment/num_turns`.
    """
    if environment_reward is None:
        raise ValueError(
            "`environment_reward` found no 'environment_reward' column: use it with "
            "`rollout_func=EnvironmentRollout(...)`, which returns that column."
        )
    turns, log_metric = kwargs.get("num_turns"), kwargs.get("log_metric")
    if turns and log_metric is not None:
        log_metric("environment/num_turns", sum(turns) / len(turns))
    return [float(reward) for reward in environment_reward]


def rollout_and_rewards(environment: Any, reward_funcs: Any = None) -> tuple[EnvironmentRollout, list[Any]]:
    """What `environment=` means for an online RL trainer: its `rollout_func`, and `reward_funcs` plus
    `environment_reward`. `environment` is an `EnvironmentRollout`, or an environment class / factory played with
    the default settings."""
    rollout = environment if isinstance(environment, EnvironmentRollout) else EnvironmentRollout(environment)
    funcs = (
        []
        if reward_funcs is None
        else list(reward_funcs)
        if isinstance(reward_funcs, list | tuple)
        else [reward_funcs]
    )
    return rollout, funcs if environment_reward in funcs else [*funcs, environment_reward]


# ----------------------------------------------------------------------------------------------- helpers
def _render(trainer: Any, messages: list[dict[str, Any]], generation_prompt: bool, tools: Any = None) -> list[int]:
    ids = trainer.processing_class.apply_chat_template(
        messages,
        tools=tools or None,  # some templates render tool boilerplate for `tools=[]`
        add_generation_prompt=generation_prompt,
        tokenize=True,
        return_dict=True,
        **(getattr(trainer, "chat_template_kwargs", None) or {}),
    )["input_ids"]
    return list(ids[0]) if ids and isinstance(ids[0], list) else list(ids)  # processors return a batch of one


def _observation_ids(trainer, messages, observation, eos_ids, closed: bool, tools=None) -> list[int]:
    """The template tokens after the last assistant turn of `messages`, through the `observation` messages and the next
    generation prompt: the rendering with them minus the rendering without, cut at the assistant turn's end token.

    When the turn did not end with an end token (`closed=False`), the template's end token is included. A template
    that re-renders earlier turns once more messages follow (not prefix-preserving) is measured on a minimal
    stand-in conversation instead."""
    stand_in = {"role": "assistant", "content": "."}
    if messages[-1].get("tool_calls"):  # templates may render tool messages only after a tool call
        stand_in["tool_calls"] = messages[-1]["tool_calls"]
    for history in (messages, [{"role": "user", "content": "."}, stand_in]):
        before = _render(trainer, history, False, tools)
        after = _render(trainer, [*history, *observation], True, tools)
        ends = [i for i, token in enumerate(before) if token in eos_ids]
        cut = (ends[-1] + int(closed)) if ends else len(before)
        if after[:cut] == before[:cut]:
            return after[cut:]
    raise ValueError(
        "The chat template renders earlier messages differently once a user message follows, even for a minimal "
        "conversation, so observation tokens cannot be placed after the policy's turn; use a chat template that "
        "leaves earlier turns unchanged."
    )


def _check_step(result: Any, environment: Any) -> EnvironmentStep:
    name = type(environment).__name__
    if not isinstance(result, tuple) or len(result) != 3:
        raise TypeError(f"{name}.step must return EnvironmentStep(observation, reward, done), got {result!r}.")
    observation, reward, done = result
    messages = [observation] if isinstance(observation, dict) else observation
    if isinstance(messages, list):
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise TypeError(
                f"{name}.step returned the observation {observation!r}; an observation made of messages needs one "
                'or more dicts with "role" and "content".'
            )
    elif observation is not None and not isinstance(observation, str):
        raise TypeError(
            f"{name}.step returned a {type(observation).__name__} observation; return a string, a message dict, a "
            "list of message dicts, or None."
        )
    try:
        reward = float(reward)
    except (TypeError, ValueError):
        raise TypeError(f"{name}.step returned the reward {reward!r}; return a number.") from None
    if math.isnan(reward):
        raise ValueError(f"{name}.step returned a NaN reward; return a number.")
    return EnvironmentStep(observation, reward, bool(done))


def _dataset_rows(prompts: list[Any], rows: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    if rows is None:
        return [{"prompt": prompt} for prompt in prompts]
    if len(rows) != len(prompts):
        raise ValueError(f"Got {len(rows)} rows for {len(prompts)} prompts; pass one dataset row per prompt.")
    return rows
