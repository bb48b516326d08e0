"""Configuration for `AsyncGRPOTrainer`: TRL 1.16's `trl.experimental.async_grpo.AsyncGRPOConfig` fields and
defaults, on top of `GRPOConfig` (the loss is GRPO's), plus the weight-sync modes of `llm_trainer.async_rl`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..async_rl.weight_sync import SYNC_MODES
from .base_config import check_choices, check_number, option
from .grpo_config import GRPOConfig

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class AsyncGRPOConfig(GRPOConfig):
    """Configuration for [`AsyncGRPOTrainer`]: GRPO whose completions are generated continuously by rollout workers
    against generation servers, while the trainer consumes them from a trajectory pool.

    TRL 1.16's fields keep TRL's defaults (`max_staleness=4`, `queue_maxsize=1024`, `weight_sync_steps=1`,
    `request_timeout=600`, `weight_sync_timeout=1800`, `max_completion_length=2048`, `logging_steps=1`,
    `lr_scheduler_type="constant"`, ...). Every other `GRPOConfig` field applies as in `GRPOTrainer` (`loss_type`,
    `beta`, `scale_rewards`, `generation_kwargs`, the `vllm_importance_sampling_*` correction, which here also
    corrects for stale samples). Additions of llm_trainer: `weight_sync_mode` (`"sync"`, `"batch-async"`,
    `"fully-async"`), `staleness_threshold`, `num_rollout_workers`, and `vllm_server_base_url` as a list of URLs
    (one worker group per server). Generation always goes to a server (`use_vllm=True`, `vllm_mode="server"`).

    Training lasts `max_steps` when set; otherwise `num_train_epochs` passes over the prompts, counted as GRPOTrainer
    counts them (optimizer steps = epochs x prompts / prompts per step); a prompt whose group was dropped (stale, or
    a reward function raised) is made up for by the next prompts of the stream. Each optimizer step trains on one
    generation batch (`per_device_train_batch_size x gradient_accumulation_steps` completions).
    """

    _algorithm = "AsyncGRPO"
    _inert_fields = {
        "fork_threshold_tokens": "multi-turn conversations are not reconciled into training rows here (no tools or "
        "environments in AsyncGRPOTrainer), so no row is ever forked.",
        "token_budget": "micro-batches hold `per_device_train_batch_size` samples here; token-budgeted packing of "
        "rows is not implemented.",
        "fast_generation": "completions come from the generation servers, not from the policy in this process.",
        "generation_compact_finished": "completions come from the generation servers, not from the policy in this "
        "process.",
    }

    # TRL's AsyncGRPOConfig defaults that differ from GRPOConfig's
    logging_steps: float = option(1, "Log every X update steps: an integer, or a float in [0, 1) read as a ratio.")
    lr_scheduler_type: str = option(
        "constant",
        "Learning-rate schedule; constant by default, since an epoch-bounded run's step count depends on how many "
        "samples are dropped. Set a decaying schedule together with `max_steps`.",
    )
    ignore_data_skip: bool = option(
        True, "Kept True: a resumed run does not replay the prompt loader (the rollout workers feed the trainer)."
    )
    remove_unused_columns: bool | None = option(
        True,
        "Drop dataset columns other than 'prompt' from the trainer's loader. The rollout workers read the full rows, "
        "so reward functions still receive every column.",
    )
    max_completion_length: int | None = option(2048, "Maximum number of tokens generated per completion.")
    dtype: str = option(
        "float32",
        "Dtype to load the policy in when given by name or path ('auto', 'bfloat16', 'float16', 'float32'); a "
        "`dtype` in `model_init_kwargs` takes precedence. Serve the generation server in the same dtype.",
        choices=list(DTYPES),
    )
    fork_threshold_tokens: int = option(
        1024, "TRL's multi-turn row-fork threshold (tokens); multi-turn rollouts are not supported here."
    )

    # Generation servers
    use_vllm: bool = option(True, "Always True: AsyncGRPO generates with `llm-trainer vllm-serve` servers.")
    vllm_mode: str = option(
        "server", "Always 'server': rollout workers send requests to generation servers.", choices=["server"]
    )
    vllm_server_base_url: str | list[str] = option(
        "http://localhost:8000",
        "URL of the generation server (`llm-trainer vllm-serve`), or several (a list, or comma-separated): rollout "
        "workers are spread over them and every server receives the weights.",
    )
    request_timeout: int = option(
        600, "Seconds one generation request may take before the run stops with an error naming the server."
    )
    weight_sync_timeout: int = option(
        1800, "Seconds one weight push to a server may take before the run stops with an error naming the server."
    )

    # Asynchronous pipeline
    token_budget: int | None = option(None, "TRL's per-row token budget for packed micro-batches; not used here.")
    max_inflight_tasks: int = option(
        -1,
        "Most completions being generated at once over all rollout workers; -1 (auto) sends one optimizer step's "
        "prompts per request, split over the workers.",
    )
    max_staleness: int = option(
        4,
        "Most optimizer steps a sample may lag behind the trainer's weights when consumed; older ones are dropped "
        "(counted in `pool/dropped_stale`).",
    )
    queue_maxsize: int = option(1024, "Most scored samples buffered in the trajectory pool; workers wait when full.")
    weight_sync_steps: int = option(1, "Optimizer steps between weight pushes to the servers ('sync', 'fully-async').")
    heartbeat_stale_after_s: float = option(
        300.0, "Seconds without progress from a rollout worker after which the run stops with an error."
    )
    weight_sync_mode: str = option(
        "batch-async",
        "'sync': generation waits for each step's weights (on-policy, as GRPOTrainer); 'batch-async': workers "
        "wait only while the served weights lag more than `staleness_threshold` steps (pushed when they do); "
        "'fully-async': workers never wait, weights are pushed every `weight_sync_steps`.",
        choices=list(SYNC_MODES),
    )
    staleness_threshold: int | None = option(
        None,
        "'batch-async': most steps the served weights may lag behind the trainer's. None: 1, or 0 when "
        "`max_staleness` <= 1 (a lag equal to `max_staleness` would see most samples dropped).",
    )
    num_rollout_workers: int = option(
        1, "Rollout worker threads, spread over the servers of `vllm_server_base_url`; each has one request in flight."
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.use_vllm or self.vllm_mode != "server":
            raise ValueError(
                f"AsyncGRPO generates with generation servers only, but got use_vllm={self.use_vllm!r} and "
                f"vllm_mode={self.vllm_mode!r}: leave `use_vllm=True` and `vllm_mode='server'`, and start a server "
                "with `llm-trainer vllm-serve --model <the policy>`."
            )
        check_choices(self, "weight_sync_mode", "dtype")
        self.vllm_server_base_url = self.server_urls()
        if len(self.vllm_server_base_url) == 1:
            self.vllm_server_base_url = self.vllm_server_base_url[0]
        check_number(self, "max_staleness", 0, "Use 0 for on-policy samples only, or e.g. 4.")
        check_number(self, "weight_sync_steps", 1, "Push the weights every step (1) or every few steps.")
        check_number(self, "queue_maxsize", 1, "It bounds the samples buffered between generation and training.")
        check_number(self, "num_rollout_workers", 1, "Use 1 or more rollout workers.")
        for name in ("request_timeout", "weight_sync_timeout", "heartbeat_stale_after_s"):
            check_number(self, name, 0, "It is a time limit in seconds.", exclusive=True)
        if self.max_inflight_tasks != -1:
            check_number(self, "max_inflight_tasks", 1, "Use -1 (auto) or a positive number of completions.")
            if self.max_inflight_tasks < self.num_generations:
                raise ValueError(
                    f"`max_inflight_tasks={self.max_inflight_tasks}` is below `num_generations={self.num_generations}`: "
                    "a request carries at least one prompt's whole group. Raise it, or use -1 (auto)."
                )
        if self.staleness_threshold is None:
            self.staleness_threshold = 1 if self.max_staleness > 1 else 0
        check_number(self, "staleness_threshold", 0, "Use 0 (push every step) or a small number of steps.")
        if self.weight_sync_mode == "batch-async" and self.staleness_threshold > self.max_staleness:
            raise ValueError(
                f"`staleness_threshold={self.staleness_threshold}` exceeds `max_staleness={self.max_staleness}`: "
                "samples generated at the allowed lag would all be dropped as stale. Lower `staleness_threshold` "
                "or raise `max_staleness`."
            )
        if self.weight_sync_mode != "batch-async" and self.max_staleness < self.weight_sync_steps - 1:
            raise ValueError(
                f"`weight_sync_steps={self.weight_sync_steps}` keeps samples of one weights version for that many "
                f"steps, so they get up to {self.weight_sync_steps - 1} steps stale, more than "
                f"`max_staleness={self.max_staleness}`: every such sample would be dropped. Raise `max_staleness` or "
                "lower `weight_sync_steps`."
            )
        if self.steps_per_generation != self.gradient_accumulation_steps:
            raise ValueError(
                f"AsyncGRPO takes one generation batch from the pool per optimizer step, but steps_per_generation="
                f"{self.steps_per_generation} (or generation_batch_size={self.generation_batch_size}) spreads one "
                f"over several steps (gradient_accumulation_steps={self.gradient_accumulation_steps}): leave "
                "`steps_per_generation` and `generation_batch_size` unset."
            )
        if self.num_iterations != 1:
            raise ValueError(
                f"`num_iterations={self.num_iterations}` is not supported by AsyncGRPO: each sample is trained on "
                "once, as it arrives. Use 1."
            )

    def server_urls(self) -> list[str]:
        """The generation servers' URLs: `vllm_server_base_url` as a list (comma-separated text is split)."""
        urls = self.vllm_server_base_url
        urls = [urls] if isinstance(urls, str) else list(urls or [])
        urls = [part.strip().rstrip("/") for url in urls for part in str(url).split(",") if part.strip()]
        if not urls:
            raise ValueError(
                "`vllm_server_base_url` names no generation server: give its URL, e.g. 'http://localhost:8000'."
            )
        return urls


@dataclass
class AsyncGRPOScriptConfig(AsyncGRPOConfig):
    """`AsyncGRPOConfig` as `llm-trainer async_grpo` parses it: there `--dtype` is `ModelConfig`'s (it loads the
    policy, through `model_init_kwargs`), so this config's `dtype` is not a flag of its own."""

    dtype: str = field(
        default="float32",
        init=False,
        metadata={"help": "Set by `--dtype` (ModelConfig) on the command line.", "choices": list(DTYPES)},
    )


AsyncGRPOConfig.script_config_class = AsyncGRPOScriptConfig
