"""Batch collators and the padding helper they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import ProcessorMixin
from transformers.data.data_collator import DataCollatorMixin

from .vision import batch_row_images, render_vision_rows


def pad(
    tensors: list[torch.Tensor],
    padding_value: int = 0,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> torch.Tensor:
    """Stack tensors of different lengths, padding every dimension to the largest size (TRL's `pad`).

    >>> pad([torch.tensor([1, 2, 3]), torch.tensor([4, 5])])
    tensor([[1, 2, 3],
            [4, 5, 0]])
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    if pad_to_multiple_of:
        shape[0] = -(-shape[0] // pad_to_multiple_of) * pad_to_multiple_of
    out = tensors[0].new_full((len(tensors), *shape), padding_value)
    for row, t in zip(out, tensors):
        start = shape[0] - t.shape[0] if padding_side == "left" else 0
        row[(slice(start, start + t.shape[0]), *(slice(0, s) for s in t.shape[1:]))] = t
    return out


def position_ids_from_lengths(seq_lengths: list[int]) -> torch.Tensor:
    """Positions restarting at 0 for each packed sequence: `[3, 2]` -> `[0, 1, 2, 0, 1]`."""
    lengths = torch.as_tensor(seq_lengths)
    starts = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return torch.arange(int(lengths.sum())) - starts


@dataclass
class DataCollatorForLanguageModeling(DataCollatorMixin):
    """Collate tokenized examples for causal language modeling (TRL's collator of the same name).

    Each example has `input_ids`, optionally `labels` (-100 where the loss is off; defaults to the input ids) and
    `seq_lengths` (lengths of the sequences packed into the row). Returns `input_ids`, `labels` and
    `attention_mask`, right-padded. With `padding_free=True` the batch is flattened into one row and
    `position_ids` (restarting at each sequence), `cu_seq_lens_q/k`, `max_length_q/k` and `seq_idx` replace the
    attention mask, so no token attends across a sequence boundary.

    >>> DataCollatorForLanguageModeling(pad_token_id=0)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    {'input_ids': tensor([[1, 2, 3], [4, 5, 0]]), 'labels': tensor([[1, 2, 3], [4, 5, -100]]),
     'attention_mask': tensor([[1, 1, 1], [1, 1, 0]])}
    """

    pad_token_id: int
    padding_free: bool = False
    return_position_ids: bool = False
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    @staticmethod
    def get_position_ids_from_packed_seq_lengths(batch_seq_lengths: list[list[int]]) -> list[torch.Tensor]:
        """Per row, positions restarting at 0 at each packed sequence: `[[3, 2], [2]]` -> `[[0, 1, 2, 0, 1], [0, 1]]`."""
        return [position_ids_from_lengths(seq_lengths) for seq_lengths in batch_seq_lengths]

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids = [torch.as_tensor(ex["input_ids"]) for ex in examples]
        labels = [torch.as_tensor(ex["labels"] if "labels" in ex else ex["input_ids"]) for ex in examples]
        if self.padding_free or self.return_position_ids:
            position_ids = [
                position_ids_from_lengths(ex["seq_lengths"]) if "seq_lengths" in ex else torch.arange(len(ids))
                for ex, ids in zip(examples, input_ids)
            ]
        multiple = self.pad_to_multiple_of
        if self.padding_free:
            input_ids, labels, position_ids = [torch.cat(input_ids)], [torch.cat(labels)], [torch.cat(position_ids)]
        out = {
            "input_ids": pad(input_ids, self.pad_token_id, pad_to_multiple_of=multiple),
            "labels": pad(labels, -100, pad_to_multiple_of=multiple),
        }
        if not self.padding_free:
            if self.return_position_ids:
                out["position_ids"] = pad(position_ids, 0, pad_to_multiple_of=multiple)
            out["attention_mask"] = pad([torch.ones_like(ids) for ids in input_ids], 0, pad_to_multiple_of=multiple)
            return out
        positions = pad(position_ids, 0, pad_to_multiple_of=multiple)
        out["position_ids"] = positions
        out["labels"][positions == 0] = -100  # a sequence's first token has no prediction from the one before
        starts = (positions[0] == 0).nonzero().flatten()
        cu_seq_lens = torch.cat([starts, torch.tensor([positions.size(1)])]).to(torch.int32)
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu_seq_lens
        out["max_length_q"] = out["max_length_k"] = int(cu_seq_lens.diff().max())
        out["seq_idx"] = torch.repeat_interleave(
            torch.arange(len(cu_seq_lens) - 1, dtype=torch.int32), cu_seq_lens.diff()
        )[None]
        return out


def truncate(ids: list, max_length: int | None, truncation_mode: str = "keep_start") -> list:
    """The first (`keep_start`) or last (`keep_end`) `max_length` items of `ids`; all of them when None."""
    if max_length is None:
        return ids
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"`truncation_mode` must be 'keep_start' or 'keep_end', got {truncation_mode!r}.")
    return ids[:max_length] if truncation_mode == "keep_start" else ids[-max_length:]


@dataclass
class DataCollatorForPreference(DataCollatorMixin):
    """Collate `prompt_ids` / `chosen_ids` / `rejected_ids` examples into one batch of 2B rows, chosen first
    (TRL's collator of the same name).

    Returns `input_ids`, `attention_mask` and `completion_mask` (1 on completion tokens), right-padded, each sequence
    truncated to `max_length`; `ref_chosen_logps` / `ref_rejected_logps` pass through when precomputed.

    >>> DataCollatorForPreference(pad_token_id=0)(
    ...     [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
    ...      {"prompt_ids": [7, 8], "chosen_ids": [9, 10], "rejected_ids": [11, 12, 13]}])["completion_mask"]
    tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 1]])
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                prompt, completion = ex["prompt_ids"], ex[key]
                sequences.append(torch.as_tensor(truncate(prompt + completion, self.max_length, self.truncation_mode)))
                mask = [0] * len(prompt) + [1] * len(completion)
                masks.append(torch.as_tensor(truncate(mask, self.max_length, self.truncation_mode)))
        multiple = self.pad_to_multiple_of
        out = {
            "input_ids": pad(sequences, self.pad_token_id, pad_to_multiple_of=multiple),
            "attention_mask": pad([torch.ones_like(s) for s in sequences], 0, pad_to_multiple_of=multiple),
            "completion_mask": pad(masks, 0, pad_to_multiple_of=multiple),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                out[key] = torch.tensor([ex[key] for ex in examples])
        return out


# --------------------------------------------------------------------------------------------- vision-language
# Images become pixel values only at batch time (doing it for a whole dataset up front costs too much disk), so these
# collators take raw rows and run the processor themselves: the prompts with their images, left-padded, the
# completions as text, right-padded, then join the two and flush the padding left.


def _process(processor: Any, texts: list[str], padding_side: str, return_tensors: str, images=None) -> dict:
    # add_special_tokens=False: a rendered chat template already holds the special tokens (no second BOS).
    kwargs = {"images": images} if images is not None else {}
    return processor(
        text=texts,
        padding=True,
        padding_side=padding_side,
        return_tensors=return_tensors,
        add_special_tokens=False,
        **kwargs,
    )


def _join_prompt_completion(prompts: Any, completions: Any, max_length: int | None) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `completion_mask` (and `token_type_ids` / `mm_token_type_ids` where the
    processor makes them) of left-padded prompts followed by right-padded completions, padding flushed left and
    every row cut to `max_length`."""
    from ..trainer.utils import flush_left  # trainer.utils imports the trainers, which import this module

    prompt_mask, completion_mask = prompts["attention_mask"], completions["attention_mask"]
    joined = {
        "attention_mask": torch.cat((prompt_mask, completion_mask), dim=1),
        "input_ids": torch.cat((prompts["input_ids"], completions["input_ids"]), dim=1),
        "completion_mask": torch.cat((torch.zeros_like(prompt_mask), completion_mask), dim=1),
    }
    if "token_type_ids" in prompts:  # Gemma
        joined["token_type_ids"] = torch.cat((prompts["token_type_ids"], completions["token_type_ids"]), dim=1)
    if "mm_token_type_ids" in prompts:  # Qwen2.5-VL: completions hold text only
        mm = prompts["mm_token_type_ids"]
        joined["mm_token_type_ids"] = torch.cat((mm, torch.zeros_like(completions["input_ids"])), dim=1)
    names = list(joined)
    flushed = flush_left(*joined.values())
    return {name: tensor[:, :max_length] for name, tensor in zip(names, flushed)}


def _no_pad_to_multiple_of(pad_to_multiple_of: int | None) -> None:
    if pad_to_multiple_of is not None:
        raise NotImplementedError(
            "`pad_to_multiple_of` is not implemented for vision-language prompt-completion data: the processor pads "
            "prompts and completions separately. Leave it unset."
        )


@dataclass
class DataCollatorForVisionLanguageModeling(DataCollatorMixin):
    """Collate raw vision-language rows for SFT, running `processor` over their images and text (TRL's collator of
    the same name, `trl.trainer.sft_trainer`).

    Rows hold `images` (a list) or `image`, and either `messages` / the `dataset_text_field` column (language
    modeling: the whole sequence is trained on, or only the assistant turns with `assistant_only_loss`) or `prompt`
    and `completion` (trained on the completion only with `completion_only_loss`). Returns the processor's outputs
    (`pixel_values`, ...) with right-padded `input_ids`, `attention_mask` and `labels` (-100 off the loss).
    """

    processor: ProcessorMixin
    max_length: int | None = None
    completion_only_loss: bool = False
    pad_to_multiple_of: int | None = None
    dataset_text_field: str = "text"
    assistant_only_loss: bool = False
    chat_template: str | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        first = examples[0]
        if self.assistant_only_loss and "messages" not in first:
            raise ValueError(
                "The `assistant_only_loss` argument is only supported for conversational language modeling datasets "
                "(a `messages` column); use `completion_only_loss` for prompt-completion rows."
            )
        if "messages" in first or self.dataset_text_field in first:
            if self.completion_only_loss:
                raise ValueError(
                    "The `completion_only_loss` argument is not supported for language modeling datasets: they have "
                    "no prompt/completion split. Use prompt-completion rows, or `assistant_only_loss` for messages."
                )
            return self._collate_language_modeling(examples)
        if "prompt" in first and "completion" in first:
            return self._collate_prompt_completion(examples)
        raise KeyError(
            f"Unexpected input keys in examples: {list(first)}. Expected `messages`, `{self.dataset_text_field}`, "
            "or `prompt` and `completion`."
        )

    def _collate_language_modeling(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from .formats import prepare_multimodal_messages

        images = batch_row_images(examples)
        processor_kwargs = {
            "padding": True,
            "padding_side": "right",
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "truncation": self.max_length is not None,
            "max_length": self.max_length,
            "add_special_tokens": False,  # the chat template already holds the special tokens
        }
        if "messages" in examples[0]:
            conversations = [
                prepare_multimodal_messages(ex["messages"], images=images[i] if images else None)
                for i, ex in enumerate(examples)
            ]
            output = self.processor.apply_chat_template(
                conversations,
                chat_template=self.chat_template,
                tokenize=True,
                return_dict=True,
                return_tensors=self.return_tensors,
                return_assistant_tokens_mask=self.assistant_only_loss,
                processor_kwargs=processor_kwargs,
            )
        else:
            texts = [ex[self.dataset_text_field] for ex in examples]
            image_kwargs = {"images": images} if images is not None else {}
            output = self.processor(text=texts, return_tensors=self.return_tensors, **image_kwargs, **processor_kwargs)
        labels = output["input_ids"].clone()
        labels[output["attention_mask"] == 0] = -100
        if self.assistant_only_loss:
            labels[output.pop("assistant_masks") == 0] = -100
        output["labels"] = labels
        return output

    def _collate_prompt_completion(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        _no_pad_to_multiple_of(self.pad_to_multiple_of)
        images = batch_row_images(examples)
        rows = render_vision_rows(examples, self.processor, ("completion",), images)
        prompts = _process(self.processor, [r["prompt"] for r in rows], "left", self.return_tensors, images)
        completions = _process(self.processor, [r["completion"] for r in rows], "right", self.return_tensors)
        joined = _join_prompt_completion(prompts, completions, self.max_length)
        completion_mask = joined.pop("completion_mask")
        labels = joined["input_ids"].clone()
        labels[joined["attention_mask"] == 0] = -100
        if self.completion_only_loss:
            labels[completion_mask == 0] = -100
        output = prompts  # keeps the processor's image fields
        output.update(joined, labels=labels)
        return output


@dataclass
class DataCollatorForVisionPreference(DataCollatorMixin):
    """Collate raw vision-language preference rows for DPO, running `processor` over images and text (TRL's
    collator of the same name, `trl.trainer.dpo_trainer`).

    Rows hold `images` (a list) or `image`, and `prompt`, `chosen`, `rejected` (text or messages). Returns the
    processor's image fields and 2B rows, the chosen ones first: `input_ids`, `attention_mask` and
    `completion_mask` (1 on completion tokens), the prompt's padding flushed left, cut to `max_length`.
    """

    processor: ProcessorMixin
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        _no_pad_to_multiple_of(self.pad_to_multiple_of)
        images = batch_row_images(examples)
        rows = render_vision_rows(examples, self.processor, ("chosen", "rejected"), images)
        prompt_texts = [r["prompt"] for r in rows] * 2  # one prompt per chosen row, one per rejected row
        completion_texts = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        prompts = _process(self.processor, prompt_texts, "left", self.return_tensors, images and images * 2)
        completions = _process(self.processor, completion_texts, "right", self.return_tensors)
        output = prompts  # keeps the processor's image fields
        output.update(_join_prompt_completion(prompts, completions, self.max_length))
        return output


@dataclass
class DataCollatorForVisionUnpairedPreference(DataCollatorMixin):
    """Collate raw vision-language unpaired preference rows for KTO, running `processor` over images and text
    (TRL's collator of the same name, `trl.trainer.kto_trainer`).

    Rows hold `images` (a list) or `image`, `prompt`, `completion` and a boolean `label`. Returns the processor's
    image fields, `input_ids`, `attention_mask`, `completion_mask` and `label`; with `calculate_kl`, also the
    mismatched pairs KTO estimates its KL term on (`KL_input_ids`, ...): each prompt with the previous row's
    completion.
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
        completion_texts = [r["completion"] for r in rows]
        prompts = _process(self.processor, [r["prompt"] for r in rows], "left", self.return_tensors, images)
        completions = _process(self.processor, completion_texts, "right", self.return_tensors)
        joined = _join_prompt_completion(prompts, completions, self.max_length)
        if self.calculate_kl:
            shifted = completion_texts[-1:] + completion_texts[:-1]
            kl_completions = _process(self.processor, shifted, "right", self.return_tensors)
            kl = _join_prompt_completion(prompts, kl_completions, self.max_length)
            joined.update({f"KL_{name}": tensor for name, tensor in kl.items()})
        output = prompts  # keeps the processor's image fields
        output.update(joined)
        output["label"] = torch.tensor([ex["label"] for ex in examples])  # a tensor, so Accelerate can gather it
        return output
