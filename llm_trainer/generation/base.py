"""The generation interface every back end implements, and the helpers they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from typing import Any

import torch


@dataclass
class SamplingConfig:
    """How to sample completions; the fields of TRL's `GRPOConfig` that control generation.

    `temperature=0` means greedy decoding, `top_k=0` and `min_p=None` disable those filters, and `generation_kwargs`
    go to the back end as-is (`GenerationConfig` fields for transformers, `SamplingParams` fields for vLLM), taking
    precedence over the other fields.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    generation_kwargs: dict | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables top-k), got {self.top_k}.")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_args(cls, args: Any) -> SamplingConfig:
        """Read the sampling fields of a `GRPOConfig`/`RLOOConfig`-like object (TRL's names and defaults)."""
        max_tokens = getattr(args, "max_completion_length", None)
        return cls(
            max_tokens=cls.max_tokens if max_tokens is None else max_tokens,
            temperature=getattr(args, "temperature", 1.0),
            top_p=getattr(args, "top_p", 1.0),
            top_k=getattr(args, "top_k", 0) or 0,
            min_p=getattr(args, "min_p", None),
            repetition_penalty=getattr(args, "repetition_penalty", 1.0),
            generation_kwargs=getattr(args, "generation_kwargs", None),
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    """Completions in the order of the prompts.

    `completion_ids[i]` excludes the prompt, ends at (and includes) the first eos token when one was generated, and
    has no padding. `logprobs[i][t]` is the sampling log-probability of `completion_ids[i][t]` (after temperature and
    logit processing), or `logprobs` is `None` when the back end does not report them. `model_version` is the
    version of the weights that produced them when the back end reports one (a generation server), else `None`.
    """

    completion_ids: list[list[int]]
    logprobs: list[list[float]] | None = None
    model_version: int | None = None


TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")
"""Per-token fields of a VLM processor's output (aligned with `input_ids`); every other non-text field is per image."""


@dataclass
class VisionInputs:
    """The processor's image tensors for a batch of prompts, as the vision-language model's forward takes them.

    `num_images[i]` images belong to row `i`. `tensors` are indexed by image or by image patch, rows in order, as the
    processor returns them (`pixel_values`, Qwen-VL's `image_grid_thw`, LLaVA-Next's `image_sizes`, ...);
    `token_types` are per token (`mm_token_type_ids`, `token_type_ids`), `[rows, width]` and left-padded like the
    prompts they describe. `select` re-slices the per-image tensors by row (`split_pixel_values_by_grid`), so a
    batch can be shuffled and cut into micro-batches with each row keeping its own images.
    """

    num_images: list[int]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    token_types: dict[str, torch.Tensor] = field(default_factory=dict)
    completion_types: dict[str, int] = field(default_factory=dict)
    """The value a token type takes on generated tokens (0, text, unless given: PaliGemma's suffix tokens are 1,
    as its `generate` extends them)."""

    @property
    def rows(self) -> int:
        return len(self.num_images)

    def select(self, rows: torch.Tensor | Sequence[int]) -> VisionInputs:
        """The inputs of `rows` (indices, in that order)."""
        from ..trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

        index = torch.as_tensor(rows, dtype=torch.long).reshape(-1).tolist()
        if self._padded_per_row():
            tensors = {key: value[index] for key, value in self.tensors.items()}
            token_types = {key: value[index] for key, value in self.token_types.items()}
            return VisionInputs([self.num_images[i] for i in index], tensors, token_types, self.completion_types)
        split = split_pixel_values_by_grid({**self.tensors, "num_images": self.num_images})
        picked: dict[str, Any] = {}
        for key, value in self.tensors.items():
            parts = split[key]
            if isinstance(parts, list):  # one entry per row
                picked[key] = [parts[i] for i in index]
            elif value.dim() and value.size(0) == self.rows and sum(self.num_images) != self.rows:
                picked[key] = value[index]  # already one (padded) entry per row (Idefics)
            else:
                picked[key] = self._by_image(key, value, index)
        tensors = {key: value for key, value in unsplit_pixel_values_by_grid(picked).items() if key != "num_images"}
        token_types = {key: value[index] for key, value in self.token_types.items()}
        return VisionInputs([self.num_images[i] for i in index], tensors, token_types, self.completion_types)

    def _padded_per_row(self) -> bool:
        """Whether the image tensors hold one padded entry per row (Idefics2/3, SmolVLM: `pixel_values`
        `[rows, max images, C, H, W]` with a `pixel_attention_mask`), which a count of images per row could not tell
        apart from one entry per image when the counts add up to the rows (e.g. rows of 0 and 2 images)."""
        pixels, mask = self.tensors.get("pixel_values"), self.tensors.get("pixel_attention_mask")
        return (
            pixels is not None
            and mask is not None
            and "spatial_shapes" not in self.tensors
            and pixels.dim() == 5
            and mask.dim() == 4
            and pixels.size(0) == mask.size(0) == self.rows
        )

    def _by_image(self, key: str, value: torch.Tensor, index: list[int]) -> torch.Tensor:
        """A tensor with one entry per image that `split_pixel_values_by_grid` leaves whole (e.g. `image_sizes`
        next to Qwen-VL grids), picked by row; anything else cannot be re-sliced."""
        if not value.dim() or value.size(0) != sum(self.num_images):
            raise ValueError(
                f"Cannot split the processor's '{key}' ({tuple(value.shape)}) by row: it has neither one entry per "
                f"image ({sum(self.num_images)}) nor one per row ({self.rows})."
            )
        starts = list(accumulate(self.num_images, initial=0))
        return torch.cat([value[starts[i] : starts[i + 1]] for i in index]) if index else value[:0]

    def model_kwargs(self, width: int | None = None) -> dict[str, torch.Tensor]:
        """Keywords for the model's forward or `generate` on these rows: the image tensors (none when the rows hold no
        image) and the token types to `width` columns: extended on the right for the completion tokens (with their
        `completion_types` value), or cut on the left for `generate` on a narrower left-padded prompt batch."""
        kwargs = dict(self.tensors) if sum(self.num_images) else {}
        for key, value in self.token_types.items():
            if width is not None and width < value.size(1):
                value = value[:, value.size(1) - width :]
            elif width is not None and width > value.size(1):
                fill = value.new_full((value.size(0), width - value.size(1)), self.completion_types.get(key, 0))
                value = torch.cat([value, fill], dim=1)
            kwargs[key] = value
        return kwargs

    def to(self, device: torch.device | str) -> VisionInputs:
        return VisionInputs(
            list(self.num_images),
            {key: value.to(device) for key, value in self.tensors.items()},
            {key: value.to(device) for key, value in self.token_types.items()},
            dict(self.completion_types),
        )

    def state(self) -> dict[str, Any]:
        """Plain tensors and lists (what `torch.load(weights_only=True)` reads back), for `from_state`."""
        return {
            "num_images": list(self.num_images),
            "tensors": self.tensors,
            "token_types": self.token_types,
            "completion_types": dict(self.completion_types),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> VisionInputs:
        types = dict(state.get("completion_types", {}))
        return cls(list(state["num_images"]), dict(state["tensors"]), dict(state["token_types"]), types)


class Generator(ABC):
    """Generates one completion per prompt with the policy's current weights.

    A back end that generates from images too sets `supports_images` and takes `images` (PIL images per prompt) and
    `vision` (the processor's tensors for the prompts, `VisionInputs`) as keywords of `generate`; the trainers pass
    them only for prompts with images, and refuse image datasets before training with a back end that cannot.
    """

    supports_images: bool = False

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]]) -> GenerationResult:
        """One completion for each entry of `prompt_ids` (token ids, no padding).

        The trainer repeats each prompt `num_generations` times consecutively; back ends may generate identical
        consecutive prompts as one request with `n > 1`.
        """

    def sync_weights(self, model) -> None:  # noqa: B027 - a no-op unless the back end holds its own copy
        """Push `model`'s current weights to the back end (a no-op when it generates with `model` itself)."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release the back end's resources."""


def as_id_list(token_ids: int | Sequence[int] | None) -> list[int]:
    """`None`, one id or several ids, as a list."""
    if token_ids is None:
        return []
    if isinstance(token_ids, int):
        return [token_ids]
    return list(token_ids)


def truncate_at_eos(ids: Sequence[int], eos_token_ids: Iterable[int]) -> list[int]:
    """`ids` up to and including the first eos token (all of `ids` when none occurs)."""
    stops = set(eos_token_ids)
    for i, token in enumerate(ids):
        if token in stops:
            return list(ids[: i + 1])
    return list(ids)


def consecutive_runs(prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Collapse runs of identical consecutive prompts: `(unique prompts, run lengths)`."""
    prompts: list[list[int]] = []
    counts: list[int] = []
    for ids in prompt_ids:
        ids = list(ids)
        if prompts and prompts[-1] == ids:
            counts[-1] += 1
        else:
            prompts.append(ids)
            counts.append(1)
    return prompts, counts


def check_prompts(prompt_ids: list[list[int]]) -> None:
    """Raise a clear error for input `generate` cannot use."""
    if not isinstance(prompt_ids, (list, tuple)):
        raise TypeError(f"prompt_ids must be a list of token-id lists, got {type(prompt_ids).__name__}.")
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt_ids[{i}] is empty; every prompt needs at least one token.")
