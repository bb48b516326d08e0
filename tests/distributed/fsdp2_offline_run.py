"""Offline trainers under FSDP2 on CPU, for `test_fsdp2_offline.py`; launched by `fsdp_run.run_torchrun`.

`python fsdp2_offline_run.py SPEC_JSON`: SPEC is {"package": "llm_trainer" | "trl", "models": {"causal": path,
"reward": path}, "out": dir, "jobs": [{"algorithm": ..., "batch": int, "steps": int, "save_steps": int?,
"resume": bool?}, ...]}. Each job trains one trainer (every rank), then every rank reports: the per-step logs, whether
the policy (and the reference model) are sharded DTensors (`fsdp_shim.assert_sharded`), how many parameters differ
from the initial weights, and, for our fused log-prob head, what was gathered when it ran (`HeadSpy`).
"""

from __future__ import annotations

from fsdp_shim import assert_sharded, enable_cpu_fsdp2

enable_cpu_fsdp2()

import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from fsdp_run import finish, write_result  # noqa: E402

from llm_trainer.testing import zen_dataset  # noqa: E402

COMMON = {
    "report_to": "none",
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "bf16": False,
    "save_strategy": "no",
    "disable_tqdm": True,
    "seed": 3,
    "gradient_accumulation_steps": 1,
}

DATASETS = {
    "sft": "conversational_prompt_completion",
    "dpo": "conversational_preference",
    "kto": "standard_unpaired_preference",
    "bco": "standard_unpaired_preference",
    "reward": "standard_preference",
    "orpo": "standard_preference",
    "cpo": "standard_preference",
}
CLASSES = {
    "sft": ("SFTConfig", "SFTTrainer"),
    "dpo": ("DPOConfig", "DPOTrainer"),
    "kto": ("KTOConfig", "KTOTrainer"),
    "bco": ("BCOConfig", "BCOTrainer"),
    "reward": ("RewardConfig", "RewardTrainer"),
    "orpo": ("ORPOConfig", "ORPOTrainer"),
    "cpo": ("CPOConfig", "CPOTrainer"),
}


class HeadSpy:
    """Wraps `llm_trainer.kernels.token_logprobs` (what the fused head calls) to record, at each call, whether the head
    weight it got is a full plain tensor, and how many elements of FSDP groups other than the LM heads' were gathered
    (unsharded) at that moment: 0 means the head gathered one layer, not the model."""

    def __init__(self) -> None:
        import llm_trainer.kernels as kernels

        self.kernels, self.original = kernels, kernels.token_logprobs
        self.models: list[torch.nn.Module] = []
        self.reset()
        kernels.token_logprobs = self

    def reset(self) -> None:
        self.calls = self.weight_dtensor = self.max_other_unsharded = self.max_head_group = 0
        self.weight_numel: set[int] = set()

    def __call__(self, hidden, weight, *args, **kwargs):
        from torch.distributed.tensor import DTensor

        self.calls += 1
        self.weight_dtensor += isinstance(weight, DTensor)
        self.weight_numel.add(weight.numel())
        head_groups, other = set(), 0
        for model in self.models:
            for group in _groups(model.get_output_embeddings()):
                head_groups.add(id(group))
                self.max_head_group = max(self.max_head_group, _numel(group))
        for model in self.models:
            for module in model.modules():
                for group in _groups(module):
                    if id(group) not in head_groups and group.is_unsharded:
                        other += _numel(group)
        self.max_other_unsharded = max(self.max_other_unsharded, other)
        return self.original(hidden, weight, *args, **kwargs)

    def report(self) -> dict:
        return {
            "calls": self.calls,
            "weight_dtensor": self.weight_dtensor,
            "weight_numel": sorted(self.weight_numel),
            "max_other_unsharded": self.max_other_unsharded,
            "max_head_group": self.max_head_group,
        }


def _groups(module):
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        return []
    state = module._get_fsdp_state()
    return [group for group in getattr(state, "_fsdp_param_groups", []) if group is not None]


def _numel(group) -> int:
    return sum(param._orig_size.numel() for param in group.fsdp_params)


def build(package, job: dict, models: dict, out: str):
    algorithm = job["algorithm"]
    config_name, trainer_name = CLASSES[algorithm]
    config_cls, trainer_cls = getattr(package, config_name), getattr(package, trainer_name)
    options = {**COMMON, "per_device_train_batch_size": job["batch"], "max_steps": job["steps"]}
    options.update(job.get("options", {}))
    if job.get("precompute"):
        options.update(precompute_ref_log_probs=True)
    if job.get("fsdp_config"):  # FSDP asked through TrainingArguments instead of the launcher's config
        options.update(fsdp=True, fsdp_config=job["fsdp_config"], use_cpu=True)
    if job.get("save_steps"):
        options.update(save_strategy="steps", save_steps=job["save_steps"], save_only_model=False)
    if algorithm in ("dpo", "kto", "bco", "orpo", "cpo"):
        options.update(max_length=64)
    if algorithm == "kto":
        options.update(desirable_weight=1.0, undesirable_weight=1.0)
    args = config_cls(output_dir=out, **options)
    dataset = zen_dataset(DATASETS[algorithm])
    model = models["reward"] if algorithm == "reward" else models["causal"]
    extra = {}
    if job.get("lora"):
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return trainer_cls(model, args=args, train_dataset=dataset, **extra)


def changed_parameters(model: torch.nn.Module, initial: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(parameters of the base model whose full value differs from `initial`, parameters compared, LoRA B matrices
    that left their zero initialisation); a collective under FSDP2."""
    from torch.distributed.tensor import DTensor

    changed = total = adapters = 0
    for name, param in model.named_parameters():
        full = (param.full_tensor() if isinstance(param, DTensor) else param).detach().cpu()
        if "lora_B" in name:
            adapters += bool(full.abs().sum() > 0)
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if name in initial:
            total += 1
            changed += not torch.equal(full, initial[name])
    return changed, total, adapters


def initial_weights(path: str, algorithm: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if algorithm == "reward" else AutoModelForCausalLM
    return {name: p.detach().clone() for name, p in auto.from_pretrained(path).named_parameters()}


def saved_model_matches(trainer, path: str, algorithm: str) -> bool:
    """`trainer.save_model(path)`, then whether `from_pretrained(path)` holds the trained (gathered) weights."""
    trainer.save_model(path)
    trainer.accelerator.wait_for_everyone()
    saved = initial_weights(path, algorithm)
    changed, total, _ = changed_parameters(trainer.model, saved)
    return total == len(saved) > 0 and changed == 0


def sharded(model) -> str:
    """ "yes" when `assert_sharded` passes on this rank, else its message."""
    try:
        assert_sharded(model)
    except AssertionError as error:
        return str(error)
    return "yes"


def run_job(package, job: dict, models: dict, out: str, spy: HeadSpy | None) -> dict:
    algorithm = job["algorithm"]
    job_out = os.path.join(out, job.get("dir", job.get("name", algorithm)))
    trainer = build(package, job, models, job_out)
    ref = getattr(trainer, "ref_model", None)
    if spy is not None:
        spy.models = [trainer.model] + ([trainer.accelerator.unwrap_model(ref)] if ref is not None else [])
    resume = job.get("resume")
    trainer.train(resume_from_checkpoint=os.path.join(job_out, resume) if resume else None)
    world = trainer.accelerator.num_processes
    saved = None
    if job.get("save_model"):
        saved = saved_model_matches(trainer, os.path.join(job_out, "final"), algorithm)
    initial = initial_weights(models["reward"] if algorithm == "reward" else models["causal"], algorithm)
    changed, total, adapters = changed_parameters(trainer.model, initial)
    result = {
        "algorithm": algorithm,
        "world_size": world,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        "sharded": sharded(trainer.model) if world > 1 else "single process",
        "ref_sharded": (sharded(ref) if world > 1 else "single process") if ref is not None else None,
        "changed": changed,
        "compared": total,
        "adapters_trained": adapters,
        "saved_model_matches": saved,
        "checkpoints": sorted(name for name in os.listdir(job_out) if name.startswith("checkpoint-"))
        if os.path.isdir(job_out)
        else [],
    }
    if spy is not None:
        result["head"] = spy.report()
        spy.reset()
    trainer.accelerator.wait_for_everyone()
    return result


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    package = importlib.import_module(spec["package"])
    spy = HeadSpy() if spec["package"] == "llm_trainer" else None
    results = {}
    for job in spec["jobs"]:
        results[job.get("name", job["algorithm"])] = run_job(package, job, spec["models"], spec["out"], spy)
    write_result(results)
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:2])
