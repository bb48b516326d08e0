"""KTOTrainer parity with TRL 1.16 on vision-language models: the same tiny Qwen2-VL or LLaVA stand-in, zen-image
unpaired preference rows with their images, processor instance and seed through both give the same per-step losses
and metrics (TRL's names). Our vision encoder runs once per model and batch for the completions and the KL
completions, where TRL encodes the images in each pass: same numbers up to float32 summation order."""

from __future__ import annotations

import pytest
import torch

from llm_trainer.testing import get_tiny_vlm_processor, make_tiny_vlm, zen_image_dataset

from .helpers import assert_same_training
from .test_kto_parity import _train

trl = pytest.importorskip("trl")

FAMILIES = ("qwen2_vl", "llava")
KTO_METRICS = {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"}


@pytest.fixture(scope="module")
def vlm_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {family: make_tiny_vlm(family, root / family) for family in FAMILIES}


def _assert_parity(model_path, tmp_path, images_per_row=1, **config):
    import llm_trainer

    processor = get_tiny_vlm_processor(model_path)  # one instance for both (Qwen-VL's loads images-only here)
    dataset = zen_image_dataset("conversational_unpaired_preference", images_per_row=images_per_row)
    config = {"processing_class": processor, "learning_rate": 1e-2, **config}
    ours = _train(llm_trainer, model_path, dataset, tmp_path, **config)
    theirs = _train(trl, model_path, dataset, tmp_path, **config)
    assert_same_training(ours, theirs)
    logged = [log for log in ours.state.log_history if "loss" in log]
    assert KTO_METRICS <= set(logged[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_kto_vlm_matches_trl(family, vlm_paths, tmp_path):
    _assert_parity(vlm_paths[family], tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_kto_vlm_multi_image_apo_zero_matches_trl(family, vlm_paths, tmp_path):
    _assert_parity(vlm_paths[family], tmp_path, images_per_row=2, loss_type="apo_zero_unpaired", beta=0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_collator_matches_trl_with_each_image_processed_once(family, vlm_paths):
    from trl.trainer.kto_trainer import DataCollatorForVisionUnpairedPreference

    from llm_trainer.data.preference_vision import IMAGE_INPUTS_KEY
    from llm_trainer.data.unpaired import VisionUnpairedCollator

    processor = get_tiny_vlm_processor(vlm_paths[family])
    dataset = zen_image_dataset("conversational_unpaired_preference", images_per_row=2)
    rows = [dataset[i] for i in range(3)]
    ours = VisionUnpairedCollator(processor, max_length=60)([dict(row) for row in rows])
    theirs = DataCollatorForVisionUnpairedPreference(processor, max_length=60)([dict(row) for row in rows])
    images = ours.pop(IMAGE_INPUTS_KEY).tensors
    assert set(ours) | set(images) == set(theirs)
    for key, value in {**ours, **images}.items():
        assert torch.equal(value, theirs[key]), key
