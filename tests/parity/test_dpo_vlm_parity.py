"""DPOTrainer parity with TRL 1.16 on vision-language models: the same tiny Qwen2-VL or LLaVA stand-in, zen-image
preference pairs with their images, processor instance and seed through both give the same per-step losses and
metrics (TRL's names). Our collator processes each pair's images once and the vision encoder runs once per pair, where
TRL processes and encodes every image twice (chosen and rejected rows): same numbers up to float32 summation order."""

from __future__ import annotations

import pytest
import torch

from llm_trainer.testing import get_tiny_vlm_processor, make_tiny_vlm, zen_image_dataset

from .helpers import assert_same_training
from .test_dpo_parity import DPO_METRICS, _train

trl = pytest.importorskip("trl")

FAMILIES = ("qwen2_vl", "llava")


@pytest.fixture(scope="module")
def vlm_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {family: make_tiny_vlm(family, root / family) for family in FAMILIES}


def _assert_parity(model_path, tmp_path, images_per_row=1, peft_config=None, **config):
    import llm_trainer

    processor = get_tiny_vlm_processor(model_path)  # one instance for both (Qwen-VL's loads images-only here)
    dataset = zen_image_dataset("conversational_preference", images_per_row=images_per_row)
    config = {"processing_class": processor, "peft_config": peft_config, **config}
    ours = _train(llm_trainer, model_path, dataset, tmp_path, **config)
    theirs = _train(trl, model_path, dataset, tmp_path, **config)
    assert_same_training(ours, theirs)
    logged = next(log for log in ours.state.log_history if "loss" in log)
    assert DPO_METRICS <= set(logged)
    return ours, theirs


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_vlm_matches_trl(family, vlm_paths, tmp_path):
    _assert_parity(vlm_paths[family], tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_vlm_multi_image_matches_trl(family, vlm_paths, tmp_path):
    _assert_parity(vlm_paths[family], tmp_path, images_per_row=2, loss_type=["sigmoid", "sft"], loss_weights=[1, 0.5])


def test_dpo_vlm_lora_matches_trl(vlm_paths, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ours, _ = _assert_parity(vlm_paths["qwen2_vl"], tmp_path, peft_config=lora)
    assert ours.ref_model is None


@pytest.mark.parametrize("family", FAMILIES)
def test_collator_tokens_match_trl_with_each_image_processed_once(family, vlm_paths):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from llm_trainer.data.preference_vision import IMAGE_INPUTS_KEY, VisionPreferenceCollator

    processor = get_tiny_vlm_processor(vlm_paths[family])
    dataset = zen_image_dataset("conversational_preference", images_per_row=2)
    rows = [dataset[i] for i in range(3)]
    ours = VisionPreferenceCollator(processor, max_length=60)([dict(row) for row in rows])
    theirs = DataCollatorForVisionPreference(processor, max_length=60)([dict(row) for row in rows])
    text_fields = {"input_ids", "attention_mask", "completion_mask", "token_type_ids", "mm_token_type_ids"} & set(
        theirs
    )
    assert text_fields <= set(ours)
    for key in text_fields - {"input_ids"}:
        assert torch.equal(ours[key], theirs[key]), key
    real = ours["attention_mask"].bool()  # TRL pads completions with eos where the pad id is 0; both mask them out
    assert torch.equal(ours["input_ids"][real], theirs["input_ids"][real])
    images = ours[IMAGE_INPUTS_KEY].tensors
    assert set(images) == set(theirs) - text_fields
    for key, value in images.items():  # TRL's: the pairs' images twice, for the chosen then the rejected rows
        assert torch.equal(torch.cat([value, value]), theirs[key]), key
