"""Packed (padding-free) forwards of the preference trainers: the layout of `pack_rows`, and per trainer the same
loss, logged metrics and gradients as the padded layout on variable-length batches; models that cannot pack fall
back (auto) or fail clearly (required)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_trainer import (
    BCOConfig,
    BCOTrainer,
    CPOConfig,
    CPOTrainer,
    DPOConfig,
    DPOTrainer,
    KTOConfig,
    KTOTrainer,
    ORPOConfig,
    ORPOTrainer,
    RewardConfig,
    RewardTrainer,
)
from llm_trainer.data.collators import DataCollatorForPreference
from llm_trainer.modeling import add_token_logprob_head
from llm_trainer.models import packed_attention
from llm_trainer.models.packed_attention import Segment
from llm_trainer.testing import make_tiny_model, zen_dataset
from llm_trainer.trainer.preference_forward import (
    concatenated_forward,
    pack_rows,
    paired_token_metrics,
)

RELATIVE = 1e-5
"""Packed and padded differ only in summation order: float32 agreement to 1e-5 of each quantity's magnitude."""


def _tolerance(values: torch.Tensor | float) -> float:
    magnitude = values.detach().abs().max().item() if isinstance(values, torch.Tensor) else abs(values)
    return RELATIVE * max(1.0, magnitude)


def _assert_close(packed: torch.Tensor | float, padded: torch.Tensor | float, what: str) -> None:
    difference = (torch.as_tensor(packed) - torch.as_tensor(padded)).abs().max().item()
    assert difference <= _tolerance(padded), f"{what}: packed and padded differ by {difference}"


# ------------------------------------------------------------------------------------------------------ layout
def test_pack_rows_shares_each_pairs_prompt_and_maps_every_token():
    # 2 pairs, chosen rows first. Pair 0 shares 3 prompt tokens; pair 1 only its first token (no sharing).
    ids = torch.tensor(
        [
            [5, 6, 7, 8, 9, 0],
            [5, 1, 2, 0, 0, 0],
            [5, 6, 7, 3, 0, 0],
            [5, 4, 4, 4, 4, 4],
        ]
    )
    mask = (ids != 0).long()
    mask[3] = 1
    rows = pack_rows(ids, mask, share_pairs=True)
    assert rows.layout.segments == (
        Segment(0, 2),  # pair 0's prompt but its last token
        Segment(2, 5, 0, 2),  # chosen: [7, 8, 9], attending to [5, 6]
        Segment(5, 7, 0, 2),  # rejected: [7, 3]
        Segment(7, 10),  # pair 1, independent rows
        Segment(10, 16),
    )
    assert rows.input_ids.tolist() == [5, 6, 7, 8, 9, 7, 3, 5, 1, 2, 5, 4, 4, 4, 4, 4]
    assert rows.layout.position_ids()[0].tolist() == [0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5]
    # Every real token reads back in place; padding reads the zero slot.
    unpacked = rows.unpack(rows.input_ids.float()[None]).long()
    torch.testing.assert_close(unpacked, ids * mask)
    assert rows.index[0, :2].tolist() == rows.index[2, :2].tolist() == [0, 1]


def test_pack_rows_shares_no_token_whose_target_differs():
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]])
    targets = torch.tensor([[2, 3, 4, -100], [2, -100, 5, -100]])  # row 1 scores no token after position 0
    rows = pack_rows(ids, None, targets, share_pairs=True)
    # Shared: tokens 0..1 (targets agree at position 0 only), so the prefix is token 0.
    assert rows.layout.segments == (Segment(0, 1), Segment(1, 4, 0, 1), Segment(4, 7, 0, 1))
    torch.testing.assert_close(rows.unpack(rows.pack(targets, -100)[None]), targets)


def test_pack_rows_refuses_left_padding():
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert pack_rows(ids, torch.tensor([[0, 1, 1], [1, 1, 1]])) is None
    assert pack_rows(ids, torch.tensor([[1, 1, 0], [1, 1, 1]])) is not None


# ------------------------------------------------------------------------------------ forward-level checks
@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("packed-pref") / "llama", "llama", tie_word_embeddings=True)


def _random_pairs(sizes: list[tuple[int, int, int]], vocab: int = 500, seed: int = 0) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    return [{"prompt_ids": tokens(p), "chosen_ids": tokens(c), "rejected_ids": tokens(r)} for p, c, r in sizes]


SIZES = [(5, 3, 9), (12, 7, 2), (1, 4, 4), (3, 11, 6), (9, 1, 1)]


def _forward_and_grads(model, batch, packed: bool, **kwargs):
    model.zero_grad()
    forward = concatenated_forward(model, batch, packed=packed, **kwargs)
    loss = forward.chosen_logps.sum() - 0.5 * forward.rejected_logps.sum()
    if forward.outputs.aux_loss is not None:
        loss = loss + forward.outputs.aux_loss
    loss.backward()
    return forward, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_concatenated_forward_packed_matches_padded(llama_path):
    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32)
    add_token_logprob_head(model, outputs=("entropy", "is_top1", "mean_logits", "log_sum_sq_probs"))
    packed_attention.enable(model)
    batch = DataCollatorForPreference(pad_token_id=0)(_random_pairs(SIZES))
    padded, padded_grads = _forward_and_grads(model, batch, packed=False)
    packed, packed_grads = _forward_and_grads(model, batch, packed=True)
    for field in ("chosen_logps", "rejected_logps", "per_token_logps"):
        _assert_close(getattr(packed, field), getattr(padded, field), field)
    for field in ("entropy", "mean_logits", "log_sum_sq_probs"):
        _assert_close(getattr(packed.outputs, field), getattr(padded.outputs, field), field)
    assert torch.equal(packed.outputs.is_top1, padded.outputs.is_top1)
    for key, value in paired_token_metrics(padded).items():
        _assert_close(paired_token_metrics(packed)[key], value, key)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        _assert_close(packed_grads[name], grad, name)


def test_moe_router_loss_packed_matches_padded():
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
    add_token_logprob_head(model)
    packed_attention.enable(model)
    batch = DataCollatorForPreference(pad_token_id=0)(_random_pairs(SIZES, vocab=100))
    padded, padded_grads = _forward_and_grads(model, batch, packed=False, output_router_logits=True)
    packed, packed_grads = _forward_and_grads(model, batch, packed=True, output_router_logits=True)
    _assert_close(packed.outputs.aux_loss, padded.outputs.aux_loss, "aux_loss")
    _assert_close(packed.chosen_logps, padded.chosen_logps, "chosen_logps")
    for name, grad in padded_grads.items():
        _assert_close(packed_grads[name], grad, name)


# ------------------------------------------------------------------------------------------ trainer-level checks
def _common(tmp_path, packed: bool | None) -> dict[str, Any]:
    return dict(
        output_dir=str(tmp_path / f"packed-{packed}"),
        report_to="none",
        per_device_train_batch_size=4,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        packed_forward=packed,
    )


def _one_step(trainer, rows: int = 6) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """Loss, logged metrics and gradients of one training batch (the first `rows` examples, in order)."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    batch = trainer._prepare_inputs(batch)
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


def _assert_same_step(make_trainer, skip_metrics: tuple[str, ...] = ()) -> tuple[Any, Any]:
    padded, packed = make_trainer(False), make_trainer(True)
    assert not padded._packed and packed._packed
    padded_loss, padded_metrics, padded_grads = _one_step(padded)
    packed_loss, packed_metrics, packed_grads = _one_step(packed)
    _assert_close(packed_loss, padded_loss, "loss")
    assert packed_metrics.keys() == padded_metrics.keys()
    for key, value in padded_metrics.items():
        if key not in skip_metrics:
            _assert_close(packed_metrics[key], value, key)
    assert packed_grads.keys() == padded_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        _assert_close(packed_grads[name], grad, name)
    return padded, packed


DPO_CASES = {
    "sigmoid": {},
    "sft_ipo_wpo": {"loss_type": ["sigmoid", "ipo", "sft"], "loss_weights": [1.0, 0.5, 0.3], "use_weighting": True},
    "ld_dpo": {"ld_alpha": 0.5},
    "precomputed_reference": {"precompute_ref_log_probs": True},
    "gradient_checkpointing": {"gradient_checkpointing": True},
}


@pytest.mark.parametrize("case", sorted(DPO_CASES))
def test_dpo_packed_matches_padded(case, tiny_llama_path, tmp_path):
    dataset = zen_dataset("standard_preference")

    def make(packed: bool) -> DPOTrainer:
        args = DPOConfig(**_common(tmp_path, packed), **DPO_CASES[case])
        return DPOTrainer(model=tiny_llama_path, args=args, train_dataset=dataset)

    padded, packed = _assert_same_step(make)
    batch = packed.data_collator([packed.train_dataset[i] for i in range(6)])
    shared = pack_rows(batch["input_ids"], batch["attention_mask"], share_pairs=True).layout.segments
    assert any(segment.prefix_length for segment in shared)  # the pairs' prompts ran once
    if case == "precomputed_reference":
        for column in ("ref_chosen_logps", "ref_rejected_logps"):
            reference = torch.tensor(padded.train_dataset[column])
            _assert_close(torch.tensor(packed.train_dataset[column]), reference, column)


def test_dpo_lora_reference_packed_matches_padded(tiny_model_path, tmp_path):
    from peft import LoraConfig

    dataset = zen_dataset("conversational_preference")

    def make(packed: bool) -> DPOTrainer:
        torch.manual_seed(0)
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        args = DPOConfig(**_common(tmp_path, packed))
        return DPOTrainer(model=tiny_model_path, args=args, train_dataset=dataset, peft_config=peft_config)

    _assert_same_step(make)


@pytest.mark.parametrize("trainer_cls", [KTOTrainer, BCOTrainer])
def test_unpaired_packed_matches_padded(trainer_cls, tiny_llama_path, tmp_path):
    dataset = zen_dataset("standard_unpaired_preference")
    config_cls = KTOConfig if trainer_cls is KTOTrainer else BCOConfig

    def make(packed: bool):
        return trainer_cls(model=tiny_llama_path, args=config_cls(**_common(tmp_path, packed)), train_dataset=dataset)

    _assert_same_step(make)


@pytest.mark.parametrize("trainer_cls", [ORPOTrainer, CPOTrainer])
def test_orpo_cpo_packed_matches_padded(trainer_cls, tiny_llama_path, tmp_path):
    dataset = zen_dataset("standard_preference")
    config_cls = ORPOConfig if trainer_cls is ORPOTrainer else CPOConfig

    def make(packed: bool):
        args = config_cls(**_common(tmp_path, packed), max_length=64)
        return trainer_cls(model=tiny_llama_path, args=args, train_dataset=dataset)

    # `logits/*` differ by design: the padded (TRL's) value also averages over the padding positions.
    padded, packed = _assert_same_step(make, skip_metrics=("logits/chosen", "logits/rejected"))
    # Packed, they average over the real positions: check against the padded forward's mean logits there.
    batch = padded._prepare_inputs(padded.data_collator([padded.train_dataset[i] for i in range(6)]))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    padded_ids = torch.nn.functional.pad(ids, (0, 1), value=padded.padding_value)  # as the trainer's forward
    with torch.no_grad():
        out = padded.model(
            input_ids=padded_ids,
            attention_mask=torch.nn.functional.pad(mask, (0, 1)),
            labels=padded_ids,
            token_logprobs=True,
        )
    length = mask.sum(dim=1) - (0 if trainer_cls.logits_include_last else 1)
    kept = torch.arange(ids.size(1)) < length[:, None]
    half = ids.size(0) // 2
    logged = {key: values[-1] for key, values in packed._metrics["train"].items()}
    _assert_close(logged["logits/chosen"], out.mean_logits[:half][kept[:half]].mean(), "logits/chosen")
    _assert_close(logged["logits/rejected"], out.mean_logits[half:][kept[half:]].mean(), "logits/rejected")


@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("packed-reward") / "rm", "llama", task="sequence-classification")


def test_reward_packed_matches_padded(reward_model_path, tmp_path):
    dataset = zen_dataset("standard_preference")

    def make(packed: bool) -> RewardTrainer:
        args = RewardConfig(**_common(tmp_path, packed), center_rewards_coefficient=0.1)
        return RewardTrainer(model=reward_model_path, args=args, train_dataset=dataset)

    _assert_same_step(make)


def test_reward_scores_the_token_transformers_picks(reward_model_path, tmp_path):
    """Pad tokens inside a sequence (pad = eos at its end): the score is read before them, as transformers does."""
    trainer = RewardTrainer(
        model=reward_model_path,
        args=RewardConfig(**_common(tmp_path, None)),
        train_dataset=zen_dataset("standard_preference"),
    )
    assert trainer._packed
    pad = trainer.model.config.pad_token_id
    ids = torch.tensor([[7, 8, 9, pad, pad], [7, 8, 5, 6, pad], [7, 8, 4, 0, 0], [7, 8, 9, 10, pad]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        expected = trainer.model(input_ids=ids, attention_mask=mask).logits
        scores = trainer._packed_scores(trainer.model, {"input_ids": ids, "attention_mask": mask})
    _assert_close(scores, expected, "scores")


# ------------------------------------------------------------------------------------------------- fallback
@pytest.fixture(scope="module")
def sliding_window_path(tmp_path_factory) -> str:
    """A model whose attention cannot run packed (sliding window)."""
    return make_tiny_model(
        tmp_path_factory.mktemp("packed-sw") / "m", "qwen2", use_sliding_window=True, sliding_window=8
    )


def test_unsupported_attention_falls_back_or_fails(sliding_window_path, tmp_path):
    dataset = zen_dataset("standard_preference")
    auto = DPOTrainer(model=sliding_window_path, args=DPOConfig(**_common(tmp_path, None)), train_dataset=dataset)
    assert not auto.padding_free
    _one_step(auto)  # trains padded
    with pytest.raises(ValueError, match=r"DPOConfig.packed_forward=True needs packed sequences.*sliding-window"):
        DPOTrainer(model=sliding_window_path, args=DPOConfig(**_common(tmp_path, True)), train_dataset=dataset)
    with pytest.raises(ValueError, match=r"ORPOConfig.packed_forward=True.*sliding-window"):
        ORPOTrainer(
            model=sliding_window_path, args=ORPOConfig(**_common(tmp_path, True), max_length=64), train_dataset=dataset
        )


def test_dpo_padding_free_means_packed(tiny_llama_path, sliding_window_path, tmp_path):
    dataset = zen_dataset("standard_preference")
    args = DPOConfig(**{**_common(tmp_path, None), "padding_free": True})
    assert DPOTrainer(model=tiny_llama_path, args=args, train_dataset=dataset).padding_free
    with pytest.raises(ValueError, match=r"DPOConfig.padding_free=True needs packed sequences.*sliding-window"):
        DPOTrainer(model=sliding_window_path, args=args, train_dataset=dataset)
    conflicting = DPOConfig(**{**_common(tmp_path, False), "padding_free": True})
    with pytest.raises(ValueError, match="`packed_forward=False` asks for padded"):
        DPOTrainer(model=tiny_llama_path, args=conflicting, train_dataset=dataset)


def test_prompt_learning_adapter_is_not_packed(tiny_llama_path):
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_path),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    )
    assert packed_attention.prepare((model,), None, "X.packed_forward") is False
    with pytest.raises(ValueError, match="PromptTuningConfig"):
        packed_attention.prepare((model,), True, "X.packed_forward")
