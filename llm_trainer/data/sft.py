"""Turn an SFT dataset (text, messages, prompt-completion or pre-tokenized) into `input_ids` and `labels`.

Mirrors TRL 1.16's `SFTTrainer._prepare_dataset`: add the eos token to plain text, tokenize (through the chat
template for conversations), mask what should not be learned with -100, truncate or pack to `max_length`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from datasets import Dataset, IterableDataset

from .formats import get_dataset_column_names as column_names
from .formats import is_conversational, is_conversational_from_value, maybe_convert_to_chatml
from .packing import pack_dataset
from .tokenization import template_kwargs, tokenize, tokenize_prompt_completions
from .validation import check_rows_kept, check_text_columns
from .vision import IMAGE_COLUMNS

_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(chat_template: str | None) -> bool:
    """Whether a chat template marks assistant output with `{% generation %}` (needed for assistant masks)."""
    return bool(chat_template) and _GENERATION_MARKER.search(chat_template) is not None


def check_sft_dataset(
    dataset: Dataset | IterableDataset, text_field: str, name: str = "train", formatted: bool = False
) -> dict[str, Any]:
    """Validate that `dataset` is a usable SFT dataset and return its first example.

    Raises a `ValueError` naming the columns found and the layouts accepted when it is empty or, unless a formatting
    function makes the text (`formatted`), has no usable column.
    """
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"The {name} dataset is empty: pass a dataset with at least one example.")
    try:
        example = next(iter(dataset))
    except StopIteration:
        raise ValueError(f"The {name} dataset is empty: pass a dataset with at least one example.") from None
    usable = (
        formatted
        or "input_ids" in example
        or text_field in example
        or "messages" in example
        or "conversations" in example
        or ("prompt" in example and "completion" in example)
    )
    if not usable:
        raise ValueError(
            f"The {name} dataset has columns {sorted(example)}, none of which SFT can train on. Provide one of: "
            f"'{text_field}' (plain text; see `dataset_text_field`), 'messages' (a conversation), 'prompt' and "
            "'completion', or 'input_ids' (pre-tokenized); or pass a `formatting_func` that returns the text."
        )
    return example


def prepare_sft_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer: Any,
    *,
    text_field: str = "text",
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    packing: bool = False,
    packing_strategy: str = "bfd",
    completion_only_loss: bool = False,
    assistant_only_loss: bool = False,
    chat_template: str | None = None,
    formatting_func: Callable[[dict], str] | None = None,
    num_proc: int | None = None,
    shuffle_seed: int | None = None,
    name: str = "train",
) -> Dataset | IterableDataset:
    """Tokenize and mask `dataset` for SFT; the result has `input_ids`, `labels` and, when packed, `seq_lengths`.

    `labels` is -100 on tokens excluded from the loss: prompt tokens when `completion_only_loss`, non-assistant
    tokens when `assistant_only_loss`. A dataset that already has `input_ids` is only masked, truncated and packed.
    `shuffle_seed` shuffles the result (and the rows before packing).
    """
    map_kwargs: dict[str, Any] = {"num_proc": num_proc} if isinstance(dataset, Dataset) else {}

    def desc(text: str) -> dict[str, Any]:
        return {**map_kwargs, "desc": f"{text} {name} dataset"} if isinstance(dataset, Dataset) else map_kwargs

    if "input_ids" not in column_names(dataset):
        if formatting_func is not None:
            # The formatted text is the whole example: the dataset becomes a language-modeling one.
            dataset = dataset.map(
                lambda ex: {"text": formatting_func(ex)}, remove_columns=column_names(dataset), **desc("Formatting")
            )
            text_field = "text"
        if is_conversational_from_value(next(iter(dataset))):
            drop = ["conversations"] if "conversations" in column_names(dataset) else None
            dataset = dataset.map(maybe_convert_to_chatml, remove_columns=drop, **desc("Converting to ChatML"))
        _check_sft_text(dataset, text_field, name)
        if not is_conversational(next(iter(dataset))):
            dataset = dataset.map(
                _add_eos, fn_kwargs={"eos": tokenizer.eos_token, "text_field": text_field}, **desc("Adding EOS to")
            )
        dataset = dataset.map(
            _tokenize_example,
            fn_kwargs={
                "tokenizer": tokenizer,
                "text_field": text_field,
                "assistant_only_loss": assistant_only_loss,
                "chat_template": chat_template,
            },
            **desc("Tokenizing"),
        )

    columns = column_names(dataset)
    if "labels" not in columns:
        masks = [c for c in ("completion_mask", "assistant_masks") if c in columns]
        if not completion_only_loss and "completion_mask" in masks:
            masks.remove("completion_mask")
        dataset = dataset.map(
            _build_labels, fn_kwargs={"mask_columns": masks}, remove_columns=masks, **desc("Building labels for")
        )

    if max_length is not None and not packing:
        cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        dataset = dataset.map(
            lambda ex: {"input_ids": ex["input_ids"][cut], "labels": ex["labels"][cut]}, **desc("Truncating")
        )
        before = len(dataset) if isinstance(dataset, Dataset) else None
        dataset = dataset.filter(lambda ex: any(label != -100 for label in ex["labels"]), **desc("Filtering"))
        check_rows_kept(
            before,
            dataset,
            name,
            f"no trainable token left after truncation to max_length={max_length}",
            "Raise `max_length`, or shorten the prompts (only completion / assistant tokens are trained on).",
        )

    if packing:
        dataset = dataset.select_columns(["input_ids", "labels"])
        if shuffle_seed is not None:  # shuffle before packing too, so neighbours are not correlated
            dataset = dataset.shuffle(seed=shuffle_seed)
        dataset = pack_dataset(dataset, max_length, packing_strategy, desc("Packing"))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(seed=shuffle_seed)
    return dataset


def _check_sft_text(dataset: Dataset | IterableDataset, text_field: str, name: str) -> None:
    """The text cells SFT reads, checked as `_tokenize_example` picks them: prompt and completion, else messages,
    else the (non-empty) text field."""
    columns = column_names(dataset)
    if "prompt" in columns:
        check_text_columns(dataset, ["prompt", "completion"], name)
    elif "messages" in columns:
        check_text_columns(dataset, ["messages"], name, conversations=["messages"])
    else:
        check_text_columns(dataset, [text_field], name, non_empty=[text_field])


def _add_eos(example: dict, eos: str, text_field: str) -> dict:
    key = text_field if text_field in example else "completion" if "completion" in example else None
    if key is not None and not example[key].endswith(eos):
        example[key] = example[key] + eos
    return example


def _tokenize_example(
    example: dict, tokenizer: Any, text_field: str, assistant_only_loss: bool, chat_template: str | None
) -> dict:
    kwargs = template_kwargs(example, chat_template)
    if "prompt" in example:
        ids = tokenize_prompt_completions(
            tokenizer, example["prompt"], {"completion": example["completion"]}, kwargs, assistant_only_loss
        )
        prompt_len, completion_len = len(ids["prompt_ids"]), len(ids["completion_ids"])
        output = {
            "input_ids": ids["prompt_ids"] + ids["completion_ids"],
            "completion_mask": [0] * prompt_len + [1] * completion_len,
        }
        masks = ids.get("completion_assistant_masks")
    else:
        content = example["messages"] if is_conversational(example) else example[text_field]
        full = tokenize(tokenizer, content, return_assistant_tokens_mask=assistant_only_loss, **kwargs)
        output, masks = {"input_ids": full["input_ids"]}, full.get("assistant_masks")
    if assistant_only_loss:
        if not masks or 1 not in masks:
            raise ValueError(
                "`assistant_only_loss=True`, but an example has no assistant token in its assistant mask. Check that "
                "every conversation has an assistant turn and that the chat template wraps assistant output in "
                "`{% generation %}` ... `{% endgeneration %}`."
            )
        output["assistant_masks"] = masks
    return output


def _build_labels(example: dict, mask_columns: list[str]) -> dict:
    masks = [example[c] for c in mask_columns]
    return {"labels": [tok if all(bits) else -100 for tok, *bits in zip(example["input_ids"], *masks)]}


def check_vision_sft_options(args: Any, sample: dict[str, Any], formatted: bool) -> None:
    """Refuse, before anything loads, the SFT options TRL refuses with an image dataset (packing, padding-free,
    `keep_end` truncation) and the layouts the vision collator cannot read."""
    column = next(column for column in IMAGE_COLUMNS if column in sample)
    if args.packing:
        raise ValueError(
            f"Packing is not supported for vision datasets (this one has an '{column}' column): image tokens "
            "cannot be split across packed rows. Set `packing=False` in the SFTConfig."
        )
    if args.padding_free:
        raise ValueError(
            f"Padding-free training is not supported for vision datasets (this one has an '{column}' column). Set "
            "`padding_free=False` in the SFTConfig."
        )
    if args.max_length is not None and args.truncation_mode == "keep_end":
        raise ValueError(
            "truncation_mode='keep_end' is not supported for vision datasets: the image tokens sit at the start of "
            "the sequence, and cutting them would leave pixel values without their tokens. Use "
            "truncation_mode='keep_start' (the default) or set max_length=None."
        )
    if formatted:
        raise ValueError(
            "A `formatting_func` is not applied to vision datasets: their rows reach the collator raw, which "
            "renders the messages and processes the images per batch. Format the dataset yourself with "
            "`dataset.map(...)` into 'messages', or 'prompt' and 'completion' columns."
        )
    language_modeling = "messages" in sample or args.dataset_text_field in sample
    if not language_modeling and not ("prompt" in sample and "completion" in sample):
        raise ValueError(
            f"The train dataset has columns {sorted(sample)}; with images, SFT reads 'messages', "
            f"'{args.dataset_text_field}' (see `dataset_text_field`), or 'prompt' and 'completion'. Rename the "
            "columns (ShareGPT 'conversations': `dataset.map(llm_trainer.data.maybe_convert_to_chatml)`)."
        )
    if args.assistant_only_loss and "messages" not in sample:
        raise ValueError(
            "`assistant_only_loss=True` with images needs a conversational language modeling dataset (a 'messages' "
            "column). For prompt-completion rows use `completion_only_loss` instead."
        )
    if args.completion_only_loss and language_modeling:
        raise ValueError(
            "`completion_only_loss=True` needs prompt-completion rows, but this vision dataset is language "
            "modeling (no prompt/completion split). Use `assistant_only_loss=True` with 'messages', or set "
            "`completion_only_loss=None`."
        )
    if args.pad_to_multiple_of is not None and not language_modeling:
        raise ValueError(
            "`pad_to_multiple_of` is not supported for vision prompt-completion datasets: the processor pads the "
            "prompts and the completions separately. Leave it unset."
        )
