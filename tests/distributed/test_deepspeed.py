"""DeepSpeed ZeRO-2/3 on CPU: 2 processes under `accelerate launch` with the shipped zero2/zero3 presets.

DeepSpeed runs on this CPU-only machine with `DS_ACCELERATOR=cpu` and the gloo back end (DeepSpeed's CPU
accelerator picks gloo when oneCCL is not installed), provided Accelerate is given that back end explicitly
(`TrainingArguments(ddp_backend="gloo")`, or `InitProcessGroupKwargs(backend="gloo")`): otherwise Accelerate sees no
accelerator, leaves its back end unset and counts 1 process per rank while DeepSpeed shards over 2 (DeepSpeed then
stops on `train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size`). `use_cpu=True`
must NOT be set: it turns DeepSpeed off (plain CPU DDP).

The first DeepSpeed launch on a machine JIT-builds its shared-memory comm op (a few minutes, cached under
`~/.cache/torch_extensions`). Run as a script, this file is the launched worker: `MODE MODEL ...`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PRESETS = HERE.parent.parent / "llm_trainer" / "accelerate_configs"
ENV = {"DS_ACCELERATOR": "cpu"}

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (`pip install deepspeed`)"
)


# ------------------------------------------------------------------------------------------------------ the worker
def _partitioned(param) -> bool:
    return hasattr(param, "ds_tensor") and param.ds_tensor.numel() < param.ds_numel


def _status(model) -> set[str]:
    return {p.ds_status.name for p in model.parameters() if hasattr(p, "ds_status")}


def zero3_checks(model_path: str) -> dict:
    """Reference model, generation, weight sync and a not-yet-wrapped partitioned model under ZeRO-3, each compared
    with a plain copy of the same weights."""
    import deepspeed
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from llm_trainer.generation.weights import iter_named_weights
    from llm_trainer.models.utils import (
        prepare_deepspeed,
        unwrap_model_for_generation,
        zero3_copy,
        zero3_layerwise_gathered,
    )

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_pretrained(model_path).eval()
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 11]])
    with torch.no_grad():
        expected_logits = plain(ids).logits
    expected_generation = plain.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    expected_state = {name: p.detach().clone() for name, p in plain.named_parameters()}

    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    result: dict = {
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "zero_stage": accelerator.state.deepspeed_plugin.zero_stage,
    }
    assert accelerator.distributed_type == DistributedType.DEEPSPEED

    # 1. A model partitioned at load time (zero.Init) that no engine wraps yet: what `precompute_ref_log_probs`
    #    scores with in `__init__`. Without the helper its forward fails; with it, each module gathers for its forward.
    keep_alive = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    loaded = AutoModelForCausalLM.from_pretrained(model_path).eval()
    del keep_alive
    result["loaded_partitioned"] = all(_partitioned(p) for p in loaded.parameters() if p.ds_numel > 64)
    try:
        with torch.no_grad():
            loaded(ids)
        result["bare_forward_error"] = None
    except RuntimeError as error:
        result["bare_forward_error"] = str(error)
    gathered_inside: list[int] = []
    probe = loaded.model.layers[0].self_attn.q_proj
    probe.register_forward_hook(lambda m, *_: gathered_inside.append(m.weight.numel()))
    with torch.no_grad(), zero3_layerwise_gathered(loaded) as model:
        logits = model(ids).logits
    result["layerwise_logits_max_diff"] = (logits - expected_logits).abs().max().item()
    result["layerwise_gathered_numel"] = gathered_inside
    result["layerwise_full_numel"] = probe.weight.ds_numel
    result["layerwise_status_after"] = sorted(_status(loaded))

    # 1b. Its frozen copy (the reference when no `ref_model` is given): partitioned too, same outputs, independent.
    copied = zero3_copy(loaded)
    result["copy_partitioned"] = all(_partitioned(p) for p in copied.parameters() if p.ds_numel > 64)
    result["copy_frozen"] = not copied.training and not any(p.requires_grad for p in copied.parameters())
    with torch.no_grad(), deepspeed.zero.GatheredParameters([probe.weight], modifier_rank=0):
        probe.weight.add_(1.0)  # change the source: the copy must not follow
    with torch.no_grad(), zero3_layerwise_gathered(copied) as model:
        logits = model(ids).logits
    result["copy_logits_max_diff"] = (logits - expected_logits).abs().max().item()
    with torch.no_grad(), zero3_layerwise_gathered(loaded) as model:
        result["source_changed_by"] = (model(ids).logits - expected_logits).abs().max().item()

    # 2. A frozen reference model through prepare_deepspeed: partitioned, eval mode, no optimizer state.
    reference = AutoModelForCausalLM.from_pretrained(model_path)
    engine = prepare_deepspeed(reference, accelerator)
    result["reference_partitioned"] = all(_partitioned(p) for p in engine.module.parameters() if p.ds_numel > 64)
    result["reference_training_mode"] = engine.module.training
    result["reference_zero_stage"] = engine.zero_optimization_stage()
    with torch.no_grad():
        logits = engine(ids).logits
    result["reference_logits_max_diff"] = (logits - expected_logits).abs().max().item()

    # 3. The policy under the training engine.
    policy = AutoModelForCausalLM.from_pretrained(model_path)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(ids.repeat(4, 1), batch_size=1)
    policy, optimizer, loader = accelerator.prepare(policy, optimizer, loader)
    result["policy_partitioned"] = all(_partitioned(p) for p in policy.module.parameters() if p.ds_numel > 64)

    # 4. Weight sync: every parameter gathered exactly once, full and equal to the checkpoint.
    gathers: dict[str, int] = {}
    names = {id(p): name for name, p in policy.module.named_parameters()}
    original = deepspeed.zero.GatheredParameters

    class CountingGather(original):
        def __enter__(self):
            for param in getattr(self, "params", []) if self.enabled else []:
                gathers[names[id(param)]] = gathers.get(names[id(param)], 0) + 1
            return super().__enter__()

    deepspeed.zero.GatheredParameters = CountingGather
    try:
        synced = {name: tensor.clone() for name, tensor in iter_named_weights(policy)}
    finally:
        deepspeed.zero.GatheredParameters = original
    result["sync_gather_counts"] = sorted(set(gathers.values()))
    result["sync_gathered_names"] = sorted(gathers) == sorted(expected_state)
    result["sync_names_match"] = sorted(synced) == sorted(expected_state)
    result["sync_max_diff"] = max((synced[n] - expected_state[n]).abs().max().item() for n in expected_state)
    result["sync_status_after"] = sorted(_status(policy.module))

    # 5. Generation: gathered for `generate`, released after; training goes on with the hooks back in place.
    with unwrap_model_for_generation(policy, accelerator) as unwrapped:
        result["generation_status_inside"] = sorted(_status(unwrapped))
        generated = unwrapped.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    result["generation_matches"] = torch.equal(generated, expected_generation)
    result["generation_status_after"] = sorted(_status(policy.module))
    losses = []
    for batch in loader:
        loss = policy(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    result["train_losses"] = losses
    after = dict(iter_named_weights(policy))
    result["trained_weight_change"] = max((after[n] - expected_state[n]).abs().max().item() for n in expected_state)
    return result


def _length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def train(algorithm: str, model_path: str, batch_size: int, output_dir: str) -> dict:
    """Two steps of SFT, or DPO with `precompute_ref_log_probs=True`: per-step losses and the engine's facts."""
    import llm_trainer as lt
    from llm_trainer.testing import zen_dataset

    launched = "LOCAL_RANK" in os.environ
    common = {
        "output_dir": output_dir,
        "report_to": "none",
        "max_steps": 2,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "bf16": False,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 3,
        "ddp_backend": "gloo" if launched else None,
    }
    if algorithm == "grpo":
        args = lt.GRPOConfig(num_generations=4, max_completion_length=8, beta=0.04, **common)
        trainer = lt.GRPOTrainer(
            model_path, _length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only")
        )
    elif algorithm in ("dpo", "dpo_reference"):
        args = lt.DPOConfig(precompute_ref_log_probs=algorithm == "dpo", **common)
        trainer = lt.DPOTrainer(model_path, args=args, train_dataset=zen_dataset("conversational_preference"))
    else:
        args = lt.SFTConfig(**common)
        trainer = lt.SFTTrainer(model_path, args=args, train_dataset=zen_dataset("conversational_prompt_completion"))
    trainer.train()
    engine = trainer.model_wrapped
    params = list(trainer.model.parameters())
    return {
        "deepspeed": trainer.is_deepspeed_enabled,
        "num_processes": trainer.accelerator.num_processes,
        "zero_stage": engine.zero_optimization_stage() if trainer.is_deepspeed_enabled else None,
        "params_partitioned": bool(params) and all(_partitioned(p) for p in params if p.ds_numel > 64)
        if trainer.is_deepspeed_enabled and engine.zero_optimization_stage() == 3
        else None,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }


def _main(argv: list[str]) -> None:
    sys.path.insert(0, str(HERE))
    from fsdp_run import finish, write_result

    mode, model_path, *rest = argv
    if mode == "zero3_checks":
        result = zero3_checks(model_path)
    else:
        result = train(mode, model_path, int(rest[0]), rest[1])
    if "LOCAL_RANK" not in os.environ:  # the 1-process baseline, run directly
        print(json.dumps(result))
        sys.stdout.flush()
        os._exit(0)
    write_result(result)
    finish()


# ------------------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from llm_trainer.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _launch(preset: str, *args: str) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from fsdp_run import run_torchrun

    return run_torchrun(__file__, list(args), accelerate_config=_preset(preset), env=ENV, timeout=900)


def _preset(name: str) -> str:
    """The shipped preset with `mixed_precision: 'no'` (gloo on CPU, fp32 like the 1-process baseline)."""
    import tempfile

    text = (PRESETS / f"{name}.yaml").read_text().replace("mixed_precision: bf16", "mixed_precision: 'no'")
    path = Path(tempfile.mkdtemp(prefix="ds_preset_")) / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def _baseline(*args: str) -> dict:
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_zero3_reference_generation_weight_sync(tiny_model):
    results = _launch("zero3", "zero3_checks", tiny_model)
    for rank in results:
        assert rank["distributed_type"] == "DistributedType.DEEPSPEED"
        assert rank["num_processes"] == 2 and rank["zero_stage"] == 3
        # A zero.Init-partitioned model cannot run a forward alone; layer by layer gathered, it matches the plain one.
        assert rank["loaded_partitioned"]
        assert rank["bare_forward_error"] and "2-D" in rank["bare_forward_error"]
        assert rank["layerwise_logits_max_diff"] < 1e-4
        assert set(rank["layerwise_gathered_numel"]) == {rank["layerwise_full_numel"]}  # whole inside its forward
        assert rank["layerwise_status_after"] == ["NOT_AVAILABLE"]  # and released after
        assert rank["copy_partitioned"] and rank["copy_frozen"] and rank["copy_logits_max_diff"] < 1e-4
        assert rank["source_changed_by"] > 1e-3
        # Reference model: sharded, frozen in eval mode, same outputs.
        assert rank["reference_partitioned"] and not rank["reference_training_mode"]
        assert rank["reference_zero_stage"] == 3
        assert rank["reference_logits_max_diff"] < 1e-4
        # Weight sync: each parameter gathered once, full-size, equal to the checkpoint, released after.
        assert rank["policy_partitioned"]
        assert rank["sync_gather_counts"] == [1] and rank["sync_gathered_names"] and rank["sync_names_match"]
        assert rank["sync_max_diff"] == 0.0
        assert rank["sync_status_after"] == ["NOT_AVAILABLE"]
        # Generation: whole model gathered inside, released after, same greedy tokens; training continues.
        assert rank["generation_status_inside"] == ["AVAILABLE"]
        assert rank["generation_matches"]
        assert rank["generation_status_after"] == ["NOT_AVAILABLE"]
        assert len(rank["train_losses"]) == 2 and rank["trained_weight_change"] > 0
    assert results[0]["train_losses"] == results[1]["train_losses"]  # same batch on both ranks


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "algorithm"), [("zero3", "sft"), ("zero2", "dpo")])
def test_zero_losses_match_one_process(tiny_model, tmp_path, preset, algorithm):
    """2 processes x 2 per device under ZeRO give the per-step losses of 1 process x 4 (DPO: precomputed reference
    log-probs)."""
    results = _launch(preset, algorithm, tiny_model, "2", str(tmp_path / "ds"))
    single = _baseline(algorithm, tiny_model, "4", str(tmp_path / "single"))
    stage = int(preset[-1])
    for rank in results:
        assert rank["deepspeed"] and rank["num_processes"] == 2 and rank["zero_stage"] == stage
        if stage == 3:
            assert rank["params_partitioned"]
        assert rank["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
    assert not single["deepspeed"] and len(single["losses"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dpo", "dpo_reference", "grpo"])
def test_zero3_reference_trainers(tiny_model, tmp_path, algorithm):
    """DPO with precomputed reference log-probs, DPO with a (partitioned) reference model, and GRPO (generation and
    the KL reference) under ZeRO-3: partitioned, and DPO's losses equal the 1-process run's."""
    results = _launch("zero3", algorithm, tiny_model, "2", str(tmp_path / "ds"))
    for rank in results:
        assert rank["deepspeed"] and rank["zero_stage"] == 3 and rank["params_partitioned"]
        assert len(rank["losses"]) == 2
    if algorithm != "grpo":  # GRPO samples: 2 processes draw other completions than 1
        single = _baseline(algorithm, tiny_model, "4", str(tmp_path / "single"))
        assert results[0]["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)


if __name__ == "__main__":
    _main(sys.argv[1:])
