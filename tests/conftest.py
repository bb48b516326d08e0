"""Shared fixtures: tiny offline models built once per test session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """A tiny random-weight Qwen2 causal LM with the shipped tokenizer, saved to disk."""
    from llm_trainer.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), architecture="qwen2")


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> str:
    """A tiny random-weight Llama causal LM with tied embeddings."""
    from llm_trainer.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), architecture="llama", tie_word_embeddings=True)
