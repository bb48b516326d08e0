"""GRPO with a multi-turn environment: guess-the-number, answered "Higher." or "Lower." after every guess.

Each game's secret comes from the dataset's `secret` column (drawn with a seeded RNG), so the generations of one
prompt all play the same game. A win in `n` guesses scores `1 - 0.05 n`; a loss `-0.05 n`. Offline, on a tiny
random model built on the fly, in well under a minute:

    python examples/env_guess_number.py --max_steps 5

With a real model: `python examples/env_guess_number.py --model Qwen/Qwen2.5-0.5B-Instruct --max_steps 200`.
"""

from __future__ import annotations

import argparse
import functools
import random
import tempfile

from datasets import Dataset

from llm_trainer import GRPOConfig, GRPOTrainer
from llm_trainer.environments import EnvironmentRollout, GuessTheNumberEnvironment, environment_reward

LOW, HIGH, MAX_GUESSES = 1, 20, 4


def games(size: int = 64, seed: int = 0) -> Dataset:
    """`size` numbered games, each with its secret number."""
    rng = random.Random(seed)
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"Game {i}: guess my number. Reply with one number per turn."}],
                "secret": rng.randint(LOW, HIGH),
            }
            for i in range(size)
        ]
    )


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
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="env-guess-"),
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=192,  # the budget of the whole game: every guess and every answer
        generation_kwargs={"max_new_tokens": 8},  # a guess is short: cap each turn
        learning_rate=1e-5,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
    )
    environment = functools.partial(GuessTheNumberEnvironment, low=LOW, high=HIGH, max_guesses=MAX_GUESSES)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=environment_reward,
        args=config,
        train_dataset=games(),
        rollout_func=EnvironmentRollout(environment, max_turns=MAX_GUESSES),
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
