"""The training utilities people import from TRL's `trainer.utils`: RunningMoments, compute_accuracy, empty_cache,
peft_module_casting_to_bf16, get_model_param_count, freeze_model_layers, disable_dropout_in_model."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.trainer_utils import EvalPrediction

from llm_trainer.testing import make_tiny_model
from llm_trainer.trainer.utils import (
    RunningMoments,
    compute_accuracy,
    disable_dropout_in_model,
    empty_cache,
    freeze_model_layers,
    get_model_param_count,
    peft_module_casting_to_bf16,
)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), num_hidden_layers=3)


# ------------------------------------------------------------------------------------------------ RunningMoments
def test_running_moments_batched_updates_match_the_whole_stream():
    torch.manual_seed(0)
    batches = [torch.randn(n, dtype=torch.float64) * 3 + 2 for n in (5, 1, 17, 8)]
    running = RunningMoments()
    for batch in batches:
        running.update(batch)
    stream = torch.cat(batches).numpy()
    assert running.mean == pytest.approx(stream.mean(), rel=1e-6)
    assert running.var == pytest.approx(stream.var(), rel=1e-5)
    assert running.std == pytest.approx(stream.std(ddof=1), rel=1e-5)
    assert running.count == pytest.approx(len(stream), rel=1e-12)


class _TwoProcessSum:
    """`reduce_sum` as process 0 of two sees it: adds process 1's share of each reduced quantity."""

    def __init__(self, other: torch.Tensor):
        self.other, self.calls = other, 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:  # (sum, count)
            self.mean_total = tensor + torch.stack([self.other.sum(), torch.tensor(float(self.other.numel()))])
            return self.mean_total
        mean = self.mean_total[0] / self.mean_total[1]  # squared deviations about the global mean
        return tensor + ((self.other - mean) ** 2).sum()


def test_running_moments_merge_the_shards_of_all_processes():
    torch.manual_seed(1)
    local, remote = torch.randn(6) + 1, torch.randn(10) * 2 - 1
    merged = RunningMoments()
    merged.update(torch.randn(4))  # earlier steps
    single = RunningMoments(**vars(merged))
    merged.update(local, reduce_sum=_TwoProcessSum(remote))
    single.update(torch.cat([local, remote]))
    assert merged.mean == pytest.approx(single.mean, rel=1e-5)
    assert merged.var == pytest.approx(single.var, rel=1e-5)
    assert merged.count == pytest.approx(single.count, rel=1e-12)


# ----------------------------------------------------------------------------------------------- compute_accuracy
def test_compute_accuracy_token_classification_skips_ignored_positions():
    logits = np.array([[[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], [[0.6, 0.4], [0.2, 0.8], [0.5, 0.1]]])
    labels = np.array([[1, 1, -100], [0, -100, 1]])
    assert compute_accuracy(EvalPrediction(predictions=logits, label_ids=labels)) == {"accuracy": 2 / 4}
    ids = logits.argmax(-1)
    assert compute_accuracy(EvalPrediction(predictions=ids, label_ids=labels)) == {"accuracy": 2 / 4}


def test_compute_accuracy_pairwise_rewards_leave_ties_out():
    rewards = np.array([[2.0, 1.0], [0.5, 0.5], [0.1, 0.3], [3.0, -1.0]])
    labels = np.zeros(4, dtype=int)  # the chosen reward (index 0) should be the higher one
    with pytest.warns(UserWarning, match="1 of 4 pairs have equal rewards"):
        assert compute_accuracy(EvalPrediction(predictions=rewards, label_ids=labels)) == {"accuracy": 2 / 3}


def test_prm_trainer_uses_the_shared_compute_accuracy():
    from llm_trainer.trainer import prm_trainer, utils

    assert prm_trainer.compute_accuracy is utils.compute_accuracy


# ------------------------------------------------------------------------------------------------ memory / dtypes
def test_empty_cache_collects_garbage(monkeypatch):
    import gc

    collected = []
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(True) or 0)
    assert empty_cache() is None
    assert collected == [True]


def test_peft_module_casting_to_bf16(tiny_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_path, torch_dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.get_input_embeddings().to(torch.bfloat16)
    base.model.norm.to(torch.bfloat16)
    peft_module_casting_to_bf16(model)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(dtypes[n] == torch.bfloat16 for n in dtypes if "lora_" in n or "lm_head" in n or "embed_tokens" in n)
    assert all(dtypes[n] == torch.float32 for n in dtypes if "norm" in n)
    assert all(dtypes[n] == torch.float32 for n in dtypes if "mlp" in n or "base_layer" in n)


# --------------------------------------------------------------------------------------------- parameter counts
def test_get_model_param_count_all_trainable_and_zero3(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    total = sum(p.numel() for p in model.parameters())
    assert get_model_param_count(model) == total
    model.lm_head.requires_grad_(False)
    assert get_model_param_count(model, trainable_only=True) == total - model.lm_head.weight.numel()
    # ZeRO-3: each rank's tensor is an empty shard and `ds_numel` carries the full size
    for param in model.parameters():
        param.ds_numel = param.numel()
        param.data = torch.empty(0)
    assert get_model_param_count(model) == total
    assert sum(p.numel() for p in model.parameters()) == 0


def test_get_model_param_count_counts_tied_weights_once(tmp_path):
    tied = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path, tie_word_embeddings=True))
    assert get_model_param_count(tied) == sum(p.numel() for p in tied.parameters())
    assert tied.lm_head.weight is tied.get_input_embeddings().weight


# ---------------------------------------------------------------------------------------------- freezing layers
def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_freeze_model_layers_freezes_embeddings_and_the_first_n_blocks(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert freeze_model_layers(model, 2) is model
    trainable = _trainable(model)
    assert not any(n.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1.")) for n in trainable)
    assert {n for n in trainable if n.startswith("model.layers.2.")} == {
        n for n, _ in model.named_parameters() if n.startswith("model.layers.2.")
    }
    assert "model.norm.weight" in trainable and "lm_head.weight" in trainable


def test_freeze_model_layers_zero_and_all_and_peft(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    freeze_model_layers(model, 0)
    assert _trainable(model) == {n for n, _ in model.named_parameters()} - {"model.embed_tokens.weight"}
    freeze_model_layers(model, 3)
    assert not any(".layers." in n for n in _trainable(model))
    # A PEFT model: its base model's blocks are found through the wrapper
    lora = AutoModelForCausalLM.from_pretrained(tiny_path)
    lora = peft.get_peft_model(lora, peft.LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    freeze_model_layers(lora, 1)
    trainable = _trainable(lora)
    assert trainable and not any(".layers.0." in n for n in trainable)
    assert any(".layers.1." in n for n in trainable)


def test_freeze_model_layers_bad_input(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    with pytest.raises(ValueError, match="between 0 and 3"):
        freeze_model_layers(model, 4)
    with pytest.raises(ValueError, match="between 0 and 3"):
        freeze_model_layers(model, -1)
    with pytest.raises(ValueError, match="Cannot find the transformer layers"):
        freeze_model_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1)
    assert len(_trainable(model)) == len(list(model.parameters()))  # nothing frozen by a refused call


def test_disable_dropout_in_model():
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 2), torch.nn.Dropout(0.3), torch.nn.Sequential(torch.nn.Dropout(0.1))
    )
    disable_dropout_in_model(model)
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.0, 0.0]
