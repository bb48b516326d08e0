"""Training callbacks with TRL's names."""

from __future__ import annotations

from transformers import TrainerCallback

__all__ = ["RichProgressCallback"]


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
