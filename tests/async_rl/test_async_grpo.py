"""`AsyncGRPOTrainer` against real `llm-trainer vllm-serve --backend transformers` processes: 'sync' mode gives
GRPOTrainer's per-step losses, every consumed sample respects `max_staleness` in each weight-sync mode, TRL-style
scripts and the `llm-trainer async_grpo` command run, and nothing (thread or process) outlives `train()`."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import psutil
import pytest

from llm_trainer.testing import zen_dataset
from tests.conftest import serve

COMMON = dict(
    report_to="none",
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=8,
    learning_rate=0.05,
    lr_scheduler_type="constant",
    logging_steps=1,
    bf16=False,
    save_strategy="no",
    disable_tqdm=True,
    seed=1,
    generation_kwargs={"seed": 7},  # the server seeds each request: both trainers sample the same completions
)


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


class Leftovers:
    """Threads and child processes started inside the block that are still there at its end."""

    def __enter__(self):
        self.threads = set(threading.enumerate())
        self.children = {p.pid for p in psutil.Process().children(recursive=True)}
        return self

    def __exit__(self, *exc):
        self.extra_threads = [t.name for t in threading.enumerate() if t not in self.threads and t.is_alive()]
        self.extra_children = [
            p.pid for p in psutil.Process().children(recursive=True) if p.pid not in self.children and p.is_running()
        ]
        return False

    def assert_clean(self):
        assert self.extra_threads == [], f"threads left behind: {self.extra_threads}"
        assert self.extra_children == [], f"child processes left behind: {self.extra_children}"


@pytest.fixture(scope="module")
def shared_server(tiny_model_path):
    with serve(tiny_model_path) as url:
        yield url


def test_sync_mode_reproduces_grpo_losses(tiny_model_path, tmp_path):
    """weight_sync_mode='sync' (max_staleness=0) is on-policy GRPO: same completions, same rewards, same per-step
    losses as GRPOTrainer generating on its own fresh server with the same seeds."""
    from llm_trainer import AsyncGRPOConfig, AsyncGRPOTrainer, GRPOConfig, GRPOTrainer

    steps = 3
    data = zen_dataset("standard_prompt_only")
    common = {**COMMON, "beta": 0.1, "gradient_accumulation_steps": 2}  # 2 prompts a step, in 2 micro-batches
    with serve(tiny_model_path) as url:
        args = GRPOConfig(
            output_dir=str(tmp_path / "grpo"),
            max_steps=steps,
            use_vllm=True,
            vllm_mode="server",
            vllm_server_base_url=url,
            **common,
        )
        grpo = GRPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=data)
        grpo.train()
    with serve(tiny_model_path) as url:
        args = AsyncGRPOConfig(
            output_dir=str(tmp_path / "async"),
            max_steps=steps,
            weight_sync_mode="sync",
            max_staleness=0,
            vllm_server_base_url=url,
            **common,
        )
        with Leftovers() as left:
            trainer = AsyncGRPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=data)
            trainer.train()
        left.assert_clean()

    expected, got = step_logs(grpo), step_logs(trainer)
    assert len(expected) == len(got) == steps
    # Same samples: the rewards of every step agree exactly (the completions are identical).
    assert [e["reward"] for e in got] == [e["reward"] for e in expected]
    for name in ("loss", "grad_norm", "kl"):
        theirs, ours = [e[name] for e in expected], [e[name] for e in got]
        scale = max(abs(x) for x in theirs)
        assert scale > 1e-3, name  # the KL term makes the loss move: not a comparison of float noise around 0
        # The same float32 forward and backward of the same batch: equal up to summation order, ~1e-6 of the scale.
        assert all(abs(a - b) <= 1e-5 * scale for a, b in zip(ours, theirs)), (name, ours, theirs)
    # Each step's weights reached the server before it generated: its log-probs are the trainer's own.
    assert max(e["sampling/sampling_logp_difference/max"] for e in got) < 1e-4
    # The staleness bound of 'sync' mode, from every consumed sample's version: 0 (on-policy).
    assert [step for step, _ in trainer.consumed_versions] == list(range(steps))
    assert all(v == step for step, versions in trainer.consumed_versions for v in versions)
    assert trainer.model_version == steps


@pytest.mark.parametrize("mode", ["batch-async", "fully-async"])  # 'sync' (staleness 0): the parity test above
def test_every_consumed_sample_is_within_max_staleness(mode, tiny_model_path, shared_server, tmp_path):
    from llm_trainer.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer

    steps, max_staleness = 4, 1
    args = AsyncGRPOConfig(
        output_dir=str(tmp_path),
        max_steps=steps,
        weight_sync_mode=mode,
        max_staleness=max_staleness,
        num_rollout_workers=2,
        queue_maxsize=8,
        vllm_server_base_url=shared_server,
        **{**COMMON, "generation_kwargs": None},
    )
    with Leftovers() as left:
        trainer = AsyncGRPOTrainer(
            tiny_model_path, length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only")
        )
        trainer.train()
    left.assert_clean()

    consumed = list(trainer.consumed_versions)
    assert [version for version, _ in consumed] == list(range(steps))
    for version, versions in consumed:
        assert len(versions) == args.generation_batch_size
        staleness = [version - v for v in versions]
        assert min(staleness) >= 0 and max(staleness) <= max_staleness, (version, versions)
    logs = step_logs(trainer)
    assert all(
        "staleness/max" in e and "pool/dropped_stale" in e and "rollout/dropped_reward_errors" in e for e in logs
    )
    assert [e["staleness/max"] for e in logs] == [float(max(v - m for m in ms)) for v, ms in consumed]


@pytest.mark.slow
def test_several_servers_each_receive_the_weights(tiny_model_path, shared_server, tmp_path):
    """A list of URLs spreads the workers over the servers; every server gets every push (same model version)."""
    from llm_trainer import AsyncGRPOConfig, AsyncGRPOTrainer
    from llm_trainer.generation import GenerationClient

    with serve(tiny_model_path) as second:
        args = AsyncGRPOConfig(
            output_dir=str(tmp_path),
            max_steps=2,
            weight_sync_mode="batch-async",
            staleness_threshold=0,
            num_rollout_workers=2,
            vllm_server_base_url=[shared_server, second],
            **{**COMMON, "generation_kwargs": None},
        )
        trainer = AsyncGRPOTrainer(
            tiny_model_path, length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only")
        )
        trainer.train()
        versions = [GenerationClient(url).health().get("model_version") for url in (shared_server, second)]
    assert versions == [2, 2]


TRL_SCRIPT = """
import sys
from datasets import load_dataset
from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer

def reward_len(completions, **kwargs):
    return [-abs(8 - len(c)) for c in completions]

model, url, data, out = sys.argv[1:5]
args = AsyncGRPOConfig(
    output_dir=out, max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
    report_to="none", bf16=False, save_strategy="no", vllm_server_base_url=url, max_staleness=2,
)
trainer = AsyncGRPOTrainer(model=model, reward_funcs=reward_len, args=args,
                           train_dataset=load_dataset("json", data_files=data, split="train"))
trainer.train()
print("STEPS", trainer.state.global_step)
"""


def _write_prompts(path: Path) -> str:
    with open(path, "w") as f:
        for row in zen_dataset("standard_prompt_only"):
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_a_trl_script_runs_unmodified(tiny_model_path, shared_server, tmp_path, monkeypatch, capsys):
    """`from trl.experimental.async_grpo import ...` with TRL's constructor arguments, run as `llm-trainer run`
    runs it (the `trl` import hook, the script as `__main__`)."""
    from llm_trainer import trl_alias
    from llm_trainer.run import run

    script = tmp_path / "async_grpo_script.py"
    script.write_text(TRL_SCRIPT)
    data = _write_prompts(tmp_path / "prompts.jsonl")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        run([str(script), tiny_model_path, shared_server, data, str(tmp_path / "out")])
    finally:
        trl_alias.uninstall()
    assert "STEPS 2" in capsys.readouterr().out


def test_cli_async_grpo_trains(tiny_model_path, shared_server, tmp_path):
    """`llm-trainer async_grpo` from the registry: flags of AsyncGRPOConfig plus GRPO's `--reward_funcs`."""
    from llm_trainer.cli import main

    data = _write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    command = ["async_grpo", "--model_name_or_path", tiny_model_path, "--dataset_name", data]
    command += ["--reward_funcs", "llm_trainer.rewards.think_format_reward", "--output_dir", str(out)]
    command += ["--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "4"]
    command += ["--max_completion_length", "8", "--report_to", "none", "--bf16", "false", "--save_strategy", "no"]
    command += ["--vllm_server_base_url", shared_server, "--weight_sync_mode", "sync", "--max_staleness", "0"]
    with Leftovers() as left:
        main(command)
    left.assert_clean()
    assert (out / "model.safetensors").exists()


def test_lora_policy_sends_only_its_adapter(tiny_model_path, tmp_path):
    """A PEFT policy's adapter goes to the server each step (no merge, no full sync): the server's log-probs stay
    the trainer's while the adapter moves the policy away from the base model."""
    peft = pytest.importorskip("peft")
    from llm_trainer import AsyncGRPOConfig, AsyncGRPOTrainer
    from llm_trainer.generation import GenerationClient

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with serve(tiny_model_path) as url:
        args = AsyncGRPOConfig(
            output_dir=str(tmp_path),
            max_steps=3,
            weight_sync_mode="sync",
            max_staleness=0,
            vllm_server_base_url=url,
            **{**COMMON, "generation_kwargs": None},
        )
        trainer = AsyncGRPOTrainer(
            tiny_model_path,
            length_reward,
            args=args,
            train_dataset=zen_dataset("standard_prompt_only"),
            peft_config=lora,
        )
        trainer.train()
        health = GenerationClient(url).health()
    assert health["lora_adapter"] and health["model_version"] == 3  # served as an adapter, at the last version
    logs = step_logs(trainer)
    assert len(logs) == 3
    assert max(e["sampling/sampling_logp_difference/max"] for e in logs) < 1e-4
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # the adapter trained (B starts at 0)


def test_trl_instance_attributes_exist(tiny_model_path, shared_server, tmp_path):
    """The public attributes TRL's AsyncGRPOTrainer sets in `__init__` exist here (or on `args`)."""
    trl_module = pytest.importorskip("trl.experimental.async_grpo")
    from test_trl_surface import INSTANCE_NOT_PROVIDED, _init_attributes

    from llm_trainer.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer

    args = AsyncGRPOConfig(output_dir=str(tmp_path), max_steps=1, vllm_server_base_url=shared_server, **COMMON)
    trainer = AsyncGRPOTrainer(
        tiny_model_path, length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only")
    )
    expected = _init_attributes(trl_module.AsyncGRPOTrainer) - INSTANCE_NOT_PROVIDED.keys()
    assert sorted(a for a in expected if not hasattr(trainer, a) and not hasattr(trainer.args, a)) == []
