"""`DistillationConfig`: the fields of TRL 1.16's `DistillationConfig`, same names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base_config import BaseConfig, check_number, resolve_pad_to_multiple_of
from .online_config import VLLM_MODES


@dataclass
class DistillationConfig(BaseConfig):
    """Configuration of `DistillationTrainer`: on-policy knowledge distillation (the student samples the
    completions, and learns to match the teacher's next-token distribution on them).

    Differences from `TrainingArguments` (besides `BaseConfig`'s): `learning_rate=1e-6` and
    `remove_unused_columns=False`.

    Teacher:
        teacher_model_name_or_path: teacher loaded when the trainer gets no `teacher_model`.
        teacher_model_revision: revision (branch, tag or commit) of a teacher loaded by name.
        teacher_model_init_kwargs: keyword arguments for `from_pretrained` when the teacher is loaded by name.
        disable_dropout: disable dropout in the student.

    Data and generation:
        max_completion_length: tokens sampled per completion (512).
        shuffle_dataset: shuffle the training prompts (True).
        pad_to_multiple_of: pad prompts and completions to a multiple of this; `"auto"` means 128 on Neuron,
            none elsewhere.
        temperature: sampling temperature, also applied to both models' logits in the loss (1.0).
        top_p, top_k, min_p, repetition_penalty, generation_kwargs, cache_implementation: sampling settings, as in
            `GRPOConfig` (`generation_kwargs` override the others).
        chat_template_kwargs: extra keyword arguments for `apply_chat_template` on conversational prompts.
        ds3_gather_for_generation: gather ZeRO-3 weights for generation (True).
        use_vllm, vllm_*: generate with vLLM, as in `GRPOConfig` (`vllm_mode` "colocate" or "server").

    Loss:
        beta: interpolation of the generalized JSD: 0.0 = forward KL(teacher || student), 0.5 = JSD, 1.0 = reverse
            KL(student || teacher) (default). It selects the divergence; there is no reference-model penalty.
        max_tool_calling_iterations: accepted for TRL compatibility; tool calling is not supported yet.

    Logging:
        log_completions, num_completions_to_print, log_unique_prompts: print and save a sample of the
            (prompt, completion) pairs every `logging_steps`.
    """

    _VALID_DICT_FIELDS = BaseConfig._VALID_DICT_FIELDS + [
        "teacher_model_init_kwargs",
        "generation_kwargs",
        "chat_template_kwargs",
    ]

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial learning rate for AdamW."})

    # Teacher
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher loaded when the trainer is given no `teacher_model`."}
    )
    teacher_model_revision: str | None = field(
        default=None, metadata={"help": "Revision (branch, tag or commit) of a teacher loaded by name."}
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments for `from_pretrained` when loading the teacher by name."}
    )
    disable_dropout: bool = field(default=False, metadata={"help": "Disable dropout in the student."})

    # Data
    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "Drop dataset columns other than 'prompt'; the trainer reads raw prompts."}
    )
    max_completion_length: int | None = field(
        default=512, metadata={"help": "Maximum number of tokens sampled per completion."}
    )
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={"help": "Gather DeepSpeed ZeRO-3 weights for generation (faster; needs the full model in memory)."},
    )
    shuffle_dataset: bool | None = field(default=True, metadata={"help": "Shuffle the training prompts."})
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={"help": "Pad prompts and completions to a multiple of this; 'auto' = 128 on Neuron, else none."},
    )

    # Generation
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature, also applied to both models' logits in the loss."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus-sampling probability mass."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling; 0 disables it."})
    min_p: float | None = field(
        default=None, metadata={"help": "Minimum token probability, relative to the most likely token's."}
    )
    generation_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra `GenerationConfig` / vLLM `SamplingParams` fields; they override the others."},
    )
    chat_template_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Extra keyword arguments for `apply_chat_template`."}
    )
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "Penalty on tokens already in the prompt or completion (> 1 discourages)."}
    )
    cache_implementation: str | None = field(
        default=None, metadata={"help": "KV-cache implementation for `transformers` generation."}
    )

    # vLLM
    use_vllm: bool = field(default=False, metadata={"help": "Generate the completions with vLLM."})
    vllm_mode: str = field(default="colocate", metadata={"help": "'colocate' or 'server'."})
    vllm_model_impl: str = field(
        default="vllm", metadata={"help": "vLLM model implementation: 'vllm' or 'transformers'."}
    )
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "Offload the colocated vLLM weights during the optimizer step."}
    )
    vllm_structured_outputs_regex: str | None = field(
        default=None, metadata={"help": "Regex constraining vLLM's outputs."}
    )
    vllm_server_base_url: str | None = field(
        default=None, metadata={"help": "Base URL of the vLLM server; overrides host and port."}
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Host of the vLLM server."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Port of the vLLM server."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "Seconds to wait for the vLLM server."})
    vllm_group_port: int = field(default=51216, metadata={"help": "Port of the weight-update (NCCL) group."})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "GPU memory fraction of the colocated vLLM engine."}
    )
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "Maximum sequence length of the colocated vLLM engine."}
    )
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "Tensor-parallel size of the colocated vLLM engine."}
    )

    # Loss
    beta: float = field(
        default=1.0,
        metadata={"help": "Generalized JSD interpolation: 0.0 = forward KL, 0.5 = JSD, 1.0 = reverse KL."},
    )
    max_tool_calling_iterations: int | None = field(
        default=None, metadata={"help": "Maximum tool-calling turns (tools are not supported yet)."}
    )

    # Logging
    log_completions: bool = field(
        default=False, metadata={"help": "Print and save a sample of (prompt, completion) pairs at each log."}
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "Completions printed at each log; None prints them all."}
    )
    log_unique_prompts: bool = field(
        default=False, metadata={"help": "Log each prompt once in the wandb / trackio completions table."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of, self.device.type)
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(
                f"beta must be in [0.0, 1.0] (0 = forward KL, 0.5 = JSD, 1 = reverse KL), got {self.beta}."
            )
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be positive (it also scales the loss's logits), got {self.temperature}."
            )
        check_number(self, "max_completion_length", 1, "It is the number of tokens sampled per completion.")
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(f"`vllm_mode` must be one of {VLLM_MODES}, got {self.vllm_mode!r}.")
        pc = self.parallelism_config
        if pc is not None and (pc.cp_enabled or pc.sp_enabled):
            raise ValueError(
                "DistillationTrainer does not support context or sequence parallelism: its inputs are built from the "
                "generated completions, which cannot be sharded along the sequence. Set `cp_size=1` and `sp_size=1` "
                "in `parallelism_config`, or drop it."
            )

    @property
    def steps_per_generation(self) -> int:
        """Micro-batches cut from one generation batch: one generation per optimizer step."""
        return self.gradient_accumulation_steps
