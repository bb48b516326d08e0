"""Asynchronous GRPO on a CPU in a couple of minutes: `python examples/async_grpo.py`.

Starts its own generation server (`llm-trainer vllm-serve --backend transformers`, a separate process on a free
port), then trains a tiny random model with `AsyncGRPOTrainer`: a rollout worker thread keeps the server generating
while the trainer trains on completions at most `max_staleness=1` weight versions old, and the new weights go to
the server after every optimizer step. The task is countable, so progress is visible: the reward is the fraction of
a completion's characters that are the letter "e" (about 0.1 for the random model). The server is stopped at the end.

For a real run, start the server yourself on the GPUs that generate
(`llm-trainer vllm-serve --model Qwen/Qwen2.5-0.5B-Instruct`, vLLM back end), point `vllm_server_base_url` at it
(a list of URLs for several servers), and use a real dataset and reward.
"""

import os
import subprocess
import sys

from datasets import Dataset

from llm_trainer.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer
from llm_trainer.generation import GenerationClient
from llm_trainer.testing import make_tiny_model
from llm_trainer.trainer.utils import free_port


def letter_e(completions: list[str], **kwargs) -> list[float]:
    """The fraction of each completion's characters that are "e"."""
    return [text.count("e") / max(len(text), 1) for text in completions]


model_path = make_tiny_model(hidden_size=64, num_hidden_layers=2)
port = free_port()
server = subprocess.Popen(
    [sys.executable, "-m", "llm_trainer.cli", "vllm-serve", "--backend", "transformers", "--model", model_path]
    + ["--host", "127.0.0.1", "--port", str(port), "--log_level", "warning"],
    env={**os.environ, "OMP_NUM_THREADS": "1"},  # one CPU thread for generation, the rest for training
)
url = f"http://127.0.0.1:{port}"
try:
    GenerationClient(url, connection_timeout=120)  # wait until it answers /health/
    args = AsyncGRPOConfig(
        output_dir="outputs/async-grpo-tiny",
        vllm_server_base_url=url,
        max_steps=30,
        per_device_train_batch_size=16,  # samples per optimizer step: 2 prompts x 8 completions
        num_generations=8,
        max_completion_length=32,
        max_staleness=1,  # train on samples at most one optimizer step old; older ones are dropped (counted)
        queue_maxsize=16,  # one step's samples wait in the pool while the next are generated: no work runs ahead
        weight_sync_mode="batch-async",  # generation waits only while the served weights lag too far
        learning_rate=5e-3,
        gradient_checkpointing=False,
        bf16=False,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
    )
    prompts = Dataset.from_dict({"prompt": [f"Question {i}: write a sentence." for i in range(64)]})
    trainer = AsyncGRPOTrainer(model=model_path, reward_funcs=letter_e, args=args, train_dataset=prompts)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    print(
        f"reward {logs[0]['reward']:.3f} at step 1 -> {logs[-1]['reward']:.3f} at step {trainer.state.global_step}; "
        f"trained on samples at most {max(entry['staleness/max'] for entry in logs):g} version old"
    )
finally:
    server.terminate()
    server.wait(timeout=30)
