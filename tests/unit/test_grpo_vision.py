"""GRPO and RLOO on vision-language models: training on image prompts (Qwen2-VL and LLaVA stand-ins), the images
reaching the reward functions, multi-image rows and rows without images, the per-image tensors following their rows
through shuffles and micro-batches, the fused log-prob head, LoRA, a frozen vision tower, and the errors raised
before training."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset

from llm_trainer import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from llm_trainer.generation.base import GenerationResult, Generator, VisionInputs
from llm_trainer.generation.loop import OnlineBatch, completion_logps, tokenize_vision_prompts
from llm_trainer.testing import get_tiny_vlm_processor, make_images, make_tiny_vlm, zen_dataset, zen_image_dataset

FAMILIES = ["qwen2_vl", "llava"]


@pytest.fixture(scope="module")
def vlm_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {family: make_tiny_vlm(family, root / family) for family in FAMILIES}


def _config(config_class, tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path),
        "report_to": "none",
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 4,
        "learning_rate": 1e-1,
        "logging_steps": 1,
        "save_strategy": "no",
        "bf16": False,
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "seed": 3,
        **overrides,
    }
    return config_class(**values)


class ImageSpy:
    """A reward function that records the image keywords it gets and scores by completion length."""

    __name__ = "image_spy"

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, prompts, completions, **kwargs):
        self.calls.append({"prompts": prompts, **{k: kwargs[k] for k in ("image", "images") if k in kwargs}})
        return [len(c[0]["content"]) / 10 for c in completions]


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("trainer_name", ["GRPO", "RLOO"])
def test_trains_on_image_prompts_and_rewards_see_the_images(trainer_name, family, vlm_paths, tmp_path):
    trainer_class, config_class = {"GRPO": (GRPOTrainer, GRPOConfig), "RLOO": (RLOOTrainer, RLOOConfig)}[trainer_name]
    spy = ImageSpy()
    dataset = zen_image_dataset("conversational_prompt_only")
    trainer = trainer_class(
        model=vlm_paths[family],
        reward_funcs=[spy],
        args=_config(config_class, tmp_path, beta=0.04),
        train_dataset=dataset,
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = _changed(before, trainer.model)
    assert any("language_model" in name or "lm_head" in name for name in changed)
    assert any(part in name for name in changed for part in ("visual", "vision_tower", "multi_modal_projector"))
    call = spy.calls[0]
    assert len(call["image"]) == 4 and all(hasattr(image, "size") for image in call["image"])
    # the prompts the reward functions get carry the row's image in their content, as TRL's do
    first = call["prompts"][0][0]["content"]
    assert [part["type"] for part in first] == ["image", "text"] and first[0]["image"].size == call["image"][0].size
    logged = trainer.state.log_history[0]
    assert {"kl", "entropy", "reward"} <= logged.keys() and torch.isfinite(torch.tensor(logged["loss"]))
    assert trainer.args.ddp_find_unused_parameters  # a batch without images leaves the vision tower unused (TRL's)
    assert trainer.generator.suppress_token_ids == [trainer.model.config.image_token_id]  # never sampled (TRL's)


def test_multi_image_rows_and_rows_without_images(vlm_paths, tmp_path):
    spy = ImageSpy()
    rows = zen_image_dataset("conversational_prompt_only", images_per_row=2).to_list()[:4]
    for row in rows[1::2]:
        row["images"] = []  # rows without images, in the same generation batch as rows with two
    trainer = GRPOTrainer(
        model=vlm_paths["qwen2_vl"],
        reward_funcs=[spy],
        # 8 completions: every row, twice; the completions table is written (prompts without their images)
        args=_config(GRPOConfig, tmp_path, gradient_accumulation_steps=2, log_completions=True),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows),
    )
    trainer.train()
    assert sorted(len(images) for images in spy.calls[0]["images"]) == [0] * 4 + [2] * 4
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    metrics = trainer.evaluate()
    assert "eval_reward" in metrics and len(spy.calls) > 1
    import pandas as pd

    table = pd.read_parquet(tmp_path / "completions" / "completions_00001.parquet")
    assert len(table) == 8 and "'type': 'image'" in table["prompt"][0] and "PIL" not in table["prompt"][0]
    assert len(trainer._logs["images"]) == 8  # log_multimodal (TRL's default): the rows' images, for trackers


def _qwen_inputs(vlm_paths, rows: int = 6):
    from llm_trainer.data.formats import prepare_multimodal_messages

    processor = get_tiny_vlm_processor(vlm_paths["qwen2_vl"])
    images = make_images(2 * rows, seed=4)
    counts = [i % 3 for i in range(rows)]  # 0, 1 or 2 images a row
    prompts, used = [], 0
    for count in counts:
        prompts.append(prepare_multimodal_messages([{"role": "user", "content": "hi"}], images[used : used + count]))
        used += count
    return tokenize_vision_prompts(processor, prompts, {})


def test_split_and_rejoin_keep_each_rows_images(vlm_paths):
    prompt_ids, vision = _qwen_inputs(vlm_paths)
    assert vision.num_images == [0, 1, 2, 0, 1, 2]
    assert vision.tensors["pixel_values"].size(0) == vision.tensors["image_grid_thw"].prod(-1).sum()
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    shuffled = vision.select(order)
    assert shuffled.num_images == [vision.num_images[i] for i in order]
    for position, row in enumerate(order.tolist()):  # each row, alone, has the same tensors before and after
        a, b = vision.select([row]), shuffled.select([position])
        assert a.tensors.keys() == b.tensors.keys()
        for key in a.tensors:
            assert torch.equal(a.tensors[key], b.tensors[key])
        for key in a.token_types:
            assert torch.equal(a.token_types[key], b.token_types[key])
    back = shuffled.select(torch.argsort(order))
    for key, value in vision.tensors.items():
        assert torch.equal(back.tensors[key], value)
    # a micro-batch without images passes no image tensors to the model, only the (text) token types
    empty = vision.select([0, 3]).model_kwargs(width=vision.token_types["mm_token_type_ids"].size(1) + 5)
    assert "pixel_values" not in empty and empty["mm_token_type_ids"].abs().sum() == 0


def test_llava_one_row_per_image_split(vlm_paths):
    from llm_trainer.data.formats import prepare_multimodal_messages

    processor = get_tiny_vlm_processor(vlm_paths["llava"])
    images = make_images(3, seed=1)
    prompts = [prepare_multimodal_messages([{"role": "user", "content": "hi"}], [image]) for image in images]
    _, vision = tokenize_vision_prompts(processor, prompts, {})
    assert vision.tensors["pixel_values"].size(0) == 3
    picked = vision.select([2, 0])
    assert torch.equal(picked.tensors["pixel_values"], vision.tensors["pixel_values"][[2, 0]])


def test_buffered_batch_with_images_survives_a_checkpoint(vlm_paths, tmp_path):
    prompt_ids, vision = _qwen_inputs(vlm_paths, rows=3)
    width = max(len(ids) for ids in prompt_ids)
    batch = OnlineBatch(
        torch.zeros(3, width, dtype=torch.long),
        torch.ones(3, width, dtype=torch.long),
        torch.zeros(3, 2, dtype=torch.long),
        torch.ones(3, 2, dtype=torch.long),
        vision=vision,
    )
    path = os.path.join(tmp_path, "buffer.pt")
    torch.save(batch.state(), path)
    loaded = OnlineBatch.from_state(torch.load(path, weights_only=True))
    assert loaded.vision.num_images == vision.num_images
    for key, value in vision.tensors.items():
        assert torch.equal(loaded.vision.tensors[key], value)


def test_log_probs_use_the_fused_head_on_the_language_model(vlm_paths, monkeypatch):
    """The completion log-probs of a VLM come from its backbone and the fused head: the class forward (which builds
    batch x length x vocab logits) is never called, and the values match log-softmax of the full logits."""
    from transformers import AutoModelForImageTextToText

    from llm_trainer.modeling import add_token_logprob_head

    model = AutoModelForImageTextToText.from_pretrained(vlm_paths["qwen2_vl"]).eval()
    prompt_ids, vision = _qwen_inputs(vlm_paths, rows=3)
    width = max(len(ids) for ids in prompt_ids)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompt_ids):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1
    completion = torch.randint(10, 100, (3, 4))
    batch = OnlineBatch(ids, mask, completion, torch.ones(3, 4, dtype=torch.long), vision=vision)
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_kwargs()).logits
    expected = torch.log_softmax(full[:, width - 1 : -1].float(), -1).gather(-1, completion[..., None])[..., 0]
    add_token_logprob_head(model, outputs=("entropy",))
    cls = type(model)
    monkeypatch.setattr(cls, "forward", lambda *a, **k: pytest.fail("the full-logits forward ran"))
    with torch.no_grad():
        logps, entropies, _ = completion_logps(model, batch, batch_size=2, entropy=True)
    torch.testing.assert_close(logps, expected, rtol=1e-4, atol=1e-5)  # float32 log-softmax of O(10) logits
    assert entropies.shape == (3, 4)


def test_lora_and_frozen_vision_tower(vlm_paths, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=vlm_paths["qwen2_vl"],
        reward_funcs=[ImageSpy()],
        args=_config(GRPOConfig, tmp_path, beta=0.04, log_multimodal=False),
        train_dataset=zen_image_dataset("conversational_prompt_only"),
        peft_config=lora,
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = _changed(before, trainer.model)
    assert changed and all("lora_" in name for name in changed)
    assert "kl" in trainer.state.log_history[0] and len(trainer._logs["images"]) == 0
    assert trainer.generator.suppress_token_ids == [trainer.model.config.image_token_id]

    frozen = GRPOTrainer(
        model=vlm_paths["llava"],
        reward_funcs=[ImageSpy()],
        args=_config(GRPOConfig, tmp_path / "frozen", freeze_vision_tower=True),
        train_dataset=zen_image_dataset("conversational_prompt_only"),
    )
    before = {name: p.detach().clone() for name, p in frozen.model.named_parameters()}
    frozen.train()
    changed = _changed(before, frozen.model)
    assert changed and not any("vision_tower" in n or "multi_modal_projector" in n for n in changed)


class TextOnlyGenerator(Generator):
    def generate(self, prompt_ids):
        return GenerationResult([[1] for _ in prompt_ids])


def test_a_back_end_without_images_is_refused_before_training(vlm_paths, tmp_path, monkeypatch):
    import llm_trainer.generation as generation

    monkeypatch.setattr(generation, "make_generator", lambda *args, **kwargs: TextOnlyGenerator())
    with pytest.raises(ValueError, match="cannot generate from images"):
        GRPOTrainer(
            model=vlm_paths["qwen2_vl"],
            reward_funcs=[ImageSpy()],
            args=_config(GRPOConfig, tmp_path),
            train_dataset=zen_image_dataset("conversational_prompt_only"),
        )


def test_vllm_server_and_tools_are_refused_with_images_before_loading(tmp_path):
    """`llm-trainer vllm-serve` and tool rollouts generate from text: refused before the model loads (the model
    named here does not exist, and no server runs)."""
    from llm_trainer.generation.remote import VLLMServerGenerator
    from llm_trainer.generation.transformers_backend import TransformersGenerator

    assert not VLLMServerGenerator.supports_images and TransformersGenerator.supports_images
    images = zen_image_dataset("conversational_prompt_only")
    server = _config(GRPOConfig, tmp_path, use_vllm=True, vllm_mode="server")
    with pytest.raises(ValueError, match="vllm-serve.*not images.*colocate"):
        GRPOTrainer(model="missing/model", reward_funcs=[ImageSpy()], args=server, train_dataset=images)

    def lookup(word: str) -> str:
        """Look a word up.

        Args:
            word: the word.
        """
        return word

    with pytest.raises(NotImplementedError, match="Tool calling"):
        GRPOTrainer(
            model="missing/model",
            reward_funcs=[ImageSpy()],
            args=_config(GRPOConfig, tmp_path),
            train_dataset=images,
            tools=[lookup],
        )


def test_bad_image_inputs_are_refused_naming_the_fix(vlm_paths, tiny_model_path, tmp_path):
    images = zen_image_dataset("conversational_prompt_only")
    with pytest.raises(ValueError, match="not a vision-language model"):
        RLOOTrainer(
            model=tiny_model_path, reward_funcs=[ImageSpy()], args=_config(RLOOConfig, tmp_path), train_dataset=images
        )
    plain = zen_dataset("standard_prompt_only").to_list()[: len(images)]
    for row, image in zip(plain, images["image"]):
        row["image"] = image
    with pytest.raises(ValueError, match="plain-text prompts \\(row 0\\).*conversational"):
        GRPOTrainer(
            model=vlm_paths["llava"],
            reward_funcs=[ImageSpy()],
            args=_config(GRPOConfig, tmp_path),
            train_dataset=Dataset.from_list(plain),
        )
    tokenizer = get_tiny_vlm_processor(vlm_paths["llava"]).tokenizer
    with pytest.raises(ValueError, match="processing_class"):
        GRPOTrainer(
            model=vlm_paths["llava"],
            reward_funcs=[ImageSpy()],
            args=_config(GRPOConfig, tmp_path),
            train_dataset=images,
            processing_class=tokenizer,
        )


def test_packed_forward_is_refused_for_a_vlm(vlm_paths, tmp_path):
    with pytest.raises(ValueError, match="multimodal"):
        GRPOTrainer(
            model=vlm_paths["qwen2_vl"],
            reward_funcs=[ImageSpy()],
            args=_config(GRPOConfig, tmp_path, packed_forward=True),
            train_dataset=zen_image_dataset("conversational_prompt_only"),
        )


def test_vision_inputs_refuse_a_tensor_they_cannot_split():
    vision = VisionInputs([1, 1], {"pixel_values": torch.zeros(2, 3), "odd": torch.zeros(5)})
    with pytest.raises(ValueError, match="'odd'"):
        vision.select([1])


def test_vllm_colocate_sends_each_prompts_images(monkeypatch):
    """Colocated vLLM gets each prompt's images as its multimodal data (one image as is, several as a list), one
    request per prompt; text prompts still go as runs of repeats. (A stand-in engine: vLLM is not installed here.)"""
    from types import SimpleNamespace

    from llm_trainer.generation import vllm_backend
    from llm_trainer.generation.base import SamplingConfig

    class Engine:
        def __init__(self):
            self.requests = []

        def generate(self, requests, sampling_params, use_tqdm):
            self.requests.append(requests)
            sample = SimpleNamespace(token_ids=[7], logprobs=None)
            return [SimpleNamespace(outputs=[sample] * n) for n in sampling_params]

    monkeypatch.setattr(vllm_backend, "vllm_sampling_params", lambda sampling, n, *args: n)
    generator = object.__new__(vllm_backend.VLLMColocateGenerator)
    engine = Engine()
    vars(generator).update(
        llm=engine,
        sampling=SamplingConfig(),
        eos_token_ids=[2],
        structured_outputs_regex=None,
        tp_group=None,
        enable_sleep_mode=False,
        _weights_asleep=False,
    )
    one, two = make_images(2), make_images(2, seed=1)
    result = generator.generate([[5, 6], [5, 6], [8]], images=[[one[0]], [one[0]], two])
    assert result.completion_ids == [[7]] * 3
    sent = engine.requests[0]
    assert [r["prompt_token_ids"] for r in sent] == [[5, 6], [5, 6], [8]]
    assert sent[0]["multi_modal_data"]["image"] is one[0] and sent[2]["multi_modal_data"]["image"] == two
    generator.generate([[5, 6], [5, 6]])
    assert engine.requests[1] == [{"prompt_token_ids": [5, 6]}]  # text: one request for the run of two


def test_token_budget_chunks_keep_each_rows_images(vlm_paths):
    """`max_tokens_per_batch` forwards a micro-batch in chunks of rows (padded: VLMs do not pack): each chunk gets
    its rows' images, so the loss and gradients equal the unsplit micro-batch's."""
    from transformers import AutoModelForImageTextToText

    from llm_trainer.modeling import add_token_logprob_head
    from llm_trainer.trainer.packed_rl import TokenBudget

    model = AutoModelForImageTextToText.from_pretrained(vlm_paths["qwen2_vl"])
    add_token_logprob_head(model, outputs=("entropy",))
    prompt_ids, vision = _qwen_inputs(vlm_paths, rows=4)
    width = max(len(ids) for ids in prompt_ids)
    ids, mask = torch.zeros(4, width, dtype=torch.long), torch.zeros(4, width, dtype=torch.long)
    for row, prompt in enumerate(prompt_ids):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1
    completion = torch.randint(10, 100, (4, 3), generator=torch.Generator().manual_seed(0))
    batch = OnlineBatch(ids, mask, completion, torch.ones(4, 3, dtype=torch.long), vision=vision)
    batch.old_per_token_logps = torch.zeros(4, 3)

    def objective(logps, entropies, aux):
        return -(logps * torch.arange(1.0, 5.0)[:, None]).sum() / 12

    grads = []
    for budget in (None, width + 3):
        model.zero_grad()
        forward = TokenBudget(budget, None, backward=lambda loss: loss.backward()).run(model, batch, objective)
        forward.loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    # float32 sums of the same per-row terms in another grouping: the absolute slack scales with the largest gradient
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6 * grads[0].abs().max().item())
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize(
    ("family", "images_per_row"), [("qwen2_vl", 2), ("llava", 1), ("paligemma", 1), ("idefics3", 2)]
)
def test_training_forward_scores_completions_as_they_were_sampled(family, images_per_row, tmp_path):
    """The log-prob pass (images re-sliced by row, token types extended over the completion) gives the sampler's own
    log-probs: the same images, positions and attention as generation (PaliGemma's generated tokens are its causal
    suffix: token type 1)."""
    from types import SimpleNamespace

    from transformers import AutoModelForImageTextToText

    from llm_trainer.data.formats import prepare_multimodal_messages
    from llm_trainer.generation.base import SamplingConfig
    from llm_trainer.generation.loop import GenerationLoop, Rollout, batch_images
    from llm_trainer.generation.transformers_backend import TransformersGenerator
    from llm_trainer.modeling import add_token_logprob_head

    path = make_tiny_vlm(family, tmp_path / family)
    processor = get_tiny_vlm_processor(path)
    tokenizer = processor.tokenizer
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    dataset = zen_image_dataset("conversational_prompt_only", images_per_row=images_per_row)
    rows = [dataset[i] for i in range(4)]
    images = batch_images(rows)
    prompts = [prepare_multimodal_messages(row["prompt"], images=i) for row, i in zip(rows, images)]
    prompt_ids, vision = tokenize_vision_prompts(processor, prompts, {})
    sampling = SamplingConfig(max_tokens=5, temperature=1.0)
    generator = TransformersGenerator(
        model,
        sampling,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id],
        return_logprobs=True,
    )
    torch.manual_seed(0)
    result = generator.generate(prompt_ids, images=images, vision=vision)
    args = SimpleNamespace(chat_template_kwargs={}, pad_to_multiple_of=3, seed=0, shuffle_dataset=False)
    loop = GenerationLoop(generator, processor, None, torch.device("cpu"), [tokenizer.eos_token_id], args)
    batch = loop.pad(Rollout(prompt_ids, result.completion_ids, [""] * 4, result.logprobs, vision=vision))
    add_token_logprob_head(model, outputs=())
    with torch.no_grad():
        logps = completion_logps(model, batch, batch_size=3)[0]  # a chunk of 3 rows and one of 1
    scored = batch.completion_mask.bool()
    # float32 log-softmax of the same logits computed with another batch shape: ~1e-6; a wrong image, position or
    # mask moves these tiny models' log-probs by ~1e-3
    torch.testing.assert_close(logps[scored], batch.sampling_per_token_logps[scored], rtol=0, atol=5e-5)


def test_resuming_mid_generation_batch_reuses_the_buffered_image_batch(vlm_paths, tmp_path, monkeypatch):
    """A checkpoint taken while a generation batch (with its image tensors) is being consumed holds that batch; the
    resumed run trains on it without generating."""
    args = _config(
        GRPOConfig,
        tmp_path,
        max_steps=2,
        steps_per_generation=2,  # one generation batch for two optimizer steps
        beta=0.04,
        save_strategy="steps",
        save_steps=1,
    )

    def trainer():
        dataset = zen_image_dataset("conversational_prompt_only")
        return GRPOTrainer(vlm_paths["qwen2_vl"], ImageSpy(), args=args, train_dataset=dataset)

    first = trainer()
    first.train()
    second = trainer()
    monkeypatch.setattr(second, "make_batch", lambda rows: pytest.fail("the resumed run generated"))
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    saved, used = first.generation.buffer[1], second.generation.buffer[1]
    assert used.vision.num_images == saved.vision.num_images == [1] * 4
    for key, value in saved.vision.model_kwargs().items():
        assert torch.equal(used.vision.model_kwargs()[key], value)
    assert torch.equal(used.completion_ids, saved.completion_ids)
    assert second.state.global_step == 2 and second.state.log_history[-2]["step"] == 2


def test_padded_per_row_images_are_picked_by_row(tmp_path):
    """Idefics-style processors pad the images per row (`[rows, max images, ...]`): rows of 0 and 2 images (2 in
    all, as many as rows) are still picked by row, not split as one entry per image."""
    from llm_trainer.data.formats import prepare_multimodal_messages

    processor = get_tiny_vlm_processor(make_tiny_vlm("idefics3", tmp_path / "idefics3"))
    prompts = [
        prepare_multimodal_messages([{"role": "user", "content": "hi"}], images)
        for images in ([], make_images(2, seed=5))
    ]
    _, vision = tokenize_vision_prompts(processor, prompts, {})
    assert vision.num_images == [0, 2] and vision.tensors["pixel_values"].dim() == 5
    swapped = vision.select([1, 0])
    for key, value in vision.tensors.items():
        assert torch.equal(swapped.tensors[key], value[[1, 0]])
