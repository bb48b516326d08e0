"""GRPO generating with vLLM on one GPU: colocate (an engine inside the training process) and server (an
`llm-trainer vllm-serve` process on the same GPU; weights reach it over HTTP, so no second GPU is needed).

Skipped without vLLM. Each run trains 2 steps on the small Qwen2 model and checks that the completions came from vLLM
with the policy's current weights: the server's model version advances with every weight sync."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

COMMON = {
    "report_to": "none",
    "max_steps": 2,
    "per_device_train_batch_size": 4,
    "num_generations": 4,
    "max_completion_length": 16,
    "learning_rate": 1e-5,
    "logging_steps": 1,
    "bf16": True,
    "save_strategy": "no",
    "disable_tqdm": True,
    "seed": 3,
    "use_vllm": True,
    "vllm_gpu_memory_utilization": 0.25,
    "vllm_max_model_length": 512,
}


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _train(model: str, out: str, **vllm_args):
    import llm_trainer
    from llm_trainer.testing import zen_dataset

    args = llm_trainer.GRPOConfig(output_dir=out, **COMMON, **vllm_args)
    trainer = llm_trainer.GRPOTrainer(
        model, length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only")
    )
    trainer.train()
    return trainer


def _check(trainer) -> None:
    import math

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    completions = list(trainer._logs["completion"])
    assert completions and any(completions)


def test_grpo_vllm_colocate(small_model, tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    from llm_trainer.trainer.utils import free_port

    # vLLM colocated in a process that was not launched: the single-process rendezvous it expects (test-scoped).
    rendezvous = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**rendezvous, "MASTER_PORT": str(free_port())}.items():
        if name not in os.environ:
            monkeypatch.setenv(name, value)
    trainer = _train(small_model, str(tmp_path / "colocate"), vllm_mode="colocate")
    _check(trainer)


@pytest.fixture
def vllm_server(small_model, tmp_path):
    pytest.importorskip("vllm")
    import requests

    from llm_trainer.trainer.utils import free_port

    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "llm_trainer.cli", "vllm-serve", "--model", small_model, "--port", str(port),
         "--host", "127.0.0.1", "--gpu_memory_utilization", "0.25", "--max_model_len", "512"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    try:
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                if requests.get(f"{url}/health/", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "vllm-serve did not come up in 10 minutes"
            time.sleep(2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_grpo_vllm_server(small_model, tmp_path, vllm_server):
    import requests

    version_before = requests.get(f"{vllm_server}/health/", timeout=10).json().get("model_version")
    trainer = _train(small_model, str(tmp_path / "server"), vllm_mode="server", vllm_server_base_url=vllm_server)
    _check(trainer)
    version_after = requests.get(f"{vllm_server}/health/", timeout=10).json().get("model_version")
    assert version_after is not None and version_after != version_before  # the trainer's weights were synced
