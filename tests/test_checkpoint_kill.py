"""Checkpoints survive a kill: a training process SIGKILLed at any stage of a save (or at a random moment) leaves
only complete checkpoints, and a new process resumes from the newest one with the same per-step losses as a run that
was never interrupted. Also: incomplete `checkpoint-N` folders from elsewhere are skipped, and the simple API's
`save_checkpoint` is staged the same way."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import Dataset

from llm_trainer import SFTConfig, SFTTrainer
from llm_trainer.trainer.checkpointing import last_complete_checkpoint

SCRIPT = Path(__file__).with_name("checkpoint_kill_run.py")
MAX_STEPS = 12  # checkpoint_kill_run.MAX_STEPS


def run(model: str, out: Path, *kill: str) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), model, str(out), *kill], env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.returncode


def losses(out: Path) -> list[tuple[int, float]]:
    lines = (out / "losses.jsonl").read_text().split("\n")[:-1]  # whole lines: the writer may be mid-line
    return [(entry["step"], entry["loss"]) for entry in map(json.loads, lines)]


def check_against(reference: dict[int, float], out: Path) -> None:
    """Every step ever logged (before a kill, or redone after a resume) has the uninterrupted run's loss, and every
    step was reached."""
    logged = losses(out)
    assert {step for step, _ in logged} == set(reference)
    for step, loss in logged:
        # Same machine, same thread count, same code path: resuming must reproduce the losses bit for bit.
        assert loss == reference[step], f"step {step}: {loss} after resume vs {reference[step]} uninterrupted"


@pytest.fixture(scope="module")
def reference(tiny_model_path, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert run(tiny_model_path, out) == 0
    result = dict(losses(out))
    assert sorted(result) == list(range(1, MAX_STEPS + 1))
    return result


def test_kill_at_each_stage_of_a_save_then_resume(tiny_model_path, reference, tmp_path):
    """One run killed five times, at a different stage of a save each time; each new process resumes from the newest
    complete checkpoint and the run ends with the uninterrupted run's losses."""
    kills = [("weights", 2), ("optimizer", 4), ("rng", 6), ("state", 8), ("committed", 10)]
    for stage, step in kills:
        assert run(tiny_model_path, tmp_path, stage, str(step)) == -signal.SIGKILL, f"not killed at {stage}"
        newest = last_complete_checkpoint(str(tmp_path))
        # Killed before the rename, the newest complete checkpoint is the previous step's; after it, this step's.
        expected = step if stage == "committed" else step - 1
        assert newest == str(tmp_path / f"checkpoint-{expected}"), (stage, os.listdir(tmp_path))
    assert run(tiny_model_path, tmp_path) == 0
    check_against(reference, tmp_path)
    names = os.listdir(tmp_path)
    assert not [name for name in names if name.startswith("tmp-")], names  # staging folders cleaned up
    assert sorted(name for name in names if name.startswith("checkpoint-")) == ["checkpoint-11", "checkpoint-12"]


def test_kill_at_random_moments_then_resume(tiny_model_path, reference, tmp_path):
    """SIGKILLs at random moments (seeded), wherever they land: every kill leaves a resumable checkpoint."""
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for target in (3, 7):
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), tiny_model_path, str(tmp_path)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < deadline:  # wait until step `target` is logged
                if (tmp_path / "losses.jsonl").exists() and max(s for s, _ in losses(tmp_path)) >= target:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.25))  # then land somewhere in the next step or its save
        finally:
            proc.kill()
        assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed"
        assert last_complete_checkpoint(str(tmp_path)) is not None
    assert run(tiny_model_path, tmp_path) == 0
    check_against(reference, tmp_path)


# ----------------------------------------------------------------------------------------------- in process
TEXT = Dataset.from_dict({"text": [f"line {i} of a tiny corpus" for i in range(8)]})


def sft(model: str, out: Path, **overrides) -> SFTTrainer:
    options = dict(
        max_steps=3,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_steps=1,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    return SFTTrainer(model, args=SFTConfig(str(out), **{**options, **overrides}), train_dataset=TEXT)


def test_resume_true_skips_an_incomplete_newest_checkpoint(tiny_model_path, tmp_path, caplog):
    sft(tiny_model_path, tmp_path).train()
    broken = tmp_path / "checkpoint-9"  # as an older version or another tool may leave it: weights, no state
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\0" * 16)
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-7" / "trainer_state.json").write_text('{"global_st')  # cut off mid-write
    trainer = sft(tiny_model_path, tmp_path, max_steps=4)
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)
    skipped = [r.getMessage() for r in caplog.records if "Skipping the incomplete checkpoint" in r.getMessage()]
    assert len(skipped) == 2 and str(broken) in skipped[0] and "checkpoint-7" in skipped[1]
    assert trainer.state.global_step == 4
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2, 3, 4]


def test_resume_true_without_a_complete_checkpoint_says_so(tiny_model_path, tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match="No complete checkpoint found in output directory"):
        sft(tiny_model_path, tmp_path).train(resume_from_checkpoint=True)


def test_a_finished_run_resumed_trains_nothing(tiny_model_path, tmp_path, caplog):
    """max_steps=3 ends mid-epoch (4 steps per epoch): transformers would train a 4th step on resume."""
    sft(tiny_model_path, tmp_path).train()
    trainer = sft(tiny_model_path, tmp_path)
    with caplog.at_level(logging.WARNING):
        output = trainer.train(resume_from_checkpoint=True)
    assert output.global_step == 3 and trainer.state.global_step == 3
    assert "nothing left to train" in caplog.text and "checkpoint-3" in caplog.text


def test_simple_api_save_checkpoint_is_staged(tiny_model_path, tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous checkpoint at `path` whole, and no half-written one."""
    trainer = sft(tiny_model_path, tmp_path / "run", save_strategy="no")
    trainer.train()
    path = trainer.save_checkpoint(tmp_path / "ckpt")
    before = sorted(os.listdir(path))
    assert "trainer_state.json" in before and "optimizer.pt" in before

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("interrupted while saving")

    monkeypatch.setattr(SFTTrainer, "_save_rng_state", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(path)
    assert sorted(os.listdir(path)) == before
    assert json.loads((Path(path) / "trainer_state.json").read_text())["global_step"] == 3
