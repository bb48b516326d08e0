"""The offline tiny tokenizer and models that every test, example and the demo stand on."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from llm_trainer.testing import build_tokenizer, get_tokenizer, make_tiny_model, zen_dataset

TEXT = "What is 3 plus 4? Beautiful is better than ugly.\n  <|im_start|>user\nhi<|im_end|>"


def test_shipped_tokenizer_matches_a_fresh_training():
    assert build_tokenizer().get_vocab() == get_tokenizer().get_vocab()
    assert build_tokenizer().chat_template == get_tokenizer().chat_template


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_model_folder_loads_offline_with_the_same_token_ids(architecture, tmp_path):
    path = make_tiny_model(tmp_path, architecture=architecture)
    tokenizer = AutoTokenizer.from_pretrained(path)  # Qwen2Tokenizer for qwen2: rebuilt with its own pre-tokenizer
    assert tokenizer(TEXT)["input_ids"] == get_tokenizer()(TEXT)["input_ids"]
    assert tokenizer.decode(tokenizer(TEXT)["input_ids"]) == TEXT
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == architecture and model.config.vocab_size == len(tokenizer)


def test_sequence_classification_model_has_one_label(tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(
        make_tiny_model(tmp_path, task="sequence-classification")
    )
    assert model.config.num_labels == 1


def test_chat_template_marks_assistant_tokens():
    tokenizer = get_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Beautiful."}]
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(marked) == "Beautiful.<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"


def test_zen_dataset_layouts():
    assert zen_dataset("standard_prompt_completion")[0] == {
        "prompt": "Beautiful is better than",
        "completion": " ugly.",
    }
    assert len(zen_dataset("standard_language_modeling")) == 17
    assert len(zen_dataset("standard_language_modeling", "test")) == 2
    unpaired = zen_dataset("standard_unpaired_preference")
    assert set(unpaired["label"]) == {True, False}
    with pytest.raises(ValueError, match="Unknown zen config"):
        zen_dataset("nope")
