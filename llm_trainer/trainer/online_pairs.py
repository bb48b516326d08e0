"""What XPO and Nash-MD add to Online DPO's machinery: a second sampler (the reference policy, or the geometric
mixture of policy and reference) and per-epoch schedules."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..data.formats import is_conversational
from ..generation.base import SamplingConfig, truncate_at_eos
from ..generation.loop import OnlineBatch, Rollout, generation_tokens, tokenize_prompts
from ..generation.transformers_backend import TransformersGenerator


def scheduled(values: float | Sequence[float], epoch: float | None) -> float:
    """The value of a per-epoch schedule: a number, or a list with one value per epoch (the last for later ones)."""
    if isinstance(values, list | tuple):
        return float(values[min(int(epoch or 0), len(values) - 1)])
    return float(values)


def normalize_schedule(config: Any, name: str, low: float, high: float | None = None) -> None:
    """`config.<name>` as a number or a list of numbers (a one-element list becomes its number), each in
    [low, high]; anything else raises a ValueError naming the field."""
    value = getattr(config, name)
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple) or not value or any(isinstance(v, bool) for v in value):
        raise ValueError(f"`{name}` must be a number or a non-empty list of numbers (one per epoch), got {value!r}.")
    if any(not isinstance(v, int | float) or v < low or (high is not None and v > high) for v in value):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"Every `{name}` value must be {bound}, got {value!r}.")
    setattr(config, name, float(value[0]) if len(value) == 1 else [float(v) for v in value])


class GeometricMixtureLogits(LogitsProcessor):
    """Turns the policy's next-token logits into those of the geometric mixture
    `log_softmax(coef * reference + (1 - coef) * policy)`; `reference(input_ids, attention_mask)` returns the
    reference's last-position logits of the sequences so far (left-padded prompts: `prompt_mask` marks real tokens)."""

    def __init__(self, reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], prompt_mask, coef: float):
        self.reference, self.prompt_mask, self.coef = reference, prompt_mask, coef

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        extra = input_ids.size(1) - self.prompt_mask.size(1)
        mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones(input_ids.size(0), extra)], dim=1)
        ref_logits = self.reference(input_ids, mask).to(scores.dtype)
        return torch.log_softmax(self.coef * ref_logits + (1 - self.coef) * scores, dim=-1)


class MixtureGenerator(TransformersGenerator):
    """`TransformersGenerator` sampling from the geometric mixture of the policy and `reference`, weighted by
    `coef()` (read at each call: it follows the schedule). The reference runs without a KV cache, on the whole
    sequence at each step."""

    def __init__(self, *args, reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], coef, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference, self.coef = reference, coef

    def _generate_batch(
        self, model, prompts: list[list[int]], config, synced: bool = False, vision: None = None
    ) -> tuple[list[list[int]], list[list[float]]]:
        """`vision` is always None: Nash-MD trains on text only (image columns are refused)."""
        input_ids, attention_mask = self.left_padded(prompts, next(model.parameters()).device)
        width = input_ids.size(1)
        mixture = GeometricMixtureLogits(self.reference, attention_mask, self.coef())
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([mixture]),
            synced_gpus=synced or None,  # sharded policies step in lockstep (see TransformersGenerator)
        )
        generated = out.sequences[:, width:]
        return [truncate_at_eos(row, self.eos_token_ids) for row in generated.tolist()], []


@contextlib.contextmanager
def reference_for_generation(trainer: Any) -> Iterator[torch.nn.Module]:
    """The reference policy, ready for `generate`: the separate frozen model, or (PEFT) the policy with the
    reference adapter selected."""
    if trainer.reference.model is not None:
        yield trainer.reference.model
        return
    with trainer.unwrapped_for_generation() as model, trainer.reference.context(model):
        yield model


def reference_last_logits(trainer: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`f(input_ids, attention_mask)` -> the reference policy's logits at the last position (left padding)."""

    def last_logits(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if trainer.reference.model is not None:
            model, context = trainer.reference.model, contextlib.nullcontext()
        else:
            model = trainer.accelerator.unwrap_model(trainer.model)
            context = trainer.reference.context(model)
        with torch.no_grad(), context:
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        return out.logits[:, -1, :].float()

    return last_logits


def sample_against(trainer: Any, rows: list[dict[str, Any]], model: torch.nn.Module, second: Any):
    """One completion per prompt from the policy and one from `second` (a generator), as a [policy; second] batch
    of 2B rows (prompts left-truncated so that prompt + completion fits `max_length`). Returns (texts, batch)."""
    prompts = [row["prompt"] for row in rows]
    trainer.rollouts.sync_weights(trainer.accelerator.unwrap_model(model), trainer.state.global_step)
    conversational = is_conversational({"prompt": prompts[0]})
    if conversational:
        prompt_ids = tokenize_prompts(trainer.processing_class, prompts, trainer.args.chat_template_kwargs or {})
    else:
        prompt_ids = trainer._tokenizer(text=prompts, add_special_tokens=False)["input_ids"]
    prompt_ids = [list(ids) for ids in prompt_ids]
    completion_ids = list(trainer.rollouts.generator.generate(prompt_ids).completion_ids)
    completion_ids += list(second.generate(prompt_ids).completion_ids)
    texts = trainer.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
    if conversational:
        texts = [[{"role": "assistant", "content": text}] for text in texts]
    batch = trainer.rollouts.pad(Rollout(prompt_ids * 2, completion_ids, texts))
    cut = max(batch.prompt_ids.size(1) + batch.completion_ids.size(1) - trainer.max_length, 0)
    batch.prompt_ids, batch.prompt_mask = batch.prompt_ids[:, cut:], batch.prompt_mask[:, cut:]
    return texts, batch


def first_half(batch: OnlineBatch) -> OnlineBatch:
    """The policy's rows of a [policy; second] batch."""
    size = batch.prompt_ids.size(0) // 2
    return OnlineBatch(
        batch.prompt_ids[:size], batch.prompt_mask[:size], batch.completion_ids[:size], batch.completion_mask[:size]
    )


def second_generator(trainer: Any, args: Any, **kwargs) -> TransformersGenerator:
    """A `transformers` generator with the policy's sampling settings, for the second completion; `kwargs` pick the
    model (`unwrap`) and, for `MixtureGenerator`, the reference and coefficient."""
    tokenizer = trainer._tokenizer
    eos = generation_tokens(trainer.accelerator.unwrap_model(trainer.model), tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    cls = MixtureGenerator if "reference" in kwargs else TransformersGenerator
    return cls(
        trainer.model,
        SamplingConfig.from_args(args),
        pad_token_id=pad,
        eos_token_id=eos,
        cache_implementation=getattr(args, "cache_implementation", None),
        **kwargs,
    )
