"""Environments for multi-turn RL: the policy writes a turn, the environment answers with an observation, a reward
and a done flag, until done or a turn limit.

`GRPOTrainer(model, reward_funcs=environment_reward, rollout_func=EnvironmentRollout(MyEnvironment))` trains on them;
`GRPOTrainer(..., tools=[...])` plays a `ToolRollout` (tool calling), `GRPOTrainer(..., environment_factory=...)` an
`EnvironmentToolRollout` (TRL's environments, whose methods are the tools).
"""

from .base import EnvironmentFactory, EnvironmentInterface, EnvironmentStep
from .examples import GuessTheNumberEnvironment, MathAnswerEnvironment
from .rollout import EnvironmentRollout, environment_reward, rollout_and_rewards
from .tools import (
    EnvironmentToolRollout,
    ToolEnvironment,
    ToolRollout,
    check_tool_template,
    environment_tools,
    parse_tool_calls,
)

__all__ = [
    "EnvironmentFactory",
    "EnvironmentInterface",
    "EnvironmentRollout",
    "EnvironmentStep",
    "EnvironmentToolRollout",
    "GuessTheNumberEnvironment",
    "MathAnswerEnvironment",
    "ToolEnvironment",
    "ToolRollout",
    "check_tool_template",
    "environment_reward",
    "environment_tools",
    "parse_tool_calls",
    "rollout_and_rewards",
]
