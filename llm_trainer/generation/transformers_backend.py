"""Generation with the policy itself, through `transformers`' `generate` (the default back end)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from .base import GenerationResult, Generator, SamplingConfig, as_id_list, check_prompts, truncate_at_eos

logger = logging.getLogger(__name__)


class TransformersGenerator(Generator):
    """Batched generation with the policy: `decode.decode` (`fast=True`, the default) or `model.generate`.

    Samples unless `sampling.temperature == 0` (greedy) and stops each completion at the first of `eos_token_id`.
    Generation runs under `torch.no_grad()` with the model in eval mode; its training mode is restored afterwards.
    `unwrap`, when given, is a factory of context managers yielding the model to generate with (the trainer's
    unwraps DDP, gathers ZeRO-3 parameters and pauses gradient checkpointing). `batch_size` caps the prompts per
    `generate` call (default: all at once). With `return_logprobs=True` the result carries each sampled token's
    log-probability after temperature and logit processing, as vLLM's `processed_logprobs` do.

    With sharded parameters (FSDP2 DTensors, DeepSpeed ZeRO-3) across several processes, every forward is a
    collective, so all processes generate in lockstep: each makes as many `generate` calls as the busiest one (a
    process with fewer prompts, or none, runs stand-in calls whose output it drops), and within a call keeps
    stepping until every process's sequences are done (`synced_gpus`). Without that, a process whose completions
    end early would leave the others waiting forever in an all-gather. Under FSDP2 the shards stay gathered for
    the whole `generate` call (one all-gather per module per call, not per token), then are freed.

    `fast=True` runs the lean loop of `llm_trainer.generation.decode` instead of `model.generate`: each distinct
    prompt prefilled once and its KV cache shared by its repeats, a preallocated cache, nothing per step but the
    model call, the logits processors and the sampler. It samples the same tokens as `generate` under the same seed
    (see that module), and hands a call to `generate` (saying why, once per reason) for what it does not implement:
    `generation_kwargs` beyond the sampling ones, a `cache_implementation`, lockstep (sharded) generation,
    encoder-decoders, caches that are not plain `DynamicCache` layers. `compact_finished=True` (the default) also drops
    finished rows from the batch once a quarter of it has stopped; the random draws stay those of the full batch, so
    the tokens do not change.
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
        fast: bool = True,
        compact_finished: bool = True,
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
        self.fast = fast
        self.compact_finished = compact_finished
        self.fallback_reason: str | None = None  # why the last call used `generate` although `fast` is set
        self._reasons_logged: set[str] = set()
        self.forward_rows = 0  # rows the fast loop ran through the model (prefill + decode steps), for diagnostics

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
        lockstep = needs_lockstep(self.model)
        if not prompt_ids and not lockstep:
            return GenerationResult([], [] if self.return_logprobs else None)
        config = self.generation_config()
        step = self.batch_size or len(prompt_ids) or 1
        calls = -(-len(prompt_ids) // step)
        if lockstep:
            calls = _max_over_processes(calls, self.model)
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        with self.unwrap() if self.unwrap is not None else contextlib.nullcontext(self.model) as model:
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    for call in range(calls):
                        batch = prompt_ids[call * step : (call + 1) * step]
                        with _fsdp2_gathered(model) if lockstep else contextlib.nullcontext():
                            prompts = batch or self._stand_in(prompt_ids)
                            ids, lps = self._generate_batch(model, prompts, config, synced=lockstep)
                        if batch:  # a stand-in call only keeps the other processes' collectives company
                            completions += ids
                            logprobs += lps
            finally:
                model.train(was_training)
        return GenerationResult(completions, logprobs if self.return_logprobs else None)

    def _stand_in(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """A one-prompt batch for a lockstep call this process has no prompts for."""
        return prompt_ids[:1] or [[self.pad_token_id]]

    def left_padded(self, prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`prompts` as left-padded `input_ids` and their `attention_mask`, on `device`."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        return input_ids.to(device), attention_mask.to(device)

    def _generate_batch(
        self, model, prompts: list[list[int]], config, synced: bool = False
    ) -> tuple[list[list[int]], list[list[float]]]:
        if self.fast:
            from . import decode

            reason = decode.unsupported_reason(
                model, config, lockstep=synced, extra_kwargs=(self.sampling.generation_kwargs or {}).keys()
            )
            if reason is None:
                try:
                    completions, logprobs, rows = decode.decode(
                        model,
                        prompts,
                        decode.plan_from(model, config),
                        compact_finished=self.compact_finished,
                        return_logprobs=self.return_logprobs,
                    )
                except decode.CacheUnsupported as error:  # raised before anything is sampled
                    reason = str(error)
                else:
                    self.fallback_reason = None
                    self.forward_rows += rows
                    return [truncate_at_eos(ids, self.eos_token_ids) for ids in completions], logprobs
            self._note_fallback(reason)
        return self._generate_with_generate(model, prompts, config, synced)

    def _note_fallback(self, reason: str) -> None:
        self.fallback_reason = reason
        if reason not in self._reasons_logged:
            self._reasons_logged.add(reason)
            logger.warning("Fast generation does not support this setup (%s); using `model.generate`.", reason)

    def _generate_with_generate(
        self, model, prompts: list[list[int]], config, synced: bool = False
    ) -> tuple[list[list[int]], list[list[float]]]:
        input_ids, attention_mask = self.left_padded(prompts, _device_of(model))
        width = input_ids.size(1)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config, synced_gpus=synced or None
        )
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


def needs_lockstep(model) -> bool:
    """Whether `generate` with `model` must run in lockstep over the processes (`synced_gpus=True`, the same number
    of calls everywhere): its parameters are sharded over several processes, so every forward is a collective."""
    return _world_size() > 1 and _is_sharded(model)


def _is_sharded(model) -> bool:
    """Whether `model`'s parameters are sharded over processes (FSDP2 DTensors or DeepSpeed ZeRO-3 partitions), so
    that every forward is a collective."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def _world_size() -> int:
    distributed = torch.distributed
    return distributed.get_world_size() if distributed.is_available() and distributed.is_initialized() else 1


def _max_over_processes(value: int, model) -> int:
    """The largest `value` over every process (an all-reduce, on the model's device)."""
    tensor = torch.tensor([value], dtype=torch.long, device=_device_of(model))
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


@contextlib.contextmanager
def _fsdp2_gathered(model):
    """Keep FSDP2 modules' parameters gathered from their first forward to the end of the block, then free them:
    `generate`'s many forwards then all-gather each module once, not once per token. Memory: the whole model on
    every process during the block (as ZeRO-3's gather for generation). A no-op without FSDP2 modules."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch
        yield
        return
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        yield
        return
    outermost = modules[0]._get_fsdp_state()
    if getattr(outermost, "_is_root", False) is None:
        outermost._lazy_init()  # as its first forward would: fixes which module is the root before we read settings
    groups = [(m, g) for m in modules for g in _param_groups(m)]
    saved = [g.post_forward_mesh_info for _, g in groups]
    for _, group in groups:
        group.post_forward_mesh_info = None  # no reshard after forward
    try:
        yield
    finally:
        for (_, group), info in zip(groups, saved):
            group.post_forward_mesh_info = info
        for module in modules:
            module.reshard()


def _param_groups(module) -> list:
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return list(groups)
