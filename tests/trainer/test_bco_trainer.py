"""BCOTrainer (TRL 1.13's API; no TRL in the venv to compare with): the loss against a hand computation from full
logits, the running reward shift δ, UDM weights, checkpointing of δ, training progress and bad input."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from parity.helpers import FLOAT32_EPS, ROUNDING_SAFETY
from transformers import AutoModelForCausalLM

from llm_trainer import BCOConfig, BCOTrainer
from llm_trainer.losses import RunningMoments, density_ratio_weights
from llm_trainer.testing import get_tokenizer, zen_dataset
from llm_trainer.trainer.bco_trainer import PromptClassifier


def _config(tmp_path, **kwargs) -> BCOConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
    )
    return BCOConfig(**{**defaults, **kwargs})


def _perturbed(path: str, seed: int = 0):
    model = AutoModelForCausalLM.from_pretrained(path)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def _logps_from_logits(model, batch) -> torch.Tensor:
    """Summed completion log-probs from the full logits (the textbook way)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets, mask = batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:].bool()
    per_token = logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    return (per_token * mask).sum(-1)


def _bag_of_words(input_ids, attention_mask):
    return F.one_hot(input_ids, 1024).float().mul(attention_mask[..., None]).sum(1)


@pytest.fixture
def eight_rows():
    return zen_dataset("standard_unpaired_preference").select(range(8))  # labels T,F,F,T,T,F,T,F


def test_loss_matches_hand_computation(tiny_model_path, tmp_path, eight_rows):
    beta = 0.5
    trainer = BCOTrainer(
        model=tiny_model_path,
        ref_model=_perturbed(tiny_model_path),
        args=_config(tmp_path, beta=beta),
        train_dataset=eight_rows,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    label = batch["label"]
    policy_logps, ref_logps = _logps_from_logits(trainer.model, batch), _logps_from_logits(trainer.ref_model, batch)
    rewards = beta * (policy_logps - ref_logps)
    delta = rewards.mean()  # the running mean after this first batch
    expected = torch.cat([-F.logsigmoid(rewards[label] - delta), -F.logsigmoid(-(rewards[~label] - delta))]).mean()
    # Rewards, δ and margins are differences of log-probs (here computed from the full logits, there in chunks): beyond
    # 1e-4 relative, they may differ by float32 rounding of β·|logp| (tests/parity/helpers.py)
    reward_tol = ROUNDING_SAFETY * FLOAT32_EPS * beta * torch.cat([policy_logps, ref_logps]).abs().max().item()

    def close(actual: float, wanted: float) -> bool:
        return math.isclose(actual, wanted, rel_tol=1e-4, abs_tol=reward_tol)

    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    assert close(trainer.running.mean, delta.item())
    metrics = trainer._metrics["train"]
    assert close(metrics["delta"][-1], delta.item())
    assert close(metrics["rewards/chosen"][-1], rewards[label].mean().item())
    assert close(metrics["rewards/margins"][-1], (rewards[label].mean() - rewards[~label].mean()).item())

    # Evaluation reads δ but does not update it; a second training batch folds into the running mean
    trainer.model.eval()
    trainer.compute_loss(trainer.model, batch)
    assert close(trainer.running.mean, delta.item())
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    assert close(trainer.running.mean, delta.item())  # the same rewards again
    assert trainer.running.count == pytest.approx(16)


def test_udm_weights_the_undesirable_losses(tiny_model_path, tmp_path, eight_rows):
    beta = 0.5
    trainer = BCOTrainer(
        model=tiny_model_path,
        ref_model=_perturbed(tiny_model_path),
        args=_config(tmp_path, beta=beta, min_density_ratio=0.2, max_density_ratio=5.0),
        train_dataset=eight_rows,
        embedding_func=_bag_of_words,
        embedding_tokenizer=get_tokenizer(),
    )
    assert trainer.match_underlying_distribution and trainer.clf is not None
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    label = batch["label"]
    rewards = beta * (_logps_from_logits(trainer.model, batch) - _logps_from_logits(trainer.ref_model, batch))
    delta = rewards.mean()
    embeddings = _bag_of_words(batch["embedding_input_ids"], batch["embedding_attention_mask"])[~label]
    weights = density_ratio_weights(trainer.clf.predict_proba(embeddings), 0.2, 5.0)
    assert not torch.allclose(weights, torch.ones_like(weights))
    expected = torch.cat(
        [-F.logsigmoid(rewards[label] - delta), weights * -F.logsigmoid(-(rewards[~label] - delta))]
    ).mean()
    trainer.model.train()
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch).detach(), expected, rtol=1e-4, atol=1e-5)
    tokens = get_tokenizer()(eight_rows[0]["prompt"], add_special_tokens=False)["input_ids"]
    assert trainer.train_dataset[0]["embedding_input_ids"] == tokens


def test_prompt_classifier_solves_the_balanced_logistic_regression():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=generator, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(60, generator=generator, dtype=torch.float64)) > 0.8  # imbalanced classes
    clf = PromptClassifier().fit(x, y)
    # First-order optimality of ½‖w‖² + C·Σ s_i·BCE_i with balanced weights s_i = n / (2·n_class)
    w = clf.weight.clone().requires_grad_(True)
    b = clf.bias.clone().requires_grad_(True)
    s = torch.where(y, len(y) / (2 * y.sum()), len(y) / (2 * (~y).sum())).double()
    objective = 0.5 * w.pow(2).sum() + F.binary_cross_entropy_with_logits(
        x @ w + b, y.double(), weight=s, reduction="sum"
    )
    objective.backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs() < 1e-4
    accuracy = ((clf.predict_proba(x) > 0.5) == y).double().mean()
    assert accuracy > 0.8
    with pytest.raises(ValueError, match="both desirable and undesirable"):
        PromptClassifier().fit(x, torch.ones(60, dtype=torch.bool))


def test_training_lowers_the_loss_and_updates_the_weights(tiny_model_path, tmp_path, eight_rows):
    trainer = BCOTrainer(
        model=tiny_model_path, args=_config(tmp_path, max_steps=8, learning_rate=3e-3), train_dataset=eight_rows
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[0] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference: every reward is 0
    assert losses[-1] < losses[0] - 0.05, losses
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(before[name], param), f"{name} did not change"
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert {"delta", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logits/chosen"} <= set(
        logs[-1]
    )
    assert logs[-1]["rewards/margins"] > 0


def test_running_moments_and_classifier_are_checkpointed(tiny_model_path, tmp_path, eight_rows):
    trainer = BCOTrainer(
        model=tiny_model_path,
        args=_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=eight_rows,
        embedding_func=_bag_of_words,
        embedding_tokenizer=get_tokenizer(),
    )
    trainer.train()
    checkpoint = os.path.join(tmp_path, "checkpoint-2")
    with open(os.path.join(checkpoint, "running.json")) as f:
        saved = json.load(f)
    assert saved["count"] == pytest.approx(16) and saved["mean"] == trainer.running.mean
    assert os.path.isfile(os.path.join(checkpoint, "clf.pt"))
    trained_weight = trainer.clf.weight

    trainer.running, trainer.clf = RunningMoments(), None
    trainer._load_optimizer_and_scheduler(checkpoint)
    assert trainer.running.mean == saved["mean"] and trainer.running.count == saved["count"]
    torch.testing.assert_close(trainer.clf.weight, trained_weight)


def test_paired_conversational_data_and_eval(tiny_model_path, tmp_path):
    trainer = BCOTrainer(
        model=tiny_model_path,
        args=_config(tmp_path, max_steps=1, per_device_train_batch_size=4, per_device_eval_batch_size=4),
        train_dataset=zen_dataset("conversational_preference"),
        eval_dataset=zen_dataset("conversational_preference", "test"),
    )
    trainer.train()
    delta = trainer.running.mean
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_delta", "eval_rewards/margins", "eval_logps/chosen"} <= set(metrics)
    assert trainer.running.mean == delta


def test_experimental_path():
    from llm_trainer.experimental.bco import BCOConfig as Config
    from llm_trainer.experimental.bco import BCOTrainer as Trainer

    assert Config is BCOConfig and Trainer is BCOTrainer
    assert BCOConfig("out").learning_rate == 5e-7 and BCOConfig("out").prompt_sample_size == 1024


# ------------------------------------------------------------------------------------------------ bad input
def test_labels_of_one_kind(tiny_model_path, tmp_path):
    undesirable = zen_dataset("standard_unpaired_preference").filter(lambda row: not row["label"])
    with pytest.raises(ValueError, match="Every example of the train dataset is undesirable"):
        BCOTrainer(model=tiny_model_path, args=_config(tmp_path), train_dataset=undesirable)


def test_missing_columns(tiny_model_path, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["a"], "completion": ["b"]})
    with pytest.raises(ValueError, match=r"missing: \['label'\]"):
        BCOTrainer(model=tiny_model_path, args=_config(tmp_path), train_dataset=dataset)


def test_udm_needs_both_embedding_arguments(tiny_model_path, tmp_path, eight_rows):
    with pytest.raises(ValueError, match="needs both `embedding_func` and `embedding_tokenizer`"):
        BCOTrainer(
            model=tiny_model_path, args=_config(tmp_path), train_dataset=eight_rows, embedding_func=_bag_of_words
        )


def test_model_init_is_not_supported(tiny_model_path, tmp_path, eight_rows):
    with pytest.raises(ValueError, match="`model_init` is not supported"):
        BCOTrainer(model_init=lambda: None, args=_config(tmp_path), train_dataset=eight_rows)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"generate_during_eval": True}, "set it to False"),
        ({"is_encoder_decoder": True}, "use a decoder-only causal LM"),
        ({"min_density_ratio": 2.0, "max_density_ratio": 1.0}, "0 < `min_density_ratio` <= `max_density_ratio`"),
        ({"beta": -0.1}, "`beta` must be positive"),
        ({"prompt_sample_size": 0}, "`prompt_sample_size` must be a positive"),
    ],
)
def test_bad_config(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **kwargs)


def test_udm_needs_a_map_style_dataset(tiny_model_path, tmp_path, eight_rows):
    with pytest.raises(ValueError, match="Load it without streaming, or drop `embedding_func`"):
        BCOTrainer(
            model=tiny_model_path,
            args=_config(tmp_path),
            train_dataset=eight_rows.to_iterable_dataset(),
            embedding_func=_bag_of_words,
            embedding_tokenizer=get_tokenizer(),
        )
