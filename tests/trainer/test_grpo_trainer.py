"""GRPOTrainer on the tiny offline model: training moves the policy, the reward-function contract (extra columns,
`None`, async, reward models by path, wrong lengths), gradient accumulation and `num_iterations`, every loss type,
PEFT, evaluation, and a learning test on a verifiable reward."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from datasets import Dataset

from llm_trainer import GRPOConfig, GRPOTrainer
from llm_trainer.testing import get_tokenizer, make_tiny_model, zen_dataset

GRPO_METRICS = {
    "num_tokens",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "completions/mean_terminated_length",
    "completions/min_terminated_length",
    "completions/max_terminated_length",
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_mean",
    "clip_ratio/high_max",
    "clip_ratio/region_mean",
    "step_time",
}


def _config(tmp_path, **kwargs) -> GRPOConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=3,
    )
    return GRPOConfig(**{**defaults, **kwargs})


def length_reward(completions, **kwargs):
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(before, model) -> bool:
    return any(not torch.equal(before[name], p) for name, p in model.named_parameters() if name in before)


def _step_log(trainer) -> dict:
    return next(entry for entry in trainer.state.log_history if "loss" in entry)


@pytest.mark.parametrize("config_name", ["standard_prompt_only", "conversational_prompt_only"])
def test_training_moves_the_policy_and_logs_trl_metrics(tiny_model_path, tmp_path, config_name):
    trainer = GRPOTrainer(
        model=tiny_model_path,
        reward_funcs=length_reward,
        args=_config(tmp_path),
        train_dataset=zen_dataset(config_name),
    )
    before = _params(trainer.model)
    trainer.train()
    assert _changed(before, trainer.model)
    logged = _step_log(trainer)
    assert GRPO_METRICS | {"rewards/length_reward/mean", "rewards/length_reward/std"} <= set(logged)
    assert "kl" not in logged  # beta = 0 by default: no reference model
    assert trainer.ref_model is None


def test_reward_functions_get_extra_columns_trainer_state_and_loggers(tiny_model_path, tmp_path):
    seen = {}

    def reward(prompts, completions, completion_ids, answer, trainer_state, log_extra, log_metric, **kwargs):
        seen.update(answer=list(answer), step=trainer_state.global_step, ids=completion_ids)
        log_metric("my_metric", 2.5)
        log_extra("echo", list(answer))
        return [1.0 if a in c else 0.0 for a, c in zip(answer, completions)]

    dataset = zen_dataset("standard_prompt_only")
    dataset = dataset.add_column("answer", [f"x{i % 3}" for i in range(len(dataset))])
    trainer = GRPOTrainer(
        tiny_model_path, reward, args=_config(tmp_path, max_steps=1, log_completions=True), train_dataset=dataset
    )
    trainer.train()
    assert len(seen["answer"]) == 4 and set(seen["answer"]) <= {"x0", "x1", "x2"}
    assert len(set(seen["answer"])) == 1  # one prompt, four generations
    assert all(isinstance(ids, list) and all(isinstance(t, int) for t in ids) for ids in seen["ids"])
    assert _step_log(trainer)["my_metric"] == 2.5
    assert list(trainer._logs["extra"]["echo"]) == seen["answer"]
    assert (tmp_path / "completions" / "completions_00001.parquet").exists()


def test_none_rewards_are_ignored_and_weights_apply(tiny_model_path, tmp_path, caplog):
    def half_none(completions, **kwargs):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    def never(completions, **kwargs):
        return [None] * len(completions)

    trainer = GRPOTrainer(
        tiny_model_path,
        [half_none, never],
        args=_config(tmp_path, max_steps=1, reward_weights=[2.0, 1.0]),
        train_dataset=zen_dataset("standard_prompt_only"),
    )
    with caplog.at_level(logging.WARNING):
        trainer.train()
    logged = _step_log(trainer)
    assert logged["rewards/half_none/mean"] == 1.0
    assert logged["rewards/never/mean"] is None  # NaN throughout: logged as None, not NaN
    assert logged["reward"] == 2.0  # the rows every function skipped are left out
    assert "All reward functions returned None" in caplog.text


def test_async_reward_functions_run_concurrently(tiny_model_path, tmp_path):
    both_started = {}

    def make(name, other):
        async def reward(completions, **kwargs):
            loop = asyncio.get_running_loop()
            both_started.setdefault(name, loop.create_future())
            both_started[name].set_result(True) if not both_started[name].done() else None
            for _ in range(200):  # wait until the other function has started too: only possible if concurrent
                if other in both_started:
                    break
                await asyncio.sleep(0.01)
            assert other in both_started, "async reward functions ran one after the other"
            return [0.5] * len(completions)

        reward.__name__ = name
        return reward

    trainer = GRPOTrainer(
        tiny_model_path,
        [make("first", "second"), make("second", "first"), length_reward],
        args=_config(tmp_path, max_steps=1),
        train_dataset=zen_dataset("standard_prompt_only"),
    )
    trainer.train()
    logged = _step_log(trainer)
    assert logged["rewards/first/mean"] == logged["rewards/second/mean"] == 0.5


def test_reward_model_given_by_path(tiny_model_path, tmp_path):
    reward_path = make_tiny_model(tmp_path / "rm", task="sequence-classification", num_labels=1)
    trainer = GRPOTrainer(
        tiny_model_path,
        reward_path,
        args=_config(tmp_path / "out", max_steps=1),
        train_dataset=zen_dataset("conversational_prompt_only"),
    )
    trainer.train()
    logged = _step_log(trainer)
    assert "rewards/rm/mean" in logged and logged["rewards/rm/std"] > 0


def test_reward_function_returning_the_wrong_number_of_rewards_raises(tiny_model_path, tmp_path):
    def short(completions, **kwargs):
        return [1.0]

    trainer = GRPOTrainer(
        tiny_model_path, short, args=_config(tmp_path), train_dataset=zen_dataset("standard_prompt_only")
    )
    with pytest.raises(ValueError, match="'short' returned 1 rewards for 4 completions"):
        trainer.train()


def test_bad_configuration_is_refused(tiny_model_path, tmp_path):
    dataset = zen_dataset("standard_prompt_only")
    with pytest.raises(ValueError, match="2 values but there are 1 reward functions"):
        GRPOTrainer(
            tiny_model_path, length_reward, args=_config(tmp_path, reward_weights=[1.0, 2.0]), train_dataset=dataset
        )
    with pytest.raises(ValueError, match="no 'prompt' column"):
        GRPOTrainer(
            tiny_model_path, length_reward, args=_config(tmp_path), train_dataset=dataset.rename_column("prompt", "q")
        )
    with pytest.raises(ValueError, match="not a vision-language model"):
        GRPOTrainer(
            tiny_model_path,
            length_reward,
            args=_config(tmp_path),
            train_dataset=dataset.add_column("image", [None] * 17),
        )
    with pytest.raises(ValueError, match="no `reset` method"):
        GRPOTrainer(
            tiny_model_path, length_reward, args=_config(tmp_path), train_dataset=dataset, environment_factory=object
        )
    with pytest.raises(ValueError, match="sync_ref_model"):
        GRPOTrainer(tiny_model_path, length_reward, args=_config(tmp_path, sync_ref_model=True), train_dataset=dataset)


def test_gradient_accumulation_and_multiple_iterations_reuse_stored_generations(tiny_model_path, tmp_path):
    calls = []

    def counting_reward(completions, **kwargs):
        calls.append(len(completions))
        return length_reward(completions)

    args = _config(
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_generations=4,
        num_iterations=2,
        beta=0.04,
    )
    trainer = GRPOTrainer(
        tiny_model_path, counting_reward, args=args, train_dataset=zen_dataset("standard_prompt_only")
    )
    before = _params(trainer.model)
    trainer.train()
    assert _changed(before, trainer.model)
    # 2 optimizer steps x 2 micro-batches = 4 micro-batches; each generation batch (4 rows) serves 2 x 2 of them
    assert calls == [4]
    buffered = trainer.generation.buffer
    assert len(buffered) == 2 and all(
        b.old_per_token_logps is not None and b.ref_per_token_logps is not None for b in buffered
    )
    assert "kl" in _step_log(trainer)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
def test_every_loss_type_trains(tiny_model_path, tmp_path, loss_type):
    args = _config(tmp_path, max_steps=1, loss_type=loss_type, max_completion_length=4)
    trainer = GRPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only"))
    before = _params(trainer.model)
    trainer.train()
    assert _changed(before, trainer.model)
    assert torch.isfinite(torch.tensor(_step_log(trainer)["loss"]))


def test_peft_adapter_trains_and_reference_is_the_base_model(tiny_model_path, tmp_path):
    from peft import LoraConfig

    trainer = GRPOTrainer(
        tiny_model_path,
        length_reward,
        args=_config(tmp_path, beta=0.1),
        train_dataset=zen_dataset("standard_prompt_only"),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.ref_model is None
    before = _params(trainer.model)
    trainer.train()
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p)]
    assert changed and all("lora_" in name for name in changed)
    assert "kl" in _step_log(trainer)


def test_evaluation_generates_and_logs_eval_metrics(tiny_model_path, tmp_path):
    args = _config(tmp_path, max_steps=1, per_device_eval_batch_size=4, num_generations_eval=2)
    trainer = GRPOTrainer(
        tiny_model_path,
        length_reward,
        args=args,
        train_dataset=zen_dataset("standard_prompt_only"),
        eval_dataset=zen_dataset("standard_prompt_only", "test"),
    )
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_reward", "eval_completions/mean_length"} <= set(metrics)


def _digit_reward(completions, **kwargs):
    return [float(text.count("7")) for text in completions]


@pytest.mark.slow
def test_grpo_learns_to_say_seven(tmp_path):
    """A verifiable reward (how many "7"s the completion holds) rises clearly within 40 CPU steps."""
    path = make_tiny_model(tmp_path / "policy", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    tokenizer = get_tokenizer()
    dataset = Dataset.from_dict({"prompt": [f"Count: {i}" for i in range(64)]})
    args = _config(
        tmp_path / "out",
        max_steps=40,
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=8,
        learning_rate=3e-2,
        gradient_checkpointing=False,
        logging_steps=5,
        seed=0,
    )
    trainer = GRPOTrainer(path, _digit_reward, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert rewards[-1] > max(4 * rewards[0], rewards[0] + 1.0), rewards


def test_rollout_func_replaces_generation_and_its_extra_fields_reach_the_rewards(tiny_model_path, tmp_path):
    tokenizer = get_tokenizer()
    seen = {}

    def rollout(prompts, trainer):
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        completion_ids = [tokenizer(" beautiful is better")["input_ids"][: 1 + i % 3] for i in range(len(prompts))]
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": None,
            "turns": [2] * len(prompts),
        }

    def reward(completions, turns, **kwargs):
        seen["turns"], seen["completions"] = turns, completions
        return [float(len(c)) for c in completions]

    trainer = GRPOTrainer(
        tiny_model_path,
        reward,
        args=_config(tmp_path, max_steps=1),
        train_dataset=zen_dataset("standard_prompt_only"),
        rollout_func=rollout,
    )
    before = _params(trainer.model)
    trainer.train()
    assert _changed(before, trainer.model)
    assert seen["turns"] == [2, 2, 2, 2]
    assert seen["completions"][:3] == [
        tokenizer.decode(tokenizer(" beautiful is better")["input_ids"][:n]) for n in (1, 2, 3)
    ]


def test_cast_lm_head_to_fp32_reaches_the_policy_and_reference_heads(tiny_model_path, tmp_path):
    """`GRPOConfig.cast_lm_head_to_fp32` sets the log-prob head option of the policy and the reference (the
    float32 projection itself is tested with `add_token_logprob_head`)."""
    args = _config(tmp_path, cast_lm_head_to_fp32=True, beta=0.1)
    trainer = GRPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only"))
    reference = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert trainer.model.forward.options.cast_lm_head_to_fp32 and reference.forward.options.cast_lm_head_to_fp32
    default = GRPOTrainer(
        tiny_model_path, length_reward, args=_config(tmp_path), train_dataset=zen_dataset("standard_prompt_only")
    )
    assert not default.model.forward.options.cast_lm_head_to_fp32
