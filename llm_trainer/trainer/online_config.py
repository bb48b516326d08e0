"""Fields shared by the online RL configs (`GRPOConfig`, `RLOOConfig`): sampling, vLLM, rewards, logging."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from .base_config import BaseConfig, check_number, resolve_pad_to_multiple_of

VLLM_MODES = ("colocate", "server")


@dataclass
class OnlineRLConfig(BaseConfig):
    """What every trainer that samples its own completions shares (TRL 1.16's GRPO/RLOO common fields).

    Each optimizer step consumes `steps_per_generation` micro-batches from one generation batch of
    `generation_batch_size` completions; give at most one of the two (the default is one generation per optimizer
    step, `steps_per_generation = gradient_accumulation_steps`). The generation batch must hold whole groups of
    `num_generations` completions per prompt. Subclasses set `_algorithm`, the name used in error messages.
    """

    _algorithm: ClassVar[str] = "Online RL"
    _VALID_DICT_FIELDS = BaseConfig._VALID_DICT_FIELDS + [
        "generation_kwargs",
        "chat_template_kwargs",
        "transformers_continuous_batching_config",
    ]

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial learning rate for AdamW."})
    remove_unused_columns: bool | None = field(
        default=False,
        metadata={
            "help": "Drop dataset columns other than 'prompt'. Keep False when a reward function reads extra columns."
        },
    )

    # Model
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of the MoE load-balancing loss; None uses the model config's own coefficient."},
    )
    disable_dropout: bool = field(
        default=False,
        metadata={"help": "Disable dropout, so the policy and reference score the same tokens deterministically."},
    )

    # Data and sampling
    num_generations: int | None = field(
        default=8,
        metadata={"help": "Completions sampled per prompt (at least 2); the generation batch must be a multiple."},
    )
    num_generations_eval: int | None = field(
        default=None,
        metadata={"help": "Completions per prompt during evaluation; None uses `num_generations`."},
    )
    max_completion_length: int | None = field(
        default=512, metadata={"help": "Maximum number of tokens generated per completion."}
    )
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={
            "help": "Under DeepSpeed ZeRO-3, gather the full weights for generation (faster). False lets models "
            "larger than one GPU train, generating slowly; it does not work with vLLM."
        },
    )
    shuffle_dataset: bool | None = field(default=True, metadata={"help": "Shuffle the training prompts."})
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={
            "help": "Pad prompt and completion ids to a multiple of this value; 'auto' means 128 on Neuron and no "
            "padding elsewhere."
        },
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Completions generated at once, across processes. None: per_device_train_batch_size x "
            "num_processes x steps_per_generation. Exclusive with `steps_per_generation`."
        },
    )
    steps_per_generation: int | None = field(
        default=None,
        metadata={
            "help": "Micro-batches taken from each generation batch. None: `gradient_accumulation_steps`. Exclusive "
            "with `generation_batch_size`."
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; higher is more random."})
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling: keep the smallest token set of this total probability."}
    )
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens; 0 disables top-k."})
    min_p: float | None = field(
        default=None,
        metadata={"help": "Drop tokens below this fraction of the top token's probability (typically 0.01-0.2)."},
    )
    generation_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Extra `GenerationConfig` (or vLLM `SamplingParams`) arguments; they override the sampling "
            "fields above."
        },
    )
    chat_template_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Extra keyword arguments for `apply_chat_template` on the prompts."}
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata={"help": "Penalty on tokens already in the prompt or completion; >1 discourages repeats."},
    )
    cache_implementation: str | None = field(
        default=None, metadata={"help": "KV-cache implementation for `generate` (without vLLM)."}
    )

    # vLLM
    use_vllm: bool = field(
        default=False,
        metadata={"help": 'Generate with vLLM instead of `generate` (`pip install "llm-trainer[vllm]"`).'},
    )
    vllm_mode: str = field(
        default="colocate",
        metadata={
            "help": "'colocate': vLLM runs in the training processes and shares their GPUs; 'server': requests go to "
            "a separate `llm-trainer vllm-serve` process.",
            "choices": list(VLLM_MODES),
        },
    )
    vllm_model_impl: str = field(
        default="vllm", metadata={"help": "vLLM model implementation: 'vllm' (native) or 'transformers'."}
    )
    vllm_enable_sleep_mode: bool = field(
        default=False,
        metadata={"help": "Offload vLLM weights and cache during the optimizer step: less memory, slower wake-up."},
    )
    vllm_structured_outputs_regex: str | None = field(
        default=None, metadata={"help": "Constrain vLLM generations to this regex; None leaves them free."}
    )
    vllm_server_base_url: str | None = field(
        default=None,
        metadata={"help": "vLLM server URL, e.g. 'http://localhost:8000'; overrides host and port (server mode)."},
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "vLLM server host (server mode)."})
    vllm_server_port: int = field(default=8000, metadata={"help": "vLLM server port (server mode)."})
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "Seconds to wait for the vLLM server before raising `ConnectionError`."}
    )
    vllm_group_port: int = field(
        default=51216, metadata={"help": "Port of the weight-sync group with the vLLM server (server mode)."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={"help": "Fraction of GPU memory vLLM may take (colocate mode; pass it to the server otherwise)."},
    )
    vllm_max_model_length: int | None = field(
        default=None,
        metadata={
            "help": "vLLM context window: at least the longest prompt plus `max_completion_length`. None reads it "
            "from the model config."
        },
    )
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "vLLM tensor-parallel size (colocate mode; pass it to the server otherwise)."}
    )

    # Optimization
    beta: float = field(
        default=0.0,
        metadata={"help": "KL coefficient against the reference model; 0 loads no reference model."},
    )
    num_iterations: int = field(
        default=1, metadata={"help": "Optimization passes over each generation batch (μ in the GRPO paper)."}
    )
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping bound ε of the importance ratio."})
    epsilon_high: float | None = field(
        default=None,
        metadata={"help": "Upper clipping bound; None uses `epsilon`. DAPO recommends 0.28."},
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per reward function; None weighs every reward 1.0."},
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata={"help": "Leave completions cut off at `max_completion_length` out of the loss (DAPO)."},
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={"help": "Move the reference model towards the policy every `ref_model_sync_steps` (TR-DPO)."},
    )
    ref_model_mixup_alpha: float = field(
        default=0.6,
        metadata={"help": "TR-DPO α in π_ref ← α·π_θ + (1 − α)·π_ref; used with `sync_ref_model=True`."},
    )
    ref_model_sync_steps: int = field(
        default=512,
        metadata={"help": "TR-DPO τ: steps between reference syncs; used with `sync_ref_model=True`."},
    )

    # Logging
    log_completions: bool = field(
        default=False,
        metadata={"help": "Log a sample of prompts and completions every `logging_steps` (printed with rich, wandb)."},
    )
    log_multimodal: bool = field(
        default=True, metadata={"help": "Log images and other media along with the completions."}
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "Completions printed with rich; None prints all."}
    )
    log_unique_prompts: bool = field(default=False, metadata={"help": "Log each distinct prompt once."})

    # transformers continuous batching
    use_transformers_continuous_batching: bool = field(
        default=False,
        metadata={"help": "Generate with transformers' continuous-batching engine (transformers>=5.8)."},
    )
    transformers_continuous_batching_config: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments for `transformers.generation.ContinuousBatchingConfig`."}
    )

    # Deprecated
    use_transformers_paged: bool = field(
        default=False, metadata={"help": "Deprecated; use `use_transformers_continuous_batching`."}
    )

    def __post_init__(self):
        super().__post_init__()
        check_number(
            self,
            "temperature",
            0,
            "It divides the logits when sampling and when scoring the completions; use 1.0 (the default), or lower "
            "it towards (not to) 0 for less random samples.",
            exclusive=True,
        )
        check_number(self, "max_completion_length", 1, "It is the number of tokens generated per completion.")
        check_number(self, "num_iterations", 1, "It is the number of passes over each generation batch: use 1.")
        check_number(
            self,
            "beta",
            0,
            "It weighs the KL penalty towards the reference model: a negative value rewards drifting away from it. "
            "Use 0 (no penalty) or a small positive value such as 0.04.",
        )
        for name in ("epsilon", "epsilon_high"):
            check_number(self, name, 0, "It is the clipping range of the importance ratio, e.g. 0.2 (or 0.28 high).")
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of, self.device.type)
        if self.use_transformers_paged:
            warnings.warn(
                "`use_transformers_paged` is deprecated; use `use_transformers_continuous_batching=True`.",
                FutureWarning,
                stacklevel=3,
            )
            self.use_transformers_continuous_batching = True
        self._check_parallelism()
        self._resolve_generation_batch()
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(f"`vllm_mode` must be one of {VLLM_MODES}, got {self.vllm_mode!r}.")

    def _check_parallelism(self) -> None:
        pc = self.parallelism_config
        if pc is not None and (pc.cp_enabled or pc.sp_enabled):
            raise ValueError(
                f"{self._algorithm} does not support context or sequence parallelism: its inputs are built from the "
                "generated completions, which cannot be sharded along the sequence. Set `cp_size=1` and `sp_size=1` "
                "in `parallelism_config`, or drop it."
            )
        if self.auto_find_batch_size:
            raise ValueError(
                f"auto_find_batch_size is not supported by {self._algorithm} (`auto_find_batch_size=True`): "
                "shrinking the batch on out-of-memory would split the groups of `num_generations` completions per prompt. Set it to False "
                "and lower `per_device_train_batch_size` instead."
            )

    def _resolve_generation_batch(self) -> None:
        """Fill whichever of `generation_batch_size` / `steps_per_generation` is unset, and check the grouping."""
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ValueError(
                f"{self._algorithm} requires at least 2 generations per prompt to compare completions; got "
                f"`num_generations={self.num_generations}`. Set `num_generations` to 2 or more."
            )
        global_batch = self.per_device_train_batch_size * self.world_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                "`generation_batch_size` and `steps_per_generation` can not be both configured at the same time: "
                "they set the same thing; give only one of them "
                f"(got {self.generation_batch_size} and {self.steps_per_generation})."
            )
        if self.generation_batch_size is not None:
            if self.generation_batch_size % global_batch != 0:
                raise ValueError(
                    f"generation_batch_size ({self.generation_batch_size}) must be divisible by the global batch "
                    f"size, per_device_train_batch_size x world_size ({global_batch})."
                )
            self.steps_per_generation = self.generation_batch_size // global_batch
        else:
            if self.steps_per_generation is None:
                self.steps_per_generation = self.gradient_accumulation_steps
            self.generation_batch_size = global_batch * self.steps_per_generation

        if self.do_eval and self.eval_strategy != "no":
            eval_generations = self.num_generations_eval or self.num_generations
            eval_batch = self.per_device_eval_batch_size * self.world_size
            if eval_batch % eval_generations != 0:
                raise ValueError(
                    f"The global eval batch size ({self.per_device_eval_batch_size} x {self.world_size} processes) "
                    f"must be a multiple of the completions per prompt used in evaluation ({eval_generations}). "
                    "Change `per_device_eval_batch_size` or `num_generations_eval`."
                )
        if self.generation_batch_size % self.num_generations != 0:
            raise ValueError(
                f"generation_batch_size ({self.generation_batch_size}) must be divisible by num_generations "
                f"({self.num_generations}) so that every prompt's completions land in the same batch. Adjust "
                "`per_device_train_batch_size`, `steps_per_generation` or `generation_batch_size`."
            )
