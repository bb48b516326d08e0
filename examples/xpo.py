"""XPO offline on a tiny random model, in seconds on a CPU: `python examples/xpo.py`.

Each step samples one completion per prompt from the policy and one from the frozen reference, ranks the pair with
the reward function, and takes Online DPO's loss on it plus `alpha` times the policy's log-prob of the reference's
completion (the exploration bonus). `alpha` and `beta` may be lists: one value per epoch. For a real run, pass a
model name, a prompt dataset (e.g. "trl-lib/ultrafeedback-prompt") and a reward model or a pairwise judge, and drop
the small settings.
"""

from llm_trainer import XPOConfig, XPOTrainer
from llm_trainer.testing import make_tiny_model, zen_dataset


def brevity(completions, **kwargs) -> list[float]:
    """Completions of about 20 characters score best."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [-abs(len(text) - 20) / 20 for text in texts]


args = XPOConfig(
    output_dir="outputs/xpo-tiny",
    max_steps=3,
    per_device_train_batch_size=4,
    max_new_tokens=16,
    learning_rate=1e-3,
    alpha=[1e-5],
    logging_steps=1,
    bf16=False,
    save_strategy="no",
    report_to="none",
)
trainer = XPOTrainer(
    model=make_tiny_model(), reward_funcs=brevity, args=args, train_dataset=zen_dataset("standard_prompt_only")
)
trainer.train()
last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
print(f"loss {last['loss']:.4f} (dpo {last['loss/dpo']:.4f}, xpo {last['loss/xpo']:.2e})")
