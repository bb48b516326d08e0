"""Training callbacks with TRL's names."""

from __future__ import annotations

from transformers import TrainerCallback

__all__ = ["RichProgressCallback", "SyncRefModelCallback"]


class RichProgressCallback(TrainerCallback):
    """A rich progress bar for training and evaluation, with the latest logged metrics beneath it.

    Pass it in `callbacks=[RichProgressCallback()]`; it replaces nothing, so set `disable_tqdm=True` to drop
    transformers' own bar.
    """

    def __init__(self):
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
        """Move `target_model`'s parameters a fraction `alpha` of the way towards `model`'s, in place."""
        import torch

        with torch.no_grad():
            for target, source in zip(target_model.parameters(), model.parameters(), strict=True):
                target.mul_(1.0 - alpha).add_(source.to(target.dtype), alpha=alpha)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.ref_model is None or model is None or state.global_step % args.ref_model_sync_steps != 0:
            return
        if self.accelerator is not None:
            model = self.accelerator.unwrap_model(model)
        self.sync_target_model(model, self.ref_model, args.ref_model_mixup_alpha)
