"""Generation with the policy itself, through `transformers`' `generate` (the default back end)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from .base import GenerationResult, Generator, SamplingConfig, as_id_list, check_prompts, truncate_at_eos


class TransformersGenerator(Generator):
    """Batched `model.generate` with left padding and a KV cache.

    Samples unless `sampling.temperature == 0` (greedy) and stops each completion at the first of `eos_token_id`.
    Generation runs under `torch.no_grad()` with the model in eval mode; its training mode is restored afterwards.
    `unwrap`, when given, is a factory of context managers yielding the model to generate with (the trainer's
    unwraps DDP, gathers ZeRO-3 parameters and pauses gradient checkpointing). `batch_size` caps the prompts per
    `generate` call (default: all at once). With `return_logprobs=True` the result carries each sampled token's
    log-probability after temperature and logit processing, as vLLM's `processed_logprobs` do.
    """

    def __init__(
        self,
        model,
        sampling: SamplingConfig,
        *,
        pad_token_id: int,
        eos_token_id: int | list[int],
        batch_size: int | None = None,
        cache_implementation: str | None = None,
        unwrap: Callable[[], AbstractContextManager] | None = None,
        return_logprobs: bool = False,
    ):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; pass the tokenizer's pad token id (or its eos id if it has none).")
        self.eos_token_ids = as_id_list(eos_token_id)
        if not self.eos_token_ids:
            raise ValueError("eos_token_id is empty; pass the token id(s) that end a completion.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}.")
        self.model = model
        self.sampling = sampling
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.cache_implementation = cache_implementation
        self.unwrap = unwrap
        self.return_logprobs = return_logprobs

    def generation_config(self):
        """The `GenerationConfig` every `generate` call uses; explicit values win over the model's defaults."""
        from transformers import GenerationConfig

        s = self.sampling
        kwargs = {
            "max_new_tokens": s.max_tokens,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_ids,
            "repetition_penalty": s.repetition_penalty,
            "cache_implementation": self.cache_implementation,
            "use_cache": True,
            "disable_compile": True,
            "return_dict_in_generate": True,
            "output_scores": self.return_logprobs,
        }
        if s.greedy:  # sampling filters are unused; transformers' own defaults keep it from warning about them
            kwargs.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)
        else:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p)
        kwargs.update(s.generation_kwargs or {})
        return GenerationConfig(**kwargs)

    def generate(self, prompt_ids: list[list[int]]) -> GenerationResult:
        check_prompts(prompt_ids)
        if not prompt_ids:
            return GenerationResult([], [] if self.return_logprobs else None)
        config = self.generation_config()
        step = self.batch_size or len(prompt_ids)
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        with self.unwrap() if self.unwrap is not None else contextlib.nullcontext(self.model) as model:
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    for start in range(0, len(prompt_ids), step):
                        ids, lps = self._generate_batch(model, prompt_ids[start : start + step], config)
                        completions += ids
                        logprobs += lps
            finally:
                model.train(was_training)
        return GenerationResult(completions, logprobs if self.return_logprobs else None)

    def left_padded(self, prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`prompts` as left-padded `input_ids` and their `attention_mask`, on `device`."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        return input_ids.to(device), attention_mask.to(device)

    def _generate_batch(self, model, prompts: list[list[int]], config) -> tuple[list[list[int]], list[list[float]]]:
        input_ids, attention_mask = self.left_padded(prompts, _device_of(model))
        width = input_ids.size(1)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        generated = out.sequences[:, width:]
        completions = [truncate_at_eos(row, self.eos_token_ids) for row in generated.tolist()]
        if not self.return_logprobs:
            return completions, []
        steps = [
            torch.log_softmax(score.float(), dim=-1).gather(1, generated[:, t : t + 1]).squeeze(1)
            for t, score in enumerate(out.scores)
        ]
        table = torch.stack(steps, dim=1).tolist()
        return completions, [row[: len(ids)] for row, ids in zip(table, completions)]


def _device_of(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device
