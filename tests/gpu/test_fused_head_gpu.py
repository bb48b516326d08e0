"""The fused log-prob head inside SFT, DPO and GRPO on CUDA, on a small real-architecture model (Qwen2 shapes,
vocab 151936, about 0.2B parameters, built locally): training runs in bf16 through the Triton back end, and SFT's and
DPO's per-step losses match TRL's (which materializes the logits) on the same model and data."""

from __future__ import annotations

import pytest

COMMON = {
    "report_to": "none",
    "max_steps": 2,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-5,
    "logging_steps": 1,
    "bf16": True,
    "save_strategy": "no",
    "disable_tqdm": True,
    "seed": 3,
}
# bf16 autocast: per-token log-probs carry ~1e-2 relative error either way; a mean over a batch much less.
LOSS_REL = 2e-2


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _build(package, algorithm: str, model: str, out: str):
    from llm_trainer.testing import zen_dataset

    if algorithm == "grpo":
        args = package.GRPOConfig(output_dir=out, num_generations=4, max_completion_length=16, beta=0.04, **COMMON)
        return package.GRPOTrainer(model, length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only"))
    if algorithm == "dpo":
        args = package.DPOConfig(output_dir=out, **COMMON)
        return package.DPOTrainer(model, args=args, train_dataset=zen_dataset("conversational_preference"))
    args = package.SFTConfig(output_dir=out, **COMMON)
    return package.SFTTrainer(model, args=args, train_dataset=zen_dataset("conversational_prompt_completion"))


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture
def head_calls(monkeypatch):
    """Every fused-head call of the test: `(row-ops back end, whether an output only the PyTorch back end folds was
    asked)` (mean logits or `log sum p^2`, for which `token_logprobs` switches to PyTorch row operations)."""
    from llm_trainer import kernels

    calls: list[tuple[str, bool]] = []
    original = kernels.FusedHeadLogprobs

    class Recording:
        @staticmethod
        def apply(*args):
            options = args[-1]
            calls.append((options.ops.__name__, bool(options.mean_logits or options.log_sum_sq_probs)))
            return original.apply(*args)

    monkeypatch.setattr(kernels, "FusedHeadLogprobs", Recording)
    return calls


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "grpo"])
def test_fused_head_trains_on_gpu(small_model, tmp_path, head_calls, algorithm):
    pytest.importorskip("triton")
    import torch

    import llm_trainer

    trainer = _build(llm_trainer, algorithm, small_model, str(tmp_path / "ours"))
    assert trainer.accelerator.device.type == "cuda"
    before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if "layers.0." in n}
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert head_calls, "the fused head was not used"
    # On CUDA the fused head runs the Triton row kernels, except for calls asking for outputs only PyTorch folds.
    assert all(ops == "TritonRowOps" for ops, torch_only in head_calls if not torch_only), head_calls
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach().float()) for n in before)  # and it trained
    assert torch.cuda.max_memory_allocated() > 0


@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
def test_fused_head_losses_match_trl(small_model, tmp_path, algorithm):
    trl = pytest.importorskip("trl")
    import llm_trainer

    ours = _build(llm_trainer, algorithm, small_model, str(tmp_path / "ours"))
    ours.train()
    theirs = _build(trl, algorithm, small_model, str(tmp_path / "trl"))
    theirs.train()
    assert _losses(ours) == pytest.approx(_losses(theirs), rel=LOSS_REL)
