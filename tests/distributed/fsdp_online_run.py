"""Online trainers under FSDP2 on CPU, for `test_fsdp2_online.py`: `python fsdp_online_run.py SCENARIOS MODELS OUT
[OPTIONS]` (under `torchrun --nproc_per_node 2`, or alone for a 1-process baseline) runs each comma-separated
scenario in turn and writes this rank's results to `OUT/<scenario>.<rank>.json`.

`MODELS` is a JSON object of paths (`policy`, and as the scenarios need: `teacher`, `reward`); `OPTIONS` a JSON
object (`package`: llm_trainer or trl, `fsdp`: shard with FSDP2, `per_device`: GRPO's per-device batch, `server`: a
generation server URL). Under FSDP2 the test-only shim relabels Accelerate's CPU state so its real FSDP2 path runs,
and every scenario asserts on every rank that the parameters ARE sharded DTensors.

Scenarios: `grpo` (a deterministic rollout: the policy's own greedy completions, generated in lockstep over the
ranks, cut to a length set by the row's place in its group, so the completions differ within a group and do not
depend on how rows are split over processes), `rloo`, `distill`, `ppo` (train, record that parameters changed),
`lockstep` (sharded generation where one rank's completions end at once and the other's run to the limit, and one
rank has more prompts than the other), `sync` (GRPO pushing its FSDP2 weights to a generation server, then the
server's greedy output compared with the trainer's).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from llm_trainer.testing import zen_dataset  # noqa: E402
from tests.distributed.fsdp_shim import assert_sharded, enable_cpu_fsdp2  # noqa: E402

FSDP2 = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}}
COMMON = {
    "report_to": "none",
    "max_steps": 2,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "bf16": False,
    "use_cpu": True,
    "save_strategy": "no",
    "disable_tqdm": True,
    "dataloader_pin_memory": False,
    "seed": 3,
}
GROUP = 4  # GRPO / RLOO completions per prompt


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def deterministic_rollout(prompts, trainer):
    """The policy's greedy completions of `prompts`, row `i` cut to `2 + i % GROUP` tokens (see the module
    docstring). Generated with `TransformersGenerator` on the trainer's model: sharded under FSDP2, so this is the
    lockstep path too."""
    from llm_trainer.generation import SamplingConfig, TransformersGenerator

    tokenizer = trainer.processing_class
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    generator = TransformersGenerator(
        model,
        SamplingConfig(max_tokens=6, temperature=0.0),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    prompt_ids = tokenizer(text=prompts)["input_ids"]
    completions = generator.generate(prompt_ids).completion_ids
    completion_ids = [ids[: 2 + i % GROUP] for i, ids in enumerate(completions)]
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "logprobs": [[0.0] * len(c) for c in completion_ids],
    }


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (a collective under FSDP2: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    after = full_parameters(model)
    return sorted(name for name, value in after.items() if name in before and not torch.equal(before[name], value))


def train(trainer) -> dict:
    """Train, assert sharding under FSDP2 (the policy's, and the KL reference's when there is one), and report the
    losses and which parameters moved."""
    before = full_parameters(trainer.model)
    trainer.train()
    model = trainer.model
    sharded = trainer.accelerator.num_processes > 1 and trainer.is_fsdp_enabled
    reference = getattr(trainer, "ref_model", None)
    if sharded:
        assert_sharded(model)
        if reference is not None:
            assert_sharded(reference)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry or "loss/policy_avg" in entry]
    return {
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "sharded": sharded,
        "logs": logs,
        "changed": changed(before, model),
        "num_parameters": len(before),
        "reference_sharded": sharded and reference is not None,
    }


def grpo(models, options, out):
    module = importlib.import_module(options.get("package", "llm_trainer"))
    per_device = options.get("per_device", 2)
    fsdp = FSDP2 if options.get("fsdp") else {}
    args = module.GRPOConfig(
        output_dir=out,
        num_generations=GROUP,
        max_completion_length=8,
        beta=0.04,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=2,
        **COMMON,
        **fsdp,
    )
    trainer = module.GRPOTrainer(
        models["policy"],
        length_reward,
        args=args,
        train_dataset=zen_dataset("standard_prompt_only"),
        rollout_func=deterministic_rollout,
    )
    result = train(trainer)
    result["completions"] = list(trainer._logs["completion"])
    return result


def rloo(models, options, out):
    from llm_trainer import RLOOConfig, RLOOTrainer

    args = RLOOConfig(
        output_dir=out,
        num_generations=GROUP,
        max_completion_length=6,
        per_device_train_batch_size=2,
        **COMMON,
        **FSDP2,
    )
    trainer = RLOOTrainer(
        models["policy"], length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only")
    )
    return train(trainer)


def distill(models, options, out):
    from llm_trainer import DistillationConfig, DistillationTrainer

    args = DistillationConfig(
        output_dir=out, max_completion_length=6, per_device_train_batch_size=2, **COMMON, **FSDP2
    )
    trainer = DistillationTrainer(
        model=models["policy"],
        teacher_model=models["teacher"],
        args=args,
        train_dataset=zen_dataset("standard_prompt_only"),
    )
    result = train(trainer)
    assert_sharded(trainer.teacher_model)  # the teacher is sharded like the student
    result["teacher_sharded"] = True
    return result


def gkd(models, options, out):
    """GKD with on-policy student samples every step (`lmbda=1`: sharded `generate`) and a sharded teacher."""
    from llm_trainer import GKDConfig, GKDTrainer

    args = GKDConfig(output_dir=out, max_new_tokens=6, per_device_train_batch_size=2, lmbda=1.0, **COMMON, **FSDP2)
    trainer = GKDTrainer(
        model=models["policy"],
        teacher_model=models["teacher"],
        args=args,
        train_dataset=zen_dataset("conversational_language_modeling"),
    )
    result = train(trainer)
    assert_sharded(trainer.teacher_model)
    result["teacher_sharded"] = True
    return result


def teacher_grpo(models, options, out):
    """TeacherGRPO whose student is the sharded KL reference (generating with it is a collective)."""
    from datasets import Dataset

    from llm_trainer import TeacherGRPOConfig, TeacherGRPOTrainer

    problems = [f"What is {i} plus {i + 1}?" for i in range(8)]
    dataset = Dataset.from_dict({"prompt": problems, "answer": [str(2 * i + 1) for i in range(8)]})
    args = TeacherGRPOConfig(
        output_dir=out,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=6,
        max_student_tokens=4,
        max_probe_tokens=4,
        beta=0.04,  # a KL reference, which is then the student
        student_temperature=1.0,  # a random greedy student would ignore the teaching: no reward spread
        **COMMON,
        **FSDP2,
    )
    trainer = TeacherGRPOTrainer(
        models["policy"],
        args=args,
        train_dataset=dataset,
        correctness_fn=lambda response, row: min(1.0, len(response) / 30),
    )
    result = train(trainer)
    assert trainer.student_model is trainer.ref_model
    assert_sharded(trainer.student_model)  # the student generated sharded, in lockstep
    result["student_sharded"] = True
    return result


def ppo(models, options, out):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llm_trainer import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(models["policy"])
    dataset = zen_dataset("standard_prompt_only")
    dataset = dataset.map(lambda row: tokenizer(row["prompt"]), remove_columns=dataset.column_names)
    common = {k: v for k, v in COMMON.items() if k not in ("max_steps", "logging_steps")}
    args = PPOConfig(
        output_dir=out,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_mini_batches=2,
        num_ppo_epochs=1,
        total_episodes=16,
        response_length=6,
        num_sample_generations=0,
        **common,
        **FSDP2,
    )
    reward = AutoModelForSequenceClassification.from_pretrained(models["reward"], num_labels=1)
    trainer = PPOTrainer(args, tokenizer, models["policy"], None, reward, dataset)
    result = train(trainer)
    result["value_changed"] = [name for name in result["changed"] if name.startswith("value_model.")]
    result["policy_changed"] = [name for name in result["changed"] if name.startswith("policy.")]
    return result


def lockstep(models, options, out):
    """Sharded generation where the ranks' work differs: rank 0 has one prompt and stops at its first token (its
    first greedy token is its end-of-sequence token), rank 1 has three prompts, generated one per call, to the
    token limit. Completions must equal an unsharded generation's."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_trainer.generation import SamplingConfig, TransformersGenerator

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    tokenizer = AutoTokenizer.from_pretrained(models["policy"])
    model = AutoModelForCausalLM.from_pretrained(models["policy"]).eval()
    texts = ["Beautiful is", "Flat is better", "Readability", "Errors should"]
    prompts = tokenizer(text=texts)["input_ids"]
    mine = prompts[:1] if rank == 0 else prompts[1:]
    sampling = SamplingConfig(max_tokens=6, temperature=0.0)
    pad = tokenizer.pad_token_id
    reference = TransformersGenerator(model, sampling, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    first_token = reference.generate(mine[:1]).completion_ids[0][0]
    eos = first_token if rank == 0 else tokenizer.eos_token_id  # rank 0 finishes after one token
    expected = TransformersGenerator(model, sampling, pad_token_id=pad, eos_token_id=eos, batch_size=1).generate(mine)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert_sharded(model)
    generator = TransformersGenerator(model, sampling, pad_token_id=pad, eos_token_id=eos, batch_size=1)
    got = generator.generate(mine)
    nothing = generator.generate([] if rank == 0 else mine[:1])  # a rank without prompts still takes part
    return {
        "expected": expected.completion_ids,
        "got": got.completion_ids,
        "lengths": [len(ids) for ids in got.completion_ids],
        "empty": nothing.completion_ids if rank == 0 else None,
    }


def sync(models, options, out):
    """GRPO on FSDP2 ranks with the server back end: train, push the final weights, compare greedy outputs."""
    from llm_trainer import GRPOConfig, GRPOTrainer
    from llm_trainer.generation import GenerationClient, SamplingConfig, TransformersGenerator

    args = GRPOConfig(
        output_dir=out,
        num_generations=GROUP,
        max_completion_length=6,
        per_device_train_batch_size=2,
        use_vllm=True,
        vllm_mode="server",
        vllm_server_base_url=options["server"],
        **{**COMMON, "max_steps": 1, "learning_rate": 0.1},
        **FSDP2,
    )
    trainer = GRPOTrainer(
        models["policy"], length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only")
    )
    result = train(trainer)
    trainer.generation.generator.sync_weights(trainer.model)  # every rank: the gathers are collectives
    tokenizer = trainer.processing_class
    prompts = tokenizer(text=["Beautiful is", "Sparse is better than"])["input_ids"]
    sampling = SamplingConfig(max_tokens=8, temperature=0.0)
    local = TransformersGenerator(
        trainer.model, sampling, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    ).generate(prompts)
    result["trainer"] = local.completion_ids
    if trainer.accelerator.is_main_process:
        from transformers import AutoModelForCausalLM

        initial = AutoModelForCausalLM.from_pretrained(models["policy"])
        result["initial"] = (
            TransformersGenerator(
                initial, sampling, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
            )
            .generate(prompts)
            .completion_ids
        )
        client = GenerationClient(options["server"])
        result["server"] = client.generate(prompts, 1, sampling, [tokenizer.eos_token_id]).completion_ids
    return result


SCENARIOS = {
    "grpo": grpo,
    "rloo": rloo,
    "distill": distill,
    "gkd": gkd,
    "teacher_grpo": teacher_grpo,
    "ppo": ppo,
    "lockstep": lockstep,
    "sync": sync,
}


def main(scenarios: str, models: str, out: str, options: str = "{}") -> None:
    options, models = json.loads(options), json.loads(models)
    if options.get("fsdp", True) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        enable_cpu_fsdp2()
    rank = int(os.environ.get("RANK", "0"))
    for name in scenarios.split(","):
        folder = os.path.join(out, name)
        result = SCENARIOS[name](models, options, folder)
        with open(os.path.join(out, f"{name}.{rank}.json"), "w") as f:
            json.dump(result, f)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: gloo's and the trainers' background threads can abort or hang it


if __name__ == "__main__":
    main(*sys.argv[1:])
