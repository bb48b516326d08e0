"""GRPO with a single-turn environment: arithmetic questions graded by `MathAnswerEnvironment`.

The environment reads each row's `answer` column, and rewards 1.0 when the last number of the reply matches it.
Offline, on a tiny random model built on the fly, in well under a minute:

    python examples/env_math.py --max_steps 5

With a real model: `python examples/env_math.py --model Qwen/Qwen2.5-0.5B-Instruct --max_steps 200`.
"""

from __future__ import annotations

import argparse
import random
import tempfile

from datasets import Dataset

from llm_trainer import GRPOConfig, GRPOTrainer
from llm_trainer.environments import EnvironmentRollout, MathAnswerEnvironment, environment_reward


def arithmetic_dataset(size: int = 64, seed: int = 0) -> Dataset:
    """`size` questions "What is a plus b?" (digits 0-9) with their `answer`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        question = f"What is {a} plus {b}? End your answer with the number."
        rows.append({"prompt": [{"role": "user", "content": question}], "answer": str(a + b)})
    return Dataset.from_list(rows)


def main(argv: list[str] | None = None) -> GRPOTrainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: a tiny random model)")
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--max_steps", type=int, default=5)
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        from llm_trainer.testing import make_tiny_model

        model = make_tiny_model(tempfile.mkdtemp(prefix="tiny-qwen2-"))

    config = GRPOConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="env-math-"),
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=32,
        learning_rate=1e-5,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=environment_reward,
        args=config,
        train_dataset=arithmetic_dataset(),
        rollout_func=EnvironmentRollout(MathAnswerEnvironment, max_turns=1),
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
