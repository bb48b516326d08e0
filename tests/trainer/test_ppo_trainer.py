"""PPOTrainer with TRL 1.12's API (the last TRL release with PPO): config and signature, the rollout against full
logits and TRL's own `get_reward`, training of policy and value model (full and PEFT), TRL's metric names, saving,
sample completions, bad input, resuming from a checkpoint exactly, and a learning test with a reward that can be
checked by counting tokens."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import shutil
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
from trl.experimental.utils import get_reward

from llm_trainer.experimental.ppo import PPOConfig, PPOTrainer
from llm_trainer.losses.ppo import INVALID_LOGPROB
from llm_trainer.testing import get_tokenizer, make_tiny_model, zen_dataset
from llm_trainer.trainer.ppo_trainer import model_inputs

TRL_METRICS = {
    "eps",
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "policy/entropy_avg",
    "val/ratio",
    "val/ratio_var",
    "val/num_eos_tokens",
    "lr",
    "episode",
}


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def reward_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-rm"), task="sequence-classification", seed=1)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> Dataset:
    """The 17 zen prompts, tokenized: TRL's PPO dataset format (an `input_ids` column)."""
    dataset = zen_dataset("standard_prompt_only")
    return dataset.map(lambda row: tokenizer(row["prompt"]), remove_columns=dataset.column_names)


def _config(tmp_path, **kwargs) -> PPOConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_mini_batches=2,
        num_ppo_epochs=2,
        total_episodes=16,
        response_length=6,
        learning_rate=1e-2,
        num_sample_generations=0,
        save_strategy="no",
        disable_tqdm=True,
        bf16=False,
    )
    return PPOConfig(**{**defaults, **kwargs})


def _reward_model(path: str):
    return AutoModelForSequenceClassification.from_pretrained(path)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def _changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}


# ------------------------------------------------------------------------------------------------ API
def test_config_defaults_match_trl_1_12(tmp_path):
    trl_defaults = {
        "learning_rate": 3e-6,
        "logging_steps": 10,
        "gradient_checkpointing": True,
        "dataset_num_proc": None,
        "num_mini_batches": 1,
        "total_episodes": None,
        "local_rollout_forward_batch_size": 64,
        "num_sample_generations": 10,
        "response_length": 53,
        "stop_token": None,
        "stop_token_id": None,
        "temperature": 0.7,
        "missing_eos_penalty": None,
        "sft_model_path": "EleutherAI/pythia-160m",
        "world_size": None,
        "num_total_batches": None,
        "micro_batch_size": None,
        "local_batch_size": None,
        "batch_size": None,
        "local_mini_batch_size": None,
        "mini_batch_size": None,
        "push_to_hub": False,
        "reward_model_path": "EleutherAI/pythia-160m",
        "model_adapter_name": None,
        "ref_adapter_name": None,
        "num_ppo_epochs": 4,
        "whiten_rewards": False,
        "kl_coef": 0.05,
        "kl_estimator": "k1",
        "cliprange": 0.2,
        "vf_coef": 0.1,
        "cliprange_value": 0.2,
        "gamma": 1.0,
        "lam": 0.95,
        "ds3_gather_for_generation": True,
    }
    config = PPOConfig(str(tmp_path))
    assert {name: getattr(config, name) for name in trl_defaults} == trl_defaults
    assert all(f.metadata.get("help") for f in dataclasses.fields(PPOConfig) if f.name in trl_defaults)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stop_token": "eos", "stop_token_id": 2}, "both"),
        ({"stop_token": "eot"}, "stop_token"),
        ({"kl_estimator": "k2"}, "kl_estimator"),
        ({"missing_eos_penalty": -1.0}, "positive"),
        ({"num_mini_batches": 0}, "num_mini_batches"),
    ],
)
def test_config_rejects_bad_values(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(str(tmp_path), **kwargs)


def test_signature_matches_trl_1_12():
    parameters = list(inspect.signature(PPOTrainer.__init__).parameters)[1:]
    assert parameters == [
        "args",
        "processing_class",
        "model",
        "ref_model",
        "reward_model",
        "train_dataset",
        "value_model",
        "data_collator",
        "eval_dataset",
        "optimizers",
        "callbacks",
        "peft_config",
    ]


# ------------------------------------------------------------------------------------------------ numerics
def test_rollout_matches_full_logits_and_trl_get_reward(tmp_path, tiny_model_path, reward_path, tokenizer, prompts):
    """Stop at eos (made likely), with the missing-eos penalty: log-probs from the full logits at the sampling
    temperature, values and scores from TRL's `get_reward`, TRL's masks, and a KL of 0 against the initial policy."""
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        policy.lm_head.weight[tokenizer.eos_token_id] = 3 * policy.model.norm.weight  # eos about 1 token in 6
    value_model, reward_model = _reward_model(reward_path), _reward_model(reward_path)
    args = _config(tmp_path, stop_token="eos", missing_eos_penalty=1.5, per_device_train_batch_size=8)
    trainer = PPOTrainer(args, tokenizer, policy, None, reward_model, prompts, value_model)
    batch = trainer._rollout(next(iter(trainer.dataloader))["input_ids"])

    responses, query_responses, context = batch["responses"], batch["query_responses"], batch["context_length"]
    pad = tokenizer.pad_token_id
    has_eos = (responses == tokenizer.eos_token_id).any(1)
    assert 0 < has_eos.sum() < len(has_eos)  # both kinds of responses are in the batch
    for row in responses.tolist():  # nothing but padding after the stop token
        if tokenizer.eos_token_id in row:
            assert set(row[row.index(tokenizer.eos_token_id) + 1 :]) <= {pad}

    with torch.no_grad():
        logits = policy(**model_inputs(query_responses, pad)).logits[:, context - 1 : -1] / (0.7 + 1e-7)
    expected_logprobs = logits.log_softmax(-1).gather(-1, responses[..., None]).squeeze(-1)
    expected_logprobs = expected_logprobs.masked_fill(batch["padding_mask"], INVALID_LOGPROB)
    torch.testing.assert_close(batch["logprobs"], expected_logprobs, atol=1e-5, rtol=1e-5)

    full_values, _, _ = get_reward(value_model, query_responses, pad, context)
    expected_values = full_values[:, context - 1 : -1].squeeze(-1).masked_fill(batch["padding_mask_p1"], 0.0)
    torch.testing.assert_close(batch["values"], expected_values)
    _, scores, _ = get_reward(reward_model, query_responses, pad, context)
    torch.testing.assert_close(batch["scores"], scores - 1.5 * (~has_eos).float())

    lengths = (responses != pad).sum(1)
    assert batch["padding_mask"].logical_not().sum(1).tolist() == lengths.tolist()
    assert batch["kl"].abs().max() < 1e-5  # the reference is a copy of the initial policy
    assert torch.all(batch["advantages"][batch["padding_mask"]] == 0)


# ------------------------------------------------------------------------------------------------ training
class _CountingCallback(TrainerCallback):
    def __init__(self):
        self.steps, self.logs = 0, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(logs)


def test_train_updates_policy_and_value_and_logs_trl_metrics(
    tmp_path, tiny_model_path, reward_path, tokenizer, prompts
):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    value_model, reward_model = _reward_model(reward_path), _reward_model(reward_path)
    before = {"policy": _snapshot(policy), "value": _snapshot(value_model), "reward": _snapshot(reward_model)}
    callback = _CountingCallback()
    args = _config(tmp_path, kl_estimator="k3", whiten_rewards=True, per_device_train_batch_size=8, total_episodes=32)
    trainer = PPOTrainer(args, tokenizer, policy, None, reward_model, prompts, value_model, callbacks=[callback])
    assert (args.local_batch_size, args.local_mini_batch_size, args.batch_size, args.num_total_batches) == (
        16,
        8,
        16,
        2,
    )
    ref_before = _snapshot(trainer.ref_model)

    output = trainer.train()

    assert _changed(policy, before["policy"]) == set(before["policy"])  # every policy parameter moved
    assert _changed(value_model, before["value"]) == set(before["value"])
    assert not _changed(reward_model, before["reward"])
    assert not _changed(trainer.ref_model, ref_before)
    logs = trainer.state.log_history
    assert len(logs) == 2 and callback.steps == 2 and output.global_step == 2
    for entry in logs:
        assert set(entry) - {"epoch", "step"} == TRL_METRICS
    assert [entry["episode"] for entry in logs] == [16, 32]
    assert logs[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == reference
    assert logs[1]["objective/kl"] != 0.0
    assert callback.logs[-1]["objective/scores"] == logs[-1]["objective/scores"]
    assert logs[0]["lr"] == pytest.approx(1e-2)


def test_peft_policy_trains_adapters_against_the_base_model(
    tmp_path, tiny_model_path, reward_path, tokenizer, prompts
):
    from peft import LoraConfig

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    value_model = _reward_model(reward_path)
    base_before, value_before = _snapshot(policy), _snapshot(value_model)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = _config(tmp_path, total_episodes=16)
    trainer = PPOTrainer(
        args, tokenizer, policy, None, _reward_model(reward_path), prompts, value_model, peft_config=peft_config
    )
    assert trainer.ref_model is None and trainer.is_peft_model
    trainer.train()

    changed = _changed(trainer.policy_model, _snapshot_of_base(trainer.policy_model, base_before))
    assert changed and all("lora_B" in name or "lora_A" in name for name in changed)
    assert _changed(value_model, value_before) == set(value_before)
    assert trainer.state.log_history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # LoRA starts as identity


def _snapshot_of_base(peft_model, base_before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The PEFT model's parameters as they were: base weights from before wrapping, adapters at their initial
    values (LoRA B is zero; A is compared to itself, so only B and the base can show a change)."""
    snapshot = {}
    for name, param in peft_model.named_parameters():
        base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" in name:
            snapshot[name] = torch.zeros_like(param) if "lora_B" in name else param.detach().clone()
        else:
            snapshot[name] = base_before[base_name]
    return snapshot


def test_save_model_sample_completions_and_value_model_from_reward(tmp_path, tiny_model_path, reward_path, prompts):
    """Models given as paths, no value model (a trainable copy of the reward model), a right-padding collator,
    checkpoints of the policy alone with the episode count, sample completions during training and on demand."""
    from transformers import DataCollatorWithPadding

    tokenizer = get_tokenizer()
    args = _config(
        tmp_path,
        total_episodes=16,
        num_mini_batches=1,
        gradient_accumulation_steps=1,
        per_device_train_batch_size=8,
        num_ppo_epochs=1,
        save_strategy="steps",
        save_steps=1,
        num_sample_generations=1,
    )
    trainer = PPOTrainer(
        args,
        tokenizer,
        tiny_model_path,
        None,
        reward_path,
        prompts,
        data_collator=DataCollatorWithPadding(tokenizer),
        eval_dataset=prompts.select(range(3)),
    )
    assert trainer.value_model is not trainer.reward_model
    reward_before, value_before = _snapshot(trainer.reward_model), _snapshot(trainer.value_model)
    trainer.train()
    assert not _changed(trainer.reward_model, reward_before)
    assert _changed(trainer.value_model, value_before)

    checkpoint = tmp_path / "checkpoint-2"
    assert AutoModelForCausalLM.from_pretrained(checkpoint).config.architectures == ["Qwen2ForCausalLM"]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["episode"] == 16
    trainer.save_model(str(tmp_path / "final"))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for name, param in trainer.policy_model.named_parameters():
        torch.testing.assert_close(saved.get_parameter(name), param.detach())
    assert get_tokenizer().__class__.from_pretrained(tmp_path / "final").pad_token == tokenizer.pad_token

    table = trainer.generate_completions()
    assert list(table) == ["query", "model response", "score"]
    assert len(table["query"]) == 3 and table["query"][0] == tokenizer.decode(prompts[0]["input_ids"])
    assert all(isinstance(score, float) for score in table["score"])


def test_bad_input_raises_clear_errors(tmp_path, tiny_model_path, reward_path, tokenizer, prompts):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    reward_model = _reward_model(reward_path)
    with pytest.raises(ValueError, match="'input_ids'"):
        PPOTrainer(_config(tmp_path), tokenizer, policy, None, reward_model, zen_dataset("standard_prompt_only"))
    with pytest.raises(ValueError, match="fewer than one rollout batch"):
        PPOTrainer(_config(tmp_path), tokenizer, policy, None, reward_model, prompts.select(range(5)))
    with pytest.raises(TypeError, match="sequence-classification"):
        PPOTrainer(_config(tmp_path), tokenizer, policy, None, policy, prompts)
    with pytest.raises(ValueError, match="same object"):
        PPOTrainer(_config(tmp_path), tokenizer, policy, policy, reward_model, prompts)
    with pytest.raises(ValueError, match="num_mini_batches"):
        PPOTrainer(_config(tmp_path, gradient_accumulation_steps=3), tokenizer, policy, None, reward_model, prompts)
    with pytest.raises(ValueError, match="whiten_rewards"):
        PPOTrainer(_config(tmp_path, whiten_rewards=True), tokenizer, policy, None, reward_model, prompts)
    trainer = PPOTrainer(_config(tmp_path), tokenizer, policy, None, reward_model, prompts)
    with pytest.raises(NotImplementedError, match="generate_completions"):
        trainer.evaluate()


# ------------------------------------------------------------------------------------------------ resuming
RESUME_UPDATES = 5


def _resume_trainer(
    output_dir, tiny_model_path: str, reward_path: str, tokenizer, prompts: Dataset, **kwargs
) -> PPOTrainer:
    """5 updates of 2 of 6 prompts (3 batches an epoch, so the run goes on into a reshuffled second epoch), a
    checkpoint after each; always built the same way, as a restarted script would."""
    callbacks = kwargs.pop("callbacks", None)
    args = _config(
        output_dir,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        total_episodes=2 * RESUME_UPDATES,
        response_length=3,
        gradient_checkpointing=False,
        save_strategy="steps",
        save_steps=1,
        **kwargs,
    )
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    reward_model, value_model = _reward_model(reward_path), _reward_model(reward_path)
    return PPOTrainer(
        args, tokenizer, policy, None, reward_model, prompts.select(range(6)), value_model, callbacks=callbacks
    )


SAMPLERS = {  # transformers' default shuffles by seed and epoch; without it the order is drawn from the RNG
    "seeded": {},
    "unseeded": {"accelerator_config": {"use_seedable_sampler": False}},
}


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, tiny_model_path, reward_path, tokenizer, prompts) -> Callable:
    """The run never stopped, once per sampler: its output folder, logs, training loss and final weights."""
    runs = {}

    def run(sampler: str) -> SimpleNamespace:
        if sampler not in runs:
            output_dir = tmp_path_factory.mktemp(f"ppo-uninterrupted-{sampler}")
            trainer = _resume_trainer(
                output_dir, tiny_model_path, reward_path, tokenizer, prompts, **SAMPLERS[sampler]
            )
            output = trainer.train()
            runs[sampler] = SimpleNamespace(
                dir=output_dir,
                logs=trainer.state.log_history,
                loss=output.training_loss,
                policy=_snapshot(trainer.policy_model),
                value=_snapshot(trainer.value_model),
            )
        return runs[sampler]

    return run


def _without_eps(logs: list[dict]) -> list[dict]:
    """The logs without `eps` (episodes per second: a timing)."""
    return [{name: value for name, value in entry.items() if name != "eps"} for entry in logs]


def _assert_same_run(trainer: PPOTrainer, training_loss: float, full: SimpleNamespace) -> None:
    """Every logged number of every update (losses, value losses, KL, scores, lr, episode, ...), the training loss
    and the final weights are exactly those of the uninterrupted run."""
    logs, expected = _without_eps(trainer.state.log_history), _without_eps(full.logs)
    assert [entry["step"] for entry in logs] == list(range(1, RESUME_UPDATES + 1))
    for entry, want in zip(logs, expected):
        assert entry == want, entry["step"]
    assert training_loss == full.loss
    assert not _changed(trainer.policy_model, full.policy)
    assert not _changed(trainer.value_model, full.value)


@pytest.mark.parametrize(
    "sampler, step",
    [("seeded", 2), ("seeded", 3), ("seeded", 4), ("unseeded", 4)],
    ids=["mid-epoch", "epoch-end", "second-epoch", "second-epoch-unseeded-sampler"],
)
def test_resume_continues_exactly_as_the_uninterrupted_run(
    tmp_path, uninterrupted_run, tiny_model_path, reward_path, tokenizer, prompts, sampler, step
):
    """A new trainer resumed from `checkpoint-{step}` logs, update by update, exactly the numbers of the run that was
    never stopped: mid-epoch (crossing into the next epoch), at the end of an epoch, and in the reshuffled second
    epoch, whose order the seeded sampler takes from the epoch and the unseeded one from the random state."""
    full = uninterrupted_run(sampler)
    trainer = _resume_trainer(tmp_path, tiny_model_path, reward_path, tokenizer, prompts, **SAMPLERS[sampler])
    output = trainer.train(resume_from_checkpoint=str(full.dir / f"checkpoint-{step}"))

    _assert_same_run(trainer, output.training_loss, full)
    assert output.global_step == RESUME_UPDATES
    written = sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("checkpoint-"))
    assert written == [f"checkpoint-{n}" for n in range(step + 1, RESUME_UPDATES + 1)]


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_stopped_run_resumes_from_the_newest_complete_checkpoint(
    tmp_path, uninterrupted_run, tiny_model_path, reward_path, tokenizer, prompts, caplog
):
    """A run stopped after update 2, then a new trainer with `resume_from_checkpoint=True`: it skips a newer
    `checkpoint-3` whose save was cut off (no trainer state) and finishes as the uninterrupted run."""
    full = uninterrupted_run("seeded")
    stopped = _resume_trainer(tmp_path, tiny_model_path, reward_path, tokenizer, prompts, callbacks=[_StopAt(2)])
    assert stopped.train().global_step == 2
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "config.json").write_text("{}")

    trainer = _resume_trainer(tmp_path, tiny_model_path, reward_path, tokenizer, prompts)
    with caplog.at_level(logging.WARNING):
        output = trainer.train(resume_from_checkpoint=True)

    assert any("Skipping the incomplete checkpoint" in record.getMessage() for record in caplog.records)
    _assert_same_run(trainer, output.training_loss, full)


def test_checkpoint_holds_the_policy_the_value_model_and_the_training_state(uninterrupted_run):
    """The checkpoint is the policy, as TRL's (`from_pretrained(checkpoint)`), with the value model in `value_model/`
    (`AutoModelForSequenceClassification.from_pretrained`), optimizer, scheduler, RNG, data position and state."""
    full = uninterrupted_run("seeded")
    checkpoint = full.dir / f"checkpoint-{RESUME_UPDATES}"
    files = {path.name for path in checkpoint.iterdir()}
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "dataloader_state.pt", "value_model"} <= files

    policy = AutoModelForCausalLM.from_pretrained(checkpoint)
    value_model = AutoModelForSequenceClassification.from_pretrained(checkpoint / "value_model")
    assert not _changed(policy, full.policy) and set(dict(policy.named_parameters())) == set(full.policy)
    assert not _changed(value_model, full.value) and set(dict(value_model.named_parameters())) == set(full.value)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["global_step"], state["episode"]) == (RESUME_UPDATES, 2 * RESUME_UPDATES)


def test_resuming_a_finished_run_trains_nothing(
    tmp_path, uninterrupted_run, tiny_model_path, reward_path, tokenizer, prompts, caplog
):
    full = uninterrupted_run("seeded")
    callback = _CountingCallback()
    trainer = _resume_trainer(tmp_path, tiny_model_path, reward_path, tokenizer, prompts, callbacks=[callback])
    with caplog.at_level(logging.WARNING):
        output = trainer.train(resume_from_checkpoint=str(full.dir / f"checkpoint-{RESUME_UPDATES}"))

    assert "nothing left to train" in caplog.text
    assert callback.steps == 0 and not callback.logs and not list(tmp_path.iterdir())
    _assert_same_run(trainer, output.training_loss, full)  # the checkpoint's weights and history, loaded


def test_resume_errors_say_what_to_do(tmp_path, uninterrupted_run, tiny_model_path, reward_path, tokenizer, prompts):
    full = uninterrupted_run("seeded")
    trainer = _resume_trainer(tmp_path / "out", tiny_model_path, reward_path, tokenizer, prompts)
    with pytest.raises(ValueError, match="No complete checkpoint found"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "missing"))
    trl_like = tmp_path / "checkpoint-1"  # TRL's layout: the policy, optimizer, scheduler, RNG and state alone
    shutil.copytree(
        full.dir / "checkpoint-1", trl_like, ignore=shutil.ignore_patterns("value_model", "dataloader_state.pt")
    )
    with pytest.raises(ValueError, match="lacks value_model, dataloader_state.pt"):
        trainer.train(resume_from_checkpoint=str(trl_like))


# ------------------------------------------------------------------------------------------------ learning
class _TokenSetReward(nn.Module):
    """Scores a sequence by the share of its tokens whose id is in [low, high): a reward that can be checked by
    counting. Laid out as TRL's PPO reads a reward model: a backbone (named by `base_model_prefix`) whose last hidden
    state at position t is the running count up to t, divided by `scale`, and an identity `score` head."""

    base_model_prefix = "backbone"

    def __init__(self, low: int, high: int, scale: int):
        super().__init__()
        self.backbone = _RunningCount(low, high, scale)
        self.score = nn.Identity()


class _RunningCount(nn.Module):
    def __init__(self, low: int, high: int, scale: int):
        super().__init__()
        self.low, self.high, self.scale = low, high, scale

    def forward(self, input_ids, attention_mask, **kwargs):
        hits = (input_ids >= self.low) & (input_ids < self.high) & attention_mask.bool()
        return SimpleNamespace(hidden_states=(hits.float().cumsum(1).unsqueeze(-1) / self.scale,))


def _in_set_share(policy, tokenizer, prompts, low, high, response_length) -> float:
    """Share of sampled response tokens in the rewarded set, counted directly."""
    torch.manual_seed(123)
    policy.eval()
    hits = total = 0
    for row in prompts.select(range(8)):
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            out = policy.generate(
                ids,
                do_sample=True,
                temperature=0.7,
                top_k=0,
                max_new_tokens=response_length,
                num_return_sequences=8,
                eos_token_id=None,
                pad_token_id=tokenizer.pad_token_id,
            )
        response = out[:, ids.size(1) :]
        hits += ((response >= low) & (response < high)).sum().item()
        total += response.numel()
    policy.train()
    return hits / total


@pytest.mark.slow
def test_ppo_learns_to_raise_a_countable_reward(tmp_path, reward_path, tokenizer, prompts):
    """The reward is the share of response tokens in the upper half of the vocabulary (plus the prompt's, a constant);
    both the logged score and a direct count on fresh samples must rise clearly."""
    vocab = len(tokenizer)
    low, high, response_length = vocab // 2, vocab, 8
    policy = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "lm", num_hidden_layers=1))
    with torch.no_grad():  # a direction shared by every hidden state, as trained LMs have: it acts as a logit bias
        policy.model.embed_tokens.weight += 0.1 * torch.randn(
            policy.config.hidden_size, generator=torch.Generator().manual_seed(1)
        )
    initial = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    initial.load_state_dict(policy.state_dict())
    args = _config(
        tmp_path / "out",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_mini_batches=2,
        num_ppo_epochs=4,
        total_episodes=16 * 14,
        response_length=response_length,
        kl_coef=0.01,
        gradient_checkpointing=False,
        seed=0,
    )
    train_prompts = Dataset.from_dict({"input_ids": prompts["input_ids"][:16]})
    trainer = PPOTrainer(
        args,
        tokenizer,
        policy,
        None,
        _TokenSetReward(low, high, response_length),
        train_prompts,
        _reward_model(reward_path),
    )
    trainer.train()

    scores = [entry["objective/scores"] for entry in trainer.state.log_history]
    assert len(scores) == 14
    assert sum(scores[-4:]) / 4 > sum(scores[:4]) / 4 + 0.06, scores  # half a rewarded token more per response
    before = _in_set_share(initial, tokenizer, prompts, low, high, response_length)
    after = _in_set_share(policy, tokenizer, prompts, low, high, response_length)
    assert after > before + 0.15, (before, after)
