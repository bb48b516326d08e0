"""Run TRL's own test suite on real TRL and then on llm_trainer under the `trl` alias, offline, and compare.

TRL's tests load tiny models, tokenizers and datasets from the Hugging Face Hub (`trl-internal-testing/...`). With no
Hub access most of them fail even on real TRL, so this script first builds an offline stand-in cache:

* models: tiny random-weight models of the architecture the repo id names (`tiny-Qwen2ForCausalLM-2.5` ->
  `Qwen2ForCausalLM`), written in the Hub cache layout (`models--org--name/snapshots/<sha>/`, `refs/main`);
* tokenizers: llm_trainer's shipped tiny tokenizer, given the family's chat template read at run time from the
  installed `trl` package (`trl/chat_templates/*.jinja`; nothing of TRL ships here), the special tokens that template
  uses, and the family's bos/eos/pad tokens;
* datasets: small synthetic `trl-internal-testing/zen` configs (and the other ids the tests load) with each
  config's columns, written both as Hub-layout parquet repos and as the `datasets` arrow cache that
  `load_dataset(repo_id, config)` resolves with `HF_HUB_OFFLINE=1`.

Real tokenizers and models differ, so a test that passes on real TRL with the real Hub may fail here: only tests that
pass on real TRL with this cache count. The score is, per test file, the share of those that also pass under the
alias (`pytest -p llm_trainer.trl_alias`).

    python benchmarks/trl_test_suite.py --trl-tests /path/to/trl/tests
    python benchmarks/trl_test_suite.py --trl-tests /path/to/trl/tests --files test_rewards.py test_cli.py
    python benchmarks/trl_test_suite.py --trl-tests /path/to/trl/tests --reuse-real   # rerun only the alias side
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "fakehub"
CACHE_VERSION = "4"  # bump to rebuild every entry of an existing cache
FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"
ORG = "trl-internal-testing"

# ------------------------------------------------------------------------------------------------------------------
# Models: repo name -> (model_type, chat template file in trl/chat_templates or None, bos, eos, pad, extra config).
# The special tokens follow the original tokenizer each tiny TRL model was made from.
# ------------------------------------------------------------------------------------------------------------------
_QWEN = {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>"}
_LLAMA3 = {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": None}
_MOE_QWEN = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
MODELS: dict[str, dict[str, Any]] = {
    "tiny-Qwen2ForCausalLM-2.5": {"type": "qwen2", "template": "qwen2_5", **_QWEN},
    "tiny-Qwen2ForSequenceClassification-2.5": {"type": "qwen2", "template": "qwen2_5", **_QWEN},
    "tiny-Qwen3ForCausalLM": {"type": "qwen3", "template": "qwen3", **_QWEN},
    "tiny-Qwen3ForCausalLM-Instruct-2507": {"type": "qwen3", "template": "qwen3_instruct_2507", **_QWEN},
    "tiny-Qwen3ForSequenceClassification": {"type": "qwen3", "template": "qwen3", **_QWEN},
    "tiny-Qwen3MoeForCausalLM": {"type": "qwen3_moe", "template": "qwen3", **_QWEN, "config": _MOE_QWEN},
    "tiny-LlamaForCausalLM-3": {"type": "llama", "template": "llama3", **_LLAMA3},
    "tiny-LlamaForCausalLM-3.1": {"type": "llama", "template": "llama3_1", **_LLAMA3},
    "tiny-LlamaForCausalLM-3.2": {"type": "llama", "template": "llama3_2", **_LLAMA3},
    "tiny-LlamaForSequenceClassification-3.2": {"type": "llama", "template": "llama3_2", **_LLAMA3},
    "tiny-MistralForCausalLM-0.1": {"type": "mistral", "template": None, "bos": "<s>", "eos": "</s>", "pad": None},
    "tiny-MistralForCausalLM-0.2": {"type": "mistral", "template": None, "bos": "<s>", "eos": "</s>", "pad": None},
    "tiny-Phi3ForCausalLM-3": {
        "type": "phi3",
        "template": "phi3",
        "bos": "<s>",
        "eos": "<|endoftext|>",
        "pad": "<|endoftext|>",
    },
    "tiny-Phi3ForCausalLM-3.5": {
        "type": "phi3",
        "template": "phi3_5",
        "bos": "<s>",
        "eos": "<|endoftext|>",
        "pad": "<|endoftext|>",
    },
    "tiny-GemmaForCausalLM": {"type": "gemma", "template": "gemma", "bos": "<bos>", "eos": "<eos>", "pad": "<pad>"},
    "tiny-Gemma2ForCausalLM": {"type": "gemma2", "template": "gemma", "bos": "<bos>", "eos": "<eos>", "pad": "<pad>"},
    "tiny-GptOssForCausalLM": {
        "type": "gpt_oss",
        "template": "gptoss",
        "bos": "<|startoftext|>",
        "eos": "<|return|>",
        "pad": "<|endoftext|>",
        "config": {"num_local_experts": 4, "num_experts_per_tok": 2},
    },
    "tiny-Glm4MoeForCausalLM": {
        "type": "glm4_moe",
        "template": "glm4moe",
        "bos": None,
        "eos": "<|endoftext|>",
        "pad": "<|endoftext|>",
        "config": {
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
        },
    },
    "tiny-CohereForCausalLM": {
        "type": "cohere",
        "template": "cohere",
        "bos": "<BOS_TOKEN>",
        "eos": "<|END_OF_TURN_TOKEN|>",
        "pad": "<PAD>",
    },
    "tiny-Cohere2ForCausalLM": {
        "type": "cohere2",
        "template": "cohere2",
        "bos": "<BOS_TOKEN>",
        "eos": "<|END_OF_TURN_TOKEN|>",
        "pad": "<PAD>",
    },
    "tiny-DeepseekV3ForCausalLM": {
        "type": "deepseek_v3",
        "template": "deepseekv3",
        "bos": "<｜begin▁of▁sentence｜>",
        "eos": "<｜end▁of▁sentence｜>",
        "pad": "<｜end▁of▁sentence｜>",
        "config": {
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 4,
            "qk_nope_head_dim": 4,
            "v_head_dim": 4,
        },
    },
    "tiny-Lfm2ForCausalLM": {"type": "lfm2", "template": "lfm2", "bos": "<|startoftext|>", "eos": "<|im_end|>"},
    "tiny-Lfm2ForCausalLM-2.5": {
        "type": "lfm2",
        "template": "lfm2_2_5",
        "bos": "<|startoftext|>",
        "eos": "<|im_end|>",
    },
    "tiny-BloomForCausalLM": {"type": "bloom", "template": None, "bos": "<s>", "eos": "</s>", "pad": "<pad>"},
    "tiny-GPTNeoXForCausalLM": {"type": "gpt_neox", "template": None, "bos": "<|endoftext|>", "eos": "<|endoftext|>"},
    "tiny-GptNeoXForSequenceClassification": {
        "type": "gpt_neox",
        "class": "GPTNeoXForSequenceClassification",
        "template": None,
        "bos": "<|endoftext|>",
        "eos": "<|endoftext|>",
    },
    "tiny-GPT2LMHeadModel": {"type": "gpt2", "template": None, "bos": "<|endoftext|>", "eos": "<|endoftext|>"},
    "tiny-OPTForCausalLM": {"type": "opt", "template": None, "bos": "</s>", "eos": "</s>", "pad": "<pad>"},
    "tiny-Olmo3ForCausalLM": {"type": "olmo3", "template": None, "eos": "<|endoftext|>", "pad": "<|pad|>"},
}


# Vision-language models: repo name -> `llm_trainer.testing.make_tiny_vlm` family. A family make_tiny_vlm does not
# build yet is reported as not built (and retried on the next run); its tests fail on real TRL too and do not count.
VLM_MODELS: dict[str, str] = {
    "tiny-Qwen2VLForConditionalGeneration": "qwen2_vl",
    "tiny-Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "tiny-Qwen3VLForConditionalGeneration": "qwen3_vl",
    "tiny-Qwen3_5ForConditionalGeneration-NoThink": "qwen3_5",
    "tiny-Qwen3_5ForConditionalGeneration-Think": "qwen3_5_think",
    "tiny-Qwen3_5MoeForConditionalGeneration-3.6": "qwen3_5_moe",
    "tiny-LlavaForConditionalGeneration": "llava",
    "tiny-LlavaNextForConditionalGeneration": "llava_next",
    "tiny-Idefics2ForConditionalGeneration": "idefics2",
    "tiny-Idefics3ForConditionalGeneration": "idefics3",
    "tiny-SmolVLMForConditionalGeneration": "smolvlm",
    "tiny-Gemma3ForConditionalGeneration": "gemma3",
    "tiny-Gemma4ForConditionalGeneration": "gemma4",
    "tiny-PaliGemmaForConditionalGeneration": "paligemma",
}


# Config values in which the Hub's tiny checkpoints differ from `make_tiny_vlm`'s defaults and that TRL's tests check:
# LLaVA(-Next) reads the vision tower's second-to-last layer (so its last layer gets no gradient and the tests expect
# it unchanged), Gemma 3's SigLIP tower has no attention-pooling head (the tests expect every vision weight to train).
VLM_CONFIG: dict[str, dict[str, Any]] = {
    "llava": {"vision_feature_layer": -2},
    "llava_next": {"vision_feature_layer": -2},
    "gemma3": {"vision_config.vision_use_head": False},
}


def _build_vlm(repo: str, folder: Path) -> None:
    """Write the tiny stand-in of a VLM repo id (model, processor, generation config) to `folder`."""
    import torch
    import transformers
    from transformers import AutoConfig

    from llm_trainer import testing

    family = VLM_MODELS[repo]
    testing.make_tiny_vlm(family, folder)  # a family it does not build raises, and the repo is reported as not built
    if family in VLM_CONFIG:  # rebuild the weights (seeded) from the adjusted config
        config = AutoConfig.from_pretrained(folder)
        for key, value in VLM_CONFIG[family].items():
            *parents, name = key.split(".")
            target = config
            for parent in parents:
                target = getattr(target, parent)
            setattr(target, name, value)
        torch.manual_seed(0)
        model = getattr(transformers, config.architectures[0])(config)
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
        for file in folder.glob("model*.safetensors*"):
            file.unlink()
        model.save_pretrained(folder)


def _class_name(repo: str, spec: dict[str, Any]) -> str:
    """The transformers class a `tiny-<Class>[-suffix]` repo id names."""
    return spec.get("class") or repo.removeprefix("tiny-").split("-")[0]


def _trl_template(name: str) -> str:
    """A chat template from the installed `trl` package, read at run time (nothing of TRL ships with this script)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


_TOKEN_PATTERNS = [
    r"<\|[^|<>\s'\"]{1,40}\|>",  # <|im_start|>, <|eot_id|>, ...
    r"<｜[^｜]{1,40}｜>",  # DeepSeek's full-width bars
    r"</?(?:think|tool_call|tool_response|tools|start_of_turn|end_of_turn|bos|eos|pad)>",
    r"\[/?(?:INST|TOOL_CALLS|AVAILABLE_TOOLS|TOOL_RESULTS)\]",
    r"<(?:BOS_TOKEN|PAD)>",
]


def _template_tokens(template: str) -> list[str]:
    """The special-looking tokens a chat template writes, in first-seen order."""
    found: dict[str, None] = {}
    for pattern in _TOKEN_PATTERNS:
        for match in re.findall(pattern, template):
            found.setdefault(match, None)
    return list(found)


def _build_tokenizer(spec: dict[str, Any]):
    """The shipped tiny tokenizer, dressed as the family's tokenizer (template, special tokens, bos/eos/pad)."""
    from tokenizers import AddedToken

    from llm_trainer.testing import get_tokenizer

    tokenizer = get_tokenizer()
    template = _trl_template(spec["template"]) if spec.get("template") else None
    roles = {key: spec.get(key) for key in ("bos", "eos", "pad")}
    tokens = _template_tokens(template or "") + [t for t in roles.values() if t]
    new = [t for t in dict.fromkeys(tokens) if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in new], special_tokens=True)
    tokenizer.bos_token = roles["bos"]
    tokenizer.eos_token = roles["eos"]
    tokenizer.pad_token = roles["pad"]
    tokenizer.chat_template = template
    return tokenizer


def _build_model(repo: str, spec: dict[str, Any], folder: Path) -> None:
    """Write a tiny random-weight model of the named class, its tokenizer and generation config to `folder`."""
    import torch
    import transformers
    from transformers import CONFIG_MAPPING, GenerationConfig

    tokenizer = _build_tokenizer(spec)
    ids = {
        f"{k}_token_id": tokenizer.convert_tokens_to_ids(spec[k]) if spec.get(k) else None
        for k in ("bos", "eos", "pad")
    }
    sizes = {
        "vocab_size": len(tokenizer),
        "hidden_size": 16,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 32,
        "head_dim": 4,
        "max_position_embeddings": 2048,
    }
    class_name = _class_name(repo, spec)
    if "SequenceClassification" in class_name:
        sizes["num_labels"] = 1
    config = CONFIG_MAPPING[spec["type"]](**sizes, **ids, **spec.get("config", {}))
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if "CausalLM" in class_name or "LMHead" in class_name:
        GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(folder)


# ------------------------------------------------------------------------------------------------------------------
# Datasets: synthetic rows with each config's columns.
# ------------------------------------------------------------------------------------------------------------------
def _zen_lines() -> list[str]:
    from llm_trainer.testing import ZEN_OF_PYTHON

    return list(ZEN_OF_PYTHON)


def _split(line: str) -> tuple[str, str]:
    """A line as (prompt, completion): the completion is the last third of its words, with its leading space."""
    words = line.split(" ")
    cut = max(1, (2 * len(words)) // 3)
    return " ".join(words[:cut]), " " + " ".join(words[cut:])


def _zen_configs() -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The `trl-internal-testing/zen` configs: 17 train rows and 2 test rows each, as in the real dataset."""
    lines = _zen_lines()
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i, line in enumerate(lines):
        prompt, completion = _split(line)
        wrong = " " + " ".join(reversed(completion.split()))
        user = [{"role": "user", "content": prompt}]
        good = [{"role": "assistant", "content": completion.strip()}]
        bad = [{"role": "assistant", "content": wrong.strip()}]
        rows["standard_language_modeling"].append({"text": line})
        rows["standard_prompt_only"].append({"prompt": prompt})
        rows["standard_prompt_completion"].append({"prompt": prompt, "completion": completion})
        rows["standard_preference"].append({"prompt": prompt, "chosen": completion, "rejected": wrong})
        rows["standard_implicit_prompt_preference"].append({"chosen": prompt + completion, "rejected": prompt + wrong})
        rows["standard_unpaired_preference"].append(
            {"prompt": prompt, "completion": completion if i % 2 == 0 else wrong, "label": i % 2 == 0}
        )
        steps = completion.strip().split(" ")
        rows["standard_stepwise_supervision"].append(
            {"prompt": prompt, "completions": steps, "labels": [j % 3 != 2 for j in range(len(steps))]}
        )
        rows["conversational_language_modeling"].append({"messages": user + good})
        rows["conversational_prompt_only"].append({"prompt": user})
        rows["conversational_prompt_completion"].append({"prompt": user, "completion": good})
        rows["conversational_preference"].append({"prompt": user, "chosen": good, "rejected": bad})
        rows["conversational_implicit_prompt_preference"].append({"chosen": user + good, "rejected": user + bad})
        rows["conversational_unpaired_preference"].append(
            {"prompt": user, "completion": good if i % 2 == 0 else bad, "label": i % 2 == 0}
        )
    return {name: {"train": r[:17], "test": r[17:19]} for name, r in rows.items()}


_WEATHER_TOOL = json.dumps(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather of a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city."}},
                "required": ["city"],
            },
        },
    }
)


def _toolcall_configs() -> dict[str, dict[str, list[dict[str, Any]]]]:
    """`trl-internal-testing/toolcall`: conversations with a tool call, its result and the answer."""
    cities = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Rome", "Seoul", "Dakar"]
    lm, pref = [], []
    for i, city in enumerate(cities):
        user = {"role": "user", "content": f"What is the weather in {city}?"}
        call = {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}],
        }
        result = {"role": "tool", "name": "get_weather", "content": f"{10 + i} degrees"}
        answer = {"role": "assistant", "content": f"It is {10 + i} degrees in {city}."}
        wrong = {"role": "assistant", "content": "I don't know."}
        lm.append({"messages": [user, call, result, answer], "tools": [_WEATHER_TOOL]})
        pref.append(
            {"prompt": [user, call, result], "chosen": [answer], "rejected": [wrong], "tools": [_WEATHER_TOOL]}
        )
    return {"language_modeling": {"train": lm}, "preference": {"train": pref}}


def _harmony_configs() -> dict[str, dict[str, list[dict[str, Any]]]]:
    """`trl-internal-testing/harmony`: GPT-OSS style conversations with a reasoning field."""
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in _zen_lines()[:10]:
        prompt, completion = _split(line)
        user = [{"role": "user", "content": prompt}]
        good = [{"role": "assistant", "thinking": "The user wants the end.", "content": completion.strip()}]
        bad = [{"role": "assistant", "thinking": "Not sure.", "content": "No idea."}]
        rows["language_modeling"].append({"messages": user + good})
        rows["prompt_completion"].append({"prompt": user, "completion": good})
        rows["preference"].append({"prompt": user, "chosen": good, "rejected": bad})
    return {name: {"train": r} for name, r in rows.items()}


def _dolly_configs() -> dict[str, dict[str, list[dict[str, Any]]]]:
    """`trl-internal-testing/dolly-chatml-sft`: chat `messages`."""
    rows = []
    for line in _zen_lines():
        prompt, completion = _split(line)
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]})
    return {"default": {"train": rows}}


def _imdb_configs() -> dict[str, dict[str, list[dict[str, Any]]]]:
    """`stanfordnlp/imdb`: `text` and a 0/1 `label`, 40 rows a split (the tests take 10%)."""
    lines = _zen_lines()
    rows = [{"text": f"{lines[i % len(lines)]} Review {i}.", "label": i % 2} for i in range(40)]
    return {"plain_text": {"train": rows, "test": rows}}


def _zen_image_configs(images_per_row: int) -> dict[str, dict[str, Any]]:
    """`trl-internal-testing/zen-image` (`image` column) or `zen-multi-image` (`images` list): every conversational
    config `llm_trainer.testing.zen_image_dataset` builds, 17 train / 2 test rows."""
    from llm_trainer.testing import zen_image_dataset

    configs = [
        "conversational_language_modeling",
        "conversational_prompt_only",
        "conversational_prompt_completion",
        "conversational_preference",
        "conversational_implicit_prompt_preference",
        "conversational_unpaired_preference",
    ]
    return {c: {s: zen_image_dataset(c, s, images_per_row=images_per_row) for s in ("train", "test")} for c in configs}


DATASETS = {
    f"{ORG}/zen": _zen_configs,
    f"{ORG}/toolcall": _toolcall_configs,
    f"{ORG}/harmony": _harmony_configs,
    f"{ORG}/dolly-chatml-sft": _dolly_configs,
    "stanfordnlp/imdb": _imdb_configs,
    f"{ORG}/zen-image": lambda: _zen_image_configs(1),
    f"{ORG}/zen-multi-image": lambda: _zen_image_configs(2),
}


def _write_dataset(repo: str, configs: dict[str, dict[str, Any]], hub: Path, ds_cache: Path) -> None:
    """Write one dataset as a Hub-layout parquet repo and as the `datasets` arrow cache offline loading reads.

    Each split is a list of rows or a `datasets.Dataset` (kept with its features, e.g. `Image` columns)."""
    from datasets import Dataset
    from datasets.packaged_modules.parquet.parquet import Parquet

    org, name = repo.split("/")
    repo_dir = hub / f"datasets--{org}--{name}"
    snapshot = repo_dir / "snapshots" / FAKE_SHA
    card = ["---", "configs:"]
    for config, splits in configs.items():
        files = {}
        for split, rows in splits.items():
            path = snapshot / config / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            (rows if isinstance(rows, Dataset) else Dataset.from_list(rows)).to_parquet(str(path))
            files[split] = [str(path)]
        card += [f"- config_name: {config}", "  data_files:"]
        card += [f"  - split: {s}\n    path: {config}/{s}-*" for s in splits]
        # Build the arrow cache under a scratch name, then move it where `datasets` looks for `org/name`.
        with tempfile.TemporaryDirectory() as scratch:
            builder = Parquet(
                cache_dir=scratch, dataset_name=name, config_name=config, data_files=files, hash="0" * 16
            )
            builder.download_and_prepare()
            target = ds_cache / f"{org}___{name}" / config / "0.0.0" / ("0" * 16)
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(builder.cache_dir, target)
    (snapshot / "README.md").write_text("\n".join(card + ["---", ""]), encoding="utf-8")
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(FAKE_SHA)


def build_cache(cache_dir: Path, console) -> dict[str, str]:
    """Build (or complete) the stand-in cache; returns repo id -> "ok" / "cached" / the build error."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    hub, ds_cache = cache_dir / "hub", cache_dir / "datasets"
    hub.mkdir(parents=True, exist_ok=True)
    ds_cache.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    jobs = [(f"{ORG}/{r}", "model") for r in [*MODELS, *VLM_MODELS]] + [(r, "dataset") for r in DATASETS]
    from rich.progress import Progress

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("building stand-in Hub cache", total=len(jobs))
        for repo, kind in jobs:
            org, name = repo.split("/")
            repo_dir = hub / f"{kind}s--{org}--{name}"
            marker = repo_dir / f".built-v{CACHE_VERSION}"
            progress.update(task, description=f"building {repo}")
            if marker.exists():
                status[repo] = "cached"
            else:
                try:
                    shutil.rmtree(repo_dir, ignore_errors=True)
                    if kind == "model":
                        snapshot = repo_dir / "snapshots" / FAKE_SHA
                        snapshot.mkdir(parents=True)
                        if name in VLM_MODELS:
                            _build_vlm(name, snapshot)
                        else:
                            _build_model(name, MODELS[name], snapshot)
                        (repo_dir / "refs").mkdir()
                        (repo_dir / "refs" / "main").write_text(FAKE_SHA)
                    else:
                        _write_dataset(repo, DATASETS[repo](), hub, ds_cache)
                    marker.touch()
                    status[repo] = "ok"
                except Exception as exc:  # one repo that cannot be built must not stop the others
                    shutil.rmtree(repo_dir, ignore_errors=True)
                    status[repo] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            progress.advance(task)
    return status


# ------------------------------------------------------------------------------------------------------------------
# A TRL checkout's tests can be newer than the installed TRL and import names it lacks, which fails the whole file.
# `--compat` runs a copy of the tests folder where each module-level `from trl... import a, b` becomes one tolerant
# import a name: a missing name is a stand-in (`is_*_available` -> False; anything else raises ImportError when used),
# so only the tests that use it fail, on both sides alike.
# ------------------------------------------------------------------------------------------------------------------
_COMPAT_HELPER = """\"\"\"Stand-ins for names a TRL checkout's tests import but the installed `trl` lacks (written by
llm_trainer's benchmarks/trl_test_suite.py --compat).\"\"\"


class _Missing:
    def __init__(self, name):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise ImportError(f"{self._name} is not in the installed trl")

    def __getattr__(self, attr):
        raise ImportError(f"{self._name} is not in the installed trl")


def missing(module, name):
    if name.startswith("is_") and name.endswith("_available"):
        return lambda *args, **kwargs: False
    return _Missing(f"{module}.{name}")
"""


def _tolerant_imports(source: str) -> tuple[str, list[tuple[str, str]]]:
    """`source` with each module-level `from trl... import ...` split into per-name try/except imports."""
    import ast

    tree = ast.parse(source)
    targets: list[ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").split(".")[0] == "trl":
                targets.append(child)
            visit(child)

    visit(tree)
    lines = source.splitlines(keepends=True)
    names: list[tuple[str, str]] = []
    for node in sorted(targets, key=lambda n: n.lineno, reverse=True):
        pad = " " * node.col_offset
        block = []
        for alias in node.names:
            bound = alias.asname or alias.name
            block += [
                f"{pad}try:\n",
                f"{pad}    from {node.module} import {alias.name} as {bound}\n",
                f"{pad}except ImportError:\n",
                f"{pad}    from tests._trl_compat import missing as _trl_missing\n",
                f"{pad}    {bound} = _trl_missing({node.module!r}, {alias.name!r})\n",
            ]
            names.append((node.module or "", alias.name))
        lines[node.lineno - 1 : node.end_lineno] = block
    return "".join(lines), names


def stage_compat_tests(tests_root: Path, staging: Path) -> dict[str, list[str]]:
    """Copy `tests_root` to `staging/tests` with tolerant `trl` imports; returns file -> names the installed trl lacks."""
    import importlib

    target = staging / "tests"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(tests_root, target, ignore=shutil.ignore_patterns("__pycache__"))
    (target / "_trl_compat.py").write_text(_COMPAT_HELPER, encoding="utf-8")
    missing: dict[str, list[str]] = {}
    for path in sorted(target.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if "trl" not in source or path.name == "_trl_compat.py":
            continue
        new, names = _tolerant_imports(source)
        path.write_text(new, encoding="utf-8")
        lacking = []
        for module, name in names:
            try:
                if not hasattr(importlib.import_module(module), name):
                    importlib.import_module(f"{module}.{name}")
            except Exception:
                lacking.append(f"{module}.{name}")
        if lacking:
            missing[str(path.relative_to(target))] = lacking
    return missing


# ------------------------------------------------------------------------------------------------------------------
# Qwen-VL and SmolVLM processors hold a video processor, which needs torchvision; where it is missing,
# `AutoProcessor.from_pretrained` fails for them on real TRL and under the alias alike. `--images-only-processors`
# loads both sides' runs with a pytest plugin that retries such a load through `llm_trainer.models.vision.
# load_processor` (the family's processor class without its video half), so those tests can count.
# ------------------------------------------------------------------------------------------------------------------
_IMAGES_ONLY_PLUGIN = """\"\"\"pytest plugin written by llm_trainer's benchmarks/trl_test_suite.py --images-only-processors: a processor
whose video half cannot load (no torchvision) is loaded images-only.\"\"\"
import os

import transformers

_original = transformers.AutoProcessor.from_pretrained.__func__


def _from_pretrained(cls, name_or_path, *args, **kwargs):
    try:
        return _original(cls, name_or_path, *args, **kwargs)
    except (OSError, ValueError, ImportError) as error:
        if "video" not in str(error).lower() and "torchvision" not in str(error).lower():
            raise
        from huggingface_hub import snapshot_download

        from llm_trainer.models.vision import load_processor

        path = name_or_path if os.path.isdir(name_or_path) else snapshot_download(name_or_path)
        return load_processor(path)


transformers.AutoProcessor.from_pretrained = classmethod(_from_pretrained)
"""
IMAGES_ONLY_PLUGIN = "trl_suite_images_only"


# ------------------------------------------------------------------------------------------------------------------
# `--vlm`: the vision-language tests of the selected files. A test counts when its node id names a VLM (repo id,
# parameter id such as `qwen2_vl`, or `vlm` / `image` / `vision` / `multimodal` in its name) or, for a test without
# parameters, when its body loads a VLM repo or an image dataset.
# ------------------------------------------------------------------------------------------------------------------
_VLM_ID = re.compile(
    r"(?<!T5)ForConditionalGeneration|vlm|vision|image|multimodal|processor|qwen2_vl|qwen2\.5_vl|qwen3_vl|qwen3?5|qwen36"
    r"|gemma[34]|gemma_3n|idefics|llava|smolvlm|paligemma",
    re.IGNORECASE,
)
_VLM_BODY = re.compile(r"(?<!T5)ForConditionalGeneration|zen-image|zen-multi-image")


def _vlm_functions(path: Path) -> set[str]:
    """`Class::test_name` (or `test_name`) of each test function in `path` whose body names a VLM or image dataset."""
    import ast

    source = path.read_text(encoding="utf-8")
    found: set[str] = set()

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}::")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and child.name.startswith("test"):
                body = "".join(ast.get_source_segment(source, stmt) or "" for stmt in child.body)
                if _VLM_BODY.search(body):
                    found.add(prefix + child.name)

    visit(ast.parse(source), "")
    return found


def select_vlm_tests(tests_root: Path, targets: list[str], env: dict[str, str], log: Path) -> list[str]:
    """Collect `targets` (run from the tests folder's parent) and keep the vision-language test node ids."""
    cmd = [sys.executable, "-m", "pytest", *targets, "--collect-only", "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=tests_root.parent, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    by_file: dict[str, set[str]] = {}
    selected = []
    for line in proc.stdout.splitlines():
        if "::" not in line or " " in line.split("::")[0]:
            continue
        node = line.strip()
        file = node.split("::")[0]
        if file not in by_file:
            by_file[file] = _vlm_functions(tests_root.parent / file)
        function = "::".join(node.split("::")[1:]).split("[")[0]
        parametrized = node.endswith("]")  # then the name or the parameters must name the VLM
        if _VLM_ID.search(node.split("::", 1)[1]) or (not parametrized and function in by_file[file]):
            selected.append(node)
    return selected


# ------------------------------------------------------------------------------------------------------------------
# Running the tests and reading the results.
# ------------------------------------------------------------------------------------------------------------------
def pytest_env(args) -> dict[str, str]:
    """The environment TRL's tests run in: offline, reading the stand-in cache."""
    cache = Path(args.cache_dir)
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_CACHE=str(cache / "hub"),
        HF_DATASETS_CACHE=str(cache / "datasets"),
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",  # progress lines arrive as pytest writes them
    )
    if getattr(args, "images_only_processors", False):
        plugins = cache / "plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        (plugins / f"{IMAGES_ONLY_PLUGIN}.py").write_text(_IMAGES_ONLY_PLUGIN, encoding="utf-8")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugins), env.get("PYTHONPATH")]))
    return env


def _has_module(name: str) -> bool:
    """Whether `name` is importable (a pytest plugin this script passes options to)."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


def run_pytest(label: str, tests_root: Path, targets: list[str], args, junit: Path, log: Path, console) -> float:
    """Run pytest on `targets` (paths relative to the tests folder's parent), streaming its progress; returns seconds."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    env = pytest_env(args)
    cmd = [sys.executable, "-m", "pytest", *targets, "-p", "no:cacheprovider", "-q", "-rN", f"--junitxml={junit}"]
    if _has_module("pytest_timeout"):
        cmd += ["--timeout", str(args.timeout)]
    else:
        console.print("[yellow]pytest-timeout is not installed: no per-test timeout[/]")
    if args.workers > 0 and _has_module("xdist"):
        cmd += ["-n", str(args.workers)]
    elif args.workers > 0:
        console.print("[yellow]pytest-xdist is not installed: tests run in one process[/]")
    if args.k:
        cmd += ["-k", args.k]
    if label == "alias":
        cmd += ["-p", "llm_trainer.trl_alias"]
    if getattr(args, "images_only_processors", False):
        cmd += ["-p", IMAGES_ONLY_PLUGIN]
    start = time.perf_counter()
    with (
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
        log.open("w") as out,
    ):
        task = progress.add_task(f"pytest on {label}", total=100)
        proc = subprocess.Popen(
            cmd, cwd=tests_root.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
            match = re.search(r"\[\s*(\d+)%\]\s*$", line)
            if match:
                progress.update(task, completed=int(match.group(1)))
        proc.wait()
        progress.update(task, completed=100)
    return time.perf_counter() - start


def _node_id(classname: str, name: str, base: Path) -> str:
    """A junit (classname, name) pair as a pytest node id, `tests/test_x.py::TestY::test_z`."""
    if not classname:  # a module that failed to import: junit names it `tests.test_x`, with no class
        classname, name = name, "collection failure"
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        path = "/".join(parts[:cut]) + ".py"
        if (base / path).exists():
            return "::".join([path, *parts[cut:], name])
    return "::".join([classname.replace(".", "/"), name])


def read_junit(junit: Path, base: Path) -> dict[str, tuple[str, str]]:
    """Node id -> (outcome, one-line reason) for every test case in a junit file."""
    results: dict[str, tuple[str, str]] = {}
    for case in ET.parse(junit).iter("testcase"):
        node = _node_id(case.get("classname", ""), case.get("name", ""), base)
        outcome, reason = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                text = child.get("message") or (child.text or "")
                reason = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")[:240]
                break
        previous = results.get(node)
        if previous is None or previous[0] == "passed":  # a test reported twice (teardown error) keeps the failure
            results[node] = (outcome, reason)
    return results


def compare(real: dict[str, tuple[str, str]], alias: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Per test file: how many of the tests passing on real TRL also pass under the alias, and why the others fail."""
    files: dict[str, dict[str, Any]] = {}
    collection_errors = {n.split("::")[0]: r for n, (o, r) in alias.items() if n.endswith("collection failure")}
    for node, (outcome, _) in sorted(real.items()):
        if outcome != "passed":
            continue
        path = node.split("::")[0]
        entry = files.setdefault(path, {"real_passing": 0, "alias_passing": 0, "failing": {}})
        entry["real_passing"] += 1
        got = alias.get(node)
        if got and got[0] == "passed":
            entry["alias_passing"] += 1
        else:
            reason = (
                f"{got[0]}: {got[1]}" if got else f"not run ({collection_errors.get(path, 'missing from report')})"
            )
            entry["failing"][node] = reason
    for entry in files.values():
        entry["percent"] = round(100.0 * entry["alias_passing"] / entry["real_passing"], 1)
    total = sum(e["real_passing"] for e in files.values())
    passing = sum(e["alias_passing"] for e in files.values())
    return {
        "real_passing": total,
        "alias_passing": passing,
        "percent": round(100.0 * passing / total, 1) if total else 0.0,
        "lowest_file_percent": min((e["percent"] for e in files.values()), default=0.0),
        "files": files,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trl-tests", required=True, help="TRL's `tests` folder (a TRL checkout's tests/)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where the stand-in Hub cache is built")
    parser.add_argument("--files", nargs="*", help="test files (names in the tests folder); default: tests/test_*.py")
    parser.add_argument("-k", help="pytest -k expression")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (0: no xdist)")
    parser.add_argument("--timeout", type=int, default=120, help="per-test timeout in seconds")
    parser.add_argument("--build-only", action="store_true", help="build the cache and stop")
    parser.add_argument("--reuse-real", action="store_true", help="reuse the last real-TRL junit instead of rerunning")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the last two runs")
    parser.add_argument("--label", default="", help="suffix for run files and the JSON, to keep staged runs apart")
    parser.add_argument("--output", help="JSON report (default benchmarks/results/trl_test_suite[_label].json)")
    parser.add_argument("--real-pass-list", help="also write the ids passing on real TRL here, one a line")
    parser.add_argument(
        "--compat", action="store_true", help="run a copy of the tests with tolerant `trl` imports (newer checkouts)"
    )
    parser.add_argument("--vlm", action="store_true", help="run only the vision-language tests of the selected files")
    parser.add_argument(
        "--images-only-processors",
        action="store_true",
        help="on both sides, load a processor whose video half needs the missing torchvision images-only",
    )
    parser.add_argument(
        "--only-real-passing",
        action="store_true",
        help="run the alias side on the tests that passed on real TRL only (the others do not count)",
    )
    args = parser.parse_args()
    suffix = f"_{args.label}" if args.label else ""
    args.output = args.output or str(RESULTS / f"trl_test_suite{suffix}.json")

    from rich.console import Console
    from rich.table import Table

    console = Console()
    tests_root = Path(args.trl_tests).resolve()
    cache_dir = Path(args.cache_dir).resolve()
    args.cache_dir = str(cache_dir)
    status = build_cache(cache_dir, console)
    broken = {k: v for k, v in status.items() if v not in ("ok", "cached")}
    console.print(f"stand-in cache at {cache_dir}: {len(status) - len(broken)} repos ready, {len(broken)} not built")
    for repo, error in broken.items():
        console.print(f"  [yellow]{repo}[/]: {error}")
    if args.build_only:
        return

    names = args.files or sorted(p.name for p in tests_root.glob("test_*.py"))
    runs = cache_dir / "runs"
    runs.mkdir(exist_ok=True)
    compat_missing: dict[str, list[str]] = {}
    if args.compat:
        compat_missing = stage_compat_tests(tests_root, cache_dir / f"compat{suffix}")
        tests_root = cache_dir / f"compat{suffix}" / "tests"
        console.print(f"compat copy of the tests at {tests_root}: {len(compat_missing)} files import names trl lacks")
    targets = [f"{tests_root.name}/{n}" for n in names]
    if args.vlm:
        selection = runs / f"vlm_selection{suffix}.txt"
        if not (selection.exists() and (args.report_only or args.reuse_real)):
            ids = select_vlm_tests(tests_root, targets, pytest_env(args), runs / f"collect{suffix}.log")
            selection.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
        targets = selection.read_text(encoding="utf-8").split()
        console.print(f"--vlm: {len(targets)} vision-language tests selected ({selection})")
    seconds = {}
    for label in ("real", "alias"):
        junit, log = runs / f"{label}{suffix}.xml", runs / f"{label}{suffix}.log"
        if junit.exists() and (args.report_only or (label == "real" and args.reuse_real)):
            continue
        run_targets = targets
        if label == "alias" and args.only_real_passing:
            passed = read_junit(runs / f"real{suffix}.xml", tests_root.parent)
            run_targets = sorted(n for n, (o, _) in passed.items() if o == "passed")
            console.print(f"alias side: the {len(run_targets)} tests passing on real TRL")
        seconds[label] = run_pytest(label, tests_root, run_targets, args, junit, log, console)
        console.print(f"{label}: {seconds[label]:.0f} s, log {log}")
    real = read_junit(runs / f"real{suffix}.xml", tests_root.parent)
    alias = read_junit(runs / f"alias{suffix}.xml", tests_root.parent)
    report = compare(real, alias)

    table = Table(title="TRL tests passing on real TRL that also pass under the llm_trainer alias")
    for column in ("file", "real TRL passing", "alias passing", "%"):
        table.add_column(column, justify="left" if column == "file" else "right")
    for path, entry in sorted(report["files"].items()):
        style = "red" if entry["percent"] < 85 else None
        table.add_row(
            path, str(entry["real_passing"]), str(entry["alias_passing"]), f"{entry['percent']:.1f}", style=style
        )
    table.add_row("all", str(report["real_passing"]), str(report["alias_passing"]), f"{report['percent']:.1f}")
    console.print(table)

    import transformers
    import trl

    report = {
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "tests": str(tests_root),
        "files_selected": names,
        "vlm_only": args.vlm,
        "images_only_processors": args.images_only_processors,
        "tests_selected": len(targets) if args.vlm else None,
        "compat_missing_names": compat_missing,
        "k": args.k,
        "timeout_s": args.timeout,
        "workers": args.workers,
        "run_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "cache_build": status,
        "real_outcomes": dict(sorted(_count(real).items())),
        "alias_outcomes": dict(sorted(_count(alias).items())),
        **report,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    console.print(f"wrote {args.output}")
    if args.real_pass_list:
        ids = sorted(n for n, (o, _) in real.items() if o == "passed")
        Path(args.real_pass_list).write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
        console.print(f"wrote {len(ids)} real-TRL passing ids to {args.real_pass_list}")


def _count(results: dict[str, tuple[str, str]]) -> dict[str, int]:
    """How many test cases ended in each outcome."""
    counts: dict[str, int] = defaultdict(int)
    for outcome, _ in results.values():
        counts[outcome] += 1
    return counts


if __name__ == "__main__":
    main()
