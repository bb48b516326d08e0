"""XPOTrainer and NashMDTrainer on the tiny offline model: training moves the policy (not the reference) and logs
TRL 1.13's metric names, the per-epoch schedules apply, the loss of a fixed batch equals a plain computation, and bad
input is refused before training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from llm_trainer import NashMDConfig, NashMDTrainer, XPOConfig, XPOTrainer
from llm_trainer.generation.base import GenerationResult
from llm_trainer.judges import BasePairwiseJudge
from llm_trainer.testing import zen_dataset
from llm_trainer.trainer.online_pairs import GeometricMixtureLogits, reference_last_logits

XPO_METRICS = {
    "loss/dpo",
    "loss/xpo",
    "objective/model_scores",
    "objective/ref_scores",
    "objective/scores_margin",
    "objective/kl",
    "objective/entropy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "val/model_contain_eos_token",
    "val/ref_contain_eos_token",
    "alpha",
    "beta",
}
PROMPTS = ["a b", "c d", "e f", "g h"]


def _config(config_class, tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        max_new_tokens=8,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=5,
    )
    return config_class(**{**defaults, **kwargs})


def length_reward(completions, **kwargs):
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]


class FixedGenerator:
    """Test fixture: returns the same completions for the prompts, whatever the model."""

    def __init__(self, completions):
        self.completions = completions

    def sync_weights(self, model):
        pass

    def generate(self, prompt_ids):
        return GenerationResult([list(c) for c in self.completions[: len(prompt_ids)]], None)


class FirstJudge(BasePairwiseJudge):
    """Test fixture: prefers the first completion of every pair (0), and counts its calls."""

    def __init__(self):
        self.calls = 0

    def judge(self, prompts, completions, shuffle_order=True, return_scores=False):
        self.calls += 1
        return [0.9 if return_scores else 0 for _ in completions]


def plain_logps(model, prompt_ids, completion_ids):
    """Sum of the completion tokens' log-probs, one unpadded sequence at a time (no fused head)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logps = F.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt_ids) - 1 :]


def _fixed_batch(trainer):
    """Prompts, their ids, and fixed policy / second completions installed in the trainer."""
    tokenizer = trainer.processing_class
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    policy = [[11, 12, 13], [14, 15]]
    second = [[21, 22], [23, 24, 25, 26]]
    trainer.rollouts.generator = FixedGenerator(policy)
    trainer.second_sampler = FixedGenerator(second)
    return prompt_ids, policy, second


# ------------------------------------------------------------------------------------------------------- XPO
def test_xpo_trains_and_logs_trl_metrics(tiny_model_path, tmp_path):
    trainer = XPOTrainer(
        tiny_model_path,
        reward_funcs=length_reward,
        args=_config(XPOConfig, tmp_path),
        train_dataset=zen_dataset("conversational_prompt_only"),
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
    assert all(torch.equal(p, q) for p, q in zip(before.values(), trainer.ref_model.parameters()))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and XPO_METRICS <= set(logs[0])
    assert logs[0]["alpha"] == pytest.approx(1e-5) and logs[0]["beta"] == pytest.approx(0.1)


def test_xpo_schedules_follow_the_epoch(tiny_model_path, tmp_path):
    args = _config(XPOConfig, tmp_path, beta=[0.1, 0.5], alpha=[0.01, 0.2, 0.3], max_steps=-1, num_train_epochs=2)
    trainer = XPOTrainer(
        tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS})
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "alpha" in entry]
    assert [e["alpha"] for e in logs] == pytest.approx([0.01, 0.2])
    assert [e["beta"] for e in logs] == pytest.approx([0.1, 0.5])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_xpo_loss_equals_a_plain_computation(tiny_model_path, tmp_path, loss_type):
    args = _config(XPOConfig, tmp_path, alpha=0.3, beta=0.2, loss_type=loss_type, max_length=64)
    trainer = XPOTrainer(
        tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS})
    )
    prompt_ids, policy, second = _fixed_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, [{"prompt": p} for p in PROMPTS[:2]]).item()
    decode = trainer.processing_class.decode
    expected = []
    for ids, a, b in zip(prompt_ids, policy, second):
        pa, pb = (plain_logps(trainer.model, ids, c).sum().item() for c in (a, b))
        ra, rb = (plain_logps(trainer.ref_model, ids, c).sum().item() for c in (a, b))
        policy_wins = len(decode(a, skip_special_tokens=True)) >= len(decode(b, skip_special_tokens=True))
        margin = (pa - ra) - (pb - rb)
        logits = margin if policy_wins else -margin
        if loss_type == "sigmoid":
            dpo = -torch.nn.functional.logsigmoid(torch.tensor(0.2 * logits)).item()
        else:
            dpo = (logits - 1 / (2 * 0.2)) ** 2
        expected.append(dpo + 0.3 * pb)
    reference = sum(expected) / len(expected)
    assert loss == pytest.approx(reference, rel=1e-4, abs=1e-4 * max(1.0, abs(reference)))


def test_xpo_with_a_judge(tiny_model_path, tmp_path):
    judge = FirstJudge()
    trainer = XPOTrainer(
        tiny_model_path,
        judge=judge,
        args=_config(XPOConfig, tmp_path),
        train_dataset=zen_dataset("standard_prompt_only"),
    )
    trainer.train()
    assert judge.calls == 2
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["judge/undecided"] == 0.0 and "objective/model_scores" not in logs[0]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": []}, "alpha"),
        ({"alpha": "big"}, "alpha"),
        ({"beta": [0.1, -1.0]}, "beta"),
        ({"loss_type": "hinge"}, "loss_type"),
    ],
)
def test_xpo_bad_config_is_refused(tmp_path, kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        _config(XPOConfig, tmp_path, **kwargs)


def test_xpo_bad_input_is_refused_before_training(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="use_vllm"):
        XPOTrainer(
            tiny_model_path,
            reward_funcs=length_reward,
            args=_config(XPOConfig, tmp_path, use_vllm=True),
            train_dataset=zen_dataset("standard_prompt_only"),
        )
    with pytest.raises(ValueError, match="rank"):
        XPOTrainer(
            tiny_model_path, args=_config(XPOConfig, tmp_path), train_dataset=zen_dataset("standard_prompt_only")
        )
    with pytest.raises(ValueError, match="prompt"):
        XPOTrainer(
            tiny_model_path,
            reward_funcs=length_reward,
            args=_config(XPOConfig, tmp_path),
            train_dataset=Dataset.from_dict({"text": ["a"]}),
        )


# ------------------------------------------------------------------------------------------------------- Nash-MD
NASH_MD_METRICS = {
    "loss/score",
    "loss/kl",
    "logps/chosen",
    "logps/rejected",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/probabilities",
    "objective/entropy",
    "rewards/margins",
    "rewards/accuracies",
    "val/model_contain_eos_token",
    "val/ref_contain_eos_token",
    "beta",
    "mixture_coef",
}


def test_nash_md_trains_and_logs_trl_metrics(tiny_model_path, tmp_path):
    trainer = NashMDTrainer(
        tiny_model_path,
        reward_funcs=length_reward,
        args=_config(NashMDConfig, tmp_path),
        train_dataset=zen_dataset("conversational_prompt_only"),
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
    assert all(torch.equal(p, q) for p, q in zip(before.values(), trainer.ref_model.parameters()))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and NASH_MD_METRICS <= set(logs[0])
    assert logs[0]["mixture_coef"] == pytest.approx(0.5) and logs[0]["beta"] == pytest.approx(0.1)


def test_nash_md_schedules_follow_the_epoch(tiny_model_path, tmp_path):
    args = _config(NashMDConfig, tmp_path, beta=[0.1, 0.5], mixture_coef=[0.2, 0.7], max_steps=-1, num_train_epochs=3)
    trainer = NashMDTrainer(
        tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS})
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "mixture_coef" in entry]
    assert [e["mixture_coef"] for e in logs] == pytest.approx([0.2, 0.7, 0.7])
    assert [e["beta"] for e in logs] == pytest.approx([0.1, 0.5, 0.5])


def test_nash_md_loss_equals_a_plain_computation(tiny_model_path, tmp_path):
    args = _config(NashMDConfig, tmp_path, beta=0.3, max_length=64)
    trainer = NashMDTrainer(
        tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS})
    )
    prompt_ids, policy, second = _fixed_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, [{"prompt": p} for p in PROMPTS[:2]]).item()
    decode = trainer.processing_class.decode
    expected = []
    for ids, a, b in zip(prompt_ids, policy, second):
        p, r = plain_logps(trainer.model, ids, a), plain_logps(trainer.ref_model, ids, a)
        gap = len(decode(a, skip_special_tokens=True)) - len(decode(b, skip_special_tokens=True))
        probability = 1 / (1 + torch.exp(torch.tensor(-float(gap)))).item()
        expected.append(0.3 * ((p - r) * p).sum().item() - (probability - 0.5) * p.sum().item())
    reference = sum(expected) / len(expected)
    assert loss == pytest.approx(reference, rel=1e-4, abs=1e-4 * max(1.0, abs(reference)))


def test_mixture_logits_are_the_geometric_mixture(tiny_model_path, tmp_path):
    """The mixture sampler's next-token log-probs equal log_softmax(c * ref + (1 - c) * policy), with left padding."""
    trainer = NashMDTrainer(
        tiny_model_path,
        reward_funcs=length_reward,
        args=_config(NashMDConfig, tmp_path, mixture_coef=0.3),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )
    with torch.no_grad():  # make the reference differ from the policy
        for p in trainer.ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sequences = [[5, 6, 7, 8], [9, 10]]
    input_ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    prompt_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    mixture = GeometricMixtureLogits(reference_last_logits(trainer), prompt_mask, 0.3)
    with torch.no_grad():
        policy_last = torch.stack([trainer.model(input_ids=torch.tensor([s])).logits[0, -1] for s in sequences])
        ref_last = torch.stack([trainer.ref_model(input_ids=torch.tensor([s])).logits[0, -1] for s in sequences])
        mixed = mixture(input_ids, policy_last.clone())
    expected = torch.log_softmax(0.3 * ref_last + 0.7 * policy_last, dim=-1)
    torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-4)


def test_nash_md_with_a_judge(tiny_model_path, tmp_path):
    judge = FirstJudge()
    trainer = NashMDTrainer(
        tiny_model_path,
        judge=judge,
        args=_config(NashMDConfig, tmp_path),
        train_dataset=zen_dataset("standard_prompt_only"),
    )
    trainer.train()
    assert judge.calls == 2
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["rewards/probabilities"] == pytest.approx(0.9) and "rewards/chosen" not in logs[0]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"mixture_coef": 1.5}, "mixture_coef"), ({"mixture_coef": []}, "mixture_coef"), ({"beta": 0.0}, "beta")],
)
def test_nash_md_bad_config_is_refused(tmp_path, kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        _config(NashMDConfig, tmp_path, **kwargs)


def test_nash_md_bad_input_is_refused_before_training(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="use_vllm"):
        NashMDTrainer(
            tiny_model_path,
            reward_funcs=length_reward,
            args=_config(NashMDConfig, tmp_path, use_vllm=True),
            train_dataset=zen_dataset("standard_prompt_only"),
        )
    with pytest.raises(ValueError, match="not both"):
        NashMDTrainer(
            tiny_model_path,
            reward_funcs=length_reward,
            judge=FirstJudge(),
            args=_config(NashMDConfig, tmp_path),
            train_dataset=zen_dataset("standard_prompt_only"),
        )


@pytest.mark.parametrize("trainer_class", [XPOTrainer, NashMDTrainer])
def test_lora_uses_the_adapter_free_model_as_reference(tiny_model_path, tmp_path, trainer_class):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = trainer_class(
        tiny_model_path,
        reward_funcs=length_reward,
        args=_config(trainer_class.config_class, tmp_path),
        train_dataset=zen_dataset("standard_prompt_only"),
        peft_config=lora,
    )
    assert trainer.ref_model is None
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    kl = "objective/kl" if trainer_class is XPOTrainer else "loss/kl"
    assert logs[0][kl] == pytest.approx(0.0, abs=1e-4)  # LoRA's B starts at 0: policy == reference
    assert logs[-1][kl] != pytest.approx(0.0, abs=1e-4)
