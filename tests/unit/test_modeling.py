"""The fused token log-prob forward against the model's own logits, on the fused and the fallback paths."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_trainer.modeling import TOKEN_OUTPUTS, _warn_unsplittable, add_token_logprob_head, logit_transform


def _reference(model, input_ids, labels):
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1].double()
    target, mask = labels[:, 1:], labels[:, 1:] != -100
    logp_all = logits.log_softmax(-1)
    safe = target.clamp(min=0)
    return mask, {
        "log_probs": logp_all.gather(-1, safe[..., None])[..., 0] * mask,
        "entropy": -(logp_all.exp() * logp_all).sum(-1) * mask,
        "is_top1": (logits.argmax(-1) == safe) & mask,
        "mean_logits": logits.mean(-1) * mask,
        "log_sum_sq_probs": torch.logsumexp(2 * logp_all, -1) * mask,
    }


def _check(outputs, reference):
    for name, expected in reference.items():
        actual = getattr(outputs, name)
        if expected.dtype == torch.bool:
            assert torch.equal(actual, expected), name
        else:
            torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture
def batch():
    torch.manual_seed(0)
    input_ids = torch.randint(3, 600, (2, 9))
    labels = input_ids.clone()
    labels[0, :4] = -100
    return input_ids, labels


def test_fused_forward_matches_the_logits(tiny_model_path, batch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    input_ids, labels = batch
    mask, reference = _reference(model, input_ids, labels)
    add_token_logprob_head(model, outputs=TOKEN_OUTPUTS)
    out = model(input_ids=input_ids, labels=labels, token_logprobs=True)
    assert torch.equal(out.label_mask, mask)
    _check(out, reference)
    assert model(input_ids=input_ids).logits.shape[-1] == model.config.vocab_size  # the plain forward is unchanged


def test_unrequested_outputs_are_none(tiny_model_path, batch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    add_token_logprob_head(model, outputs=("entropy",))
    out = model(input_ids=batch[0], labels=batch[1], token_logprobs=True)
    assert out.entropy is not None and out.is_top1 is None and out.mean_logits is None


def test_adapter_on_the_head_falls_back_to_logits(tiny_model_path, batch, caplog):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_path), peft.LoraConfig(target_modules=["lm_head"])
    )
    input_ids, labels = batch
    _, reference = _reference(model, input_ids, labels)
    add_token_logprob_head(model.get_base_model(), outputs=TOKEN_OUTPUTS)
    _warn_unsplittable.cache_clear()  # it warns once per model class and process
    with caplog.at_level("WARNING"):
        out = model(input_ids=input_ids, labels=labels, token_logprobs=True)
    assert "not a plain linear layer" in caplog.text
    _check(out, reference)
    out.log_probs.sum().backward()
    assert model.base_model.model.lm_head.lora_B["default"].weight.grad is not None


def test_unknown_output_name(tiny_model_path):
    with pytest.raises(ValueError, match="Unknown token outputs"):
        add_token_logprob_head(AutoModelForCausalLM.from_pretrained(tiny_model_path), outputs=("logits",))


def test_logit_transform_reads_the_config():
    from transformers import Gemma2Config, GraniteConfig

    assert logit_transform(Gemma2Config(final_logit_softcapping=30.0)) == (None, 30.0)
    assert logit_transform(GraniteConfig(logits_scaling=4.0)) == (0.25, None)


def test_moe_router_loss_matches_the_models_own():
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 100, (2, 7))
    expected = model(input_ids=ids, labels=ids)
    add_token_logprob_head(model)
    out = model(input_ids=ids, labels=ids, token_logprobs=True)
    torch.testing.assert_close(out.aux_loss, expected.aux_loss)
    loss = -out.log_probs.sum() / out.label_mask.sum() + config.router_aux_loss_coef * out.aux_loss
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=1e-6)
