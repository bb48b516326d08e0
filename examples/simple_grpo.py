"""GRPO in five lines with `llm_trainer.train`, offline on a tiny random model: `python examples/simple_grpo.py`.

The `make_tiny_model` line only builds a tiny model and a prompt dataset; for a real run, pass a model name (e.g.
"Qwen/Qwen2.5-0.5B-Instruct") and a dataset name (e.g. "trl-lib/tldr") to `train` and drop the small settings.
Checkpoints go to `./outputs/<model name>`.
"""

from llm_trainer import train
from llm_trainer.testing import make_tiny_model, zen_dataset

model, dataset = make_tiny_model(), zen_dataset("standard_prompt_only")


def reward_fn(prompt: str, response: str) -> float:
    return -abs(len(response) - 20) / 20  # completions of about 20 characters score best


result = train(
    model, dataset, reward_fn, max_steps=5, batch_size=2, num_generations_per_prompt=4, max_sequence_length=16
)
print(f"reward after {result.total_steps} steps: {result.metrics['reward']:.3f}; checkpoint: {result.checkpoint_path}")
