"""WeightSyncController: the three modes' gating of workers, when weights are pushed, stop/close, publishers."""

import threading

import pytest
import torch

from llm_trainer.async_rl import GenerationPublisher, WeightSnapshot, WeightSyncController


class RecordingPublisher:
    def __init__(self, gate: threading.Event | None = None):
        self.pushes, self.gate, self.started = [], gate, threading.Event()

    def push(self, model, version):
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        self.pushes.append((model, version))


def in_thread(target):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", target()), daemon=True)
    thread.start()
    return thread, result


def test_sync_mode_one_version_per_quota():
    controller = WeightSyncController("sync", samples_per_version=4, publisher=RecordingPublisher())
    stop = threading.Event()
    assert controller.acquire(2, stop) == 0
    assert controller.acquire(2, stop) == 0
    thread, result = in_thread(lambda: controller.acquire(2, stop))  # the quota of version 0 is used up
    thread.join(0.3)
    assert thread.is_alive()
    controller.on_train_step(torch.nn.Linear(1, 1), 1)
    thread.join(10)
    assert result["value"] == 1
    assert controller.rollout_model_version == controller.train_model_version == 1
    assert [version for _, version in controller.publisher.pushes] == [1]


def test_sync_release_gives_back_quota_and_partial_grants():
    controller = WeightSyncController("sync", samples_per_version=4)
    stop = threading.Event()
    assert controller.acquire_samples(4, stop, unit=2) == (0, 4)
    controller.release(2, version=0)  # a group dropped: regenerate it for the same version
    assert controller.acquire_samples(4, stop, unit=2) == (0, 2)
    controller.release(2, version=-5)  # another version's quota is not touched
    stop.set()
    assert controller.acquire_samples(4, stop, unit=2) == (-1, 0)


def test_sync_mode_needs_a_quota_that_whole_requests_fill():
    with pytest.raises(ValueError, match="samples_per_version"):
        WeightSyncController("sync")
    controller = WeightSyncController("sync", samples_per_version=6)
    with pytest.raises(ValueError, match="multiple of the group size 4"):
        controller.acquire_samples(4, threading.Event(), unit=4)


def test_batch_async_pushes_by_lag_and_blocks_workers_while_behind():
    gate = threading.Event()
    publisher = RecordingPublisher(gate)
    controller = WeightSyncController("batch-async", staleness_threshold=1, publisher=publisher)
    stop = threading.Event()
    controller.on_train_step(None, 1)  # lag 1 <= threshold: no push
    assert publisher.pushes == [] and controller.rollout_model_version == 0
    assert controller.acquire(2, stop) == 0
    pusher, _ = in_thread(lambda: controller.on_train_step("model", 2))  # lag 2 > 1: push (held at the gate)
    assert publisher.started.wait(10)
    worker, result = in_thread(lambda: controller.acquire(2, stop))
    worker.join(0.3)
    assert worker.is_alive()  # two versions behind while the push is in flight
    gate.set()
    pusher.join(10)
    worker.join(10)
    assert result["value"] == 2
    assert publisher.pushes == [("model", 2)]


def test_fully_async_never_waits_and_pushes_every_k_steps():
    publisher = RecordingPublisher()
    controller = WeightSyncController("fully-async", publisher=publisher, weight_sync_steps=2)
    stop = threading.Event()
    for step in range(1, 6):
        assert controller.acquire(8, stop) == controller.rollout_model_version
        controller.on_train_step("model", step)
    assert [version for _, version in publisher.pushes] == [2, 4]
    assert controller.stats()["weight_sync/pushes"] == 2
    assert controller.rollout_model_version == 4 and controller.train_model_version == 5


def test_background_push_publishes_a_snapshot():
    publisher = RecordingPublisher()
    controller = WeightSyncController("fully-async", publisher=publisher, background_push=True)
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    controller.on_train_step(model, 1)
    with torch.no_grad():
        model.weight.fill_(5.0)  # the next optimizer step must not leak into the pushed weights
    controller.flush(30)
    controller.close()
    ((pushed, version),) = publisher.pushes
    assert version == 1 and pushed is not model
    assert torch.equal(pushed.weight, torch.ones(2, 2))
    assert controller.rollout_model_version == 1


def test_background_push_error_surfaces_at_the_next_step():
    class Failing:
        def push(self, model, version):
            raise TimeoutError("http://gen:1 took longer than 0.1 s")

    controller = WeightSyncController("fully-async", publisher=Failing(), background_push=True)
    controller.on_train_step(torch.nn.Linear(1, 1), 1)
    with pytest.raises(RuntimeError, match="http://gen:1"):
        controller.flush(30)
    controller.on_train_step(torch.nn.Linear(1, 1), 2)  # reported once
    controller._push_thread.join(10)
    with pytest.raises(RuntimeError, match="http://gen:1"):
        controller.on_train_step(torch.nn.Linear(1, 1), 3)
    controller.close()


def test_stop_and_close_release_waiting_workers():
    controller = WeightSyncController("sync", samples_per_version=2)
    stop = threading.Event()
    controller.acquire(2, stop)
    waiter, result = in_thread(lambda: controller.acquire(2, stop))
    stop.set()
    waiter.join(10)
    assert result["value"] == -1
    other, result = in_thread(lambda: controller.acquire(2, threading.Event()))
    controller.close()
    other.join(10)
    assert result["value"] == -1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "async"}, "weight_sync_mode"),
        ({"staleness_threshold": -1}, "staleness_threshold"),
        ({"weight_sync_steps": 0}, "weight_sync_steps"),
        ({"mode": "sync", "samples_per_version": 4, "background_push": True}, "background_push"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightSyncController(**kwargs)


class FakeClient:
    base_url = "http://gen:8000"

    def __init__(self, raises=None):
        self.calls, self.raises = [], raises

    def update_weights(self, named_tensors, chunk_bytes=1, version=None, timeout=None):
        if self.raises:
            raise self.raises
        self.calls.append(("update_weights", sorted(name for name, _ in named_tensors), version, timeout))

    def reset_prefix_cache(self):
        self.calls.append(("reset",))


class OldClient(FakeClient):
    def update_weights(self, named_tensors, chunk_bytes=1):  # before `version=` / `timeout=`
        self.calls.append(("update_weights", sorted(name for name, _ in named_tensors)))


def test_generation_publisher_sends_versioned_weights():
    client = FakeClient()
    GenerationPublisher(client, timeout=7.0).push(torch.nn.Linear(2, 2), version=3)
    assert client.calls == [("update_weights", ["bias", "weight"], 3, 7.0), ("reset",)]
    old = OldClient()
    GenerationPublisher(old).push(torch.nn.Linear(2, 2), version=3)
    assert old.calls[0] == ("update_weights", ["bias", "weight"])
    snapshot = FakeClient()
    GenerationPublisher(snapshot).push(WeightSnapshot(torch.nn.Linear(2, 2)), version=4)
    assert snapshot.calls[0][1:3] == (["bias", "weight"], 4)


def test_generation_publisher_timeout_names_server_and_timeout():
    client = FakeClient(raises=TimeoutError("timed out"))
    with pytest.raises(TimeoutError, match=r"http://gen:8000.*weight_sync_timeout=2\.5"):
        GenerationPublisher([client], timeout=2.5).push(torch.nn.Linear(2, 2), version=1)


def test_generation_publisher_sends_only_a_peft_adapter(tiny_model_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    class LoraClient(FakeClient):
        def update_lora_adapter(self, model, version=None, timeout=None):
            self.calls.append(("update_lora_adapter", version, timeout))

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path), LoraConfig(r=2, lora_alpha=4))
    client = LoraClient()
    GenerationPublisher(client, timeout=3.0).push(model, version=2)
    assert client.calls == [("update_lora_adapter", 2, 3.0), ("reset",)]
    merged = LoraClient()
    GenerationPublisher(merged, lora_adapter_only=False).push(model, version=2)
    assert merged.calls[0][0] == "update_weights"
    assert not any("lora" in name for name in merged.calls[0][1])  # the adapter merged into the base weights


@pytest.mark.parametrize("mode", ["fully-async", "batch-async"])
def test_run_ahead_bounded_by_max_staleness(mode):
    """With max_staleness=1 and 4 samples per step, generation may start 2 steps' samples with version 0 and no
    more; each new version (and each forgotten sample) makes room, so no sample is older than 1 when consumed."""
    controller = WeightSyncController(mode, staleness_threshold=0, max_staleness=1, samples_per_step=4)
    stop = threading.Event()
    assert controller.acquire_samples(8, stop, unit=4) == (0, 8)
    thread, result = in_thread(lambda: controller.acquire_samples(4, stop, unit=4))
    thread.join(0.3)
    assert thread.is_alive()  # a third step's samples at version 0 would be 2 versions old when consumed
    controller.on_train_step(None, 1)  # pushed: version 1 may fill step 2
    thread.join(10)
    assert result["value"] == (1, 4)
    controller.forget(4)  # dropped somewhere: its place is free again
    assert controller.acquire_samples(4, stop, unit=4) == (1, 4)
    thread, result = in_thread(lambda: controller.acquire_samples(4, stop, unit=4))
    thread.join(0.3)
    assert thread.is_alive()
    stop.set()
    thread.join(10)
    assert result["value"] == (-1, 0)


def test_run_ahead_needs_both_settings():
    with pytest.raises(ValueError, match="both max_staleness and samples_per_step"):
        WeightSyncController("fully-async", max_staleness=1)
    with pytest.raises(ValueError, match="max_staleness must be an integer >= 0"):
        WeightSyncController("fully-async", max_staleness=-1, samples_per_step=4)
