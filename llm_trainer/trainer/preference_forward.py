"""The concatenated forward of paired-preference trainers: one pass over [chosen; rejected] → sequence log-probs.

Used by `DPOTrainer` (policy and reference passes, precomputed reference log-probs) and meant for every trainer fed
by `DataCollatorForPreference` (ORPO, CPO): a batch holds 2B rows, the B chosen sequences first, then the B rejected
ones, with a `completion_mask` marking the completion tokens. The model must be patched by
`modeling.add_token_logprob_head`, so the `(2B, T, vocab)` logits are never built.

It also holds the packed forward of every preference trainer (`pack_rows`, `packed_token_outputs`): the padding of
the collated rows is stripped and every sequence concatenated into one row (`models.packed_attention`), a chosen and
a rejected row sharing their prompt once (each continuation attends to it), and the per-token outputs are scattered
back to the padded layout, so the losses and metrics read the same tensors as from a padded forward.

Vision-language batches (`data.preference_vision`) carry their images once per pair (`ImageInputs`): the forward runs
the vision encoder on them once (`encode_images`) and gives every row its pair's features, through the
`mm_encoder_outputs` keyword of transformers' VLMs; such batches run padded (packed attention refuses VLMs).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from ..data.preference_vision import IMAGE_INPUTS_KEY, ImageInputs
from ..losses import dpo_sequence_logps, sequence_logps
from ..modeling import TokenLogprobOutput, completion_labels
from ..models import packed_attention
from ..models.packed_attention import PackedLayout, Segment
from ..models.vision import unwrap_model

__all__ = [
    "NON_MODEL_KEYS",
    "ImageFeatures",
    "POLICY_OUTPUTS",
    "PackedRows",
    "PairedLogps",
    "concatenated_forward",
    "encode_images",
    "encodes_images_once",
    "forward_inputs",
    "pack_rows",
    "packed_token_outputs",
    "paired_token_metrics",
]

NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps", IMAGE_INPUTS_KEY})
"""Batch keys that are not model inputs (everything else in the batch is passed to the model, as TRL does)."""

POLICY_OUTPUTS = ("entropy", "is_top1", "mean_logits")
"""The per-token fields `paired_token_metrics` reads: pass them as `add_token_logprob_head(model, outputs=...)`."""


class PairedLogps(NamedTuple):
    """One [chosen; rejected] batch through a model."""

    chosen_logps: torch.Tensor
    """Sequence log-probs of the chosen completions, shape [B]."""
    rejected_logps: torch.Tensor
    """Sequence log-probs of the rejected completions, shape [B]."""
    per_token_logps: torch.Tensor
    """Next-token log-probs, shape [2B, T-1], 0 outside the completions."""
    mask: torch.Tensor
    """The completion mask shifted against the labels, shape [2B, T-1]."""
    outputs: Any
    """The model's `TokenLogprobOutput` (entropy, top-1 flags, mean logits, ... per token)."""


# ------------------------------------------------------------------------------------------------------- images
_PER_IMAGE_FIELDS = ("pooler_output",)
"""Fields of a vision encoder's output (`get_image_features`) that hold the features of each image: a sequence of
per-image tensors, or one tensor indexed by image (Gemma 3)."""
_PER_LAYER_FIELDS = ("deepstack_features",)
"""Fields that hold, per encoder layer, such per-image features (Qwen3-VL's deepstack features)."""

PerImage = torch.Tensor | tuple[torch.Tensor, ...]


def _map_per_image(output: ModelOutput, function: Callable[[PerImage], PerImage]) -> ModelOutput:
    """`output` with only its per-image fields, each one's per-image features passed through `function`."""
    fields: dict[str, Any] = {}
    for name in _PER_IMAGE_FIELDS:
        if output.get(name) is not None:
            fields[name] = function(_per_image(output[name]))
    for name in _PER_LAYER_FIELDS:
        if output.get(name) is not None:
            fields[name] = [function(_per_image(layer)) for layer in output[name]]
    return type(output)(**fields)


def _per_image(features: Any) -> PerImage:
    return features if isinstance(features, torch.Tensor) else tuple(features)


def _repeat_images(features: PerImage, copies: int) -> PerImage:
    if isinstance(features, torch.Tensor):
        return torch.cat([features] * copies, dim=0)
    return features * copies


def _detach_images(features: PerImage) -> PerImage:
    if isinstance(features, torch.Tensor):
        return features.detach()
    return tuple(feature.detach() for feature in features)


@dataclass(frozen=True)
class ImageFeatures:
    """A batch's images as model keywords, for `rows` rows of text.

    `encoded` is the vision encoder's output (its per-image features: `pooler_output`, and Qwen3-VL's deepstack
    features), computed once; `tensors` then holds the per-image tensors the forward still reads (Qwen-VL's
    `image_grid_thw`, for its positions). `encoded` is None where the model cannot take encoded images (or
    `encode_images(once=False)`): `tensors` are then the pixel tensors.
    """

    encoded: ModelOutput | None
    tensors: dict[str, torch.Tensor]
    rows: int

    def repeat(self, copies: int) -> ImageFeatures:
        """The features of `copies * rows` rows: every block of `rows` rows reads the same images."""
        if copies == 1:
            return self
        encoded = (
            None
            if self.encoded is None
            else _map_per_image(self.encoded, lambda images: _repeat_images(images, copies))
        )
        tensors = {key: torch.cat([value] * copies, dim=0) for key, value in self.tensors.items()}
        return ImageFeatures(encoded, tensors, self.rows * copies)

    def detach(self) -> ImageFeatures:
        """The same features cut from the graph (for a no-grad pass that reuses a gradient pass's encoding)."""
        if self.encoded is None:
            return self
        encoded = _map_per_image(self.encoded, _detach_images)
        return ImageFeatures(encoded, self.tensors, self.rows)

    def for_rows(self, rows: int) -> ImageFeatures:
        """The features repeated for a forward over `rows` rows (a multiple of `self.rows`)."""
        if rows % self.rows:
            raise ValueError(f"{rows} rows cannot share the images of {self.rows} rows.")
        return self.repeat(rows // self.rows)

    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(self.tensors)
        if self.encoded is not None:
            kwargs["mm_encoder_outputs"] = {"image": self.encoded}
        return kwargs


@functools.cache
def _encoder_keywords(model_type: type, encoder_type: type) -> tuple[frozenset[str], frozenset[str]] | None:
    """`(keywords of get_image_features, keywords of forward)`, or None when the forward takes no encoded images."""
    forward = inspect.signature(model_type.forward).parameters
    if "mm_encoder_outputs" not in forward:
        return None
    encoder = inspect.signature(encoder_type.get_image_features).parameters
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return (
        frozenset(name for name, p in encoder.items() if p.kind in named and name != "self"),
        frozenset(forward),
    )


def encode_images(model: torch.nn.Module, images: ImageInputs, *, once: bool = True) -> ImageFeatures:
    """`images` as keywords for `model` (a VLM, possibly PEFT-wrapped): with `once`, the vision encoder runs here,
    once, through the model's `get_image_features` (under the caller's grad / adapter context), and the forward
    gets the features as `mm_encoder_outputs`; otherwise (or where the model's forward has no `mm_encoder_outputs`)
    the pixel tensors themselves, which the model encodes in its forward."""
    hf_model = unwrap_model(model)
    encoder = getattr(hf_model, "base_model", hf_model)
    if not hasattr(encoder, "get_image_features"):
        encoder = hf_model
    keywords = _encoder_keywords(type(hf_model), type(encoder)) if hasattr(encoder, "get_image_features") else None
    if not once or keywords is None:
        return ImageFeatures(None, dict(images.tensors), images.rows)
    encoder_keywords, forward_keywords = keywords
    tensors = images.tensors
    output = encoder.get_image_features(
        **{key: value for key, value in tensors.items() if key in encoder_keywords}, return_dict=True
    )
    metadata = {
        key: value for key, value in tensors.items() if key in forward_keywords and not key.startswith("pixel_")
    }
    return ImageFeatures(_map_per_image(output, lambda features: features), metadata, images.rows)


def encodes_images_once(trainer: Any) -> bool:
    """Whether a trainer's forwards run the vision encoder themselves, once per batch (`encode_images`): not under
    FSDP or DeepSpeed, whose sharded parameters are gathered only inside the wrapped model's forward."""
    return not (getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False))


def forward_inputs(
    model: torch.nn.Module, batch: dict[str, Any], *, features: ImageFeatures | None = None, encode_once: bool = True
) -> dict[str, Any]:
    """The model keywords of a collated batch: every key but `NON_MODEL_KEYS`, plus its images (`features`, else
    encoded from the batch's `ImageInputs`) repeated for its rows."""
    inputs = {key: value for key, value in batch.items() if key not in NON_MODEL_KEYS}
    images = batch.get(IMAGE_INPUTS_KEY)
    if features is None and images is not None:
        features = encode_images(model, images, once=encode_once)
    if features is not None:
        inputs.update(features.for_rows(batch["input_ids"].size(0)).model_kwargs())
    return inputs


def concatenated_forward(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    ld_alpha: float | None = None,
    average: bool = False,
    packed: bool = False,
    encode_images_once: bool = True,
    **forward_kwargs: Any,
) -> PairedLogps:
    """Run a collated preference batch through `model` once and reduce the completion log-probs per sequence.

    The labels are the input ids with everything but the completion tokens set to -100. Sequence log-probs are the
    sum over the completion tokens, the LD-DPO sum when `ld_alpha` is set (see `losses.dpo_sequence_logps`), or the
    per-token average when `average` (ORPO, SimPO). `forward_kwargs` go to the model (e.g.
    `output_router_logits=True`).

    `packed` runs the rows as one packed row (`pack_rows`; `packed_attention.enable` must have run on `model`), each
    pair's prompt once, unless router logits are asked for (the MoE load-balancing loss counts every row's prompt).
    The outputs are the padded layout's, up to summation order. A batch with other model inputs than `input_ids` and
    `attention_mask` (images), or not right-padded, runs padded. A batch's `ImageInputs` (one per pair) are encoded
    once for both rows of each pair (`encode_images`, unless `encode_images_once=False`).
    """
    if average and ld_alpha is not None:
        raise ValueError("`average=True` and `ld_alpha` are exclusive: LD-DPO weights a summed log-prob.")
    completion_mask = batch["completion_mask"]
    model_inputs = forward_inputs(model, batch, encode_once=encode_images_once)
    labels = completion_labels(batch["input_ids"], completion_mask, batch.get("attention_mask"))
    mask = completion_mask[:, 1:]
    rows = None
    if packed and set(model_inputs) <= {"input_ids", "attention_mask"}:
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # the label each token predicts
        share = not forward_kwargs.get("output_router_logits", False)
        rows = pack_rows(batch["input_ids"], batch.get("attention_mask"), targets, share_pairs=share)
    if rows is not None:
        outputs = packed_token_outputs(model, rows, targets, next_token_layout=True, **forward_kwargs)
    else:
        outputs = model(**model_inputs, labels=labels, token_logprobs=True, **forward_kwargs)
    # Prompt-learning PEFT prepends virtual tokens to the outputs: keep the positions of the real tokens.
    per_token_logps = outputs.log_probs[:, -mask.size(1) :]
    if average:
        logps = sequence_logps(per_token_logps, mask, average=True)
    else:
        logps = dpo_sequence_logps(per_token_logps, mask, ld_alpha)
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    return PairedLogps(chosen_logps, rejected_logps, per_token_logps, mask, outputs)


def paired_token_metrics(
    forward: PairedLogps, sum_across_processes: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> dict[str, float]:
    """The per-token metrics TRL's `DPOTrainer` logs, token-weighted across processes.

    `entropy` (over every completion token), `logits/chosen` and `logits/rejected` (mean logit over the vocabulary,
    averaged over the chosen / rejected completion tokens; needs `mean_logits` from the forward) and
    `mean_token_accuracy` (top-1 accuracy on the chosen completion tokens). A metric over no tokens is 0.0.
    `sum_across_processes` sums a scalar tensor over processes (e.g. `base_trainer.gather_sum`); identity when None.
    """
    total = sum_across_processes or (lambda value: value)
    outputs, mask = forward.outputs, forward.mask
    seq_len = mask.size(1)
    bool_mask = mask.bool()
    chosen_mask, rejected_mask = bool_mask.chunk(2, dim=0)

    def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
        numerator, denominator = total(numerator.detach().float()), total(denominator.detach().float())
        return (numerator / denominator).item() if denominator.item() > 0 else 0.0

    entropy = outputs.entropy[:, -seq_len:]
    mean_logits = outputs.mean_logits[:, -seq_len:]
    chosen_logits, rejected_logits = mean_logits.chunk(2, dim=0)
    chosen_top1 = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)[0]
    return {
        "entropy": ratio((entropy * mask).sum(), mask.sum()),
        "logits/chosen": ratio(chosen_logits[chosen_mask].sum(), chosen_mask.sum()),
        "logits/rejected": ratio(rejected_logits[rejected_mask].sum(), rejected_mask.sum()),
        "mean_token_accuracy": ratio((chosen_top1 & chosen_mask).sum(), chosen_mask.sum()),
    }


# ------------------------------------------------------------------------------------------------------ packing
_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


@dataclass(frozen=True)
class PackedRows:
    """Right-padded rows laid out as one packed row.

    `input_ids` (`[total]`) and `layout` are what runs through the model; `index[r, j]` is the packed position of
    token `j` of row `r` (`total`, an always-zero slot, past the row's end). Rows that share a prefix map its tokens
    to the same positions.
    """

    layout: PackedLayout
    input_ids: torch.Tensor
    index: torch.Tensor
    lengths: torch.Tensor
    """Real tokens per row, `[rows]`."""

    @property
    def total(self) -> int:
        return self.layout.total

    def pack(self, values: torch.Tensor, fill: int | float) -> torch.Tensor:
        """`[rows, T]` per-token values → `[total]` (rows sharing a position must agree on its value)."""
        out = values.new_full((self.total + 1,), fill)
        out[self.index] = values
        return out[: self.total]

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """`[1, total]` per-position outputs → the padded `[rows, T]`, zero past each row's end (differentiable: a
        shared position's gradient is the sum over the rows reading it)."""
        flat = values.reshape(-1)
        return torch.cat([flat, flat.new_zeros(1)])[self.index]


def pack_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    targets: torch.Tensor | None = None,
    *,
    share_pairs: bool = False,
) -> PackedRows | None:
    """The packed layout of a right-padded batch, or None when `attention_mask` is not right padding.

    With `share_pairs`, the batch holds B pairs (row `i` and row `B + i`, chosen then rejected): the longest prefix
    the two rows share, in tokens and in `targets` (`[rows, T]`, what each token's output scores; None: tokens only),
    is packed once, except its last token, which starts each row's own segment (its output scores the row's next
    token). The segments of a pair sharing fewer than 2 tokens are independent.
    """
    num_rows, width = input_ids.shape
    columns = torch.arange(width, device=input_ids.device)
    if attention_mask is None:
        lengths = torch.full((num_rows,), width, device=input_ids.device)
    else:
        lengths = attention_mask.sum(dim=1)
        if not torch.equal(attention_mask.bool(), columns < lengths[:, None]):
            return None
    num_pairs = num_rows // 2 if share_pairs and num_rows % 2 == 0 else 0
    shared = [0] * num_pairs
    if num_pairs:
        shared = _shared_prefix_lengths(input_ids, lengths, targets, num_pairs).tolist()
    row_lengths = lengths.tolist()
    starts: list[list[tuple[int, int, int]]] = [[] for _ in range(num_rows)]  # (first token, last + 1, position)
    segments: list[Segment] = []

    def add(length: int, prefix: tuple[int, int] = (0, 0)) -> int:
        start = segments[-1].end if segments else 0
        segments.append(Segment(start, start + length, *prefix))
        return start

    for unit in _units(num_rows, num_pairs):
        if len(unit) == 2 and shared[unit[0]] >= 2:
            prefix_length = shared[unit[0]] - 1  # the shared tokens but the last
            prefix = add(prefix_length)
            for row in unit:
                starts[row].append((0, prefix_length, prefix))
                own = add(row_lengths[row] - prefix_length, (prefix, prefix + prefix_length))
                starts[row].append((prefix_length, row_lengths[row], own))
        else:
            for row in unit:
                if row_lengths[row]:
                    starts[row].append((0, row_lengths[row], add(row_lengths[row])))
    layout = PackedLayout(tuple(segments))
    index = torch.full((num_rows, width), layout.total, dtype=torch.long)
    for row, spans in enumerate(starts):
        for first, end, position in spans:
            index[row, first:end] = torch.arange(position, position + end - first)
    index = index.to(input_ids.device)
    rows = PackedRows(layout, input_ids.new_zeros(0), index, lengths)
    return PackedRows(layout, rows.pack(input_ids, 0), index, lengths)


def _units(num_rows: int, num_pairs: int) -> Iterable[tuple[int, ...]]:
    """The rows in packing order: each pair together, then any row in no pair."""
    for pair in range(num_pairs):
        yield (pair, num_pairs + pair)
    for row in range(2 * num_pairs, num_rows):
        yield (row,)


def _shared_prefix_lengths(
    input_ids: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor | None, num_pairs: int
) -> torch.Tensor:
    """Per pair, the number of leading tokens both rows hold, with the same targets on all of them but the last."""
    columns = torch.arange(input_ids.size(1), device=input_ids.device)
    within = columns < torch.minimum(lengths[:num_pairs], lengths[num_pairs:])[:, None]
    same_tokens = (input_ids[:num_pairs] == input_ids[num_pairs:]) & within
    shared = same_tokens.long().cumprod(dim=1).sum(dim=1)
    if targets is not None:
        same_targets = (targets[:num_pairs] == targets[num_pairs:]) & within
        shared = torch.minimum(shared, same_targets.long().cumprod(dim=1).sum(dim=1) + 1)
    return shared


def packed_token_outputs(
    model: torch.nn.Module,
    rows: PackedRows,
    targets: torch.Tensor,
    *,
    next_token_layout: bool = False,
    **forward_kwargs: Any,
) -> TokenLogprobOutput:
    """One packed forward through a model given `add_token_logprob_head` (and `packed_attention.enable`):
    `targets[r, j]` is the label token `j` of row `r` scores (-100: none); the per-token outputs come back in the
    padded `[rows, T]` layout, 0 past each row's end, or without the last column with `next_token_layout` (the
    `[rows, T - 1]` layout of a padded forward given `labels`). `forward_kwargs` go to the model."""
    device = rows.input_ids.device
    outputs = model(
        input_ids=rows.input_ids[None],
        **packed_attention.forward_kwargs(rows.layout, device),
        shift_labels=rows.pack(targets, -100)[None],
        token_logprobs=True,
        **forward_kwargs,
    )
    fields = {name: getattr(outputs, name) for name in _TOKEN_FIELDS}
    end = -1 if next_token_layout else None
    fields = {name: None if value is None else rows.unpack(value)[:, :end] for name, value in fields.items()}
    return TokenLogprobOutput(**fields, aux_loss=outputs.aux_loss)
