"""llm_trainer.kernels (PyTorch back end) against float64 references and TRL 1.16's own functions."""

import pytest
import torch
import torch.nn.functional as F
from trl.trainer.utils import entropy_from_logits as trl_entropy_from_logits
from trl.trainer.utils import selective_log_softmax as trl_selective_log_softmax

import llm_trainer.kernels as kernels
from llm_trainer.kernels import entropy_from_logits, kl_penalty, logprob_torch, selective_log_softmax, token_logprobs

IGNORE = -100


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """8 x 32 tiles, so every case walks several ragged token and vocabulary chunks."""
    monkeypatch.setitem(logprob_torch.TILE_ELEMENTS, "cpu", 8 * 32)
    monkeypatch.setitem(logprob_torch.TILE_COLUMNS, "cpu", 32)


def reference(hidden, weight, labels, bias=None, temperature=1.0, logit_scale=None, softcap=None):
    """Float64 log-prob, entropy and top-1 flags from the full logits, 0 / False at ignored labels."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    keep = labels != IGNORE
    log_probs = z.log_softmax(-1)
    logp = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    entropy = -(log_probs.exp() * log_probs).sum(-1) * keep
    return logp, entropy, (z.argmax(-1) == labels) & keep


def make_head(batch, seq, width, vocab, dtype=torch.float32, bias=False, ignored=0.25, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, width, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, width, generator=gen) / width**0.25).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=gen) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < ignored] = IGNORE
    return hidden, weight, b, labels


def upstream(labels, seed=1):
    """Random upstream gradients for log-prob and entropy (advantage- and entropy-bonus-like)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(labels.shape, generator=gen, dtype=torch.float64), torch.randn(
        labels.shape, generator=gen, dtype=torch.float64
    )


def grads(outputs, inputs, weights):
    loss = sum((out.double() * w).sum() for out, w in zip(outputs, weights))
    return torch.autograd.grad(loss, [x for x in inputs if x is not None])


def assert_close_rel(actual, expected, rtol):
    """Max error relative to the largest expected magnitude (gradients have many near-zero entries)."""
    scale = expected.abs().max().clamp(min=1e-12)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def assert_grads_close(outputs, expected_outputs, inputs, weights, rtol, dtype=torch.float32):
    """Gradients of `sum(weights * outputs)` with respect to `inputs` match the reference's, in the inputs' dtype."""
    for actual, expected in zip(grads(outputs, inputs, weights), grads(expected_outputs, inputs, weights)):
        assert actual.dtype == dtype
        assert_close_rel(actual, expected, rtol)


HEAD_CASES = [
    pytest.param({"shape": (2, 9, 16, 103)}, id="plain"),
    pytest.param({"shape": (3, 5, 8, 64), "temperature": 0.7}, id="temperature"),
    pytest.param({"shape": (2, 6, 12, 77), "bias": True, "temperature": 1.3}, id="bias"),
    pytest.param({"shape": (2, 7, 16, 50), "logit_scale": 0.25}, id="logit_scale"),
    pytest.param({"shape": (2, 7, 16, 90), "softcap": 2.0, "logit_scale": 1.5, "temperature": 0.9}, id="softcap"),
    pytest.param({"shape": (1, 33, 8, 31), "ignored": 0.0}, id="dense-vocab-below-chunk"),
]


@pytest.mark.parametrize("case", HEAD_CASES)
def test_token_logprobs_matches_float64_reference(case):
    case = dict(case)
    head_kwargs = {key: case.pop(key) for key in ("bias", "ignored") if key in case}
    hidden, weight, bias, labels = make_head(*case.pop("shape"), **head_kwargs)
    logp, entropy, is_top1 = token_logprobs(
        hidden, weight, labels, bias=bias, return_entropy=True, return_accuracy=True, **case
    )
    ref_logp, ref_entropy, ref_top1 = reference(hidden, weight, labels, bias, **case)
    assert logp.dtype == entropy.dtype == torch.float32 and is_top1.dtype == torch.bool
    assert logp.shape == entropy.shape == is_top1.shape == labels.shape
    torch.testing.assert_close(logp.double(), ref_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=2e-5, rtol=1e-5)
    assert torch.equal(is_top1, ref_top1)
    assert not logp[labels == IGNORE].any() and not entropy[labels == IGNORE].any()

    assert_grads_close((logp, entropy), (ref_logp, ref_entropy), (hidden, weight, bias), upstream(labels), 1e-5)


def test_token_logprobs_returns_only_what_is_asked():
    hidden, weight, _, labels = make_head(2, 4, 8, 40)
    assert isinstance(token_logprobs(hidden, weight, labels), torch.Tensor)
    logp, entropy = token_logprobs(hidden, weight, labels, return_entropy=True)
    assert entropy.dtype == torch.float32
    logp, is_top1 = token_logprobs(hidden, weight, labels, return_accuracy=True)
    assert is_top1.dtype == torch.bool


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_logprobs_half_precision(dtype):
    hidden, weight, _, labels = make_head(2, 8, 32, 96, dtype=dtype)
    logp, entropy = token_logprobs(hidden, weight, labels, return_entropy=True, temperature=0.8)
    ref_logp, ref_entropy, _ = reference(hidden, weight, labels, temperature=0.8)
    # The inputs are exact in float64, so only the fp32 compute separates the two
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-4, rtol=1e-4)
    assert_grads_close((logp, entropy), (ref_logp, ref_entropy), (hidden, weight), upstream(labels), 1e-2, dtype)


def test_tied_embedding_and_head_accumulate_both_gradients():
    gen = torch.Generator().manual_seed(3)
    vocab, width = 70, 12
    embedding = torch.randn(vocab, width, generator=gen, requires_grad=True)
    mix = torch.randn(width, width, generator=gen, requires_grad=True) / width**0.5
    ids = torch.randint(0, vocab, (2, 10), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE

    def run(head_fn):
        hidden = torch.tanh(F.embedding(ids, embedding) @ mix)
        return torch.autograd.grad(head_fn(hidden).sum(), (embedding, mix))

    fused = run(lambda h: token_logprobs(h, embedding, labels, temperature=1.2))
    naive = run(lambda h: reference(h, embedding, labels, temperature=1.2)[0])
    for a, e in zip(fused, naive):
        assert_close_rel(a, e, 1e-5)


def test_top1_breaks_ties_like_argmax():
    """Duplicate head rows tie; the flag must follow `argmax` (first index), across tile boundaries."""
    gen = torch.Generator().manual_seed(4)
    width, vocab = 8, 80
    weight = torch.randn(vocab, width, generator=gen)
    weight[70] = weight[5]  # same logit in tile 0 and tile 2
    hidden = weight[5].expand(6, width) * 4.0  # token 5 (and 70) are the top-1 for every row
    labels = torch.tensor([5, 70, 1, IGNORE, 5, 70])
    _, is_top1 = token_logprobs(hidden, weight, labels, return_accuracy=True)
    assert is_top1.tolist() == [True, False, False, False, True, False]


def test_entropy_alone_carries_gradient():
    hidden, weight, _, labels = make_head(2, 6, 8, 45)
    _, entropy = token_logprobs(hidden, weight, labels, return_entropy=True, softcap=3.0)
    _, ref_entropy, _ = reference(hidden, weight, labels, softcap=3.0)
    assert_grads_close((entropy,), (ref_entropy,), (hidden, weight), (1.0,), 1e-5)


def test_all_positions_ignored_gives_zeros_and_zero_grads():
    hidden, weight, bias, labels = make_head(2, 3, 8, 40, bias=True, ignored=1.0)
    logp = token_logprobs(hidden, weight, labels, bias=bias)
    assert torch.equal(logp, torch.zeros(2, 3))
    for g in torch.autograd.grad(logp.sum(), (hidden, weight, bias)):
        assert not g.any()


def test_frozen_head_and_no_grad():
    hidden, weight, _, labels = make_head(2, 5, 8, 40)
    weight.requires_grad_(False)
    (g,) = torch.autograd.grad(token_logprobs(hidden, weight, labels).sum(), (hidden,))
    (expected,) = grads((reference(hidden, weight, labels)[0],), (hidden,), (1,))
    assert_close_rel(g, expected, 1e-5)
    with torch.no_grad():
        logp = token_logprobs(hidden, weight, labels)
    assert not logp.requires_grad
    torch.testing.assert_close(logp.double(), reference(hidden, weight, labels)[0], atol=2e-5, rtol=1e-5)


def test_only_kept_positions_are_projected(monkeypatch):
    projected = []
    project = logprob_torch._project

    def spy(buffer, hidden, *args):
        projected.append(hidden.shape[0])
        return project(buffer, hidden, *args)

    monkeypatch.setattr(logprob_torch, "_project", spy)
    hidden, weight, _, labels = make_head(4, 16, 8, 32, ignored=0.75)  # one vocabulary chunk
    token_logprobs(hidden, weight, labels).sum().backward()
    kept = int((labels != IGNORE).sum())
    assert 0 < kept < labels.numel() and sum(projected) == 2 * kept  # forward + backward recompute


def test_saved_state_is_per_token_not_per_logit():
    """Beyond its inputs, autograd keeps only O(tokens) fp32 vectors for the backward."""
    hidden, weight, _, labels = make_head(4, 32, 16, 500, ignored=0.0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        token_logprobs(hidden, weight, labels, return_entropy=True)
    inputs = {hidden.data_ptr(), weight.data_ptr(), labels.data_ptr()}
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in inputs)
    assert extra <= 2 * labels.numel() * 4


def test_input_validation():
    hidden, weight, _, labels = make_head(2, 3, 8, 40)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        token_logprobs(hidden, weight, labels, softcap=-1.0)
    with pytest.raises(ValueError, match="expected hidden"):
        token_logprobs(hidden, weight[:, :4], labels)


# ----------------------------------------------------------------------------------------------------------------
# Full-logits functions against TRL 1.16
# ----------------------------------------------------------------------------------------------------------------


def make_logits(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 3).to(dtype).requires_grad_()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("k", [None, 3])
def test_selective_log_softmax_matches_trl(temperature, k):
    logits = make_logits((3, 7, 150))
    gen = torch.Generator().manual_seed(1)
    index = torch.randint(0, 150, (3, 7) if k is None else (3, 7, k), generator=gen)
    ours = selective_log_softmax(logits, index, temperature)
    theirs = trl_selective_log_softmax(logits, index, temperature)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    weights = torch.randn(index.shape, generator=gen)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (g_theirs,) = torch.autograd.grad((theirs * weights).sum(), logits)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=1e-5)


HALF = [torch.bfloat16, torch.float16]


def grad_tolerance(dtype, expected):
    """Gradient tolerance for `dtype`: a few roundings of the largest entry (each input carries one)."""
    return {"atol": 4 * torch.finfo(dtype).eps * expected.abs().max().item(), "rtol": 2 * torch.finfo(dtype).eps}


HALF_SLS_CASES = [
    pytest.param((2, 9, 300), None, 1.0, False, id="3d"),
    pytest.param((11, 50), None, 0.6, True, id="2d-temperature-mask"),
    pytest.param((3, 5, 130), 4, 1.0, True, id="k4-mask"),
    pytest.param((2, 4, 70), 3, 1.7, False, id="k3-temperature"),
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("shape", "k", "temperature", "masked"), HALF_SLS_CASES)
def test_selective_log_softmax_half_values_are_trls(dtype, shape, k, temperature, masked):
    """bf16/fp16 values equal TRL's (half-precision `log_softmax` gathered) bit for bit; the lean fp32 backward
    matches autograd of that naive formula within the dtype's rounding."""
    gen = torch.Generator().manual_seed(2)
    index_shape = shape[:-1] if k is None else (*shape[:-1], k)
    index = torch.randint(0, shape[-1], index_shape, generator=gen)
    logits = make_logits(shape).detach()
    flat_logits, flat_index = logits.view(-1, shape[-1]), index.view(-1, 1 if k is None else k)
    flat_logits[0].scatter_add_(-1, flat_index[0], torch.full_like(flat_index[0], 20.0, dtype=torch.float32))
    logits = logits.to(dtype).requires_grad_()  # row 0 is peaked: 1 - p(index) cancels
    row_mask = (torch.rand(index_shape, generator=gen) > 0.3) if masked else None

    def naive(x):
        """TRL's reference: the full `log_softmax` gathered, in the dtype of `x`."""
        picked = (x / temperature).log_softmax(-1).gather(-1, index if k else index.unsqueeze(-1))
        picked = picked if k else picked.squeeze(-1)
        return picked if row_mask is None else picked.masked_fill(row_mask == 0, 0.0)

    ours = selective_log_softmax(logits, index, temperature, row_mask=row_mask, backend="torch")
    assert ours.dtype == dtype and ours.shape == index.shape
    assert torch.equal(ours, naive(logits))
    assert torch.equal(ours, trl_selective_log_softmax(logits, index, temperature, row_mask=row_mask))

    weights = torch.randn(index_shape, generator=gen).to(dtype)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (g_naive,) = torch.autograd.grad((naive(logits) * weights).sum(), logits)
    exact_logits = logits.detach().double().requires_grad_()
    (g_exact,) = torch.autograd.grad((naive(exact_logits) * weights.double()).sum(), exact_logits)
    assert g_ours.dtype == dtype
    torch.testing.assert_close(g_ours, g_naive, **grad_tolerance(dtype, g_naive))
    torch.testing.assert_close(g_ours.double(), g_exact, **grad_tolerance(dtype, g_exact))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_on_sliced_logits_keeps_no_copy(dtype):
    """GRPO passes `logits[:, -k:]`, a view that cannot be flattened; nothing logits-sized may be saved."""
    full = make_logits((4, 12, 256), dtype=dtype)
    logits = full[:, -5:]
    index = torch.randint(0, 256, (4, 5), generator=torch.Generator().manual_seed(5))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = selective_log_softmax(logits, index)
    assert sum(t.numel() for t in saved if t.data_ptr() != logits.data_ptr()) <= 2 * index.numel()
    torch.testing.assert_close(ours, trl_selective_log_softmax(logits, index), rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(ours.sum(), full)
    (expected,) = torch.autograd.grad(trl_selective_log_softmax(logits, index).sum(), full)
    torch.testing.assert_close(g, expected, **grad_tolerance(dtype, expected))


def test_entropy_from_logits_matches_trl():
    logits = make_logits((3, 5, 200))
    ours = entropy_from_logits(logits, chunk_size=4)
    torch.testing.assert_close(ours, trl_entropy_from_logits(logits, chunk_size=4))
    exact = -(logits.double().softmax(-1) * logits.double().log_softmax(-1)).sum(-1)
    torch.testing.assert_close(ours.double(), exact, atol=1e-5, rtol=1e-5)
    weights = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    (g_ours,) = torch.autograd.grad((ours.double() * weights).sum(), logits)
    (g_exact,) = torch.autograd.grad((exact * weights).sum(), logits)
    assert_close_rel(g_ours, g_exact, 1e-5)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    ("shape", "chunk_size", "sliced"),
    [((3, 5, 200), 4, False), ((7, 64), 3, False), ((2, 6, 90), 128, False), ((3, 6, 50), 2, True)],
)
def test_entropy_from_logits_half_values_are_trls(dtype, shape, chunk_size, sliced):
    """bf16/fp16 entropies equal TRL's `-(exp(log p) * log p).sum(-1)` in the half dtype; gradients stay close."""
    full = make_logits(shape, dtype=dtype)
    logits = full[:, 1:] if sliced else full  # a strided view is walked block by block, not copied
    ours = entropy_from_logits(logits, chunk_size=chunk_size, backend="torch")
    assert ours.dtype == dtype and ours.shape == logits.shape[:-1]
    assert torch.equal(ours, trl_entropy_from_logits(logits, chunk_size=chunk_size))
    log_p = logits.log_softmax(-1)
    naive = -(log_p.exp() * log_p).sum(-1)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)  # TRL's own check

    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), full)
    (g_naive,) = torch.autograd.grad((naive * weights).sum(), full)
    exact_full = full.detach().double().requires_grad_()
    exact_log_p = (exact_full[:, 1:] if sliced else exact_full).log_softmax(-1)
    exact = -(exact_log_p.exp() * exact_log_p).sum(-1)
    (g_exact,) = torch.autograd.grad((exact * weights.double()).sum(), exact_full)
    assert g_ours.dtype == dtype
    torch.testing.assert_close(g_ours, g_naive, **grad_tolerance(dtype, g_naive))
    torch.testing.assert_close(g_ours.double(), g_exact, **grad_tolerance(dtype, g_exact))


# ----------------------------------------------------------------------------------------------------------------
# KL estimators and back-end dispatch
# ----------------------------------------------------------------------------------------------------------------


def test_kl_penalty_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5, -4.0], dtype=torch.float64)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), logp - ref)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * (logp - ref) ** 2)
    expected_k3 = torch.exp(ref - logp) - (ref - logp) - 1
    torch.testing.assert_close(kl_penalty(logp, ref), expected_k3)
    assert (kl_penalty(logp, ref) >= 0).all() and kl_penalty(logp, ref)[2] == 0
    # Monte-Carlo: each estimator's mean over samples from p approaches KL(p || q)
    gen = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    true_kl = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        estimate = kl_penalty(p.log()[samples], q.log()[samples], kind).mean()
        torch.testing.assert_close(estimate, true_kl, atol=5e-3, rtol=0)


def test_kl_penalty_rejects_unknown_kind():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")


def test_backend_dispatch(monkeypatch):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    cpu = torch.device("cpu")
    assert kernels._row_ops(cpu, None) is logprob_torch.TorchRowOps
    with pytest.raises(ValueError, match="'torch', 'triton' or None"):
        kernels._row_ops(cpu, "cuda")
    monkeypatch.setenv(kernels.BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        kernels._row_ops(cpu, None)
    assert kernels._row_ops(cpu, "torch") is logprob_torch.TorchRowOps  # the argument wins over the variable
    monkeypatch.setattr(kernels, "_triton_installed", lambda: False)
    with pytest.raises(ImportError, match=r'pip install "llm-trainer\[kernels\]"'):
        kernels._row_ops(cpu, "triton")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(kernels, "_triton_installed", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        selective_log_softmax(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_torch_on_cuda(dtype):
    pytest.importorskip("triton")
    head = make_head(4, 256, 64, 5000, dtype=dtype, bias=True)
    hidden, weight, bias = (x.detach().cuda().requires_grad_() for x in head[:3])
    labels = head[3].cuda()
    kwargs = {"bias": bias, "temperature": 0.9, "softcap": 20.0, "return_entropy": True, "return_accuracy": True}
    results = {}
    for backend in ("torch", "triton"):
        logp, entropy, is_top1 = token_logprobs(hidden, weight, labels, backend=backend, **kwargs)
        gradients = torch.autograd.grad((logp * 0.3 + entropy).sum(), (hidden, weight, bias))
        results[backend] = (logp, entropy, is_top1.float(), *gradients)
    ref_logp = reference(hidden, weight, labels, bias, temperature=0.9, softcap=20.0)[0]
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(results["triton"][0].double(), ref_logp, atol=tol * 10, rtol=tol)
    for triton_result, torch_result in zip(results["triton"], results["torch"]):
        assert_close_rel(triton_result, torch_result, tol)


# ------------------------------------------------------------------------------------ TRL's kernel names and paths
def test_trl_kernel_modules_exist_at_trl_paths():
    from llm_trainer.kernels import chunked_divergence, chunked_logprob, logprob_entropy

    assert chunked_logprob.ChunkedLogProbFunction is kernels.ChunkedLogProbFunction
    assert logprob_entropy.selective_log_softmax_and_entropy is kernels.selective_log_softmax_and_entropy
    assert issubclass(chunked_divergence.ChunkedDivergenceFunction, torch.autograd.Function)
    assert issubclass(kernels.ChunkedLogProbFunction, torch.autograd.Function)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("row_mask", [False, True])
def test_selective_log_softmax_and_entropy_values_and_grads(temperature, row_mask):
    logits = make_logits((3, 5, 70)).double().requires_grad_()
    index = torch.randint(0, 70, (3, 5), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(15).view(3, 5) % 4 != 0) if row_mask else None
    logps, entropy = kernels.selective_log_softmax_and_entropy(logits, index, temperature, mask)
    log_p = (logits / temperature).log_softmax(-1)
    keep = torch.ones_like(index, dtype=torch.bool) if mask is None else mask
    ref_logps = log_p.gather(-1, index.unsqueeze(-1)).squeeze(-1) * keep
    ref_entropy = -(log_p.exp() * log_p).sum(-1) * keep
    assert logps.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logps.double(), ref_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-5)
    g_logp, g_ent = upstream(index)
    assert_grads_close((logps, entropy), (ref_logps, ref_entropy), [logits], (g_logp, g_ent), 1e-5, torch.float64)
    # the entropy alone carries its own gradient
    _, entropy = kernels.selective_log_softmax_and_entropy(logits, index, temperature, mask)
    log_p = (logits / temperature).log_softmax(-1)
    ref_entropy = -(log_p.exp() * log_p).sum(-1) * keep
    assert_grads_close((entropy,), (ref_entropy,), [logits], (g_ent,), 1e-5, torch.float64)


def test_selective_log_softmax_and_entropy_rejects_bad_input():
    logits = make_logits((4, 10))
    with pytest.raises(ValueError, match="temperature"):
        kernels.selective_log_softmax_and_entropy(logits, torch.zeros(4, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="index"):
        kernels.selective_log_softmax_and_entropy(logits, torch.zeros(4, 1, dtype=torch.long))


@pytest.mark.parametrize("case", HEAD_CASES[:5])
def test_chunked_logprob_function_matches_reference(case):
    shape = case["shape"]
    batch, seq, width, vocab = shape
    hidden, weight, bias, labels = make_head(*shape, bias=case.get("bias", False), ignored=0.0)
    temperature = case.get("temperature", 1.0)
    scale, softcap = case.get("logit_scale"), case.get("softcap")
    flat_hidden, flat_labels = hidden.reshape(-1, width), labels.reshape(-1)
    logp, entropy, log_sum_sq, mean_logits, is_top1 = kernels.ChunkedLogProbFunction.apply(
        flat_hidden, weight, bias, flat_labels, temperature, 32, softcap, 1.0 if scale is None else scale
    )
    ref_logp, ref_entropy, ref_top1 = (
        x.reshape(-1) for x in reference(hidden, weight, labels, bias, temperature, scale, softcap)
    )
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-4, atol=1e-4)
    assert torch.equal(is_top1, ref_top1)
    assert log_sum_sq.shape == mean_logits.shape == logp.shape and not log_sum_sq.requires_grad
    inputs = [hidden, weight, bias]
    g_logp, g_ent = (g.reshape(-1) for g in upstream(labels))
    assert_grads_close((logp, entropy), (ref_logp, ref_entropy), inputs, (g_logp, g_ent), 1e-4)


def test_chunked_logprob_function_outputs_subset_and_validation():
    hidden, weight, _, labels = make_head(1, 6, 8, 40, ignored=0.0)
    outs = kernels.ChunkedLogProbFunction.apply(hidden[0], weight, None, labels[0], 1.0, 32, None, 1.0, ("log_probs",))
    assert outs[0].shape == (6,) and all(x is None for x in outs[1:])
    with pytest.raises(ValueError, match="Unknown outputs"):
        kernels.ChunkedLogProbFunction.apply(hidden[0], weight, None, labels[0], 1.0, 32, None, 1.0, ("logits",))


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_chunked_divergence_function_values_and_student_grads(beta, monkeypatch):
    from llm_trainer.kernels import chunked_divergence
    from llm_trainer.losses import generalized_jsd

    monkeypatch.setattr(chunked_divergence, "CHUNK_ELEMENTS", 4 * 50)  # 4 tokens per chunk: several chunks
    gen = torch.Generator().manual_seed(0)
    n, vocab = 11, 50
    s_hidden = torch.randn(n, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    s_weight = torch.randn(vocab, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    s_bias = torch.randn(vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(n, 12, generator=gen, dtype=torch.float64)
    t_weight = torch.randn(vocab, 12, generator=gen, dtype=torch.float64)
    args = (s_hidden, s_weight, s_bias, t_hidden, t_weight, None, beta, 0.8, 1.5, 3.0, 1.0, None)
    divergence, entropy = chunked_divergence.ChunkedDivergenceFunction.apply(*args)
    z_s = 3.0 * torch.tanh(1.5 * (s_hidden @ s_weight.T + s_bias) / 3.0) / 0.8
    z_t = (t_hidden @ t_weight.T) / 0.8
    ref_div, ref_ent = generalized_jsd(z_s, z_t, beta)
    atol = 1e-5 * float(ref_div.detach().abs().max())  # fp32 maths on both sides
    torch.testing.assert_close(divergence, ref_div, rtol=1e-5, atol=atol)
    torch.testing.assert_close(entropy, ref_ent, rtol=1e-5, atol=1e-5)
    assert not entropy.requires_grad
    weights = torch.randn(n, generator=gen, dtype=torch.float64)
    for got, want in zip(
        grads([divergence], [s_hidden, s_weight, s_bias], [weights]),
        grads([ref_div], [s_hidden, s_weight, s_bias], [weights]),
    ):
        assert_close_rel(got, want, 1e-5)
