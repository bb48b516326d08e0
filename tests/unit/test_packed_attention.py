"""The packed-sequence attention primitive: packed rows give the padded layout's log-probs and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_trainer.modeling import add_token_logprob_head
from llm_trainer.models import packed_attention as packed
from llm_trainer.testing import make_tiny_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("packed") / "m", "llama")


def _model(path, attn="sdpa"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    add_token_logprob_head(model)
    return model


def _padded_logps(model, seqs):
    """Right-padded batch → per-sequence next-token log-probs (list of 1-D tensors)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, token_logprobs=True)
    return [out.log_probs[i, : len(s) - 1] for i, s in enumerate(seqs)]


def _tolerance(values: torch.Tensor) -> float:
    return 1e-5 * max(1.0, values.abs().max().item())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_matches_padded_logps_and_grads(model_path, attn):
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 17, 9, 2)]
    model = _model(model_path, attn)
    reference = _padded_logps(model, seqs)
    torch.cat(reference).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    packed.enable(model)
    assert packed.is_enabled(model)
    layout = packed.PackedLayout.from_lengths(len(s) for s in seqs)
    tokens = torch.tensor([t for s in seqs for t in s])
    targets = torch.full_like(tokens, -100)
    for seg, s in zip(layout.segments, seqs):
        targets[seg.start : seg.end - 1] = torch.tensor(s[1:])
    out = model(
        input_ids=tokens[None], **packed.forward_kwargs(layout), shift_labels=targets[None], token_logprobs=True
    )
    got = [out.log_probs[0, seg.start : seg.end - 1] for seg in layout.segments]
    for g, r in zip(got, reference):
        torch.testing.assert_close(g, r, atol=_tolerance(r), rtol=0)
    torch.cat(got).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], atol=_tolerance(ref_grads[name]), rtol=1e-4, msg=name)


def test_shared_prefix_matches_separate_sequences(model_path):
    """A prompt computed once with G continuations attending to it = G separate [prompt, continuation] rows."""
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 500, (11,), generator=gen).tolist()
    completions = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (4, 7, 1)]
    model = _model(model_path)
    reference = [r[len(prompt) - 1 :] for r in _padded_logps(model, [prompt + c for c in completions])]
    torch.cat(reference).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    packed.enable(model)
    head = len(prompt) - 1
    segments, tokens, targets = [packed.Segment(0, head)], prompt[:-1], [-100] * head
    for c in completions:
        start = len(tokens)
        segments.append(packed.Segment(start, start + len(c), 0, head))
        tokens += [prompt[-1]] + c[:-1]
        targets += c
    layout = packed.PackedLayout(tuple(segments))
    assert layout.position_ids()[0, head:].tolist() == [p for c in completions for p in range(head, head + len(c))]
    out = model(
        input_ids=torch.tensor([tokens]),
        **packed.forward_kwargs(layout),
        shift_labels=torch.tensor([targets]),
        token_logprobs=True,
    )
    got = [out.log_probs[0, seg.start : seg.end] for seg in layout.segments[1:]]
    for g, r in zip(got, reference):
        torch.testing.assert_close(g, r, atol=_tolerance(r), rtol=0)
    torch.cat(got).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], atol=_tolerance(ref_grads[name]), rtol=1e-4, msg=name)


def test_generation_unchanged_after_enable(model_path):
    model = _model(model_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    packed.enable(model)
    after = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(before, after)


def test_layout_without_enable_fails_loudly(model_path):
    """A packed row through an attention that does not know the layout must not attend across sequences."""
    model = _model(model_path)
    layout = packed.PackedLayout.from_lengths([3, 4])
    with pytest.raises(RuntimeError):
        model(input_ids=torch.arange(3, 10)[None], **packed.forward_kwargs(layout))


def test_unsupported_models_named(tmp_path):
    path = make_tiny_model(tmp_path / "sw", "qwen2", use_sliding_window=True, sliding_window=8)
    model = AutoModelForCausalLM.from_pretrained(path)
    reason = packed.unsupported_reason(model)
    assert reason is not None and "sliding-window" in reason
    assert packed.resolve(model, None, "DPOConfig.packed_forward") is False
    with pytest.raises(ValueError, match="DPOConfig.packed_forward=True needs packed sequences"):
        packed.resolve(model, True, "DPOConfig.packed_forward")
    with pytest.raises(ValueError, match="sliding-window"):
        packed.enable(model)


def test_bad_layouts_rejected():
    with pytest.raises(ValueError, match="contiguous"):
        packed.PackedLayout((packed.Segment(0, 3), packed.Segment(4, 6)))
    with pytest.raises(ValueError, match="prefix"):
        packed.PackedLayout((packed.Segment(0, 3), packed.Segment(3, 6, 2, 5)))


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_packed(model_path, reentrant):
    """Checkpointed layers re-run with the same keywords, so the recomputed attention is packed too."""
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (6, 3, 8)]
    layout = packed.PackedLayout.from_lengths(len(s) for s in seqs)
    tokens = torch.tensor([[t for s in seqs for t in s]])
    targets = torch.full_like(tokens, -100)
    for seg, s in zip(layout.segments, seqs):
        targets[0, seg.start : seg.end - 1] = torch.tensor(s[1:])
    grads = []
    for checkpointing in (False, True):
        model = _model(model_path)
        packed.enable(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
            model.enable_input_require_grads()
        out = model(input_ids=tokens, **packed.forward_kwargs(layout), shift_labels=targets, token_logprobs=True)
        out.log_probs.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][name], atol=_tolerance(grads[0][name]), rtol=1e-4, msg=name)


def test_absolute_position_models_run_padded():
    """GPT-2's learned positions see left-padded rows shifted, packed rows restarted: they cannot agree, so no packing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=64))
    assert "rotary" in packed.unsupported_reason(model)
    assert packed.resolve(model, None, "GRPOConfig.packed_forward") is False
