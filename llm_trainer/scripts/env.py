"""TRL's `env` script (`trl.scripts.env`): print the versions a bug report needs. Same as `llm-trainer env`."""

from __future__ import annotations

__all__ = ["print_env"]


def print_env() -> None:
    """Print the platform and library versions (`llm_trainer.cli.env`), ready to paste into an issue."""
    from ..cli import env

    report = "\n".join(f"- {line}" for line in env().splitlines())
    print(f"\nCopy-paste the following information when reporting an issue:\n\n{report}\n")


if __name__ == "__main__":
    print_env()
