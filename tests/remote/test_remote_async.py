"""`RemoteApiGrpoTrainer` off-policy: a LoRA session trained in `batch-async` mode (workers may run one version
ahead of the weights they sample), through a real `llm-trainer train-serve` process. Every consumed sample is at
most one version stale, and its generator log-probs are those of the snapshot its `model_version` names (what the
importance ratio corrects for)."""

import math
import threading

import torch

from llm_trainer.async_rl.pool import GroupedTrajectoryPool
from llm_trainer.async_rl.rollout_worker import PromptSource, RolloutWorker
from llm_trainer.async_rl.weight_sync import WeightSyncController
from llm_trainer.remote import ModelInput, RemoteApiGrpoTrainer, SamplingParams, ServiceClient
from llm_trainer.remote.types import AdamParams
from llm_trainer.testing import get_tokenizer, zen_dataset


def char_reward(completions):
    return [float(sum(map(ord, c)) % 7) for c in completions]


class Recording(RemoteApiGrpoTrainer):
    def _prepare_trajectories(self, trajectories):
        self.seen = getattr(self, "seen", []) + list(trajectories)
        return super()._prepare_trajectories(trajectories)


def test_batch_async_lora_run_respects_staleness_and_tags_samples_with_their_snapshot(train_server, tiny_model_path):
    service = ServiceClient(train_server[0])
    with service.create_lora_training_client(tiny_model_path, rank=4) as client:
        trainer = Recording(
            client,
            num_generations=2,
            batch_size=4,
            max_steps=4,
            loss_fn="ppo",
            adam_params=AdamParams(learning_rate=0.05),
            batch_timeout=120,
        )
        pool = GroupedTrajectoryPool(group_size=2, maxsize=16, max_staleness=1)
        controller = WeightSyncController("batch-async", staleness_threshold=1, publisher=trainer.publisher)
        worker = RolloutWorker(
            "remote-async",
            PromptSource(zen_dataset("standard_prompt_only"), seed=0),
            trainer.sampling_generator(SamplingParams(max_tokens=6, seed=3)),
            lambda group: [[r] for r in char_reward([t.completion for t in group])],
            pool,
            controller,
            tokenizer=get_tokenizer(),
            num_generations=2,
        )
        trainer.workers = [worker]
        trainer.set_module_references(pool, controller)
        trainer.run()

        assert len(trainer.history) == 4 and all(math.isfinite(step["loss"]) for step in trainer.history)
        for step, versions in enumerate(trainer.consumed_versions):
            assert all(0 <= step - v <= 1 for v in versions)
        assert client.get_info()["step"] == 4
        for t in trainer.seen[::3]:
            snapshot = service.create_sampling_client(f"llm-trainer://sampler/step-{t.model_version}")
            scored = snapshot.compute_logprobs(ModelInput.from_ints(t.prompt_ids + t.completion_ids)).result()
            n = len(t.completion_ids)
            torch.testing.assert_close(torch.tensor(scored[-n:]), torch.tensor(t.logprobs), rtol=1e-4, atol=1e-4)
    assert not [t for t in threading.enumerate() if t.name.startswith(("rollout-", "llm-trainer-remote"))]
