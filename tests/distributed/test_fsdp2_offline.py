"""The offline trainers (SFT, DPO, KTO, BCO, Reward, ORPO, CPO) under FSDP2 on two CPU processes (gloo).

Accelerate's real FSDP2 path runs through the test-only shim (`fsdp_shim.enable_cpu_fsdp2`), launched as TRL users
launch it: `accelerate launch --config_file fsdp2.yaml` (and, for sharded checkpoints, `fsdp_config` in the training
arguments under `torchrun`). Every rank asserts that the policy and the reference model ARE sharded DTensors
(matching losses alone would also pass under a silent DDP fallback), that the fused log-prob head saw a full head
weight while every other FSDP group stayed sharded (one layer gathered, not the model), and that the weights changed.
SFT and DPO then match a one-process run with twice the per-device batch (and TRL under the same launch, slow);
a run resumed from an FSDP2 checkpoint continues with the uninterrupted run's loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from .fsdp_run import fsdp2_config, run_torchrun

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

SCRIPT = Path(__file__).with_name("fsdp2_offline_run.py")
UNPAIRED_AND_REWARD = ("kto", "bco", "reward", "orpo", "cpo")
# Two processes with 2 rows each against one process with 4: the same numbers summed in another order, so float32
# rounding of a loss of 0.7-7 (1e-7 relative per operation, ~1e-6 after the backbone and two optimizer steps).
LOSS_RTOL = 1e-5


def _jobs(batch: int, steps: int = 3) -> list[dict]:
    """SFT, DPO (saving at step 2) and TR-DPO (`sync_ref_model`)."""
    sync = {"sync_ref_model": True, "ref_model_sync_steps": 1}  # TR-DPO: the sharded reference mixes in the policy
    return [
        {"algorithm": "sft", "batch": batch, "steps": 2, "save_model": True},
        {"algorithm": "dpo", "batch": batch, "steps": steps, "save_steps": 2, "name": "dpo", "dir": "dpo"},
        {"algorithm": "dpo", "batch": batch, "steps": 2, "options": sync, "name": "dpo_sync", "dir": "dpo_sync"},
    ]


def _launch(package: str, jobs: list[dict], models: dict, out: Path, **launch) -> list[dict]:
    spec = out / "spec.json"
    out.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps({"package": package, "models": models, "out": str(out), "jobs": jobs}))
    return run_torchrun(SCRIPT, [spec], timeout=600, **launch)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    from llm_trainer.testing import make_tiny_model

    root = tmp_path_factory.mktemp("fsdp2-models")
    return {
        "causal": make_tiny_model(root / "llama", architecture="llama"),
        "reward": make_tiny_model(root / "reward", architecture="llama", task="sequence-classification"),
    }


@pytest.fixture(scope="module")
def fsdp_results(models, tmp_path_factory) -> list[dict]:
    """One `accelerate launch --config_file fsdp2.yaml --num_processes 2` (full state dicts) of every offline trainer,
    plus DPO resumed from its step-2 checkpoint."""
    out = tmp_path_factory.mktemp("fsdp2-offline")
    jobs = _jobs(batch=2)
    jobs.append({**jobs[1], "name": "dpo_resumed", "resume": "checkpoint-2"})
    jobs += [{"algorithm": algorithm, "batch": 2, "steps": 2} for algorithm in UNPAIRED_AND_REWARD]
    return _launch("llm_trainer", jobs, models, out, accelerate_config=fsdp2_config(out))


@pytest.fixture(scope="module")
def single_results(models, tmp_path_factory) -> dict:
    """SFT and DPO in one process with twice the per-device batch."""
    out = tmp_path_factory.mktemp("one-process")
    return _launch("llm_trainer", _jobs(batch=4), models, out, nproc=1)[0]


def _losses(result: dict) -> list[float]:
    return [entry["loss"] for entry in result["logs"]]


def _assert_same_losses(ours: list[float], theirs: list[float], rtol: float = LOSS_RTOL) -> None:
    assert len(ours) == len(theirs) > 0
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), 1):
        assert math.isclose(a, b, rel_tol=rtol), f"step {step}: {a} vs {b}"


def test_every_trainer_is_sharded_on_every_rank(fsdp_results):
    assert len(fsdp_results) == 2
    for rank, results in enumerate(fsdp_results):
        assert set(results) == {"sft", "dpo", "dpo_sync", "dpo_resumed", *UNPAIRED_AND_REWARD}
        for name, result in results.items():
            where = f"rank {rank}, {name}"
            assert result["distributed_type"] == "DistributedType.FSDP", where
            assert result["world_size"] == 2, where
            assert result["sharded"] == "yes", f"{where}: {result['sharded']}"
            if name in ("dpo", "dpo_sync", "dpo_resumed", "kto", "bco"):
                assert result["ref_sharded"] == "yes", f"{where}: reference {result['ref_sharded']}"
            assert result["compared"] > 0 and result["changed"] == result["compared"], where
            assert len(result["logs"]) == (3 if name in ("dpo", "dpo_resumed") else 2), where
            assert all(math.isfinite(loss) for loss in _losses(result)), where
    # the ranks log the same (gathered) metrics
    for name in fsdp_results[0]:
        assert _losses(fsdp_results[0][name]) == _losses(fsdp_results[1][name]), name


def test_fused_head_gathers_only_the_head(fsdp_results, models):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(models["causal"])
    head_numel = config.vocab_size * config.hidden_size
    for rank, results in enumerate(fsdp_results):
        for name, result in results.items():
            if name == "reward":  # a classifier: no log-prob head
                continue
            head, where = result["head"], f"rank {rank}, {name}"
            assert head["calls"] > 0, where
            assert head["weight_dtensor"] == 0, f"{where}: the head got a sharded weight"
            assert head["weight_numel"] == [head_numel], where  # the full head, gathered
            assert head["max_other_unsharded"] == 0, f"{where}: other FSDP groups were gathered during the head"
            # the head's group: lm_head and the final norm (Accelerate's tail group), nothing else
            assert head["max_head_group"] == head_numel + config.hidden_size, where


def test_sft_and_dpo_match_one_process_with_twice_the_batch(fsdp_results, single_results):
    assert single_results["sft"]["world_size"] == 1
    for name in ("sft", "dpo", "dpo_sync"):
        _assert_same_losses(_losses(fsdp_results[0][name]), _losses(single_results[name]))
        ours = [entry["grad_norm"] for entry in fsdp_results[0][name]["logs"]]
        theirs = [entry["grad_norm"] for entry in single_results[name]["logs"]]
        _assert_same_losses(ours, theirs, rtol=1e-4)
    # the synced reference moved after step 1: TR-DPO's step-2 loss is not plain DPO's
    assert not math.isclose(_losses(fsdp_results[0]["dpo_sync"])[1], _losses(fsdp_results[0]["dpo"])[1], rel_tol=1e-3)


def test_resume_from_full_state_dict_checkpoint(fsdp_results):
    for results in fsdp_results:
        assert results["sft"]["saved_model_matches"] is True  # `save_model()` wrote the gathered, trained weights
        straight, resumed = results["dpo"], results["dpo_resumed"]
        assert "checkpoint-2" in straight["checkpoints"]
        assert [entry["step"] for entry in resumed["logs"]] == [1, 2, 3]  # steps 1-2 restored, step 3 trained
        _assert_same_losses(_losses(resumed), _losses(straight), rtol=1e-6)


@pytest.mark.slow
def test_sharded_state_dict_checkpoint_resumes(models, fsdp_results, tmp_path):
    """FSDP2 asked through `fsdp_config` in the training arguments (plain `torchrun`), with sharded checkpoints
    (`torch.distributed.checkpoint` shards per rank): resuming continues with the uninterrupted run's loss. DPO with
    precomputed reference log-probs under the same launch gives the losses of DPO with a sharded reference model."""
    fsdp_config = {"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT"}
    job = {"algorithm": "sft", "batch": 2, "steps": 3, "save_steps": 2, "dir": "sft", "fsdp_config": fsdp_config}
    # the final `save_model()` writes the gathered model (transformers writes none with sharded state dicts)
    jobs = [{**job, "name": "straight", "save_model": True}, {**job, "name": "resumed", "resume": "checkpoint-2"}]
    # and DPO with reference log-probs computed before training (no reference model kept)
    precomputed = {"algorithm": "dpo", "batch": 2, "steps": 2, "precompute": True, "fsdp_config": fsdp_config}
    jobs.append({**precomputed, "name": "dpo_precomputed"})
    results = _launch("llm_trainer", jobs, models, tmp_path, env={"LLM_TRAINER_CACHE": str(tmp_path / "cache")})
    checkpoint = tmp_path / "sft" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").exists()  # sharded, not one full file
    assert not (checkpoint / "pytorch_model_fsdp.bin").exists()
    for results_of_rank in results:
        straight, resumed = results_of_rank["straight"], results_of_rank["resumed"]
        assert straight["sharded"] == resumed["sharded"] == "yes"
        assert straight["saved_model_matches"] is True
        assert [entry["step"] for entry in resumed["logs"]] == [1, 2, 3]
        _assert_same_losses(_losses(resumed), _losses(straight), rtol=1e-6)
        assert results_of_rank["dpo_precomputed"]["ref_sharded"] is None  # no reference model to shard
        _assert_same_losses(_losses(results_of_rank["dpo_precomputed"]), _losses(fsdp_results[0]["dpo"])[:2])


@pytest.mark.slow
def test_sft_and_dpo_match_trl_under_the_same_launch(models, fsdp_results, tmp_path):
    pytest.importorskip("trl")
    theirs = _launch("trl", _jobs(batch=2)[:2], models, tmp_path, accelerate_config=fsdp2_config(tmp_path))
    for rank, results in enumerate(theirs):
        for name in ("sft", "dpo"):
            assert results[name]["sharded"] == "yes", f"TRL rank {rank}, {name}: {results[name]['sharded']}"
            _assert_same_losses(_losses(fsdp_results[rank][name]), _losses(results[name]))


@pytest.mark.slow
def test_lora_under_fsdp2_matches_one_process(models, tmp_path):
    """SFT and DPO with a LoRA adapter (the reference: the policy with its adapter off): the frozen base stays put,
    the adapters train, and the losses match one process with twice the batch."""
    pytest.importorskip("peft")
    jobs = [{"algorithm": algorithm, "batch": 2, "steps": 2, "lora": True} for algorithm in ("sft", "dpo")]
    sharded = _launch("llm_trainer", jobs, models, tmp_path / "fsdp2", accelerate_config=fsdp2_config(tmp_path))
    single = _launch("llm_trainer", [{**job, "batch": 4} for job in jobs], models, tmp_path / "one", nproc=1)[0]
    for rank, results in enumerate(sharded):
        for name in ("sft", "dpo"):
            result, where = results[name], f"rank {rank}, {name}"
            assert result["distributed_type"] == "DistributedType.FSDP" and result["sharded"] == "yes", where
            assert result["compared"] > 0 and result["changed"] == 0, f"{where}: the frozen base model changed"
            assert result["adapters_trained"] > 0, where
            assert result["head"]["weight_dtensor"] == 0 and result["head"]["calls"] > 0, where
            _assert_same_losses(_losses(result), _losses(single[name]))
