"""A judge-driven Online DPO run against a live `llm-trainer vllm-serve --backend transformers` process: the policy's
pairs are ranked by `OpenAIPairwiseJudge` over the server's OpenAI route, which serves a model rigged to answer only
"0" or "1" (conftest's `digit_model_path`), so every pair gets a definite verdict; the run completes, moves the
policy and logs the judge's decisions."""

from __future__ import annotations

import pytest
import torch

from llm_trainer import OnlineDPOConfig, OnlineDPOTrainer
from llm_trainer.judges import OpenAIPairwiseJudge
from llm_trainer.testing import zen_dataset

STEPS, BATCH = 2, 4


class RecordingJudge(OpenAIPairwiseJudge):
    """`OpenAIPairwiseJudge` that keeps the verdicts it returned, one list per call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.verdicts: list[list[int]] = []

    def judge(self, prompts, completions, shuffle_order=True, return_scores=False):
        verdicts = super().judge(prompts, completions, shuffle_order, return_scores)
        self.verdicts.append(list(verdicts))
        return verdicts


def test_online_dpo_with_the_openai_judge_on_the_local_server(
    tiny_model_path, digit_model_path, digit_server_url, tmp_path
):
    judge = RecordingJudge(
        model=digit_model_path, base_url=f"{digit_server_url}/v1", api_key="local", request_kwargs={"temperature": 0}
    )
    args = OnlineDPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        max_new_tokens=8,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=3,
    )
    trainer = OnlineDPOTrainer(
        tiny_model_path, judge=judge, args=args, train_dataset=zen_dataset("conversational_prompt_only")
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()

    assert trainer.state.global_step == STEPS
    # one request per pair: BATCH prompts per step, one judge call per step
    assert judge.num_requests == STEPS * BATCH
    assert [len(v) for v in judge.verdicts] == [BATCH] * STEPS
    assert all(v in (0, 1) for call in judge.verdicts for v in call), judge.verdicts  # the digit model always decides
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
    assert all(torch.equal(before[name], p) for name, p in trainer.ref_model.named_parameters())

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == STEPS
    # the decisions are logged: judge/undecided is each step's share of -1 verdicts (none here)
    undecided = [sum(v == -1 for v in call) / len(call) for call in judge.verdicts]
    assert [entry["judge/undecided"] for entry in logs] == pytest.approx(undecided, abs=1e-9)
    for entry in logs:
        # every pair decided, so every pair carries DPO loss
        assert entry["loss"] > 0 and all(torch.isfinite(torch.tensor(entry[k])) for k in ("loss", "rewards/margins"))
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(
            entry
        )
    # the first step scores the policy against itself (it is the reference): the sigmoid loss is log 2 per pair
    assert logs[0]["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-3)
