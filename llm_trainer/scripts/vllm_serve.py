"""`llm-trainer vllm-serve` (TRL's `trl vllm-serve`): its arguments, YAML `--config` support, and the entry point.

    llm-trainer vllm-serve --model Qwen/Qwen2.5-0.5B --tensor_parallel_size 2 --port 8000
    llm-trainer vllm-serve --model path/to/model --backend transformers      # no vLLM, CPU or GPU
    llm-trainer vllm-serve --config serve.yaml                                # any flag as a YAML key

The server itself is `llm_trainer.generation.server`; it answers both TRL's `VLLMClient` (vLLM's OpenAI-style routes)
and the trainers' server mode, including the asynchronous trainers' versioned weight updates (`?version=N`, bucketed),
LoRA adapter-only updates (`/update_lora_adapter/`) and `/health/` heartbeats that report the served model version. Unlike `trl vllm-serve`, which hands its flags on to `vllm serve`, this runs our own
server, so flags it does not know are an error instead of being forwarded.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from dataclasses import dataclass, field

from .utils import TrlParser


@dataclass
class ScriptArguments:
    """The flags of `llm-trainer vllm-serve`: TRL's, plus `backend`."""

    model: str = field(metadata={"help": "Model name or local folder (the policy's starting checkpoint)."})
    revision: str | None = field(default=None, metadata={"help": "Model revision (branch, tag or commit)."})
    backend: str = field(
        default="vllm",
        metadata={
            "help": "Generation engine: 'vllm', or 'transformers' (no vLLM needed).",
            "choices": ["vllm", "transformers"],
        },
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor-parallel GPUs."})
    data_parallel_size: int = field(default=1, metadata={"help": "vLLM data-parallel replicas (MoE models)."})
    host: str = field(default="0.0.0.0", metadata={"help": "Address to listen on."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "Share of GPU memory vLLM may use."})
    dtype: str = field(default="auto", metadata={"help": "'auto', 'float32', 'bfloat16' or 'float16'."})
    max_model_len: int | None = field(default=None, metadata={"help": "vLLM context length (prompt + completion)."})
    enable_prefix_caching: bool | None = field(default=None, metadata={"help": "vLLM prefix caching."})
    enforce_eager: bool | None = field(default=False, metadata={"help": "vLLM: no CUDA graphs, eager only."})
    kv_cache_dtype: str = field(default="auto", metadata={"help": "vLLM KV-cache dtype ('auto': the model's)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model repository's own code."})
    log_level: str = field(
        default="info",
        metadata={"help": "Log level.", "choices": ["critical", "error", "warning", "info", "debug", "trace"]},
    )
    vllm_model_impl: str = field(
        default="vllm", metadata={"help": "vLLM model implementation: 'vllm' or 'transformers'."}
    )
    distributed_executor_backend: str | None = field(
        default=None, metadata={"help": "vLLM executor: 'ray' for tensor parallelism across nodes."}
    )
    speculative_config: str | None = field(
        default=None, metadata={"help": "vLLM speculative decoding config, as a JSON string."}
    )
    enable_lora: bool = field(
        default=False,
        metadata={
            "help": "vLLM: accept LoRA adapter-only updates (POST /update_lora_adapter/). The transformers back end "
            "always accepts them."
        },
    )
    max_lora_rank: int = field(default=16, metadata={"help": "vLLM: the largest LoRA rank r an adapter may have."})


# Fields only the vLLM engine reads, with their defaults (a non-default value given to the transformers engine warns).
_VLLM_ENGINE_ARGS = {
    "data_parallel_size": 1,
    "enforce_eager": False,
    "kv_cache_dtype": "auto",
    "vllm_model_impl": "vllm",
    "distributed_executor_backend": None,
    "speculative_config": None,
    "enable_lora": False,
    "max_lora_rank": 16,
}


def build_command(script_args: ScriptArguments, extra_args: list[str] | None = None) -> list[str]:
    """The command line, starting with the Python executable, that serves `script_args` in a new process.

    TRL's `build_command` translates its flags into a `vllm serve` command line; this server is ours, so the command
    runs `python -m llm_trainer.scripts.vllm_serve` with the fields that differ from their defaults (None values keep
    the default), followed by `extra_args`.
    """
    command = [sys.executable, "-m", __name__]
    for spec in dataclasses.fields(script_args):
        value = getattr(script_args, spec.name)
        if value is None or (spec.default is not dataclasses.MISSING and value == spec.default):
            continue
        command += [f"--{spec.name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return command + list(extra_args or [])


def main(script_args: ScriptArguments, extra_args: list[str] | None = None) -> None:
    """Serve `script_args.model` until interrupted."""
    import json

    from ..generation.server import serve

    if extra_args:
        raise SystemExit(
            f"llm-trainer vllm-serve: unrecognized arguments: {' '.join(extra_args)} (`trl vllm-serve` forwards "
            "unknown flags to `vllm serve`; llm-trainer runs its own server: `llm-trainer vllm-serve --help` lists "
            "its flags)."
        )
    engine_args = {name: getattr(script_args, name) for name in _VLLM_ENGINE_ARGS}
    if script_args.backend == "transformers":
        ignored = [name for name, default in _VLLM_ENGINE_ARGS.items() if engine_args[name] != default]
        if ignored:
            warnings.warn(f"The transformers back end ignores the vLLM options {ignored}.", stacklevel=2)
        engine_args = {}
    else:
        engine_args = {name: value for name, value in engine_args.items() if value != _VLLM_ENGINE_ARGS[name]}
        if "vllm_model_impl" in engine_args:
            engine_args["model_impl"] = engine_args.pop("vllm_model_impl")
        if "speculative_config" in engine_args:
            engine_args["speculative_config"] = json.loads(engine_args["speculative_config"])
    serve(
        script_args.model,
        backend=script_args.backend,
        host=script_args.host,
        port=script_args.port,
        tensor_parallel_size=script_args.tensor_parallel_size,
        gpu_memory_utilization=script_args.gpu_memory_utilization,
        dtype=script_args.dtype,
        max_model_len=script_args.max_model_len,
        revision=script_args.revision,
        trust_remote_code=script_args.trust_remote_code,
        enable_prefix_caching=script_args.enable_prefix_caching,
        log_level="debug" if script_args.log_level == "trace" else script_args.log_level,
        engine_args=engine_args,
    )


DESCRIPTION = "Serve a model for server-mode and asynchronous generation (the trainers' vLLM server mode)."
EPILOG = """endpoints:
  GET  /health/                      status, model_version, lora_adapter, requests_in_flight (heartbeats)
  POST /generate/                    token-id prompts -> completions, log-probs, model_version
  POST /v1/completions               OpenAI/vLLM completions with per-token log-probs (+ model_version)
  POST /v1/chat/completions          OpenAI/vLLM chat completions with per-token log-probs (+ model_version)
  GET  /v1/models, /get_world_size/, /server_info/
  POST /update_weights/?version=N    safetensors body; bucketed: &chunk=i&final=0 stages, the final chunk loads all
  POST /update_lora_adapter/?version=N
                                     LoRA adapter tensors (safetensors) + X-LoRA-Config JSON header; no merge
  POST /reset_prefix_cache/

A generation request holds the engine for its whole duration: one that is in flight during a weight update finishes
on the old weights and its reply names that version. Client: llm_trainer.generation.GenerationClient."""


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None) -> TrlParser:
    """The `vllm-serve` parser: standalone (`prog`), or added to `subparsers` of a TRL-style CLI."""
    text = {"description": DESCRIPTION, "epilog": EPILOG, "formatter_class": argparse.RawDescriptionHelpFormatter}
    if subparsers is not None:
        return subparsers.add_parser(
            "vllm-serve", help="Serve a model for server-mode generation", dataclass_types=ScriptArguments, **text
        )
    return TrlParser(ScriptArguments, prog=prog, **text)


def cli(argv: list[str]) -> None:
    """`llm-trainer vllm-serve ARGS`: parse flags and `--config`, then call `main`."""
    parser = make_parser(prog="llm-trainer vllm-serve")
    try:
        script_args, extra_args = parser.parse_args_and_config(argv, return_remaining_strings=True)
    except (OSError, ValueError) as error:  # the --config file
        parser.error(str(error))
    main(script_args, extra_args)


if __name__ == "__main__":
    cli(sys.argv[1:])
