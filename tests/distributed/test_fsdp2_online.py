"""The online trainers under FSDP2: two `torchrun` processes on CPU (gloo), Accelerate's real FSDP2 path forced by
the test-only shim (`fsdp_shim.py`), every rank asserting that the parameters ARE sharded DTensors (matching losses
alone would pass under a silent DDP fallback).

- GRPO: the same per-step losses as one process with twice the per-device batch (a deterministic rollout: the
  policy's own greedy completions, generated sharded, cut to lengths set by each row's place in its group); and, slow,
  as TRL's GRPOTrainer under the same launch.
- RLOO, distillation (the teacher sharded too) and PPO (policy and value model in one sharded wrapper) train, and
  every parameter moves; the KL references (GRPO, RLOO, PPO) are sharded as well.
- Sharded generation never hangs: one rank's completions end at their first token while the other's run to the
  limit, one rank has more prompts than the other (and then none): outputs equal unsharded generation.
- Slow: GKD (on-policy student samples, sharded teacher) and TeacherGRPO (the student is the sharded reference).
- GRPO's weight sync from FSDP2 ranks to a real `llm-trainer vllm-serve --backend transformers` server delivers the
  full trained weights: the server's greedy output equals the trainer's (and differs from the initial model's).

All scenarios run in one `torchrun` launch (module fixture) to keep start-up costs down; each launch has a timeout,
so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_trainer.testing import make_tiny_model
from llm_trainer.trainer.utils import free_port
from tests.conftest import serve

SCRIPT = Path(__file__).with_name("fsdp_online_run.py")
TIMEOUT = 400  # a hang (a rank stuck in a collective) fails here instead of stalling the suite
SCENARIOS = ("grpo", "rloo", "distill", "ppo", "sync", "lockstep")


def _env() -> dict[str, str]:
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    return env


def _launch(scenarios: str, models: dict, out: Path, options: dict, nproc: int) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    script = [str(SCRIPT), scenarios, json.dumps(models), str(out), json.dumps(options)]
    if nproc == 1:
        command = [sys.executable, *script]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        command = [*launcher, "--master_port", str(free_port()), *script]
    return subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _results(process: subprocess.Popen, scenarios: str, out: Path, nproc: int) -> dict[str, list[dict]]:
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"the run did not finish within {TIMEOUT} s (a rank stuck in a collective?):\n{output[-4000:]}")
    assert process.returncode == 0, output[-6000:]
    return {
        name: [json.loads((out / f"{name}.{rank}.json").read_text()) for rank in range(nproc)]
        for name in scenarios.split(",")
    }


@pytest.fixture(scope="module")
def models(tiny_model_path, tmp_path_factory) -> dict[str, str]:
    return {
        "policy": tiny_model_path,
        "teacher": make_tiny_model(tmp_path_factory.mktemp("fsdp-teacher"), seed=1, hidden_size=48),
        "reward": make_tiny_model(tmp_path_factory.mktemp("fsdp-rm"), task="sequence-classification", seed=1),
    }


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory) -> dict[str, dict[str, list[dict]]]:
    """The 2-process FSDP2 launch (every scenario) and, alongside it, the 1-process GRPO baseline."""
    root = tmp_path_factory.mktemp("fsdp-online")
    with serve(models["policy"]) as url:
        scenarios = ",".join(SCENARIOS)
        sharded = _launch(scenarios, models, root / "fsdp", {"fsdp": True, "server": url}, nproc=2)
        single = _launch("grpo", models, root / "single", {"fsdp": False, "per_device": 4}, nproc=1)
        return {
            "fsdp": _results(sharded, scenarios, root / "fsdp", 2),
            "single": _results(single, "grpo", root / "single", 1),
        }


def _assert_trained_sharded(ranks: list[dict]) -> None:
    for result in ranks:
        assert result["world_size"] == 2
        assert result["distributed_type"] == "DistributedType.FSDP"
        assert result["sharded"]  # every rank asserted DTensor shards (see fsdp_online_run.train)
        assert result["changed"] and len(result["changed"]) == result["num_parameters"], result["changed"]


def _assert_same_grpo_logs(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs) == 2
    for step, (a, b) in enumerate(zip(ours, theirs)):
        # The loss is O(0.3) (advantage x ratio terms); float32 sums in a different order agree to ~1e-7.
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), step
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), step
        for name in ("reward", "reward_std", "num_tokens", "completions/mean_length"):
            assert a[name] == pytest.approx(b[name], rel=1e-6), (step, name)
        # The KL metric is a mean over micro-batches, which hold other rows under another process layout.
        assert a["kl"] == pytest.approx(b["kl"], rel=2e-2, abs=1e-6), step


def test_grpo_fsdp2_matches_one_process_with_twice_the_batch(runs):
    sharded, single = runs["fsdp"]["grpo"], runs["single"]["grpo"][0]
    _assert_trained_sharded(sharded)
    assert all(result["reference_sharded"] for result in sharded)  # the KL reference is sharded too
    assert single["world_size"] == 1 and not single["sharded"]
    main = sharded[0]
    assert main["completions"] == single["completions"]  # the same rows, the same greedy completions
    assert len(set(main["completions"])) > 1
    _assert_same_grpo_logs(main["logs"], single["logs"])
    assert [e["loss"] for e in sharded[1]["logs"]] == [e["loss"] for e in main["logs"]]  # reduced over ranks


@pytest.mark.parametrize("trainer", ["rloo", "distill", "ppo"])
def test_online_trainers_train_sharded(runs, trainer):
    ranks = runs["fsdp"][trainer]
    _assert_trained_sharded(ranks)
    if trainer in ("rloo", "ppo"):  # the KL reference is sharded like the policy
        assert all(result["reference_sharded"] for result in ranks)
    if trainer == "distill":
        assert all(result["teacher_sharded"] for result in ranks)
    if trainer == "ppo":  # the policy and the value model are one sharded wrapper: both move
        assert ranks[0]["policy_changed"] and ranks[0]["value_changed"]


def test_sharded_generation_runs_in_lockstep(runs):
    first, second = runs["fsdp"]["lockstep"]
    assert first["got"] == first["expected"] and second["got"] == second["expected"]
    assert first["lengths"] == [1] and second["lengths"] == [6, 6, 6]  # one rank stopped at once, the other did not
    assert first["empty"] == []  # no prompts: nothing returned, but it took part in the other rank's calls


def test_weight_sync_from_fsdp2_ranks_reaches_the_server(runs):
    main = runs["fsdp"]["sync"][0]
    _assert_trained_sharded(runs["fsdp"]["sync"])
    assert main["server"] == main["trainer"]  # the server generates with the trainer's full weights
    assert main["trainer"] != main["initial"]  # ... which are not the initial ones


@pytest.mark.slow
def test_grpo_fsdp2_matches_trl(runs, models, tmp_path):
    process = _launch("grpo", models, tmp_path, {"fsdp": True, "package": "trl"}, nproc=2)
    theirs = _results(process, "grpo", tmp_path, 2)["grpo"]
    _assert_trained_sharded(theirs)
    ours = runs["fsdp"]["grpo"][0]
    assert ours["completions"] == theirs[0]["completions"]
    _assert_same_grpo_logs(ours["logs"], theirs[0]["logs"])


def test_weight_sync_gathers_each_zero3_parameter_once_per_module(tiny_model_path, monkeypatch):
    """ZeRO-3 weight sync (DeepSpeed is not installable here, so its `GatheredParameters` is a recording stand-in):
    one gather per module holding parameters, each parameter in exactly one gather, a tied weight once, and the
    tensors are read while their module's gather is open."""
    import contextlib
    import types

    from transformers import AutoModelForCausalLM

    from llm_trainer.generation.weights import iter_named_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, tie_word_embeddings=True)
    for index, param in enumerate(model.parameters()):
        param.ds_id = index  # what marks a ZeRO-3 partitioned parameter
    gathers: list[list[int]] = []
    open_ids: set[int] = set()

    @contextlib.contextmanager
    def gathered_parameters(params):
        params = list(params)
        gathers.append([p.ds_id for p in params])
        open_ids.update(p.ds_id for p in params)
        yield
        open_ids.difference_update(p.ds_id for p in params)

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=gathered_parameters)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setattr("accelerate.utils.other.is_deepspeed_available", lambda: False)  # no engine to unwrap
    by_name = dict(model.named_parameters())
    names = []
    for name, _ in iter_named_weights(model):
        assert by_name[name].ds_id in open_ids, name  # read inside its gather
        names.append(name)
    assert names == list(by_name)  # every parameter once, the tied head under its first name
    flat = [ds_id for group in gathers for ds_id in group]
    assert sorted(flat) == sorted(p.ds_id for p in model.parameters())  # each gathered exactly once
    assert len(gathers) == len({name.rsplit(".", 1)[0] for name in names})  # one gather per module


@pytest.mark.slow
def test_gkd_and_teacher_grpo_train_sharded(models, tmp_path):
    """GKD (on-policy student samples every step, sharded teacher) and TeacherGRPO (the student is the sharded KL
    reference, generating in lockstep) under FSDP2."""
    process = _launch("gkd,teacher_grpo", models, tmp_path, {"fsdp": True}, nproc=2)
    results = _results(process, "gkd,teacher_grpo", tmp_path, 2)
    _assert_trained_sharded(results["gkd"])
    assert all(result["teacher_sharded"] for result in results["gkd"])
    _assert_trained_sharded(results["teacher_grpo"])
    assert all(result["student_sharded"] and result["reference_sharded"] for result in results["teacher_grpo"])
