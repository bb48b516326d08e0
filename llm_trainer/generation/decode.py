"""A lean decode loop that samples what `model.generate` samples, faster.

`decode` replaces `model.generate` for plain sampling / greedy decoding with a decoder-only model:

- identical prompts are prefilled once (a left-padded batch of the distinct prompts) and their KV cache is copied to
  each repeat (GRPO and RLOO send every prompt `num_generations` times);
- the KV cache is written in place into buffers with room to spare (no per-step concatenation; a full buffer
  grows by 256 positions); each step is the model call on one token per row, the logits processors and the
  sampler, with `position_ids` and the attention mask kept as views of preallocated buffers;
- with `compact_finished=True`, rows that have stopped leave the batch (the model no longer runs on them).

What is sampled is exactly what `generate` samples with the same `GenerationConfig` and torch seed: the same
logits processors (transformers' own classes, in `generate`'s order) on the same `[rows, vocab]` scores with the
same token history (left padding included, pad fed after eos), the same softmax, and the same sampling draw.
`torch.multinomial(probs, 1)` is `argmax(probs / E)` with `E = torch.empty_like(probs).exponential_(1)`; the
loop draws that noise itself, always for the full batch as `generate` does, so a compacted batch still uses each
row's own draws and the random stream advances exactly as under `generate`. On the CPU the noise is computed from
the same 64-bit draws of the default generator as `exponential_` uses (`-log1p(-u)` in double, then float), about
2.5-3x faster than `exponential_`'s scalar kernel, which dominates a small model's decode step; a self-check at first
use compares it bit for bit with `exponential_` and with `torch.multinomial`, and the loop falls back to those
calls where it does not hold. What can still differ from `generate` is floating-point rounding of the forward
itself when it runs on fewer rows (the prefill on distinct prompts only, a compacted batch): row results of a
matrix product may depend on the batch size. That changes a sampled token only when two candidates are within
rounding of each other, which the tests check does not happen on the tiny models they use.

`unsupported_reason` says why a configuration must go to `generate` instead (beam search, extra logits processors,
stop strings, a static or sliding-window cache, lockstep generation across processes, encoder-decoders, ...).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationMixin
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# `generation_kwargs` keys the loop implements itself (everything else goes to `generate`).
SAMPLING_KWARGS = frozenset(
    {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty"}
    | {"eos_token_id", "pad_token_id", "use_cache"}
)

# `GenerationConfig` fields that add processors, stopping criteria or another decoding mode, with their neutral
# values (`None` is always neutral). A merged config with any other value goes to `generate`.
_NEUTRAL: dict[str, tuple] = {
    "num_beams": (1,),
    "num_return_sequences": (1,),
    "num_beam_groups": (1,),
    "penalty_alpha": (),
    "guidance_scale": (1, 1.0),
    "sequence_bias": (),
    "encoder_repetition_penalty": (1.0,),
    "no_repeat_ngram_size": (0,),
    "encoder_no_repeat_ngram_size": (0,),
    "bad_words_ids": (),
    "force_words_ids": (),
    "constraints": (),
    "min_length": (0,),
    "min_new_tokens": (0,),
    "forced_bos_token_id": (),
    "forced_eos_token_id": (),
    "remove_invalid_values": (False,),
    "exponential_decay_length_penalty": (),
    "suppress_tokens": (),
    "begin_suppress_tokens": (),
    "top_h": (),
    "typical_p": (1.0,),
    "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,),
    "diversity_penalty": (0.0,),
    "watermarking_config": (),
    "renormalize_logits": (False,),
    "max_time": (),
    "stop_strings": (),
    "prefill_chunk_size": (),
    "cache_implementation": (),
    "prompt_lookup_num_tokens": (),
    "assistant_early_exit": (),
    "dola_layers": (),
    "token_healing": (False,),
    "output_attentions": (False,),
    "output_hidden_states": (False,),
    "output_logits": (False,),
    "use_mtp": (False,),
    "speculation_type": (),
    "is_assistant": (False,),
}


@dataclass(frozen=True)
class DecodePlan:
    """What the loop needs from a resolved `GenerationConfig`."""

    max_new_tokens: int
    do_sample: bool
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None


def resolved_config(model, config):
    """`config` with `model.generation_config`'s values filling its unset fields, as `generate` resolves it."""
    prepare = getattr(model, "_prepare_generation_config", None)
    if prepare is not None:
        return prepare(config)[0]
    merged = copy.deepcopy(config)
    own = getattr(model, "generation_config", None)
    if own is not None:
        merged.update(**own.to_dict(), defaults_only=True, allow_custom_entries=True)
    return merged


def unsupported_reason(model, config, *, lockstep: bool = False, extra_kwargs=()) -> str | None:
    """Why `decode` cannot stand in for `model.generate(generation_config=config)`, or `None` when it can.

    `config` is the `GenerationConfig` as built (before `model.generation_config` fills it); `extra_kwargs` the
    user's `generation_kwargs` keys; `lockstep` whether generation must run in lockstep over processes.
    """
    if lockstep:
        return "parameters are sharded over processes (lockstep generation needs generate's synced_gpus)"
    extra = sorted(set(extra_kwargs) - SAMPLING_KWARGS)
    if extra:
        return f"generation_kwargs sets {', '.join(extra)}"
    model_config = getattr(model, "config", None)
    if model_config is None or getattr(model_config, "is_encoder_decoder", False):
        return "the model is an encoder-decoder (or has no config)"
    if not callable(getattr(model, "generate", None)):
        return "the model has no generate method"
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return "a PEFT prompt-learning adapter (its forward adds virtual tokens)"
    base = _base_model(model)
    for name in ("prepare_inputs_for_generation", "_update_model_kwargs_for_generation", "_sample"):
        if getattr(type(base), name, None) is not getattr(GenerationMixin, name, None):
            return f"{type(base).__name__} overrides {name}"
    if _cache_argument(model) is None:
        return "the model's forward takes no cache / past_key_values argument"
    if getattr(config, "cache_implementation", None) is not None:
        return f"cache_implementation={config.cache_implementation!r}"
    try:
        merged = resolved_config(model, config)
    except Exception as error:  # noqa: BLE001 - whatever generate would do with it, generate does it
        return f"the generation config does not resolve ({error})"
    for field, neutral in _NEUTRAL.items():
        value = getattr(merged, field, None)
        if value is not None and value not in neutral:
            return f"the generation config sets {field}={value!r}"
    if merged.max_new_tokens is None or merged.max_new_tokens < 1:
        return f"max_new_tokens={merged.max_new_tokens}"
    if merged.pad_token_id is None or not _ids(merged.eos_token_id):
        return "no pad or eos token id"
    if merged.use_cache is False:
        return "use_cache=False"
    if merged.do_sample and merged.temperature is not None and merged.temperature <= 0:
        return f"do_sample with temperature={merged.temperature}"
    return None


def plan_from(model, config) -> DecodePlan:
    """The `DecodePlan` of `config` resolved against `model.generation_config` (check `unsupported_reason` first)."""
    merged = resolved_config(model, config)
    return DecodePlan(
        max_new_tokens=int(merged.max_new_tokens),
        do_sample=bool(merged.do_sample),
        eos_token_ids=tuple(_ids(merged.eos_token_id)),
        pad_token_id=int(merged.pad_token_id),
        temperature=merged.temperature,
        top_k=merged.top_k,
        top_p=merged.top_p,
        min_p=merged.min_p,
        repetition_penalty=merged.repetition_penalty,
    )


class CacheUnsupported(RuntimeError):
    """The model's prefill returned a cache the loop cannot extend in place (sliding window, linear attention...)."""


def decode(
    model, prompts: list[list[int]], plan: DecodePlan, *, compact_finished: bool = False, return_logprobs: bool = False
) -> tuple[list[list[int]], list[list[float]], int]:
    """Complete every prompt; `(completion token ids, their log-probs or [], rows run through the model)`.

    Completions exclude the prompt, end at (and include) the first eos, and have no padding. Log-probs (when asked)
    are of the processed distribution, as `generate`'s `output_scores`. The last value counts the row-steps the
    model ran (prefill rows + decode rows), so callers and tests can see what compaction saves. Raises
    `CacheUnsupported` (before any random number is drawn) when the model's cache cannot be preallocated.
    """
    device = _device_of(model)
    rows = len(prompts)
    distinct: dict[tuple[int, ...], int] = {}
    source = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    uniques = [list(p) for p in distinct]
    width = max(len(p) for p in prompts)
    steps = plan.max_new_tokens
    pad = plan.pad_token_id

    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    tokens = torch.full((rows, width + steps), pad, dtype=torch.long)
    mask = torch.ones((rows, width + steps), dtype=torch.long)
    for row, ids in enumerate(prompts):
        tokens[row, width - len(ids) : width] = torch.as_tensor(ids, dtype=torch.long)
        mask[row, : width - len(ids)] = 0
    index = torch.tensor(source, dtype=torch.long)
    first = [source.index(u) for u in range(len(uniques))]
    tokens, mask, lengths, index = (t.to(device) for t in (tokens, mask, lengths, index))
    prefill_mask = mask[first, :width]
    prefill_positions = (prefill_mask.cumsum(-1) - 1).masked_fill(prefill_mask == 0, 0)

    cache_arg = _cache_argument(model)
    keep = {"logits_to_keep": 1} if _accepts(_base_model(model), "logits_to_keep") else {}
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=tokens[first, :width],
        attention_mask=prefill_mask,
        position_ids=prefill_positions,
        use_cache=True,
        return_dict=True,
        **{cache_arg: cache},
        **keep,
    )
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None) or cache
    _preallocate(cache, index, len(uniques), width, width + steps)
    logits = out.logits[:, -1].to(device=device, dtype=torch.float32, copy=True)  # the prefill's logits are freed
    if len(uniques) < rows:
        logits = logits.index_select(0, index)
    del out
    forward_rows = len(uniques)

    processors = _Processors(plan, mask[:, :width])
    sampler = _sampler(device) if plan.do_sample else None
    eos = torch.tensor(plan.eos_token_ids, dtype=torch.long, device=device)
    active = torch.arange(rows, device=device)  # original row of each batch row
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    done_steps = torch.full((rows,), steps, dtype=torch.long)  # per original row: tokens generated
    logprobs = torch.zeros((rows, steps), dtype=torch.float32, device=device) if return_logprobs else None
    output = torch.full((rows, steps), pad, dtype=torch.long, device=device)
    compacted = False

    for t in range(steps):
        if t > 0:
            out = model(
                input_ids=tokens[:, width + t - 1 : width + t],
                attention_mask=mask[:, : width + t],
                position_ids=(lengths + (t - 1)).unsqueeze(1),
                use_cache=True,
                return_dict=True,
                **{cache_arg: cache},
                **keep,
            )
            logits = out.logits[:, -1].to(device=device, dtype=torch.float32)
            del out
            forward_rows += len(active)
        scores = processors(tokens[:, : width + t], logits)
        if sampler is None:
            chosen = torch.argmax(scores, dim=-1)
        else:
            chosen = sampler(torch.softmax(scores, dim=-1), active if compacted else None, rows)
        chosen = torch.where(finished, pad, chosen)
        if return_logprobs:
            step_logprobs = torch.log_softmax(scores, dim=-1).gather(1, chosen.unsqueeze(1)).squeeze(1)
            logprobs[active, t] = step_logprobs
        tokens[:, width + t] = chosen
        output[active, t] = chosen
        stopped = torch.isin(chosen, eos) & ~finished
        finished = finished | stopped
        if bool(stopped.any()):
            for row in active[stopped].tolist():
                done_steps[row] = t + 1
            if bool(finished.all()):
                break
            if compact_finished and 4 * int(finished.sum()) >= len(finished):
                alive = (~finished).nonzero().squeeze(1)
                active = active.index_select(0, alive)
                tokens, mask, lengths, finished = (x.index_select(0, alive) for x in (tokens, mask, lengths, finished))
                for layer in cache.layers:
                    layer.batch_select_indices(alive)
                processors.select(alive)
                compacted = True

    table = output.tolist()
    completions = [table[row][: int(done_steps[row])] for row in range(rows)]
    if not return_logprobs:
        return completions, [], forward_rows
    lp_table = logprobs.tolist()
    return completions, [lp_table[row][: len(ids)] for row, ids in enumerate(completions)], forward_rows


class _Processors:
    """`generate`'s logits processors for a sampling / greedy `DecodePlan`, in `generate`'s order; `select`
    keeps the state of the rows a compacted batch keeps."""

    def __init__(self, plan: DecodePlan, prompt_mask: torch.Tensor):
        self.penalty = None
        if plan.repetition_penalty is not None and plan.repetition_penalty != 1.0:
            padding = (prompt_mask != 0).int().argmax(dim=1)
            self.penalty = RepetitionPenaltyLogitsProcessor(plan.repetition_penalty, prompt_ignore_length=padding)
        self.warpers = []
        if plan.do_sample:
            if plan.temperature is not None and plan.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(plan.temperature))
            if plan.top_k is not None and plan.top_k != 0:
                self.warpers.append(TopKLogitsWarper(top_k=plan.top_k, min_tokens_to_keep=1))
            if plan.top_p is not None and plan.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=plan.top_p, min_tokens_to_keep=1))
            if plan.min_p is not None:
                self.warpers.append(MinPLogitsWarper(min_p=plan.min_p, min_tokens_to_keep=1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.penalty is not None:
            scores = self.penalty(input_ids, scores)
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        return scores

    def select(self, rows: torch.Tensor) -> None:
        if self.penalty is not None:
            ignore = self.penalty.prompt_ignore_length
            self.penalty.prompt_ignore_length = ignore.to(rows.device).index_select(0, rows)


def _sampler(device: torch.device):
    """`sample(probs, rows, batch)`: one token per row of `probs` as `torch.multinomial(full_probs, 1)` would draw
    it for those `rows` (all rows when `rows` is None) of a `batch`-row distribution. Overwrites `probs`."""
    kind = _noise_kind(device)

    def sample(probs: torch.Tensor, rows: torch.Tensor | None, batch: int) -> torch.Tensor:
        if kind == "multinomial" and rows is None:
            return torch.multinomial(probs, num_samples=1).squeeze(1)
        if kind == "cpu":
            negated = _cpu_negated_exponential((batch, probs.size(-1)))
            if rows is not None:
                negated = negated.index_select(0, rows)
            # p / E == -(p / -E) exactly (IEEE division is sign-symmetric): the argmax of one is the argmin of the other
            ratios = probs.div_(negated)
            chosen = torch.argmin(ratios, dim=-1)
            # softmax gives no inf or negative values; a NaN anywhere in a row is what argmin picks
            if bool(ratios.gather(1, chosen.unsqueeze(1)).isnan().any()):
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
            return chosen
        noise = torch.empty((batch, probs.size(-1)), dtype=probs.dtype, device=probs.device).exponential_(1)
        if rows is not None:
            noise = noise.index_select(0, rows)
        return torch.argmax(probs.div_(noise), dim=-1)

    return sample


_KINDS: dict[str, str] = {}


def _cpu_negated_exponential(shape: tuple[int, ...]) -> torch.Tensor:
    """Minus what `torch.empty(shape).exponential_(1)` returns on the default CPU generator, from the same draws.

    `exponential_` takes one 64-bit word per element, `u` = its low 53 bits / 2**53, and returns
    `float(-log1p(-u))` computed in double, one element at a time; `random_(0, 2**53)` on a double tensor takes the
    same words and keeps the same bits, and the rest runs vectorised.
    """
    uniform = torch.empty(shape, dtype=torch.float64).random_(0, 2**53)
    return uniform.mul_(-(2.0**-53)).log1p_().to(torch.float32)


def _noise_kind(device: torch.device) -> str:
    """How the sampler draws on `device`: "cpu" (emulated `exponential_`, checked bit for bit), "exponential"
    (`exponential_` itself: `torch.multinomial` is `argmax(p / exponential_)` there), else "multinomial"."""
    key = str(device)
    if key not in _KINDS:
        _KINDS[key] = _probe(device)
    return _KINDS[key]


def _probe(device: torch.device) -> str:
    """Check, with the generator's state saved and restored, which draw reproduces `torch.multinomial`."""
    if device.type == "cpu":
        get_state, set_state = torch.get_rng_state, torch.set_rng_state
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        get_state = lambda: torch.cuda.get_rng_state(index)  # noqa: E731
        set_state = lambda state: torch.cuda.set_rng_state(state, index)  # noqa: E731
    else:
        return "multinomial"
    saved = get_state()
    try:
        probs = torch.softmax(torch.linspace(-3, 3, 3 * 4099, device=device).view(3, 4099).sin() * 4, dim=-1)
        reference = torch.multinomial(probs, 1).squeeze(1)
        after_reference = get_state()
        set_state(saved)
        exponential = torch.empty_like(probs).exponential_(1)
        if not torch.equal(torch.argmax(probs / exponential, dim=-1), reference):
            return "multinomial"
        if not torch.equal(get_state(), after_reference):
            return "multinomial"
        if device.type != "cpu":
            return "exponential"
        set_state(saved)
        emulated = _cpu_negated_exponential(tuple(probs.shape)).neg_()
        same = torch.equal(emulated, exponential) and torch.equal(get_state(), after_reference)
        return "cpu" if same else "exponential"
    finally:
        set_state(saved)


_GROWTH = 256  # positions a cache buffer grows by when full (its first size: the prompt + this)


class _BufferLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers with room to spare: `update` writes the new positions
    in place and returns views of the filled part (the values `torch.cat` would give); a full buffer grows by
    `_GROWTH` positions (up to `limit`), so memory follows the completions' length as `generate`'s cache does."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, limit: int):
        super().__init__()
        self.limit = limit
        self.filled = keys.size(-2)
        self.device = keys.device
        self.is_initialized = True
        self.key_buffer, self.value_buffer = keys, values
        index = index.to(keys.device)  # layers may sit on different devices (a model split with `device_map`)
        identity = keys.size(0) == index.numel() and bool(
            (index == torch.arange(index.numel(), device=index.device)).all()
        )
        self._reallocate(None if identity else index, self._room_for(self.filled))

    def _room_for(self, needed: int) -> int:
        return max(needed, min(self.limit, needed + _GROWTH))

    def _reallocate(self, rows: torch.Tensor | None, capacity: int) -> None:
        """New buffers of `capacity` positions holding the filled part of `rows` (all rows when None)."""
        keys, values = self.key_buffer[:, :, : self.filled], self.value_buffer[:, :, : self.filled]
        if rows is not None:
            keys, values = keys.index_select(0, rows.to(keys.device)), values.index_select(0, rows.to(values.device))
        self.key_buffer = keys.new_empty((keys.size(0), keys.size(1), capacity, keys.size(-1)))
        self.value_buffer = values.new_empty((values.size(0), values.size(1), capacity, values.size(-1)))
        self.key_buffer[:, :, : self.filled] = keys
        self.value_buffer[:, :, : self.filled] = values
        self._views()

    def _views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.filled]
        self.values = self.value_buffer[:, :, : self.filled]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.filled + key_states.size(-2)
        if end > self.key_buffer.size(-2):
            self._reallocate(None, self._room_for(end))
        self.key_buffer[:, :, self.filled : end] = key_states
        self.value_buffer[:, :, self.filled : end] = value_states
        self.filled = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.filled

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reallocate(indices, self.key_buffer.size(-2))


def _preallocate(cache, index: torch.Tensor, uniques: int, width: int, limit: int) -> None:
    """Turn each layer of the prefilled `cache` (one row per distinct prompt) into buffers with one row per prompt
    (`index[row]` the distinct prompt of `row`) and room for `limit` positions at most, written in place from here
    on."""
    if type(cache) is not DynamicCache:
        raise CacheUnsupported(f"the model returned a {type(cache).__name__}, not a DynamicCache")
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise CacheUnsupported(f"cache layer {i} is a {type(layer).__name__}")
        keys = layer.keys
        if keys is None or keys.dim() != 4 or keys.size(0) != uniques or keys.size(-2) != width:
            shape = None if keys is None else tuple(keys.shape)
            raise CacheUnsupported(f"cache layer {i} holds keys of shape {shape}")
    for i, layer in enumerate(cache.layers):
        cache.layers[i] = _BufferLayer(layer.keys, layer.values, index, limit)


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _base_model(model):
    """The transformers model under a PEFT wrapper (its methods are what generation runs)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _accepts(model, name: str) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters


def _cache_argument(model) -> str | None:
    """The forward's KV-cache keyword: `cache` (transformers 5) or `past_key_values`, or None."""
    for name in ("cache", "past_key_values"):
        if _accepts(_base_model(model), name):
            return name
    return None


def _device_of(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


__all__ = ["DecodePlan", "CacheUnsupported", "decode", "plan_from", "resolved_config", "unsupported_reason"]
