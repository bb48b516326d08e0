"""Fields shared by the configs of the trainers that sample completions (GRPO, RLOO, distillation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base_config import BaseConfig, check_choices, check_number, option, resolve_pad_to_multiple_of, shared

VLLM_MODES = ("colocate", "server")


@dataclass
class OnPolicyConfig(BaseConfig):
    """What every trainer that samples its own completions shares (`GRPOConfig`, `RLOOConfig`, `DistillationConfig`):
    sampling, vLLM and completion logging, with TRL 1.16's defaults. Subclasses set `_algorithm`, the name used in
    error messages."""

    _algorithm: ClassVar[str] = "Online RL"
    _inert_fields = {"vllm_group_port": "weights reach the vLLM server over HTTP here, not through an NCCL group."}
    _VALID_DICT_FIELDS = BaseConfig._VALID_DICT_FIELDS + ["generation_kwargs", "chat_template_kwargs"]

    learning_rate: float = shared("learning_rate", 1e-6)
    remove_unused_columns: bool | None = option(
        False, "Drop dataset columns other than 'prompt'. Keep False when a reward function reads extra columns."
    )
    disable_dropout: bool = shared("disable_dropout", False)

    # Data and sampling
    max_completion_length: int | None = option(512, "Maximum number of tokens generated per completion.")
    ds3_gather_for_generation: bool = shared("ds3_gather_for_generation", True)
    shuffle_dataset: bool | None = option(True, "Shuffle the training prompts.")
    pad_to_multiple_of: int | str | None = shared("pad_to_multiple_of", "auto")
    temperature: float = option(
        1.0, "Sampling temperature (higher is more random); the loss divides the scored logits by it too."
    )
    top_p: float = option(1.0, "Nucleus sampling: keep the smallest token set of this total probability.")
    top_k: int = option(0, "Sample among the k most likely tokens; 0 disables top-k.")
    min_p: float | None = option(
        None, "Drop tokens below this fraction of the top token's probability (typically 0.01-0.2)."
    )
    generation_kwargs: dict | str | None = option(
        None, "Extra `GenerationConfig` (or vLLM `SamplingParams`) arguments; they override the sampling fields."
    )
    chat_template_kwargs: dict | str | None = option(
        None, "Extra keyword arguments for `apply_chat_template` on the prompts."
    )
    repetition_penalty: float = option(
        1.0, "Penalty on tokens already in the prompt or completion; >1 discourages repeats."
    )
    cache_implementation: str | None = option(None, "KV-cache implementation for `generate` (without vLLM).")
    fast_generation: bool = option(
        True,
        "Without vLLM, sample with llm_trainer's decode loop instead of `model.generate`: each distinct prompt is "
        "prefilled once for all its completions, and each step runs only the model and the sampler. Same tokens as "
        "`generate` for the same seed; options it does not cover fall back to `generate`, with a logged reason.",
    )
    generation_compact_finished: bool = option(
        True,
        "With `fast_generation`, drop finished completions from the decode batch so they stop costing compute. The "
        "random draws are still made for the full batch, so the sampled tokens do not change.",
    )
    packed_forward: bool | None = shared("packed_forward", None)
    freeze_vision_tower: bool = shared("freeze_vision_tower", False)

    # vLLM
    use_vllm: bool = option(False, 'Generate with vLLM instead of `generate` (`pip install "llm-trainer[vllm]"`).')
    vllm_mode: str = option(
        "colocate",
        "'colocate': vLLM runs in the training processes and shares their GPUs; 'server': requests go to a separate "
        "`llm-trainer vllm-serve` process.",
        choices=list(VLLM_MODES),
    )
    vllm_model_impl: str = option("vllm", "vLLM model implementation: 'vllm' (native) or 'transformers'.")
    vllm_enable_sleep_mode: bool = option(
        False, "Offload vLLM weights and cache during the optimizer step: less memory, slower wake-up."
    )
    vllm_structured_outputs_regex: str | None = option(
        None, "Constrain vLLM generations to this regex; None leaves them free."
    )
    vllm_server_base_url: str | None = option(
        None, "vLLM server URL, e.g. 'http://localhost:8000'; overrides host and port (server mode)."
    )
    vllm_server_host: str = option("0.0.0.0", "vLLM server host (server mode).")
    vllm_server_port: int = option(8000, "vLLM server port (server mode).")
    vllm_server_timeout: float = option(240.0, "Seconds to wait for the vLLM server before raising `ConnectionError`.")
    vllm_group_port: int = option(51216, "Port of TRL's NCCL weight-sync group with the vLLM server.")
    vllm_gpu_memory_utilization: float = option(
        0.3, "Fraction of GPU memory vLLM may take (colocate mode; pass it to the server otherwise)."
    )
    vllm_max_model_length: int | None = option(
        None,
        "vLLM context window: at least the longest prompt plus `max_completion_length`. None reads it from the "
        "model config.",
    )
    vllm_tensor_parallel_size: int = option(
        1, "vLLM tensor-parallel size (colocate mode; pass it to the server otherwise)."
    )

    # Logging
    log_completions: bool = option(
        False, "Log a sample of prompts and completions every `logging_steps` (printed with rich, wandb)."
    )
    num_completions_to_print: int | None = option(None, "Completions printed with rich; None prints all.")
    log_unique_prompts: bool = option(False, "Log each distinct prompt once.")

    def __post_init__(self):
        super().__post_init__()
        check_number(self, "max_completion_length", 1, "It is the number of tokens generated per completion.")
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of, self.device.type)
        check_choices(self, "vllm_mode")
        pc = self.parallelism_config
        if pc is not None and (pc.cp_enabled or pc.sp_enabled):
            raise ValueError(
                f"{self._algorithm} does not support context or sequence parallelism: its inputs are built from the "
                "generated completions, which cannot be sharded along the sequence. Set `cp_size=1` and `sp_size=1` "
                "in `parallelism_config`, or drop it."
            )


@dataclass
class OnlineRLConfig(OnPolicyConfig):
    """What the policy-gradient trainers share (TRL 1.16's GRPO/RLOO common fields).

    Each optimizer step consumes `steps_per_generation` micro-batches from one generation batch of
    `generation_batch_size` completions; give at most one of the two (the default is one generation per optimizer
    step, `steps_per_generation = gradient_accumulation_steps`). The generation batch must hold whole groups of
    `num_generations` completions per prompt.
    """

    _VALID_DICT_FIELDS = OnPolicyConfig._VALID_DICT_FIELDS + ["transformers_continuous_batching_config"]
    _inert_fields = {
        "transformers_continuous_batching_config": "transformers continuous batching is not supported here "
        "(`use_transformers_continuous_batching=True` raises).",
    }

    router_aux_loss_coef: float | None = shared("router_aux_loss_coef", None)
    num_generations: int | None = option(
        8, "Completions sampled per prompt (at least 2); the generation batch must be a multiple."
    )
    num_generations_eval: int | None = option(
        None, "Completions per prompt during evaluation; None uses `num_generations`."
    )
    generation_batch_size: int | None = option(
        None,
        "Completions generated at once, across processes. None: per_device_train_batch_size x num_processes x "
        "steps_per_generation. Exclusive with `steps_per_generation`.",
    )
    steps_per_generation: int | None = option(
        None,
        "Micro-batches taken from each generation batch. None: `gradient_accumulation_steps`. Exclusive with "
        "`generation_batch_size`.",
    )

    # Optimization
    beta: float = option(0.0, "KL coefficient against the reference model; 0 loads no reference model.")
    num_iterations: int = option(1, "Optimization passes over each generation batch (μ in the GRPO paper).")
    epsilon: float = option(0.2, "Lower clipping bound ε of the importance ratio.")
    epsilon_high: float | None = option(None, "Upper clipping bound; None uses `epsilon`. DAPO recommends 0.28.")
    reward_weights: list[float] | None = option(None, "One weight per reward function; None weighs every reward 1.0.")
    mask_truncated_completions: bool = option(
        False, "Leave completions cut off at `max_completion_length` out of the loss (DAPO)."
    )
    sync_ref_model: bool = shared("sync_ref_model", False)
    ref_model_mixup_alpha: float = shared("ref_model_mixup_alpha", 0.6)
    ref_model_sync_steps: int = shared("ref_model_sync_steps", 512)
    max_tokens_per_batch: int | None = option(
        None,
        "Token budget of one forward/backward: each micro-batch is split into chunks of at most this many packed "
        "tokens, run one after another, so peak activation memory follows the budget, not the longest batch. Same "
        "loss and gradients. None: one forward per micro-batch.",
    )

    # Logging
    log_multimodal: bool = option(True, "Log images and other media along with the completions.")

    # transformers continuous batching
    use_transformers_continuous_batching: bool = option(
        False, "Generate with transformers' continuous-batching engine (transformers>=5.8)."
    )
    transformers_continuous_batching_config: dict | str | None = option(
        None,
        "Keyword arguments for `transformers.generation.ContinuousBatchingConfig`.",
    )

    # Deprecated
    use_transformers_paged: bool = option(False, "Deprecated; use `use_transformers_continuous_batching`.")

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
        check_number(self, "num_iterations", 1, "It is the number of passes over each generation batch: use 1.")
        check_number(
            self,
            "max_tokens_per_batch",
            1,
            "It is the most tokens one forward may hold; None runs whole micro-batches.",
        )
        check_number(
            self,
            "beta",
            0,
            "It weighs the KL penalty towards the reference model: a negative value rewards drifting away from it. "
            "Use 0 (no penalty) or a small positive value such as 0.04.",
        )
        for name in ("epsilon", "epsilon_high"):
            check_number(self, name, 0, "It is the clipping range of the importance ratio, e.g. 0.2 (or 0.28 high).")
        if self.auto_find_batch_size:
            raise ValueError(
                f"auto_find_batch_size is not supported by {self._algorithm} (`auto_find_batch_size=True`): "
                "shrinking the batch on out-of-memory would split the groups of `num_generations` completions per "
                "prompt. Set it to False and lower `per_device_train_batch_size` instead."
            )
        self._resolve_generation_batch()

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
