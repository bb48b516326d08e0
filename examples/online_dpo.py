"""Online DPO offline on a tiny random model, in seconds on a CPU: `python examples/online_dpo.py`.

Each step samples two completions per prompt from the policy, ranks them with the reward function into (chosen,
rejected), and takes the DPO loss against the frozen initial model. For a real run, pass a model name (e.g.
"Qwen/Qwen2.5-0.5B-Instruct"), a prompt dataset (e.g. "trl-lib/ultrafeedback-prompt") and a reward model or a
pairwise judge (`judge=PairRMJudge()`), and drop the small settings.
"""

from llm_trainer import OnlineDPOConfig, OnlineDPOTrainer
from llm_trainer.testing import make_tiny_model, zen_dataset


def brevity(completions, **kwargs) -> list[float]:
    """Completions of about 20 characters score best."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [-abs(len(text) - 20) / 20 for text in texts]


args = OnlineDPOConfig(
    output_dir="outputs/online-dpo-tiny",
    max_steps=3,
    gradient_checkpointing=False,
    per_device_train_batch_size=4,
    max_new_tokens=16,
    learning_rate=1e-3,
    logging_steps=1,
    bf16=False,
    save_strategy="no",
    report_to="none",
)
trainer = OnlineDPOTrainer(
    model=make_tiny_model(), reward_funcs=brevity, args=args, train_dataset=zen_dataset("standard_prompt_only")
)
trainer.train()
last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
print(f"loss {last['loss']:.4f}, chosen-minus-rejected score {last['objective/scores_margin']:.3f}")
