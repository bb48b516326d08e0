"""Vision-language DPO on a tiny random Qwen2-VL-style model, in seconds on a CPU: `python examples/vlm_dpo.py`.

Each row of the offline `zen-image` twin's `conversational_preference` config holds a prompt, a chosen and a rejected
answer, and an `image`. The image is processed once per pair and its pixel values serve both the chosen and the
rejected forward (and the reference model's). For a real run, pass a model name (e.g. "Qwen/Qwen2.5-VL-3B-Instruct")
and a preference dataset with images (e.g. "HuggingFaceH4/rlaif-v_formatted"). `--family llava` for LLaVA.
"""

import sys

from llm_trainer import DPOConfig, DPOTrainer
from llm_trainer.testing import make_tiny_vlm, zen_image_dataset

family = sys.argv[sys.argv.index("--family") + 1] if "--family" in sys.argv else "qwen2_vl"
args = DPOConfig(
    output_dir=f"outputs/vlm-dpo-{family}",
    max_steps=4,
    per_device_train_batch_size=2,
    learning_rate=1e-3,
    max_length=None,
    logging_steps=1,
    bf16=False,
    save_strategy="no",
    report_to="none",
)
trainer = DPOTrainer(
    model=make_tiny_vlm(family), args=args, train_dataset=zen_image_dataset("conversational_preference")
)
trainer.train()
last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
print(f"{family}: loss {last['loss']:.4f}, reward accuracy {last['rewards/accuracies']:.2f}")
