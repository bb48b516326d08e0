"""PromptSource order and RolloutWorker behaviour against an in-process fake generator (no server)."""

import threading

import pytest
import torch

from llm_trainer.async_rl import (
    AsyncTrainer,
    GroupedTrajectoryPool,
    PromptSource,
    RolloutWorker,
    TrajectoryPool,
    WeightSyncController,
)
from llm_trainer.data.sampling import RepeatSampler
from llm_trainer.generation.base import GenerationResult, Generator
from llm_trainer.testing import get_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


class FakeGenerator(Generator):
    """Completions `[7, 8, eos]` (or without eos: truncated), log-probs -0.5, optionally tagged with a version."""

    def __init__(self, eos: int, truncate: bool = False, served_version=None, fail=None, block=None):
        self.eos, self.truncate, self.served_version, self.fail, self.block = (
            eos,
            truncate,
            served_version,
            fail,
            block,
        )
        self.requests, self.entered = [], threading.Event()

    def generate(self, prompt_ids):
        self.entered.set()
        if self.block is not None:
            self.block.wait(30)
        if self.fail is not None:
            raise self.fail
        self.requests.append(prompt_ids)
        ids = [7, 8] if self.truncate else [7, 8, self.eos]
        result = GenerationResult([list(ids) for _ in prompt_ids], [[-0.5] * len(ids) for _ in prompt_ids])
        if self.served_version is not None:
            result.model_version = self.served_version
        return result


def dataset(n=6):
    return [{"prompt": f"question {i}", "answer": i} for i in range(n)]


def make_worker(tokenizer, generator, score=None, pool=None, controller=None, source=None, **kwargs):
    return RolloutWorker(
        "w0",
        source or PromptSource(dataset(), seed=0),
        generator,
        score or (lambda group: [[float(t.row["answer"])] for t in group]),
        pool if pool is not None else GroupedTrajectoryPool(group_size=2),
        controller or WeightSyncController("fully-async"),
        tokenizer=tokenizer,
        num_generations=2,
        server_url="http://gen:9",
        **kwargs,
    )


def test_prompt_source_follows_repeat_sampler_across_epochs():
    data = dataset(7)
    sampler = RepeatSampler(data, mini_repeat_count=1, batch_size=3, seed=42)
    expected = list(sampler) + list(sampler)  # two epochs from one generator; a partial chunk dropped each
    source = PromptSource(data, seed=42, batch_size=3, num_epochs=2)
    got = [row["answer"] for _, row in source.take(6) + source.take(6)]
    assert got == expected
    with pytest.raises(StopIteration):
        source.take(1)
    assert source.exhausted


def test_prompt_source_is_thread_safe_and_indexes_the_stream():
    source = PromptSource(dataset(50), seed=1, num_epochs=1)
    taken, lock = [], threading.Lock()

    def drain():
        while True:
            try:
                rows = source.take(2)
            except StopIteration:
                return
            with lock:
                taken.extend(rows)

    threads = [threading.Thread(target=drain) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(index for index, _ in taken) == list(range(50))
    assert sorted(row["answer"] for _, row in taken) == list(range(50))


def test_prompt_source_start_index_resumes():
    full = [row["answer"] for _, row in PromptSource(dataset(), seed=3).take(9)]
    resumed = PromptSource(dataset(), seed=3, start_index=4)
    assert [(i, row["answer"]) for i, row in resumed.take(5)] == list(enumerate(full))[4:]
    full = [row["answer"] for _, row in PromptSource(dataset(), seed=3, batch_size=4).take(17)]
    across_epochs = PromptSource(dataset(), seed=3, batch_size=4, start_index=13)  # 4 prompts per epoch
    assert [(i, row["answer"]) for i, row in across_epochs.take(4)] == list(enumerate(full))[13:]
    with pytest.raises(StopIteration):
        PromptSource(dataset(), seed=3, num_epochs=1, start_index=6).take(1)


def test_prompt_source_bad_arguments():
    with pytest.raises(ValueError, match="fewer than one generation batch"):
        PromptSource(dataset(2), seed=0, batch_size=3)
    with pytest.raises(ValueError, match="num_epochs"):
        PromptSource(dataset(), seed=0, num_epochs=0)


def test_worker_fills_pool_with_scored_versioned_groups(tokenizer):
    pool = GroupedTrajectoryPool(group_size=2)
    generator = FakeGenerator(tokenizer.eos_token_id)
    worker = make_worker(tokenizer, generator, pool=pool, prompts_per_request=2)
    worker.start()
    batch = pool.get_batch(4, current_version=0, timeout=30)
    worker.stop()
    assert not worker.alive
    assert len(generator.requests[0]) == 4  # 2 prompts x 2 generations in one request
    for first, second in zip(batch[::2], batch[1::2]):
        assert first.group_id == second.group_id and first.prompt == second.prompt
        assert first.rewards_per_func == [float(first.row["answer"])]
    item = batch[0]
    assert item.model_version == 0 and item.completion_ids == [7, 8, tokenizer.eos_token_id]
    assert item.logprobs == [-0.5] * 3 and not item.truncated
    assert item.completion == tokenizer.decode([7, 8], skip_special_tokens=True)
    assert item.prompt_ids == tokenizer(item.prompt)["input_ids"]
    assert worker.generated >= 4 and worker.error is None


def test_worker_uses_the_servers_version_and_flags_truncation(tokenizer):
    pool = TrajectoryPool()
    worker = make_worker(tokenizer, FakeGenerator(tokenizer.eos_token_id, truncate=True, served_version=5), pool=pool)
    worker.start()
    batch = pool.get_batch(2, current_version=5, timeout=30)
    worker.stop()
    assert all(t.model_version == 5 and t.truncated for t in batch)


def test_conversational_prompts_give_assistant_messages(tokenizer):
    rows = [{"prompt": [{"role": "user", "content": f"hi {i}"}], "answer": i} for i in range(4)]
    pool = TrajectoryPool()
    worker = make_worker(tokenizer, FakeGenerator(tokenizer.eos_token_id), pool=pool, source=PromptSource(rows, 0))
    worker.start()
    item = pool.get_batch(2, current_version=0, timeout=30)[0]
    worker.stop()
    assert item.completion == [{"role": "assistant", "content": tokenizer.decode([7, 8], skip_special_tokens=True)}]
    templated = tokenizer.apply_chat_template(item.prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert item.prompt_ids == templated["input_ids"]


def test_reward_errors_drop_the_group_and_are_counted(tokenizer):
    def score(group):
        if group[0].row["answer"] % 2:
            raise ValueError("cannot score odd answers")
        return torch.ones(len(group), 1)

    pool = GroupedTrajectoryPool(group_size=2)
    controller = WeightSyncController("sync", samples_per_version=6)  # one version's quota: 3 scorable groups
    source = PromptSource(dataset(12), seed=0)
    worker = make_worker(tokenizer, FakeGenerator(tokenizer.eos_token_id), score, pool, controller, source)
    worker.start()
    batch = pool.get_batch(6, current_version=0, timeout=30)  # filled although odd prompts keep failing
    worker.stop()
    assert all(t.row["answer"] % 2 == 0 for t in batch)
    assert worker.dropped_reward_errors > 0 and worker.dropped_reward_errors % 2 == 0
    assert worker.metrics()["rollout/dropped_reward_errors"] == worker.dropped_reward_errors
    assert worker.error is None


def test_generation_error_is_fatal_and_named(tokenizer):
    failing = FakeGenerator(tokenizer.eos_token_id, fail=ConnectionError("Connection refused"))
    worker = make_worker(tokenizer, failing)
    worker.start()
    worker._thread.join(30)
    assert not worker.alive and isinstance(worker.error, ConnectionError)
    with pytest.raises(RuntimeError, match=r"http://gen:9.*Connection refused"):
        worker.check_health(stale_after_s=300)


def test_a_hung_request_is_a_stale_heartbeat(tokenizer):
    block = threading.Event()
    generator = FakeGenerator(tokenizer.eos_token_id, block=block)
    worker = make_worker(tokenizer, generator)
    worker.start()
    assert generator.entered.wait(30)
    with pytest.raises(RuntimeError, match=r"no progress .*http://gen:9"):
        worker.check_health(stale_after_s=1e-9)
    worker.request_stop()
    block.set()
    worker.stop()
    assert not worker.alive


def test_waiting_on_the_controller_is_not_a_stall(tokenizer):
    controller = WeightSyncController("sync", samples_per_version=2)
    pool = GroupedTrajectoryPool(group_size=2)
    worker = make_worker(tokenizer, FakeGenerator(tokenizer.eos_token_id), pool=pool, controller=controller)
    worker.start()
    pool.get_batch(2, current_version=0, timeout=30)  # the quota of version 0 is used; the worker now waits
    while worker.controller._issued < 2 or not worker._waiting:
        threading.Event().wait(0.01)
    worker.check_health(stale_after_s=1e-9)
    worker.stop()
    assert not worker.alive


class RecordingTrainer(AsyncTrainer):
    def __init__(self, *args, fail_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches, self.fail_at = [], fail_at

    def train(self, trajectories):
        if self.fail_at == self.version:
            raise FloatingPointError("the loss is nan")
        self.batches.append(trajectories)
        return {"loss": float(self.version)}


def engine(tokenizer, mode="sync", generator=None, workers=1, num_epochs=None, max_staleness=2, **trainer_kwargs):
    pool = GroupedTrajectoryPool(group_size=2, maxsize=16, max_staleness=0 if mode == "sync" else max_staleness)
    controller = WeightSyncController(mode, samples_per_version=4 if mode == "sync" else None)
    source = PromptSource(dataset(8), seed=0, num_epochs=num_epochs)
    generator = generator or FakeGenerator(tokenizer.eos_token_id)
    rollout = [
        make_worker(tokenizer, generator, pool=pool, controller=controller, source=source) for _ in range(workers)
    ]
    trainer = RecordingTrainer(4, trainer_kwargs.pop("max_steps", 5), rollout, **trainer_kwargs)
    trainer.set_module_references(pool, controller)
    return trainer


def test_trainer_loop_is_on_policy_in_sync_mode(tokenizer):
    before = set(threading.enumerate())
    trainer = engine(tokenizer, workers=2)
    trainer.run()
    assert trainer.version == 5 and len(trainer.batches) == 5
    assert trainer.consumed_versions == [[step] * 4 for step in range(5)]
    assert [m["staleness/max"] for m in trainer.history] == [0.0] * 5
    assert trainer.weight_sync_controller.rollout_model_version == 5
    assert trainer.history[-1]["step"] == 5 and trainer.history[-1]["loss"] == 4.0
    assert set(threading.enumerate()) <= before


def test_trainer_ends_when_the_prompts_run_out(tokenizer):
    trainer = engine(tokenizer, mode="fully-async", num_epochs=1, max_staleness=None, max_steps=100)
    trainer.run()  # 8 prompts x 2 completions = 4 batches of 4 (none dropped as stale)
    assert trainer.version == 4
    assert all(not worker.alive for worker in trainer.workers)


def test_trainer_surfaces_a_worker_failure_naming_the_server(tokenizer):
    before = set(threading.enumerate())
    failing = FakeGenerator(tokenizer.eos_token_id, fail=TimeoutError("timed out after request_timeout=5 s"))
    trainer = engine(tokenizer, mode="batch-async", generator=failing)
    with pytest.raises(RuntimeError, match=r"http://gen:9.*request_timeout=5"):
        trainer.run()
    assert isinstance(trainer.error, RuntimeError)
    assert set(threading.enumerate()) <= before


def test_trainer_error_stops_the_workers(tokenizer):
    before = set(threading.enumerate())
    trainer = engine(tokenizer, mode="fully-async", fail_at=2)
    trainer.start()
    with pytest.raises(FloatingPointError):
        trainer.wait(60)
    assert trainer.version == 2
    assert set(threading.enumerate()) <= before


def test_stop_ends_a_waiting_trainer_promptly(tokenizer):
    before = set(threading.enumerate())
    block = threading.Event()
    trainer = engine(tokenizer, mode="fully-async", generator=FakeGenerator(tokenizer.eos_token_id, block=block))
    trainer.start()
    assert trainer.workers[0].generator.entered.wait(30)
    block.set()  # the request in flight finishes; nothing else is generated
    trainer.stop()
    trainer.wait()
    assert set(threading.enumerate()) <= before


def test_engine_wiring_errors(tokenizer):
    trainer = RecordingTrainer(4, 1)
    with pytest.raises(RuntimeError, match="set_module_references"):
        trainer.run()
    with pytest.raises(ValueError, match="batch_size x weight_sync_steps"):
        trainer.set_module_references(TrajectoryPool(), WeightSyncController("sync", samples_per_version=2))
    with pytest.raises(ValueError, match="maxsize"):
        trainer.set_module_references(TrajectoryPool(maxsize=2), WeightSyncController("fully-async"))
    with pytest.raises(ValueError, match="batch_size"):
        RecordingTrainer(0, 1)


def test_one_failed_worker_ends_the_run_while_another_keeps_the_pool_full(tokenizer):
    trainer = engine(tokenizer, mode="fully-async", max_staleness=None, max_steps=10_000)
    source, pool, controller = trainer.workers[0].source, trainer.pool, trainer.weight_sync_controller
    failing = FakeGenerator(tokenizer.eos_token_id, fail=ConnectionError("Connection refused"))
    broken = make_worker(tokenizer, failing, pool=pool, controller=controller, source=source)
    broken.server_url = "http://dead:1"
    trainer.workers.append(broken)
    with pytest.raises(RuntimeError, match=r"http://dead:1.*Connection refused"):
        trainer.run()
    assert trainer.version < 10_000
