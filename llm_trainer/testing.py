"""Tiny offline models, a shipped tokenizer and small built-in datasets.

Nothing here touches the network: the tokenizer is a byte-level BPE trained locally (its files ship in
`llm_trainer/assets/tokenizer`), and models are random-weight architectures built from a config and saved to a
folder, so `from_pretrained(path)` works offline. Tests, examples, benchmarks and the demo all use these.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from .testing_vlm import VLM_BUILDERS, VLMFamily

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"

# Same pre-tokenization as `transformers`' Qwen2Tokenizer, which AutoTokenizer rebuilds for `model_type == "qwen2"`:
# training with anything else would make token ids differ silently between the two loading paths.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, with `{% generation %}` markers around what the assistant writes so `assistant_only_loss` works, and
# Qwen2.5-style tools: a system block listing them, `<tool_call>` JSON in assistant turns, `<tool_response>` results.
CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}"
    "{%- endif %}{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}"
    '{%- endfor %}{{- \'\\n</tools>\\nTo call a function, write <tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{%- if message['tool_calls'] %}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- endif %}"
    "{%- for tool_call in message['tool_calls'] %}"
    "{%- if tool_call['function'] is defined %}"
    "{%- set tool_call = tool_call['function'] %}"
    "{%- endif %}"
    "{%- if not loop.first or message['content'] %}{{- '\\n' }}"
    "{%- endif %}{{- '<tool_call>\\n{\"name\": \"' + tool_call['name'] + '\", \"arguments\": ' }}"
    "{%- if tool_call['arguments'] is string %}{{- tool_call['arguments'] }}"
    "{%- else %}{{- tool_call['arguments'] | tojson }}"
    "{%- endif %}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>' }}"
    "{%- endif %}"
    "{%- endgeneration %}{{- '\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}"
    "{%- endif %}{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

ZEN_OF_PYTHON = [
    "Beautiful is better than ugly.",
    "Explicit is better than implicit.",
    "Simple is better than complex.",
    "Complex is better than complicated.",
    "Flat is better than nested.",
    "Sparse is better than dense.",
    "Readability counts.",
    "Special cases aren't special enough to break the rules.",
    "Although practicality beats purity.",
    "Errors should never pass silently.",
    "Unless explicitly silenced.",
    "In the face of ambiguity, refuse the temptation to guess.",
    "There should be one-- and preferably only one --obvious way to do it.",
    "Although that way may not be obvious at first unless you're Dutch.",
    "Now is better than never.",
    "Although never is often better than *right* now.",
    "If the implementation is hard to explain, it's a bad idea.",
    "If the implementation is easy to explain, it may be a good idea.",
    "Namespaces are one honking great idea -- let's do more of those!",
]


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: the Zen of Python, chat turns, arithmetic and digits."""
    lines = list(ZEN_OF_PYTHON)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    for a in range(10):
        for b in range(10):
            lines.append(f"What is {a} plus {b}? {a} plus {b} is {a + b}.")
            lines.append(f"{words[a]} times {words[b]} is {a * b}")
    lines += [
        "You are a helpful assistant. The answer is correct. Please think step by step.",
        "<think>Let me think about this.</think><answer>42</answer>",
        "The quick brown fox jumps over the lazy dog. Hello, world! How are you today?",
        "user assistant system Question: Answer: Guess the number between 1 and 100. Too high. Too low. Correct!",
    ]
    return lines


def build_tokenizer(vocab_size: int = 1024):
    """Train the byte-level BPE tokenizer shipped in `assets/tokenizer` and return it as a transformers tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )


def write_tokenizer_assets(path: str | os.PathLike = TOKENIZER_DIR) -> None:
    """Regenerate the shipped tokenizer files (run once; the result is committed)."""
    build_tokenizer().save_pretrained(path)


def get_tokenizer():
    """The shipped tiny tokenizer (ChatML template with generation markers; pad `<|endoftext|>`, eos `<|im_end|>`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


Architecture = Literal["qwen2", "llama"]
Task = Literal["causal-lm", "sequence-classification", "token-classification"]


def tiny_model_config(
    architecture: Architecture = "qwen2",
    vocab_size: int | None = None,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = False,
    **kwargs,
):
    """A config for a tiny random-weight model whose vocabulary matches the shipped tokenizer."""
    from transformers import LlamaConfig, Qwen2Config

    tokenizer = get_tokenizer()
    config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[architecture]
    return config_cls(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **kwargs,
    )


def make_tiny_model(
    path: str | os.PathLike | None = None,
    architecture: Architecture = "qwen2",
    task: Task = "causal-lm",
    seed: int = 0,
    **config_kwargs,
) -> str:
    """Build a tiny random-weight model, save it with the shipped tokenizer, and return the folder.

    `from_pretrained(folder)` then works offline for the model and for `AutoTokenizer`. Extra keyword arguments go
    to `tiny_model_config` (hidden size, layers, tied embeddings, ...). Sequence-classification models get one label,
    token-classification models two.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

    path = Path(path or tempfile.mkdtemp(prefix=f"tiny-{architecture}-"))
    config = tiny_model_config(architecture, **config_kwargs)
    torch.manual_seed(seed)
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config = GenerationConfig(
            eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False
        )
    elif task == "sequence-classification":
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    elif task == "token-classification":  # a process reward model: one of 2 labels per token
        from transformers import AutoModelForTokenClassification

        config.num_labels = 2
        model = AutoModelForTokenClassification.from_config(config)
    else:
        raise ValueError(
            f"Unknown task {task!r}; expected 'causal-lm', 'sequence-classification' or 'token-classification'."
        )
    model.save_pretrained(path)
    get_tokenizer().save_pretrained(path)
    return str(path)


def zen_dataset(config: str, split: str = "train"):
    """Offline twin of the `trl-internal-testing/zen` dataset (same row layout per config, 17 train / 2 test rows)."""
    from datasets import Dataset

    rows = [_zen_row(config, i, line) for i, line in enumerate(ZEN_OF_PYTHON)]
    rows = rows[:17] if split == "train" else rows[17:]
    return Dataset.from_list(rows)


_UNPAIRED_LABELS = [True, False, False, True, True, False, True, False, True, True, False, True, True, False]
_UNPAIRED_LABELS += [True, False, True, False, False]


def _zen_row(config: str, i: int, line: str) -> dict:
    words = line.rstrip(".!").split(" ")
    prompt, completion = " ".join(words[:-1]), " " + words[-1] + line[len(line.rstrip(".!")) :]
    other = ZEN_OF_PYTHON[(i + 7) % len(ZEN_OF_PYTHON)]
    question = f"Complete the aphorism: {prompt}"
    user = [{"role": "user", "content": question}]

    def assistant(text):
        return [{"role": "assistant", "content": text}]

    layouts = {
        "standard_language_modeling": {"text": line},
        "standard_prompt_only": {"prompt": prompt},
        "standard_prompt_completion": {"prompt": prompt, "completion": completion},
        "standard_preference": {"prompt": prompt, "chosen": completion, "rejected": " " + other},
        "standard_implicit_prompt_preference": {"chosen": line, "rejected": prompt + " " + other},
        "standard_unpaired_preference": {
            "prompt": prompt,
            "completion": completion if _UNPAIRED_LABELS[i] else " " + other,
            "label": _UNPAIRED_LABELS[i],
        },
        "conversational_language_modeling": {"messages": user + assistant(line)},
        "conversational_prompt_only": {"prompt": user},
        "conversational_prompt_completion": {"prompt": user, "completion": assistant(line)},
        "conversational_preference": {"prompt": user, "chosen": assistant(line), "rejected": assistant(other)},
        "conversational_implicit_prompt_preference": {
            "chosen": user + assistant(line),
            "rejected": user + assistant(other),
        },
        "conversational_unpaired_preference": {
            "prompt": user,
            "completion": assistant(line if _UNPAIRED_LABELS[i] else other),
            "label": _UNPAIRED_LABELS[i],
        },
    }
    if config not in layouts:
        raise ValueError(f"Unknown zen config {config!r}; expected one of {sorted(layouts)}.")
    return json.loads(json.dumps(layouts[config]))


# ------------------------------------------------------------------------------------------------------------------
# Tiny vision-language models (the family builders live in `testing_vlm`).
# ------------------------------------------------------------------------------------------------------------------


def make_tiny_vlm(family: VLMFamily = "qwen2_vl", path: str | os.PathLike | None = None, seed: int = 0) -> str:
    """Build a tiny random-weight vision-language model of `family`, save it with its processor, return the folder.

    `AutoModelForImageTextToText.from_pretrained(folder)` and `llm_trainer.models.vision.load_processor(folder)` then
    work offline.
    """
    import torch
    from transformers import GenerationConfig

    if family not in VLM_BUILDERS:
        raise ValueError(f"Unknown VLM family {family!r}; expected one of {sorted(VLM_BUILDERS)}.")
    path = Path(path or tempfile.mkdtemp(prefix=f"tiny-{family}-"))
    torch.manual_seed(seed)
    model, processor = VLM_BUILDERS[family](get_tokenizer())
    tokenizer = processor.tokenizer
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def get_tiny_vlm_processor(path: str | os.PathLike):
    """The processor saved by `make_tiny_vlm` (images-only for Qwen-VL where torchvision is missing)."""
    from .models.vision import load_processor

    return load_processor(path)


def make_images(count: int, seed: int = 0, min_side: int = 32, max_side: int = 64) -> list:
    """`count` random RGB PIL images with sides in [min_side, max_side) (as TRL's zen-image rows)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = rng.integers(min_side, max_side, size=(count, 2))
    return [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for h, w in sizes]


def zen_image_dataset(config: str, split: str = "train", images_per_row: int = 1, seed: int = 0):
    """Offline twin of `trl-internal-testing/zen-image` (`images_per_row=1`: an `image` column) and of
    `zen-multi-image` (`images_per_row>1`: an `images` list column), for the conversational configs.

    Rows are `zen_dataset(config)`'s with plain-string contents; the image parts are added by
    `prepare_multimodal_messages` at training time, as in TRL.
    """
    from datasets import Dataset, Features, Image, Sequence

    base = zen_dataset(config, split)
    if not config.startswith("conversational"):
        raise ValueError(f"zen-image has conversational configs only, got {config!r}.")
    offset = 0 if split == "train" else 17
    images = make_images(len(base) * images_per_row, seed=seed + offset)
    rows = base.to_list()
    if images_per_row == 1:
        for row, image in zip(rows, images):
            row["image"] = image
        features = Features({**base.features, "image": Image()})
    else:
        for i, row in enumerate(rows):
            row["images"] = images[i * images_per_row : (i + 1) * images_per_row]
        features = Features({**base.features, "images": Sequence(Image())})
    return Dataset.from_list(rows, features=features)
