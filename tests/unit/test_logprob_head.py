"""The installed log-prob forward is safe to deep-copy and to install twice, and `cast_lm_head_to_fp32` takes effect."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_trainer.modeling import (
    LogprobHeadOptions,
    TokenLogprobForward,
    add_token_logprob_head,
    create_reference_model,
)
from llm_trainer.trainer.utils import add_fused_lm_head


@pytest.fixture
def batch():
    ids = torch.randint(3, 600, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100
    return ids, labels


def _outputs(model, ids, labels) -> dict[str, torch.Tensor]:
    """Plain logits, greedy generation and (when patched) token log-probs of `model`."""
    with torch.no_grad():
        out = {
            "logits": model(input_ids=ids).logits,
            "generated": model.generate(ids, max_new_tokens=4, do_sample=False),
        }
        if isinstance(model.__dict__.get("forward"), TokenLogprobForward):
            out["log_probs"] = model(input_ids=ids, labels=labels, token_logprobs=True).log_probs
    return out


def _logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    mask = labels[:, 1:] != -100
    logp = logits[:, :-1].double().log_softmax(-1)
    return logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0] * mask


def _perturb(model) -> None:
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * param.abs().mean())


def _unpatched_twin(path: str, model) -> torch.nn.Module:
    twin = AutoModelForCausalLM.from_pretrained(path).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def test_a_deep_copy_runs_its_own_weights(tiny_model_path, batch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    add_token_logprob_head(model, outputs=())
    original = _outputs(model, *batch)
    clone = copy.deepcopy(model)
    assert clone.forward.model is clone and clone.forward is not model.forward
    _perturb(clone)
    ours = _outputs(clone, *batch)
    twin = _unpatched_twin(tiny_model_path, clone)  # the copy's weights, never patched
    expected = _outputs(twin, *batch)
    add_token_logprob_head(twin, outputs=())
    expected["log_probs"] = _outputs(twin, *batch)["log_probs"]
    for name, value in ours.items():
        assert torch.equal(value, expected[name]), name
    assert not torch.allclose(ours["logits"], original["logits"])  # the copy's weights did change its outputs
    assert not torch.allclose(ours["log_probs"], original["log_probs"])
    for name, value in _outputs(model, *batch).items():  # and the original still runs its own
        assert torch.equal(value, original[name]), name


def test_reference_of_a_trainers_model_is_the_initial_policy(tiny_model_path, batch, tmp_path):
    from llm_trainer import SFTConfig, SFTTrainer
    from llm_trainer.testing import zen_dataset

    args = SFTConfig(output_dir=str(tmp_path), report_to="none", max_steps=1, bf16=False, save_strategy="no")
    trainer = SFTTrainer(model=tiny_model_path, args=args, train_dataset=zen_dataset("standard_language_modeling"))
    policy = trainer.model
    assert isinstance(policy.__dict__.get("forward"), TokenLogprobForward)  # the trainer installed the head
    reference = create_reference_model(policy)
    twin = _unpatched_twin(tiny_model_path, policy)  # an independent copy of the initial policy
    _perturb(policy)  # training moves the policy; the reference must not follow
    ours, expected = _outputs(reference, *batch), _outputs(twin, *batch)
    assert torch.equal(ours["logits"], expected["logits"]) and torch.equal(ours["generated"], expected["generated"])
    log_probs = _logprobs_from_logits(expected["logits"], batch[1])
    scale = log_probs.abs().max().item()  # fp32 head maths against a float64 softmax of the same logits
    torch.testing.assert_close(ours["log_probs"].double(), log_probs, rtol=0, atol=1e-5 * scale)
    moved = policy.eval()(input_ids=batch[0], labels=batch[1], token_logprobs=True).log_probs.detach()
    assert (moved.double() - log_probs).abs().max() > 100 * 1e-5 * scale


def test_installing_twice_updates_the_options(tiny_model_path, batch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    own_signature = inspect.signature(model.forward)
    add_token_logprob_head(model, outputs=("entropy",))
    installed = model.forward
    add_token_logprob_head(model, 0.5, outputs=("is_top1",), cast_lm_head_to_fp32=True)
    assert model.forward is installed and installed.model is model  # one level: no wrapper around a wrapper
    assert installed.options == LogprobHeadOptions(0.5, ("is_top1",), cast_lm_head_to_fp32=True)
    assert inspect.signature(model.forward) == own_signature  # what `Trainer` and `generate` inspect
    with torch.no_grad():
        out = model(input_ids=batch[0], labels=batch[1], token_logprobs=True)
        assert out.entropy is None and out.is_top1 is not None
        once = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
        add_token_logprob_head(once, 0.5, outputs=("is_top1",), cast_lm_head_to_fp32=True)
        assert torch.equal(out.log_probs, once(input_ids=batch[0], labels=batch[1], token_logprobs=True).log_probs)
        add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))  # TRL's interface: the same one
        assert model.forward is installed and installed.options == LogprobHeadOptions(0.7, ("entropy",))
        assert model(input_ids=batch[0], labels=batch[1], fused_lm_head=True).entropy is not None


@pytest.mark.parametrize("adapter", [False, True])
def test_head_fn_gets_the_backbone_states_and_the_head(tiny_model_path, batch, adapter):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    add_token_logprob_head(model)
    if adapter:  # trainers install the head on the causal LM and call the PEFT model around it
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = peft.get_peft_model(model, config).eval()
    with torch.no_grad():
        hidden, head = model(input_ids=batch[0], head_fn=lambda hidden, head: (hidden, head))
        logits = model(input_ids=batch[0]).logits
    assert head.weight is model.get_output_embeddings().weight and head.bias is None
    projected = hidden @ head.weight.T
    torch.testing.assert_close(projected, logits, rtol=0, atol=1e-5 * logits.abs().max().item())


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_cast_lm_head_to_fp32_projects_in_fp32_under_bf16_autocast(tiny_model_path, batch, device):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).to(device).eval()
    ids, labels = (x.to(device) for x in batch)
    add_token_logprob_head(model, outputs=())
    errors = {}
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        hidden = model(input_ids=ids, head_fn=lambda hidden, head: hidden)  # what the head sees under autocast
        exact = _logprobs_from_logits(hidden.double() @ model.lm_head.weight.double().T, labels)
        for cast in (False, True):
            add_token_logprob_head(model, outputs=(), cast_lm_head_to_fp32=cast)
            log_probs = model(input_ids=ids, labels=labels, token_logprobs=True).log_probs
            assert log_probs.dtype == torch.float32
            errors[cast] = (log_probs.double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert errors[True] <= 1e-5 * scale  # fp32 accuracy: a few fp32 roundings of values of this size
    if device == "cuda":  # without the cast the GEMM runs in bf16 there (CPU GEMMs are fp32 either way)
        assert errors[False] > 10 * errors[True]
