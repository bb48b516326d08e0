"""OnlineDPOTrainer on the tiny offline model: training moves the policy (not the reference) and logs TRL's metric
names, a countable reward rises, a pairwise judge ranks the pairs, and bad input is refused before training."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from llm_trainer import OnlineDPOConfig, OnlineDPOTrainer
from llm_trainer.judges import BasePairwiseJudge
from llm_trainer.losses.preference import online_dpo_loss, rank_pairs
from llm_trainer.testing import get_tokenizer, make_tiny_model, zen_dataset

TRL_METRICS = {
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "val/contain_eos_token",
    "beta",
}
REWARD_METRICS = {"objective/rlhf_reward", "objective/scores_margin", "objective/scores"}


def _config(tmp_path, **kwargs) -> OnlineDPOConfig:
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
    return OnlineDPOConfig(**{**defaults, **kwargs})


def length_reward(completions, **kwargs):
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]


class VowelJudge(BasePairwiseJudge):
    """Test fixture: prefers the completion with more vowels (-1 on a tie), and records what it was asked."""

    def __init__(self):
        self.calls = []

    def judge(self, prompts, completions, shuffle_order=True, return_scores=False):
        self.calls.append((prompts, completions))
        verdicts = []
        for a, b in completions:
            va, vb = (sum(ch in "aeiou" for ch in text) for text in (a, b))
            verdicts.append(-1 if va == vb else int(vb > va))
        return verdicts


def test_training_moves_the_policy_and_logs_trl_metrics(tiny_model_path, tmp_path):
    trainer = OnlineDPOTrainer(
        tiny_model_path,
        reward_funcs=length_reward,
        args=_config(tmp_path),
        train_dataset=zen_dataset("conversational_prompt_only"),
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
    assert all(torch.equal(p, q) for p, q in zip(before.values(), trainer.ref_model.parameters()))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and TRL_METRICS | REWARD_METRICS <= set(logs[0])
    assert logs[0]["beta"] == pytest.approx(0.1)


def test_beta_schedule_follows_the_epoch(tiny_model_path, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["a b", "c d", "e f", "g h"]})
    args = _config(tmp_path, beta=[0.1, 0.5], max_steps=-1, num_train_epochs=2)
    trainer = OnlineDPOTrainer(tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=dataset)
    trainer.train()
    betas = [entry["beta"] for entry in trainer.state.log_history if "beta" in entry]
    assert betas == pytest.approx([0.1, 0.5])


def test_losses_and_ranking():
    first, second = torch.tensor([1.0, 3.0, 2.0]), torch.tensor([2.0, 1.0, 2.0])
    chosen, rejected = rank_pairs(first, second)
    assert chosen.tolist() == [3, 1, 2] and rejected.tolist() == [0, 4, 5]  # a tie chooses the first
    c, r, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    h = (-3.0 + 5.0) - (-4.0 + 4.5)  # 1.5
    sigmoid = online_dpo_loss(c, r, rc, rr, beta=0.2, loss_type="sigmoid")
    assert sigmoid.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(0.2 * h)).item(), rel=1e-6)
    ipo = online_dpo_loss(c, r, rc, rr, beta=0.2, loss_type="ipo")
    assert ipo.item() == pytest.approx((h - 1 / 0.4) ** 2, rel=1e-6)


def test_a_pairwise_judge_ranks_the_pairs(tiny_model_path, tmp_path):
    judge = VowelJudge()
    trainer = OnlineDPOTrainer(
        tiny_model_path, judge=judge, args=_config(tmp_path), train_dataset=zen_dataset("standard_prompt_only")
    )
    trainer.train()
    assert len(judge.calls) == 2
    prompts, pairs = judge.calls[0]
    assert len(prompts) == len(pairs) == 4 and all(len(pair) == 2 and isinstance(pair[0], str) for pair in pairs)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert TRL_METRICS <= set(logs[0]) and not REWARD_METRICS & set(logs[0])
    ties = [sum(v == -1 for v in VowelJudge().judge(*call)) / len(call[1]) for call in judge.calls]
    assert [entry["judge/undecided"] for entry in logs] == pytest.approx(ties)


def test_lora_uses_the_adapter_free_model_as_reference(tiny_model_path, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = OnlineDPOTrainer(
        tiny_model_path,
        reward_funcs=length_reward,
        args=_config(tmp_path),
        train_dataset=zen_dataset("standard_prompt_only"),
        peft_config=lora,
    )
    assert trainer.ref_model is None
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # LoRA's B starts at 0: policy == reference
    assert logs[-1]["objective/kl"] != pytest.approx(0.0, abs=1e-4)  # the adapter moved, the reference did not


def test_given_ref_model_and_evaluation(tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    trainer = OnlineDPOTrainer(
        tiny_model_path,
        ref_model=ref,
        reward_funcs=length_reward,
        args=_config(tmp_path, per_device_eval_batch_size=4),
        train_dataset=zen_dataset("standard_prompt_only"),
        eval_dataset=zen_dataset("standard_prompt_only", "test"),
    )
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: -log σ(0)
    assert {"eval_objective/scores", "eval_rewards/accuracies"} <= set(metrics)


def test_online_dpo_learns_to_say_seven(tmp_path):
    path = make_tiny_model(tmp_path / "policy", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    dataset = Dataset.from_dict({"prompt": [f"Count: {i}" for i in range(64)]})
    args = _config(
        tmp_path / "out",
        max_steps=30,
        per_device_train_batch_size=16,
        learning_rate=3e-2,
        gradient_checkpointing=False,
        logging_steps=5,
        seed=0,
        temperature=1.0,
    )

    def sevens(completions, **kwargs):
        return [float(text.count("7")) for text in completions]

    trainer = OnlineDPOTrainer(
        path, reward_funcs=sevens, args=args, train_dataset=dataset, processing_class=get_tokenizer()
    )
    trainer.train()
    scores = [entry["objective/scores"] for entry in trainer.state.log_history if "objective/scores" in entry]
    assert scores[-1] > max(4 * scores[0], scores[0] + 1.0), scores


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, "No way to rank"),
        ({"reward_funcs": length_reward, "judge": VowelJudge()}, "not both"),
        ({"judge": object()}, "pairwise judge"),
    ],
    ids=["no-reward-source", "rewards-and-judge", "not-a-judge"],
)
def test_bad_input_is_refused_before_training(tiny_model_path, tmp_path, kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        OnlineDPOTrainer(
            tiny_model_path, args=_config(tmp_path), train_dataset=zen_dataset("standard_prompt_only"), **kwargs
        )


def test_a_dataset_without_prompts_is_refused(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="prompt"):
        OnlineDPOTrainer(
            tiny_model_path,
            reward_funcs=length_reward,
            args=_config(tmp_path),
            train_dataset=Dataset.from_dict({"text": ["a", "b"]}),
        )


def test_config_checks():
    with pytest.raises(ValueError, match="loss_type"):
        OnlineDPOConfig(output_dir="x", loss_type="hinge", report_to="none")
    assert OnlineDPOConfig(output_dir="x", report_to="none", beta=0.3).beta == pytest.approx(0.3)
    config = OnlineDPOConfig(output_dir="x", report_to="none")
    assert (config.beta, config.max_new_tokens, config.max_completion_length, config.temperature) == (0.1, 64, 64, 0.9)
