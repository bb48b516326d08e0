"""Packed RL forwards (`llm_trainer.trainer.packed_rl`): the shared-prompt, padding-free layout of an `OnlineBatch`
gives the padded layout's log-probs, entropies, GRPO/RLOO losses and gradients; the token-budget micro-batcher gives
the unsplit micro-batch's loss and gradients; models that cannot run packed fall back (or are refused)."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from llm_trainer import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from llm_trainer.generation.loop import OnlineBatch, completion_logps
from llm_trainer.modeling import add_token_logprob_head
from llm_trainer.models import packed_attention
from llm_trainer.testing import make_tiny_model
from llm_trainer.trainer import packed_rl

PAD = 0
GEN = 3  # completions per prompt in the test batches


def _tolerance(values: torch.Tensor) -> float:
    """1e-5 relative to the largest magnitude (float32 sums over a few hundred terms)."""
    return 1e-5 * max(1.0, values.abs().max().item())


def _close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(got, want, atol=_tolerance(want), rtol=0, msg=what)


def _batch(prompts, completions, *, masked=(), tool=False, extra_pad=1) -> OnlineBatch:
    """Left-padded prompts and right-padded completions (one extra pad column each side), completions of the rows in
    `masked` out of the mask (as `mask_truncated_completions` does), an environment-written token per row with
    `tool`."""
    prompt_width = max(map(len, prompts)) + extra_pad
    completion_width = max(map(len, completions)) + extra_pad
    rows = len(prompts)
    prompt_ids = torch.full((rows, prompt_width), PAD)
    prompt_mask = torch.zeros(rows, prompt_width, dtype=torch.long)
    completion_ids = torch.full((rows, completion_width), PAD)
    completion_mask = torch.zeros(rows, completion_width, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        prompt_ids[row, prompt_width - len(prompt) :] = torch.tensor(prompt)
        prompt_mask[row, prompt_width - len(prompt) :] = 1
        completion_ids[row, : len(completion)] = torch.tensor(completion)
        completion_mask[row, : len(completion)] = 0 if row in masked else 1
    tool_mask = None
    if tool:
        tool_mask = torch.ones_like(completion_mask)
        tool_mask[:, 1] = 0
        tool_mask = tool_mask * completion_mask
    return OnlineBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, tool_mask)


def _rl_batch(seed: int = 0, masked=(4,), tool=False) -> OnlineBatch:
    """Two groups of `GEN` completions (rows shuffled, as the generation buffer shuffles them), of prompts of 9 and 5
    tokens, and two prompts of their own (3 and 1 tokens); completions of 1 to 8 tokens, row 4 masked out."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(3, 600, (n,), generator=gen).tolist()

    group_a, group_b = tokens(9), tokens(5)
    prompts = [group_a] * GEN + [group_b] * GEN + [tokens(3), tokens(1)]
    lengths = [6, 1, 8, 3, 7, 2, 5, 4]
    completions = [tokens(n) for n in lengths]
    order = torch.randperm(len(prompts), generator=gen).tolist()
    return _batch([prompts[i] for i in order], [completions[i] for i in order], masked=masked, tool=tool)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("packed-rl") / "llama", "llama")


def _model(path, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    add_token_logprob_head(model, outputs=("entropy",))
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def _assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and want
    for name, grad in want.items():
        _close(got[name], grad, name)


# ----------------------------------------------------------------------------------------------- layout
def test_rows_sharing_a_prompt_form_one_group_and_empty_rows_are_left_out():
    a, b, c = [5, 6, 7, 8], [9, 10], [11, 12, 13]
    batch = _batch([a, b, a, c, a], [[1, 2], [3], [4, 4, 4], [5], [6, 7]], masked=(3,))
    groups = packed_rl.prompt_groups(batch)
    assert [(g.rows, g.prompt_length, g.completion_lengths) for g in groups] == [
        ((0, 2, 4), 4, (2, 3, 2)),
        ((1,), 2, (1,)),
    ]
    assert groups[0].shared and not groups[1].shared
    assert groups[0].num_tokens == 3 + 7  # the prompt but its last token once, then [prompt[-1], completion[:-1]]
    assert groups[1].num_tokens == 2
    packed = packed_rl.PackedRows.build(batch, groups)
    assert packed.layout.total == 12
    assert packed.input_ids[0].tolist() == [5, 6, 7, 8, 1, 8, 4, 4, 8, 6, 9, 10]
    assert packed.targets[0].tolist() == [-100, -100, -100, 1, 2, 4, 4, 4, 6, 7, -100, 3]
    assert packed.layout.position_ids()[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 3, 4, 0, 1]
    alone = packed_rl.prompt_groups(batch, share_prompts=False)
    assert [g.rows for g in alone] == [(0,), (1,), (2,), (4,)]


def test_masks_only_the_padded_layout_reproduces_are_refused():
    batch = _batch([[5, 6], [7, 8, 9]], [[1, 2, 3], [4]])
    batch.completion_mask[0, 1] = 0  # a hole
    assert packed_rl.prompt_groups(batch) is None


def test_groups_split_into_chunks_within_a_token_budget():
    groups = [packed_rl.PromptGroup((i,), 4, (3,)) for i in range(4)]  # 6 tokens each
    big = packed_rl.PromptGroup((4, 5), 10, (10, 10))  # 29 tokens
    chunks = packed_rl.split_groups([*groups[:3], big, groups[3]], max_tokens=12)
    assert [[g.rows for g in chunk] for chunk in chunks] == [[(0,), (1,)], [(2,)], [(4, 5)], [(3,)]]
    assert [len(c) for c in packed_rl.split_groups(groups, max_rows=3)] == [3, 1]


# ----------------------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("batch_size", [None, 3])
def test_packed_completion_logps_match_padded(llama_path, batch_size):
    batch = _rl_batch()
    model = _model(llama_path)
    weights = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for setting in (False, True):
        logps, entropies, _ = completion_logps(model, batch, batch_size, entropy=True, packed_forward=setting)
        ((logps * weights).sum() + entropies.sum()).backward()
        results.append((logps.detach(), entropies.detach(), _grads(model)))
    (logps, entropies, grads), (packed_logps, packed_entropies, packed_grads) = results
    assert packed_attention.is_enabled(model)
    outside = batch.completion_mask == 0
    assert torch.all(packed_logps[outside] == 0) and torch.all(packed_entropies[outside] == 0)
    assert torch.all(logps[outside] == 0) and torch.all(packed_logps[~outside] < 0)
    _close(packed_logps, logps, "log-probs")
    _close(packed_entropies, entropies, "entropies")
    _assert_same_grads(packed_grads, grads)


def test_packed_lora_model_matches_padded(llama_path):
    from peft import LoraConfig, get_peft_model

    batch = _rl_batch(seed=2)
    model = get_peft_model(_model(llama_path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():  # non-zero B matrices, so the adapter changes the log-probs
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    results = []
    for setting in (False, True):
        logps = completion_logps(model, batch, packed_forward=setting)[0]
        logps.sum().backward()
        results.append((logps.detach(), _grads(model)))
        assert all("lora" in name for name in results[-1][1])
    _close(results[1][0], results[0][0], "log-probs")
    _assert_same_grads(results[1][1], results[0][1])


# ----------------------------------------------------------------------------------------------- trainers
def _trainer(cls, config_cls, path, tmp_path, peft_config=None, **kwargs):
    config = config_cls(
        output_dir=str(tmp_path),
        report_to="none",
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        **kwargs,
    )
    dataset = Dataset.from_dict({"prompt": ["a b c", "d e"] * 4})
    trainer = cls(
        model=path,
        reward_funcs=lambda completions, **kw: [1.0] * len(completions),
        args=config,
        train_dataset=dataset,
        peft_config=peft_config,
    )
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train()
    return trainer


def _scored(batch: OnlineBatch, model, seed: int = 3) -> OnlineBatch:
    """`batch` with advantages, the sampler's log-probs (the policy's, perturbed), a reference's log-probs and the
    loss-token count, as `make_batch` leaves them."""
    gen = torch.Generator().manual_seed(seed)
    shape = batch.completion_ids.shape
    with torch.no_grad():
        logps = completion_logps(model, batch, packed_forward=False)[0]
    batch.old_per_token_logps = (logps + 0.3 * torch.randn(shape, generator=gen)) * batch.completion_mask
    batch.ref_per_token_logps = (logps + 0.5 * torch.randn(shape, generator=gen)) * batch.completion_mask
    batch.advantages = torch.randn(shape[0], generator=gen)
    batch.num_items_in_batch = batch.loss_mask.sum() * 2
    return batch


def _loss_and_grads(trainer, batch: OnlineBatch, **settings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A training micro-step as `Trainer.training_step` takes it: `compute_loss`, divided for accumulation unless the
    trainer's loss already is, backward."""
    for name, value in settings.items():
        setattr(trainer.args, name, value)
    loss = trainer.compute_loss(trainer.model, batch)
    if not trainer.loss_is_scaled_for_ga:
        loss = loss / trainer.current_gradient_accumulation_steps
    trainer.accelerator.backward(loss)
    return loss.detach(), _grads(trainer.model)


GRPO_CASES = {
    "dapo": {},
    "grpo-beta": {"loss_type": "grpo", "beta": 0.1},
    "bnpo-tool": {"loss_type": "bnpo", "tool": True},
    "dr_grpo-entropy": {"loss_type": "dr_grpo", "entropy_coef": 0.05, "top_entropy_quantile": 0.5},
    "gspo": {"importance_sampling_level": "sequence", "loss_type": "grpo"},
}


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_packed_and_token_budget_match_padded(llama_path, tmp_path, case):
    options = dict(GRPO_CASES[case])
    tool = options.pop("tool", False)
    trainer = _trainer(GRPOTrainer, GRPOConfig, llama_path, tmp_path, **options)
    batch = _scored(_rl_batch(seed=4, tool=tool), trainer.model)
    if options.get("beta"):  # the reference pass, packed and padded, on a different model
        reference = _model(llama_path, seed=1)
        with torch.no_grad():
            padded_ref = completion_logps(reference, batch, packed_forward=False)[0]
            packed_ref = completion_logps(reference, batch, packed_forward=True)[0]
        _close(packed_ref, padded_ref, "reference log-probs")
        batch.ref_per_token_logps = padded_ref
    loss, grads = _loss_and_grads(trainer, batch, packed_forward=False, max_tokens_per_batch=None)
    for budget in (None, 20):
        got, got_grads = _loss_and_grads(trainer, batch, packed_forward=True, max_tokens_per_batch=budget)
        _close(got, loss, f"loss, budget {budget}")
        _assert_same_grads(got_grads, grads)
    got, got_grads = _loss_and_grads(trainer, batch, packed_forward=False, max_tokens_per_batch=40)  # padded chunks
    _close(got, loss, "loss, padded chunks")
    _assert_same_grads(got_grads, grads)
    with torch.no_grad():  # as in evaluation: chunks forwarded, nothing backpropagated
        trainer.args.packed_forward, trainer.args.max_tokens_per_batch = True, 20
        _close(trainer.compute_loss(trainer.model, batch), loss, "loss without gradient")


def test_grpo_lora_packed_and_token_budget_match_padded(llama_path, tmp_path):
    """A LoRA policy, its reference the base model (adapter disabled), both passes packed and padded."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = _trainer(GRPOTrainer, GRPOConfig, llama_path, tmp_path, peft_config=lora, beta=0.1)
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batch = _scored(_rl_batch(seed=8), trainer.model)
    with torch.no_grad(), trainer.model.disable_adapter():
        padded_ref = completion_logps(trainer.model, batch, packed_forward=False)[0]
        packed_ref = completion_logps(trainer.model, batch, packed_forward=True)[0]
    _close(packed_ref, padded_ref, "reference log-probs")
    batch.ref_per_token_logps = padded_ref
    loss, grads = _loss_and_grads(trainer, batch, packed_forward=False, max_tokens_per_batch=None)
    assert all("lora" in name for name in grads)
    for budget in (None, 20):
        got, got_grads = _loss_and_grads(trainer, batch, packed_forward=True, max_tokens_per_batch=budget)
        _close(got, loss, f"loss, budget {budget}")
        _assert_same_grads(got_grads, grads)


def test_rloo_packed_and_token_budget_match_padded(llama_path, tmp_path):
    trainer = _trainer(RLOOTrainer, RLOOConfig, llama_path, tmp_path, beta=0.05)
    batch = _scored(_rl_batch(seed=5), trainer.model)
    loss, grads = _loss_and_grads(trainer, batch, packed_forward=False, max_tokens_per_batch=None)
    for budget in (None, 16):
        got, got_grads = _loss_and_grads(trainer, batch, packed_forward=True, max_tokens_per_batch=budget)
        _close(got, loss, f"loss, budget {budget}")
        _assert_same_grads(got_grads, grads)


def test_token_budget_splits_and_warns_once_for_an_oversized_group(llama_path, caplog):
    batch = _rl_batch(seed=6)
    model = _model(llama_path)
    budget = packed_rl.TokenBudget(10, True, backward=lambda loss: loss.backward())
    calls = []
    original = packed_rl.PackedRows.forward

    def counting(self, *args, **kwargs):
        calls.append(self.layout.total)
        return original(self, *args, **kwargs)

    def objective(logps, entropies, aux):
        return (logps * batch.completion_mask).sum()

    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.WARNING):
        patch.setattr(packed_rl.PackedRows, "forward", counting)
        for _ in range(2):
            forward = budget.run(model, batch, objective)
            forward.loss.backward()
    assert len(calls) > 2 and max(calls) > 10  # split, a group over the budget forwarded whole
    warnings = [r for r in caplog.records if "max_tokens_per_batch=10" in r.getMessage()]
    assert len(warnings) == 1
    _close(forward.loss.detach(), completion_logps(model, batch)[0].detach().sum())


# ----------------------------------------------------------------------------------------------- fallback
def test_models_that_cannot_run_packed_fall_back_or_are_refused(tmp_path):
    path = make_tiny_model(tmp_path / "sw", "qwen2", use_sliding_window=True, sliding_window=4)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    add_token_logprob_head(model)
    batch = _rl_batch(seed=7)
    padded = completion_logps(model, batch, packed_forward=False)[0]
    auto = completion_logps(model, batch)[0]
    assert torch.equal(auto, padded) and not packed_attention.is_enabled(model)
    with pytest.raises(ValueError, match="packed_forward=True needs packed sequences.*sliding-window"):
        completion_logps(model, batch, packed_forward=True)


def test_trainer_set_up_refuses_packed_forward_true_on_an_unsupported_model(tmp_path):
    path = make_tiny_model(tmp_path / "sw", "qwen2", use_sliding_window=True, sliding_window=4)
    with pytest.raises(ValueError, match=r"GRPOConfig.packed_forward=True needs packed sequences.*sliding-window"):
        _trainer(GRPOTrainer, GRPOConfig, path, tmp_path, packed_forward=True)
    trainer = _trainer(RLOOTrainer, RLOOConfig, path, tmp_path)  # auto: padded
    assert not packed_attention.is_enabled(trainer.model)


def test_prompt_learning_adapters_run_padded(llama_path):
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(_model(llama_path), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert "PromptTuningConfig" in packed_attention.unsupported_reason(model)
    assert not packed_rl.use_packed(model, None)
    with pytest.raises(ValueError, match="packed_forward=True needs packed sequences.*virtual tokens"):
        packed_rl.use_packed(model, True)


def test_grpo_training_with_a_token_budget_matches_unsplit_training(tiny_model_path, tmp_path):
    """Through `Trainer.training_step` (gradient accumulation, gradient checkpointing): the same losses and weights."""
    runs = []
    for budget in (None, 24):
        config = GRPOConfig(
            output_dir=str(tmp_path / str(budget)),
            report_to="none",
            max_steps=2,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            num_generations=4,
            max_completion_length=8,
            learning_rate=1e-2,
            logging_steps=1,
            bf16=False,
            save_strategy="no",
            disable_tqdm=True,
            dataloader_pin_memory=False,
            gradient_checkpointing=True,
            loss_type="grpo",
            seed=5,
            max_tokens_per_batch=budget,
        )
        dataset = Dataset.from_dict({"prompt": ["one two three", "four five", "six", "seven eight nine ten"]})
        trainer = GRPOTrainer(
            model=tiny_model_path,
            reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
            args=config,
            train_dataset=dataset,
        )
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs.append((torch.tensor(losses), {n: p.detach().clone() for n, p in trainer.model.named_parameters()}))
    (losses, weights), (budget_losses, budget_weights) = runs
    _close(budget_losses, losses, "losses")
    for name, value in weights.items():
        _close(budget_weights[name], value, name)
