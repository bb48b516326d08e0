"""Triton kernels against the chunked PyTorch path on CUDA, at real shapes: vocab 151936 (Qwen2), hidden 4096,
4096 tokens, in fp32 and bf16; both checked against a plain fp32 `log_softmax` on a slice of the rows."""

from __future__ import annotations

import pytest

VOCAB, HIDDEN, TOKENS = 151936, 4096, 4096
DTYPES = ["float32", "bfloat16"]
# Tolerances: log-probs here are about -12 (log 151936) +- a few. Both back ends share the head GEMM; they differ in
# the row reductions only (fp32 accumulation in both), so they agree far more tightly than with the fp32 reference,
# which for bf16 inputs sees logits rounded differently (bf16 GEMM output vs fp32).
AGREE = {"float32": 1e-4, "bfloat16": 2e-3}
VS_REFERENCE = {"float32": 2e-3, "bfloat16": 8e-2}
GRAD_REL = {"float32": 1e-4, "bfloat16": 1e-2}


def _inputs(dtype_name: str, seed: int = 0):
    import torch

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, device="cuda", generator=generator).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=generator) * HIDDEN**-0.5).to(dtype)
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=generator)
    labels[torch.rand(TOKENS, device="cuda", generator=generator) < 0.1] = -100  # some prompt/padding positions
    return hidden, weight, labels


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _reference_logp(hidden, weight, labels, temperature: float, rows: int = 512):
    """fp32 `log_softmax` of the first `rows` positions, 0 where the label is ignored."""
    logits = (hidden[:rows].float() @ weight.float().T) / temperature
    logp = logits.log_softmax(-1)
    kept = labels[:rows] != -100
    out = logp.gather(-1, labels[:rows].clamp_min(0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return out * kept, entropy * kept


def _run(backend: str, hidden, weight, labels, temperature: float):
    import torch

    from llm_trainer import kernels

    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logp, entropy = kernels.token_logprobs(h, w, labels, temperature=temperature, return_entropy=True, backend=backend)
    (-(logp.sum()) / TOKENS + 0.01 * entropy.sum() / TOKENS).backward()
    torch.cuda.synchronize()
    return logp.detach(), entropy.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_fused_head_triton_matches_torch(dtype_name):
    pytest.importorskip("triton")
    import torch

    hidden, weight, labels = _inputs(dtype_name)
    temperature = 0.7
    triton_out = _run("triton", hidden, weight, labels, temperature)
    torch_out = _run("torch", hidden, weight, labels, temperature)
    names = ("logp", "entropy", "grad_hidden", "grad_weight")
    for name, a, b in zip(names[:2], triton_out[:2], torch_out[:2]):
        assert torch.isfinite(a).all(), name
        assert (a - b).abs().max().item() < AGREE[dtype_name], name
    for name, a, b in zip(names[2:], triton_out[2:], torch_out[2:]):
        assert a.dtype == getattr(torch, dtype_name), name  # gradients in the inputs' dtype
        assert _rel(a, b) < GRAD_REL[dtype_name], name
    ref_logp, ref_entropy = _reference_logp(hidden, weight, labels, temperature)
    for out in (triton_out, torch_out):
        assert (out[0][:512] - ref_logp).abs().max().item() < VS_REFERENCE[dtype_name]
        assert (out[1][:512] - ref_entropy).abs().max().item() < VS_REFERENCE[dtype_name]
    assert (triton_out[0][labels == -100] == 0).all()


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_logit_kernels_triton_match_torch(dtype_name):
    """`selective_log_softmax`, `entropy_from_logits` and the two at once, on materialized (tokens, vocab) logits."""
    pytest.importorskip("triton")
    import torch

    from llm_trainer import kernels

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator(device="cuda").manual_seed(1)
    logits = (torch.randn(TOKENS, VOCAB, device="cuda", generator=generator) * 2).to(dtype)
    index = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=generator)
    results = {}
    for backend in ("triton", "torch"):
        x = logits.detach().clone().requires_grad_(True)
        logp = kernels.selective_log_softmax(x, index, temperature=0.9, backend=backend)
        logp.sum().backward()
        entropy = kernels.entropy_from_logits(logits, backend=backend)
        both = kernels.selective_log_softmax_and_entropy(logits, index, backend=backend)
        torch.cuda.synchronize()
        results[backend] = (logp.detach(), x.grad, entropy, *both)
        del x
    reference = (logits.float()[:512] / 0.9).log_softmax(-1).gather(-1, index[:512, None]).squeeze(-1)
    for a, b in zip(results["triton"], results["torch"]):
        assert torch.isfinite(a.float()).all()
        assert _rel(a, b) < GRAD_REL[dtype_name]
    assert (results["triton"][0][:512] - reference).abs().max().item() < VS_REFERENCE[dtype_name]


def test_triton_is_the_default_on_cuda():
    """On CUDA with triton installed the automatic back end is Triton (what the trainers get)."""
    pytest.importorskip("triton")
    import torch

    from llm_trainer import kernels
    from llm_trainer.kernels.logprob_triton import TritonRowOps

    assert kernels._row_ops(torch.device("cuda"), None) is TritonRowOps
