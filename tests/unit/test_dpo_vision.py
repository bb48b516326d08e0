"""DPO and KTO on tiny vision-language models (Qwen2-VL and LLaVA stand-ins): training moves the weights, each pair's
(or row's) images go through the vision encoder once, the reference sees them too (also precomputed), the fused
log-prob head never builds the logits, multi-image and image-less rows mix, the vision tower can be frozen, LoRA
trains the language model, and bad input fails before training with the row named."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, Features, Image, Sequence

from llm_trainer import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from llm_trainer.data.preference_vision import IMAGE_INPUTS_KEY, VisionPreferenceCollator
from llm_trainer.models.vision import unwrap_model, vision_parameters
from llm_trainer.testing import get_tiny_vlm_processor, make_images, make_tiny_vlm, zen_image_dataset

FAMILIES = ("qwen2_vl", "llava")
BATCH = 4


@pytest.fixture(scope="module")
def vlm_paths(tmp_path_factory) -> dict[str, str]:
    return {family: make_tiny_vlm(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


def _args(config_class, tmp_path, **overrides):
    config = {
        "output_dir": str(tmp_path / "out"),
        "report_to": "none",
        "max_steps": 2,
        "per_device_train_batch_size": BATCH,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "seed": 0,
    }
    return config_class(**{**config, **overrides})


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in unwrap_model(model).named_parameters()}


def _changed(before: dict[str, torch.Tensor], model) -> set[str]:
    return {
        name for name, param in unwrap_model(model).named_parameters() if not torch.equal(before[name], param.detach())
    }


class _EncoderCalls:
    """Counts the images the vision encoder of a model receives (a forward hook on its vision module)."""

    def __init__(self, model) -> None:
        hf = unwrap_model(model)
        module = getattr(hf.model, "visual", None) or hf.model.vision_tower
        self.images: list[int] = []
        module.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        pixels = args[0]
        # Qwen-VL: flattened patches, one row per patch (grid t*h*w patches an image); LLaVA: one image a row.
        self.images.append(pixels.size(0))


def _record_batches(trainer) -> list[dict]:
    """The batches the trainer's collator makes from now on."""
    batches, collate = [], trainer.data_collator

    def recording(examples):
        batches.append(collate(examples))
        return batches[-1]

    trainer.data_collator = recording
    return batches


def _train(trainer_class, config_class, path, dataset, tmp_path, **kwargs):
    overrides = kwargs.pop("args", {})
    trainer = trainer_class(
        model=path,
        args=_args(config_class, tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=get_tiny_vlm_processor(path),
        **kwargs,
    )
    return trainer


# ------------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_trains_a_vlm_encoding_each_pairs_images_once(family, vlm_paths, tmp_path):
    dataset = zen_image_dataset("conversational_preference")
    trainer = _train(DPOTrainer, DPOConfig, vlm_paths[family], dataset, tmp_path)
    assert trainer.ref_model is not None  # a frozen copy of the initial model
    batch = trainer.data_collator([dataset[i] for i in range(BATCH)])
    assert batch["input_ids"].size(0) == 2 * BATCH and batch[IMAGE_INPUTS_KEY].rows == BATCH
    calls = _EncoderCalls(trainer.model)
    ref_calls = _EncoderCalls(trainer.ref_model)
    collated = _record_batches(trainer)
    before = _snapshot(trainer.model)
    trainer.train()
    changed = _changed(before, trainer.model)
    assert any("vision" in n or "visual" in n for n in changed) and any("language_model" in n for n in changed)
    # Policy and reference: one encoder call a step each, on the pairs' images (not on each row's copy of them).
    pixels = [batch[IMAGE_INPUTS_KEY].tensors["pixel_values"].size(0) for batch in collated]
    assert calls.images == ref_calls.images == pixels[:2]  # the loader collates one batch ahead
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and logs[1]["rewards/margins"] != 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_kto_trains_a_vlm_with_one_encoding_for_completion_and_kl(family, vlm_paths, tmp_path):
    dataset = zen_image_dataset("conversational_unpaired_preference")
    trainer = _train(KTOTrainer, KTOConfig, vlm_paths[family], dataset, tmp_path)
    calls = _EncoderCalls(trainer.model)
    before = _snapshot(trainer.model)
    trainer.train()
    assert any("language_model" in n for n in _changed(before, trainer.model))
    assert len(calls.images) == 2  # one encoding a step for the completions and the KL completions
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert {"kl", "rewards/chosen", "logps/chosen", "entropy"} <= set(logs[0])


def test_fused_head_never_builds_the_vocabulary_logits(vlm_paths, tmp_path):
    dataset = zen_image_dataset("conversational_preference")
    trainer = _train(DPOTrainer, DPOConfig, vlm_paths["qwen2_vl"], dataset, tmp_path, args={"max_steps": 1})
    hf = unwrap_model(trainer.model)
    vocab = hf.get_output_embeddings().out_features
    outputs = []
    hf.get_output_embeddings().register_forward_hook(lambda module, args, out: outputs.append(out))
    trainer.train()
    assert outputs  # the head ran ...
    shapes = [t.shape for out in outputs for t in (out if isinstance(out, tuple) else (out,))]
    assert all(shape[-1] != vocab for shape in shapes), shapes  # ... returning per-token values, not logits


def test_multi_image_rows_mixed_with_rows_without_images(vlm_paths, tmp_path):
    rows = zen_image_dataset("conversational_preference", images_per_row=2).to_list()
    for row in rows[1::3]:
        row["images"] = []  # text-only rows among the image rows
    features = Features({**zen_image_dataset("conversational_preference").features, "images": Sequence(Image())})
    del features["image"]
    dataset = Dataset.from_list(rows, features=features)
    trainer = _train(DPOTrainer, DPOConfig, vlm_paths["qwen2_vl"], dataset, tmp_path, args={"max_steps": 1})
    batch = trainer.data_collator([dataset[i] for i in range(BATCH)])
    assert batch[IMAGE_INPUTS_KEY].tensors["image_grid_thw"].size(0) == 2 * 3  # rows 0, 2, 3: two images each
    trainer.train()
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)


def test_kto_multi_image_from_paired_rows(vlm_paths, tmp_path):
    dataset = zen_image_dataset("conversational_preference", images_per_row=2)  # unpaired automatically
    trainer = _train(KTOTrainer, KTOConfig, vlm_paths["llava"], dataset, tmp_path, args={"max_steps": 1})
    assert len(trainer.train_dataset) == 2 * len(dataset)
    trainer.train()


# ------------------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize(("trainer_class", "config_class"), [(DPOTrainer, DPOConfig), (KTOTrainer, KTOConfig)])
def test_precomputed_reference_logps_match_the_live_reference(trainer_class, config_class, vlm_paths, tmp_path):
    config = "conversational_preference" if trainer_class is DPOTrainer else "conversational_unpaired_preference"
    dataset = zen_image_dataset(config)
    args = {"precompute_ref_log_probs": True, "max_steps": 1}
    trainer = _train(trainer_class, config_class, vlm_paths["qwen2_vl"], dataset, tmp_path, args=args)
    column = "ref_chosen_logps" if trainer_class is DPOTrainer else "ref_logps"
    precomputed = torch.tensor(trainer.train_dataset[column][:BATCH])
    batch = trainer.data_collator([{k: v for k, v in dataset[i].items()} for i in range(BATCH)])
    live = trainer.compute_ref_log_probs(trainer.model, batch)[0]
    # Same model, same batch, float32: only summation order may differ (|logp| ~ 100, a few float32 eps of it).
    torch.testing.assert_close(live, precomputed, rtol=0, atol=1e-4 * precomputed.abs().max().item())
    trainer.train()


def test_freeze_vision_tower_leaves_the_encoder_unchanged(vlm_paths, tmp_path):
    dataset = zen_image_dataset("conversational_preference")
    args = {"freeze_vision_tower": True}
    trainer = _train(DPOTrainer, DPOConfig, vlm_paths["llava"], dataset, tmp_path, args=args)
    frozen = {name for name, _ in vision_parameters(trainer.model)}
    before = _snapshot(trainer.model)
    trainer.train()
    changed = _changed(before, trainer.model)
    assert frozen and not frozen & changed and changed


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_the_language_model_adapter(family, vlm_paths, tmp_path):
    peft = pytest.importorskip("peft")
    dataset = zen_image_dataset("conversational_preference")
    lora = peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM")  # default targets: the language model
    trainer = _train(DPOTrainer, DPOConfig, vlm_paths[family], dataset, tmp_path, peft_config=lora)
    assert trainer.ref_model is None  # the reference is the model with its adapter disabled
    before = _snapshot(trainer.model)
    trainer.train()
    changed = _changed(before, trainer.model)
    assert changed and all("lora_" in name and "language_model" in name for name in changed)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert logs[1]["rewards/margins"] != 0.0  # the policy moved away from its reference


# ------------------------------------------------------------------------------------------------------ bad input
def test_image_column_with_a_text_only_model_names_the_column(tiny_model_path, tmp_path):
    dataset = zen_image_dataset("conversational_preference")
    for trainer_class, config_class in ((DPOTrainer, DPOConfig), (KTOTrainer, KTOConfig)):
        with pytest.raises(ValueError, match=r"'image' column.*not a vision-language model"):
            trainer_class(model=tiny_model_path, args=_args(config_class, tmp_path), train_dataset=dataset)


def test_undecodable_image_names_the_row(vlm_paths, tmp_path):
    rows = zen_image_dataset("conversational_preference").to_list()
    rows[5]["image"] = {"bytes": b"not an image", "path": None}
    dataset = Dataset.from_list(rows, features=zen_image_dataset("conversational_preference").features)
    with pytest.raises(ValueError, match="Row 5 of the train dataset.*cannot be decoded"):
        _train(DPOTrainer, DPOConfig, vlm_paths["qwen2_vl"], dataset, tmp_path)


def test_more_image_placeholders_than_images_names_the_row(vlm_paths, tmp_path):
    rows = zen_image_dataset("conversational_unpaired_preference").to_list()
    rows[3]["prompt"] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}
    ]
    for row in rows:
        if row is not rows[3]:
            row["prompt"] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    dataset = Dataset.from_list(rows, features=None)
    with pytest.raises(ValueError, match="Row 3 of the train dataset: column 'prompt' has 2 image placeholders"):
        _train(KTOTrainer, KTOConfig, vlm_paths["llava"], dataset, tmp_path)


def test_keep_end_truncation_and_a_tokenizer_without_images_are_refused(vlm_paths, tmp_path):
    dataset = zen_image_dataset("conversational_preference")
    args = {"max_length": 64, "truncation_mode": "keep_end"}
    with pytest.raises(ValueError, match="truncation_mode='keep_end' is not supported"):
        _train(DPOTrainer, DPOConfig, vlm_paths["qwen2_vl"], dataset, tmp_path, args=args)
    tokenizer = get_tiny_vlm_processor(vlm_paths["qwen2_vl"]).tokenizer
    with pytest.raises(ValueError, match="cannot process images. Pass the model's processor"):
        DPOTrainer(
            model=vlm_paths["qwen2_vl"],
            args=_args(DPOConfig, tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize(("trainer_class", "config_class"), [(DPOTrainer, DPOConfig), (KTOTrainer, KTOConfig)])
def test_max_length_cutting_image_tokens_is_a_clear_error(trainer_class, config_class, vlm_paths, tmp_path):
    config = "conversational_preference" if trainer_class is DPOTrainer else "conversational_unpaired_preference"
    dataset = zen_image_dataset(config)
    args = {"max_length": 20}  # LLaVA's prompts hold 16 image tokens after a few text tokens
    trainer = _train(trainer_class, config_class, vlm_paths["llava"], dataset, tmp_path, args=args)
    with pytest.raises(ValueError, match=r"`max_length` \(20\) is too short and causes image placeholder tokens"):
        trainer.train()


def test_collator_processes_each_pairs_images_once(vlm_paths):
    processor = get_tiny_vlm_processor(vlm_paths["llava"])
    images = make_images(2, seed=3)
    rows = [
        {
            "image": image,
            "prompt": [{"role": "user", "content": "What is it?"}],
            "chosen": [{"role": "assistant", "content": "A cat."}],
            "rejected": [{"role": "assistant", "content": "A dog."}],
        }
        for image in images
    ]
    batch = VisionPreferenceCollator(processor)(rows)
    assert batch[IMAGE_INPUTS_KEY].tensors["pixel_values"].shape[0] == 2  # one per pair, not per row
    assert batch["input_ids"].shape[0] == 4
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    per_row = (batch["input_ids"] == image_token).sum(dim=1)
    assert per_row.tolist() == [16] * 4  # every row, chosen and rejected, holds its pair's image tokens
    # Accelerate's device placement (what the prepared data loader applies) moves the images with the batch.
    from accelerate.utils import send_to_device

    moved = send_to_device(batch, "meta")
    assert moved[IMAGE_INPUTS_KEY].rows == 2
    assert all(t.device.type == "meta" for t in moved[IMAGE_INPUTS_KEY].tensors.values())


def test_trl_layout_collators_give_the_same_losses(vlm_paths, tmp_path):
    """TRL's vision collators (flat `pixel_values`, per row) passed as `data_collator` train the same numbers."""
    from llm_trainer.data.collators import DataCollatorForVisionPreference, DataCollatorForVisionUnpairedPreference

    path = vlm_paths["qwen2_vl"]
    processor = get_tiny_vlm_processor(path)
    cases = [
        (DPOTrainer, DPOConfig, "conversational_preference", DataCollatorForVisionPreference(processor)),
        (
            KTOTrainer,
            KTOConfig,
            "conversational_unpaired_preference",
            DataCollatorForVisionUnpairedPreference(processor),
        ),
    ]
    for trainer_class, config_class, config, trl_collator in cases:
        losses = []
        for collator in (None, trl_collator):
            trainer = trainer_class(
                model=path,
                args=_args(config_class, tmp_path),
                train_dataset=zen_image_dataset(config),
                processing_class=processor,
                data_collator=collator,
            )
            trainer.train()
            losses.append([log["loss"] for log in trainer.state.log_history if "loss" in log])
        # Same tokens and images; only the encoder's batch differs (summation order): float32 rounding of a ~0.7 loss.
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
