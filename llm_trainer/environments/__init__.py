"""Environments for multi-turn RL: the policy writes a turn, the environment answers with an observation, a reward
and a done flag, until done or a turn limit.

`GRPOTrainer(model, reward_funcs=environment_reward, rollout_func=EnvironmentRollout(MyEnvironment))` trains on them;
`GRPOTrainer(..., tools=[...])` plays a `ToolRollout` (tool calling).
"""

from .base import EnvironmentFactory, EnvironmentInterface, EnvironmentStep
from .examples import GuessTheNumberEnvironment, MathAnswerEnvironment
from .rollout import EnvironmentRollout, environment_reward, rollout_and_rewards
from .tools import ToolEnvironment, ToolRollout, check_tool_template, parse_tool_calls

__all__ = [
    "EnvironmentFactory",
    "EnvironmentInterface",
    "EnvironmentRollout",
    "EnvironmentStep",
    "GuessTheNumberEnvironment",
    "MathAnswerEnvironment",
    "ToolEnvironment",
    "ToolRollout",
    "check_tool_template",
    "environment_reward",
    "parse_tool_calls",
    "rollout_and_rewards",
]
