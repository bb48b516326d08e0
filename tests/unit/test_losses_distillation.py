"""The distillation losses against TRL 1.16's chunked divergence kernel and `_chunked_divergence_loss`."""

from __future__ import annotations

import pytest
import torch

from llm_trainer.losses.distillation import chunked_distillation_loss, generalized_jsd, transform_logits

trl_kernel = pytest.importorskip("trl.kernels.chunked_divergence")
trl_distillation = pytest.importorskip("trl.trainer.distillation_trainer")

V, H_S, H_T = 97, 16, 24


def _inputs(seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(3, 5, H_S, generator=g, dtype=torch.float64).float().requires_grad_()
    teacher_hidden = torch.randn(3, 5, H_T, generator=g)
    student_weight = (torch.randn(V, H_S, generator=g) * 0.5).requires_grad_()
    teacher_weight = torch.randn(V, H_T, generator=g) * 0.5
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1] = 0
    student_bias = (torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None
    teacher_bias = torch.randn(V, generator=g) * 0.1 if bias else None
    return student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"temperature": 0.7, "num_items_in_batch": 29},
        {"bias": True, "student_logit_scale": 0.5, "teacher_softcap": 3.0, "student_softcap": 2.0},
    ],
    ids=["plain", "temperature-num-items", "bias-scale-softcap"],
)
def test_matches_trl_chunked_divergence_loss(beta, options):
    options = dict(options)
    s_h, s_w, s_b, t_h, t_w, t_b, mask = _inputs(bias=options.pop("bias", False))
    temperature = options.get("temperature", 1.0)
    num_items = options.get("num_items_in_batch")
    s_scale, t_softcap, s_softcap = (
        options.get(k) for k in ("student_logit_scale", "teacher_softcap", "student_softcap")
    )
    ours, our_entropy, our_n = chunked_distillation_loss(
        s_h, s_w, t_h, t_w, mask, beta, temperature, num_items, s_b, t_b, s_scale, s_softcap, None, t_softcap,
        chunk_size=4,
    )  # fmt: skip
    theirs, their_entropy, their_n = trl_distillation._chunked_divergence_loss(
        s_h, t_h, s_w, t_w, mask, beta,
        num_items_in_batch=num_items,
        student_lm_head_bias=s_b,
        teacher_lm_head_bias=t_b,
        student_logit_scale=1.0 if s_scale is None else s_scale,
        student_final_logit_softcapping=s_softcap,
        teacher_final_logit_softcapping=t_softcap,
        temperature=temperature,
    )  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_entropy, their_entropy, rtol=1e-5, atol=1e-6)
    assert int(our_n) == int(their_n) == int(mask.sum())
    for a, b in zip(_grads(ours, (s_h, s_w, s_b)), _grads(theirs, (s_h, s_w, s_b))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_generalized_jsd_matches_trl_kernel_per_token():
    g = torch.Generator().manual_seed(1)
    s_h, t_h = torch.randn(7, H_S, generator=g), torch.randn(7, H_T, generator=g)
    s_w, t_w = torch.randn(V, H_S, generator=g), torch.randn(V, H_T, generator=g)
    for beta in (0.0, 0.25, 1.0):
        divergence, entropy = generalized_jsd(
            transform_logits(s_h @ s_w.T, 2.0), transform_logits(t_h @ t_w.T, 2.0), beta
        )
        expected = trl_kernel.ChunkedDivergenceFunction.apply(s_h, s_w, None, t_h, t_w, None, beta, 2.0)
        torch.testing.assert_close(divergence, expected[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(entropy, expected[1], rtol=1e-5, atol=1e-6)


def test_divergence_properties():
    logits = torch.randn(4, V)
    for beta in (0.0, 0.5, 1.0):  # zero between identical distributions
        assert generalized_jsd(logits, logits.clone(), beta)[0].abs().max() < 1e-5
    other = torch.randn(4, V)
    forward = generalized_jsd(logits, other, 0.0)[0]
    reverse = generalized_jsd(logits, other, 1.0)[0]
    assert not torch.allclose(forward, reverse)  # beta selects a different divergence
    torch.testing.assert_close(
        generalized_jsd(other, logits, 1.0)[0], forward
    )  # KL(t||s) == reverse with roles swapped
    jsd = generalized_jsd(logits, other, 0.5)[0]
    assert (jsd >= 0).all() and (jsd <= torch.log(torch.tensor(2.0)) + 1e-6).all()  # JSD is bounded by log 2


def test_chunking_does_not_change_the_result_and_the_teacher_gets_no_gradient():
    s_h, s_w, _, t_h, t_w, _, mask = _inputs(2)
    t_w.requires_grad_()
    whole = chunked_distillation_loss(s_h, s_w, t_h, t_w, mask, 0.5)[0]
    chunked = chunked_distillation_loss(s_h, s_w, t_h, t_w, mask, 0.5, chunk_size=3)[0]
    torch.testing.assert_close(whole, chunked)
    chunked.backward()
    assert t_w.grad is None and s_w.grad is not None and s_h.grad.abs().sum() > 0
    # masked positions get no gradient
    assert s_h.grad[0, 3:].abs().sum() == 0


def test_fully_masked_batch_is_zero_with_a_gradient_path():
    s_h, s_w, _, t_h, t_w, _, mask = _inputs(3)
    loss, entropy, n = chunked_distillation_loss(s_h, s_w, t_h, t_w, torch.zeros_like(mask), 1.0)
    assert loss.item() == 0.0 and entropy.item() == 0.0 and n.item() == 0
    loss.backward()
    assert s_h.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 1.5}, "beta must be in"),
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"teacher_weight": torch.randn(V + 1, H_T)}, "shared vocabulary"),
        ({"mask": torch.ones(3, 4)}, "expected hidden states"),
    ],
)
def test_bad_input_raises(kwargs, message):
    s_h, s_w, _, t_h, t_w, _, mask = _inputs()
    values = {"teacher_weight": t_w, "mask": mask, "beta": 0.5, "temperature": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        chunked_distillation_loss(
            s_h, s_w, t_h, values["teacher_weight"], values["mask"], values["beta"], values["temperature"]
        )
