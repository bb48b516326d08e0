"""`AsyncGRPOTrainer` under faults: a reward function that raises (its groups dropped and counted, the run goes on),
a generation server killed or frozen mid-run (an error naming it, never a hang), TRL's `weight_transfer` hook, the
arguments refused before anything loads; and after every run, returned or raised, no thread or child process left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from transformers import TrainerCallback

from llm_trainer.testing import zen_dataset
from tests.async_rl.test_async_grpo import COMMON, Leftovers, length_reward, step_logs
from tests.conftest import serve


@contextmanager
def server_process(model_path: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`llm-trainer vllm-serve --backend transformers` as a child process the test can kill or freeze."""
    from llm_trainer.generation import GenerationClient
    from llm_trainer.trainer.utils import free_port

    port = free_port()
    command = [sys.executable, "-m", "llm_trainer.cli", "vllm-serve", "--backend", "transformers", "--model"]
    command += [model_path, "--host", "127.0.0.1", "--port", str(port), "--log_level", "warning"]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        GenerationClient(url, connection_timeout=120)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
        process.wait()


class AtStep(TrainerCallback):
    """Runs `action` once, at the end of optimizer step `step`."""

    def __init__(self, step: int, action) -> None:
        self.step, self.action, self.done = step, action, False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and not self.done:
            self.done = True
            self.action()


@pytest.fixture(scope="module")
def shared_server(tiny_model_path):
    with serve(tiny_model_path) as url:
        yield url


def config(tmp_path, url, **overrides):
    from llm_trainer import AsyncGRPOConfig

    fields = {**COMMON, "generation_kwargs": None, "output_dir": str(tmp_path), "vllm_server_base_url": url}
    return AsyncGRPOConfig(**{**fields, **overrides})


def test_a_raising_reward_function_drops_its_groups_and_the_run_completes(tiny_model_path, shared_server, tmp_path):
    from llm_trainer import AsyncGRPOTrainer

    calls = []

    def flaky_reward(completions, **kwargs):
        calls.append(len(completions))
        if len(calls) in (2, 4):  # the 2nd and 4th groups scored
            raise ValueError("the grader is down")
        return [float(len(c)) for c in completions]

    args = config(tmp_path, shared_server, max_steps=4, weight_sync_mode="sync", max_staleness=0, log_completions=True)
    with Leftovers() as left:
        trainer = AsyncGRPOTrainer(
            tiny_model_path,
            [flaky_reward, length_reward],
            args=args,
            train_dataset=zen_dataset("standard_prompt_only"),
        )
        trainer.train()
    left.assert_clean()
    assert trainer.state.global_step == 4
    logs = step_logs(trainer)
    assert logs[-1]["rollout/dropped_reward_errors"] == 2 * args.num_generations
    # Every trained group was scored by both functions: no NaN reward from a dropped group reached the loss.
    assert all(e["rewards/flaky_reward/mean"] == e["rewards/length_reward/mean"] for e in logs)
    assert sorted(p.name for p in (tmp_path / "completions").iterdir())[-1] == "completions_00004.parquet"


@pytest.mark.parametrize(
    ("fault", "found_by"),
    [("killed", "weight push"), ("killed", "rollout worker"), ("frozen", "weight push"), ("frozen", "rollout worker")],
)
def test_a_dead_or_frozen_server_stops_the_run_with_an_error_naming_it(fault, found_by, tiny_model_path, tmp_path):
    """Killed: the next request or weight push is refused. Frozen (SIGSTOP): it times out after `request_timeout` /
    `weight_sync_timeout`. Found by the trainer's next push ('batch-async', pushing every step) or by a rollout
    worker's next request ('fully-async' without pushes: the trainer drains the pool, then its health check raises).
    Either way train() raises naming the server, and leaves nothing running."""
    from llm_trainer import AsyncGRPOTrainer

    if found_by == "weight push":
        mode = dict(weight_sync_mode="batch-async", staleness_threshold=0, max_staleness=1)
    else:
        mode = dict(weight_sync_mode="fully-async", weight_sync_steps=1000, max_staleness=1000)
    with server_process(tiny_model_path) as (url, process):
        act = process.kill if fault == "killed" else lambda: process.send_signal(signal.SIGSTOP)
        args = config(tmp_path, url, max_steps=200, queue_maxsize=8, request_timeout=3, weight_sync_timeout=3, **mode)
        with Leftovers() as left:
            trainer = AsyncGRPOTrainer(
                tiny_model_path,
                length_reward,
                args=args,
                train_dataset=zen_dataset("standard_prompt_only"),
                callbacks=[AtStep(1, act)],
            )
            started = time.monotonic()
            with pytest.raises((RuntimeError, TimeoutError, ConnectionError)) as raised:
                trainer.train()
            elapsed = time.monotonic() - started
            if fault == "killed":
                process.wait()
        left.assert_clean()
    assert url in str(raised.value) or url in repr(raised.value.__cause__)
    assert trainer.state.global_step < 200
    if found_by == "rollout worker":
        assert "Rollout worker" in str(raised.value)
    print(f"{fault}, {found_by}: {type(raised.value).__name__} after {elapsed:.1f} s: {raised.value}")


def test_trl_weight_transfer_hook_replaces_the_http_push(tiny_model_path, shared_server, tmp_path):
    """TRL's `WeightTransferProtocol`: init once, pause / send_weights / resume per push, destroy at the end."""
    from llm_trainer import AsyncGRPOTrainer
    from llm_trainer.generation import GenerationClient

    class Transfer:
        def __init__(self):
            self.calls, self.client = [], GenerationClient(shared_server)

        def init_weight_transfer(self):
            self.calls.append("init")

        def pause(self):
            self.calls.append("pause")

        def send_weights(self, iterator):
            self.calls.append("send")
            self.client.update_weights(iterator)

        def resume(self):
            self.calls.append("resume")

        def destroy(self):
            self.calls.append("destroy")

    transfer = Transfer()
    args = config(tmp_path, shared_server, max_steps=2, weight_sync_mode="sync", max_staleness=0)
    with Leftovers() as left:
        trainer = AsyncGRPOTrainer(
            tiny_model_path,
            length_reward,
            args=args,
            train_dataset=zen_dataset("standard_prompt_only"),
            weight_transfer=transfer,
        )
        trainer.train()
    left.assert_clean()
    # the initial weights, then after each of the two steps
    assert transfer.calls == ["init"] + ["pause", "send", "resume"] * 3 + ["destroy"]
    assert all(v == step for step, versions in trainer.consumed_versions for v in versions)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"use_vllm": False}, "generation servers only"),
        ({"weight_sync_mode": "eventually"}, "weight_sync_mode"),
        ({"staleness_threshold": 3, "max_staleness": 2}, "staleness_threshold"),
        ({"weight_sync_mode": "sync", "weight_sync_steps": 3, "max_staleness": 1}, "weight_sync_steps"),
        ({"num_iterations": 2}, "num_iterations"),
        ({"steps_per_generation": 2}, "steps_per_generation"),
        ({"max_inflight_tasks": 2}, "max_inflight_tasks"),
        ({"request_timeout": 0}, "request_timeout"),
        ({"vllm_server_base_url": " , "}, "vllm_server_base_url"),
    ],
)
def test_bad_settings_are_refused_by_the_config(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, "http://127.0.0.1:9", **overrides)


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ({"tools": [length_reward]}, "tool-calling"),
        ({"rollout_worker": object()}, "rollout_worker"),
        ({"weight_transfer": object()}, "weight_transfer"),
        ({"eval_dataset": zen_dataset("standard_prompt_only", "test")}, "eval_dataset"),
    ],
)
def test_unsupported_arguments_are_refused_before_loading(argument, message, tmp_path):
    from llm_trainer import AsyncGRPOTrainer

    args = config(tmp_path, "http://127.0.0.1:9", vllm_server_timeout=0)
    with pytest.raises((NotImplementedError, TypeError), match=message):
        AsyncGRPOTrainer(
            "no/such-model", length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only"), **argument
        )


def test_a_server_holding_other_weights_is_reported(tiny_model_path, shared_server, tmp_path, caplog):
    """A LoRA policy sends only its adapter: when the server's base weights are not the policy's (here perturbed),
    the first on-policy batch's log-prob gap names the servers in a warning."""
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    from llm_trainer import AsyncGRPOTrainer
    from llm_trainer.generation import GenerationClient

    other = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn_like(param), alpha=0.5)
    GenerationClient(shared_server).update_weights(other.named_parameters())
    args = config(tmp_path, shared_server, max_steps=1, weight_sync_mode="sync", max_staleness=0)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    trainer = AsyncGRPOTrainer(
        tiny_model_path, length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only"), peft_config=lora
    )
    try:
        with caplog.at_level("WARNING", logger="llm_trainer.trainer.async_grpo_trainer"):
            trainer.train()
    finally:
        GenerationClient(shared_server).update_weights(
            AutoModelForCausalLM.from_pretrained(tiny_model_path).named_parameters()
        )
    assert any("do not serve the policy" in r.message and shared_server in r.message for r in caplog.records)
