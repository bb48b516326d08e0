"""`AsyncGRPOTrainer`: GRPO with generation decoupled from training (TRL 1.16's `trl.experimental.async_grpo` API).

Rollout workers (`llm_trainer.async_rl.RolloutWorker` threads) draw prompts, generate on generation servers
(`llm-trainer vllm-serve`), score each group with the reward functions and put the scored groups into a
`GroupedTrajectoryPool`. Each optimizer step takes one generation batch of whole groups from the pool
(`async_rl.grpo.prepare_grpo_batch`: old and reference log-probs, group advantages, importance-sampling correction
for the generator's log-probs) and trains on it with GRPO's loss (`GRPOTrainer.compute_loss`, unchanged). After each
optimizer step, `WeightSyncController.on_train_step` publishes the weights as its `weight_sync_mode` says.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict, deque
from collections.abc import Iterator
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from ..async_rl.grpo import prepare_grpo_batch
from ..async_rl.pool import GroupedTrajectoryPool
from ..async_rl.rollout_worker import PromptSource, RolloutWorker, reward_scorer
from ..async_rl.weight_sync import GenerationPublisher, WeightSyncController
from ..generation.base import GenerationResult, Generator, SamplingConfig
from ..generation.loop import OnlineBatch
from .async_grpo_config import AsyncGRPOConfig
from .base_trainer import BaseTrainer, init_arguments
from .grpo_trainer import GRPOTrainer
from .reward_functions import RewardFunc

logger = logging.getLogger(__name__)

SERVED_WEIGHTS_GAP = 0.1
"""Mean |trainer - generator| log-prob (nats per token) on on-policy samples above which the servers are taken to
serve other weights than the trainer's (bf16 vs float32 stays well below it)."""

STOP_TIMEOUT_S = 30.0
"""How long `train()` waits for each rollout worker to finish its request in flight when it stops them."""


class AsyncGRPOTrainer(GRPOTrainer):
    """GRPO whose completions come from rollout workers generating continuously on generation servers.

    Drop-in for TRL's `trl.experimental.async_grpo.AsyncGRPOTrainer`: same arguments and config fields. Start a
    generation server first (`llm-trainer vllm-serve --model <the policy>`, or with vLLM) and point
    `vllm_server_base_url` at it. Each sample carries the weights version that generated it; samples more than
    `max_staleness` steps old are dropped (`pool/dropped_stale`), the rest are corrected by importance sampling
    (`vllm_importance_sampling_*`); a group whose reward function raises is dropped (`rollout/dropped_reward_errors`).
    A dead or hung server stops the run with an error naming it. Workers start with `train()` and are stopped, and
    their threads joined, when it returns or raises.

    Args:
        model: the policy's name or path, or a loaded model (the servers must serve the same weights).
        reward_funcs: a reward function, a reward model (or its name), or a list of them; as in `GRPOTrainer`.
        args: the `AsyncGRPOConfig`.
        train_dataset: prompts (a "prompt" column, text or conversational); other columns reach the reward functions.
        processing_class: the tokenizer; loaded from the model when None.
        callbacks / optimizers: as for `transformers.Trainer`.
        peft_config: train a LoRA adapter (weights go to the servers merged, or adapter-only where the server has it).
        tools / environment_factory: TRL's agent rollouts; not supported here yet (an error says so).
        rollout_worker: TRL's custom rollout backend (`RolloutWorkerProtocol`); not supported (an error says so).
        weight_transfer: TRL's `WeightTransferProtocol` (`init_weight_transfer`, `pause`, `send_weights`, `resume`,
            `destroy`) replacing the HTTP weight push to the servers.
        eval_dataset: not supported (TRL's trainer has no evaluation either); must be None.
    """

    config_class = AsyncGRPOConfig
    _name = "AsyncGRPO"
    _tag_names = ["llm-trainer", "async-grpo"]

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: RewardFunc | list[RewardFunc] | None = None,
        args: AsyncGRPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        peft_config: Any = None,
        tools: list | None = None,
        environment_factory: Any = None,
        rollout_worker: Any = None,
        weight_transfer: Any = None,
        eval_dataset: Any = None,
    ):
        BaseTrainer.__init__(self, **init_arguments(locals()))

    # ----------------------------------------------------------------------------------------------- set-up hooks
    def set_options(
        self, args: AsyncGRPOConfig, *, reward_funcs=None, tools=None, environment_factory=None, **options
    ) -> None:
        rollout_worker, weight_transfer = options.pop("rollout_worker", None), options.pop("weight_transfer", None)
        if tools or environment_factory is not None:
            raise NotImplementedError(
                "AsyncGRPOTrainer does not run tool-calling or environment rollouts yet (`tools` / "
                "`environment_factory`): its workers generate single-turn completions. Use GRPOTrainer for agents."
            )
        if rollout_worker is not None:
            raise NotImplementedError(
                "A custom `rollout_worker` (TRL's RolloutWorkerProtocol) is not supported: rollouts are produced by "
                "`llm_trainer.async_rl.RolloutWorker` threads against `vllm_server_base_url`. Leave it None."
            )
        for method in ("init_weight_transfer", "pause", "send_weights", "resume", "destroy"):
            if weight_transfer is not None and not callable(getattr(weight_transfer, method, None)):
                raise TypeError(
                    f"`weight_transfer` lacks `{method}()`: pass an object implementing TRL's WeightTransferProtocol "
                    "(init_weight_transfer, pause, send_weights, resume, destroy), or None for the HTTP push."
                )
        self.weight_transfer = weight_transfer
        self.rollout_worker = None
        super().set_options(args, reward_funcs=reward_funcs, **options)

    def check_inputs(self, args: AsyncGRPOConfig, *, train_dataset: Any, eval_dataset: Any = None, **inputs) -> None:
        if eval_dataset is not None:
            raise NotImplementedError(
                "AsyncGRPOTrainer does not evaluate (TRL's neither): pass `eval_dataset=None`, and evaluate the saved "
                "model separately (or with GRPOTrainer)."
            )
        if args.world_size > 1:
            raise NotImplementedError(
                f"AsyncGRPOTrainer runs on one training process for now (got {args.world_size}): its rollout workers "
                "and trajectory pool live in the trainer's process and are not sharded across ranks. Launch a single "
                "process, and scale generation out with several servers in `vllm_server_base_url`."
            )
        super().check_inputs(args, train_dataset=train_dataset, eval_dataset=None, **inputs)

    def load_model(self, model: Any, args: AsyncGRPOConfig, quantization_config: Any) -> PreTrainedModel:
        """The policy, loaded in `args.dtype` unless `model_init_kwargs` names a dtype."""
        if isinstance(model, str) and (args.model_init_kwargs or {}).get("dtype") is None:
            args.model_init_kwargs = {**(args.model_init_kwargs or {}), "dtype": args.dtype}
        return super().load_model(model, args, quantization_config)

    def finish_init(self, args: AsyncGRPOConfig) -> None:
        """GRPO's scoring and batch buffer, with the first server checked (waiting up to `vllm_server_timeout`)."""
        urls = args.server_urls()
        given, args.vllm_server_base_url = args.vllm_server_base_url, urls[0]
        try:
            super().finish_init(args)
        finally:
            args.vllm_server_base_url = given
        self.server_urls = urls
        self.model_version = 0
        """The weights version the trainer holds: optimizer steps done (TRL's attribute)."""
        self.consumed_versions: deque[tuple[int, list[int]]] = deque(maxlen=10_000)
        """`(trainer version, [model_version of each sample])` of the latest batches trained on."""
        self._pool: GroupedTrajectoryPool | None = None
        self._controller: WeightSyncController | None = None
        self._workers: list[RolloutWorker] = []
        self._transfer_started = False
        self._warned_weights = False
        self.add_callback(_WeightSyncCallback(self))

    @property
    def rollout_queue(self) -> GroupedTrajectoryPool | None:
        """TRL's attribute: the buffer of scored samples, here the trajectory pool (None outside `train()`)."""
        return self._pool

    # ----------------------------------------------------------------------------------------------- rollouts
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any):
        """As `GRPOTrainer.train`; the rollout workers start at the first step and are stopped (threads joined)
        when training returns or raises."""
        try:
            result = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        except BaseException:
            self._stop_rollouts(raise_errors=False)  # the training error is the one to report
            raise
        self._stop_rollouts()
        return result

    def _start_rollouts(self) -> None:
        """Push the current weights to every server (this run's version 0, or the resumed step), then start the
        workers."""
        if self._workers:
            return
        args = self.args
        version = self.state.global_step
        self.model_version = version
        num_generations = args.num_generations
        prompts_per_step = args.generation_batch_size // num_generations
        workers_count = args.num_rollout_workers
        prompts_per_request = _prompts_per_request(prompts_per_step, workers_count, num_generations, args)
        clients = [self._client(url) for url in self.server_urls]
        publisher = (
            _TransferPublisher(self.weight_transfer)
            if self.weight_transfer is not None
            else GenerationPublisher(clients, timeout=args.weight_sync_timeout)
        )
        if self.weight_transfer is not None:
            self.weight_transfer.init_weight_transfer()
            self._transfer_started = True
        self._publisher = publisher
        self._pool = GroupedTrajectoryPool(
            num_generations, maxsize=args.queue_maxsize, max_staleness=args.max_staleness
        )
        # Generation runs at most max_staleness steps ahead, so no sample is generated only to be dropped as stale.
        run_ahead = {"max_staleness": args.max_staleness, "samples_per_step": args.generation_batch_size}
        self._controller = WeightSyncController(
            args.weight_sync_mode,
            staleness_threshold=args.staleness_threshold,
            publisher=publisher,
            samples_per_version=args.generation_batch_size * args.weight_sync_steps,
            weight_sync_steps=args.weight_sync_steps,
            background_push=args.weight_sync_mode == "fully-async",
            **({} if args.weight_sync_mode == "sync" else run_ahead),
        )
        self._pool.on_drop = self._controller.forget
        self._push(version)
        self._pushes_logged = 0.0
        self._controller.train_model_version = self._controller.rollout_model_version = version
        source = PromptSource(
            self.train_dataset,
            seed=args.seed,
            shuffle=args.shuffle_dataset,
            num_epochs=None,
            batch_size=prompts_per_step,
            start_index=version * prompts_per_step,
        )
        scorer = reward_scorer(
            self.reward_functions,
            chat_template_kwargs=self.chat_template_kwargs,
            device=self.accelerator.device,
            trainer_state=self.state,
            log_metric=self.online.log_metric,
            log_extra=self.online.log_extra,
        )
        eos = list(self.eos_token_ids) + [self._tokenizer.pad_token_id]
        for i in range(workers_count):
            url = self.server_urls[i % len(self.server_urls)]
            generator = self._server_generator(url)
            self._workers.append(
                RolloutWorker(
                    f"{i}",
                    source,
                    generator,
                    scorer,
                    self._pool,
                    self._controller,
                    tokenizer=self.processing_class,
                    num_generations=num_generations,
                    prompts_per_request=prompts_per_request,
                    server_url=url,
                    eos_token_ids=eos,
                    chat_template_kwargs=self.chat_template_kwargs,
                )
            )
        for worker in self._workers:
            worker.start()

    def _client(self, url: str):
        from ..generation.remote import GenerationClient

        return GenerationClient(
            url, connection_timeout=self.args.vllm_server_timeout, request_timeout=self.args.request_timeout
        )

    def _server_generator(self, url: str):
        from ..generation.remote import VLLMServerGenerator

        generator = VLLMServerGenerator(
            SamplingConfig.from_args(self.args),
            base_url=url,
            connection_timeout=self.args.vllm_server_timeout,
            request_timeout=self.args.request_timeout,
            eos_token_id=self.eos_token_ids,
            structured_outputs_regex=self.args.vllm_structured_outputs_regex,
        )
        # A custom `weight_transfer` does not set the servers' version: the controller's version tags the samples.
        return _Unversioned(generator) if self.weight_transfer is not None else generator

    def _stop_rollouts(self, raise_errors: bool = True) -> None:
        """Stop the workers and join their threads, close the pool and the controller (finishing a background
        push); idempotent. Everything is stopped even when a step fails; the first error is raised after, or only
        logged when `raise_errors` is False."""
        errors: list[BaseException] = []
        steps = [self._controller.close] if self._controller is not None else []
        steps += [self._pool.close] if self._pool is not None else []
        steps += [lambda worker=worker: worker.stop(STOP_TIMEOUT_S) for worker in self._workers]
        if self._transfer_started:
            steps.append(self.weight_transfer.destroy)
        self._workers, self._transfer_started = [], False
        for step in steps:
            try:
                step()
            except Exception as err:  # noqa: PERF203 - each step must run
                errors.append(err)
                logger.error("Stopping the rollouts: %s: %s", type(err).__name__, err)
        if errors and raise_errors:
            raise errors[0]

    def _check_rollout_health(self) -> None:
        """Raise when a worker stopped on an error or stalled (named server), or when every worker has ended."""
        for worker in self._workers:
            worker.check_health(self.args.heartbeat_stale_after_s)
        if self._workers and not any(worker.alive for worker in self._workers):
            raise RuntimeError(
                "Every rollout worker has stopped, so no further samples will arrive; servers: "
                f"{', '.join(self.server_urls)}."
            )

    def _push(self, version: int) -> None:
        """Publish the policy's weights as `version` (errors name the server)."""
        with self._naming_servers(version):
            self._publisher.push(self.accelerator.unwrap_model(self.model), version)

    @contextlib.contextmanager
    def _naming_servers(self, version: int) -> Iterator[None]:
        """Around a weight push: an error that does not name a server is re-raised naming them all."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            if any(url in str(err) for url in self.server_urls):
                raise
            raise RuntimeError(
                f"Pushing weights version {version} to the generation servers {self.server_urls} failed: {err}"
            ) from err

    def make_batch(self, rows: list[dict[str, Any]]) -> OnlineBatch:
        """The next generation batch from the pool (the loader's `rows` only pace the steps): whole groups, none
        older than `max_staleness`, scored, with old/reference log-probs, advantages and the IS ratio."""
        if not self.model.training:
            raise NotImplementedError("AsyncGRPOTrainer does not evaluate; see `eval_dataset`.")
        if not self._workers:
            self._start_rollouts()
        args = self.args
        version = self.state.global_step
        trajectories = self._pool.get_batch(
            args.generation_batch_size, version, timeout=None, health_check=self._check_rollout_health
        )
        self.consumed_versions.append((version, [t.model_version for t in trajectories]))
        reference = self.reference
        unwrapped = self.accelerator.unwrap_model(self.model)
        importance_sampling = None
        if self.vllm_importance_sampling_correction:
            importance_sampling = {
                "mode": args.vllm_importance_sampling_mode,
                "clip_min": args.vllm_importance_sampling_clip_min,
                "clip_max": args.vllm_importance_sampling_clip_max,
            }
        batch, metrics = prepare_grpo_batch(
            trajectories,
            self.model,
            pad_token_id=self._tokenizer.pad_token_id,
            num_generations=args.num_generations,
            reward_weights=self.reward_functions.weights,
            scale_rewards=self.scale_rewards,
            aggregation=self.multi_objective_aggregation,
            ref_model=reference.model if reference is not None else None,
            ref_context=(lambda: reference.context(unwrapped)) if reference is not None else None,
            importance_sampling=importance_sampling,
            current_version=version,
            reward_names=self.reward_functions.names,
            device=self.accelerator.device,
            logps_batch_size=args.per_device_train_batch_size,
            pad_to_multiple_of=args.pad_to_multiple_of,
            mask_truncated_completions=args.mask_truncated_completions,
            compute_old_logps=True,
            autocast=self.accelerator.autocast,
            packed_forward=args.packed_forward,
        )
        metrics |= self._pool.stats()
        metrics["pool/dropped_stale"] = float(self._pool.dropped_stale)
        counters = [worker.metrics() for worker in self._workers]
        for name in ("rollout/generated", "rollout/dropped_reward_errors"):
            metrics[name] = sum(counter[name] for counter in counters)
        metrics |= self._online_metrics()
        self._check_served_weights(trajectories, version, metrics)
        if args.log_completions:
            self._log_samples(trajectories, batch)
        tokens = sum(len(t.prompt_ids) + len(t.completion_ids) for t in trajectories)
        self.record_generation("train", tokens, metrics)
        return batch

    def _check_served_weights(self, trajectories: list, version: int, metrics: dict[str, float]) -> None:
        """Warn, once, when on-policy samples' generator log-probs are far from the trainer's: the servers do not
        serve the policy's weights (another checkpoint, another dtype, or, for a LoRA policy, another base model)."""
        gap = metrics.get("sampling/sampling_logp_difference/mean")
        if self._warned_weights or gap is None or any(t.model_version != version for t in trajectories):
            return
        if gap > SERVED_WEIGHTS_GAP:
            self._warned_weights = True
            logger.warning(
                "The generation servers' log-probs differ from the trainer's by %.3g nats per token on average on "
                "samples of the current weights (version %d): the servers %s do not serve the policy as trained "
                "here. Start them on the same checkpoint and in the same dtype (`vllm-serve --dtype`, the config's "
                "`dtype`); a LoRA policy sends only its adapter, so the servers must hold its base model.",
                gap,
                version,
                self.server_urls,
            )

    def _online_metrics(self) -> dict[str, float]:
        """What reward functions logged through `log_metric` since the last batch, averaged per name."""
        # Swapped, not cleared: workers append through `online.log_metric`, which reads the attribute each call.
        pending, self.online.pending_metrics = self.online.pending_metrics, defaultdict(list)
        return {name: sum(values) / len(values) for name, values in list(pending.items()) if values}

    def _log_samples(self, trajectories: list, batch: OnlineBatch) -> None:
        """Keep the batch's prompts, completions, rewards and advantages for `log_completions`."""
        rewards = torch.tensor([t.rewards_per_func for t in trajectories], dtype=torch.float32)
        self.online._log_samples(
            [t.prompt for t in trajectories], [t.completion for t in trajectories], rewards, batch.advantages.cpu()
        )

    # ----------------------------------------------------------------------------------------------- weights
    def _after_optimizer_step(self) -> None:
        """Tell the controller about the new version; it pushes the weights when its mode says so ('fully-async'
        pushes from a background thread, so the next step does not wait)."""
        if self._controller is None:
            return
        version = self.state.global_step
        self.model_version = version
        with self._naming_servers(version):
            self._controller.on_train_step(self.accelerator.unwrap_model(self.model), version)
        stats = self._controller.stats()
        metrics = self._metrics["train"]
        if stats["weight_sync/pushes"] > self._pushes_logged:  # the last push's duration, once per push
            self._pushes_logged = stats["weight_sync/pushes"]
            metrics["perf/weight_sync_s"].append(stats["perf/weight_sync_s"])
        metrics["weight_sync/rollout_model_version"].append(stats["weight_sync/rollout_model_version"])


class _WeightSyncCallback(TrainerCallback):
    """Calls `AsyncGRPOTrainer._after_optimizer_step` after every optimizer step."""

    def __init__(self, trainer: AsyncGRPOTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()


class _TransferPublisher:
    """TRL's `WeightTransferProtocol` object as a `WeightPublisher`: pause, stream the weights, resume."""

    def __init__(self, transfer: Any) -> None:
        self.transfer = transfer

    def push(self, model: torch.nn.Module, version: int) -> None:
        from ..generation.weights import iter_named_weights

        self.transfer.pause()
        try:
            self.transfer.send_weights(_tensors(iter_named_weights(model)))
        finally:
            self.transfer.resume()


class _Unversioned(Generator):
    """A server generator whose replies' `model_version` is dropped (the servers' count is not the trainer's)."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.client = getattr(generator, "client", None)

    def generate(self, prompt_ids: list[list[int]]) -> GenerationResult:
        result = self.generator.generate(prompt_ids)
        return GenerationResult(result.completion_ids, result.logprobs)

    def close(self) -> None:
        self.generator.close()


def _tensors(named: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in named:
        yield name, tensor.detach()


def _prompts_per_request(prompts_per_step: int, workers: int, num_generations: int, args: AsyncGRPOConfig) -> int:
    """Prompts per generation request: one step's prompts split over the workers, fewer when `max_inflight_tasks`
    caps the completions in flight; always a divisor of the step's prompts (so 'sync' mode fills each version
    exactly)."""
    cap = max(1, prompts_per_step // workers)
    if args.max_inflight_tasks > 0:
        cap = min(cap, max(1, args.max_inflight_tasks // (num_generations * workers)))
    return max(k for k in range(1, cap + 1) if prompts_per_step % k == 0)
