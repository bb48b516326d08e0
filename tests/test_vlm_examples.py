"""The vision-language examples in `examples/` run as users run them and train (loss, reward printed)."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    ("script", "argv", "pattern"),
    [
        ("vlm_sft.py", [], r"qwen2_vl: loss [0-9.]+ -> [0-9.]+"),
        ("vlm_dpo.py", ["--family", "llava"], r"llava: loss [0-9.]+, reward accuracy [0-9.]+"),
        ("vlm_grpo.py", [], r"qwen2_vl GRPOTrainer: reward -?[0-9.]+, completion length [0-9.]+"),
        (
            "vlm_grpo.py",
            ["--family", "llava", "--rloo"],
            r"llava RLOOTrainer: reward -?[0-9.]+, completion length [0-9.]+",
        ),
    ],
)
def test_vlm_example_runs(script, argv, pattern, in_tmp, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    assert re.fullmatch(pattern, capsys.readouterr().out.strip().splitlines()[-1])
