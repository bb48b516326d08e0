"""Adaptive-teacher GRPO: `AdaptiveTeachingReward` against its formula, the two-pass student protocol of
`TeacherGRPOTrainer`'s rollout, and short training runs that move the teacher and leave the student frozen."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from llm_trainer.rewards import AdaptiveTeachingReward
from llm_trainer.testing import get_tokenizer, tiny_model_config
from llm_trainer.trainer.teacher_grpo_config import TeacherGRPOConfig
from llm_trainer.trainer.teacher_grpo_trainer import TeacherGRPOTrainer, answer_in_response

PROBLEMS = [f"What is {i} plus {i + 1}?" for i in range(8)]
ANSWERS = [str(2 * i + 1) for i in range(8)]


def _dataset(conversational: bool = False) -> Dataset:
    prompts = [[{"role": "user", "content": p}] for p in PROBLEMS] if conversational else PROBLEMS
    return Dataset.from_dict({"prompt": prompts, "answer": ANSWERS})


def _config(tmp_path, **kwargs) -> TeacherGRPOConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_student_tokens=6,
        max_probe_tokens=5,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=3,
    )
    return TeacherGRPOConfig(**{**defaults, **kwargs})


def partial_credit(response, row):
    """Varied, deterministic correctness for a random tiny student: longer responses score more."""
    return min(1.0, len(response) / 30)


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(before, model) -> bool:
    return any(not torch.equal(before[name], p) for name, p in model.named_parameters() if name in before)


# ----------------------------------------------------------------------------------------------- the reward
@pytest.mark.parametrize(
    ("before", "after", "tokens", "multiplier", "weight", "expected"),
    [
        (0.0, 1.0, 100, 2.0, 1.0, 1.5),  # 1 * (1 + 100 / 200)
        (0.0, 1.0, 0, 2.0, 1.0, 2.0),  # the shortest teaching doubles the gain
        (0.0, 1.0, 300, 2.0, 1.0, 1.25),
        (0.25, 0.75, 100, 2.0, 1.0, 0.75),  # partial credit: 0.5 * 1.5
        (1.0, 0.0, 100, 2.0, 1.0, -2.0),  # degradation: -2 * |-1|, whatever the length
        (1.0, 0.0, 0, 2.0, 1.0, -2.0),
        (0.75, 0.25, 50, 2.0, 1.0, -1.0),
        (1.0, 0.0, 100, 3.0, 1.0, -3.0),
        (1.0, 1.0, 100, 2.0, 1.0, 0.0),  # no change: no reward
        (0.0, 0.0, 5, 2.0, 1.0, 0.0),
        (0.0, 1.0, 100, 2.0, 0.0, 1.0),  # no efficiency bonus
        (0.0, 1.0, 100, 2.0, 2.0, 2.0),  # 1 * (1 + 2 * 0.5)
    ],
)
def test_reward_matches_the_formula(before, after, tokens, multiplier, weight, expected):
    reward = AdaptiveTeachingReward(degradation_penalty_multiplier=multiplier, efficiency_weight=weight)
    assert reward.score((before, after), tokens) == pytest.approx(expected)
    assert reward.score(after - before, tokens) == pytest.approx(expected)
    column = reward(["t"], correct_without=[before], correct_with=[after], teaching_tokens=[tokens])
    assert column == [pytest.approx(expected)]


def test_shorter_teaching_earns_more_and_length_does_not_soften_degradation():
    reward = AdaptiveTeachingReward()
    gains = [reward.score((0, 1), tokens) for tokens in (0, 10, 100, 1000, 10_000)]
    assert gains == sorted(gains, reverse=True) and len(set(gains)) == len(gains)
    assert gains[-1] > 1.0  # still better than no gain
    assert {reward.score((1, 0), tokens) for tokens in (0, 10, 1000)} == {-2.0}


def test_both_parameters_change_the_reward():
    default = AdaptiveTeachingReward()
    harsher = AdaptiveTeachingReward(degradation_penalty_multiplier=5.0)
    no_bonus = AdaptiveTeachingReward(efficiency_weight=0.0)
    assert harsher.score((1, 0), 20) == -5.0 != default.score((1, 0), 20)
    assert harsher.score((0, 1), 20) == default.score((0, 1), 20)  # the multiplier only touches degradation
    assert no_bonus.score((0, 1), 20) == 1.0 != default.score((0, 1), 20)
    assert no_bonus.score((1, 0), 20) == default.score((1, 0), 20)  # the weight only touches improvement


def test_reward_function_contract():
    reward = AdaptiveTeachingReward()
    rewards = reward(
        completions=["a", "b", "c"],
        completion_ids=[[1, 2], [3], [4, 5, 6]],
        correct_without=[False, None, True],
        correct_with=[True, 1.0, True],
        teaching_tokens=[100, 7, 3],
        answer=["x", "y", "z"],  # other columns are ignored
    )
    assert rewards == [1.5, None, 0.0]
    # without `teaching_tokens`, the teaching is as long as its completion ids
    assert reward(["a"], completion_ids=[[0] * 100], correct_without=[0], correct_with=[1]) == [1.5]
    assert AdaptiveTeachingReward.__name__ == "AdaptiveTeachingReward"
    assert reward.__name__ == "adaptive_teaching_reward"  # the metric name


def test_reward_rejects_bad_input():
    with pytest.raises(ValueError, match="degradation_penalty_multiplier"):
        AdaptiveTeachingReward(degradation_penalty_multiplier=-1.0)
    with pytest.raises(ValueError, match="efficiency_weight"):
        AdaptiveTeachingReward(efficiency_weight=float("nan"))
    reward = AdaptiveTeachingReward()
    with pytest.raises(ValueError, match="correct_without"):
        reward(["a"], correct_with=[1.0], teaching_tokens=[1])
    with pytest.raises(ValueError, match="one `correct_with` per completion"):
        reward(["a", "b"], correct_without=[0, 0], correct_with=[1], teaching_tokens=[1, 1])
    with pytest.raises(ValueError, match="teaching_tokens"):
        reward.score(0.5, -1)
    with pytest.raises(ValueError, match="correct_without, correct_with"):
        reward.score((0.0, 0.5, 1.0), 1)


def test_default_correctness_matches_the_answer_as_a_whole_normalised_word():
    assert answer_in_response("So x = 12.", {"answer": "12"}) == 1.0
    assert answer_in_response("So x = 123.", {"answer": "12"}) == 0.0
    assert answer_in_response("the capital is  PARIS", {"answer": " Paris. "}) == 1.0
    assert answer_in_response("It costs 1,000 dollars", {"answer": 1000}) == 1.0
    assert answer_in_response("no idea", {"answer": "7"}) == 0.0
    with pytest.raises(ValueError, match="'answer' column"):
        answer_in_response("12", {"solution": "12"})
    with pytest.raises(ValueError, match="non-empty answer"):
        answer_in_response("12", {"answer": " "})


def test_config_checks_the_templates_and_limits(tmp_path):
    with pytest.raises(ValueError, match=r"must contain the placeholder\(s\) \['\{probe\}'\]"):
        _config(tmp_path, teaching_template="Teach: {problem}")
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \['\{answer\}'\]"):
        _config(tmp_path, answer_template="{problem} is {answer}")
    with pytest.raises(ValueError, match="not a valid format string"):
        _config(tmp_path, probe_template="{problem} {")
    with pytest.raises(ValueError, match="max_probe_tokens"):
        _config(tmp_path, max_probe_tokens=0)
    with pytest.raises(ValueError, match="student_temperature"):
        _config(tmp_path, student_temperature=-0.5)
    assert _config(tmp_path, taught_answer_template="{{note}} {teaching} {problem}").max_probe_tokens == 5


# ----------------------------------------------------------------------------------------------- the rollout
def _record(generator, calls: list, tokenizer) -> None:
    generate = generator.generate

    def recording(prompt_ids):
        result = generate(prompt_ids)
        calls.append(
            {
                "prompts": tokenizer.batch_decode(prompt_ids),
                "outputs": tokenizer.batch_decode(result.completion_ids, skip_special_tokens=True),
                "completion_ids": result.completion_ids,
            }
        )
        return result

    generator.generate = recording


@pytest.mark.parametrize("conversational", [False, True])
def test_rollout_asks_the_student_before_and_after_teaching(tiny_model_path, tmp_path, conversational):
    tokenizer = get_tokenizer()
    seen = {}

    def reward(completions, completion_ids, correct_without, correct_with, teaching_tokens, student_answer, **kwargs):
        seen.update(
            ids=completion_ids,
            without=correct_without,
            with_=correct_with,
            tokens=teaching_tokens,
            answers=student_answer,
        )
        return AdaptiveTeachingReward()(completions, correct_without, correct_with, teaching_tokens)

    trainer = TeacherGRPOTrainer(
        tiny_model_path,
        reward,
        args=_config(tmp_path),
        train_dataset=_dataset(conversational),
        correctness_fn=partial_credit,
    )
    student, probe, teacher = [], [], []
    _record(trainer.student_generator, student, tokenizer)
    _record(trainer.probe_generator, probe, tokenizer)
    _record(trainer.generator, teacher, tokenizer)
    trainer.train()

    # one generation batch: 2 problems x 2 teachings. The student answers each problem once without teaching,
    # writes one probe per problem, and answers once more with each teaching.
    assert len(student) == 2 and len(probe) == 1 and len(teacher) == 1
    attempts, answers = student
    assert len(attempts["prompts"]) == 2 and len(probe[0]["prompts"]) == 2
    assert len(teacher[0]["prompts"]) == 4 and len(answers["prompts"]) == 4
    problems = [next(p for p in PROBLEMS if p in prompt) for prompt in attempts["prompts"]]
    assert problems[0] != problems[1]
    assert not any("explanation" in prompt for prompt in attempts["prompts"])
    for k, problem in enumerate(problems):
        assert problem in probe[0]["prompts"][k] and attempts["outputs"][k] in probe[0]["prompts"][k]
        for i in (2 * k, 2 * k + 1):  # the teachings of problem k and the student's answers with them
            assert problem in teacher[0]["prompts"][i] and probe[0]["outputs"][k] in teacher[0]["prompts"][i]
            teaching = teacher[0]["outputs"][i]
            assert teaching.strip() and teaching in answers["prompts"][i] and problem in answers["prompts"][i]
    if conversational:
        assert all(prompt.startswith("<|im_start|>user\n") for prompt in answers["prompts"] + teacher[0]["prompts"])

    # what the reward sees: the teacher's completions, and correctness computed from the student's answers
    assert seen["ids"] == teacher[0]["completion_ids"]
    assert seen["tokens"] == [len(ids) for ids in teacher[0]["completion_ids"]]
    assert seen["answers"] == answers["outputs"]
    assert seen["with_"] == [partial_credit(answer, None) for answer in answers["outputs"]]
    assert seen["without"] == [partial_credit(attempts["outputs"][k], None) for k in (0, 0, 1, 1)]
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert logged["student/accuracy_with_teaching"] == pytest.approx(sum(seen["with_"]) / 4)
    assert logged["student/accuracy_without_teaching"] == pytest.approx(sum(seen["without"]) / 4)


# ----------------------------------------------------------------------------------------------- training
def _student_answers_like_checkpoint(trainer, path: str) -> bool:
    """Whether the trained trainer's student answers greedily as the untouched checkpoint at `path` does."""
    from transformers import AutoModelForCausalLM

    generator = trainer.student_generator
    generator.sampling.temperature = 0.0
    prompt = [get_tokenizer()("What is 2 plus 3?")["input_ids"]]
    checkpoint = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = checkpoint.generate(
        torch.tensor(prompt), max_new_tokens=6, do_sample=False, eos_token_id=generator.eos_token_ids
    )[0, len(prompt[0]) :].tolist()
    return generator.generate(prompt).completion_ids[0] == expected


@pytest.mark.parametrize("student", ["copy", "path"])
def test_training_moves_the_teacher_and_not_the_student(tiny_model_path, tiny_llama_path, tmp_path, student):
    trainer = TeacherGRPOTrainer(
        tiny_model_path,
        args=_config(tmp_path, max_steps=2, student_temperature=1.0),  # a random greedy student ignores the teaching
        train_dataset=_dataset(),
        student_model=None if student == "copy" else tiny_llama_path,
        correctness_fn=partial_credit,
    )
    assert trainer.student_model is not trainer.model
    if student == "path":
        assert trainer.student_model.config.model_type == "llama"
    teacher_before, student_before = _params(trainer.model), _params(trainer.student_model)
    trainer.train()
    assert _changed(teacher_before, trainer.model)
    assert not _changed(student_before, trainer.student_model)
    assert not any(p.requires_grad for p in trainer.student_model.parameters())
    assert _student_answers_like_checkpoint(trainer, tiny_model_path if student == "copy" else tiny_llama_path)
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert {"rewards/adaptive_teaching_reward/mean", "student/accuracy_with_teaching"} <= set(logged)


def test_peft_teacher_uses_the_adapter_free_model_as_student(tiny_model_path, tmp_path):
    from peft import LoraConfig

    trainer = TeacherGRPOTrainer(
        tiny_model_path,
        args=_config(tmp_path, max_steps=2),
        train_dataset=_dataset(),
        correctness_fn=partial_credit,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    assert trainer.student_model is None
    before = _params(trainer.model)
    trainer.train()
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p)]
    assert changed and all("lora_" in name for name in changed)
    # the student is the base model: its greedy answers are those of the untouched checkpoint
    assert _student_answers_like_checkpoint(trainer, tiny_model_path)


def test_student_defaults_to_the_reference_model_when_there_is_one(tiny_model_path, tmp_path):
    trainer = TeacherGRPOTrainer(tiny_model_path, args=_config(tmp_path, beta=0.1), train_dataset=_dataset())
    assert trainer.ref_model is not None and trainer.student_model is trainer.ref_model
    assert trainer.student_processing_class is trainer.processing_class
    assert [type(f) for f in trainer.reward_funcs] == [AdaptiveTeachingReward]


def test_bad_arguments_are_refused(tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    dataset = _dataset()
    with pytest.raises(ValueError, match="no 'answer' column"):
        TeacherGRPOTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=dataset.remove_columns("answer"))
    with pytest.raises(ValueError, match="no 'prompt' column"):
        TeacherGRPOTrainer(
            tiny_model_path, args=_config(tmp_path), train_dataset=dataset.rename_column("prompt", "question")
        )
    with pytest.raises(TypeError, match="correctness_fn"):
        TeacherGRPOTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=dataset, correctness_fn="exact")
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match="`student_model` is the policy itself"):
        TeacherGRPOTrainer(policy, args=_config(tmp_path), train_dataset=dataset, student_model=policy)
    small_vocab = AutoModelForCausalLM.from_config(tiny_model_config(vocab_size=100))
    with pytest.raises(ValueError, match="668 tokens but the student model only 100 embeddings"):
        TeacherGRPOTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=dataset, student_model=small_vocab)
    # a custom correctness function needs no 'answer' column, but must return a number
    trainer = TeacherGRPOTrainer(
        tiny_model_path,
        args=_config(tmp_path),
        train_dataset=dataset.remove_columns("answer"),
        correctness_fn=lambda response, row: "yes",
    )
    with pytest.raises(TypeError, match="must return a bool, a number or None"):
        trainer.train()
