"""Vision-language preference batches (DPO, KTO): raw rows with images → token ids and the images' tensors, once.

Images become pixel values only at batch time, as in TRL (doing it for a whole dataset costs too much disk). Unlike
TRL's `DataCollatorForVisionPreference`, which runs the image processor on every image twice (once for the chosen
row, once for the rejected row), `VisionPreferenceCollator` processes each pair's prompt and images once: the prompt
ids are repeated for the two rows and the image tensors come back once per pair in an `ImageInputs`, which the
forward hands to the vision encoder once (`trainer.preference_forward.encode_images`). The token ids, masks and
truncation are TRL's, so the losses are too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import ProcessorMixin
from transformers.data.data_collator import DataCollatorMixin

from .collators import _join_prompt_completion, _no_pad_to_multiple_of, _process
from .vision import IMAGE_COLUMNS, batch_row_images, render_vision_rows

__all__ = [
    "IMAGE_INPUTS_KEY",
    "TEXT_FIELDS",
    "ImageInputs",
    "VisionPreferenceCollator",
    "batch_row_images",
    "check_image_tokens_kept",
    "flat_image_inputs",
    "is_vision_dataset_row",
    "render_vision_rows",
    "require_processor",
    "split_image_fields",
]

IMAGE_INPUTS_KEY = "image_inputs"
"""The batch key of a collated batch's `ImageInputs`."""

TEXT_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
"""Per-token fields of a processor's output; everything else it returns describes the images."""


@dataclass(frozen=True)
class ImageInputs:
    """The image tensors a processor made for a batch (`pixel_values`, Qwen-VL's `image_grid_thw`, ...), in the
    processor's layout: indexed by image (or, for some families, by row) along the first dimension.

    `rows` is how many rows of text they belong to (B pairs for DPO, B examples for KTO); a forward over `k * rows`
    rows (the chosen and the rejected rows) shares them. `to` lets Accelerate's device placement move them.
    """

    tensors: dict[str, torch.Tensor]
    rows: int

    def to(self, device: Any, non_blocking: bool = False) -> ImageInputs:
        moved = {key: value.to(device, non_blocking=non_blocking) for key, value in self.tensors.items()}
        return ImageInputs(moved, self.rows)


def is_vision_dataset_row(row: dict[str, Any]) -> bool:
    """Whether a dataset row has an image column (TRL's test for a vision dataset)."""
    return any(column in row for column in IMAGE_COLUMNS)


def split_image_fields(processed: Any, rows: int) -> tuple[dict[str, torch.Tensor], ImageInputs | None]:
    """A processor's output split into its per-token fields (`TEXT_FIELDS`) and its image tensors (None: none)."""
    text = {key: processed[key] for key in TEXT_FIELDS if key in processed}
    images = {key: value for key, value in processed.items() if key not in TEXT_FIELDS and value is not None}
    return text, (ImageInputs(images, rows) if images else None)


def image_token_id(processor: Any) -> int | None:
    """The id of the processor's image placeholder token, None where it names none."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None) is not None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return token_id


def check_image_tokens_kept(
    processor: Any, prompt_ids: torch.Tensor, input_ids: torch.Tensor, max_length: int | None
) -> None:
    """Raise a `ValueError` when truncation to `max_length` cut image tokens off the prompts (rows `i`,
    `rows + i`, ... of `input_ids` hold prompt `i`): the image features would no longer match their tokens."""
    token_id = image_token_id(processor)
    if max_length is None or token_id is None:
        return
    wanted = (prompt_ids == token_id).sum(dim=1)
    kept = (input_ids == token_id).sum(dim=1).view(-1, prompt_ids.size(0)).min(dim=0).values
    if torch.equal(wanted, kept):
        return
    row = int((kept < wanted).nonzero()[0, 0])
    prompt_length = int((prompt_ids[row] != processor.tokenizer.pad_token_id).sum())
    raise ValueError(
        f"The current `max_length` ({max_length}) is too short and causes image placeholder tokens in `input_ids` to "
        f"be truncated: a prompt of this batch is {prompt_length} tokens long, {int(wanted[row])} of them image "
        f"tokens, and only {int(kept[row])} of those are kept. Raise `max_length` above the longest prompt (with its "
        "image tokens), or set it to None."
    )


def flat_image_inputs(batch: dict[str, Any]) -> ImageInputs | None:
    """The image tensors of a batch laid out flat, as TRL's vision collators return them (`pixel_*` / `image_*`
    keys next to `input_ids`), as an `ImageInputs` for the batch's rows; None when it has none."""
    tensors = {key: value for key, value in batch.items() if key.startswith(("pixel_", "image_"))}
    if not tensors or IMAGE_INPUTS_KEY in batch:
        return None
    return ImageInputs(tensors, batch["input_ids"].size(0))


def repeat_rows(fields: dict[str, torch.Tensor], copies: int) -> dict[str, torch.Tensor]:
    """Each tensor's rows repeated as `copies` consecutive blocks (`[x; x]` for 2)."""
    return {key: torch.cat([value] * copies, dim=0) for key, value in fields.items()}


@dataclass
class VisionPreferenceCollator(DataCollatorMixin):
    """Collate raw vision-language preference rows (`prompt`, `chosen`, `rejected` and `image` / `images`) for DPO.

    Returns 2B rows, the chosen ones first, exactly as TRL's `DataCollatorForVisionPreference` lays them out:
    `input_ids`, `attention_mask` and `completion_mask` (1 on completion tokens; with `token_type_ids` /
    `mm_token_type_ids` where the processor makes them), the prompt's left padding flushed, every row cut to
    `max_length`. The images are processed once per pair and come back under `"image_inputs"` as an `ImageInputs`
    of B rows, shared by the chosen and the rejected row. Precomputed `ref_chosen_logps` / `ref_rejected_logps` pass
    through. Rows without images may be mixed with rows with images.
    """

    processor: ProcessorMixin
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        _no_pad_to_multiple_of(self.pad_to_multiple_of)
        images = batch_row_images(examples)
        rows = render_vision_rows(examples, self.processor, ("chosen", "rejected"), images)
        prompts = _process(self.processor, [row["prompt"] for row in rows], "left", self.return_tensors, images)
        prompt_fields, image_inputs = split_image_fields(prompts, len(examples))
        completions = [row["chosen"] for row in rows] + [row["rejected"] for row in rows]
        processed = _process(self.processor, completions, "right", self.return_tensors)
        batch: dict[str, Any] = _join_prompt_completion(repeat_rows(prompt_fields, 2), processed, self.max_length)
        check_image_tokens_kept(self.processor, prompt_fields["input_ids"], batch["input_ids"], self.max_length)
        if image_inputs is not None:
            batch[IMAGE_INPUTS_KEY] = image_inputs
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([example[key] for example in examples])
        return batch


def require_processor(processing_class: Any, trainer: str) -> ProcessorMixin:
    """`processing_class` when it can process images (a processor with an image processor); else a `ValueError`."""
    if getattr(processing_class, "image_processor", None) is None:
        raise ValueError(
            f"{trainer} got a dataset with images, but its `processing_class` ({type(processing_class).__name__}) "
            "cannot process images. Pass the model's processor, e.g. `processing_class=AutoProcessor."
            "from_pretrained(model_id)`, or leave `processing_class` unset to load it with the model."
        )
    return processing_class
