"""Training callbacks at TRL's path (`trl.trainer.callbacks`).

- `RichProgressCallback`: a rich progress bar with the latest metrics.
- `SyncRefModelCallback`: TR-DPO's periodic mixing of the policy into the reference model.
- `LogCompletionsCallback`: completions of the eval prompts, logged as a table to Weights & Biases and/or Comet.
- `WeaveCallback`: the same completions (optionally scored) logged as a W&B Weave evaluation.
- `BEMACallback`: a bias-corrected exponential moving average of the weights (BEMA), saved at the end of training.
- `WinRateCallback`: the policy's win rate against the reference on the eval prompts, as a pairwise judge sees it.
- `MergeModelCallback`: a merged copy of the model (PEFT adapter merged into the base, or a mergekit merge) saved
  with the checkpoints.

wandb, comet_ml, weave and mergekit are imported only when used.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import GenerationConfig, TrainerCallback, TrainingArguments

logger = logging.getLogger(__name__)

__all__ = [
    "BEMACallback",
    "LogCompletionsCallback",
    "MergeConfig",
    "MergeModelCallback",
    "RichProgressCallback",
    "SyncRefModelCallback",
    "WeaveCallback",
    "WinRateCallback",
]


def _require(module: str, feature: str, package: str | None = None) -> None:
    """Raise an ImportError naming the pip package when `module` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{feature} requires `{module}`, which is not installed: `pip install {package or module}`.")


# ------------------------------------------------------------------------------------------------------ progress
class RichProgressCallback(TrainerCallback):
    """A rich progress bar for training and evaluation, with the latest logged metrics beneath it.

    Pass it in `callbacks=[RichProgressCallback()]`; it replaces nothing, so set `disable_tqdm=True` to drop
    transformers' own bar.
    """

    def __init__(self):
        _require("rich", "RichProgressCallback")
        self._live = self._progress = self._train_task = self._eval_task = None
        self._status = ""

    def _render(self):
        from rich.console import Group
        from rich.text import Text

        return Group(self._progress, Text(self._status, style="dim"))

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
        )
        self._train_task = self._progress.add_task("Training", total=state.max_steps)
        self._live = Live(self._render(), refresh_per_second=4, transient=False)
        self._live.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self._live is not None:
            self._progress.update(self._train_task, completed=state.global_step)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self._live is None or eval_dataloader is None or not hasattr(eval_dataloader, "__len__"):
            return
        if self._eval_task is None:
            self._eval_task = self._progress.add_task("Evaluating", total=len(eval_dataloader))
        self._progress.advance(self._eval_task)

    def on_evaluate(self, args, state, control, **kwargs):
        if self._live is not None and self._eval_task is not None:
            self._progress.remove_task(self._eval_task)
            self._eval_task = None

    on_predict = on_evaluate

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._live is None or not logs:
            return
        shown = {k: v for k, v in logs.items() if k not in ("total_flos",)}
        self._status = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        self._live.update(self._render())

    def on_train_end(self, args, state, control, **kwargs):
        if self._live is not None:
            self._progress.update(self._train_task, completed=state.global_step)
            self._live.stop()
            self._live.console.line()
            self._live = None


# --------------------------------------------------------------------------------------------- reference syncing
class SyncRefModelCallback(TrainerCallback):
    """TR-DPO reference syncing (TRL's callback of the same name): every `args.ref_model_sync_steps` optimizer steps,
    `ref = α·policy + (1 − α)·ref` with α = `args.ref_model_mixup_alpha`.

    Trainers with `sync_ref_model=True` add it themselves; `accelerator` (optional) unwraps the policy first.
    """

    def __init__(self, ref_model, accelerator=None):
        self.ref_model = ref_model
        self.accelerator = accelerator

    @staticmethod
    def sync_target_model(model, target_model, alpha: float) -> None:
        """Move `target_model`'s parameters a fraction `alpha` of the way towards `model`'s, in place.

        Under DeepSpeed ZeRO-3 (partitioned parameters) both models are gathered, rank 0 mixes them, and the result
        is partitioned again.
        """
        params = [*model.parameters(), *target_model.parameters()]
        gathered = contextlib.nullcontext()
        updating = True
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
            updating = deepspeed.comm.get_rank() == 0
        with gathered, torch.no_grad():
            if updating:
                for target, source in zip(target_model.parameters(), model.parameters(), strict=True):
                    target.mul_(1.0 - alpha).add_(source.to(target.dtype), alpha=alpha)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.ref_model is None or model is None or state.global_step % args.ref_model_sync_steps != 0:
            return
        if self.accelerator is not None:
            model = self.accelerator.unwrap_model(model)
        self.sync_target_model(model, self.ref_model, args.ref_model_mixup_alpha)


# ----------------------------------------------------------------------------------------- completions logging
def _eval_prompts(trainer: Any, num_prompts: int | None, callback: str) -> Any:
    """The trainer's eval dataset (its first `num_prompts` rows), which must have a "prompt" column."""
    dataset = trainer.eval_dataset
    if dataset is None:
        raise ValueError(f"Trainer must have an evaluation dataset to use the {callback}.")
    if isinstance(dataset, dict):
        raise ValueError(f"{callback} needs a single evaluation dataset, not a dict of them.")
    if "prompt" not in (dataset.column_names or []):
        raise ValueError(
            f"{callback} needs a 'prompt' column in the evaluation dataset; it has {dataset.column_names}."
        )
    if num_prompts is not None:
        dataset = dataset.select(range(min(num_prompts, len(dataset))))
    return dataset


def _generate_completions(
    prompts: list[str],
    model: Any,
    tokenizer: Any,
    accelerator: Any,
    generation_config: GenerationConfig | None,
    batch_size: int = 1,
    gradient_checkpointing_kwargs: dict | None = None,
) -> list[str]:
    """Decoded completions of `prompts` (already templated text), generated `batch_size` at a time in eval mode, with
    left padding; the tokenizer's padding side and the model's training mode are restored afterwards."""
    from ..models.utils import unwrap_model_for_generation

    completions: list[str] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with unwrap_model_for_generation(
            model, accelerator, gradient_checkpointing_kwargs=gradient_checkpointing_kwargs
        ) as unwrapped:
            was_training = unwrapped.training
            unwrapped.eval()
            try:
                for start in range(0, len(prompts), batch_size):
                    batch = tokenizer(
                        prompts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True
                    ).to(unwrapped.device)
                    with torch.no_grad():
                        generated = unwrapped.generate(**batch, generation_config=generation_config)
                    new_tokens = generated[:, batch["input_ids"].shape[1] :]
                    completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            finally:
                unwrapped.train(was_training)
    finally:
        tokenizer.padding_side = padding_side
    return completions


def _prompts_and_completions(
    dataset: Any, trainer: Any, args: TrainingArguments, processing_class: Any, generation_config: Any
) -> tuple[list[str], list[str]]:
    """Every process generates for its share of the prompts; all get the gathered prompts and completions."""
    from accelerate.utils import gather_object

    from ..data_utils import maybe_apply_chat_template

    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    accelerator = trainer.accelerator
    with accelerator.split_between_processes(list(dataset["prompt"])) as shard:
        prompts = [maybe_apply_chat_template({"prompt": prompt}, processing_class)["prompt"] for prompt in shard]
        completions = _generate_completions(
            prompts,
            model=trainer.model_wrapped,
            tokenizer=tokenizer,
            accelerator=accelerator,
            generation_config=generation_config,
            batch_size=args.per_device_eval_batch_size,
            gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        )
    return gather_object(prompts), gather_object(completions)


class LogCompletionsCallback(TrainerCallback):
    """Every `freq` optimizer steps, generate completions for the eval dataset's prompts and log the table of all of
    them so far (columns `step`, `prompt`, `completion`) to Weights & Biases and/or Comet, whichever of `"wandb"` and
    `"comet_ml"` is in `args.report_to`.

    Args:
        trainer: the trainer it is added to (`trainer.add_callback(callback)`); its `eval_dataset` needs a `"prompt"`
            column (plain text or conversational).
        generation_config: passed to `generate` (None: the model's own).
        num_prompts: only the first `num_prompts` eval prompts (default: all).
        freq: optimizer steps between logs (default: the trainer's `eval_steps`).

    The rows accumulate in `self.table`, a list of `(step, prompt, completion)`.
    """

    def __init__(
        self,
        trainer: Any,
        generation_config: GenerationConfig | None = None,
        num_prompts: int | None = None,
        freq: int | None = None,
    ):
        self.trainer = trainer
        self.generation_config = generation_config
        self.freq = freq
        self.table: list[tuple[str, str, str]] = []
        self._last_logged_step = -1
        self.eval_dataset = _eval_prompts(trainer, num_prompts, "LogCompletionsCallback")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self._last_logged_step:
            return
        if state.global_step % (self.freq or state.eval_steps) != 0:
            return
        prompts, completions = _prompts_and_completions(
            self.eval_dataset, self.trainer, args, kwargs["processing_class"], self.generation_config
        )
        if self.trainer.accelerator.is_main_process:
            self.table += [(str(state.global_step), p, c) for p, c in zip(prompts, completions, strict=True)]
            self._report(args)
        self._last_logged_step = state.global_step

    def _report(self, args: TrainingArguments) -> None:
        report_to = args.report_to or []
        if "wandb" not in report_to and "comet_ml" not in report_to:
            return
        import pandas as pd

        table = pd.DataFrame(self.table, columns=["step", "prompt", "completion"])
        if "wandb" in report_to:
            _require("wandb", "Logging completions to Weights & Biases")
            import wandb

            wandb.log({"completions": wandb.Table(dataframe=table)})
        if "comet_ml" in report_to:
            from .utils import log_table_to_comet_experiment

            log_table_to_comet_experiment("completions.csv", table)


class WeaveCallback(TrainerCallback):
    """At each evaluation, generate completions for the eval dataset's prompts and log them to W&B Weave through its
    `EvaluationLogger`.

    Without `scorers` it logs the predictions only (tracing); with `scorers` (name -> `fn(prompt, completion)`
    returning a number) it also logs each score and a summary with their averages (evaluation).

    Args:
        trainer: the trainer it is added to; its `eval_dataset` needs a `"prompt"` column.
        project_name: the Weave project, used when no Weave client is running yet (default: the active wandb run's
            `entity/project`; with neither, a ValueError).
        scorers: see above.
        generation_config: passed to `generate`.
        num_prompts: only the first `num_prompts` eval prompts (default: all).
        dataset_name: the dataset name recorded in Weave.
        model_name: the model name recorded in Weave (default: the model's `name_or_path`).

    Raises:
        ImportError: when `weave` is not installed (checked at construction, before training).
    """

    def __init__(
        self,
        trainer: Any,
        project_name: str | None = None,
        scorers: dict[str, Callable[[str, str], float]] | None = None,
        generation_config: GenerationConfig | None = None,
        num_prompts: int | None = None,
        dataset_name: str = "eval_dataset",
        model_name: str | None = None,
    ):
        _require("weave", "WeaveCallback")
        self.trainer = trainer
        self.project_name = project_name
        self.scorers = scorers or {}
        self.generation_config = generation_config
        self.dataset_name = dataset_name
        self.model_name = model_name
        self._last_logged_step = -1
        self._weave_initialized = False
        self.eval_dataset = _eval_prompts(trainer, num_prompts, "WeaveCallback")

    @property
    def is_evaluation_mode(self) -> bool:
        """Whether scores are logged (scorers were given) rather than predictions only."""
        return bool(self.scorers)

    def _initialize_weave(self) -> None:
        """Attach to the running Weave client, or start one for the project."""
        if self._weave_initialized:
            return
        import weave
        from weave.trace.context import weave_client_context

        client = weave_client_context.get_weave_client()
        if client is None:
            if self.project_name is None and importlib.util.find_spec("wandb") is not None:
                import wandb

                if wandb.run is not None:
                    self.project_name = f"{wandb.run.entity}/{wandb.run.project}"
            if self.project_name is None:
                raise ValueError(
                    "No existing Weave client found and no project_name provided. Call `weave.init('project-name')`, "
                    "pass `project_name` to the WeaveCallback, or start a wandb run first."
                )
            client = weave.init(self.project_name)
        self._weave_client = client
        if self.model_name is None:
            config = getattr(self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped), "config", None)
            self.model_name = getattr(config, "_name_or_path", None) or "unknown_model"
        self._EvaluationLogger = weave.EvaluationLogger
        self._weave_initialized = True

    def on_train_begin(self, args, state, control, **kwargs):
        self._initialize_weave()

    def on_evaluate(self, args, state, control, **kwargs):
        if state.global_step == self._last_logged_step:
            return
        self._initialize_weave()
        prompts, completions = _prompts_and_completions(
            self.eval_dataset, self.trainer, args, kwargs["processing_class"], self.generation_config
        )
        if self.trainer.accelerator.is_main_process:
            self._log(state.global_step, prompts, completions)
        self._last_logged_step = state.global_step

    def _log(self, step: int, prompts: list[str], completions: list[str]) -> None:
        """One Weave evaluation: a prediction per prompt, scored when scorers are set, then a summary. A failing
        scorer or prediction is logged as a warning and skipped, so monitoring never stops training."""
        eval_logger = self._EvaluationLogger(
            model=self.model_name,
            dataset=self.dataset_name,
            eval_attributes={
                "training_step": step,
                "model_name": self.model_name,
                "generation_config": self.generation_config.to_dict() if self.generation_config else None,
            },
        )
        scores: dict[str, list[float]] = {}
        logged = 0
        for prompt, completion in zip(prompts, completions, strict=True):
            try:
                prediction = eval_logger.log_prediction(inputs={"prompt": prompt}, output=completion)
                for name, scorer in self.scorers.items():
                    try:
                        score = scorer(prompt, completion)
                    except Exception as error:  # a user scorer failing must not stop training
                        logger.warning("Scorer %r failed: %s", name, error)
                        continue
                    prediction.log_score(scorer=name, score=score)
                    scores.setdefault(name, []).append(score)
                prediction.finish()
                logged += 1
            except Exception as error:  # Weave client errors (network, quota) must not stop training
                logger.warning("Failed to log a prediction to Weave: %s", error)
        try:
            if self.is_evaluation_mode and scores:
                summary = {"total_predictions": len(prompts), "successful_predictions": logged}
                summary.update({f"avg_{name}": sum(values) / len(values) for name, values in scores.items()})
                eval_logger.log_summary(summary)
            else:
                eval_logger.finish()
        except Exception as error:
            logger.warning("Failed to finish the Weave evaluation: %s", error)


# --------------------------------------------------------------------------------------------------------- BEMA
class BEMACallback(TrainerCallback):
    """Bias-corrected exponential moving average of the weights (BEMA, Block & Zhang 2025, arXiv:2508.00180).

    With θₜ the trained weights at optimizer step t and θ₀ a snapshot taken at step `update_after` (the start of
    training when it is 0), every `update_freq` steps after `update_after`:

        βₜ = max((ρ + γ·t)^(−κ), `min_ema_multiplier`)      EMAₜ = (1 − βₜ)·EMA + βₜ·θₜ
        αₜ = (ρ + γ·t)^(−η)                                  BEMAₜ = EMAₜ + αₜ·(θₜ − θ₀)

    with ρ = `lag`, γ = `multiplier`, κ = `ema_power`, η = `bias_power`, and t the global step (TRL's schedule).
    `ema_power=0` makes β = 1 (EMA = θₜ, no averaging); a large `bias_power` drives α to 0 (plain EMA) and 0 pins it
    at 1. The averaged model is kept on `device` (best not the training device, to save its memory) and saved with
    `save_pretrained` to `<output_dir>/bema` at the end of training. Only trainable parameters are averaged; frozen
    ones are copied as they are.

    The EMA, θ₀ and the BEMA weights are kept in float32 whatever the model's dtype, so small βₜ updates of a
    bfloat16 model are not rounded away; the saved model has the model's dtype.
    """

    def __init__(
        self,
        update_freq: int = 400,
        ema_power: float = 0.5,
        bias_power: float = 0.2,
        lag: int = 10,
        update_after: int = 0,
        multiplier: float = 1.0,
        min_ema_multiplier: float = 0.0,
        device: str = "cpu",
    ):
        if update_freq < 1:
            raise ValueError(f"`update_freq` must be a positive number of steps, got {update_freq}.")
        if update_after < 0:
            raise ValueError(f"`update_after` must be >= 0, got {update_after}.")
        if lag + multiplier * (update_after + 1) <= 0:
            raise ValueError(f"`lag` + `multiplier`·t must be positive for the decay schedule, got lag={lag}.")
        self.update_freq = update_freq
        self.ema_power = ema_power
        self.bias_power = bias_power
        self.lag = lag
        self.update_after = update_after
        self.multiplier = multiplier
        self.min_ema_multiplier = min_ema_multiplier
        self.device = device
        self.param_names: list[str] = []
        self.thetat_params: list[torch.nn.Parameter] = []  # the trained parameters themselves
        self.theta0_params: list[torch.Tensor] = []  # θ₀, float32 on `device`
        self.ema_params: list[torch.Tensor] = []  # the EMA, float32 on `device`
        self.running_model: torch.nn.Module | None = None  # the BEMA model, on `device`

    @staticmethod
    def _unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
        """`model` without its DDP / DeepSpeed wrapper (FSDP is not supported: its parameters are sharded)."""
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(model, keep_torch_compile=False)

    def _ema_beta(self, step: int) -> float:
        """βₜ, the weight of the current parameters in the EMA update."""
        return max((self.lag + self.multiplier * step) ** (-self.ema_power), self.min_ema_multiplier)

    def _bema_alpha(self, step: int) -> float:
        """αₜ, the weight of the bias correction θₜ − θ₀."""
        return (self.lag + self.multiplier * step) ** (-self.bias_power)

    @torch.no_grad()
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = self._unwrap_model(model)
        self.running_model = copy.deepcopy(model).to(self.device)
        self.running_model.requires_grad_(False)
        self._running = dict(self.running_model.named_parameters())
        self.param_names, self.thetat_params, self.theta0_params, self.ema_params = [], [], [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                self.param_names.append(name)
                self.thetat_params.append(param)
                self.theta0_params.append(param.detach().to(self.device, torch.float32, copy=True))
                self.ema_params.append(self.theta0_params[-1].clone())

    @torch.no_grad()
    def _update_bema_weights(self, step: int) -> None:
        """Fold θₜ into the EMA and write EMA + αₜ·(θₜ − θ₀) into the running model."""
        beta, alpha = self._ema_beta(step), self._bema_alpha(step)
        for name, param, theta0, ema in zip(
            self.param_names, self.thetat_params, self.theta0_params, self.ema_params, strict=True
        ):
            theta = param.detach().to(self.device, torch.float32)
            ema.mul_(1.0 - beta).add_(theta, alpha=beta)
            self._running[name].copy_(ema + alpha * (theta - theta0))

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step < self.update_after:
            return
        if step == self.update_after:  # burn-in over: restart from the current weights
            for param, theta0, ema in zip(self.thetat_params, self.theta0_params, self.ema_params, strict=True):
                theta0.copy_(param.detach())
                ema.copy_(param.detach())
        elif (step - self.update_after) % self.update_freq == 0:
            self._update_bema_weights(step)
            logger.info("Updated BEMA weights at step %d", step)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.running_model is not None:
            path = os.path.join(args.output_dir, "bema")
            self.running_model.save_pretrained(path)
            logger.info("Saved the BEMA model to %s", path)


# ------------------------------------------------------------------------------------------------------ win rate
class WinRateCallback(TrainerCallback):
    """At every evaluation, the policy's win rate against a reference, as a pairwise judge sees it.

    Before training, the reference answers the eval dataset's prompts (column `"prompt"`, plain text or
    conversational): the trainer's `ref_model` when it has one, else the model with its PEFT adapter disabled (the
    trainer's reference adapter when it keeps one), else the initial model itself. At each evaluation the policy
    answers the same prompts and `judge` compares every `[reference, policy]` pair; the callback logs
    `eval_win_rate`, the fraction of prompts where the policy's completion wins (ties, -1, count as not won).

    Args:
        judge: a `BasePairwiseJudge`.
        trainer: the trainer it is added to (`trainer.add_callback(callback)`), with an `eval_dataset`.
        generation_config: passed to `generate` for both models (None: the model's own).
        num_prompts: only the first `num_prompts` eval prompts (default: all).
        shuffle_order: passed to the judge (it shuffles each pair to cancel a position bias).
        use_soft_judge: ask the judge for the probability that the reference wins (`return_scores=True`); also
            logs `eval_avg_win_prob`, the policy's mean win probability, and a win is a probability below 0.5.

    The completions of the last evaluation are kept in `self.prompts`, `self.ref_completions`, `self.completions`.
    """

    def __init__(
        self,
        judge: Any,
        trainer: Any,
        generation_config: GenerationConfig | None = None,
        num_prompts: int | None = None,
        shuffle_order: bool = True,
        use_soft_judge: bool = False,
    ):
        from ..judges import BasePairwiseJudge

        if not isinstance(judge, BasePairwiseJudge):
            raise TypeError(
                f"WinRateCallback needs a pairwise judge (a `llm_trainer.judges.BasePairwiseJudge`, e.g. PairRMJudge "
                f"or OpenAIPairwiseJudge); got {type(judge).__name__}."
            )
        if num_prompts is not None and num_prompts < 1:
            raise ValueError(f"`num_prompts` must be a positive number of prompts or None; got {num_prompts}.")
        self.judge = judge
        self.trainer = trainer
        self.generation_config = generation_config
        self.shuffle_order = shuffle_order
        self.use_soft_judge = use_soft_judge
        self.eval_dataset = _eval_prompts(trainer, num_prompts, "WinRateCallback")
        self.prompts: list[str] = []
        self.ref_completions: list[str] = []
        self.completions: list[str] = []

    def _reference_context(self) -> contextlib.AbstractContextManager:
        """Entered around generation with the policy when the reference is the policy itself (PEFT or not)."""
        from accelerate.utils import is_peft_model

        trainer = self.trainer
        reference = getattr(trainer, "reference", None)
        if reference is not None and hasattr(reference, "context"):  # the preference trainers' ReferencePolicy
            return reference.context(trainer.model)
        if is_peft_model(trainer.model):
            return trainer.model.disable_adapter()
        return contextlib.nullcontext()  # before training: the initial model

    def _generate(self, model: Any, args: TrainingArguments, processing_class: Any) -> tuple[list[str], list[str]]:
        """Every process answers its share of the prompts with `model`; all get the gathered prompts and answers."""
        from accelerate.utils import gather_object

        from ..data_utils import maybe_apply_chat_template

        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        accelerator = self.trainer.accelerator
        with accelerator.split_between_processes(list(self.eval_dataset["prompt"])) as shard:
            prompts = [maybe_apply_chat_template({"prompt": p}, processing_class)["prompt"] for p in shard]
            completions = _generate_completions(
                prompts,
                model=model,
                tokenizer=tokenizer,
                accelerator=accelerator,
                generation_config=self.generation_config,
                batch_size=args.per_device_eval_batch_size,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            )
        return gather_object(prompts), gather_object(completions)

    def on_train_begin(self, args, state, control, processing_class=None, **kwargs):
        processing_class = processing_class or self.trainer.processing_class
        ref_model = getattr(self.trainer, "ref_model", None)
        if ref_model is not None:
            self.prompts, self.ref_completions = self._generate(ref_model, args, processing_class)
        else:
            with self._reference_context():
                self.prompts, self.ref_completions = self._generate(self.trainer.model_wrapped, args, processing_class)

    def on_evaluate(self, args, state, control, processing_class=None, **kwargs):
        processing_class = processing_class or self.trainer.processing_class
        _, self.completions = self._generate(self.trainer.model_wrapped, args, processing_class)
        if not self.trainer.accelerator.is_main_process:
            return
        pairs = [[ref, policy] for ref, policy in zip(self.ref_completions, self.completions, strict=True)]
        metrics: dict[str, float] = {}
        if self.use_soft_judge:
            ref_win_probs = [
                float(p) for p in self.judge.judge(self.prompts, pairs, self.shuffle_order, return_scores=True)
            ]
            metrics["eval_avg_win_prob"] = 1.0 - sum(ref_win_probs) / len(ref_win_probs)
            winners = [1 if p < 0.5 else 0 for p in ref_win_probs]
        else:
            winners = list(self.judge.judge(self.prompts, pairs, self.shuffle_order))
        if len(winners) != len(pairs):
            raise ValueError(f"The judge returned {len(winners)} decisions for {len(pairs)} pairs.")
        metrics["eval_win_rate"] = sum(winner == 1 for winner in winners) / len(winners)
        self._report_table(args, state, winners)
        self.trainer.log(metrics)

    def _report_table(self, args: TrainingArguments, state: Any, winners: list[int]) -> None:
        report_to = args.report_to or []
        if "wandb" not in report_to and "comet_ml" not in report_to:
            return
        import pandas as pd

        table = pd.DataFrame(
            {
                "step": [str(state.global_step)] * len(winners),
                "prompt": self.prompts,
                "reference model": self.ref_completions,
                "policy": self.completions,
                "winner_index": winners,
            }
        )
        if "wandb" in report_to:
            _require("wandb", "Logging win-rate completions to Weights & Biases")
            import wandb

            if wandb.run is not None:
                wandb.log({"win_rate_completions": wandb.Table(dataframe=table)})
        if "comet_ml" in report_to:
            from .utils import log_table_to_comet_experiment

            log_table_to_comet_experiment("win_rate_completions.csv", table)


# ----------------------------------------------------------------------------------------------------- merging
_MERGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {"policy_model_weight": 0.5, "target_model_weight": 0.5},
    "ties": {
        "policy_model_weight": 1.0,
        "policy_model_density": [1.0, 0.7, 0.1],
        "target_model_weight": 1.0,
        "target_model_density": [1.0],
        "normalize": 1.0,
    },
    "slerp": {"t_values": 0.5},
}
_MERGE_DEFAULTS["dare_ties"] = dict(_MERGE_DEFAULTS["ties"])


class MergeConfig:
    """How `MergeModelCallback` merges a full (non-PEFT) policy with a target model through `mergekit`.

    `method` is `"linear"` (weighted average), `"ties"`, `"dare_ties"` (TIES / DARE-TIES with per-model densities)
    or `"slerp"` (spherical interpolation by `t_values`). Each sets its defaults as attributes, which can be changed
    before training: `policy_model_weight`, `target_model_weight` (linear, ties), `policy_model_density`,
    `target_model_density`, `normalize` (ties), `t_values` (slerp), and `dtype` (`"float16"`). `policy_model_path`
    is set by the callback to the checkpoint; `target_model_path` defaults to the model the policy was loaded from.
    """

    def __init__(self, method: str = "linear"):
        if method not in _MERGE_DEFAULTS:
            raise ValueError(f"Unsupported merge method {method!r}; expected one of {sorted(_MERGE_DEFAULTS)}.")
        self.method = method
        self.policy_model_path: str | None = None
        self.target_model_path: str | None = None
        self.dtype = "float16"
        for name, value in _MERGE_DEFAULTS[method].items():
            setattr(self, name, copy.deepcopy(value))

    def _as_dict(self) -> dict[str, Any]:
        """The mergekit configuration, as the dictionary `MergeConfiguration.model_validate` reads."""
        if self.method == "linear":
            return {
                "dtype": self.dtype,
                "merge_method": "linear",
                "models": [
                    {"model": self.policy_model_path, "parameters": {"weight": self.policy_model_weight}},
                    {"model": self.target_model_path, "parameters": {"weight": self.target_model_weight}},
                ],
            }
        base = {"model": {"path": self.policy_model_path, "revision": None}, "lora": None}
        target = {"model": {"path": self.target_model_path, "revision": None}, "lora": None}
        if self.method == "slerp":
            models = [{"model": target, "parameters": None}]
            parameters: dict[str, Any] = {"t": self.t_values}
        else:
            models = [
                {
                    "model": target,
                    "parameters": {"density": self.target_model_density, "weight": self.target_model_weight},
                },
                {
                    "model": base,
                    "parameters": {"density": self.policy_model_density, "weight": self.policy_model_weight},
                },
            ]
            parameters = {"normalize": self.normalize}
        return {
            "merge_method": self.method,
            "models": models,
            "parameters": parameters,
            "base_model": base,
            "dtype": self.dtype,
        }

    def create(self) -> Any:
        """The `mergekit.config.MergeConfiguration` (needs `mergekit`)."""
        _require("mergekit", "Merging full models (MergeConfig)")
        from mergekit.config import MergeConfiguration

        return MergeConfiguration.model_validate(self._as_dict())

    def _create_as(self, method: str) -> Any:
        if method != self.method:
            raise ValueError(f"This MergeConfig is for the {self.method!r} method, not {method!r}.")
        return self.create()

    def create_merge_config_linear(self) -> Any:
        """`create()` for a linear config (TRL's name)."""
        return self._create_as("linear")

    def create_merge_config_ties(self) -> Any:
        """`create()` for a TIES config (TRL's name)."""
        return self._create_as("ties")

    def create_merge_config_dare_ties(self) -> Any:
        """`create()` for a DARE-TIES config (TRL's name)."""
        return self._create_as("dare_ties")

    def create_merge_config_slerp(self) -> Any:
        """`create()` for a SLERP config (TRL's name)."""
        return self._create_as("slerp")


def merge_models(config: Any, out_path: str) -> None:
    """Run a mergekit `MergeConfiguration` and write the merged model (and the tokenizer) to `out_path`."""
    _require("mergekit", "merge_models")
    from mergekit.merge import MergeOptions, run_merge

    run_merge(config, out_path=out_path, options=MergeOptions(cuda=torch.cuda.is_available(), copy_tokenizer=True))


def upload_model_to_hf(folder_path: str, repo_id: str) -> None:
    """Create the Hub model repository `repo_id` (if needed) and upload `folder_path` to it."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo = api.create_repo(repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(folder_path=folder_path, repo_id=repo.repo_id, repo_type="model")


class MergeModelCallback(TrainerCallback):
    """Save a merged copy of the trained model in `<output_dir>/checkpoint-<step>/merged`: at every checkpoint with
    `merge_at_every_checkpoint`, otherwise once at the end of training.

    - PEFT model (LoRA & co.): the adapter is merged into the base weights (`merge_and_unload` on a copy; the
      training model keeps its adapter) and the plain `transformers` model is saved with the tokenizer, loadable by
      `AutoModelForCausalLM.from_pretrained`. `merge_config` is not used.
    - Full model: merged with a target model (by default the model it was loaded from) through `mergekit`, as
      `merge_config` says (default: `MergeConfig("linear")`, the average of the two); needs `pip install mergekit`,
      checked before training.

    Args:
        merge_config: a `MergeConfig` for the full-model merge.
        merge_at_every_checkpoint: merge at every save instead of only at the end.
        push_to_hub: upload each merged folder to the Hub repository `<output_dir name>_checkpoint-<step>_merged`.

    Only the main process writes. Under DeepSpeed ZeRO-3 or FSDP with sharded weights the PEFT merge is not supported
    (save the adapter, then merge it offline).
    """

    def __init__(
        self,
        merge_config: MergeConfig | None = None,
        merge_at_every_checkpoint: bool = False,
        push_to_hub: bool = False,
    ):
        if merge_config is not None and not isinstance(merge_config, MergeConfig):
            raise TypeError(f"`merge_config` must be a MergeConfig or None; got {type(merge_config).__name__}.")
        self.merge_config = merge_config
        self.merge_at_every_checkpoint = merge_at_every_checkpoint
        self.push_to_hub = push_to_hub
        self.merged_paths: list[str] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from accelerate.utils import is_peft_model

        if model is not None and not is_peft_model(model):
            _require("mergekit", "MergeModelCallback with a full (non-PEFT) model")

    def _merge_and_maybe_push(self, args: TrainingArguments, state: Any, model: Any, processing_class: Any) -> None:
        from accelerate.utils import extract_model_from_parallel, is_peft_model

        if not state.is_world_process_zero:
            return
        model = extract_model_from_parallel(model)
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        merged_path = os.path.join(checkpoint, "merged")
        if is_peft_model(model):
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(merged_path)
            if processing_class is not None:
                processing_class.save_pretrained(merged_path)
            del merged
        else:
            config = copy.copy(self.merge_config or MergeConfig())
            if not os.path.isdir(checkpoint) or not os.path.exists(os.path.join(checkpoint, "config.json")):
                model.save_pretrained(checkpoint)  # the end of training without a final checkpoint
                if processing_class is not None:
                    processing_class.save_pretrained(checkpoint)
            config.policy_model_path = checkpoint
            if config.target_model_path is None:
                from .utils import get_config_model_id

                config.target_model_path = get_config_model_id(model.config)
            merge_models(config.create(), merged_path)
        self.merged_paths.append(merged_path)
        logger.info("Saved the merged model to %s", merged_path)
        if self.push_to_hub:
            name = os.path.basename(os.path.normpath(args.output_dir))
            upload_model_to_hf(merged_path, f"{name}_checkpoint-{state.global_step}_merged")

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.merge_at_every_checkpoint:
            self._merge_and_maybe_push(args, state, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not self.merge_at_every_checkpoint:
            self._merge_and_maybe_push(args, state, model, processing_class)
