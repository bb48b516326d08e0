"""`llm_trainer.data_utils` against hand-written expectations and against TRL 1.16 itself (`trl.data_utils`)."""

import copy

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import trl
import trl.data_utils as trl_data_utils
from datasets import Dataset, DatasetDict, Features, LargeList, Value, concatenate_datasets

from llm_trainer import data_utils
from llm_trainer.data.chat_template import ExampleKeysError
from llm_trainer.testing import CHAT_TEMPLATE, get_tokenizer, zen_dataset

CONFIGS = [
    f"{form}_{kind}"
    for form in ("standard", "conversational")
    for kind in (
        "language_modeling",
        "prompt_only",
        "prompt_completion",
        "preference",
        "implicit_prompt_preference",
        "unpaired_preference",
    )
]
PAIRED = [config for config in CONFIGS if config.endswith("preference") and "unpaired" not in config]
USER = {"role": "user", "content": "What color is the sky?"}
ASSISTANT = {"role": "assistant", "content": "It is blue."}
GENERATION_PROMPT = "<|im_start|>assistant\\n' }}{%- endif %}"
# Like DeepSeek-R1: the generation prompt opens a thought block that a rendered assistant turn does not have.
THINKING_TEMPLATE = CHAT_TEMPLATE.replace(GENERATION_PROMPT, "<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")
# Renders the tools it is given and a `think` flag, to see both reach the template.
TOOLS_TEMPLATE = (
    "{%- if tools is not none %}<tools>{% for tool in tools %}{{ tool.function.name }};{% endfor %}</tools>"
    "{%- endif %}{%- if think %}<think_on>{%- endif %}" + CHAT_TEMPLATE
)
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {"type": "object"}},
}


def get_time(city: str) -> str:
    """Current time in a city.

    Args:
        city: The city.
    """
    return "noon"


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


def both(name, *args, **kwargs):
    """Call `name` from TRL and from llm_trainer on the same inputs and return both results.

    TRL gets its own copy of plain-data arguments, as some of its helpers modify their input in place.
    """

    def fresh(value):
        return copy.deepcopy(value) if isinstance(value, (dict, list)) else value

    theirs = getattr(trl_data_utils, name)(*map(fresh, args), **{key: fresh(value) for key, value in kwargs.items()})
    ours = getattr(data_utils, name)(*args, **kwargs)
    return theirs, ours


def test_exports_every_public_data_helper_of_trl():
    trl_names = trl._import_structure["data_utils"]  # what `from trl import X` offers from data_utils
    assert set(trl_names) <= set(data_utils.__all__)
    for name in data_utils.__all__:
        assert hasattr(trl_data_utils, name), name
        assert callable(getattr(data_utils, name)) or name.endswith("DatasetType"), name


def test_dataset_type_variables_constrain_like_trls():
    from datasets import IterableDataset, IterableDatasetDict

    assert (
        data_utils.DatasetType.__constraints__ == trl_data_utils.DatasetType.__constraints__ == (Dataset, DatasetDict)
    )
    assert data_utils.IterableDatasetType.__constraints__ == (IterableDataset, IterableDatasetDict)
    assert data_utils.IterableDatasetType.__constraints__ == trl_data_utils.IterableDatasetType.__constraints__


# ----------------------------------------------------------------------------------------------- format detection


@pytest.mark.parametrize("config", CONFIGS)
def test_is_conversational_matches_trl_on_zen(config):
    for row in zen_dataset(config):
        theirs, ours = both("is_conversational", row)
        assert ours == theirs == config.startswith("conversational")


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        ({"prompt": [USER]}, True),
        ({"prompt": "The sky is"}, False),
        ({"messages": [USER, ASSISTANT], "text": "ignored"}, True),
        ({"text": "The sky is blue."}, False),
        ({"prompt": [{"content": "no role"}]}, False),
        ({"conversations": [{"from": "user", "value": "Hi"}]}, False),
    ],
)
def test_is_conversational(example, expected):
    theirs, ours = both("is_conversational", example)
    assert ours == theirs == expected


def test_is_conversational_is_false_for_an_empty_list():
    assert not data_utils.is_conversational({"messages": []})  # TRL raises IndexError here


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        ({"conversations": [{"from": "user", "value": "What color is the sky?"}]}, True),
        ({"conversations": [{"role": "user", "content": "What color is the sky?"}]}, False),
        ({"conversations": "The sky is"}, False),
        ({"messages": [{"from": "user", "value": "Hi"}]}, False),
    ],
)
def test_is_conversational_from_value(example, expected):
    theirs, ours = both("is_conversational_from_value", example)
    assert ours == theirs == expected


@pytest.mark.parametrize(
    "example",
    [
        {"conversations": [{"from": "user", "value": "What color is the sky?"}, {"from": "gpt", "value": "Blue."}]},
        {"prompt": [{"from": "user", "value": "Sky?"}], "completion": [{"from": "assistant", "value": "Blue."}]},
        {"chosen": [{"from": "user", "value": "a", "weight": 1}], "rejected": [{"role": "user", "content": "b"}]},
        {"messages": [USER, ASSISTANT], "id": 3},
        {"prompt": "The sky is", "conversations": "not a list"},
    ],
)
def test_maybe_convert_to_chatml_matches_trl(example):
    theirs, ours = both("maybe_convert_to_chatml", example)
    assert ours == theirs


def test_maybe_convert_to_chatml_renames_keys_and_column_without_touching_the_input():
    example = {"conversations": [{"from": "user", "value": "Sky?"}, {"from": "assistant", "value": "Blue."}]}
    original = copy.deepcopy(example)
    assert data_utils.maybe_convert_to_chatml(example) == {
        "messages": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}]
    }
    assert example == original


IMAGE_A, IMAGE_B = object(), object()  # any payload goes; identity shows which image landed where


@pytest.mark.parametrize(
    ("messages", "images"),
    [
        ([USER, ASSISTANT], [IMAGE_A]),
        ([{"role": "system", "content": "Be brief."}, USER, ASSISTANT, USER], [IMAGE_A, IMAGE_B]),
        ([USER, ASSISTANT], None),
        (
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare."}]},
                {"role": "assistant", "tool_calls": [{"function": {"name": "zoom"}}]},
                {"role": "tool", "content": [{"type": "image"}]},
                {"role": "user", "content": [{"type": "image", "image": IMAGE_B}, {"type": "image"}]},
            ],
            [IMAGE_A, IMAGE_B],
        ),
    ],
)
def test_prepare_multimodal_messages_matches_trl(messages, images):
    theirs = trl_data_utils.prepare_multimodal_messages(messages, images)
    assert data_utils.prepare_multimodal_messages(messages, images) == theirs


def test_prepare_multimodal_messages_puts_images_before_the_first_user_text():
    messages = [USER, ASSISTANT, {"role": "user", "content": "And now?"}]
    assert data_utils.prepare_multimodal_messages(messages, [IMAGE_A, IMAGE_B]) == [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": IMAGE_A},
                {"type": "image", "image": IMAGE_B},
                {"type": "text", "text": "What color is the sky?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "It is blue."}]},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
    ]
    assert messages[0] == USER  # input untouched


def test_prepare_multimodal_messages_rejects_bad_input():
    structured = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    with pytest.raises(ValueError, match=r"2 images were given but the messages have 1 image placeholders"):
        data_utils.prepare_multimodal_messages(structured, [IMAGE_A, IMAGE_B])
    with pytest.raises(ValueError, match=r"Invalid role 'robot'.*expected one of"):
        data_utils.prepare_multimodal_messages([{"role": "robot", "content": "beep"}])


def test_get_dataset_column_names():
    dataset = zen_dataset("standard_preference")
    stream = dataset.to_iterable_dataset()
    assert data_utils.get_dataset_column_names(dataset) == trl_data_utils.get_dataset_column_names(dataset)
    assert data_utils.get_dataset_column_names(stream) == ["prompt", "chosen", "rejected"]
    assert data_utils.get_dataset_column_names(DatasetDict(train=dataset)) == ["prompt", "chosen", "rejected"]


# ---------------------------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("config", CONFIGS)
def test_maybe_apply_chat_template_matches_trl_on_zen(config, tokenizer):
    for row in zen_dataset(config):
        theirs, ours = both("maybe_apply_chat_template", row, tokenizer)
        assert ours == theirs
        assert (ours is row) == config.startswith("standard")  # standard rows pass through untouched


def test_apply_chat_template_prompt_completion(tokenizer):
    example = {"prompt": [USER], "completion": [ASSISTANT], "id": 7}
    assert data_utils.apply_chat_template(example, tokenizer) == {
        "prompt": "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n",
        "completion": "It is blue.<|im_end|>\n",
    }


def test_apply_chat_template_language_modeling_becomes_text(tokenizer):
    example = {"messages": [USER, ASSISTANT]}
    assert data_utils.apply_chat_template(example, tokenizer) == {
        "text": "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\nIt is blue.<|im_end|>\n"
    }


def test_apply_chat_template_preference_and_unpaired(tokenizer):
    rejected = [{"role": "assistant", "content": "It is green."}]
    preference = data_utils.apply_chat_template(
        {"prompt": [USER], "chosen": [ASSISTANT], "rejected": rejected}, tokenizer
    )
    assert preference == {
        "prompt": "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n",
        "chosen": "It is blue.<|im_end|>\n",
        "rejected": "It is green.<|im_end|>\n",
    }
    unpaired = data_utils.apply_chat_template({"prompt": [USER], "completion": rejected, "label": False}, tokenizer)
    assert unpaired == {"prompt": preference["prompt"], "completion": preference["rejected"], "label": False}
    implicit = data_utils.apply_chat_template({"chosen": [USER, ASSISTANT], "rejected": [USER, *rejected]}, tokenizer)
    assert implicit == {
        "chosen": preference["prompt"] + preference["chosen"],
        "rejected": preference["prompt"] + preference["rejected"],
    }


@pytest.mark.parametrize(
    "prompt",
    [
        [USER],  # generation prompt added
        [USER, {"role": "assistant", "content": "It is"}],  # final message continued
        [USER, {"role": "tool", "content": "sunny"}],  # generation prompt added
    ],
    ids=["user", "assistant", "tool"],
)
@pytest.mark.parametrize(
    "completion", [None, [{"role": "assistant", "content": " blue."}]], ids=["alone", "completion"]
)
def test_apply_chat_template_ends_prompts_like_trl(prompt, completion, tokenizer):
    example = {"prompt": prompt} if completion is None else {"prompt": prompt, "completion": completion}
    theirs, ours = both("apply_chat_template", example, tokenizer)
    assert ours == theirs
    continued = prompt[-1]["role"] == "assistant"
    assert ours["prompt"].endswith("It is" if continued else "<|im_start|>assistant\n")


@pytest.mark.parametrize("config", ["conversational_prompt_completion", "conversational_preference"])
def test_apply_chat_template_cuts_the_prompt_at_the_common_prefix(config, tokenizer):
    row = zen_dataset(config)[0]
    alone = data_utils.apply_chat_template({"prompt": row["prompt"]}, tokenizer, chat_template=THINKING_TEMPLATE)
    assert alone["prompt"].endswith("<|im_start|>assistant\n<think>\n")
    theirs, ours = both("apply_chat_template", row, tokenizer, chat_template=THINKING_TEMPLATE)
    assert ours == theirs
    assert ours["prompt"].endswith("<|im_start|>assistant\n")  # the dangling "<think>\n" is not part of the prompt
    assert "<think>" not in "".join(ours.values())


def test_apply_chat_template_passes_tools_and_template_kwargs(tokenizer):
    example = {"prompt": [USER], "completion": [ASSISTANT], "chat_template_kwargs": {"think": True}}
    kwargs = {"tools": [WEATHER_TOOL, get_time], "chat_template": TOOLS_TEMPLATE}
    theirs, ours = both("apply_chat_template", example, tokenizer, **kwargs)
    assert ours == theirs
    assert ours["prompt"].startswith("<tools>get_weather;get_time;</tools><think_on><|im_start|>system\n# Tools\n")
    assert ours["prompt"].endswith("<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n")
    assert ours["completion"] == "It is blue.<|im_end|>\n"
    # per-row kwargs and call kwargs both reach the template
    ours = data_utils.apply_chat_template({"messages": [USER]}, tokenizer, chat_template=TOOLS_TEMPLATE, think=True)
    assert ours["text"].startswith("<think_on><|im_start|>user")


def test_apply_chat_template_treats_an_empty_tool_list_as_none(tokenizer):
    theirs, ours = both("apply_chat_template", {"messages": [USER]}, tokenizer, [], chat_template=TOOLS_TEMPLATE)
    assert ours == theirs
    assert not ours["text"].startswith("<tools>")


@pytest.mark.parametrize(
    "example",
    [
        {"prompt": [USER], "chosen": [ASSISTANT]},
        {"completion": [ASSISTANT]},
        {"text": "The sky is blue."},
        {"messages": [USER], "label": True},
    ],
)
def test_apply_chat_template_rejects_unsupported_key_sets(example, tokenizer):
    with pytest.raises(ExampleKeysError, match=r"Invalid keys in the example: \[.*\] .*match no dataset type") as info:
        data_utils.apply_chat_template(example, tokenizer)
    message = str(info.value)
    assert "prompt-completion: ['completion', 'prompt']" in message and "Rename or drop columns" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)  # TRL raises KeyError
    with pytest.raises(KeyError):
        trl_data_utils.apply_chat_template(example, tokenizer)


def test_apply_chat_template_rejects_a_prompt_ending_with_a_system_turn(tokenizer):
    with pytest.raises(
        ValueError, match=r"Invalid role in the last message of the prompt: 'system'.*'user' or 'tool'"
    ):
        data_utils.apply_chat_template({"prompt": [{"role": "system", "content": "Be brief."}]}, tokenizer)


# --------------------------------------------------------------------------------------------- implicit prompts


@pytest.mark.parametrize("config", CONFIGS)
def test_maybe_extract_prompt_matches_trl_on_zen(config):
    dataset = zen_dataset(config)
    theirs = dataset.map(trl_data_utils.maybe_extract_prompt)
    ours = dataset.map(data_utils.maybe_extract_prompt)
    assert ours.to_dict() == theirs.to_dict()
    if "implicit" in config:
        assert ours.column_names == ["chosen", "rejected", "prompt"]
        assert all(row["prompt"] and row["chosen"] != row["rejected"] for row in ours)


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),  # space goes to completions
        ("The sky is blue.", "The sky is bleak.", ("The sky is bl", "ue.", "eak.")),
        ("The sky", "The sky is blue.", ("The sk", "y", "y is blue.")),  # no completion is left empty
        ("Same.", "Same.", ("Same", ".", ".")),
        ("Yes", "No", ("", "Yes", "No")),
        ([USER, ASSISTANT], [USER, {"role": "assistant", "content": "Green."}], ([USER], [ASSISTANT], None)),
        ([USER, ASSISTANT], [USER, ASSISTANT, USER], ([USER], [ASSISTANT], [ASSISTANT, USER])),
    ],
)
def test_extract_prompt(chosen, rejected, expected):
    theirs, ours = both("extract_prompt", {"chosen": chosen, "rejected": rejected, "id": 1})
    assert ours == theirs
    prompt, chosen_rest, rejected_rest = expected
    assert (ours["prompt"], ours["chosen"]) == (prompt, chosen_rest)
    assert ours["rejected"] == (rejected_rest or rejected[len(prompt) :])


def test_extract_prompt_diverging_at_once_gives_an_empty_prompt():
    # TRL steps back to index -1 here, returning prompt "Hello" with chosen " " and rejected "d".
    assert data_utils.extract_prompt({"chosen": "Hello ", "rejected": "World"}) == {
        "prompt": "",
        "chosen": "Hello ",
        "rejected": "World",
    }


def test_extract_prompt_rejects_empty_completions():
    with pytest.raises(ValueError, match="non-empty 'chosen' and 'rejected'"):
        data_utils.extract_prompt({"chosen": [], "rejected": [USER]})


def test_maybe_extract_prompt_keeps_an_explicit_prompt_of_the_same_format():
    standard = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    assert data_utils.maybe_extract_prompt(standard) is standard
    not_preference = {"prompt": "The sky is", "completion": " blue."}
    assert data_utils.maybe_extract_prompt(not_preference) is not_preference
    # A plain-text prompt next to conversations that contain it is implicit: it is re-extracted.
    mixed = {"prompt": "Sky?", "chosen": [USER, ASSISTANT], "rejected": [USER, {"role": "assistant", "content": "x"}]}
    theirs, ours = both("maybe_extract_prompt", mixed)
    assert ours == theirs and ours["prompt"] == [USER]


def test_common_prefix_length():
    assert data_utils.common_prefix_length([1, 2, 3, 4], [1, 2, 5]) == 2
    assert data_utils.common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert data_utils.common_prefix_length("abc", "xbc") == 0
    assert data_utils.common_prefix_length([], [1]) == 0
    assert data_utils.common_prefix_length([7, 8, 9], [7, 8, 9, 10]) == trl_data_utils.common_prefix_length(
        [7, 8, 9], [7, 8, 9, 10]
    )


# ----------------------------------------------------------------------------------------------------- unpairing


def test_unpair_preference_dataset_emits_chosen_then_rejected():
    dataset = Dataset.from_dict({"prompt": ["a", "b"], "chosen": ["c1", "c2"], "rejected": ["r1", "r2"]})
    unpaired = data_utils.unpair_preference_dataset(dataset)
    assert unpaired.to_dict() == {
        "prompt": ["a", "b", "a", "b"],
        "completion": ["c1", "c2", "r1", "r2"],
        "label": [True, True, False, False],
    }


@pytest.mark.parametrize("config", PAIRED)
@pytest.mark.parametrize("batch_size", [1, 5, 1000])
def test_unpair_preference_dataset_matches_trl_on_zen(config, batch_size):
    dataset = zen_dataset(config).add_column("id", list(range(17)))
    theirs, ours = both("unpair_preference_dataset", dataset, batch_size=batch_size)
    assert ours.column_names == theirs.column_names
    assert ours.to_dict() == theirs.to_dict()
    assert ours.num_rows == 34 and set(ours.column_names) >= {"completion", "label", "id"}


def test_unpair_preference_dataset_handles_dicts_and_streams():
    dataset = Dataset.from_dict({"chosen": ["c1", "c2"], "rejected": ["r1", "r2"], "score": [0.5, 0.7]})
    expected = {
        "score": [0.5, 0.7, 0.5, 0.7],
        "completion": ["c1", "c2", "r1", "r2"],
        "label": [True, True, False, False],
    }
    assert data_utils.unpair_preference_dataset(DatasetDict(train=dataset))["train"].to_dict() == expected
    stream = data_utils.unpair_preference_dataset(dataset.to_iterable_dataset())
    assert Dataset.from_list(list(stream)).to_dict() == expected


def test_unpair_preference_dataset_requires_pairs():
    dataset = zen_dataset("standard_prompt_completion")
    with pytest.raises(ValueError, match=r"needs 'chosen' and 'rejected' columns, but the dataset has \['prompt', "):
        data_utils.unpair_preference_dataset(dataset)


@pytest.mark.parametrize("config", CONFIGS)
def test_maybe_unpair_preference_dataset_matches_trl_on_zen(config):
    dataset = zen_dataset(config)
    theirs, ours = both("maybe_unpair_preference_dataset", dataset, desc="Unpairing")
    assert ours.to_dict() == theirs.to_dict()
    assert (ours is dataset) == (config not in PAIRED)


def test_maybe_unpair_preference_dataset_on_a_stream():
    stream = zen_dataset("standard_preference").to_iterable_dataset()  # TRL passes num_proc=None and fails here
    rows = list(data_utils.maybe_unpair_preference_dataset(stream))
    assert [row["label"] for row in rows] == [True] * 17 + [False] * 17


# ------------------------------------------------------------------------------------------------------- packing

DOCSTRING_EXAMPLES = {
    "input_ids": [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]],
    "attention_mask": [[1, 1, 1, 0, 0], [1, 0], [1, 1, 0], [1]],
}


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (
            "bfd",
            {
                "input_ids": [[1, 2, 3, 4], [8, 9, 10, 11], [6, 7]],
                "attention_mask": [[1, 1, 1, 0], [1, 1, 0, 1], [1, 0]],
                "seq_lengths": [[4], [3, 1], [2]],
            },
        ),
        (
            "bfd_split",
            {
                "input_ids": [[1, 2, 3, 4], [8, 9, 10, 5], [6, 7, 11]],
                "attention_mask": [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1]],
                "seq_lengths": [[4], [3, 1], [2, 1]],
            },
        ),
        (
            "wrapped",
            {
                "input_ids": [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]],
                "attention_mask": [[1, 1, 1, 0], [0, 1, 0, 1], [1, 0, 1]],
            },
        ),
    ],
)
def test_pack_dataset_docstring_examples(strategy, expected):
    dataset = Dataset.from_dict(DOCSTRING_EXAMPLES)
    theirs, ours = both("pack_dataset", dataset, seq_length=4, strategy=strategy)
    assert ours[:] == theirs[:] == expected
    assert ours.features == theirs.features


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
def test_pack_dataset_matches_trl_on_random_lengths(strategy):
    rng = np.random.default_rng(0)
    for _ in range(25):
        seq_length = int(rng.integers(1, 16))
        lengths = rng.integers(1, 3 * seq_length, rng.integers(1, 80))
        lengths[rng.random(len(lengths)) < 0.1] = 0  # a few empty sequences
        lengths[0] = max(lengths[0], 1)  # TRL fails on a batch of empty sequences only
        input_ids = [rng.integers(0, 100, n).tolist() for n in lengths]
        dataset = Dataset.from_dict({"input_ids": input_ids, "labels": [[-t for t in ids] for ids in input_ids]})
        map_kwargs = {"batch_size": len(lengths)}  # so no batch holds only empty sequences
        theirs, ours = both("pack_dataset", dataset, seq_length, strategy, map_kwargs)
        assert ours[:] == theirs[:], (seq_length, lengths)


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
@pytest.mark.parametrize("batch_size", [3, 1000])
def test_pack_dataset_matches_trl_on_tokenized_zen(strategy, batch_size, tokenizer):
    texts = zen_dataset("standard_language_modeling")
    tokenized = texts.map(lambda row: tokenizer(row["text"]), remove_columns="text")
    theirs, ours = both("pack_dataset", tokenized, 24, strategy, {"batch_size": batch_size})
    assert ours[:] == theirs[:]
    assert ours.features == theirs.features


def test_pack_dataset_conserves_tokens_and_respects_seq_length():
    lengths = np.random.default_rng(1).integers(0, 700, 20_000)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    input_ids = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(np.arange(offsets[-1])))
    dataset = Dataset(pa.table({"input_ids": input_ids}))  # token i is the i-th token of the dataset
    for strategy, kept, num_sequences in [
        ("bfd_split", lengths, np.ceil(lengths / 512).sum()),  # all tokens, overlong sequences in 512-token parts
        ("bfd", np.minimum(lengths, 512), np.count_nonzero(lengths)),  # each sequence's first 512 tokens
    ]:
        packed = data_utils.pack_dataset(dataset, 512, strategy, {"batch_size": 5000}).data
        row_lengths = pc.list_value_length(packed.column("input_ids")).to_numpy()
        seq_lengths = packed.column("seq_lengths").to_pylist()
        assert row_lengths.max() <= 512 and np.array_equal(row_lengths, [sum(sizes) for sizes in seq_lengths])
        assert sum(map(len, seq_lengths)) == num_sequences
        tokens = np.sort(pc.list_flatten(packed.column("input_ids")).to_numpy())
        assert np.array_equal(tokens, np.concatenate([np.arange(start, start + n) for start, n in zip(offsets, kept)]))


def test_pack_dataset_keeps_the_format():
    dataset = Dataset.from_dict(DOCSTRING_EXAMPLES).with_format("torch", columns=["input_ids"])
    theirs, ours = both("pack_dataset", dataset, 4)
    assert ours.format == theirs.format
    assert ours.format["type"] == "torch" and ours.format["columns"] == ["input_ids", "seq_lengths"]
    assert ours[0]["input_ids"].tolist() == [1, 2, 3, 4] and "attention_mask" not in ours[0]


def test_pack_dataset_on_dicts_streams_and_chunked_tables():
    dataset = Dataset.from_dict(DOCSTRING_EXAMPLES)
    expected = data_utils.pack_dataset(dataset, 4)[:]
    assert data_utils.pack_dataset(DatasetDict(train=dataset), 4)["train"][:] == expected
    assert list(data_utils.pack_dataset(dataset.to_iterable_dataset(), 4)) == Dataset.from_dict(expected).to_list()
    chunked = concatenate_datasets([dataset.select([0, 1]), dataset.select([2, 3])])
    assert chunked.data.column("input_ids").num_chunks == 2
    assert data_utils.pack_dataset(chunked, 4)[:] == expected


def test_pack_dataset_keeps_large_lists():
    features = Features({"input_ids": LargeList(Value("int64"))})
    dataset = Dataset.from_dict({"input_ids": DOCSTRING_EXAMPLES["input_ids"]}, features=features)
    packed = data_utils.pack_dataset(dataset, 4, "bfd_split")
    assert packed.features["input_ids"] == LargeList(Value("int64"))
    assert packed["input_ids"] == [[1, 2, 3, 4], [8, 9, 10, 5], [6, 7, 11]]


def test_pack_dataset_drops_empty_sequences_and_empty_datasets_stay_empty():
    dataset = Dataset.from_dict({"input_ids": [[], [1, 2], [], [3]]})
    assert data_utils.pack_dataset(dataset, 4, "bfd")[:] == {"input_ids": [[1, 2, 3]], "seq_lengths": [[2, 1]]}
    assert data_utils.pack_dataset(dataset, 4, "wrapped")[:] == {"input_ids": [[1, 2, 3]]}
    empty = Dataset.from_dict({"input_ids": []}, features=Features({"input_ids": [Value("int64")]}))
    assert data_utils.pack_dataset(empty, 4).num_rows == 0  # TRL raises: 'seq_lengths' not in the dataset


@pytest.mark.parametrize("seq_length", [0, -3, 2.5, True])
def test_pack_dataset_rejects_bad_seq_length(seq_length):
    dataset = Dataset.from_dict(DOCSTRING_EXAMPLES)
    with pytest.raises(ValueError, match=r"seq_length must be a positive integer .*, got "):
        data_utils.pack_dataset(dataset, seq_length)


def test_pack_dataset_rejects_unknown_strategy():
    dataset = Dataset.from_dict(DOCSTRING_EXAMPLES)
    with pytest.raises(ValueError, match=r"Invalid packing strategy 'ffd', must be one of \('bfd', 'bfd_split', "):
        data_utils.pack_dataset(dataset, 4, strategy="ffd")


def test_pack_dataset_rejects_columns_that_are_not_token_lists():
    dataset = Dataset.from_dict({**DOCSTRING_EXAMPLES, "text": ["a", "b", "c", "d"]})
    with pytest.raises(TypeError, match=r"'text' holds string\. Drop it first \(`dataset.remove_columns\('text'\)`\)"):
        data_utils.pack_dataset(dataset, 4)
    ragged = Dataset.from_dict({"input_ids": [[1, 2], [3]], "labels": [[1, 2], [3, 4]]})
    with pytest.raises(ValueError, match=r"same length in each row, but 'labels' and 'input_ids' differ"):
        data_utils.pack_dataset(ragged, 4, "wrapped")
