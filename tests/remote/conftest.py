"""A real `llm-trainer train-serve` process on the tiny model, started as users start it, on a free port."""

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def train_serve(model_path: str, *extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`llm-trainer train-serve --model model_path EXTRA` on a free port; yields `(url, process)` and stops it."""
    from llm_trainer.remote import ServiceClient
    from llm_trainer.trainer.utils import free_port

    port = free_port()
    command = [sys.executable, "-m", "llm_trainer.cli", "train-serve", "--model", model_path, "--port", str(port)]
    command += ["--log_level", "warning", *extra]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"train-serve exited with {process.returncode}:\n{log.read()}")
            try:
                ServiceClient(url, timeout=5).health()
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def train_server(tiny_model_path):
    """`(url, process)` of `llm-trainer train-serve` on the tiny model (full FT or any LoRA rank per session)."""
    with train_serve(tiny_model_path) as served:
        yield served


@pytest.fixture(scope="module")
def start_train_serve_module():
    """`train_serve`, for a module-scoped fixture serving another model."""
    return train_serve


@pytest.fixture
def start_train_serve():
    """`train_serve` itself, for a test that starts its own server (with other flags)."""
    return train_serve
