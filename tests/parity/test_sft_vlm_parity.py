"""SFTTrainer parity with TRL 1.16 on tiny vision-language models (Qwen2-VL and LLaVA stand-ins): same model folder,
zen-image data, processor instance and seed through both; per-step loss within 1e-4 relative, same metric names."""

from __future__ import annotations

import pytest
from datasets import Dataset

from llm_trainer.testing import get_tiny_vlm_processor, make_tiny_vlm, zen_image_dataset

from .helpers import assert_same_training

trl = pytest.importorskip("trl")

FAMILIES = ("qwen2_vl", "llava")


@pytest.fixture(scope="module")
def vlm_paths(tmp_path_factory) -> dict[str, str]:
    return {family: make_tiny_vlm(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


def _mixed_multi_image(config: str) -> Dataset:
    """zen-multi-image rows (two images each), every third row without its images (TRL allows the mix)."""
    dataset = zen_image_dataset(config, images_per_row=2)
    rows = dataset.to_list()
    for i, row in enumerate(rows):
        if i % 3 == 1:
            row["images"] = []
    return Dataset.from_list(rows, features=dataset.features)


def _train(module, model_path, processor, dataset, tmp_path, peft_config=None, **config):
    config = {
        "output_dir": str(tmp_path / module.__name__),
        "report_to": "none",
        "max_steps": 2,
        "per_device_train_batch_size": 3,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "bf16": False,
        "save_strategy": "no",
        "disable_tqdm": True,
        "max_length": None,  # TRL's VLM tests: truncation must not cut image tokens
        "seed": 7,
        **config,
    }
    trainer = module.SFTTrainer(
        model=model_path,
        args=module.SFTConfig(**config),
        train_dataset=dataset,
        processing_class=processor,  # one instance for both: Qwen-VL processors load images-only here
        peft_config=peft_config,
    )
    trainer.train()
    return trainer


CASES = {
    "language_modeling": (lambda: zen_image_dataset("conversational_language_modeling"), {}),
    "multi_image_prompt_completion": (lambda: _mixed_multi_image("conversational_prompt_completion"), {}),
    "assistant_only_loss": (
        lambda: zen_image_dataset("conversational_language_modeling", images_per_row=2),
        {"assistant_only_loss": True, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2},
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_sft_vlm_matches_trl(family, case, vlm_paths, tmp_path):
    import llm_trainer

    make_dataset, config = CASES[case]
    dataset = make_dataset()
    processor = get_tiny_vlm_processor(vlm_paths[family])
    ours = _train(llm_trainer, vlm_paths[family], processor, dataset, tmp_path, **config)
    theirs = _train(trl, vlm_paths[family], processor, dataset, tmp_path, **config)
    assert_same_training(ours, theirs)


def test_sft_vlm_lora_matches_trl(vlm_paths, tmp_path):
    peft = pytest.importorskip("peft")
    import llm_trainer

    path = vlm_paths["qwen2_vl"]
    dataset = zen_image_dataset("conversational_prompt_completion")
    processor = get_tiny_vlm_processor(path)
    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ours = _train(llm_trainer, path, processor, dataset, tmp_path, peft.LoraConfig(**lora))
    theirs = _train(trl, path, processor, dataset, tmp_path, peft.LoraConfig(**lora))
    assert_same_training(ours, theirs)
