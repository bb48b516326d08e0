"""Pick and build the generation back end a GRPO/RLOO-style config asks for."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from .base import Generator, SamplingConfig, as_id_list

logger = logging.getLogger(__name__)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos first, then any other the model's generation config
    declares (e.g. an end-of-turn token)."""
    ids = as_id_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    if not ids:
        raise ValueError("Neither the tokenizer nor the model's generation config declares an eos token; set one.")
    return ids


def image_token_ids(model, processing_class) -> list[int]:
    """The ids never to sample with a processor (a vision-language model): its image token, as TRL suppresses it (a
    sampled one would have no image features)."""
    from transformers import ProcessorMixin

    if not isinstance(processing_class, ProcessorMixin):
        return []
    config = getattr(model, "config", None)
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    return [] if token is None else [int(token)]


def make_generator(
    args: Any,
    model,
    processing_class,
    accelerator=None,
    unwrap: Callable[[], AbstractContextManager] | None = None,
) -> Generator:
    """The back end `args` selects: `TransformersGenerator` unless `use_vllm`, then `VLLMServerGenerator`
    (`vllm_mode="server"`, no local vLLM needed) or `VLLMColocateGenerator` (`vllm_mode="colocate"`).

    `args` is a `GRPOConfig`/`RLOOConfig`-like object (TRL's field names and defaults), `processing_class` a tokenizer
    or a processor holding one, `unwrap` the context-manager factory `TransformersGenerator` generates under.
    """
    sampling = SamplingConfig.from_args(args)
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    eos = eos_token_ids(model, tokenizer)
    if not getattr(args, "use_vllm", False):
        paged = getattr(args, "use_transformers_paged", False)
        if paged or getattr(args, "use_transformers_continuous_batching", False):
            logger.warning("Continuous batching is not supported yet; generating with `model.generate` instead.")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        from .transformers_backend import TransformersGenerator

        return TransformersGenerator(
            model,
            sampling,
            pad_token_id=pad,
            eos_token_id=eos,
            cache_implementation=getattr(args, "cache_implementation", None),
            unwrap=unwrap,
            fast=getattr(args, "fast_generation", True),
            compact_finished=getattr(args, "generation_compact_finished", True),
            suppress_token_ids=image_token_ids(model, processing_class),
        )
    mode = getattr(args, "vllm_mode", "colocate")
    regex = getattr(args, "vllm_structured_outputs_regex", None)
    if mode == "server":
        from .remote import VLLMServerGenerator

        return VLLMServerGenerator(
            sampling,
            base_url=getattr(args, "vllm_server_base_url", None),
            host=getattr(args, "vllm_server_host", "0.0.0.0"),
            port=getattr(args, "vllm_server_port", 8000),
            connection_timeout=getattr(args, "vllm_server_timeout", 240.0),
            accelerator=accelerator,
            eos_token_id=eos,
            structured_outputs_regex=regex,
        )
    if mode == "colocate":
        from .vllm_backend import VLLMColocateGenerator

        tp = getattr(args, "vllm_tensor_parallel_size", 1)
        batch = getattr(args, "per_device_train_batch_size", None)
        steps = getattr(args, "steps_per_generation", None) or 1
        return VLLMColocateGenerator(
            model,
            sampling,
            accelerator=accelerator,
            eos_token_id=eos,
            tensor_parallel_size=tp,
            gpu_memory_utilization=getattr(args, "vllm_gpu_memory_utilization", 0.3),
            max_model_length=getattr(args, "vllm_max_model_length", None),
            max_num_seqs=batch * tp * steps if batch else None,
            enable_sleep_mode=getattr(args, "vllm_enable_sleep_mode", False),
            model_impl=getattr(args, "vllm_model_impl", "vllm"),
            trust_remote_code=getattr(args, "trust_remote_code", False),
            structured_outputs_regex=regex,
        )
    raise ValueError(f"vllm_mode must be 'server' or 'colocate', got {mode!r}.")
