"""Vision-language models: the tiny offline stand-ins of every family, recognising a VLM, freezing its vision tower,
LoRA on its language model, loading with the right class and processor, and checkpoints that reload as a VLM."""

import copy
import json
import os
import typing

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from llm_trainer.modeling import language_model_lora_targets, load_model, prepare_processing_class, wrap_with_peft
from llm_trainer.models.vision import (
    VISION_PARTS,
    freeze_vision_tower,
    is_vision_model,
    language_model,
    load_processor,
    vision_parameters,
)
from llm_trainer.testing import VLMFamily, make_images, make_tiny_vlm

FAMILIES = list(typing.get_args(VLMFamily))
# Processors that insert text after the chat template renders (Idefics2 expands `<image>` without correcting the
# character offsets; PaliGemma puts `<bos>` after the last image), so transformers' assistant mask is shifted.
SHIFTED_ASSISTANT_MASK = {"idefics2", "paligemma"}


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory):
    """`make_tiny_vlm(family)`, built once per family for the module."""
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = make_tiny_vlm(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


def _image_token_id(config) -> int:
    value = getattr(config, "image_token_id", None)
    return value if value is not None else config.image_token_index


def _conversation(images: int, answer: str = "A cat.") -> list[dict]:
    parts = [{"type": "image"}] * images + [{"type": "text", "text": "What is in the picture?"}]
    return [
        {"role": "user", "content": parts},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def test_every_builder_is_a_named_family():
    from llm_trainer.testing_vlm import VLM_BUILDERS

    assert sorted(VLM_BUILDERS) == sorted(FAMILIES)
    with pytest.raises(ValueError, match="Unknown VLM family 'nope'"):
        make_tiny_vlm("nope")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_offline_and_runs_forward_and_generate(family, vlm_path):
    path = vlm_path(family)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = load_processor(path)
    assert is_vision_model(model)
    assert model.config.architectures == [type(model).__name__]

    # One placeholder per image part; a row with two images next to a row with one.
    two = processor.apply_chat_template(_conversation(2), tokenize=False)
    assert two.count(processor.image_token) == 2
    prompt = processor.apply_chat_template(_conversation(1)[:1], tokenize=False, add_generation_prompt=True)
    images = make_images(3, seed=1)
    batch = processor(text=[two, prompt], images=[images[:2], images[2:]], return_tensors="pt", padding=True)
    image_tokens = (batch["input_ids"] == _image_token_id(model.config)).sum(-1)
    assert (image_tokens > 0).all() and image_tokens[0] > image_tokens[1]

    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()

    single = processor(text=[prompt], images=[images[2:]], return_tensors="pt")
    new = 3
    out = model.generate(**single, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert out.shape == (1, single["input_ids"].shape[1] + new)


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(f, marks=pytest.mark.xfail(reason="the processor shifts transformers' offsets", strict=False))
        if f in SHIFTED_ASSISTANT_MASK
        else f
        for f in FAMILIES
    ],
)
def test_chat_template_marks_the_assistant_answer(family, vlm_path):
    processor = load_processor(vlm_path(family))
    conversation = _conversation(1, answer="A red cat.")
    conversation[0]["content"][0] = {"type": "image", "image": make_images(1)[0]}
    out = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    answer = processor.tokenizer.decode([i for i, m in zip(ids, mask) if m])
    thinking = "<think>\n\n</think>\n\n" if family == "qwen3_5_think" else ""  # an empty reasoning block
    assert answer == thinking + "A red cat." + processor.tokenizer.eos_token


def test_qwen_and_smolvlm_processors_load_images_only_without_their_video_processor(vlm_path):
    for family, name in [
        ("qwen2_vl", "Qwen2VLProcessor"),
        ("qwen3_vl", "Qwen3VLProcessor"),
        ("smolvlm", "SmolVLMProcessor"),
    ]:
        path = vlm_path(family)
        with open(os.path.join(path, "processor_config.json")) as f:
            assert json.load(f)["processor_class"] == name  # reloads as the family's class where it can
        processor = load_processor(path)
        assert name in [cls.__name__ for cls in type(processor).__mro__]
        assert processor.video_processor is None


@pytest.mark.parametrize("family", FAMILIES)
def test_token_logprob_head_on_the_language_model_matches_the_logits(family, vlm_path):
    """The fused head runs the VLM's backbone (vision tower included) and projects its hidden states chunk by chunk:
    the same log-probs as the full logits, without building them."""
    from llm_trainer.modeling import _splittable, add_token_logprob_head

    model = AutoModelForImageTextToText.from_pretrained(vlm_path(family)).eval()
    processor = load_processor(vlm_path(family))
    text = processor.apply_chat_template(_conversation(1), tokenize=False)
    images = [[image] for image in make_images(2)]
    batch = processor(text=[text, text], images=images, return_tensors="pt", padding=True)
    batch.pop("labels", None)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1].float()
        expected = logits.log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        add_token_logprob_head(model)
        out = model(**batch, labels=labels, token_logprobs=True)
    assert _splittable(model)  # the plain-linear-head route, not the logits fallback
    mask = out.label_mask
    # float32 rounding of a log-softmax over a few hundred logits of size ~|log p|: tens of ulps of the values.
    tolerance = 64 * torch.finfo(torch.float32).eps * expected[mask].abs().max()
    torch.testing.assert_close(out.log_probs[mask], expected[mask], rtol=0, atol=tolerance.item())


def test_hub_processor_falls_back_to_images_only_when_autoprocessor_cannot_build_it(vlm_path, tmp_path, monkeypatch):
    """A Hub id (here served from a local Hub cache, offline) whose video processor needs torchvision."""
    import shutil

    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        pytest.skip("torchvision is installed: AutoProcessor builds the full processor")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    revision = "0" * 40
    repo = tmp_path / "models--tiny-org--qwen2-vl"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(vlm_path("qwen2_vl"), repo / "snapshots" / revision)
    processor = load_processor("tiny-org/qwen2-vl", cache_dir=str(tmp_path))
    assert "Qwen2VLProcessor" in [cls.__name__ for cls in type(processor).__mro__]
    assert processor.chat_template == load_processor(vlm_path("qwen2_vl")).chat_template


def test_is_vision_model_on_models_configs_and_wrappers(vlm_path, tiny_model_path):
    from peft import LoraConfig, get_peft_model

    vlm = AutoModelForImageTextToText.from_pretrained(vlm_path("llava"))
    text = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert is_vision_model(vlm) and is_vision_model(vlm.config)
    assert not is_vision_model(text) and not is_vision_model(text.config) and not is_vision_model(None)
    assert is_vision_model(get_peft_model(copy.deepcopy(vlm), LoraConfig(target_modules="all-linear")))
    assert not is_vision_model(get_peft_model(text, LoraConfig(target_modules=["q_proj"])))
    assert is_vision_model(torch.nn.DataParallel(vlm))


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "llava_next", "idefics3", "gemma3", "gemma4"])
def test_freeze_vision_tower_freezes_encoder_and_projector_only(family, vlm_path):
    model = AutoModelForImageTextToText.from_pretrained(vlm_path(family))
    inner = model.model
    vision = [getattr(inner, name) for name in VISION_PARTS if isinstance(getattr(inner, name, None), torch.nn.Module)]
    expected = sum(p.numel() for module in vision for p in module.parameters())
    expected += inner.image_newline.numel() if hasattr(inner, "image_newline") else 0
    assert freeze_vision_tower(model) == expected > 0
    decoder_ids = {id(p) for p in language_model(model).parameters()}
    for name, param in model.named_parameters():
        frozen = any(part in VISION_PARTS for part in name.split(".")) or name.endswith("image_newline")
        assert param.requires_grad is not frozen, name
        if not frozen and "lm_head" not in name:
            assert id(param) in decoder_ids, name  # everything left trainable is the language model or its head


def test_freeze_vision_tower_refuses_a_text_only_model(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match="freeze_vision_tower=True needs a vision-language model"):
        freeze_vision_tower(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_language_model_is_the_decoder(family, vlm_path):
    model = AutoModelForImageTextToText.from_pretrained(vlm_path(family))
    decoder = language_model(model)
    names = {name for name, module in model.named_modules() if module is decoder}
    assert names and all(name.split(".")[-1] in ("language_model", "text_model") for name in names)
    assert not any(part in VISION_PARTS for part in names.pop().split("."))
    assert decoder.get_input_embeddings() is model.get_input_embeddings()


@pytest.mark.parametrize("targets", [None, "all-linear"])
@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "idefics3", "gemma3"])
def test_lora_default_targets_are_the_language_model_linear_layers(family, targets, vlm_path):
    from peft import LoraConfig

    model = AutoModelForImageTextToText.from_pretrained(vlm_path(family))
    decoder = language_model(model)
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    decoder_linear = {f"{prefix}.{n}" for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)}
    config = LoraConfig(r=2, target_modules=targets)
    peft_model = wrap_with_peft(model, config, gradient_checkpointing=False)
    assert config.target_modules == targets  # the caller's config is untouched
    adapted = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), torch.nn.Linear)
    }
    assert adapted == decoder_linear
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert not any(part in VISION_PARTS for name in trainable for part in name.split("."))


def test_explicit_lora_targets_are_used_as_given(vlm_path):
    from peft import LoraConfig

    model = AutoModelForImageTextToText.from_pretrained(vlm_path("llava"))
    peft_model = wrap_with_peft(model, LoraConfig(r=2, target_modules=["q_proj"]), gradient_checkpointing=False)
    adapted = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert any("vision_tower" in name for name in adapted) and any("language_model" in name for name in adapted)


def test_language_model_lora_targets_is_a_regex_over_the_decoder(vlm_path):
    import re

    model = AutoModelForImageTextToText.from_pretrained(vlm_path("qwen2_vl"))
    pattern = language_model_lora_targets(model)
    assert re.fullmatch(pattern, "model.language_model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(pattern, "model.visual.blocks.0.attn.qkv")
    assert not re.fullmatch(pattern, "lm_head")


def test_vlm_folder_loads_with_its_own_class(vlm_path, tmp_path):
    path = vlm_path("idefics3")
    assert type(load_model(path)).__name__ == "Idefics3ForConditionalGeneration"
    # Asked for as a causal LM (e.g. by a text trainer's loader), it still loads as the VLM.
    assert type(load_model(path, AutoModelForCausalLM)).__name__ == "Idefics3ForConditionalGeneration"
    # Without `architectures` in its config: AutoModelForImageTextToText picks the class.
    model = AutoModelForImageTextToText.from_pretrained(path)
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    config.pop("architectures")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    assert type(load_model(str(tmp_path))).__name__ == "Idefics3ForConditionalGeneration"


def test_prepare_processing_class_loads_the_vlm_processor(vlm_path):
    from types import SimpleNamespace

    for family in ("qwen2_5_vl", "gemma3"):
        model = AutoModelForImageTextToText.from_pretrained(vlm_path(family))
        processor = prepare_processing_class(model, None, SimpleNamespace(model_init_kwargs=None))
        assert hasattr(processor, "image_processor") and processor.tokenizer.pad_token is not None
        given = load_processor(vlm_path(family))
        assert prepare_processing_class(model, given, SimpleNamespace()) is given


def test_vision_parameters_include_adapters_on_the_tower(vlm_path):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForImageTextToText.from_pretrained(vlm_path("llava"))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    names = [name for name, _ in vision_parameters(peft_model)]
    assert any("lora_A" in name and "vision_tower" in name for name in names)
    freeze_vision_tower(peft_model)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in name for name in trainable)


def test_trained_vlm_checkpoint_reloads_as_a_vlm_with_its_processor(vlm_path, tmp_path):
    from llm_trainer import SFTConfig, SFTTrainer
    from llm_trainer.testing import zen_image_dataset

    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        save_steps=1,
        learning_rate=1e-2,
        report_to=[],
        freeze_vision_tower=True,
    )
    dataset = zen_image_dataset("conversational_language_modeling").select(range(2))
    trainer = SFTTrainer(model=vlm_path("qwen2_vl"), args=args, train_dataset=dataset)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and not any(".visual." in name for name in changed)  # the frozen tower did not move
    assert any(".language_model." in name for name in changed)

    checkpoint = tmp_path / "checkpoint-1"
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    processor = load_processor(checkpoint)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert "Qwen2VLProcessor" in [c.__name__ for c in type(processor).__mro__]
    assert processor.chat_template == trainer.processing_class.chat_template
    for name, param in model.named_parameters():
        assert torch.equal(param, trainer.model.state_dict()[name]), name

    card = (tmp_path / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "- vision-language-model" in card
    assert 'pipeline("image-text-to-text"' in card and "text-generation" not in card


def test_resuming_a_vlm_run_loads_the_checkpoint_weights(vlm_path, tmp_path):
    """transformers' resume loads a VLM checkpoint's (converted) key names into nothing; ours reads them through
    `from_pretrained`, so a resumed run ends where the uninterrupted one does."""
    from llm_trainer import SFTConfig, SFTTrainer
    from llm_trainer.testing import zen_image_dataset

    dataset = zen_image_dataset("conversational_language_modeling").select(range(6))

    def run(output_dir, max_steps, resume=None):
        args = SFTConfig(
            output_dir=str(output_dir),
            max_steps=max_steps,
            per_device_train_batch_size=2,
            save_steps=2,
            learning_rate=1e-2,
            lr_scheduler_type="constant",  # the 2-step run's schedule is then the 3-step run's
            report_to=[],
            seed=3,
        )
        trainer = SFTTrainer(model=vlm_path("llava"), args=args, train_dataset=dataset)
        trainer.train(resume_from_checkpoint=resume)
        return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}

    straight = run(tmp_path / "straight", 3)
    run(tmp_path / "first", 2)
    resumed = run(tmp_path / "first", 3, resume=str(tmp_path / "first" / "checkpoint-2"))
    for name, param in straight.items():
        scale = param.abs().max().item() + 1.0
        assert torch.allclose(resumed[name], param, rtol=0, atol=1e-5 * scale), name
    initial = AutoModelForImageTextToText.from_pretrained(vlm_path("llava")).state_dict()
    assert any(not torch.equal(initial[name], resumed[name]) for name in initial if name in resumed)


def test_trainer_takes_a_vlm_instance_with_its_processor(vlm_path, tmp_path):
    from llm_trainer import SFTConfig, SFTTrainer
    from llm_trainer.testing import zen_image_dataset

    model = AutoModelForImageTextToText.from_pretrained(vlm_path("gemma3"))
    processor = load_processor(vlm_path("gemma3"))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], freeze_vision_tower=True)
    dataset = zen_image_dataset("conversational_language_modeling").select(range(2))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    assert trainer.model is model and trainer.processing_class is processor
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())


def test_freeze_vision_tower_on_a_text_model_fails_before_training(tiny_model_path, tmp_path):
    from llm_trainer import SFTConfig, SFTTrainer
    from llm_trainer.testing import zen_dataset

    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], freeze_vision_tower=True)
    with pytest.raises(ValueError, match="Set freeze_vision_tower=False"):
        SFTTrainer(model=tiny_model_path, args=args, train_dataset=zen_dataset("conversational_language_modeling"))


def test_text_model_card_keeps_the_text_generation_pipeline(tiny_model_path, tmp_path):
    from llm_trainer import SFTConfig, SFTTrainer
    from llm_trainer.testing import zen_dataset

    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[])
    trainer = SFTTrainer(
        model=tiny_model_path, args=args, train_dataset=zen_dataset("conversational_language_modeling")
    )
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "image-text-to-text" not in card and "vision-language-model" not in card
    assert 'pipeline("text-generation"' in card


@pytest.mark.parametrize("trainer_name", ["SFT", "DPO", "KTO"])
def test_a_vlm_lets_ddp_find_unused_parameters(trainer_name, vlm_path, tmp_path):
    """A batch without images leaves the vision tower without gradients: every VLM trainer sets TRL's
    `ddp_find_unused_parameters=True` (unless the user chose), a text model keeps transformers' default."""
    import llm_trainer
    from llm_trainer.testing import make_tiny_model, zen_dataset

    config = {"SFT": "conversational_language_modeling", "DPO": "conversational_preference"}
    data = zen_dataset(config.get(trainer_name, "conversational_unpaired_preference"))
    config_cls = getattr(llm_trainer, f"{trainer_name}Config")
    trainer_cls = getattr(llm_trainer, f"{trainer_name}Trainer")
    for model, expected in [(vlm_path("qwen2_vl"), True), (make_tiny_model(tmp_path / "text"), None)]:
        args = config_cls(output_dir=str(tmp_path / "out"), report_to=[], max_steps=1)
        trainer = trainer_cls(model=model, args=args, train_dataset=data)
        assert trainer.args.ddp_find_unused_parameters is expected
    args = config_cls(output_dir=str(tmp_path / "out"), report_to=[], ddp_find_unused_parameters=False)
    assert (
        trainer_cls(model=vlm_path("qwen2_vl"), args=args, train_dataset=data).args.ddp_find_unused_parameters is False
    )
