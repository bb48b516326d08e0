"""SFT on tiny vision-language models (Qwen2-VL and LLaVA stand-ins): training moves the weights with the images fed
to the vision tower, the loss goes through the fused head (the model's full-logits forward never runs), rows without
images mix with rows with several, the vision tower can be frozen, LoRA trains, the completion-only and assistant-only
masks cover exactly what they should, and bad input (`check_vision_dataset`) fails before training naming the row."""

from __future__ import annotations

import io

import pytest
import torch
from datasets import Dataset, IterableDataset

from llm_trainer import SFTConfig, SFTTrainer
from llm_trainer.data.collators import DataCollatorForVisionLanguageModeling
from llm_trainer.data.vision import check_vision_dataset, row_images
from llm_trainer.models.vision import unwrap_model, vision_parameters
from llm_trainer.testing import get_tiny_vlm_processor, make_images, make_tiny_vlm, zen_image_dataset

FAMILIES = ("qwen2_vl", "llava")


@pytest.fixture(scope="module")
def vlm_paths(tmp_path_factory) -> dict[str, str]:
    return {family: make_tiny_vlm(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


def _args(tmp_path, **overrides) -> SFTConfig:
    values = {
        "output_dir": str(tmp_path / "out"),
        "report_to": "none",
        "max_steps": 2,
        "per_device_train_batch_size": 3,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "max_length": None,
        "seed": 0,
        **overrides,
    }
    return SFTConfig(**values)


def _trainer(path, dataset, tmp_path, processor=True, **kwargs) -> SFTTrainer:
    overrides = kwargs.pop("args", {})
    if processor:
        kwargs["processing_class"] = get_tiny_vlm_processor(path)
    return SFTTrainer(model=path, args=_args(tmp_path, **overrides), train_dataset=dataset, **kwargs)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in unwrap_model(model).named_parameters()}


def _changed(before: dict[str, torch.Tensor], model) -> set[str]:
    params = unwrap_model(model).named_parameters()
    return {name for name, param in params if not torch.equal(before[name], param.detach())}


def _vision_module(model) -> torch.nn.Module:
    inner = unwrap_model(model).model
    return getattr(inner, "visual", None) or inner.vision_tower


def _mixed_multi_image(config: str) -> Dataset:
    """zen-multi-image rows (two images each) with every third row's images dropped."""
    dataset = zen_image_dataset(config, images_per_row=2)
    rows = dataset.to_list()
    for i, row in enumerate(rows):
        if i % 3 == 1:
            row["images"] = []
    return Dataset.from_list(rows, features=dataset.features)


def _with_row(dataset: Dataset, index: int, **cells) -> Dataset:
    rows = dataset.to_list()
    rows[index].update(cells)
    return Dataset.from_list(rows, features=dataset.features)


# ------------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", ["conversational_language_modeling", "conversational_prompt_completion"])
def test_sft_trains_a_vlm_through_its_vision_tower_with_the_fused_head(family, config, vlm_paths, tmp_path):
    path = vlm_paths[family]
    trainer = _trainer(path, zen_image_dataset(config), tmp_path)
    assert isinstance(trainer.data_collator, DataCollatorForVisionLanguageModeling)
    model = unwrap_model(trainer.model)
    images_seen = []
    _vision_module(model).register_forward_hook(lambda module, args, output: images_seen.append(args[0].size(0)))
    full_forward = type(model).forward

    def refuse_full_logits(*args, **kwargs):
        raise AssertionError("the full-logits forward ran: the loss must go through the fused head")

    type(model).forward = refuse_full_logits
    try:
        before = _snapshot(model)
        trainer.train()
    finally:
        type(model).forward = full_forward
    assert len(images_seen) == 2 and all(count > 0 for count in images_seen)
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 2
    assert {"loss", "entropy", "mean_token_accuracy", "num_tokens"} <= set(steps[0])
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in steps)
    # Every parameter on the loss's path moves, the vision tower's included. LLaVA reads the vision tower's last
    # hidden state, before `post_layernorm`, which therefore gets no gradient (as in TRL's test).
    expected = {name for name, param in model.named_parameters() if "post_layernorm" not in name}
    assert _changed(before, model) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_mixes_multi_image_rows_with_rows_without_images(family, vlm_paths, tmp_path):
    path = vlm_paths[family]
    dataset = _mixed_multi_image("conversational_prompt_completion")
    trainer = _trainer(path, dataset, tmp_path, args={"per_device_train_batch_size": 3, "max_steps": 1})
    batch = trainer.data_collator([dict(dataset[i]) for i in range(3)])  # rows 0 and 2: two images; row 1: none
    if family == "qwen2_vl":
        assert batch["image_grid_thw"].size(0) == 4
    else:
        assert batch["pixel_values"].size(0) == 4
    image_token = trainer.processing_class.image_token_id
    per_row = (batch["input_ids"] == image_token).sum(1)
    assert per_row[1] == 0 and per_row[0] > 0 and per_row[2] > 0
    before = _snapshot(trainer.model)
    trainer.train()
    assert _changed(before, trainer.model)


def test_sft_loads_the_processor_with_the_model(vlm_paths, tmp_path):
    path = vlm_paths["qwen2_vl"]
    trainer = _trainer(path, zen_image_dataset("conversational_language_modeling"), tmp_path, processor=False)
    assert type(trainer.processing_class).__name__.endswith("Qwen2VLProcessor")
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_freeze_vision_tower_leaves_the_vision_tower_unchanged(family, vlm_paths, tmp_path):
    path = vlm_paths[family]
    dataset = zen_image_dataset("conversational_language_modeling")
    trainer = _trainer(path, dataset, tmp_path, args={"freeze_vision_tower": True})
    model = trainer.model
    frozen = {name for name, _ in vision_parameters(model)}
    assert frozen and all(not param.requires_grad for _, param in vision_parameters(model))
    before = _snapshot(model)
    trainer.train()
    changed = _changed(before, model)
    assert not changed & frozen
    assert changed == {name for name, _ in unwrap_model(model).named_parameters()} - frozen


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_a_vlm_trains_the_adapters_of_the_language_model(family, vlm_paths, tmp_path):
    peft = pytest.importorskip("peft")
    path = vlm_paths[family]
    lora = peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM")
    trainer = _trainer(path, zen_image_dataset("conversational_language_modeling"), tmp_path, peft_config=lora)
    names = {name for name, _ in trainer.model.named_parameters()}
    adapters = {name for name in names if "lora_" in name}
    assert adapters and not any("lora_" in name for name, _ in vision_parameters(trainer.model))
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, param in trainer.model.named_parameters() if not torch.equal(before[name], param)}
    assert changed == {name for name in adapters if "lora_B" in name or "lora_A" in name}


def test_an_image_dataset_evaluates_raw_through_the_vision_collator(vlm_paths, tmp_path):
    path = vlm_paths["llava"]
    train = zen_image_dataset("conversational_language_modeling")
    trainer = _trainer(
        path, train, tmp_path, eval_dataset=zen_image_dataset("conversational_language_modeling", "test")
    )
    assert trainer.eval_dataset.column_names == ["messages", "image"]  # kept raw: images are processed per batch
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and "eval_mean_token_accuracy" in metrics


# ---------------------------------------------------------------------------------------------------------- masks
def _label_text(batch, tokenizer, row: int) -> str:
    labels = batch["labels"][row]
    return tokenizer.decode(labels[labels != -100])


@pytest.mark.parametrize("family", FAMILIES)
def test_completion_only_loss_trains_on_the_completion_and_nothing_of_the_prompt(family, vlm_paths, tmp_path):
    path = vlm_paths[family]
    dataset = zen_image_dataset("conversational_prompt_completion")
    trainer = _trainer(path, dataset, tmp_path)
    tokenizer = trainer.processing_class.tokenizer
    rows = [dict(dataset[i]) for i in range(3)]
    batch = trainer.data_collator(rows)
    for i, row in enumerate(rows):
        completion = row["completion"][0]["content"]
        assert _label_text(batch, tokenizer, i).strip() == completion + tokenizer.eos_token
        real = batch["attention_mask"][i].bool()
        trained = batch["labels"][i] != -100
        # The trained tokens are the sequence's last real ones, one run: the prompt (image tokens included) is off.
        last = int(real.nonzero().max())
        first = int(trained.nonzero().min())
        assert trained[first : last + 1].all() and not trained[:first].any() and not trained[last + 1 :].any()
    off = DataCollatorForVisionLanguageModeling(trainer.processing_class, completion_only_loss=False)(rows)
    assert torch.equal(off["labels"] != -100, off["attention_mask"].bool())  # every real token, prompt included


@pytest.mark.parametrize("family", FAMILIES)
def test_assistant_only_loss_trains_on_the_assistant_turns_only(family, vlm_paths, tmp_path):
    path = vlm_paths[family]
    dataset = zen_image_dataset("conversational_language_modeling", images_per_row=2)
    trainer = _trainer(path, dataset, tmp_path, args={"assistant_only_loss": True})
    tokenizer = trainer.processing_class.tokenizer
    rows = [dict(dataset[i]) for i in range(3)]
    batch = trainer.data_collator(rows)
    for i, row in enumerate(rows):
        expected = "".join(m["content"] + tokenizer.eos_token for m in row["messages"] if m["role"] == "assistant")
        assert _label_text(batch, tokenizer, i) == expected
    before = _snapshot(trainer.model)
    trainer.train()
    assert _changed(before, trainer.model)


# ------------------------------------------------------------------------------------------------------ bad input
def test_an_image_column_with_a_text_only_model_names_the_column_and_the_fix(tiny_model_path, tmp_path):
    dataset = zen_image_dataset("conversational_language_modeling")
    with pytest.raises(ValueError, match="vision-related.*vision-language model") as error:
        SFTTrainer(model=tiny_model_path, args=_args(tmp_path), train_dataset=dataset)
    assert "'image' column" in str(error.value) and "remove_columns('image')" in str(error.value)


def test_a_vlm_given_a_tokenizer_for_image_data_asks_for_its_processor(vlm_paths, tmp_path):
    path = vlm_paths["llava"]
    tokenizer = get_tiny_vlm_processor(path).tokenizer
    dataset = zen_image_dataset("conversational_language_modeling")
    with pytest.raises(ValueError, match="cannot process them. Pass the model's processor"):
        SFTTrainer(model=path, args=_args(tmp_path), train_dataset=dataset, processing_class=tokenizer)


def test_an_image_that_fails_to_decode_names_the_row_before_training(vlm_paths, tmp_path):
    dataset = _with_row(zen_image_dataset("conversational_language_modeling"), 3, image={"bytes": b"not a png"})
    with pytest.raises(ValueError, match=r"Row 3 of the train dataset: the image in column 'image' cannot be decoded"):
        _trainer(vlm_paths["qwen2_vl"], dataset, tmp_path)
    eval_dataset = _mixed_multi_image("conversational_prompt_completion")
    eval_dataset = _with_row(eval_dataset, 2, images=[make_images(1)[0], {"bytes": b"\x89PNG broken"}])
    with pytest.raises(ValueError, match=r"Row 2 of the eval dataset: the image in column 'images'"):
        _trainer(
            vlm_paths["qwen2_vl"],
            zen_image_dataset("conversational_prompt_completion"),
            tmp_path,
            eval_dataset=eval_dataset,
        )


def test_more_image_placeholders_than_images_names_the_row(vlm_paths, tmp_path):
    dataset = zen_image_dataset("conversational_language_modeling")
    row = dataset[4]
    two_slots = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": row["messages"][0]["content"]}]
    answer = [{"type": "text", "text": row["messages"][1]["content"]}]
    structured = [{"role": "user", "content": two_slots}, {"role": "assistant", "content": answer}]
    rows = [{"messages": structured, "image": image} for image in make_images(len(dataset))]
    with pytest.raises(ValueError, match=r"Row 0 of the train dataset: column 'messages' has 2 image placeholders"):
        _trainer(vlm_paths["llava"], Dataset.from_list(rows), tmp_path)
    # The processor's image token written into the text counts too.
    extra = _with_row(dataset, 5, messages=[{"role": "user", "content": "<image> and"}, row["messages"][1]])
    with pytest.raises(ValueError, match=r"Row 5 of the train dataset: column 'messages' has 2 image placeholders"):
        _trainer(vlm_paths["llava"], extra, tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"packing": True, "max_length": 64}, "Packing is not supported for vision datasets"),
        ({"padding_free": True}, "Padding-free training is not supported for vision datasets"),
        ({"max_length": 64, "truncation_mode": "keep_end"}, "truncation_mode='keep_end' is not supported"),
        ({"completion_only_loss": True}, "`completion_only_loss=True` needs prompt-completion rows"),
    ],
)
def test_options_that_cannot_work_with_images_are_refused_before_loading(overrides, message, tmp_path):
    dataset = zen_image_dataset("conversational_language_modeling")
    with pytest.raises(ValueError, match=message):
        SFTTrainer(model="never/loaded", args=_args(tmp_path, **overrides), train_dataset=dataset)


# ---------------------------------------------------------------------------------- row_images, check_vision_dataset
def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_row_images_decodes_every_cell_layout(tmp_path):
    image = make_images(1)[0]
    file = tmp_path / "image.png"
    image.save(file)
    layouts = [image, _png(image), {"bytes": _png(image), "path": None}, {"bytes": None, "path": str(file)}, str(file)]
    for cell in layouts:
        (decoded,) = row_images({"image": cell}, 0)
        assert decoded.size == image.size and list(decoded.convert("RGB").getdata()) == list(image.getdata())
    assert len(row_images({"images": [image, str(file)]}, 0)) == 2
    assert row_images({"image": None}, 0) == [] and row_images({"images": []}, 0) == []
    assert row_images({"messages": []}, 0) == []
    with pytest.raises(ValueError, match=r"Row 7 of the eval dataset: the image in column 'images' cannot be decoded"):
        row_images({"images": [image, str(tmp_path / "missing.png")]}, 7, "eval")
    with pytest.raises(ValueError, match=r"Row 1 of the train dataset: column 'images' holds a missing image"):
        row_images({"images": [None]}, 1)


def test_check_vision_dataset_reads_the_layouts_and_names_the_bad_row():
    check = dict(model_is_vlm=True, message_columns=["messages", "prompt", "completion"], trainer="SFTTrainer")
    assert check_vision_dataset(zen_image_dataset("conversational_prompt_completion", images_per_row=3), **check)
    assert not check_vision_dataset(Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}]), **check)
    image = make_images(1)[0]
    user = {"role": "user", "content": "Describe."}
    assistant = [{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "A cat."}]}]
    completion_slot = Dataset.from_list([{"prompt": [user], "completion": assistant, "image": image}])
    with pytest.raises(
        ValueError, match=r"Row 0 .* column 'completion' has 1 image placeholders.*only column 'prompt'"
    ):
        check_vision_dataset(completion_slot, **check)
    slot_only = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    too_few = Dataset.from_list([{"prompt": slot_only, "images": [image, image]}])
    with pytest.raises(ValueError, match=r"Row 0 .* holds 2 images but column 'prompt' has only 1 image placeholders"):
        check_vision_dataset(too_few, **check)
    both = Dataset.from_list([{"messages": [user], "image": image, "images": [image]}])
    with pytest.raises(ValueError, match="both an 'image' and an 'images' column"):
        check_vision_dataset(both, **check)
    text = Dataset.from_list([{"text": "<image><image> two", "images": [image]}])
    with pytest.raises(ValueError, match=r"Row 0 .* column 'text' has 2 image placeholders"):
        check_vision_dataset(text, **{**check, "message_columns": ["text"]}, image_token="<image>")

    def stream():
        yield {"messages": [user], "image": {"bytes": b"junk", "path": None}}

    with pytest.raises(ValueError, match=r"Row 0 of the train dataset: the image in column 'image'"):
        check_vision_dataset(IterableDataset.from_generator(stream), **check)
