"""VLM GRPO step: peak RSS and step time, llm_trainer vs TRL 1.16 vs a minimal PyTorch loop, side by side in one run.

    python benchmarks/vlm_grpo_memory.py [--steps 3] [--warmup 1] [--batch 8] [--hidden 256] [--layers 4]
                                         [--vocab 32000] [--threads N]

The model is a Qwen2-VL stand-in: `llm_trainer.testing.make_tiny_vlm("qwen2_vl")` (its tokenizer, image processor,
chat template and image tokens) re-saved bigger, seeded: language model hidden `--hidden` (256), `--layers` (4),
4 heads, vocab `--vocab` (32000: the shipped tokenizer's ~670 ids plus unused rows, as in `grpo_step.py`); vision
tower 2 blocks of width 64 whose merger projects to the language model's width. Every runner loads that folder and
the same processor (built images-only where torchvision is missing, via `llm_trainer.models.vision.load_processor`,
and passed as `processing_class`).

Data: 16 rows of one conversational question, each with its own random 112 x 112 RGB image (16 image tokens,
seeded); equal prompt lengths because TRL 1.16 misaligns Qwen2-VL's `mm_token_type_ids` when prompts of a batch
differ in length (left-padded ids, right-padded token types: its M-RoPE pass fails with a shape mismatch).
`num_generations=4`, `--batch` completions a step (default 8: two prompts, two images), `max_completion_length=64`,
sampling at temperature 1 with `transformers`' `generate` (the four vision tokens suppressed), `beta=0`, default
loss (`dapo`), `bf16=False`, no gradient checkpointing, the same reward (the fraction of letters in the completion). The minimal loop is the
textbook step: `model.generate` with the image tensors, full logits -> `log_softmax` + gather over the completion
tokens (the image tensors passed again), group-normalised advantages, the token-level loss, backward, AdamW.

Each runner is a fresh subprocess, so its peak RSS (`ru_maxrss`) is its own; "above setup" is the peak less the
RSS once the model, processor and data are built. Prints a table, writes `results/vlm_grpo_memory.json`
(`_b<N>`, `_h<N>`, `_t<N>` suffixes for non-default settings).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from step_report import ENV, RUNNERS, emit, report, rss_mb, run_child, step_timer

NUM_GENERATIONS = 4
MAX_COMPLETION_LENGTH = 64
N_PROMPTS = 16
LEARNING_RATE = 1e-6
IMAGE_SIDE = 112  # px: 4 x 4 Qwen2-VL units, 16 image tokens an image
MAX_IMAGE_PIXELS = 16 * 28 * 28  # Qwen2-VL units of 28 x 28 px (a 14-px patch merged 2 x 2): at most 16 tokens


def build_model(path: str, hidden: int, layers: int, vocab: int) -> None:
    """Save the benchmark's Qwen2-VL stand-in (seeded) with its processor to `path`."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from llm_trainer.models.vision import load_processor
    from llm_trainer.testing import make_tiny_vlm

    make_tiny_vlm("qwen2_vl", path)
    config = json.loads((Path(path) / "config.json").read_text())
    heads = 4
    head_dim = hidden // heads
    # M-RoPE splits a head's rotary half (head_dim / 2) into temporal / height / width sections, 1 : 1.5 : 1.5.
    third = head_dim // 2 // 4
    text = {
        **config["text_config"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "layer_types": ["full_attention"] * layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2,
        "intermediate_size": 4 * hidden,
        "rope_parameters": {
            **config["text_config"]["rope_parameters"],
            "mrope_section": [head_dim // 2 - 3 * third, 3 * third // 2, 3 * third - 3 * third // 2],
        },
    }
    vision = {**config["vision_config"], "embed_dim": 64, "hidden_size": hidden, "num_heads": 4, "depth": 2}
    keep = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    bigger = Qwen2VLConfig(text_config=text, vision_config=vision, **{k: config[k] for k in keep})
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(bigger)
    model.generation_config = Qwen2VLForConditionalGeneration.from_pretrained(path).generation_config
    model.save_pretrained(path)
    processor = load_processor(path)
    processor.image_processor.size = {"shortest_edge": 4 * 28 * 28, "longest_edge": MAX_IMAGE_PIXELS}
    processor.image_processor.max_pixels = MAX_IMAGE_PIXELS
    processor.save_pretrained(path)


def vision_token_ids(model_path: str) -> list[int]:
    """The image / video / vision-start / vision-end ids, never sampled by any runner: TRL suppresses the image token
    only, and a random model that samples `<|vision_start|>` breaks Qwen2-VL's M-RoPE positions on the next pass."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return [config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")]


def letter_fraction(completions: list, **kwargs) -> list[float]:
    """The reward every runner uses: the fraction of a completion's characters that are letters."""
    texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
    return [sum(ch.isalpha() for ch in text) / max(len(text), 1) for text in texts]


def _dataset():
    """`N_PROMPTS` rows of one conversational prompt, each with its own random `IMAGE_SIDE`-px image (seeded).

    Every prompt has the same length: TRL 1.16 right-pads the processor's `mm_token_type_ids` while it left-pads the
    prompts, so prompts of different lengths put Qwen2-VL's image positions on the wrong tokens and its M-RoPE pass
    fails ("shape mismatch"); equal lengths keep TRL running.
    """
    from datasets import Dataset, Features, Image, List, Value

    from llm_trainer.testing import make_images

    prompt = [{"role": "user", "content": "What is in this picture? Answer in one sentence."}]
    images = make_images(N_PROMPTS, seed=0, min_side=IMAGE_SIDE, max_side=IMAGE_SIDE + 1)
    features = Features({"prompt": List({"role": Value("string"), "content": Value("string")}), "image": Image()})
    return Dataset.from_list([{"prompt": prompt, "image": image} for image in images], features=features)


def run_minimal(model_path: str, steps: int, warmup: int, batch: int) -> dict:
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from llm_trainer.data.formats import prepare_multimodal_messages
    from llm_trainer.models.vision import load_processor

    torch.manual_seed(42)
    processor = load_processor(model_path)
    tokenizer = processor.tokenizer
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_path)
    model.train()
    dataset = _dataset()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    groups = batch // NUM_GENERATIONS
    base = rss_mb()
    step_times, lengths = [], []
    for i in range(steps + warmup):
        rows = [dataset[(i * groups + g) % len(dataset)] for g in range(groups)]
        texts, images = [], []
        for row in rows:
            messages = prepare_multimodal_messages(row["prompt"], images=[row["image"]])
            text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            texts += [text] * NUM_GENERATIONS
            images += [[row["image"]]] * NUM_GENERATIONS
        start = time.perf_counter()
        tokenizer.padding_side = "left"
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        vision = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
        width = inputs["input_ids"].size(1)
        model.eval()
        with torch.no_grad():
            sequences = model.generate(
                **inputs,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=MAX_COMPLETION_LENGTH,
                suppress_tokens=vision_token_ids(model_path),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        model.train()
        completions = sequences[:, width:]
        is_eos = completions == tokenizer.eos_token_id
        ends = torch.where(is_eos.any(1), is_eos.int().argmax(1), completions.size(1) - 1)
        mask = (torch.arange(completions.size(1))[None] <= ends[:, None]).float()
        decoded = tokenizer.batch_decode(
            completions.masked_fill(mask == 0, tokenizer.pad_token_id), skip_special_tokens=True
        )
        rewards = torch.tensor(letter_fraction(decoded)).view(groups, NUM_GENERATIONS)
        advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1, 1)
        attention_mask = torch.cat([inputs["attention_mask"], mask.long()], 1)
        if "mm_token_type_ids" in inputs:  # M-RoPE's image positions: the prompt's, completion tokens are text (0)
            vision["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completions)], 1)
        logits = model(input_ids=sequences, attention_mask=attention_mask, **vision).logits[:, width - 1 : -1]
        logps = torch.gather(logits.log_softmax(-1), 2, completions[:, :, None]).squeeze(2)
        loss = ((-torch.exp(logps - logps.detach()) * advantages) * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_times.append(time.perf_counter() - start)
        lengths.append(mask.sum(1).mean().item())
    return {
        "step_times": step_times[warmup:],
        "base_rss_mb": base,
        "mean_completion_length": sum(lengths) / len(lengths),
    }


def run_trainer(library: str, model_path: str, steps: int, warmup: int, batch: int) -> dict:
    if library == "trl":
        from trl import GRPOConfig, GRPOTrainer
    else:
        from llm_trainer import GRPOConfig, GRPOTrainer
    from llm_trainer.models.vision import load_processor

    step_times: list[float] = []
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps + warmup,
        per_device_train_batch_size=batch,
        num_generations=NUM_GENERATIONS,
        max_completion_length=MAX_COMPLETION_LENGTH,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        use_vllm=False,
        generation_kwargs={"suppress_tokens": vision_token_ids(model_path)},
        beta=0.0,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=42,
    )
    trainer = GRPOTrainer(
        model=model_path,
        reward_funcs=letter_fraction,
        args=config,
        train_dataset=_dataset(),
        processing_class=load_processor(model_path),
        callbacks=[step_timer(step_times)],
    )
    base = rss_mb()
    trainer.train()
    logs = [log for log in trainer.state.log_history if "completions/mean_length" in log]
    return {
        "step_times": step_times[warmup:],
        "base_rss_mb": base,
        "mean_completion_length": sum(log["completions/mean_length"] for log in logs) / len(logs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help=f"completions a step, a multiple of {NUM_GENERATIONS}")
    parser.add_argument("--hidden", type=int, default=256, help="language model width (a multiple of 32)")
    parser.add_argument("--layers", type=int, default=4, help="language model layers")
    parser.add_argument("--vocab", type=int, default=32000, help="language model vocabulary rows")
    parser.add_argument("--threads", type=int, help="torch intra-op threads per runner (default: torch's choice)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--build-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch < NUM_GENERATIONS or args.batch % NUM_GENERATIONS:
        parser.error(f"--batch must be a positive multiple of num_generations ({NUM_GENERATIONS}), got {args.batch}.")
    if args.hidden % 32:
        parser.error(f"--hidden must be a multiple of 32 (4 heads, M-RoPE sections), got {args.hidden}.")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0.")
    if args.build_model:
        return build_model(args.build_model, args.hidden, args.layers, args.vocab)
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        settings = (args.model_path, args.steps, args.warmup, args.batch)
        if args.child == "minimal loop":
            return emit(run_minimal(*settings))
        return emit(run_trainer("trl" if args.child.startswith("trl") else "llm_trainer", *settings))

    shape = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab)]
    results = {}
    with tempfile.TemporaryDirectory() as model_path:
        subprocess.run(
            [sys.executable, __file__, *shape, "--build-model", model_path], env=ENV, check=True, capture_output=True
        )
        for name in RUNNERS:
            command = [sys.executable, __file__, *shape, "--child", name, "--model-path", model_path]
            command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
            command += ["--threads", str(args.threads)] if args.threads else []
            results[name] = run_child(command)
    settings = {
        "model": "qwen2_vl stand-in",
        "shape": {
            "hidden_size": args.hidden,
            "num_hidden_layers": args.layers,
            "vocab_size": args.vocab,
            "vision_depth": 2,
            "vision_embed_dim": 64,
        },
        "image_side_px": IMAGE_SIDE,
        "num_generations": NUM_GENERATIONS,
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "batch": args.batch,
        "threads": args.threads,
    }
    suffix = (
        (f"_b{args.batch}" if args.batch != 8 else "")
        + (f"_h{args.hidden}" if args.hidden != 256 else "")
        + (f"_t{args.threads}" if args.threads else "")
    )
    report("vlm_grpo_memory", "VLM GRPO step (Qwen2-VL stand-in), fp32, CPU", results, settings, suffix)
    for name, r in results.items():
        print(f"{name}: mean completion length {r['mean_completion_length']:.1f}")


if __name__ == "__main__":
    main()
