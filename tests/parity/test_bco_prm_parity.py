"""BCOTrainer / PRMTrainer parity with TRL 1.13, the last release that had them (removed from TRL in 1.14).

TRL 1.13 cannot share the venv with the installed TRL 1.16, so these tests run it in a subprocess from an unzipped
wheel and are skipped unless `TRL_1_13_PATH` names that folder:

    pip download --no-deps "trl==1.13.*" -d /tmp/trl113 && unzip -q /tmp/trl113/*.whl -d /tmp/trl113
    TRL_1_13_PATH=/tmp/trl113 pytest tests/parity/test_bco_prm_parity.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .helpers import assert_close_metrics

TRL_1_13 = os.environ.get("TRL_1_13_PATH")
pytestmark = pytest.mark.skipif(not TRL_1_13, reason="set TRL_1_13_PATH to an unzipped trl 1.13 wheel")

SCRIPT = r"""
import json, os, sys
os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification
from llm_trainer.testing import get_tokenizer, zen_dataset

if sys.argv[1] == "trl":
    import trl
    assert trl.__version__.startswith("1.13"), trl.__version__
    from trl.experimental.bco import BCOConfig, BCOTrainer
    from trl.experimental.prm import PRMConfig, PRMTrainer
else:
    from llm_trainer import BCOConfig, BCOTrainer, PRMConfig, PRMTrainer
algo, model_path, out = sys.argv[2:5]
common = dict(output_dir=out, report_to="none", max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
              logging_steps=1, bf16=False, save_strategy="no", seed=7)
if algo == "bco":
    trainer = BCOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path),
                         args=BCOConfig(**common, remove_unused_columns=False), processing_class=get_tokenizer(),
                         train_dataset=zen_dataset("standard_unpaired_preference"))
else:
    rows = [{"prompt": "Beautiful is better than", "completions": [", let me think...", " ugly."], "labels": [False, True]},
            {"prompt": "Simple is better than", "completions": [" complex.", " so", " there."], "labels": [True, True, False]}]
    trainer = PRMTrainer(model=AutoModelForTokenClassification.from_pretrained(model_path),
                         args=PRMConfig(**common, train_on_last_step_only=algo == "prm_last"),
                         processing_class=get_tokenizer(), train_dataset=Dataset.from_list(rows * 4))
trainer.train()
print("LOGS" + json.dumps([e for e in trainer.state.log_history if "loss" in e]))
"""


def _run(which: str, algo: str, model_path: str, out: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": TRL_1_13 if which == "trl" else ""}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, which, algo, model_path, out], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("LOGS"))[4:])


@pytest.fixture(scope="module")
def prm_model_path(tmp_path_factory) -> str:
    from llm_trainer.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-prm"), task="token-classification")


@pytest.mark.parametrize("algo", ["bco", "prm", "prm_last"])
def test_matches_trl_1_13(algo, tiny_model_path, prm_model_path, tmp_path):
    model_path = tiny_model_path if algo == "bco" else prm_model_path
    ours = _run("ours", algo, model_path, str(tmp_path / "ours"))
    theirs = _run("trl", algo, model_path, str(tmp_path / "trl"))
    assert len(ours) == len(theirs) == 4
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert set(b) <= set(a), f"step {step}: TRL 1.13 metrics missing: {set(b) - set(a)}"
        assert set(a) - set(b) <= {"entropy", "num_tokens"}, set(a) - set(b)
        keys = sorted(set(b) - {"epoch", "learning_rate", "step", "logits/chosen", "logits/rejected"})
        # rewards/* and delta are β·(logp − ref_logp), BCOConfig's default β = 0.1: within float32 rounding of β·|logp|
        assert_close_metrics(a, b, keys, rtol=1e-4, beta=0.1, where=f"step {step}: ")
