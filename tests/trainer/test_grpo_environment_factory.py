"""TRL's `environment_factory` in GRPO: with a scripted generator, each rollout's tools are the methods of its own
(pooled) environment instance, `reset` observations join the prompt, reward functions get `environments`, and
`get_reward` scores; a GRPO run on the tiny model with an environment factory trains."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from llm_trainer import GRPOConfig, GRPOTrainer
from llm_trainer.environments import EnvironmentToolRollout, environment_tools
from llm_trainer.generation import GenerationResult
from llm_trainer.testing import get_tokenizer

PROMPTS = [[{"role": "user", "content": f"What is 2 + {i}?"}] for i in range(2)]


def tool_call(name, **arguments) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


class ScriptedGenerator:
    """Replies `reply(turn, prompt_text)` (turn = assistant turns in the input, from 1) plus eos; records inputs."""

    def __init__(self, tokenizer, reply):
        self.tokenizer, self.reply, self.calls = tokenizer, reply, []

    def generate(self, prompt_ids):
        self.calls.append([list(ids) for ids in prompt_ids])
        completions = []
        for ids in prompt_ids:
            text = self.tokenizer.decode(ids)
            turn = text.count("<|im_start|>assistant")
            completions.append(self.tokenizer(self.reply(turn, text))["input_ids"] + [self.tokenizer.eos_token_id])
        return GenerationResult(completions, None)

    def sync_weights(self, model) -> None:
        pass


def _trainer(generator):
    tokenizer = generator.tokenizer
    return SimpleNamespace(
        processing_class=tokenizer,
        generator=generator,
        max_completion_length=400,
        eos_token_ids=[tokenizer.eos_token_id],
        chat_template_kwargs={},
    )


class Counter:
    """Counts up from the number in its prompt row; `increment` is its tool."""

    made = 0

    def __init__(self):
        Counter.made += 1
        self.value = None
        self.resets = 0

    def reset(self, **row):
        self.resets += 1
        self.value = int(row["start"]) if "start" in row else 0
        return f" (counter starts at {self.value})"

    def increment(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: How much to add.
        """
        self.value += by
        return self.value

    def get_reward(self) -> float:
        return float(self.value)

    def _hidden(self) -> None:
        raise AssertionError("private methods are not tools")


class Echo:
    """A second environment kind, for the dict form; it owns no reward."""

    def reset(self, **row):
        self.row = row

    def echo(self, text: str) -> str:
        """Echo text back.

        Args:
            text: The text.
        """
        return text


@pytest.fixture(autouse=True)
def _count():
    Counter.made = 0


def test_tools_are_bound_per_rollout_and_reset_observation_joins_the_prompt():
    tokenizer = get_tokenizer()
    reply = lambda turn, text: tool_call("increment", by=turn) if turn < 3 else "Done."  # noqa: E731
    generator = ScriptedGenerator(tokenizer, reply)
    rollout = EnvironmentToolRollout(Counter)
    rows = [{"prompt": PROMPTS[0], "start": 10}, {"prompt": PROMPTS[1], "start": 100}]
    out = rollout(PROMPTS, _trainer(generator), rows=rows)

    first, second = out["environments"]
    assert first is not second and (first.value, second.value) == (13, 103)  # 10 + 1 + 2, 100 + 1 + 2
    assert [m["content"] for m in out["completion_messages"][1] if m["role"] == "tool"] == ["101", "103"]
    assert out["tool_call_count"] == [2, 2] and out["tool_failure_count"] == [0, 0]
    prompt = tokenizer.decode(out["prompt_ids"][1])
    assert "What is 2 + 1? (counter starts at 100)<|im_end|>" in prompt
    assert '"name": "increment"' in prompt and "get_reward" not in prompt and "_hidden" not in prompt
    assert [tool.__name__ for tool in environment_tools(Counter())] == ["increment"]


def test_instances_are_pooled_across_batches_and_grow_on_demand():
    generator = ScriptedGenerator(get_tokenizer(), lambda turn, text: "No tools.")
    rollout = EnvironmentToolRollout(Counter)
    assert Counter.made == 1  # the probe seeds the pool
    first = rollout(PROMPTS, _trainer(generator))["environments"]
    second = rollout(PROMPTS[:1], _trainer(generator))["environments"]
    assert Counter.made == 2 and second[0] is first[0] and first[0].resets == 2 and first[1].resets == 1
    third = rollout(PROMPTS * 2, _trainer(generator))["environments"]
    assert Counter.made == 4 and third[:2] == first and len({id(env) for env in third}) == 4


def test_dict_form_routes_rows_and_renders_only_their_tools():
    tokenizer = get_tokenizer()
    generator = ScriptedGenerator(tokenizer, lambda turn, text: "Done.")
    rollout = EnvironmentToolRollout({"count": Counter, "echo": Echo})
    rows = [{"prompt": PROMPTS[0], "environment": "echo", "k": 1}, {"prompt": PROMPTS[1], "environment": "count"}]
    out = rollout(PROMPTS, _trainer(generator), rows=rows)
    echo, counter = out["environments"]
    assert isinstance(echo, Echo) and isinstance(counter, Counter)
    assert echo.row == {"prompt": PROMPTS[0], "k": 1}  # the routing column is not passed to `reset`
    first, second = (tokenizer.decode(ids) for ids in out["prompt_ids"])
    assert '"name": "echo"' in first and '"name": "increment"' not in first
    assert '"name": "increment"' in second and '"name": "echo"' not in second
    (reward,) = rollout.reward_funcs()
    assert reward.__name__ == "Counter" and reward(environments=[echo, counter]) == [None, 0.0]
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        rollout(PROMPTS[:1], _trainer(generator), rows=[{"prompt": PROMPTS[0], "environment": "nope"}])


def test_bad_factories_raise_clear_errors():
    with pytest.raises(ValueError, match="no `reset` method"):
        EnvironmentToolRollout(object)
    with pytest.raises(TypeError, match="zero-argument callable"):
        EnvironmentToolRollout(Counter())
    with pytest.raises(TypeError, match="for 'b'"):
        EnvironmentToolRollout({"a": Counter, "b": 3})


def _config(tmp_path, **kwargs):
    return GRPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=kwargs.pop("max_steps", 1),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=128,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=3,
        **kwargs,
    )


def test_grpo_trains_with_an_environment_factory(tiny_model_path, tmp_path):
    seen = []
    replies = iter(range(1000))

    def reply(turn, text):  # half the rollouts increment their counter by 2, the others by 1
        return tool_call("increment", by=1 + next(replies) % 2) if turn == 1 else "Done."

    def reward(completions, environments, **kwargs):
        seen.append(list(environments))
        return [float(env.value == 7) for env in environments]

    dataset = Dataset.from_list([{"prompt": PROMPTS[i % 2], "start": 5} for i in range(8)])
    trainer = GRPOTrainer(
        tiny_model_path, reward, args=_config(tmp_path), train_dataset=dataset, environment_factory=Counter
    )
    trainer.generator = ScriptedGenerator(get_tokenizer(), reply)
    assert trainer.reward_functions.names == ["reward", "Counter"]
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())

    assert len(seen[0]) == 4 and len({id(env) for env in seen[0]}) == 4
    assert sorted(env.value for env in seen[0]) == [6, 6, 7, 7]
    logs = trainer.state.log_history[0]
    assert logs["tools/call_frequency"] == 1.0
    assert logs["rewards/reward/mean"] == 0.5 and logs["rewards/Counter/mean"] == 6.5


def test_grpo_without_dataset_uses_reset_prompts(tiny_model_path, tmp_path):
    class Riddle:
        def reset(self, **row):
            return "Say hi."

        def get_reward(self) -> float:
            return 1.0

    generator = ScriptedGenerator(get_tokenizer(), lambda turn, text: "hi")
    trainer = GRPOTrainer(tiny_model_path, args=_config(tmp_path), environment_factory=Riddle)
    assert trainer.reward_functions.names == ["Riddle"]
    trainer.generator = generator
    trainer.train()
    assert "<|im_start|>user\nSay hi.<|im_end|>" in get_tokenizer().decode(generator.calls[0][0])
    with pytest.raises(ValueError, match="max_steps"):
        GRPOTrainer(
            tiny_model_path, args=_config(tmp_path, max_steps=-1, num_train_epochs=1), environment_factory=Riddle
        )
    with pytest.raises(ValueError, match="No reward source"):
        GRPOTrainer(tiny_model_path, args=_config(tmp_path), environment_factory=Echo)
