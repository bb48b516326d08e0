"""GRPOTrainer and RLOOTrainer parity with TRL 1.16 on vision-language models: the same tiny Qwen2-VL or LLaVA
stand-in, the same zen-image prompts with their images, processor instance, reward functions and seed through both
give the same completions, rewards and per-step losses and metrics (TRL's metric names)."""

from __future__ import annotations

import pytest

from llm_trainer.testing import get_tiny_vlm_processor, make_tiny_vlm, zen_dataset, zen_image_dataset

from .helpers import assert_same_training

trl = pytest.importorskip("trl")

# The loss (≈ 0 on-policy) averages advantage × ratio per token; advantages are group-normalized (|A| ≲ 1.5 for 4
# generations) or RLOO reward differences within ~1, so its float32 rounding is that of O(1) terms.
LOSS_SCALE = 1.0


def length_reward(completions, **kwargs):
    return [len(c[0]["content"]) / 10 for c in completions]


def image_reward(completions, prompts, **kwargs):
    """Reads the images the trainer passes: the dataset column (`image` or `images`) and the prompts' image parts."""
    column = kwargs.get("image") or kwargs.get("images") or [[] for _ in completions]
    sizes = [sum(im.size[0] for im in (row if isinstance(row, list) else [row])) for row in column]
    in_prompts = [
        sum(isinstance(part, dict) and part.get("type") == "image" for m in p for part in m["content"])
        for p in prompts
    ]
    return [size / 100 + count for size, count in zip(sizes, in_prompts)]


@pytest.fixture(scope="module")
def vlm_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {family: make_tiny_vlm(family, root / family) for family in ("qwen2_vl", "llava")}


def _train(module, trainer_name, model_path, processor, dataset, tmp_path, trainer_kwargs=None, **config):
    config = {
        "output_dir": str(tmp_path / f"{module.__name__}-{trainer_name}"),
        "report_to": "none",
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 6,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "bf16": False,
        "save_strategy": "no",
        "seed": 11,
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        **config,
    }
    trainer = getattr(module, f"{trainer_name}Trainer")(
        model=model_path,
        reward_funcs=[length_reward, image_reward],
        args=getattr(module, f"{trainer_name}Config")(**config),
        train_dataset=dataset,
        processing_class=processor,
        **(trainer_kwargs or {}),
    )
    trainer.train()
    return trainer


def _assert_parity(trainer_name, family, vlm_paths, tmp_path, images_per_row=1, trainer_kwargs=None, **config):
    import llm_trainer

    path = vlm_paths[family]
    # One processor instance for both (Qwen-VL processors load images-only here), left-padding as TRL loads it.
    processor = get_tiny_vlm_processor(path)
    processor.tokenizer.padding_side = "left"
    if images_per_row:
        dataset = zen_image_dataset("conversational_prompt_only", images_per_row=images_per_row)
    else:  # text-only prompts on a vision-language model
        dataset = zen_dataset("conversational_prompt_only")
    ours = _train(llm_trainer, trainer_name, path, processor, dataset, tmp_path, trainer_kwargs, **config)
    theirs = _train(trl, trainer_name, path, processor, dataset, tmp_path, trainer_kwargs, **config)
    assert list(ours._logs["completion"]) == list(theirs._logs["completion"])
    assert_same_training(ours, theirs, loss_scale=LOSS_SCALE)


FAMILIES = ["qwen2_vl", "llava"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "config",
    [
        {"beta": 0.04},
        # two micro-batches per generation batch of four prompts, reused twice: the batch (with its per-image
        # tensors) is shuffled and cut, rows of different images meet in a micro-batch, and old log-probs are kept
        {"num_generations": 2, "gradient_accumulation_steps": 2, "num_iterations": 2},
    ],
    ids=["kl", "shuffled-microbatches"],
)
def test_grpo_vlm_matches_trl(family, config, vlm_paths, tmp_path):
    _assert_parity("GRPO", family, vlm_paths, tmp_path, **config)


def test_grpo_multi_image_matches_trl(vlm_paths, tmp_path):
    _assert_parity(
        "GRPO", "qwen2_vl", vlm_paths, tmp_path, images_per_row=2, num_generations=2, gradient_accumulation_steps=2
    )


def test_grpo_text_prompts_on_a_vlm_match_trl(vlm_paths, tmp_path):
    _assert_parity("GRPO", "qwen2_vl", vlm_paths, tmp_path, images_per_row=0, beta=0.04)


def scripted_image_rollout(prompts, trainer):
    """A `rollout_func` that needs no sampling: the prompts (which hold their images) through the processor's chat
    template, each completion the prompt's last tokens."""
    out = trainer.processing_class.apply_chat_template(
        conversation=prompts, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    prompt_ids = [list(ids) for ids in out["input_ids"]]
    completion_ids = [ids[-(2 + i % 3) :] for i, ids in enumerate(prompt_ids)]
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_rollout_func_with_images_matches_trl(family, vlm_paths, tmp_path):
    kwargs = {"rollout_func": scripted_image_rollout}
    _assert_parity("GRPO", family, vlm_paths, tmp_path, trainer_kwargs=kwargs, beta=0.04)
