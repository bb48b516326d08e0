"""Tool calling in GRPO (`tools=[...]`): with a scripted generator, the parsed calls run, their results come back as
tool messages that the loss skips, the iteration limit holds, failures are counted; a GRPO run on the tiny model
with tools trains and logs TRL's `tools/*` metrics."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from llm_trainer import GRPOConfig, GRPOTrainer
from llm_trainer.environments import ToolEnvironment, ToolRollout, check_tool_template, parse_tool_calls
from llm_trainer.generation import GenerationResult
from llm_trainer.testing import get_tokenizer

PROMPTS = [[{"role": "user", "content": f"What is 2 + {i}?"}] for i in range(2)]


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    CALLS.append((a, b))
    return a + b


CALLS: list[tuple[int, int]] = []


def tool_call(name="add", **arguments) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


class ScriptedGenerator:
    """Replies `reply(turn, prompt_index)` (turn = assistant turns in the input, from 1) plus eos; records inputs."""

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


def _trainer(generator, max_completion_length=400):
    tokenizer = generator.tokenizer
    return SimpleNamespace(
        processing_class=tokenizer,
        generator=generator,
        max_completion_length=max_completion_length,
        eos_token_ids=[tokenizer.eos_token_id],
        chat_template_kwargs={},
    )


def _segments(ids, mask):
    runs = []
    for token, value in zip(ids, mask):
        if runs and runs[-1][0] == value:
            runs[-1][1].append(token)
        else:
            runs.append((value, [token]))
    return runs


@pytest.fixture(autouse=True)
def _clear_calls():
    CALLS.clear()


def test_tool_call_runs_and_its_result_is_masked():
    tokenizer = get_tokenizer()
    reply = lambda turn, text: tool_call(a=2, b=3) if turn == 1 else "It is 5."  # noqa: E731
    generator = ScriptedGenerator(tokenizer, reply)
    out = ToolRollout([add])(PROMPTS, _trainer(generator))

    assert CALLS == [(2, 3), (2, 3)]
    assert out["tool_call_count"] == [1, 1] and out["tool_failure_count"] == [0, 0]
    messages = out["completion_messages"][0]
    assert messages == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}],
        },  # noqa: E501
        {"role": "tool", "name": "add", "content": "5"},
        {"role": "assistant", "content": "It is 5."},
    ]
    # The prompt renders the tool schemas; prompt + completion is the tokenized conversation.
    assert '"name": "add"' in tokenizer.decode(out["prompt_ids"][0])
    full = tokenizer.apply_chat_template(PROMPTS[0] + messages, tools=[add], tokenize=True, return_dict=True)
    assert out["prompt_ids"][0] + out["completion_ids"][0] == full["input_ids"][:-1]  # the template adds "\n"
    segments = [
        (value, tokenizer.decode(ids)) for value, ids in _segments(out["completion_ids"][0], out["env_mask"][0])
    ]
    assert segments == [
        (1, tool_call(a=2, b=3) + "<|im_end|>"),
        (0, "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n"),
        (1, "It is 5.<|im_end|>"),
    ]
    last_reply = len(tokenizer("It is 5.")["input_ids"]) + 1
    assert generator.calls[1][0] == (out["prompt_ids"][0] + out["completion_ids"][0])[:-last_reply]


def test_iteration_limit_and_no_tool_calls():
    tokenizer = get_tokenizer()
    generator = ScriptedGenerator(tokenizer, lambda turn, text: tool_call(a=turn, b=1))
    out = ToolRollout([add], max_tool_calling_iterations=2)(PROMPTS[:1], _trainer(generator))
    assert CALLS == [(1, 1), (2, 1)]  # the third turn's call is not run
    assert out["tool_call_count"] == [2]
    roles = [m["role"] for m in out["completion_messages"][0]]
    assert roles == ["assistant", "tool", "assistant", "tool", "assistant"]

    CALLS.clear()
    out = ToolRollout([add], max_tool_calling_iterations=0)(PROMPTS[:1], _trainer(generator))
    assert CALLS == [] and out["env_mask"] == [[1] * len(out["completion_ids"][0])]

    plain = ScriptedGenerator(tokenizer, lambda turn, text: "No tools needed.")
    out = ToolRollout([add])(PROMPTS[:1], _trainer(plain))
    assert len(plain.calls) == 1 and out["tool_call_count"] == [0]


def test_budget_drops_tool_results_that_do_not_fit():
    tokenizer = get_tokenizer()
    generator = ScriptedGenerator(tokenizer, lambda turn, text: tool_call(a=1, b=1))
    first_turn = len(tokenizer(tool_call(a=1, b=1))["input_ids"]) + 1
    out = ToolRollout([add])(PROMPTS[:1], _trainer(generator, max_completion_length=first_turn + 5))
    assert out["env_mask"] == [[1] * first_turn] and len(generator.calls) == 1
    assert [m["role"] for m in out["completion_messages"][0]] == ["assistant"]


def test_failures_are_reported_to_the_policy_and_counted():
    def broken(x: str) -> str:
        """Always fails.

        Args:
            x: Anything.
        """
        raise RuntimeError("tool exploded")

    env = ToolEnvironment([add, broken])
    env.reset()
    calls = tool_call("broken", x="a") + tool_call("missing") + tool_call(a=1) + tool_call(a=1, b=2)
    step = env.step([{"role": "assistant", "content": calls}])
    assert [m["content"] for m in step.observation] == [
        "{'error': 'tool exploded'}",
        "{'error': 'Tool missing not found.'}",
        str({"error": "add() missing 1 required positional argument: 'b'"}),
        "3",
    ]
    assert (env.calls, env.failures, step.done) == (4, 3, False)
    assert env.step([{"role": "assistant", "content": "done"}]).done


def test_async_tools_run():
    async def slow_double(x: int) -> int:
        """Double a number, slowly.

        Args:
            x: The number.
        """
        await asyncio.sleep(0.01)
        return 2 * x

    async def failing(x: int) -> int:
        """Fail.

        Args:
            x: The number.
        """
        raise ValueError("nope")

    env = ToolEnvironment([slow_double, failing, add])
    calls = (
        tool_call("slow_double", x=4) + tool_call(a=1, b=1) + tool_call("failing", x=1) + tool_call("slow_double", x=5)
    )
    step = env.step([{"role": "assistant", "content": calls}])
    assert [m["content"] for m in step.observation] == ["8", "2", "{'error': 'nope'}", "10"]
    assert (env.calls, env.failures) == (4, 1)


def test_parse_tool_calls_and_bad_input():
    assert parse_tool_calls("Let me add." + tool_call(a=1, b=2)) == (
        "Let me add.",
        [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
    )
    assert parse_tool_calls("<tool_call>{not json</tool_call>") == ("<tool_call>{not json</tool_call>", [])
    with pytest.raises(TypeError, match="non-empty list of functions"):
        ToolEnvironment([])
    with pytest.raises(ValueError, match="max_tool_calling_iterations"):
        ToolRollout([add], max_tool_calling_iterations=-1)
    tokenizer = get_tokenizer()
    check_tool_template(tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="does not support tool calling: it cannot render tool calls"):
        check_tool_template(tokenizer)


def test_grpo_trains_with_tools_and_logs_tool_metrics(tiny_model_path, tmp_path):
    seen, replies = [], iter(range(1000))

    def reply(turn, text):  # every other generation calls a missing tool
        if turn > 1:
            return "It is 4."
        return tool_call(a=2, b=2) if next(replies) % 2 else tool_call("nope")

    def reward(completions, **kwargs):
        seen.append(completions)
        return [float(c[1]["content"] == "4") for c in completions]

    dataset = Dataset.from_list([{"prompt": PROMPTS[i % 2]} for i in range(8)])
    args = GRPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=256,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=3,
    )
    trainer = GRPOTrainer(tiny_model_path, reward, args=args, train_dataset=dataset, tools=[add])
    trainer.generator = ScriptedGenerator(get_tokenizer(), reply)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())

    assert [m["role"] for m in seen[0][0]] == ["assistant", "tool", "assistant"]
    logs = trainer.state.log_history[0]
    failed = sum(c[1]["content"].startswith("{'error'") for c in seen[0])
    assert logs["tools/call_frequency"] == 1.0
    assert failed == 2 and logs["tools/failure_frequency"] == 0.5
    batch = trainer.generation.buffer[0]
    tokenizer = get_tokenizer()
    for ids, mask in zip(batch.completion_ids, batch.tool_mask):
        masked = [tokenizer.decode(run) for value, run in _segments(ids.tolist(), mask.tolist()) if value == 0]
        assert masked[0].startswith("\n<|im_start|>user\n<tool_response>\n")


def test_grpo_tools_argument_errors(tiny_model_path):
    with pytest.raises(ValueError, match="not both"):
        GRPOTrainer(
            tiny_model_path, lambda completions, **kw: [0.0] * len(completions), tools=[add], rollout_func=print
        )
    with pytest.raises(TypeError, match="environment_factory"):
        GRPOTrainer(tiny_model_path, lambda completions, **kw: [0.0] * len(completions), environment_factory=3)
