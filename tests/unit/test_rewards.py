"""`llm_trainer.rewards` on hand-made completions, with exact expected values, and against TRL 1.16's `trl.rewards`.

TRL's rewards read `completion[0]["content"]`, so the parity checks feed both libraries conversational completions;
ours also take plain strings, checked to give the same result as the conversational form.
"""

import importlib.util
import inspect
import math
import pickle
import sys
import threading

import pytest

from llm_trainer import rewards
from llm_trainer.rewards import (
    accuracy_reward,
    get_cosine_scaled_reward,
    get_repetition_penalty_reward,
    get_soft_overlong_punishment,
    reasoning_accuracy_reward,
    think_format_reward,
)

needs_math = pytest.mark.skipif(importlib.util.find_spec("math_verify") is None, reason="needs math_verify")


def conv(texts: list[str]) -> list[list[dict[str, str]]]:
    return [[{"role": "assistant", "content": text}] for text in texts]


def trl_rewards():
    return pytest.importorskip("trl.rewards")


class LogExtra:
    """Stand-in for the trainer's `log_extra(column, values)`."""

    def __init__(self):
        self.columns: dict[str, list] = {}

    def __call__(self, column: str, values: list) -> None:
        self.columns[column] = values


# ----------------------------------------------------------------------------------------------------- public surface


OUR_ADDITIONS = {"AdaptiveTeachingReward"}  # llm_trainer's own rewards, beside TRL's


def test_public_names_and_signatures_match_trl():
    trl = trl_rewards()
    functions = sorted(name for names in trl._import_structure.values() for name in names)
    assert set(functions) <= set(rewards.__all__)
    assert set(rewards.__all__) - set(functions) <= OUR_ADDITIONS
    assert all(hasattr(rewards, name) for name in trl.__all__)  # the submodules too: `trl.rewards.other_rewards`
    for name in functions:
        ours = inspect.signature(getattr(rewards, name)).parameters
        theirs = inspect.signature(getattr(trl, name)).parameters
        assert [(p.name, p.kind, p.default) for p in ours.values()] == [
            (p.name, p.kind, p.default) for p in theirs.values()
        ], name


def test_factories_return_named_picklable_functions():
    made = {
        "cosine_scaled_reward": get_cosine_scaled_reward(max_len=64),
        "repetition_penalty_reward": get_repetition_penalty_reward(ngram_size=2, max_penalty=-0.5),
        "soft_overlong_punishment_reward": get_soft_overlong_punishment(max_completion_len=32, soft_punish_cache=8),
    }
    for name, func in made.items():
        assert func.__name__ == name  # GRPOTrainer logs `rewards/<__name__>/mean`
        clone = pickle.loads(pickle.dumps(func))
        assert clone == func and clone.__name__ == name


@pytest.mark.parametrize("bad", [[{"role": "assistant", "content": "x"}], [[]], [None], [[{"content": ["parts"]}]]])
def test_malformed_completions_raise(bad):
    with pytest.raises(TypeError, match="completions\\[0\\]"):
        think_format_reward(bad)


def test_tool_call_message_without_content_reads_as_empty():
    assert think_format_reward([[{"role": "assistant", "content": None, "tool_calls": []}]]) == [0.0]


# ------------------------------------------------------------------------------------------------------------ format

THINK_CASES = {
    "<think>\nThis is my reasoning.\n</think>\nThis is my answer.": 1.0,
    "<think>\nThis is my reasoning.\nThis is my answer.": 0.0,
    "<think></think>": 1.0,
    "<think>a</think>b</think>": 1.0,
    "<think>a<think>b</think>": 0.0,
    "<think>a</think> then <think>again</think>": 0.0,
    " <think>leading space</think>": 0.0,
    "no tags at all": 0.0,
    "</think><think>": 0.0,
    "<think>\nmulti\nline\n</think>\n\nanswer\nmore": 1.0,
    "": 0.0,
}


def test_think_format_reward_values_both_forms():
    texts, expected = list(THINK_CASES), list(THINK_CASES.values())
    assert think_format_reward(texts) == expected
    assert think_format_reward(conv(texts)) == expected


def test_think_format_reward_parity():
    texts = list(THINK_CASES)
    assert think_format_reward(conv(texts)) == trl_rewards().think_format_reward(conv(texts))


# ------------------------------------------------------------------------------------------------------ length-based


def test_soft_overlong_punishment_exact_values():
    reward = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    lengths = [0, 50, 80, 81, 90, 99, 100, 101, 500]
    expected = [0.0, 0.0, 0.0, -1 / 20, -10 / 20, -19 / 20, -1.0, -1.0, -1.0]
    assert reward(completion_ids=[[7] * n for n in lengths]) == pytest.approx(expected, abs=0, rel=1e-15)


def test_soft_overlong_punishment_without_cache_is_a_hard_cutoff():
    reward = get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=0)
    assert reward(completion_ids=[[1] * 9, [1] * 10, [1] * 11]) == [0.0, 0.0, -1.0]


@pytest.mark.parametrize(("max_len", "cache"), [(100, 20), (16, 0), (16, 16), (7, 3)])
def test_soft_overlong_punishment_parity(max_len, cache):
    ids = [[3] * n for n in range(0, max_len + 5)]
    ours = get_soft_overlong_punishment(max_completion_len=max_len, soft_punish_cache=cache)(completion_ids=ids)
    theirs = trl_rewards().get_soft_overlong_punishment(max_completion_len=max_len, soft_punish_cache=cache)(
        completion_ids=ids
    )
    assert ours == theirs


@pytest.mark.parametrize(("max_len", "cache", "match"), [(0, 0, "max_completion_len"), (10, -1, "soft_punish_cache")])
def test_soft_overlong_punishment_rejects_bad_arguments(max_len, cache, match):
    with pytest.raises(ValueError, match=match):
        get_soft_overlong_punishment(max_completion_len=max_len, soft_punish_cache=cache)


def test_repetition_penalty_exact_values():
    reward = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)
    ids = [[1, 2, 3, 4], [5, 5, 5, 5, 5], [1, 2, 1, 2, 1, 2], [9], [], [4, 4]]
    # [5]*5: 4 bigrams, 1 unique; [1,2]*3: 5 bigrams, 2 unique; too short -> 0; a single bigram is never repeated.
    assert reward(completion_ids=ids) == pytest.approx([0.0, -0.75, -0.6, 0.0, 0.0, 0.0], abs=1e-15)
    trigram = get_repetition_penalty_reward(ngram_size=3, max_penalty=-0.5)
    # 1 2 3 1 2 3 1: trigrams 123 231 312 123 231 -> 3 unique of 5 -> (1 - 3/5) * -0.5 = -0.2
    assert trigram(completion_ids=[[1, 2, 3, 1, 2, 3, 1]]) == pytest.approx([-0.2], abs=1e-15)
    assert trigram(completion_ids=[[1, 2, 3, 1, 2, 3, 1]])[0] >= -0.5


def test_repetition_penalty_parity():
    import random

    rng = random.Random(0)
    ids = [[rng.randrange(4) for _ in range(rng.randrange(0, 40))] for _ in range(50)]
    for ngram_size, max_penalty in [(1, -1.0), (2, -0.3), (3, -1.0), (5, 0.0)]:
        ours = get_repetition_penalty_reward(ngram_size, max_penalty)(completion_ids=ids)
        theirs = trl_rewards().get_repetition_penalty_reward(ngram_size, max_penalty)(completion_ids=ids)
        assert ours == theirs


@pytest.mark.parametrize(("kwargs", "match"), [({"max_penalty": 0.5}, "max_penalty"), ({"ngram_size": 0}, "ngram")])
def test_repetition_penalty_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_repetition_penalty_reward(**kwargs)


# ---------------------------------------------------------------------------------------------------------- accuracy

ACCURACY_TEXTS = [
    r"My answer is \boxed{\frac{1}{3}}",
    r"My answer is \boxed{\frac{1}{2}}",
    r"The final answer is $0.5$.",
    r"The result is $0.5$.",  # no \boxed{} and no "final answer" anchor: unparseable
    r"\boxed{2} and later \boxed{3}",  # both boxes are read, as the set {2, 3}
    "I do not know",
    r"\boxed{\frac{2}{6}}",
    r"\boxed{10\,\text{cm}}",  # units are normalized away
    r"\boxed{3}. The final answer is $2$",  # \boxed{} wins over the "final answer" anchor
]
ACCURACY_SOLUTIONS = [
    r"\frac{1}{3}",
    r"\frac{1}{3}",
    r"$\frac{1}{2}$",
    r"$\frac{1}{2}$",
    "2",
    "5",
    r"\frac{1}{3}",
    "10",
    "3",
]
ACCURACY_EXPECTED = [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


@needs_math
def test_accuracy_reward_values_both_forms():
    assert accuracy_reward(conv(ACCURACY_TEXTS), ACCURACY_SOLUTIONS) == ACCURACY_EXPECTED
    assert accuracy_reward(ACCURACY_TEXTS, ACCURACY_SOLUTIONS) == ACCURACY_EXPECTED


@needs_math
def test_accuracy_reward_skips_unparseable_gold_and_logs_columns():
    log = LogExtra()
    texts = [r"\boxed{4}", r"\boxed{4}", "no math here"]
    solutions = ["4", "not an answer", "4"]
    assert accuracy_reward(texts, solutions, log_extra=log) == [1.0, None, 0.0]
    assert log.columns["solution"] == solutions
    assert log.columns["gold_parsed"][1] == "[unparseable]" and "4" in log.columns["gold_parsed"][0]
    assert log.columns["answer_parsed"][1:] == ["[skipped]", "[unparseable]"]


@needs_math
def test_accuracy_reward_parity():
    log_ours, log_theirs = LogExtra(), LogExtra()
    solutions = [*ACCURACY_SOLUTIONS, "not an answer"]
    completions = conv([*ACCURACY_TEXTS, r"\boxed{1}"])
    ours = accuracy_reward(completions, solutions, log_extra=log_ours)
    theirs = trl_rewards().accuracy_reward(completions, solutions, log_extra=log_theirs)
    assert ours == theirs
    assert log_ours.columns == log_theirs.columns


@needs_math
def test_accuracy_reward_off_the_main_thread():
    # math_verify's signal-based timeouts only work in the main thread; they are switched off elsewhere.
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(r=accuracy_reward([r"\boxed{7}", r"\boxed{8}"], ["7", "7"]))
    )
    thread.start()
    thread.join()
    assert result["r"] == [1.0, 0.0]


@needs_math
def test_accuracy_reward_length_mismatch():
    with pytest.raises(ValueError, match="2 completions but 1 values in `solution`"):
        accuracy_reward([r"\boxed{1}", r"\boxed{2}"], ["1"])


REASONING_TEXTS = [
    r"<think> Reasoning content </think> The final answer is \boxed{\frac{1}{3}}",
    r"<think> Reasoning content </think> The final answer is \boxed{\frac{1}{2}}",
    r"<think> Partial answer \boxed{\frac{1}{3}} but no final answer",
    r"<think> \boxed{\frac{1}{3}} </think> and then \boxed{\frac{1}{2}}",
    r"<think>a</think> b </think> \boxed{\frac{1}{3}}",
    r"<think>x</think> nothing parseable",
]
REASONING_EXPECTED = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


@needs_math
def test_reasoning_accuracy_reward_values_both_forms():
    solutions = [r"\frac{1}{3}"] * len(REASONING_TEXTS)
    assert reasoning_accuracy_reward(conv(REASONING_TEXTS), solutions) == REASONING_EXPECTED
    assert reasoning_accuracy_reward(REASONING_TEXTS, solutions) == REASONING_EXPECTED


@needs_math
def test_reasoning_accuracy_reward_custom_delimiters_and_logging():
    log = LogExtra()
    texts = [r"plan... Final: \boxed{6}", r"plan </think> \boxed{6}", r"\boxed{6} with no delimiter"]
    rewards_ = reasoning_accuracy_reward(
        texts, ["6", "6", "6"], reasoning_delimiters=["Final:", "</think>"], log_extra=log
    )
    assert rewards_ == [1.0, 1.0, 0.0]
    assert log.columns["gold_parsed"][2] == log.columns["answer_parsed"][2] == "[incomplete reasoning]"
    # Incomplete reasoning is penalized (0.0) even when the gold solution would be skipped.
    assert reasoning_accuracy_reward(["no delimiter"], ["not an answer"]) == [0.0]
    assert reasoning_accuracy_reward([r"</think>\boxed{1}"], ["not an answer"]) == [None]
    with pytest.raises(ValueError, match="non-empty strings"):
        reasoning_accuracy_reward(texts, ["6"] * 3, reasoning_delimiters=[""])


@needs_math
@pytest.mark.parametrize("delimiters", [None, ["</think>"], ["Final:", "</think>"], ["</think>", "answer"]])
def test_reasoning_accuracy_reward_parity(delimiters):
    texts = [*REASONING_TEXTS, r"Final: \boxed{\frac{1}{3}} </think> \boxed{2}", r"The answer is \boxed{\frac{1}{3}}"]
    solutions = [r"\frac{1}{3}"] * (len(texts) - 1) + ["nonsense words"]
    log_ours, log_theirs = LogExtra(), LogExtra()
    ours = reasoning_accuracy_reward(conv(texts), solutions, reasoning_delimiters=delimiters, log_extra=log_ours)
    theirs = trl_rewards().reasoning_accuracy_reward(
        conv(texts), solutions, reasoning_delimiters=delimiters, log_extra=log_theirs
    )
    assert ours == theirs
    assert log_ours.columns == log_theirs.columns


def cosine_expected(correct: bool, length: int, max_len: int, lo_wrong, hi_wrong, lo_right, hi_right) -> float:
    low, high = (lo_right, hi_right) if correct else (hi_wrong, lo_wrong)
    return low + 0.5 * (high - low) * (1 + math.cos(math.pi * min(length / max_len, 1.0)))


@needs_math
def test_cosine_scaled_reward_exact_values():
    reward = get_cosine_scaled_reward(max_len=100)
    lengths = [0, 25, 50, 100, 250]
    texts = [r"\boxed{3}"] * len(lengths) + [r"\boxed{4}"] * len(lengths)
    ids = [[1] * n for n in lengths] * 2
    values = reward(texts, solution=["3"] * len(texts), completion_ids=ids)
    # Correct: 1.0 at length 0 down to 0.5 at max_len; wrong: -1.0 at length 0 up to -0.5 at max_len; clamped beyond.
    c25 = 0.5 + 0.25 * (1 + math.sqrt(0.5))
    w25 = -0.5 - 0.25 * (1 + math.sqrt(0.5))
    assert values == pytest.approx([1.0, c25, 0.75, 0.5, 0.5, -1.0, w25, -0.75, -0.5, -0.5], abs=1e-12)
    custom = get_cosine_scaled_reward(max_len=40, min_value_wrong=-2.0, max_value_wrong=0.0, min_value_correct=0.1)
    got = custom(conv([r"\boxed{3}", r"\boxed{4}"]), ["3", "3"], [[0] * 10, [0] * 30])
    assert got == pytest.approx(
        [cosine_expected(True, 10, 40, -2.0, 0.0, 0.1, 1.0), cosine_expected(False, 30, 40, -2.0, 0.0, 0.1, 1.0)]
    )


@needs_math
def test_cosine_scaled_reward_skips_unparseable_gold_and_checks_lengths():
    reward = get_cosine_scaled_reward(max_len=10)
    assert reward([r"\boxed{1}", r"\boxed{1}"], ["1", "no answer here"], [[1] * 5, [1] * 5]) == [0.5 + 0.25, None]
    with pytest.raises(ValueError, match="`completion_ids`"):
        reward([r"\boxed{1}"], ["1"], [[1], [2]])
    with pytest.raises(ValueError, match="max_len"):
        get_cosine_scaled_reward(max_len=0)


@needs_math
def test_cosine_scaled_reward_parity():
    texts = [*ACCURACY_TEXTS, r"\boxed{1}"]
    solutions = [*ACCURACY_SOLUTIONS, "not an answer"]
    ids = [[1] * n for n in (0, 7, 30, 64, 65, 200, 13, 40, 1, 9)]
    kwargs = {"max_len": 64, "min_value_wrong": -0.8, "max_value_wrong": -0.2, "min_value_correct": 0.3}
    ours = get_cosine_scaled_reward(**kwargs)(conv(texts), solutions, ids)
    theirs = trl_rewards().get_cosine_scaled_reward(**kwargs)(conv(texts), solutions, ids)
    assert ours == theirs


# ------------------------------------------------------------------------------------------------- missing math_verify


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: accuracy_reward([r"\boxed{1}"], ["1"]), "accuracy_reward"),
        (lambda: reasoning_accuracy_reward(["</think> 1"], ["1"]), "reasoning_accuracy_reward"),
        (lambda: get_cosine_scaled_reward(8)([r"\boxed{1}"], ["1"], [[1]]), "accuracy_reward"),
    ],
)
def test_missing_math_verify_names_the_extra(monkeypatch, call, name):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` raise ImportError
    with pytest.raises(
        ImportError, match=rf'`{name}` needs the `math_verify` package.*pip install "llm-trainer\[math\]"'
    ):
        call()
