"""SelfHostedGrpoTrainer end to end on the tiny model against a real `llm-trainer vllm-serve` process: training
changes the weights, the staleness bound of each mode holds for every consumed sample, reward errors are dropped
and counted, a dead server is a clear error, and no thread outlives the run."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_trainer.async_rl import (
    GenerationPublisher,
    GroupedTrajectoryPool,
    PromptSource,
    RolloutWorker,
    SelfHostedGrpoTrainer,
    WeightSyncController,
    reward_scorer,
)
from llm_trainer.generation import GenerationClient
from llm_trainer.generation.base import SamplingConfig
from llm_trainer.generation.remote import VLLMServerGenerator
from llm_trainer.trainer.reward_functions import RewardFunctions
from llm_trainer.trainer.utils import free_port

NUM_GENERATIONS, BATCH = 2, 4
PROMPTS = [{"prompt": f"Count to {i}:", "answer": i} for i in range(16)]


def token_sum_reward(completion_ids, **kwargs):
    return [float(sum(ids) % 5) for ids in completion_ids]


class FlakyReward:
    """Raises on every third call (one group per call): those groups must be dropped, the run go on."""

    __name__ = "flaky"

    def __init__(self):
        self.calls = 0

    def __call__(self, completion_ids, **kwargs):
        self.calls += 1
        if self.calls % 3 == 0:
            raise RuntimeError("the grader crashed")
        return token_sum_reward(completion_ids)


def build(model_path, server_url, mode, *, max_steps=3, reward=token_sum_reward, max_staleness=None, workers=1):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    pool = GroupedTrajectoryPool(group_size=NUM_GENERATIONS, maxsize=16, max_staleness=max_staleness)
    publisher = GenerationPublisher(GenerationClient(server_url, connection_timeout=30), timeout=60)
    controller = WeightSyncController(
        mode, staleness_threshold=1, publisher=publisher, samples_per_version=BATCH if mode == "sync" else None
    )
    controller.publish(model, 0)  # the module's server may hold an earlier test's weights
    source = PromptSource(PROMPTS, seed=0)
    scorer = reward_scorer(RewardFunctions([reward], None, None))
    sampling = SamplingConfig(max_tokens=6, temperature=1.0)
    rollout = [
        RolloutWorker(
            f"w{i}",
            source,
            VLLMServerGenerator(
                sampling, base_url=server_url, eos_token_id=tokenizer.eos_token_id, request_timeout=60
            ),
            scorer,
            pool,
            controller,
            tokenizer=tokenizer,
            num_generations=NUM_GENERATIONS,
            server_url=server_url,
        )
        for i in range(workers)
    ]
    trainer = SelfHostedGrpoTrainer(
        model,
        tokenizer,
        batch_size=BATCH,
        max_steps=max_steps,
        num_generations=NUM_GENERATIONS,
        workers=rollout,
        learning_rate=1e-2,
        heartbeat_stale_after_s=120,
        batch_timeout=300,
    )
    trainer.set_module_references(pool, controller)
    return trainer


@pytest.mark.parametrize(
    ("mode", "max_staleness", "bound"), [("sync", None, 0), ("batch-async", 1, 1), ("fully-async", 2, 2)]
)
def test_training_run_respects_the_staleness_bound(tiny_model_path, server_url, mode, max_staleness, bound):
    before_threads = set(threading.enumerate())
    trainer = build(tiny_model_path, server_url, mode, max_staleness=max_staleness, workers=2)
    initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.run()
    assert trainer.version == 3 and len(trainer.history) == 3
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, initial[name])]
    assert changed, "no parameter changed"
    for step, versions in enumerate(trainer.consumed_versions):
        assert len(versions) == BATCH
        staleness = [step - version for version in versions]
        assert min(staleness) >= 0 and max(staleness) <= bound, (mode, step, versions)
        assert trainer.history[step]["staleness/max"] == max(staleness)
    for metrics in trainer.history:
        assert {"loss", "reward", "entropy", "staleness/mean", "pool/dropped_stale", "perf/weight_sync_s"} <= set(
            metrics
        )
    if mode == "sync":
        assert trainer.weight_sync_controller.rollout_model_version == 3  # pushed after every step
    assert set(threading.enumerate()) <= before_threads


def test_reward_errors_are_dropped_and_counted(tiny_model_path, server_url):
    flaky = FlakyReward()
    trainer = build(tiny_model_path, server_url, "sync", reward=flaky)
    trainer.run()
    assert trainer.version == 3
    assert trainer.history[-1]["rollout/dropped_reward_errors"] >= NUM_GENERATIONS
    assert trainer.history[-1]["rollout/dropped_reward_errors"] % NUM_GENERATIONS == 0
    assert all(max(step - v for v in versions) == 0 for step, versions in enumerate(trainer.consumed_versions))


def test_dead_server_is_a_clear_error(tiny_model_path, server_url):
    before_threads = set(threading.enumerate())
    trainer = build(tiny_model_path, server_url, "fully-async", max_steps=50)
    dead = f"http://127.0.0.1:{free_port()}"
    for worker in trainer.workers:  # the server "dies": its address stops answering
        worker.generator.client.base_url = dead
        worker.server_url = dead
    with pytest.raises(RuntimeError, match=f"server at {dead}"):
        trainer.run()
    assert set(threading.enumerate()) <= before_threads


def test_stop_from_another_thread_leaves_no_threads(tiny_model_path, server_url):
    before_threads = set(threading.enumerate())
    trainer = build(tiny_model_path, server_url, "batch-async", max_steps=1000, max_staleness=1)
    stepped = threading.Event()
    trainer.on_step_end = lambda metrics: stepped.set()
    trainer.start()
    assert stepped.wait(300)
    trainer.stop()
    trainer.wait()
    assert 1 <= trainer.version < 1000
    assert set(threading.enumerate()) <= before_threads
