"""Input that would train silently on nothing, or the wrong way, fails at construction (or at the step, for rewards)
with a message naming the argument, row and column, and the fix."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset

import llm_trainer as lt
from llm_trainer.data.validation import check_labels, check_text_columns
from llm_trainer.modeling import check_model_path, load_model
from llm_trainer.testing import make_tiny_model, zen_dataset
from llm_trainer.trainer.reward_functions import RewardFunctions

COMMON = dict(report_to="none", bf16=False, save_strategy="no", max_steps=1, per_device_train_batch_size=4)
ONLINE = dict(num_generations=4, max_completion_length=4)


@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-reward"), task="sequence-classification")


@pytest.fixture(scope="module")
def prm_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-prm"), task="token-classification")


def _with(dataset: Dataset, row: int, **cells) -> Dataset:
    """`dataset` with the cells of one row replaced."""
    rows = dataset.to_list()
    rows[row] = {**rows[row], **cells}
    return Dataset.from_list(rows)


def _build(name: str, dataset: Dataset, tmp_path, paths: dict[str, str], **config):
    """Construct the trainer `name` on `dataset` with a tiny model and a one-step config."""
    model, reward, prm = paths["causal"], paths["reward"], paths["prm"]
    out = dict(output_dir=str(tmp_path), **COMMON, **config)
    if name in ("GRPO", "RLOO"):
        args = getattr(lt, f"{name}Config")(**out, **ONLINE)
        return getattr(lt, f"{name}Trainer")(model, reward_funcs=_length, args=args, train_dataset=dataset)
    if name == "Distillation":
        args = lt.DistillationConfig(**out, max_completion_length=4)
        return lt.DistillationTrainer(model, teacher_model=model, args=args, train_dataset=dataset)
    path = {"Reward": reward, "PRM": prm}.get(name, model)
    return getattr(lt, f"{name}Trainer")(path, args=getattr(lt, f"{name}Config")(**out), train_dataset=dataset)


@pytest.fixture
def paths(tiny_model_path, reward_model_path, prm_path) -> dict[str, str]:
    return {"causal": tiny_model_path, "reward": reward_model_path, "prm": prm_path}


def _length(completions, **kwargs) -> list[float]:
    return [float(len(c)) for c in completions]


# ----------------------------------------------------------------------------------------------- text cells
STEPWISE = Dataset.from_list(
    [{"prompt": f"Step {i}:", "completions": [" a", " b"], "labels": [True, i % 2 == 0]} for i in range(4)]
)
BAD_CELLS = [
    ("SFT", zen_dataset("standard_language_modeling"), "text", 2, None, "is None"),
    ("SFT", zen_dataset("standard_language_modeling"), "text", 4, "", "is an empty string"),
    ("SFT", zen_dataset("standard_prompt_completion"), "completion", 1, None, "is None"),
    ("SFT", zen_dataset("conversational_language_modeling"), "messages", 3, None, "is None"),
    ("DPO", zen_dataset("standard_preference"), "chosen", 3, None, "is None"),
    ("ORPO", zen_dataset("standard_implicit_prompt_preference"), "rejected", 5, None, "is None"),
    ("CPO", zen_dataset("standard_preference"), "prompt", 0, None, "is None"),
    ("Reward", zen_dataset("standard_preference"), "rejected", 6, None, "is None"),
    ("KTO", zen_dataset("standard_unpaired_preference"), "completion", 7, None, "is None"),
    ("BCO", zen_dataset("standard_unpaired_preference"), "prompt", 8, None, "is None"),
    ("PRM", STEPWISE, "prompt", 2, None, "is None"),
    ("GRPO", zen_dataset("standard_prompt_only"), "prompt", 9, None, "is None"),
    ("RLOO", zen_dataset("conversational_prompt_only"), "prompt", 10, None, "is None"),
    ("Distillation", zen_dataset("standard_prompt_only"), "prompt", 11, None, "is None"),
]


@pytest.mark.parametrize(("trainer", "dataset", "column", "row", "value", "problem"), BAD_CELLS)
def test_a_bad_text_cell_names_its_column_and_row(trainer, dataset, column, row, value, problem, paths, tmp_path):
    with pytest.raises(ValueError) as error:
        _build(trainer, _with(dataset, row, **{column: value}), tmp_path, paths)
    message = str(error.value)
    assert f"Column '{column}' of the train dataset {problem} at row {row}" in message
    assert "Fix or drop such rows" in message


def test_a_non_string_column_and_the_eval_dataset_are_checked(tiny_model_path, tmp_path):
    numbers = Dataset.from_dict({"text": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"Column 'text' of the train dataset holds int 1 at row 0"):
        lt.SFTTrainer(tiny_model_path, args=lt.SFTConfig(str(tmp_path), **COMMON), train_dataset=numbers)
    bad_eval = _with(zen_dataset("standard_preference", "test"), 1, rejected=None)
    with pytest.raises(ValueError, match=r"Column 'rejected' of the eval dataset is None at row 1"):
        lt.DPOTrainer(
            tiny_model_path,
            args=lt.DPOConfig(str(tmp_path), **COMMON),
            train_dataset=zen_dataset("standard_preference"),
            eval_dataset=bad_eval,
        )


def test_text_cells_unit():
    conversational = zen_dataset("conversational_preference")
    check_text_columns(conversational, ["prompt", "chosen", "rejected"])  # lists of messages are text too
    check_text_columns(zen_dataset("standard_preference").select([3, 1, 2]), ["prompt", "chosen"])
    shuffled = _with(zen_dataset("standard_language_modeling"), 5, text=None).select([0, 5, 1])
    with pytest.raises(ValueError, match="is None at row 1"):  # rows count in the dataset's current order
        check_text_columns(shuffled, ["text"])
    streamed = _with(zen_dataset("standard_prompt_only"), 0, prompt=None).to_iterable_dataset()
    with pytest.raises(ValueError, match="Column 'prompt' of the train dataset is None at row 0"):
        check_text_columns(streamed, ["prompt"])
    with pytest.raises(ValueError, match=r"holds list \['a', 'b'\] at row 0"):  # a list of strings is no conversation
        check_text_columns(Dataset.from_dict({"prompt": [["a", "b"]]}), ["prompt"])


def test_mixed_conversational_and_plain_fields(tiny_model_path, tmp_path):
    rows = [
        {**row, "prompt": [{"role": "user", "content": row["prompt"]}]} for row in zen_dataset("standard_preference")
    ]
    with pytest.raises(ValueError) as error:
        lt.DPOTrainer(
            tiny_model_path, args=lt.DPOConfig(str(tmp_path), **COMMON), train_dataset=Dataset.from_list(rows)
        )
    message = str(error.value)
    assert "Row 0 of the train dataset mixes conversational and plain-text fields" in message
    assert "['prompt'] hold lists of messages but ['chosen', 'rejected'] hold strings" in message
    assert "Use one format for all of them" in message


# ----------------------------------------------------------------------------------------------- preference data
def test_identical_pairs_warn_with_their_count(tiny_model_path, tmp_path, caplog):
    rows = zen_dataset("standard_preference").to_list()
    for row in rows[:3]:
        row["rejected"] = row["chosen"]
    with caplog.at_level(logging.WARNING, logger="llm_trainer"):
        lt.DPOTrainer(
            tiny_model_path, args=lt.DPOConfig(str(tmp_path), **COMMON), train_dataset=Dataset.from_list(rows)
        )
    assert "3 of 17 train pairs have chosen == rejected" in caplog.text
    assert "row['chosen'] != row['rejected']" in caplog.text


@pytest.mark.parametrize(
    ("trainer", "dataset", "reason"),
    [
        ("SFT", "standard_prompt_completion", "no trainable token left after truncation to max_length=1"),
        ("DPO", "standard_preference", "the prompt alone fills max_length=1"),
        ("Reward", "standard_preference", "the chosen or rejected sequence is longer than max_length=1"),
        ("KTO", "standard_unpaired_preference", "the prompt alone fills max_length=1"),
    ],
)
def test_every_row_dropped_is_an_error(trainer, dataset, reason, paths, tmp_path):
    with pytest.raises(ValueError) as error:
        _build(trainer, zen_dataset(dataset), tmp_path, paths, max_length=1)
    message = str(error.value)
    assert f"All 17 rows of the train dataset were dropped: {reason}" in message
    assert "Raise `max_length`" in message


@pytest.mark.parametrize(("labels", "row", "shown"), [(["yes", "no"], 0, "'yes'"), ([1, 0, 2], 2, "2")])
def test_unpaired_labels_must_be_booleans(labels, row, shown, tiny_model_path, tmp_path):
    dataset = zen_dataset("standard_unpaired_preference").select(range(len(labels)))
    dataset = dataset.remove_columns("label").add_column("label", labels)
    for trainer in ("KTO", "BCO"):
        with pytest.raises(ValueError) as error:
            _build(trainer, dataset, tmp_path, {"causal": tiny_model_path, "reward": "", "prm": ""})
        message = str(error.value)
        assert f"Column 'label' of the train dataset holds {shown} at row {row}" in message
        assert "labels must be booleans" in message


def test_zero_one_labels_are_accepted_as_trl_reads_them():
    ints = Dataset.from_dict({"label": [1, 0, 1]})
    check_labels(ints, "label")
    with pytest.raises(ValueError, match="holds None at row 1"):
        check_labels(Dataset.from_dict({"label": [True, None]}), "label")


# ----------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("config", "field", "value", "bound"),
    [
        ("GRPOConfig", "gradient_accumulation_steps", 0, ">= 1"),
        ("SFTConfig", "learning_rate", -1e-5, ">= 0"),
        ("DPOConfig", "per_device_train_batch_size", 0, ">= 1"),
        ("GRPOConfig", "max_completion_length", 0, ">= 1"),
        ("RLOOConfig", "temperature", 0.0, "> 0"),
        ("GRPOConfig", "temperature", -0.5, "> 0"),
        ("GRPOConfig", "num_iterations", 0, ">= 1"),
        ("DistillationConfig", "max_completion_length", 0, ">= 1"),
        ("DPOConfig", "beta", 0.0, "> 0"),
        ("DPOConfig", "beta", -0.1, "> 0"),
    ],
)
def test_invalid_numbers_are_rejected_by_the_config(config, field, value, bound):
    with pytest.raises(ValueError) as error:
        getattr(lt, config)("out", report_to="none", **{field: value})
    assert f"`{field}={value!r}` is invalid: it must be {bound}." in str(error.value)


def test_trl_defaults_and_valid_edge_values_construct():
    for name in ("SFT", "DPO", "GRPO", "RLOO", "KTO", "BCO", "CPO", "ORPO", "Reward", "PRM", "Distillation", "PPO"):
        getattr(lt, f"{name}Config")("out", report_to="none")
    lt.DPOConfig("out", report_to="none", loss_type="sft", beta=0.0)  # β is unused by the SFT loss alone
    lt.GRPOConfig("out", report_to="none", learning_rate=0.0, max_completion_length=None, temperature=0.1)


# ----------------------------------------------------------------------------------------------- model paths
@pytest.mark.parametrize("path", ["./no/such/model", "/tmp/missing-model-for-llm-trainer"])
def test_a_missing_local_model_is_named(path, tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match=rf"no model at '{path}': not a local directory \(nothing is there"):
        load_model(path)
    with pytest.raises(ValueError, match=rf"no model at '{path}'"):
        lt.SFTTrainer(
            path, args=lt.SFTConfig(str(tmp_path), **COMMON), train_dataset=zen_dataset("standard_language_modeling")
        )
    with pytest.raises(ValueError, match=rf"no model at '{path}'.*as the reward model"):
        RewardFunctions([path], None, None)
    with pytest.raises(ValueError, match=rf"no model at '{path}'"):
        lt.DistillationTrainer(
            tiny_model_path,
            teacher_model=path,
            args=lt.DistillationConfig(str(tmp_path), **COMMON),
            train_dataset=zen_dataset("standard_prompt_only"),
        )
    check_model_path("Qwen/Qwen2.5-0.5B")  # a valid Hub id is left to `from_pretrained` and its own errors


# ----------------------------------------------------------------------------------------------- rewards
@pytest.mark.parametrize("trainer", ["GRPO", "RLOO"])
@pytest.mark.parametrize("reward_funcs", [None, []])
def test_no_reward_source(trainer, reward_funcs, tiny_model_path, tmp_path):
    args = getattr(lt, f"{trainer}Config")(str(tmp_path), **COMMON, **ONLINE)
    with pytest.raises(ValueError) as error:
        getattr(lt, f"{trainer}Trainer")(
            tiny_model_path, reward_funcs=reward_funcs, args=args, train_dataset=zen_dataset("standard_prompt_only")
        )
    message = str(error.value)
    assert f"No reward source: `reward_funcs` is {reward_funcs!r}" in message
    assert "Pass `reward_funcs`" in message


def _score(func, completions=("a", "bb")):
    rewards = RewardFunctions([func], None, None)
    return rewards.score(
        ["p"] * len(completions), list(completions), [[1]] * len(completions), {}, torch.device("cpu")
    )


def scalar_reward(completions, **kwargs):
    return 1.0


def word_reward(completions, **kwargs):
    return "good"


def labelled_reward(completions, **kwargs):
    return ["good" for _ in completions]


def infinite_reward(completions, **kwargs):
    return [1.0, float("-inf")]


def test_reward_function_outputs_are_checked():
    with pytest.raises(TypeError, match=r"'scalar_reward' returned 1.0 \(float\) instead of a list of 2 rewards"):
        _score(scalar_reward)
    with pytest.raises(TypeError, match=r"'word_reward' returned 'good' \(str\) instead of a list"):
        _score(word_reward)
    with pytest.raises(TypeError, match=r"'labelled_reward' returned a list holding 'good' \(str\) at position 0"):
        _score(labelled_reward)
    with pytest.raises(ValueError, match=r"'infinite_reward' returned -inf for completion 1: rewards must be finite"):
        _score(infinite_reward)
    rewards = _score(lambda completions, **kwargs: [None, torch.tensor(2.0)])  # None skips a completion
    assert torch.isnan(rewards[0, 0]) and rewards[1, 0] == 2.0


def _grpo(tiny_model_path, tmp_path, reward):
    args = lt.GRPOConfig(str(tmp_path), **COMMON, **ONLINE, logging_steps=1, dataloader_pin_memory=False)
    return lt.GRPOTrainer(
        tiny_model_path, reward_funcs=reward, args=args, train_dataset=zen_dataset("standard_prompt_only")
    )


def test_an_infinite_reward_fails_the_step(tiny_model_path, tmp_path):
    def overflowing_reward(completions, **kwargs):
        return [float("inf")] * len(completions)

    with pytest.raises(ValueError, match="'overflowing_reward' returned inf for completion 0"):
        _grpo(tiny_model_path, tmp_path, overflowing_reward).train()


def test_identical_rewards_warn_once(tiny_model_path, tmp_path, caplog):
    def constant_reward(completions, **kwargs):
        return [1.0] * len(completions)

    trainer = _grpo(tiny_model_path, tmp_path, constant_reward)
    with caplog.at_level(logging.WARNING, logger="llm_trainer"):
        trainer.train()
    assert caplog.text.count("frac_reward_zero_std=1.0") == 1
    assert "the policy gets no gradient from these rewards" in caplog.text
    assert "Make the reward functions tell completions apart" in caplog.text
    assert trainer.state.log_history[0]["frac_reward_zero_std"] == 1.0
