"""`llm-trainer train-serve`: host one model behind the remote training API (`llm_trainer.remote`).

    llm-trainer train-serve --model path/to/model --port 8100                 # full fine-tuning
    llm-trainer train-serve --model path/to/model --lora_rank 16 --port 8100  # LoRA adapters only
    llm-trainer train-serve --config serve.yaml                                # any flag as a YAML key

Clients connect with `llm_trainer.remote.ServiceClient("http://host:8100")`; the server itself is
`llm_trainer.remote.service`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .utils import TrlParser


@dataclass
class ScriptArguments:
    """The flags of `llm-trainer train-serve`."""

    model: str = field(metadata={"help": "Model name or local folder: the base model clients train."})
    lora_rank: int | None = field(
        default=None,
        metadata={"help": "Serve LoRA adapters of this rank only; unset lets each client choose full FT or a rank."},
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 x the rank)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8100, metadata={"help": "Port to listen on."})
    dtype: str = field(
        default="float32", metadata={"help": "Weights' dtype: 'float32', 'bfloat16', 'float16' or 'auto'."}
    )
    state_dir: str | None = field(
        default=None, metadata={"help": "Folder save_state writes to (default: a new temporary folder)."}
    )
    max_sampler_snapshots: int = field(
        default=8, metadata={"help": "save_weights_for_sampler snapshots kept in memory (the oldest is evicted)."}
    )
    micro_batch_size: int | None = field(
        default=None, metadata={"help": "Data per forward pass (a request runs in chunks of this many; default: all)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model repository's own code."})
    log_level: str = field(
        default="info",
        metadata={"help": "Log level.", "choices": ["critical", "error", "warning", "info", "debug"]},
    )


def main(script_args: ScriptArguments) -> None:
    """Serve `script_args.model` until interrupted."""
    from ..remote.service import serve

    if script_args.lora_rank is not None and script_args.lora_rank < 1:
        raise SystemExit(
            f"llm-trainer train-serve: --lora_rank must be a positive integer, got {script_args.lora_rank}."
        )
    if script_args.micro_batch_size is not None and script_args.micro_batch_size < 1:
        raise SystemExit("llm-trainer train-serve: --micro_batch_size must be at least 1.")
    if script_args.max_sampler_snapshots < 1:
        raise SystemExit("llm-trainer train-serve: --max_sampler_snapshots must be at least 1.")
    serve(
        script_args.model,
        host=script_args.host,
        port=script_args.port,
        log_level=script_args.log_level,
        lora_rank=script_args.lora_rank,
        lora_alpha=script_args.lora_alpha,
        dtype=script_args.dtype,
        state_dir=script_args.state_dir,
        trust_remote_code=script_args.trust_remote_code,
        max_sampler_snapshots=script_args.max_sampler_snapshots,
        micro_batch_size=script_args.micro_batch_size,
    )


def cli(argv: list[str]) -> None:
    """`llm-trainer train-serve ARGS`: parse flags and `--config`, then call `main`."""
    parser = TrlParser(ScriptArguments, prog="llm-trainer train-serve")
    try:
        script_args, extra = parser.parse_args_and_config(argv, return_remaining_strings=True)
    except (OSError, ValueError) as error:  # the --config file
        parser.error(str(error))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)} (`llm-trainer train-serve --help` lists the flags)")
    main(script_args)


if __name__ == "__main__":
    cli(sys.argv[1:])
