"""Input that would train silently on nothing, or the wrong way, fails at construction (or at the step, for rewards)
with a message naming the argument, row and column, and the fix."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

import llm_trainer as lt
from llm_trainer.data.validation import check_labels, check_numbers, check_text_columns
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
    assert f"No reward source provided: `reward_funcs` is {reward_funcs!r}" in message
    assert "Pass `reward_funcs`" in message


def test_one_reward_tokenizer_for_two_reward_functions_is_refused(tiny_model_path):
    """As TRL: a single tokenizer stands for a list of one, so two reward functions need a list of two."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    funcs = [lambda completions, **kwargs: [0.0] * len(completions)] * 2
    with pytest.raises(ValueError, match="must match the number of reward functions"):
        RewardFunctions(funcs, None, tokenizer)
    assert len(RewardFunctions(funcs, None, [None, None])) == 2


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


# ----------------------------------------------------------------------------------------------- config types
@pytest.mark.parametrize(
    ("config", "field", "value", "message"),
    [
        (
            "SFTConfig",
            "learning_rate",
            "1e-5",
            "`learning_rate='1e-5'` (str) is invalid: `learning_rate` takes a "
            "number. Pass learning_rate=1e-05 (YAML reads 1e-5 as a string: write 1.0e-5).",
        ),
        (
            "GRPOConfig",
            "per_device_train_batch_size",
            2.5,
            "`per_device_train_batch_size=2.5` (float) is invalid: "
            "`per_device_train_batch_size` takes an integer. Pass a whole number, e.g. per_device_train_batch_size=2.",
        ),
        ("DPOConfig", "beta", "0.1", "`beta='0.1'` (str) is invalid: `beta` takes a number. Pass beta=0.1."),
        (
            "SFTConfig",
            "max_length",
            "512",
            "`max_length='512'` (str) is invalid: `max_length` takes an integer. Pass max_length=512.",
        ),
        (
            "SFTConfig",
            "packing",
            "false",
            "`packing='false'` is a string, but `packing` is a boolean: pass packing=True or packing=False",
        ),
        (
            "GRPOConfig",
            "reward_weights",
            0.5,
            "`reward_weights=0.5` is invalid: `reward_weights` takes a list of numbers, e.g. reward_weights=[0.5].",
        ),
        ("DPOConfig", "loss_weights", 1.0, "`loss_weights=1.0` is invalid: `loss_weights` takes a list of numbers"),
        ("KTOConfig", "max_steps", "10", "`max_steps='10'` (str) is invalid: `max_steps` takes an integer."),
    ],
)
def test_a_value_of_the_wrong_type_is_named_by_the_config(config, field, value, message):
    with pytest.raises(TypeError) as error:
        getattr(lt, config)("out", report_to="none", **{field: value})
    assert message in str(error.value)


def test_values_of_the_right_type_pass_the_type_check():
    lt.SFTConfig("out", report_to="none", learning_rate=1, num_train_epochs=2, max_length=None, packing=False)
    lt.GRPOConfig("out", report_to="none", reward_weights=[1, 0.5], top_k=None, epsilon_high=None)
    lt.DPOConfig("out", report_to="none", loss_type="sigmoid", loss_weights=(1,))


@pytest.mark.parametrize(
    ("config", "field", "value", "bound", "fix"),
    [
        ("SFTConfig", "max_steps", 0, ">= 1", "Use -1 (the default) to train for `num_train_epochs` epochs instead."),
        ("DPOConfig", "max_steps", -5, ">= 1", "Use -1 (the default)"),
        ("SFTConfig", "num_train_epochs", 0, "> 0", "so this trains nothing. Set `num_train_epochs`"),
        ("KTOConfig", "num_train_epochs", -1.0, "> 0", "or a positive `max_steps`"),
        ("GRPOConfig", "beta", -0.1, ">= 0", "a negative value rewards drifting away from it"),
        ("RLOOConfig", "epsilon", -0.2, ">= 0", "clipping range of the importance ratio"),
        ("GRPOConfig", "epsilon_high", -1.0, ">= 0", "clipping range of the importance ratio"),
    ],
)
def test_run_length_and_rl_bounds(config, field, value, bound, fix):
    with pytest.raises(ValueError) as error:
        getattr(lt, config)("out", report_to="none", **{field: value})
    assert f"`{field}={value!r}` is invalid: it must be {bound}. " in str(error.value)
    assert fix in str(error.value)


def test_run_length_edge_values_and_a_zero_learning_rate_warning(caplog):
    lt.SFTConfig("out", report_to="none", max_steps=5, num_train_epochs=0)  # max_steps decides; epochs are unused
    lt.GRPOConfig("out", report_to="none", beta=0.0, epsilon=0.0)
    with caplog.at_level(logging.WARNING, logger="llm_trainer"):
        lt.SFTConfig("out", report_to="none", learning_rate=0.0)
    assert "`learning_rate=0`: the optimizer will not change the weights" in caplog.text


def test_kto_weights_that_zero_the_loss():
    with pytest.raises(ValueError, match="are both 0, so the loss is 0 and training learns nothing. Set at least one"):
        lt.KTOConfig("out", report_to="none", desirable_weight=0.0, undesirable_weight=0.0)
    lt.KTOConfig("out", report_to="none", desirable_weight=0.0)  # one side only: still a loss


def test_sampling_bounds():
    from llm_trainer.generation.base import SamplingConfig

    with pytest.raises(ValueError, match=r"repetition_penalty must be > 0 \(1.0 disables it\), got 0.0"):
        SamplingConfig(repetition_penalty=0.0)


# ----------------------------------------------------------------------------------------------- empty / too small
@pytest.mark.parametrize("trainer", ["GRPO", "RLOO", "Distillation"])
def test_an_empty_prompt_dataset_is_an_error(trainer, paths, tmp_path):
    with pytest.raises(ValueError, match=r"The train dataset is empty \(0 rows\): pass a dataset with a 'prompt'"):
        _build(trainer, zen_dataset("standard_prompt_only").select([]), tmp_path, paths)


def test_too_few_rows_for_one_batch_fail_before_the_first_step(paths, tmp_path):
    sft = _build(
        "SFT", zen_dataset("standard_language_modeling").select(range(3)), tmp_path, paths, dataloader_drop_last=True
    )
    with pytest.raises(ValueError) as error:
        sft.train()
    assert "The train dataset has 3 rows once prepared, too few for one batch: `dataloader_drop_last=True`" in str(
        error.value
    )
    assert "set `dataloader_drop_last=False`" in str(error.value)
    args = lt.GRPOConfig(str(tmp_path), **{**COMMON, "per_device_train_batch_size": 8}, **ONLINE)
    one_prompt = zen_dataset("standard_prompt_only").select([0])
    grpo = lt.GRPOTrainer(paths["causal"], reward_funcs=_length, args=args, train_dataset=one_prompt)
    with pytest.raises(ValueError) as error:
        grpo.train()
    assert "has 1 rows once prepared, too few for one batch: one generation batch takes 2 prompts " in str(error.value)
    assert "(generation_batch_size=8 / num_generations=4)" in str(error.value)
    assert grpo.state.global_step == 0


# ----------------------------------------------------------------------------------------------- conversations
def _conversations(**change) -> Dataset:
    rows = zen_dataset("conversational_language_modeling").to_list()
    for row in rows:
        row["messages"] = [{**message, **change} for message in row["messages"]]
    return Dataset.from_list(rows)


def test_a_message_without_role_or_content_is_named(paths, tmp_path):
    renamed = Dataset.from_list([{"messages": [{"from": "human", "text": "hi"}]}] * 3)
    with pytest.raises(ValueError) as error:
        _build("SFT", renamed, tmp_path, paths)
    message = str(error.value)
    assert "Column 'messages' of the train dataset has a message without 'role' at row 0 (message 0, keys " in message
    assert "every message must be {'role': ..., 'content': ...}. Rename the keys" in message
    chosen = zen_dataset("conversational_preference").to_list()
    chosen[4]["chosen"] = [{"role": "assistant", "text": "x"}]
    with pytest.raises(
        ValueError,
        match=r"Column 'chosen' of the train dataset has a message without 'content' "
        r"at row 4 \(message 0, keys \['role', 'text'\]\)",
    ):
        _build("DPO", Dataset.from_list(chosen), tmp_path, paths)


def test_an_empty_or_json_encoded_conversation_is_named(paths, tmp_path):
    rows = zen_dataset("conversational_language_modeling").to_list()
    rows[2]["messages"] = []
    with pytest.raises(ValueError) as error:
        _build("SFT", Dataset.from_list(rows), tmp_path, paths)
    assert "Column 'messages' of the train dataset is an empty list of messages at row 2" in str(error.value)
    assert "dataset.filter(lambda row: len(row['messages']) > 0)" in str(error.value)
    encoded = Dataset.from_dict({"messages": [json.dumps(row["messages"]) for row in rows[3:6]]})
    with pytest.raises(ValueError) as error:
        _build("SFT", encoded, tmp_path, paths)
    assert "Column 'messages' of the train dataset holds strings, but every 'messages' cell must be a list" in str(
        error.value
    )
    assert "json.loads(row['messages'])" in str(error.value)


def test_conversation_checks_unit(caplog):
    tool_call = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "add"}]},
        {"role": "tool", "content": "4"},
    ]
    check_text_columns(Dataset.from_dict({"messages": [tool_call]}), ["messages"])  # None content beside tool calls
    streamed = Dataset.from_dict({"prompt": [[{"role": "user"}]]}).to_iterable_dataset()
    with pytest.raises(ValueError, match="has a message without 'content' at row 0"):
        check_text_columns(streamed, ["prompt"])
    with caplog.at_level(logging.WARNING, logger="llm_trainer"):
        check_text_columns(_conversations(role="bot").select([1, 2]), ["messages"])
    assert "Column 'messages' of the train dataset has messages with role(s) ['bot'] (first at row 0)" in caplog.text
    assert "'bot' -> 'assistant'" in caplog.text


def test_reward_margins_must_be_numbers(paths, tmp_path):
    margins = zen_dataset("standard_preference").add_column("margin", ["1.0"] * 17)
    with pytest.raises(ValueError) as error:
        _build("Reward", margins, tmp_path, paths)
    assert (
        "Column 'margin' of the train dataset holds '1.0' at row 0, but every 'margin' cell must be a finite"
        in str(error.value)
    )
    assert "float(row['margin'])" in str(error.value)
    check_numbers(Dataset.from_dict({"margin": [1, 2]}), "margin")
    with pytest.raises(ValueError, match="holds nan at row 1"):
        check_numbers(Dataset.from_dict({"margin": [0.5, float("nan")]}), "margin")


def test_a_missing_chat_template_file_is_named(tiny_model_path, tmp_path):
    args = lt.SFTConfig(str(tmp_path), **COMMON, chat_template_path="templates/chatml.jinja")
    with pytest.raises(FileNotFoundError, match=r"`chat_template_path='templates/chatml.jinja'`: no such file \(rel"):
        lt.SFTTrainer(tiny_model_path, args=args, train_dataset=zen_dataset("conversational_language_modeling"))


def test_skip_prepare_dataset_needs_input_ids(tiny_model_path, tmp_path):
    args = lt.SFTConfig(str(tmp_path), **COMMON, dataset_kwargs={"skip_prepare_dataset": True})
    with pytest.raises(ValueError) as error:
        lt.SFTTrainer(tiny_model_path, args=args, train_dataset=zen_dataset("standard_language_modeling"))
    assert "The train dataset has no 'input_ids' (columns: ['text'])" in str(error.value)
    assert "Drop `skip_prepare_dataset`" in str(error.value)


# ----------------------------------------------------------------------------------------------- models
def test_a_folder_without_config_json_is_named(tiny_model_path, tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "model.safetensors").write_text("")
    with pytest.raises(ValueError) as error:
        load_model(str(folder))
    assert f"no model at '{folder}': the folder has no config.json (it holds ['model.safetensors'])" in str(
        error.value
    )
    assert "the folder `save_pretrained` wrote" in str(error.value)
    with pytest.raises(ValueError, match="the folder has no config.json"):
        lt.DistillationTrainer(
            tiny_model_path,
            teacher_model=str(folder),
            args=lt.DistillationConfig(str(tmp_path), **COMMON),
            train_dataset=zen_dataset("standard_prompt_only"),
        )


def test_a_classifier_given_as_a_causal_lm_is_named(paths, tmp_path):
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(ValueError) as error:
        _build("SFT", zen_dataset("standard_language_modeling"), tmp_path, {**paths, "causal": paths["reward"]})
    message = str(error.value)
    assert (
        f"The model '{paths['reward']}' is a Qwen2ForSequenceClassification, which has no language-modeling" in message
    )
    assert "pass a causal language model (`AutoModelForCausalLM`)" in message
    classifier = AutoModelForSequenceClassification.from_pretrained(paths["reward"])
    with pytest.raises(ValueError, match="The model is a Qwen2ForSequenceClassification, which has no language"):
        lt.DPOTrainer(
            classifier, args=lt.DPOConfig(str(tmp_path), **COMMON), train_dataset=zen_dataset("standard_preference")
        )
    with pytest.raises(ValueError, match=f"The model '{paths['reward']}' is a Qwen2ForSequenceClassification"):
        lt.DPOTrainer(
            paths["causal"],
            ref_model=paths["reward"],
            args=lt.DPOConfig(str(tmp_path), **COMMON),
            train_dataset=zen_dataset("standard_preference"),
        )


@pytest.mark.parametrize("model", [None, 123])
def test_a_model_that_is_no_model_is_named(model, tmp_path):
    with pytest.raises(TypeError, match=r"`model` must be a model name or local path \(a string\), or a loaded"):
        lt.SFTTrainer(
            model, args=lt.SFTConfig(str(tmp_path), **COMMON), train_dataset=zen_dataset("standard_language_modeling")
        )


def test_a_path_object_and_a_tokenizer_without_pad_or_eos(tiny_model_path, tmp_path):
    from pathlib import Path

    from llm_trainer.testing import get_tokenizer

    data, args = zen_dataset("standard_language_modeling"), lt.SFTConfig(str(tmp_path), **COMMON)
    lt.SFTTrainer(Path(tiny_model_path), args=args, train_dataset=data)  # read as its path
    tokenizer = get_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token = None
    with pytest.raises(ValueError, match="has neither a pad token nor an eos token to pad with. Set one before"):
        lt.SFTTrainer(tiny_model_path, args=args, train_dataset=data, processing_class=tokenizer)


# ----------------------------------------------------------------------------------------------- reward functions
def _online(tiny_model_path, tmp_path, reward, dataset=None):
    args = lt.GRPOConfig(str(tmp_path), **COMMON, **ONLINE)
    return lt.GRPOTrainer(
        tiny_model_path, reward_funcs=reward, args=args, train_dataset=dataset or zen_dataset("standard_prompt_only")
    )


def one_parameter(x):
    return [1.0] * len(x)


def no_kwargs(prompts, completions):
    return [1.0] * len(completions)


def reads_answer(completions, answer, **kwargs):
    return [float(a in c) for a, c in zip(answer, completions)]


def test_reward_function_signatures_are_checked_at_construction(tiny_model_path, tmp_path):
    with pytest.raises(TypeError) as error:
        _online(tiny_model_path, tmp_path, one_parameter)
    assert "The reward function 'one_parameter(x)' does not accept ['completion_ids', 'completions'," in str(
        error.value
    )
    assert "Add `**kwargs`, e.g. `def one_parameter(completions, **kwargs) -> list[float]`." in str(error.value)
    with pytest.raises(TypeError, match=r"'no_kwargs\(prompts, completions\)' does not accept \['completion_ids', "):
        _online(tiny_model_path, tmp_path, no_kwargs)
    with pytest.raises(TypeError) as error:
        _online(tiny_model_path, tmp_path, reads_answer)
    assert "'reads_answer(completions, answer, **kwargs)' needs ['answer'], but the trainer passes only" in str(
        error.value
    )
    assert "the dataset columns [], all as keywords. Add the column(s) to the dataset" in str(error.value)
    _online(
        tiny_model_path, tmp_path, reads_answer, zen_dataset("standard_prompt_only").add_column("answer", ["x"] * 17)
    )


class Scorer:
    def __call__(self, completions, **kwargs):
        return [1.0] * len(completions)


def test_reward_sources_that_are_no_reward_are_named(tiny_model_path):
    from transformers import AutoModelForCausalLM

    with pytest.raises(TypeError, match=r"The reward function Scorer is a class: pass an instance, `Scorer\(\)`"):
        RewardFunctions([Scorer], None, None)
    with pytest.raises(ValueError, match="The reward model Qwen2ForCausalLM is a language model .* first logit is no"):
        RewardFunctions([AutoModelForCausalLM.from_pretrained(tiny_model_path)], None, None)
    with pytest.raises(TypeError, match=r"pass it: `from llm_trainer.rewards import accuracy_reward`, then"):
        RewardFunctions(["accuracy_reward"], None, None)
    with pytest.raises(OSError) as error:
        RewardFunctions(["accuracy"], None, None)  # offline in the tests: not in the Hub cache
    assert str(error.value).startswith("Could not load the reward model 'accuracy' (")
    assert "A string in `reward_funcs` is a reward model's Hub id or local folder; to score with a function" in str(
        error.value
    )


def broken_reward(completions, **kwargs):
    raise RuntimeError("my reward broke")


def test_an_exception_in_a_reward_function_names_it():
    with pytest.raises(RuntimeError, match="my reward broke") as error:
        _score(broken_reward)
    assert "(raised by the reward function 'broken_reward' while scoring a batch)" in error.value.__notes__


# ----------------------------------------------------------------------------------------------- image columns
@pytest.mark.parametrize(
    ("trainer", "config", "column"),
    [
        ("Reward", "conversational_preference", "image"),
        ("ORPO", "conversational_preference", "images"),
        ("CPO", "conversational_implicit_prompt_preference", "image"),
    ],
)
def test_a_text_only_trainer_refuses_image_columns_instead_of_ignoring_them(trainer, config, column, paths, tmp_path):
    from llm_trainer.testing import zen_image_dataset

    dataset = zen_image_dataset(config, images_per_row=1 if column == "image" else 2)
    with pytest.raises(ValueError) as error:
        _build(trainer, dataset, tmp_path, paths)
    message = str(error.value)
    assert f"['{column}']" in message and f"{trainer}Trainer trains on text only" in message
    assert "remove_columns" in message  # the fix
