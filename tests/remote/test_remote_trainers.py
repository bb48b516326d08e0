"""The remote trainers' data preparation and step, with a recording stand-in for the training client (no server):
what `RemoteApiGrpoTrainer` and `RemoteApiCrossEntropyTrainer` send, and the errors they raise."""

from concurrent.futures import Future

import pytest
import torch

from llm_trainer.async_rl.trajectory import Trajectory
from llm_trainer.losses import policy_gradient as pg
from llm_trainer.remote import (
    AdamParams,
    ForwardBackwardOutput,
    OptimStepResponse,
    RemoteApiCrossEntropyTrainer,
    RemoteApiGrpoTrainer,
    SaveWeightsResponse,
    TensorData,
)


def done(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


class RecordingClient:
    """Answers like a training client; forward log-probs are -0.5 per target token."""

    def __init__(self):
        self.calls = []
        self.base_url = "http://stand-in"
        self._http = type("Http", (), {"base_url": self.base_url})()

    def forward(self, data):
        self.calls.append(("forward", data))
        outputs = [{"logprobs": TensorData([-0.5] * d.model_input.length)} for d in data]
        return done(ForwardBackwardOutput(outputs, {}))

    def forward_backward(self, data, loss_fn, loss_fn_config=None):
        self.calls.append(("forward_backward", data, loss_fn, loss_fn_config))
        return done(ForwardBackwardOutput([], {"loss:sum": 1.25}))

    def optim_step(self, adam_params):
        self.calls.append(("optim_step", adam_params))
        return done(OptimStepResponse(len(self.calls), {"grad_norm": 0.5}))

    def save_weights_for_sampler(self, name):
        self.calls.append(("save", name))
        return done(SaveWeightsResponse(f"llm-trainer://sampler/{name}"))


def trajectory(group, prompt, completion, reward, logprobs=None, truncated=False):
    return Trajectory(prompt, completion, model_version=0, group_id=group, logprobs=logprobs,
                      rewards_per_func=[reward], truncated=truncated)  # fmt: skip


def test_grpo_datums_carry_token_scaled_advantages_and_sampler_logprobs():
    client = RecordingClient()
    trainer = RemoteApiGrpoTrainer(client, num_generations=2, batch_size=4, max_steps=1, loss_fn="ppo", epsilon=0.1,
                                   epsilon_high=0.3)  # fmt: skip
    batch = [
        trajectory(7, [1, 2], [3, 4, 5], 1.0, [-0.1, -0.2, -0.3]),
        trajectory(9, [6], [7], 0.0, [-0.4]),
        trajectory(7, [1, 2], [8], 0.0, [-0.5]),  # its group is split in the batch: regrouped
        trajectory(9, [6], [9, 10], 2.0, [-0.6, -0.7], truncated=True),
    ]
    metrics = trainer.train(batch)
    _, data, loss_fn, config = client.calls[0]
    assert loss_fn == "ppo" and config == {"clip_low_threshold": 0.9, "clip_high_threshold": 1.3}
    advantages, _, _ = pg.group_advantages(torch.tensor([[1.0], [0.0], [0.0], [2.0]]), torch.ones(1), 2)
    n = 3 + 1 + 1 + 2
    first = data[0]
    assert first.model_input.to_ints() == [1, 2, 3, 4] and first.loss_fn_inputs["target_tokens"].tolist() == [
        2,
        3,
        4,
        5,
    ]
    assert first.loss_fn_inputs["logprobs"].tolist() == [0.0, -0.1, -0.2, -0.3]
    expected = [0.0] + [advantages[0].item() / n] * 3
    assert first.loss_fn_inputs["advantages"].tolist() == pytest.approx(expected)
    assert data[1].model_input.to_ints() == [1, 2]  # the regrouped member of group 7
    assert data[3].loss_fn_inputs["advantages"].tolist() == pytest.approx([advantages[3].item() / n] * 2)
    assert metrics["loss"] == 1.25 and metrics["grad_norm"] == 0.5 and metrics["num_tokens"] == n
    assert metrics["completions/clipped_ratio"] == 0.25

    masked = RemoteApiGrpoTrainer(RecordingClient(), num_generations=2, batch_size=4, max_steps=1,
                                  mask_truncated_completions=True)  # fmt: skip
    masked.train(batch)
    data = masked.training_client.calls[0][1]
    assert data[3].loss_fn_inputs["advantages"].tolist() == [0.0, 0.0]  # truncated: no loss, not in N
    assert data[0].loss_fn_inputs["advantages"].tolist()[1] == pytest.approx(advantages[0].item() / 5)


def test_grpo_without_generator_logprobs_asks_the_service():
    client = RecordingClient()
    trainer = RemoteApiGrpoTrainer(client, num_generations=2, batch_size=2, max_steps=1)
    metrics = trainer.train([trajectory(1, [1, 2], [3, 4], 1.0), trajectory(1, [1, 2], [5], 0.0)])
    assert [call[0] for call in client.calls] == ["forward", "forward_backward", "optim_step"]
    assert client.calls[1][1][0].loss_fn_inputs["logprobs"].tolist() == [0.0, -0.5, -0.5]
    assert metrics["remote/logprobs_from_forward"] == 2.0


def test_grpo_errors():
    client = RecordingClient()
    with pytest.raises(ValueError, match="loss_fn must be 'importance_sampling' or 'ppo'"):
        RemoteApiGrpoTrainer(client, num_generations=2, batch_size=2, max_steps=1, loss_fn="cross_entropy")
    with pytest.raises(ValueError, match="batch_size=3 must be a positive multiple of num_generations=2"):
        RemoteApiGrpoTrainer(client, num_generations=2, batch_size=3, max_steps=1)
    trainer = RemoteApiGrpoTrainer(client, num_generations=2, batch_size=2, max_steps=1)
    with pytest.raises(ValueError, match=r"num_generations=2 completions, got sizes \{1: 1, 2: 1\}"):
        trainer.train([trajectory(1, [1], [2], 1.0, [0.0]), trajectory(2, [1], [2], 1.0, [0.0])])
    unscored = trajectory(1, [1], [2], 1.0, [0.0])
    unscored.rewards_per_func = None
    with pytest.raises(ValueError, match="needs rewards_per_func"):
        trainer.train([unscored, trajectory(1, [1], [2], 1.0, [0.0])])


def test_cross_entropy_weights_are_the_token_mean_over_trained_tokens():
    client = RecordingClient()
    schedule = [AdamParams(learning_rate=0.1), AdamParams(learning_rate=0.05)]
    trainer = RemoteApiCrossEntropyTrainer(client, batch_size=2, max_steps=1, adam_params=lambda step: schedule[step])
    batch = [
        Trajectory([1, 2], [3, 4], model_version=0, group_id=0),
        Trajectory([], [5, 6, 7], model_version=0, group_id=1, row={"labels": [5, -100, 7]}),
    ]
    metrics = trainer.train(batch)
    data = client.calls[0][1]
    assert data[0].loss_fn_inputs["weights"].tolist() == [0.0, 1 / 3, 1 / 3]
    assert data[1].model_input.to_ints() == [5, 6] and data[1].loss_fn_inputs["weights"].tolist() == [0.0, 1 / 3]
    assert client.calls[1] == ("optim_step", schedule[0]) and metrics["learning_rate"] == 0.1
    with pytest.raises(ValueError, match="no trained token in this batch"):
        trainer.train([Trajectory([1, 2, 3], [], model_version=0, group_id=0)])
    with pytest.raises(ValueError, match="a dataset needs its tokenizer"):
        RemoteApiCrossEntropyTrainer(client, batch_size=1, max_steps=1, dataset=[{"text": "x"}])
    with pytest.raises(ValueError, match="fit\\(\\) needs dataset="):
        trainer.fit()


def test_cross_entropy_trainer_runs_from_a_pool_and_publishes_each_step():
    """The engine loop (`run`) with trajectories already pooled (e.g. rejection sampling): a fully-async controller
    publishes a sampler snapshot after every step."""
    from llm_trainer.async_rl.pool import TrajectoryPool
    from llm_trainer.async_rl.weight_sync import WeightSyncController

    client = RecordingClient()
    trainer = RemoteApiCrossEntropyTrainer(client, batch_size=2, max_steps=2, batch_timeout=5)
    pool = TrajectoryPool()
    pool.put([Trajectory([1, 2], [3, 4], model_version=0, group_id=i) for i in range(4)])
    trainer.set_module_references(pool, WeightSyncController("fully-async", publisher=trainer.publisher))
    trainer.run()
    names = [call[0] for call in client.calls]
    assert names == ["forward_backward", "optim_step", "save", "forward_backward", "optim_step", "save"]
    assert [step["loss"] for step in trainer.history] == [1.25, 1.25]
    assert trainer.publisher.latest() == ("llm-trainer://sampler/step-2", 2)


def test_publisher_names_snapshots_by_version():
    client = RecordingClient()
    trainer = RemoteApiGrpoTrainer(client, num_generations=1, batch_size=1, max_steps=1, sampler_prefix="run-a-")
    assert trainer.model is None and trainer.publisher.latest() == (None, -1)
    trainer.publisher.push(None, 3)
    assert trainer.publisher.latest() == ("llm-trainer://sampler/run-a-3", 3)


def test_client_timeouts_and_dead_servers_are_clear_errors():
    import socket

    from llm_trainer.remote import ServiceClient
    from llm_trainer.trainer.utils import free_port

    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(TimeoutError, match=f"health at {url} did not answer within 0.5 s"):
            ServiceClient(url, timeout=0.5).health()
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=f"training service at {dead} is not reachable.*llm-trainer train-serve"):
        ServiceClient(dead, timeout=2).create_training_client("m")
