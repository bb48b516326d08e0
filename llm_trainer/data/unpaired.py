"""Unpaired preference data (`prompt`, `completion`, `label`) as KTO and BCO read it, and its collator.

`prepare_unpaired_dataset` is TRL 1.16's `KTOTrainer._prepare_dataset`: extract an implicit prompt, unpair
`chosen` / `rejected` pairs, append eos to plain-text completions, tokenize into `prompt_ids` / `completion_ids`, drop
rows whose prompt alone fills `max_length`, and optionally add `KL_completion_ids`, the mismatched completions KTO's
reference point is estimated from.

Vision-language rows (`image` / `images`, conversational) are checked (`data.vision.check_vision_dataset`), get their
prompt extracted and are unpaired the same way, but stay raw: `VisionUnpairedCollator` runs the processor on each
batch (each row's images once, shared by its completion and its KL completion) and pairs the KL completions within
the batch, as TRL's vision collator does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import ProcessorMixin
from transformers.data.data_collator import DataCollatorMixin

from .chat_template import extract_prompt
from .collators import _join_prompt_completion, _no_pad_to_multiple_of, _process, pad
from .formats import is_conversational
from .preference import unpair_preference_dataset
from .preference_dataset import filter_rows, first_row, prompt_fits
from .preference_vision import (
    IMAGE_INPUTS_KEY,
    batch_row_images,
    check_image_tokens_kept,
    render_vision_rows,
    split_image_fields,
)
from .tokenization import template_kwargs, tokenize_prompt_completions
from .validation import check_labels, check_text_columns
from .vision import check_vision_dataset

logger = logging.getLogger(__name__)

UNPAIRED_COLUMNS = ("prompt", "completion", "label")
TOKENIZED_COLUMNS = ("prompt_ids", "completion_ids", "label")


def check_unpaired_dataset(dataset: Dataset | IterableDataset, name: str = "train") -> dict[str, Any]:
    """Return the first row, or raise a `ValueError` naming what an empty or unusable dataset lacks.

    Accepted: unpaired (`prompt`, `completion`, `label`), paired preference (`chosen`, `rejected`, optional `prompt`;
    unpaired automatically) and already tokenized (`prompt_ids`, `completion_ids`, `label`) rows.
    """
    example = first_row(dataset, name, "labelled completion")
    if "chosen" in example and "rejected" in example:
        return example
    layout = TOKENIZED_COLUMNS if "prompt_ids" in example else UNPAIRED_COLUMNS
    missing = [column for column in layout if column not in example]
    if missing:
        raise ValueError(
            f"The {name} dataset has columns {sorted(example)}, but unpaired preference data needs 'prompt', "
            f"'completion' and 'label' (a bool, True for a desirable completion); missing: {missing}. Rename your "
            "columns (e.g. `dataset.rename_column('response', 'completion')`), or pass paired 'chosen' / 'rejected' "
            "data, which is unpaired automatically."
        )
    return example


def prepare_unpaired_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    kl_batch_size: int | None = None,
    num_proc: int | None = None,
    name: str = "train",
    require_both_labels: bool = False,
    vision: dict[str, Any] | None = None,
) -> Dataset | IterableDataset:
    """Tokenize unpaired (or paired, then unpaired) preference data into `prompt_ids`, `completion_ids`, `label`.

    With `require_both_labels`, a map-style dataset whose labels, as given, are all of one kind is an error
    ([`check_label_balance`]); rows dropped by truncation only bring a warning if they remove one kind. With
    `kl_batch_size`, `KL_completion_ids` holds, within each run of `kl_batch_size` consecutive rows, the
    completion of the row before (the first row takes the last one's): (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}).
    These mismatched pairs line up with training batches only when the sampler is sequential and the batch size is
    `kl_batch_size`. Rows already tokenized skip straight to filtering.

    `vision` (the `check_vision_dataset` keywords but the columns: `model_is_vlm`, `trainer`, `image_token`) marks a
    vision dataset: it is checked, its prompt extracted and its pairs unpaired, and it stays untokenized (the
    collator tokenizes it and builds its KL completions).
    """
    first = check_unpaired_dataset(dataset, name)
    is_map_style = isinstance(dataset, Dataset)
    map_kwargs: dict[str, Any] = {"num_proc": num_proc} if is_map_style else {}

    def described(text: str) -> dict[str, Any]:
        return {**map_kwargs, "desc": f"{text} {name} dataset"} if is_map_style else map_kwargs

    check_labels(dataset, "label", name)
    if require_both_labels and is_map_style and "label" in first:  # paired rows unpair into both kinds
        check_label_balance(dataset["label"], name)  # the labelling as given, before truncation drops rows
    if vision is not None:
        columns = ["prompt", "completion", "chosen", "rejected"]
        check_text_columns(dataset, columns, name)
        check_vision_dataset(dataset, message_columns=columns, dataset_name=name, **vision)
        if "prompt" not in first:
            dataset = dataset.map(extract_prompt, **described("Extracting prompt from"))
        if "chosen" in first and "rejected" in first:
            dataset = unpair_preference_dataset(dataset, **described("Unpairing"))
        return dataset
    if "prompt_ids" not in first:
        check_text_columns(dataset, ["prompt", "completion", "chosen", "rejected"], name)
        if "prompt" not in first:
            dataset = dataset.map(extract_prompt, **described("Extracting prompt from"))
        if "chosen" in first and "rejected" in first:
            dataset = unpair_preference_dataset(dataset, **described("Unpairing"))
        if not is_conversational(next(iter(dataset))):
            dataset = dataset.map(_add_eos, fn_kwargs={"eos": tokenizer.eos_token}, **described("Adding EOS to"))
        dataset = dataset.map(_tokenize_row, fn_kwargs={"tokenizer": tokenizer}, **described("Tokenizing"))
    if max_length is not None:
        labels = list(dataset["label"]) if is_map_style else None
        reason = f"the prompt alone fills max_length={max_length}, leaving no room for the completion"
        fix, kwargs = "Raise `max_length`, or shorten the prompts.", described("Filtering")
        dataset = filter_rows(dataset, prompt_fits, name, reason, fix, fn_kwargs={"max_length": max_length}, **kwargs)
        if labels is not None and len(dataset) < len(labels):
            _warn_label_dropped(labels, list(dataset["label"]), name, reason)
    if kl_batch_size is not None:
        dataset = dataset.map(
            _add_kl_completions, batched=True, batch_size=kl_batch_size, **described("Extracting KL completions of")
        )
    return dataset


def _add_eos(example: dict, eos: str) -> dict:
    if not example["completion"].endswith(eos):
        example["completion"] = example["completion"] + eos
    return example


def _tokenize_row(example: dict, tokenizer: Any) -> dict:
    return tokenize_prompt_completions(
        tokenizer, example["prompt"], {"completion": example["completion"]}, template_kwargs(example)
    )


def _add_kl_completions(batch: dict[str, list]) -> dict[str, list]:
    completions = batch["completion_ids"]
    batch["KL_completion_ids"] = completions[-1:] + completions[:-1]
    return batch


def _warn_label_dropped(before: list[bool], after: list[bool], name: str, reason: str) -> None:
    """Warn when dropping rows removed every example of one label (the loss then sees only the other kind)."""
    for kind, value in (("desirable (label=True)", True), ("undesirable (label=False)", False)):
        count = sum(bool(label) == value for label in before)
        if count and not any(bool(label) == value for label in after):
            logger.warning(
                "All %d %s examples of the %s dataset were dropped (%s), so training sees only the other kind. "
                "Raise `max_length`, or shorten the prompts.",
                count,
                kind,
                name,
                reason,
            )


def check_label_balance(labels: list[bool], name: str = "train") -> None:
    """Raise a `ValueError` when all `labels` are of one kind: the unpaired losses weigh desirable completions
    against undesirable ones (KTO's reward margins, BCO's classifier), so a dataset needs both."""
    num_desirable = sum(bool(label) for label in labels)
    if 0 < num_desirable < len(labels):
        return
    kind = "desirable (label=True)" if num_desirable else "undesirable (label=False)"
    raise ValueError(
        f"Every example of the {name} dataset is {kind}, but the loss weighs desirable against undesirable "
        "completions and needs both. Add examples with the other label (e.g. unpair a preference dataset with "
        "`unpair_preference_dataset`), or train on desirable completions alone with SFTTrainer."
    )


def recommend_loss_weights(labels: list[bool], desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> None:
    """Warn, as TRL's KTOTrainer does, when the loss weights don't offset an imbalance between desirable and
    undesirable examples; the recommended ranges are Eq. (8) of the KTO paper, λ_D·n_D / (λ_U·n_U) in [1, 4/3]."""
    num_desirable = max(sum(bool(label) for label in labels), 1)
    num_undesirable = max(len(labels) - num_desirable, 1)
    if num_desirable == num_undesirable:
        return
    ratio = num_undesirable / num_desirable
    des_low, des_high = round(ratio * undesirable_weight, 2), round(ratio * undesirable_weight * 1.33, 2)
    und_low, und_high = round(desirable_weight / ratio / 1.33, 2), round(desirable_weight / ratio, 2)
    if not (des_low <= desirable_weight <= des_high or und_low <= undesirable_weight <= und_high):
        logger.warning(
            "You have different amounts of desirable/positive and undesirable/negative examples but the weights on "
            "the desirable and undesirable losses don't seem to be in an ideal range. Based on your data, we recommend "
            "EITHER desirable_weight in [%s, %s] or undesirable_weight in [%s, %s] (but NOT BOTH). See the "
            "documentation on how to optimally set these weights.",
            des_low,
            des_high,
            und_low,
            und_high,
        )


@dataclass
class DataCollatorForUnpairedPreference(DataCollatorMixin):
    """Collate `prompt_ids` / `completion_ids` / `label` examples (TRL's collator of the same name).

    Returns `input_ids`, `attention_mask` and `completion_mask` (1 on completion tokens), right-padded, each
    prompt+completion truncated to its first `max_length` tokens, and `label` as a bool tensor. With
    `KL_completion_ids` the same three tensors come back for the mismatched sequences as `KL_input_ids`,
    `KL_attention_mask` and `KL_completion_mask`; precomputed `ref_logps` / `ref_KL_logps` pass through.

    >>> DataCollatorForUnpairedPreference(pad_token_id=0)(
    ...     [{"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "label": True},
    ...      {"prompt_ids": [7, 8], "completion_ids": [9], "label": False}])["completion_mask"]
    tensor([[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]])
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for prefix, key in (("", "completion_ids"), ("KL_", "KL_completion_ids")):
            if key not in examples[0]:
                continue
            sequences, masks = [], []
            for ex in examples:
                prompt, completion = list(ex["prompt_ids"]), list(ex[key])
                end = None if self.max_length is None else self.max_length
                sequences.append(torch.tensor((prompt + completion)[:end], dtype=torch.int64))
                masks.append(torch.tensor(([0] * len(prompt) + [1] * len(completion))[:end], dtype=torch.int64))
            multiple = self.pad_to_multiple_of
            out[f"{prefix}input_ids"] = pad(sequences, self.pad_token_id, pad_to_multiple_of=multiple)
            out[f"{prefix}attention_mask"] = pad(
                [torch.ones_like(s) for s in sequences], 0, pad_to_multiple_of=multiple
            )
            out[f"{prefix}completion_mask"] = pad(masks, 0, pad_to_multiple_of=multiple)
        for key in ("ref_logps", "ref_KL_logps"):
            if key in examples[0]:
                out[key] = torch.tensor([ex[key] for ex in examples])
        out["label"] = torch.tensor([bool(ex["label"]) for ex in examples])
        return out


@dataclass
class VisionUnpairedCollator(DataCollatorMixin):
    """Collate raw vision-language unpaired rows (`prompt`, `completion`, `label`, `image` / `images`) for KTO.

    Returns TRL's `DataCollatorForVisionUnpairedPreference` layout: `input_ids`, `attention_mask`, `completion_mask`
    (and `token_type_ids` / `mm_token_type_ids` where the processor makes them), the prompt's left padding flushed,
    cut to `max_length`; with `calculate_kl`, the same under `KL_` for each prompt followed by the previous row's
    completion (the first row takes the last one's); `label` as a bool tensor; precomputed `ref_logps` /
    `ref_KL_logps` pass through. Each row's images are processed once, for both of its sequences, and come back
    under `"image_inputs"` as an `ImageInputs`.
    """

    processor: ProcessorMixin
    max_length: int | None = None
    calculate_kl: bool = True
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        _no_pad_to_multiple_of(self.pad_to_multiple_of)
        images = batch_row_images(examples)
        rows = render_vision_rows(examples, self.processor, ("completion",), images)
        prompts = _process(self.processor, [row["prompt"] for row in rows], "left", self.return_tensors, images)
        prompt_fields, image_inputs = split_image_fields(prompts, len(examples))
        completions = [row["completion"] for row in rows]
        processed = _process(self.processor, completions, "right", self.return_tensors)
        batch: dict[str, Any] = _join_prompt_completion(prompt_fields, processed, self.max_length)
        check_image_tokens_kept(self.processor, prompt_fields["input_ids"], batch["input_ids"], self.max_length)
        if self.calculate_kl:
            shifted = _process(self.processor, completions[-1:] + completions[:-1], "right", self.return_tensors)
            kl = _join_prompt_completion(prompt_fields, shifted, self.max_length)
            batch.update({f"KL_{key}": value for key, value in kl.items()})
        if image_inputs is not None:
            batch[IMAGE_INPUTS_KEY] = image_inputs
        batch["label"] = torch.tensor([bool(example["label"]) for example in examples])
        for key in ("ref_logps", "ref_KL_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([example[key] for example in examples])
        return batch
