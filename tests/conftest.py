"""Shared fixtures: tiny offline models built once per test session."""

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Cached reference log-probs (precompute_ref_log_probs=True) go to a throw-away folder, not ~/.cache.
os.environ.setdefault("LLM_TRAINER_CACHE", tempfile.mkdtemp(prefix="llm_trainer_cache_"))


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


@pytest.fixture(scope="session")
def digit_model_path(tmp_path_factory) -> str:
    """The tiny model rigged to answer only "0" or "1" (a judge model with definite verdicts): logits are
    h0 * (+10 for "1", -10 for "0", 0 elsewhere) after the final norm, so the sign of h0 picks the digit."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm_trainer.testing import get_tokenizer, make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("digits"))
    model = AutoModelForCausalLM.from_pretrained(path)
    zero, one = get_tokenizer().convert_tokens_to_ids(["0", "1"])
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[one, 0], model.lm_head.weight[zero, 0] = 10.0, -10.0
    model.save_pretrained(path)
    return path


@contextlib.contextmanager
def serve(model_path: str) -> Iterator[str]:
    """`llm-trainer vllm-serve --backend transformers` on `model_path`, started as users start it (a separate
    process, on a free port); yields its URL and stops it on exit."""
    from llm_trainer.generation import GenerationClient
    from llm_trainer.trainer.utils import free_port

    port = free_port()
    command = [sys.executable, "-m", "llm_trainer.cli", "vllm-serve", "--backend", "transformers"]
    command += ["--model", model_path, "--host", "127.0.0.1", "--port", str(port), "--log_level", "warning"]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm-serve exited with {process.returncode}:\n{process.stderr.read()}")
            try:
                GenerationClient(url, connection_timeout=0)
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server_url(tiny_model_path):
    """`llm-trainer vllm-serve --backend transformers` on the tiny model, started as users start it, on a free port."""
    with serve(tiny_model_path) as url:
        yield url


@pytest.fixture(scope="module")
def digit_server_url(digit_model_path):
    """`llm-trainer vllm-serve --backend transformers` (a real process) serving the digit-answering model."""
    with serve(digit_model_path) as url:
        yield url
