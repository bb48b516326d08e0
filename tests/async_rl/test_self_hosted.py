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
    Trajectory,
    WeightSyncController,
    pad_trajectories,
    prepare_grpo_batch,
    reward_scorer,
)
from llm_trainer.generation import GenerationClient
from llm_trainer.generation.base import SamplingConfig
from llm_trainer.generation.remote import VLLMServerGenerator
from llm_trainer.trainer.reward_functions import RewardFunctions
from llm_trainer.trainer.utils import free_port
from tests.conftest import serve

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


def build(
    model_path,
    server_url,
    mode,
    *,
    max_steps=3,
    reward=token_sum_reward,
    max_staleness=None,
    workers=1,
    lora=False,
    **trainer_kwargs,
):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
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
        **trainer_kwargs,
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


def test_lora_run_sends_adapters_only(tiny_model_path):
    with serve(tiny_model_path) as url:  # its own server: it ends up serving an adapter
        trainer = build(tiny_model_path, url, "sync", max_steps=2, lora=True)
        initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.run()
        health = GenerationClient(url).health()
    assert health["model_version"] == 2 and health.get("lora_adapter") is True
    assert trainer.consumed_versions == [[0] * BATCH, [1] * BATCH]
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, initial[n])]
    assert changed and all("lora_" in name for name in changed)


def test_the_server_holds_the_pushed_version(tiny_model_path, server_url):
    trainer = build(tiny_model_path, server_url, "sync", max_steps=2, beta=0.1)
    trainer.run()
    assert GenerationClient(server_url).health()["model_version"] == 2
    assert trainer.consumed_versions == [[0] * BATCH, [1] * BATCH]  # tagged from the server's replies
    kl = [metrics["kl"] for metrics in trainer.history]
    assert kl[0] == 0.0 and kl[1] > 0.0  # the reference is the initial policy


# ------------------------------------------------------------------------------------------- batch preparation
def trajectories(num_groups=2, generations=2, logprobs=True):
    items = []
    for g in range(num_groups):
        for k in range(generations):
            completion = [5 + k, 6, 7][: 1 + (g + k) % 3]
            items.append(
                Trajectory(
                    prompt_ids=[1, 2, 3][: 1 + g],
                    completion_ids=completion,
                    model_version=g,
                    group_id=g,
                    logprobs=[-1.0] * len(completion) if logprobs else None,
                    rewards_per_func=[float(k + g), None if k else 1.0],
                    truncated=k == 1,
                )
            )
    return items


def test_pad_trajectories_pads_like_grpo():
    items = trajectories(logprobs=False)
    items[0].logprobs = [-0.25]
    batch = pad_trajectories(items, pad_token_id=0, mask_truncated_completions=True)
    assert batch.prompt_ids.tolist() == [[0, 1], [0, 1], [1, 2], [1, 2]]
    assert batch.prompt_mask.tolist() == [[0, 1], [0, 1], [1, 1], [1, 1]]
    assert batch.completion_ids.tolist()[1] == [6, 6, 0]
    assert batch.completion_mask.tolist() == [[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0]]  # truncated rows masked
    sampling = batch.sampling_per_token_logps
    assert sampling[0, 0] == -0.25 and torch.isnan(sampling[1, :2]).all()  # no log-probs: NaN (ratio 1)
    assert pad_trajectories(trajectories(logprobs=False), 0).sampling_per_token_logps is None


def test_prepare_grpo_batch_matches_the_loss_pieces(tiny_model_path):
    from llm_trainer.generation.loop import completion_logps
    from llm_trainer.losses import policy_gradient as pg
    from llm_trainer.modeling import add_token_logprob_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    add_token_logprob_head(model, outputs=())
    items = trajectories()
    mode = {"mode": "token_truncate", "clip_min": None, "clip_max": 2.0}
    batch, metrics = prepare_grpo_batch(
        items,
        model,
        pad_token_id=0,
        num_generations=2,
        reward_weights=[1.0, 0.5],
        importance_sampling=mode,
        current_version=2,
        reward_names=["a", "b"],
        ref_model=model,
    )
    with torch.no_grad():
        expected_old = completion_logps(model, batch)[0]
    torch.testing.assert_close(batch.old_per_token_logps, expected_old)
    torch.testing.assert_close(batch.ref_per_token_logps, expected_old)
    rewards = torch.tensor([[0.0, 1.0], [1.0, float("nan")], [1.0, 1.0], [2.0, float("nan")]])
    advantages, total, _ = pg.group_advantages(rewards, torch.tensor([1.0, 0.5]), 2)
    torch.testing.assert_close(batch.advantages, advantages)
    ratio = pg.vllm_importance_sampling_ratio(
        expected_old, batch.sampling_per_token_logps, batch.completion_mask, "token_truncate", None, 2.0
    )
    torch.testing.assert_close(batch.importance_sampling_ratio, ratio)
    assert batch.num_items_in_batch.item() == batch.completion_mask.sum().item()
    assert metrics["staleness/max"] == 2 and metrics["staleness/mean"] == 1.5
    assert metrics["reward"] == pytest.approx(total.mean().item())
    assert metrics["rewards/b/mean"] == pytest.approx(1.0)
    assert metrics["completions/clipped_ratio"] == 0.5
    assert "sampling/importance_sampling_ratio/mean" in metrics


def test_prepare_grpo_batch_refuses_split_groups(tiny_model_path):
    items = trajectories()
    with pytest.raises(ValueError, match="multiple of num_generations=3"):
        prepare_grpo_batch(items, torch.nn.Linear(1, 1), pad_token_id=0, num_generations=3, reward_weights=[1, 1])
    items[1].group_id = 9
    with pytest.raises(ValueError, match="one prompt's group"):
        prepare_grpo_batch(items, torch.nn.Linear(1, 1), pad_token_id=0, num_generations=2, reward_weights=[1, 1])
    items = trajectories()
    items[0].rewards_per_func = None
    with pytest.raises(ValueError, match="score them"):
        prepare_grpo_batch(items, torch.nn.Linear(1, 1), pad_token_id=0, num_generations=2, reward_weights=[1, 1])
