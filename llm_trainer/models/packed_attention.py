"""Packed sequences: several sequences in one row, attention kept inside each, no compute on padding.

A padded batch of preference pairs or RL completions spends most of its compute on pad tokens and, for GRPO/RLOO
groups, recomputes the same prompt once per completion. A *packed* forward concatenates the tokens of every
sequence into one row and describes who attends to whom with a `PackedLayout`: a list of contiguous `Segment`s,
each attending causally to itself and, optionally, to all of one earlier span (a shared prompt). Positions restart
per sequence (rotary embeddings see the same positions as in the padded layout), so the log-probs are those of the
padded forward up to summation order.

`enable(model)` makes the model's attention layers understand a `packed_layout=` keyword: it registers, once per
underlying implementation (`sdpa`, `eager`, `flash_attention_2`, ...), an attention function that runs every segment
with `scaled_dot_product_attention` when a layout is passed and is exactly the underlying implementation otherwise
(generation and plain forwards are unchanged). It is installed through transformers' `AttentionInterface`, so
gradient checkpointing (which re-runs layers with the same keywords) and adapters keep working. A packed forward is
then

    model(input_ids=tokens[None], **forward_kwargs(layout, device), shift_labels=targets[None], token_logprobs=True)

`forward_kwargs` passes a placeholder 4-D attention mask: transformers uses a 4-D mask as given, so no (T, T) mask
is built for the long packed row, and the placeholder's empty last dimension makes any attention that did not get
the layout fail loudly instead of attending across sequences.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "PackedLayout",
    "Segment",
    "enable",
    "forward_kwargs",
    "is_enabled",
    "is_placeholder_mask",
    "prepare",
    "resolve",
    "unsupported_reason",
]

_PREFIX = "llm_trainer_packed_"
_FALLBACK_INNER = "sdpa"


@dataclass(frozen=True)
class Segment:
    """Tokens `[start, end)` of the packed row: causal among themselves, and seeing all of `[prefix_start,
    prefix_end)` (an earlier span, e.g. the prompt a completion continues); an empty prefix sees nothing else."""

    start: int
    end: int
    prefix_start: int = 0
    prefix_end: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def prefix_length(self) -> int:
        return self.prefix_end - self.prefix_start


@dataclass(frozen=True)
class PackedLayout:
    """The segments of one packed row, in order and contiguous from 0 to `total`."""

    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        position = 0
        for index, seg in enumerate(self.segments):
            if seg.start != position or seg.end <= seg.start:
                raise ValueError(
                    f"Segment {index} spans [{seg.start}, {seg.end}); segments must be non-empty, ordered and "
                    f"contiguous (this one should start at {position})."
                )
            if seg.prefix_length < 0 or (
                seg.prefix_length and not 0 <= seg.prefix_start < seg.prefix_end <= seg.start
            ):
                raise ValueError(
                    f"Segment {index}'s prefix [{seg.prefix_start}, {seg.prefix_end}) must lie before the segment."
                )
            position = seg.end

    @functools.cached_property
    def lengths(self) -> list[int]:
        """Each segment's length, in order."""
        return [seg.length for seg in self.segments]

    @functools.cached_property
    def _segment_spans(self) -> dict[tuple[int, int], int]:
        return {(seg.start, seg.end): index for index, seg in enumerate(self.segments)}

    def prefix_segment(self, index: int) -> int | None:
        """The index of the segment whose span is exactly segment `index`'s prefix, if one is."""
        seg = self.segments[index]
        return self._segment_spans.get((seg.prefix_start, seg.prefix_end))

    @property
    def total(self) -> int:
        return self.segments[-1].end if self.segments else 0

    @classmethod
    def from_lengths(cls, lengths: Iterable[int]) -> PackedLayout:
        """Independent sequences of the given lengths, one after another (plain padding-free packing)."""
        segments, start = [], 0
        for length in lengths:
            segments.append(Segment(start, start + int(length)))
            start += int(length)
        return cls(tuple(segments))

    def position_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """`[1, total]` positions: 0, 1, ... within a segment without prefix; a segment with a prefix continues
        from the position after its prefix's last token (a completion continues its prompt)."""
        positions: list[int] = []
        for seg in self.segments:
            first = positions[seg.prefix_end - 1] + 1 if seg.prefix_length else 0
            positions.extend(range(first, first + seg.length))
        return torch.tensor(positions, dtype=torch.long, device=device).unsqueeze(0)


def forward_kwargs(layout: PackedLayout, device: torch.device | str | None = None) -> dict[str, Any]:
    """The keywords of a packed forward through a model `enable` was called on (see the module docstring)."""
    return {
        "position_ids": layout.position_ids(device),
        "attention_mask": _placeholder_mask(device),
        "packed_layout": layout,
    }


def _placeholder_mask(device: torch.device | str | None) -> torch.Tensor:
    return torch.ones((1, 1, 1, 0), dtype=torch.bool, device=device)


def is_placeholder_mask(mask: Any) -> bool:
    """Whether `mask` is `forward_kwargs`' placeholder (code reading `attention_mask` must treat it as "none")."""
    return isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.size(-1) == 0


# ----------------------------------------------------------------------------------------------- model support
def _inner_model(model: Any) -> Any:
    """The transformers model under PEFT / DDP wrappers."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def unsupported_reason(model: Any) -> str | None:
    """Why `model`'s attention cannot run packed sequences, or None when it can.

    Supported: decoder-only text models whose attention layers go through transformers' `AttentionInterface` with
    plain causal softmax attention and rotary positions. Not supported: sliding-window attention, logit soft-capping,
    learned absolute positions, encoder-decoders and multimodal models, and models that implement their attention
    themselves; PEFT prompt-learning adapters (prompt / prefix tuning), which prepend virtual tokens to every row.
    """
    peft_model = getattr(model, "module", model)
    adapter = getattr(peft_model, "peft_config", {}).get(getattr(peft_model, "active_adapter", None))
    if getattr(adapter, "is_prompt_learning", False):
        return f"the PEFT adapter is {type(adapter).__name__} (virtual tokens prepended to every row)"
    model = _inner_model(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return f"{type(model).__name__} is not a transformers model"
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder"
    if getattr(config, "vision_config", None) is not None or getattr(config, "audio_config", None) is not None:
        return f"{name} is a multimodal model"
    if not type(model)._can_set_attn_implementation():
        return f"{name} implements its attention itself (not through transformers' AttentionInterface)"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or ()
    window = getattr(text, "sliding_window", None)
    if "sliding_attention" in layer_types or (window is not None and getattr(text, "use_sliding_window", True)):
        return f"{name} uses sliding-window attention"
    if getattr(text, "rope_parameters", None) is None and getattr(text, "rope_theta", None) is None:
        # Rotary attention depends on relative positions only, so restarting them per sequence changes nothing; with
        # learned absolute positions, left-padded rows (shifted positions) and packed rows would differ.
        return f"{name} has no rotary position embeddings"
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return f"{name} soft-caps its attention logits"
    if _inner_name(config) == "flex_attention":
        return f"{name} runs flex_attention, which packs with block masks of its own"
    return None


def resolve(model: Any, setting: bool | None, where: str, reason: str | None = None) -> bool:
    """Whether to run `model` packed: `setting` None means wherever supported, True requires it (a clear error when
    the model cannot), False never. `where` names the option for the error (e.g. "DPOConfig.packed_forward");
    `reason` is the caller's own reason not to pack, checked first."""
    if setting is False:
        return False
    reason = reason or unsupported_reason(model)
    if reason is None:
        return True
    if setting:
        raise ValueError(
            f"{where}=True needs packed sequences, but {reason}. Set {where}=False (or leave it None) to train on "
            "padded batches."
        )
    return False


def prepare(models: Iterable[Any], setting: bool | None, where: str, reason: str | None = None) -> bool:
    """`resolve` for a trainer's models together (None entries skipped): packed only if every one can be, and then
    `enable`d on each. Call before wrapping the models."""
    models = [model for model in models if model is not None]
    if not all([resolve(model, setting, where, reason) for model in models]):
        return False
    for model in models:
        enable(model)
    return True


def is_enabled(model: Any) -> bool:
    """Whether `enable` was called on `model`."""
    return str(_inner_model(model).config._attn_implementation or "").startswith(_PREFIX)


def enable(model: Any) -> None:
    """Let `model`'s attention take `packed_layout=` (idempotent). Raises ValueError when `unsupported_reason`."""
    inner_model = _inner_model(model)
    if is_enabled(inner_model):
        return
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"Cannot run packed sequences: {reason}.")
    inner = inner_model.config._attn_implementation or "eager"
    inner_model.set_attn_implementation(_register(inner))


def _inner_name(config: Any) -> str:
    name = str(config._attn_implementation or "eager")
    return name[len(_PREFIX) :] if name.startswith(_PREFIX) else name


@functools.cache
def _register(inner: str) -> str:
    """Register the packed attention (and its mask function) wrapping implementation `inner`; returns its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = _PREFIX + inner

    def attention(module, query, key, value, attention_mask, *args, packed_layout=None, **kwargs):
        if packed_layout is None:
            return _inner_function(module, inner)(module, query, key, value, attention_mask, *args, **kwargs)
        return _packed_attention(module, query, key, value, packed_layout, **kwargs)

    AttentionInterface.register(name, attention)
    masks = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    AttentionMaskInterface.register(name, masks.get(inner, masks[_FALLBACK_INNER]))
    return name


def _inner_function(module: torch.nn.Module, inner: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if inner == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(f"{type(module).__name__}'s module defines no eager_attention_forward.")
        return eager
    return ALL_ATTENTION_FUNCTIONS[inner]


@functools.lru_cache(maxsize=256)
def _prefix_mask(query_length: int, prefix_length: int, device: torch.device) -> torch.Tensor:
    """`[Lq, Lp + Lq]` bool: every query sees the whole prefix, and its own segment causally."""
    causal = torch.ones(query_length, query_length, dtype=torch.bool, device=device).tril()
    prefix = torch.ones(query_length, prefix_length, dtype=torch.bool, device=device)
    return torch.cat([prefix, causal], dim=1)


def _packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: PackedLayout,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of a packed row, segment by segment: `query [1, H, T, D]`, `key`/`value [1, Hkv, T, D]` →
    `([1, T, H, D], None)` as transformers' attention functions return."""
    if query.size(0) != 1 or query.size(2) != layout.total:
        raise ValueError(
            f"A packed forward takes one row of {layout.total} tokens; the attention got a batch of {query.size(0)} "
            f"rows of {query.size(2)}."
        )
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ValueError("Packed attention does not support soft-capping or sliding windows.")
    gqa = query.size(1) != key.size(1)
    # One split per tensor, not a slice per segment: a slice's backward writes a full-size zero gradient each time.
    queries, keys, values = (t.split(layout.lengths, dim=2) for t in (query, key, value))
    outputs = []
    for index, seg in enumerate(layout.segments):
        q, k, v = queries[index], keys[index], values[index]
        if seg.prefix_length:
            owner = layout.prefix_segment(index)
            if owner is None:
                prefix_k = key[:, :, seg.prefix_start : seg.prefix_end]
                prefix_v = value[:, :, seg.prefix_start : seg.prefix_end]
            else:
                prefix_k, prefix_v = keys[owner], values[owner]
            k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
            mask = _prefix_mask(seg.length, seg.prefix_length, query.device)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=gqa
            )
        outputs.append(out)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None
