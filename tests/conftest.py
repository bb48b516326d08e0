"""Shared fixtures: tiny offline models built once per test session."""

import os
import subprocess
import sys
import time

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


@pytest.fixture(scope="module")
def server_url(tiny_model_path):
    """`llm-trainer vllm-serve --backend transformers` on the tiny model, started as users start it, on a free port."""
    from llm_trainer.generation import GenerationClient
    from llm_trainer.trainer.utils import free_port

    port = free_port()
    command = [sys.executable, "-m", "llm_trainer.cli", "vllm-serve", "--backend", "transformers"]
    command += ["--model", tiny_model_path, "--host", "127.0.0.1", "--port", str(port), "--log_level", "warning"]
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
