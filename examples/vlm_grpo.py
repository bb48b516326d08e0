"""Vision-language GRPO on a tiny random Qwen2-VL-style model, in seconds on a CPU: `python examples/vlm_grpo.py`.

Prompts come with an `image` column (the offline `zen-image` twin's `conversational_prompt_only` config). Generation
sees the image; the log-prob passes get each completion's own image tensors; reward functions receive the images as
the `image` keyword, as in TRL. For a real run, pass a model name (e.g. "Qwen/Qwen2.5-VL-3B-Instruct"), a dataset
such as "lmms-lab/multimodal-open-r1-8k-verified" and real rewards (`trl.rewards.accuracy_reward`), and drop the
small settings. `--family llava` for LLaVA; `--rloo` trains with RLOO instead.
"""

import sys

from llm_trainer import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from llm_trainer.testing import make_tiny_vlm, zen_image_dataset


def wide_image_brevity(completions, image, **kwargs) -> list[float]:
    """Shorter answers score higher, twice as much for images wider than tall (the reward sees the image)."""
    texts = [completion[0]["content"] for completion in completions]
    return [(2.0 if img.width > img.height else 1.0) * -len(text) / 32 for text, img in zip(texts, image)]


family = sys.argv[sys.argv.index("--family") + 1] if "--family" in sys.argv else "qwen2_vl"
config_cls, trainer_cls = (RLOOConfig, RLOOTrainer) if "--rloo" in sys.argv else (GRPOConfig, GRPOTrainer)
args = config_cls(
    output_dir=f"outputs/vlm-{trainer_cls.__name__.lower()}-{family}",
    max_steps=3,
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=12,
    learning_rate=1e-3,
    freeze_vision_tower=True,
    logging_steps=1,
    bf16=False,
    save_strategy="no",
    report_to="none",
)
trainer = trainer_cls(
    model=make_tiny_vlm(family),
    reward_funcs=wide_image_brevity,
    args=args,
    train_dataset=zen_image_dataset("conversational_prompt_only"),
)
trainer.train()
last = [entry for entry in trainer.state.log_history if "reward" in entry][-1]
print(
    f"{family} {trainer_cls.__name__}: reward {last['reward']:.3f}, completion length {last['completions/mean_length']:.1f}"
)
