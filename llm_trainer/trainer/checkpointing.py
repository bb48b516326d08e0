"""Checkpoints that survive a kill.

A checkpoint is written into a staging folder beside its final place (`tmp-checkpoint-N/`) and renamed into place
(`checkpoint-N/`) only once every file is written, so a process killed at any moment leaves the previous complete
checkpoint, or the new complete one, never a half-written `checkpoint-N`. Folders named like checkpoints that are
incomplete anyway (written by an older version or another tool) are skipped on resume, with a warning naming them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

STAGING_PREFIX = "tmp-"
"""Prefix of a folder being written; `checkpoint-*` globs and transformers' checkpoint regex never match it."""

_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def staging_path(final: str) -> str:
    """Where the checkpoint bound for `final` is written before it is complete."""
    parent, name = os.path.split(os.path.normpath(final))
    return os.path.join(parent, f"{STAGING_PREFIX}{name}")


@contextlib.contextmanager
def staged_folder(final: str, accelerator: Any, is_writer: bool) -> Iterator[str]:
    """The folder every process writes the checkpoint bound for `final` into (`tmp-<name>/<name>` beside it), renamed
    to `final` by the writing process once the block has completed on every process. A block that raises leaves
    `final` as it was."""
    root = staging_path(final)
    if is_writer:
        shutil.rmtree(root, ignore_errors=True)
    accelerator.wait_for_everyone()
    staged = os.path.join(root, os.path.basename(os.path.normpath(final)))
    yield staged
    accelerator.wait_for_everyone()
    if is_writer:
        commit_folder(staged, final)
        shutil.rmtree(root, ignore_errors=True)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def full_model_save(trainer: Any, internal_call: bool = False) -> Iterator[None]:
    """Around `Trainer.save_model`: under FSDP with sharded state dicts (`fsdp_state_dict_type: SHARDED_STATE_DICT`),
    transformers' `save_model` writes no model at all, silently (checkpoints get the per-rank shards elsewhere). For
    a `save_model()` outside checkpoints (`internal_call` False), the plugin is switched to full state dicts for the
    call, so the gathered weights are written as a `from_pretrained`-loadable model on the main process (every
    process must call it: the gather is a collective); the setting is restored after. Elsewhere a no-op."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    if internal_call or plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
        yield
        return
    from torch.distributed.fsdp import StateDictType

    sharded = plugin.state_dict_type
    plugin.state_dict_type = StateDictType.FULL_STATE_DICT
    try:
        yield
    finally:
        plugin.state_dict_type = sharded


def commit_folder(staged: str, final: str) -> None:
    """Move the complete folder `staged` to `final`, replacing what is there.

    `os.replace` of a folder is atomic but needs an empty (or absent) target, so an existing `final` is first moved
    aside; a kill between the two renames leaves `final` absent and the older checkpoints intact.
    """
    if os.path.lexists(final):
        aside = staging_path(final) + ".old"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(staged, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))


def is_complete_checkpoint(folder: str) -> bool:
    """Whether `folder` holds a whole checkpoint: transformers writes `trainer_state.json` last, so a folder whose
    state file is missing or does not parse was cut off while being written."""
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest complete `checkpoint-N` folder in `output_dir` (None when there is none), warning about each newer
    incomplete one it skips."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := _CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        if is_complete_checkpoint(folder):
            return folder
        logger.warning(
            f"Skipping the incomplete checkpoint {folder}: it has no readable {TRAINER_STATE_NAME} (its save was "
            "interrupted). Resuming from the newest complete checkpoint before it instead; delete the folder to "
            "silence this warning."
        )
    return None


def remove_stale_staging(output_dir: str) -> None:
    """Delete staging folders left by a save that was killed (they are never resumed from)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def rotate_checkpoints(trainer: Any, run_dir: str) -> None:
    """Delete the checkpoints beyond `save_total_limit` as transformers does after a save (sorted by time, keeping the
    newest and the best)."""
    try:
        from transformers.trainer_utils import rotate_checkpoints as rotate
    except ImportError:  # transformers < 5 keeps it as a method
        trainer._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
        return
    rotate(
        output_dir=run_dir,
        save_total_limit=trainer.args.save_total_limit,
        best_model_checkpoint=trainer.state.best_model_checkpoint,
        use_mtime=True,
    )


def _fsync_dir(path: str) -> None:
    """Flush the directory entry of a rename (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
