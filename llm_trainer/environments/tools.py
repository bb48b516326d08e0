"""Tool calling as an environment: the policy calls Python functions, their results come back as tool messages.

`GRPOTrainer(..., tools=[...])` plays every prompt with a `ToolRollout`, `GRPOTrainer(..., environment_factory=...)`
with an `EnvironmentToolRollout` (TRL's environments: an object whose public methods are the tools); each class also
works on its own.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import re
import sys
from collections.abc import Callable
from typing import Any

from .._background_loop import background_loop
from ..chat_template_utils import supports_tool_calling
from .base import EnvironmentInterface, EnvironmentStep
from .rollout import EnvironmentRollout, _dataset_rows, _Rollout

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split a reply into its text and its `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (the
    Hermes / Qwen2.5 format) as `[{"type": "function", "function": {"name", "arguments"}}]`. A reply with a block
    that is not such JSON counts as plain text (no tool calls), like TRL's fallback."""
    calls = []
    for block in _TOOL_CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        calls.append({"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments")}})
    return (_TOOL_CALL.sub("", text).strip(), calls) if calls else (text, [])


def check_tool_template(tokenizer: Any) -> None:
    """Raise a `ValueError` unless the chat template renders a whole tool exchange (the call's name and arguments, and
    the result), as `llm_trainer.chat_template_utils.supports_tool_calling` checks."""
    if not supports_tool_calling(tokenizer):
        raise ValueError(
            "The provided chat template does not support tool calling: it cannot render tool calls (a full "
            "tool-calling conversation, user -> assistant with `tool_calls` -> tool). Use a tokenizer whose template "
            "supports tools, or set `tokenizer.chat_template`."
        )


class ToolEnvironment(EnvironmentInterface):
    """Runs the tool calls of each assistant turn and answers with one `{"role": "tool", "name", "content"}` message
    per call (the result as a string, or `{'error': ...}` when the call fails); done after a turn without tool
    calls, or once `max_iterations` turns have called tools (the calls of a later turn are not run).

    `tools` are plain functions, sync or async, with type hints and a docstring (the chat template renders their
    JSON schema). Calls come from the message's `tool_calls`, else from `<tool_call>` blocks in its content. Counts
    `calls` and `failures` (an unknown tool, bad arguments, an exception in the tool). Rewards are 0.
    """

    _needs_tools = True

    def __init__(self, tools: list[Callable], max_iterations: int | None = None):
        tools = list(tools)
        if (self._needs_tools and not tools) or not all(
            callable(tool) and hasattr(tool, "__name__") for tool in tools
        ):
            raise TypeError(f"`tools` must be a non-empty list of functions, got {tools!r}.")
        if max_iterations is not None and (not isinstance(max_iterations, int) or max_iterations < 0):
            raise ValueError(f"`max_tool_calling_iterations` must be None or an integer >= 0, got {max_iterations!r}.")
        self.tools = tools
        self._by_name = {tool.__name__: tool for tool in tools}
        self.max_iterations = sys.maxsize if max_iterations is None else max_iterations
        self.iterations = self.calls = self.failures = 0

    def reset(self, **row: Any) -> None:
        self.iterations = self.calls = self.failures = 0

    def step(self, messages: list[dict[str, Any]]) -> EnvironmentStep:
        reply = messages[-1]
        calls = reply.get("tool_calls") or parse_tool_calls(reply.get("content") or "")[1]
        if not calls or self.iterations >= self.max_iterations:
            return EnvironmentStep(None, 0.0, done=True)
        self.iterations += 1
        self.calls += len(calls)
        results = [self._call(call) for call in calls]
        pending = [i for i, (_, result) in enumerate(results) if inspect.isawaitable(result)]
        if pending:
            awaited = _gather([results[i][1] for i in pending])
            for i, result in zip(pending, awaited):
                results[i] = (results[i][0], self._error(result) if isinstance(result, BaseException) else result)
        return EnvironmentStep([{"role": "tool", "name": name, "content": str(result)} for name, result in results])

    def _call(self, call: dict[str, Any]) -> tuple[str, Any]:
        function = call.get("function") or {}
        name = function.get("name", call.get("name", "unknown"))
        if call.get("type", "function") != "function":
            return name, self._error(f"Unsupported tool call type: {call.get('type')}")
        try:
            arguments = function.get("arguments") or {}
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            if name not in self._by_name:
                raise ValueError(f"Tool {name} not found.")
            return name, self._by_name[name](**arguments)
        except Exception as error:  # a failing tool call is reported to the policy, not raised
            return name, self._error(error)

    def _error(self, error: Any) -> dict[str, str]:
        self.failures += 1
        return {"error": str(error)}


class ToolRollout(EnvironmentRollout):
    """`EnvironmentRollout` of a `ToolEnvironment(tools, max_tool_calling_iterations)`: TRL's tool-calling loop as a
    `rollout_func`. Replies are parsed with the tokenizer's response schema when it has one (`parse_response`), else
    from `<tool_call>` blocks. Returns `prompt_ids`, `completion_ids`, `logprobs`, `env_mask` (0 on tool-result
    tokens), and per rollout `tool_call_count`, `tool_failure_count` and `completion_messages` (the assistant and
    tool messages after the prompt)."""

    def __init__(self, tools: list[Callable], max_tool_calling_iterations: int | None = None):
        ToolEnvironment(tools, max_tool_calling_iterations)  # validate now, not at the first rollout
        super().__init__(functools.partial(ToolEnvironment, tools, max_tool_calling_iterations), max_turns=sys.maxsize)
        self.tools = list(tools)

    def _reply_message(self, text: str, tokenizer: Any, ids: list[int]) -> dict[str, Any]:
        if getattr(tokenizer, "response_template", None) is not None or getattr(tokenizer, "response_schema", None):
            try:
                message = tokenizer.parse_response(ids)
            except (ValueError, TypeError):  # malformed tool calls: plain text
                message = None
            if isinstance(message, dict):
                content = message.get("content")
                return {**message, "role": "assistant", "content": content if isinstance(content, str) else ""}
        content, calls = parse_tool_calls(text)
        return (
            {"role": "assistant", "content": content, "tool_calls": calls}
            if calls
            else super()._reply_message(text, tokenizer, ids)
        )

    def _output(self, rollouts: list[_Rollout], with_logprobs: bool) -> dict[str, Any]:
        output = super()._output(rollouts, with_logprobs)
        del output["environment_reward"], output["num_turns"]
        return output | {
            "tool_call_count": [rollout.environment.calls for rollout in rollouts],
            "tool_failure_count": [rollout.environment.failures for rollout in rollouts],
            "completion_messages": [rollout.messages[rollout.num_prompt_messages :] for rollout in rollouts],
        }


def environment_tools(environment: Any) -> list[Callable]:
    """The public methods of `environment` (not `reset`, `get_reward` or `_private` ones), bound to it: the tools
    of a TRL-style environment. Raises unless it defines `reset`."""
    members = dict(inspect.getmembers(type(environment), predicate=inspect.isfunction))  # the class: no properties
    if "reset" not in members:
        raise ValueError(
            f"The environment {type(environment).__name__!r} made by `environment_factory` has no `reset` method; "
            "define `reset(self, **row)` (returning None or a string appended to the prompt)."
        )
    return [
        getattr(environment, name)
        for name in members
        if name not in ("reset", "get_reward") and not name.startswith("_")
    ]


class _BoundToolEnvironment(ToolEnvironment):
    """A `ToolEnvironment` whose tools include the methods of one TRL-style environment `instance`, whose `reset`
    it delegates to."""

    _needs_tools = False  # an environment may only set the prompt (`reset`) and score (`get_reward`)

    def __init__(self, instance: Any, tools: list[Callable], max_iterations: int | None, drop_key: str | None):
        super().__init__([*tools, *environment_tools(instance)], max_iterations)
        self.instance, self._drop_key = instance, drop_key

    def reset(self, **row: Any) -> str | None:
        super().reset()
        return self.instance.reset(**{key: value for key, value in row.items() if key != self._drop_key})


class EnvironmentToolRollout(ToolRollout):
    """TRL's `environment_factory` as a `ToolRollout`: each rollout gets its own environment instance, whose public
    methods (bound to it, so each rollout has its own state) are the rollout's tools, next to the shared `tools`.

    `environment_factory` is a class or zero-argument callable, or a `{name: factory}` dict: then each dataset row
    picks its environment by name in an `environment` column (not passed to `reset`), and its prompt renders only
    that environment's tools. Instances are pooled: made once, `reset(**row)` before every rollout (a returned
    string is appended to the prompt's last user message), and more are made only when a batch needs more of them.
    The output adds `environments` (the instance of each rollout), which reward functions receive as a keyword;
    `reward_funcs()` scores with the environments' own `get_reward` methods.
    """

    def __init__(
        self,
        environment_factory: Any,
        tools: list[Callable] | None = None,
        max_tool_calling_iterations: int | None = None,
    ):
        self.multi_environment = isinstance(environment_factory, dict)
        factories = environment_factory if self.multi_environment else {None: environment_factory}
        if not factories:
            raise ValueError("`environment_factory` is an empty dict; map at least one name to a factory.")
        for name, factory in factories.items():
            if not callable(factory) or inspect.ismodule(factory):
                where = f" for {name!r}" if self.multi_environment else ""
                raise TypeError(
                    f"`environment_factory`{where} must be an environment class or a zero-argument callable returning "
                    f"a new environment, got {factory!r}."
                )
        self.factories = factories
        self.shared_tools = list(tools or [])
        self.max_tool_calling_iterations = max_tool_calling_iterations
        self.pools: dict[Any, list[Any]] = {}
        union: list[Callable] = list(self.shared_tools)
        for name, factory in factories.items():
            probe = self._environment(factory())  # validates the instance and the tools; seeds the pool
            self.pools[name] = [probe.instance]
            union += [tool for tool in probe.tools if tool not in union]
        EnvironmentRollout.__init__(self, self._next_environment, max_turns=sys.maxsize)
        self.tools = union
        self._batch: list[_BoundToolEnvironment] = []

    def _environment(self, instance: Any) -> _BoundToolEnvironment:
        drop_key = "environment" if self.multi_environment else None
        return _BoundToolEnvironment(instance, self.shared_tools, self.max_tool_calling_iterations, drop_key)

    def __call__(self, prompts: list[Any], trainer: Any, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        rows = _dataset_rows(prompts, rows)
        names = [row.get("environment") for row in rows] if self.multi_environment else [None] * len(rows)
        unknown = sorted({str(name) for name in names if name not in self.factories})
        if unknown:
            raise ValueError(
                f"Dataset rows ask for `environment` {unknown}, which `environment_factory` does not define; use one "
                f"of {list(self.factories)} in the 'environment' column."
            )
        handed_out: dict[Any, int] = {}
        batch = []
        for name in names:
            pool, index = self.pools[name], handed_out.get(name, 0)
            if index == len(pool):
                pool.append(self._environment(self.factories[name]()).instance)
            handed_out[name] = index + 1
            batch.append(self._environment(pool[index]))
        self._batch = batch[::-1]  # `_start` takes them in prompt order
        return super().__call__(prompts, trainer, rows)

    def _next_environment(self) -> _BoundToolEnvironment:
        if not self._batch:
            raise RuntimeError("EnvironmentToolRollout ran out of environments for the batch; call it as a whole.")
        return self._batch.pop()

    def _output(self, rollouts: list[_Rollout], with_logprobs: bool) -> dict[str, Any]:
        return super()._output(rollouts, with_logprobs) | {
            "environments": [rollout.environment.instance for rollout in rollouts]
        }

    def reward_funcs(self) -> list[Callable]:
        """One reward function per environment class that defines `get_reward` (named after the class): the
        `get_reward()` of each rollout's environment of exactly that class, None (not scored) for the others."""
        funcs, seen = [], []
        for pool in self.pools.values():
            kind = type(pool[0])
            if kind in seen or not callable(getattr(kind, "get_reward", None)):
                continue
            seen.append(kind)
            if inspect.iscoroutinefunction(kind.get_reward):

                async def reward(environments, _kind=kind, **kwargs):
                    return [await env.get_reward() if type(env) is _kind else None for env in environments]

            else:

                def reward(environments, _kind=kind, **kwargs):
                    return [env.get_reward() if type(env) is _kind else None for env in environments]

            reward.__name__ = reward.__qualname__ = kind.__name__
            funcs.append(reward)
        return funcs


def _gather(awaitables: list[Any]) -> list[Any]:
    """Await `awaitables` together on a background event loop (so it works whether or not the caller is inside a
    running loop); an exception is returned in place of its result."""

    async def gather():
        return await asyncio.gather(*awaitables, return_exceptions=True)

    return asyncio.run_coroutine_threadsafe(gather(), background_loop()).result()
