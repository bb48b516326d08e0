"""Training through a remote training service, on a CPU in about a minute: `python examples/remote_training.py`.

Starts `llm-trainer train-serve` on a tiny random model (a separate process on a free port: the service owns the
weights, gradients and optimizer), then drives it from this process with the `llm_trainer.remote` client:

1. by hand: `Datum`s with per-token weights, `forward_backward(..., "cross_entropy")` and `optim_step` (each returns
   a future), then a snapshot of the trained weights and samples from it;
2. with `RemoteApiGrpoTrainer`: rollout workers sample the newest snapshot, score the completions, and the trainer
   turns each batch of groups into `importance_sampling` data for `forward_backward`, then `optim_step`.

The service is stopped at the end. For a real run, start `llm-trainer train-serve --model <name> --lora_rank 16
--host 0.0.0.0` on the GPU machine and point `ServiceClient` at it.
"""

import subprocess
import sys
import time

from datasets import Dataset

from llm_trainer.remote import (
    AdamParams,
    Datum,
    ModelInput,
    RemoteApiGrpoTrainer,
    SamplingParams,
    ServiceClient,
)
from llm_trainer.testing import make_tiny_model
from llm_trainer.trainer.utils import free_port


def letter_e(completions: list[str], **kwargs) -> list[float]:
    """The fraction of each completion's characters that are "e"."""
    return [text.count("e") / max(len(text), 1) for text in completions]


def wait_until_up(service: ServiceClient, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"llm-trainer train-serve exited with status {process.returncode}")
        try:
            service.health()
            return
        except (ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


model_path = make_tiny_model(hidden_size=64, num_hidden_layers=2)
port = free_port()
server = subprocess.Popen(
    [sys.executable, "-m", "llm_trainer.cli", "train-serve", "--model", model_path]
    + ["--host", "127.0.0.1", "--port", str(port), "--log_level", "warning"]
)
try:
    service = ServiceClient(f"http://127.0.0.1:{port}")
    wait_until_up(service, server)

    # 1. By hand: teach the model one sentence (cross-entropy on the completion tokens only).
    training = service.create_training_client(model_path)  # full fine-tuning; create_lora_training_client for LoRA
    tokenizer = training.get_tokenizer()
    prompt = tokenizer("Question: what does the fox do?", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" The quick brown fox jumps.", add_special_tokens=False)["input_ids"]
    tokens = prompt + answer
    # model_input reads tokens[:-1]; target t is tokens[t + 1]; weight 1 on the answer's tokens, 0 on the prompt's
    weights = [0.0] * (len(prompt) - 1) + [1.0 / len(answer)] * len(answer)
    datum = Datum(ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": weights})
    for step in range(20):
        backward = training.forward_backward([datum], "cross_entropy")  # a future: the call runs in the background
        stepped = training.optim_step(AdamParams(learning_rate=1e-2))  # queued behind it, applied in order
        loss = backward.result().metrics["loss:sum"]
        stepped.result()
        if step in (0, 19):
            print(f"step {step + 1}: cross-entropy {loss:.3f}")
    sampler = training.save_weights_and_get_sampling_client("after-sft")
    sample = sampler.sample(ModelInput.from_ints(prompt), 1, SamplingParams(max_tokens=8, temperature=0.0)).result()
    print("greedy answer:", repr(tokenizer.decode(sample.sequences[0].tokens)))
    training.close()

    # 2. GRPO through the service: a fresh session (the previous one is replaced), rollouts sampled from snapshots.
    training = service.create_training_client(model_path)
    trainer = RemoteApiGrpoTrainer(
        training,
        num_generations=8,
        batch_size=16,
        max_steps=25,
        adam_params=AdamParams(learning_rate=5e-3),
    )
    prompts = Dataset.from_dict({"prompt": [f"Question {i}: write a sentence." for i in range(32)]})
    trainer.attach_rollouts(
        prompts,
        letter_e,
        tokenizer,
        SamplingParams(max_tokens=24),
        # on-policy: each step's samples come from the newest snapshot. The service both samples and trains here, so
        # overlapping them gains nothing; "batch-async" (with staleness_threshold / max_staleness) pays when the
        # samplers run elsewhere.
        weight_sync_mode="sync",
    )
    trainer.run()
    first, last = trainer.history[0], trainer.history[-1]
    print(
        f"GRPO: reward {first['reward']:.3f} at step 1 -> {last['reward']:.3f} at step {int(last['step'])}, "
        f"samples at most {max(entry['staleness/max'] for entry in trainer.history):g} versions old"
    )
    training.close()
finally:
    server.terminate()
    server.wait(timeout=30)
