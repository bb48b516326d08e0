"""The Triton back end on CPU, through the Triton interpreter, at tiny shapes.

`TRITON_INTERPRET=1` only takes effect if it is set before `triton` is first imported, and other test modules
import it (through TRL) without it. So, unless pytest was started with the variable set, the tests below are
skipped and `test_triton_back_end_under_interpreter` runs this module again in a fresh interpreter that has it.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from test_kernels import IGNORE, assert_grads_close, make_head, make_logits, reference, upstream  # noqa: E402

from llm_trainer.kernels import entropy_from_logits, logprob_torch, selective_log_softmax, token_logprobs  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(INTERPRETED, reason="already under the interpreter")
def test_triton_back_end_under_interpreter():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def interpreted(test):
    """Run `test` only under the interpreter, and on small tiles."""
    in_subprocess = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess")
    return in_subprocess(pytest.mark.usefixtures("small_tiles")(test))


@pytest.fixture
def small_tiles(monkeypatch):
    """4 x 24 tiles walked in 8-column blocks: several tiles per row and several blocks per tile."""
    from llm_trainer.kernels import logprob_triton

    monkeypatch.setitem(logprob_torch.TILE_ELEMENTS, "cpu", 4 * 24)
    monkeypatch.setitem(logprob_torch.TILE_COLUMNS, "cpu", 24)
    monkeypatch.setattr(logprob_triton, "BLOCK", 8)


@interpreted
@pytest.mark.parametrize(
    "case",
    [
        pytest.param({"temperature": 0.8}, id="temperature"),
        pytest.param({"bias": True, "softcap": 2.5, "logit_scale": 0.7}, id="bias-softcap-scale"),
    ],
)
def test_token_logprobs_triton_matches_reference(case):
    case = dict(case)
    hidden, weight, bias, labels = make_head(2, 5, 8, 61, bias=case.pop("bias", False), ignored=0.3)
    logp, entropy, is_top1 = token_logprobs(
        hidden, weight, labels, bias=bias, return_entropy=True, return_accuracy=True, backend="triton", **case
    )
    ref_logp, ref_entropy, ref_top1 = reference(hidden, weight, labels, bias, **case)
    torch.testing.assert_close(logp.double(), ref_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=2e-5, rtol=1e-5)
    assert torch.equal(is_top1, ref_top1)
    assert not logp[labels == IGNORE].any()
    assert_grads_close((logp, entropy), (ref_logp, ref_entropy), (hidden, weight, bias), upstream(labels), 1e-5)


@interpreted
def test_top1_ties_across_tiles_triton():
    weight = torch.randn(60, 8, generator=torch.Generator().manual_seed(4))
    weight[50] = weight[5]
    hidden = weight[5].expand(3, 8) * 4.0
    _, is_top1 = token_logprobs(hidden, weight, torch.tensor([5, 50, 7]), return_accuracy=True, backend="triton")
    assert is_top1.tolist() == [True, False, False]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_triton_matches_torch(dtype):
    logits = make_logits((2, 3, 40), dtype=dtype)
    index = torch.randint(0, 40, (2, 3, 2), generator=torch.Generator().manual_seed(7))
    ours = selective_log_softmax(logits, index, 0.7, backend="triton")
    expected = selective_log_softmax(logits, index, 0.7, backend="torch")
    torch.testing.assert_close(ours, expected)
    (g,) = torch.autograd.grad(ours.float().sum(), logits)
    (g_expected,) = torch.autograd.grad(expected.float().sum(), logits)
    assert g.dtype == dtype
    torch.testing.assert_close(g, g_expected)


@interpreted
def test_entropy_from_logits_triton_matches_torch():
    logits = make_logits((3, 2, 50))[:, -1:]  # a strided view
    ours = entropy_from_logits(logits, backend="triton")
    torch.testing.assert_close(ours, entropy_from_logits(logits, backend="torch"))
    (g,) = torch.autograd.grad(ours.sum(), logits)
    (g_expected,) = torch.autograd.grad(entropy_from_logits(logits, backend="torch").sum(), logits)
    torch.testing.assert_close(g, g_expected)
