"""Environments for multi-turn RL: the rollout's token bookkeeping (prompt + completion invariant, environment mask,
budget, log-probs, non-prefix-preserving templates) with a scripted generator, GRPO training on multi-turn rollouts
with the tiny model, and the logic of the two example environments."""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from llm_trainer import GRPOConfig, GRPOTrainer
from llm_trainer.environments import (
    EnvironmentInterface,
    EnvironmentRollout,
    EnvironmentStep,
    GuessTheNumberEnvironment,
    MathAnswerEnvironment,
    environment_reward,
    rollout_and_rewards,
)
from llm_trainer.generation import GenerationResult
from llm_trainer.testing import get_tokenizer

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"
OBSERVATION_TEXT = "\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


class ScriptedGenerator:
    """Replies `reply(turn)` (turn = assistant turns in the input, from 1), tokenized canonically, plus the eos token
    unless `close=False`; records the inputs of every call."""

    def __init__(self, tokenizer, reply=lambda turn: f"I guess {turn * 3}", close=True, logprobs=False):
        self.tokenizer, self.reply, self.close, self.logprobs = tokenizer, reply, close, logprobs
        self.calls: list[list[list[int]]] = []

    def generate(self, prompt_ids):
        self.calls.append([list(ids) for ids in prompt_ids])
        completions = []
        for ids in prompt_ids:
            turn = self.tokenizer.decode(ids).count("<|im_start|>assistant")
            text_ids = self.tokenizer(self.reply(turn))["input_ids"]
            completions.append(text_ids + ([self.tokenizer.eos_token_id] if self.close else []))
        logprobs = [[-0.5] * len(ids) for ids in completions] if self.logprobs else None
        return GenerationResult(completions, logprobs)


class Scripted(EnvironmentInterface):
    """Answers "Higher." and is done at turn `done_at`; reward `reward` per turn; records what it sees."""

    def __init__(self, done_at=3, reward=0.5, log=None):
        self.done_at, self.reward, self.turns, self.seen, self.rows = done_at, reward, 0, [], []
        if log is not None:
            log.append(self)

    def reset(self, **row):
        self.rows.append(row)

    def step(self, messages):
        self.turns += 1
        self.seen.append(messages)
        return EnvironmentStep("Higher.", self.reward, done=self.turns >= self.done_at)


def _trainer(generator, tokenizer=None, max_completion_length=200, **attributes):
    tokenizer = tokenizer or generator.tokenizer
    return SimpleNamespace(
        processing_class=tokenizer,
        generator=generator,
        max_completion_length=max_completion_length,
        eos_token_ids=[tokenizer.eos_token_id],
        chat_template_kwargs={},
        **attributes,
    )


def _render(tokenizer, messages, generation_prompt=False):
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
    )["input_ids"]


def _segments(ids, mask):
    """Consecutive runs of `ids` with the same mask value: [(mask value, ids), ...]."""
    runs = []
    for token, value in zip(ids, mask):
        if runs and runs[-1][0] == value:
            runs[-1][1].append(token)
        else:
            runs.append((value, [token]))
    return runs


PROMPTS = [[{"role": "user", "content": f"Game {i}: guess my number."}] for i in range(3)]


# ----------------------------------------------------------------------------------------------- rollout bookkeeping
def test_multi_turn_rollout_tokens_mask_and_invariant():
    tokenizer = get_tokenizer()
    generator = ScriptedGenerator(tokenizer)
    envs = []
    out = EnvironmentRollout(functools.partial(Scripted, log=envs), max_turns=5)(PROMPTS, _trainer(generator))

    assert out["num_turns"] == [3, 3, 3]  # the environment says done at turn 3, before max_turns
    assert out["environment_reward"] == [1.5, 1.5, 1.5]  # summed over the turns
    assert [len(call) for call in generator.calls] == [3, 3, 3]  # one batched generate call per turn
    assert out["logprobs"] is None
    for prompt, env, prompt_ids, completion_ids, mask in zip(
        PROMPTS, envs, out["prompt_ids"], out["completion_ids"], out["env_mask"]
    ):
        conversation = env.seen[-1]
        assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant", "user", "assistant"]
        assert conversation[0] == prompt[0]
        assert [m["content"] for m in conversation[1::2]] == ["I guess 3", "I guess 6", "I guess 9"]
        assert prompt_ids == _render(tokenizer, prompt, generation_prompt=True)
        # prompt + completion is the tokenized conversation, through the end token of the last assistant turn
        rendered = _render(tokenizer, conversation)
        assert prompt_ids + completion_ids == rendered[:-1] and tokenizer.decode(rendered[-1:]) == "\n"
        # the mask keeps the policy's replies and zeroes the observation template tokens
        segments = [(value, tokenizer.decode(ids)) for value, ids in _segments(completion_ids, mask)]
        assert segments == [
            (1, "I guess 3<|im_end|>"),
            (0, OBSERVATION_TEXT.format("Higher.")),
            (1, "I guess 6<|im_end|>"),
            (0, OBSERVATION_TEXT.format("Higher.")),
            (1, "I guess 9<|im_end|>"),
        ]
    # every turn was generated from exactly the prompt + completion so far
    last_reply = len(tokenizer("I guess 9")["input_ids"]) + 1
    assert generator.calls[2][0] == out["prompt_ids"][0] + out["completion_ids"][0][:-last_reply]


def test_rollouts_that_finish_early_leave_the_batch_and_reductions_apply():
    tokenizer = get_tokenizer()
    generator = ScriptedGenerator(tokenizer)
    done_at = iter([1, 3, 2])
    rollout = EnvironmentRollout(lambda: Scripted(done_at=next(done_at), reward=0.25), reward_reduction="last")
    out = rollout(PROMPTS, _trainer(generator))
    assert out["num_turns"] == [1, 3, 2]
    assert [len(call) for call in generator.calls] == [3, 2, 1]
    assert out["environment_reward"] == [0.25, 0.25, 0.25]
    out = EnvironmentRollout(lambda: Scripted(done_at=10, reward=0.25), max_turns=2)(PROMPTS[:1], _trainer(generator))
    assert out["num_turns"] == [2] and out["environment_reward"] == [0.5]
    assert out["completion_ids"][0][-1] == tokenizer.eos_token_id  # the last observation is never appended


def test_reset_observation_and_string_prompts():
    class Announcing(Scripted):
        def reset(self, **row):
            super().reset(**row)
            return " (between 1 and 20)"

    tokenizer = get_tokenizer()
    envs = []
    out = EnvironmentRollout(functools.partial(Announcing, done_at=1, log=envs))(
        ["Guess my number.", PROMPTS[0]], _trainer(ScriptedGenerator(tokenizer))
    )
    assert envs[0].rows == [{"prompt": "Guess my number."}]  # no dataset: reset gets the prompt
    assert envs[0].seen[0][0] == {"role": "user", "content": "Guess my number. (between 1 and 20)"}
    assert envs[1].seen[0][0] == {"role": "user", "content": "Game 0: guess my number. (between 1 and 20)"}
    expected = [{"role": "user", "content": "Guess my number. (between 1 and 20)"}]
    assert out["prompt_ids"][0] == _render(tokenizer, expected, generation_prompt=True)


def test_completion_budget_cuts_turns_and_observations():
    tokenizer = get_tokenizer()
    generator = ScriptedGenerator(tokenizer, reply=lambda turn: "I guess twelve, or maybe thirteen")
    reply_length = len(tokenizer("I guess twelve, or maybe thirteen")["input_ids"]) + 1
    observation_length = len(tokenizer(OBSERVATION_TEXT.format("Higher."))["input_ids"])

    out = EnvironmentRollout(lambda: Scripted(done_at=5))(PROMPTS[:1], _trainer(generator, max_completion_length=4))
    assert out["num_turns"] == [1] and len(out["completion_ids"][0]) == 4  # the reply is cut at the budget

    budget = reply_length + observation_length  # room for the observation but not for another reply
    out = EnvironmentRollout(lambda: Scripted(done_at=5))(
        PROMPTS[:1], _trainer(generator, max_completion_length=budget)
    )
    assert out["num_turns"] == [1] and out["env_mask"][0] == [1] * reply_length

    budget = 2 * reply_length + observation_length + 3
    out = EnvironmentRollout(lambda: Scripted(done_at=5))(
        PROMPTS[:1], _trainer(generator, max_completion_length=budget)
    )
    assert out["num_turns"] == [2] and len(out["completion_ids"][0]) == 2 * reply_length + observation_length


def test_logprobs_are_concatenated_with_none_for_environment_tokens():
    generator = ScriptedGenerator(get_tokenizer(), logprobs=True)
    out = EnvironmentRollout(lambda: Scripted(done_at=2))(PROMPTS[:2], _trainer(generator))
    for logprobs, mask in zip(out["logprobs"], out["env_mask"]):
        assert len(logprobs) == len(mask)
        assert [lp is None for lp in logprobs] == [m == 0 for m in mask]
        assert {lp for lp in logprobs if lp is not None} == {-0.5}


def test_unfinished_turns_get_the_template_end_token_as_an_environment_token():
    tokenizer = get_tokenizer()
    generator = ScriptedGenerator(tokenizer, close=False)  # a per-turn token cap: no eos at the end of a reply
    envs = []
    out = EnvironmentRollout(functools.partial(Scripted, done_at=2, log=envs))(PROMPTS[:1], _trainer(generator))
    segments = [
        (value, tokenizer.decode(ids)) for value, ids in _segments(out["completion_ids"][0], out["env_mask"][0])
    ]
    assert segments == [(1, "I guess 3"), (0, "<|im_end|>" + OBSERVATION_TEXT.format("Higher.")), (1, "I guess 6")]
    rendered = _render(tokenizer, envs[0].seen[-1])
    assert out["prompt_ids"][0] + out["completion_ids"][0] == rendered[:-2]  # all but the closing "<|im_end|>\n"


def test_templates_that_rewrite_earlier_turns_use_a_stand_in_conversation():
    tokenizer = get_tokenizer()
    # Like Qwen3: the reasoning of an assistant turn is dropped once more messages follow it.
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "message['content'] + '<|im_end|>'",
        "(message['content'] if loop.last else message['content'].split('</think>')[-1]) + '<|im_end|>'",
    )
    generator = ScriptedGenerator(tokenizer, reply=lambda turn: f"<think>hmm</think>{turn}")
    envs = []
    out = EnvironmentRollout(functools.partial(Scripted, done_at=2, log=envs))(PROMPTS[:1], _trainer(generator))
    segments = [
        (value, tokenizer.decode(ids)) for value, ids in _segments(out["completion_ids"][0], out["env_mask"][0])
    ]
    assert segments == [
        (1, "<think>hmm</think>1<|im_end|>"),
        (0, OBSERVATION_TEXT.format("Higher.")),
        (1, "<think>hmm</think>2<|im_end|>"),
    ]
    second_input = generator.calls[1][0]
    assert second_input == (out["prompt_ids"][0] + out["completion_ids"][0])[: len(second_input)]
    rendered = _render(tokenizer, envs[0].seen[-1])
    assert (
        out["prompt_ids"][0] + out["completion_ids"][0] != rendered[:-1]
    )  # the template itself is not prefix-preserving

    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] if loop.last else 'x' }}<|im_end|>{% endfor %}"
    with pytest.raises(ValueError, match="renders earlier messages differently"):
        EnvironmentRollout(lambda: Scripted(done_at=2))(PROMPTS[:1], _trainer(generator))


def test_the_batch_rows_reach_reset():
    rows = [{"prompt": PROMPTS[2], "answer": "2"}, {"prompt": PROMPTS[0], "answer": "0"}]
    envs = []
    rollout = EnvironmentRollout(functools.partial(Scripted, done_at=1, log=envs))
    trainer = _trainer(ScriptedGenerator(get_tokenizer()))
    rollout([PROMPTS[2], PROMPTS[0]], trainer, rows=rows)  # the trainer's current batch
    assert [env.rows[0] for env in envs] == rows

    explicit = [{"prompt": PROMPTS[0], "answer": "41"}]
    rollout(PROMPTS[:1], trainer, rows=explicit)
    assert envs[-1].rows == explicit

    rollout([PROMPTS[1], PROMPTS[0]], trainer)  # rows of another batch are not used
    assert [env.rows[0] for env in envs[-2:]] == [{"prompt": PROMPTS[1]}, {"prompt": PROMPTS[0]}]


def test_bad_environments_and_arguments_raise_clear_errors():
    generator = ScriptedGenerator(get_tokenizer())

    class NoObservation(Scripted):
        def step(self, messages):
            return EnvironmentStep(None, 0.0, done=False)

    class BadReturn(Scripted):
        def step(self, messages):
            return 1.0

    with pytest.raises(TypeError, match="class or a zero-argument callable"):
        EnvironmentRollout(Scripted())
    with pytest.raises(ValueError, match="max_turns"):
        EnvironmentRollout(Scripted, max_turns=0)
    with pytest.raises(ValueError, match="reward_reduction"):
        EnvironmentRollout(Scripted, reward_reduction="mean")
    with pytest.raises(ValueError, match="observation=None with done=False"):
        EnvironmentRollout(NoObservation)(PROMPTS[:1], _trainer(generator))
    with pytest.raises(TypeError, match=r"must return EnvironmentStep\(observation, reward, done\)"):
        EnvironmentRollout(BadReturn)(PROMPTS[:1], _trainer(generator))
    with pytest.raises(TypeError, match="lacks `reset` and/or `step`"):
        EnvironmentRollout(dict)(PROMPTS[:1], _trainer(generator))
    with pytest.raises(ValueError, match="one dataset row per prompt"):
        EnvironmentRollout(Scripted)(PROMPTS[:2], _trainer(generator), rows=[{}])
    with pytest.raises(ValueError, match="no 'environment_reward' column"):
        environment_reward(["a"])


def test_environment_reward_and_rollout_and_rewards():
    logged = {}
    rewards = environment_reward(["a", "b"], [1, 0.5], num_turns=[2, 4], log_metric=logged.__setitem__)
    assert rewards == [1.0, 0.5] and logged == {"environment/num_turns": 3.0}

    rollout, funcs = rollout_and_rewards(Scripted)
    assert isinstance(rollout, EnvironmentRollout) and rollout.environment_factory is Scripted
    assert funcs == [environment_reward]
    configured = EnvironmentRollout(Scripted, max_turns=7)
    rollout, funcs = rollout_and_rewards(configured, len)
    assert rollout is configured and funcs == [len, environment_reward]
    assert rollout_and_rewards(Scripted, [environment_reward])[1] == [environment_reward]


# ----------------------------------------------------------------------------------------------- training
def _config(tmp_path, **kwargs) -> GRPOConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=64,
        generation_kwargs={"max_new_tokens": 4},  # short turns, so that several fit in the budget
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=3,
    )
    return GRPOConfig(**{**defaults, **kwargs})


def _games(n=8):
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"Game {i}: guess."}], "secret": i} for i in range(n)]
    )


def test_grpo_trains_on_multi_turn_rollouts(tiny_model_path, tmp_path):
    class ReplyLength(Scripted):  # never done before turn 3; rewards differ between replies, so the policy moves
        def step(self, messages):
            return super().step(messages)._replace(reward=float(len(messages[-1]["content"])))

    envs, seen = [], {}

    def reward(completions, environment_reward, num_turns, secret, **kwargs):
        seen.update(environment_reward=environment_reward, num_turns=num_turns, secret=secret)
        return environment_reward

    trainer = GRPOTrainer(
        tiny_model_path,
        reward,
        args=_config(tmp_path),
        train_dataset=_games(),
        rollout_func=EnvironmentRollout(functools.partial(ReplyLength, log=envs)),
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())

    assert seen["num_turns"] == [3, 3, 3, 3]
    expected = [sum(len(m["content"]) for m in env.seen[-1][1::2]) for env in envs]
    assert seen["environment_reward"] == [float(r) for r in expected]  # the reward functions see the env's rewards
    assert [env.rows[0]["secret"] for env in envs] == seen["secret"]  # reset got each prompt's dataset row

    tokenizer = get_tokenizer()
    batch = trainer.generation.buffer[0]
    for ids, mask, attended in zip(batch.completion_ids, batch.tool_mask, batch.completion_mask):
        ids, mask = ids[attended.bool()].tolist(), mask[attended.bool()].tolist()
        environment_text = [tokenizer.decode(run) for value, run in _segments(ids, mask) if value == 0]
        assert environment_text == ["<|im_end|>" + OBSERVATION_TEXT.format("Higher.")] * 2


def test_constant_reward_environment_gives_that_reward(tiny_model_path, tmp_path):
    rollout, reward_funcs = rollout_and_rewards(
        EnvironmentRollout(lambda: Scripted(done_at=2, reward=0.25), reward_reduction="sum")
    )
    trainer = GRPOTrainer(
        tiny_model_path, reward_funcs, args=_config(tmp_path), train_dataset=_games(), rollout_func=rollout
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["rewards/environment_reward/mean"] == 0.5 and logged["rewards/environment_reward/std"] == 0.0
    assert logged["environment/num_turns"] == 2.0


@pytest.mark.parametrize("script", ["env_math.py", "env_guess_number.py"])
def test_example_scripts_train(script, tmp_path):
    spec = importlib.util.spec_from_file_location(script[:-3], EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trainer = module.main(["--max_steps", "1", "--output_dir", str(tmp_path)])
    assert trainer.state.global_step == 1
    assert "rewards/environment_reward/mean" in trainer.state.log_history[0]


# ----------------------------------------------------------------------------------------------- example environments
def _turn(content):
    return [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]


@pytest.mark.parametrize(
    ("answer", "reply", "reward"),
    [
        ("42", "The answer is 42.", 1.0),
        (42, "6 times 7 is 42", 1.0),
        ("Natalia sold 48 + 24 = 72 clips. #### 72", "So 72", 1.0),
        ("1000", "It costs 1,000 dollars", 1.0),
        ("-3.5", "x = -3.50", 1.0),
        ("42", "42 is wrong, it is 41", 0.0),
        ("42", "no idea", 0.0),
    ],
)
def test_math_answer_environment(answer, reply, reward):
    env = MathAnswerEnvironment()
    assert env.reset(prompt="q", answer=answer) is None
    assert env.step(_turn(reply)) == EnvironmentStep(None, reward, True)


def test_math_answer_environment_needs_a_numeric_answer():
    with pytest.raises(ValueError, match="needs an 'answer' column"):
        MathAnswerEnvironment().reset(prompt="q")
    with pytest.raises(ValueError, match="contains no number"):
        MathAnswerEnvironment().reset(prompt="q", answer="forty-two")


def test_guess_the_number_environment():
    env = GuessTheNumberEnvironment(low=1, high=20, max_guesses=4, turn_cost=0.1)
    intro = env.reset(prompt="q", secret=13)
    assert "between 1 and 20" in intro and "4 guesses" in intro
    assert env.step(_turn("I guess 10")) == EnvironmentStep("Higher.", -0.1, False)
    assert env.step(_turn("Then 17")) == EnvironmentStep("Lower.", -0.1, False)
    assert env.step(_turn("13")) == EnvironmentStep("Correct!", 0.9, True)

    env.reset(secret=5)
    no_number = env.step(_turn("hmm"))
    assert no_number.observation.startswith("Please answer with one number") and no_number.reward == -0.1
    assert [env.step(_turn("1")).done for _ in range(3)] == [False, False, True]  # out of guesses

    first, second = GuessTheNumberEnvironment(seed=7), GuessTheNumberEnvironment(seed=7)
    first.reset(), second.reset()
    assert first.secret == second.secret and 1 <= first.secret <= 20  # a seeded RNG draws reproducible secrets
    rng_env = GuessTheNumberEnvironment(seed=1)
    assert len({(rng_env.reset(), rng_env.secret)[1] for _ in range(20)}) > 1  # fresh secrets per reset
    with pytest.raises(ValueError, match="outside"):
        env.reset(secret=21)
    with pytest.raises(ValueError, match="`low` must be below `high`"):
        GuessTheNumberEnvironment(low=5, high=5)


def test_guess_the_number_rollout_through_the_environment_rollout():
    tokenizer = get_tokenizer()
    generator = ScriptedGenerator(tokenizer, reply=lambda turn: str([10, 15, 12][turn - 1]))
    env = functools.partial(GuessTheNumberEnvironment, max_guesses=5, turn_cost=0.05)
    rows = [{"prompt": PROMPTS[0], "secret": 12}, {"prompt": PROMPTS[1], "secret": 15}]
    out = EnvironmentRollout(env)(PROMPTS[:2], _trainer(generator), rows=rows)
    assert out["num_turns"] == [3, 2]
    assert out["environment_reward"] == pytest.approx([1 - 3 * 0.05, 1 - 2 * 0.05])
    text = tokenizer.decode(out["completion_ids"][0])
    assert (
        text
        == "10<|im_end|>"
        + OBSERVATION_TEXT.format("Higher.")
        + "15<|im_end|>"
        + OBSERVATION_TEXT.format("Lower.")
        + "12<|im_end|>"
    )


def test_the_documented_environment_plays_as_described():
    docs = (ROOT / "docs" / "environments.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", docs, re.S) if "class SpellBackwards" in block)
    namespace = {}
    exec(code, namespace)
    tokenizer = get_tokenizer()
    generator = ScriptedGenerator(tokenizer, reply=lambda turn: ["ollhe", "olleh"][turn - 1])
    rows = [{"prompt": "Spell it backwards.", "word": "hello"}] * 2
    out = EnvironmentRollout(namespace["SpellBackwards"])(["Spell it backwards."] * 2, _trainer(generator), rows=rows)
    assert out["num_turns"] == [2, 2] and out["environment_reward"] == [1.0, 1.0]
    assert tokenizer.decode(out["prompt_ids"][0]).endswith(
        "Spell it backwards. The word is 'hello'.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert OBSERVATION_TEXT.format("No, try again.") in tokenizer.decode(out["completion_ids"][0])


def test_grpo_trainer_takes_an_environment_directly(tiny_model_path, tmp_path):
    args = GRPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=24,
        learning_rate=1e-2,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Guess my number."}]] * 4, "secret": [7] * 4})
    trainer = GRPOTrainer(tiny_model_path, args=args, train_dataset=dataset, environment=GuessTheNumberEnvironment)
    assert trainer.reward_func_names == ["environment_reward"]
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert "rewards/environment_reward/mean" in logged and trainer.generation.buffer[0].tool_mask is not None
    with pytest.raises(ValueError, match="not both"):
        GRPOTrainer(
            tiny_model_path,
            args=args,
            train_dataset=dataset,
            environment=GuessTheNumberEnvironment,
            rollout_func=lambda prompts, trainer: {},
        )
