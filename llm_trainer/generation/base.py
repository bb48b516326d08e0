"""The generation interface every back end implements, and the helpers they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


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


class Generator(ABC):
    """Generates one completion per prompt with the policy's current weights."""

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
