"""Nash-MD offline on a tiny random model, in seconds on a CPU: `python examples/nash_md.py`.

Each step samples one completion per prompt from the policy and one from the geometric mixture of the policy and the
frozen reference (`mixture_coef` on the reference), turns the reward difference into the probability that the
policy's completion wins, and takes a REINFORCE step on it with a KL penalty (`beta`). `beta` and `mixture_coef` may
be lists: one value per epoch. For a real run, pass a model name, a prompt dataset (e.g.
"trl-lib/ultrafeedback-prompt") and a reward model or a pairwise judge, and drop the small settings.
"""

from llm_trainer import NashMDConfig, NashMDTrainer
from llm_trainer.testing import make_tiny_model, zen_dataset


def brevity(completions, **kwargs) -> list[float]:
    """Completions of about 20 characters score best."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [-abs(len(text) - 20) / 20 for text in texts]


args = NashMDConfig(
    output_dir="outputs/nash-md-tiny",
    max_steps=3,
    per_device_train_batch_size=4,
    max_new_tokens=16,
    learning_rate=1e-3,
    mixture_coef=[0.5],
    logging_steps=1,
    bf16=False,
    save_strategy="no",
    report_to="none",
)
trainer = NashMDTrainer(
    model=make_tiny_model(), reward_funcs=brevity, args=args, train_dataset=zen_dataset("standard_prompt_only")
)
trainer.train()
last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
print(f"loss {last['loss']:.4f}, P(policy beats mixture) {last['rewards/probabilities']:.3f}")
