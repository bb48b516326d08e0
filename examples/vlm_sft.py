"""Vision-language SFT on a tiny random Qwen2-VL-style model, in seconds on a CPU: `python examples/vlm_sft.py`.

The dataset is the offline twin of `trl-internal-testing/zen-image`: a `messages` column of plain-text turns and an
`image` column of PIL images. The trainer inserts the image into the first user turn, lets the processor turn images
into `pixel_values` (and Qwen-VL's `image_grid_thw`) batch by batch, and trains on the assistant's tokens. For a real
run, pass a model name (e.g. "Qwen/Qwen2.5-VL-3B-Instruct") and an image dataset (e.g. "HuggingFaceH4/llava-instruct-mix-vsft"),
and drop the small settings. Pass `--family llava` for a LLaVA-style model.
"""

import sys

from llm_trainer import SFTConfig, SFTTrainer
from llm_trainer.testing import make_tiny_vlm, zen_image_dataset

family = sys.argv[sys.argv.index("--family") + 1] if "--family" in sys.argv else "qwen2_vl"
args = SFTConfig(
    output_dir=f"outputs/vlm-sft-{family}",
    max_steps=4,
    per_device_train_batch_size=2,
    learning_rate=1e-3,
    max_length=None,  # never cut image tokens: the processor's expansion must stay whole
    freeze_vision_tower=True,  # train the language model only (llm_trainer option; TRL has no switch)
    logging_steps=1,
    bf16=False,
    save_strategy="no",
    report_to="none",
)
trainer = SFTTrainer(
    model=make_tiny_vlm(family), args=args, train_dataset=zen_image_dataset("conversational_language_modeling")
)
trainer.train()
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
print(f"{family}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
