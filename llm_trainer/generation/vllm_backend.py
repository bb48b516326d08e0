"""vLLM in the trainer's own processes (colocate mode), and the vLLM helpers the server shares. vLLM is imported
only when used."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..trainer.utils import free_port
from .base import GenerationResult, Generator, SamplingConfig, as_id_list, check_prompts, consecutive_runs
from .weights import iter_named_weights

INSTALL_HINT = '`pip install "llm-trainer[vllm]"`'


def require_vllm():
    """Import and return `vllm`, or raise an ImportError saying how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            f"vLLM is not installed; {INSTALL_HINT} to generate with it (use_vllm=True), set use_vllm=False to "
            'generate with transformers, or use vllm_mode="server" with a server started by `llm-trainer '
            "vllm-serve` (the trainer side of server mode needs no vLLM)."
        ) from err
    return vllm


def vllm_sampling_params(
    sampling: SamplingConfig,
    n: int = 1,
    stop_token_ids: list[int] | None = None,
    structured_outputs_regex: str | None = None,
):
    """vLLM `SamplingParams` for `sampling`, reporting the sampled tokens' log-probs; `generation_kwargs` win."""
    from vllm import SamplingParams

    kwargs = {
        "n": n,
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "min_p": 0.0 if sampling.min_p is None else sampling.min_p,
        "repetition_penalty": sampling.repetition_penalty,
        "logprobs": 0,
        "stop_token_ids": stop_token_ids or None,
    }
    kwargs.update(sampling.generation_kwargs or {})
    if structured_outputs_regex is not None:
        kwargs["structured_outputs"] = {"regex": structured_outputs_regex}
    if isinstance(kwargs.get("structured_outputs"), dict):
        from vllm.sampling_params import StructuredOutputsParams

        kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
    return SamplingParams(**kwargs)


def load_vllm(model: str, **engine_args):
    """A `vllm.LLM` engine for `model` (`engine_args`: `vllm.LLM`'s keyword arguments) that reports log-probs after
    temperature and filters, as the sampler used them: the trainers' importance ratios compare against those."""
    return require_vllm().LLM(model=model, logprobs_mode="processed_logprobs", **engine_args)


def generate_runs(
    llm,
    prompts: list[list[int]],
    counts: list[int],
    sampling: SamplingConfig,
    stop_ids: list[int],
    regex: str | None,
    images: list[list[Any]] | None = None,
) -> GenerationResult:
    """`counts[i]` completions of each prompt `prompts[i]` (token ids, with `images[i]` as its multimodal data when
    given) from the engine `llm`, one request per prompt, flattened in request order; `stop_ids` and the
    structured-output `regex` apply to every request."""
    params = [vllm_sampling_params(sampling, c, stop_ids, regex) for c in counts]
    requests: list[dict[str, Any]] = [{"prompt_token_ids": ids} for ids in prompts]
    for request, pictures in zip(requests, images or [], strict=False):
        if pictures:  # vLLM takes a single image as is, several as a list (TRL's colocate request)
            request["multi_modal_data"] = {"image": pictures if len(pictures) > 1 else pictures[0]}
    outputs = llm.generate(requests, sampling_params=params, use_tqdm=False)
    completions, logprobs = [], []
    for request in outputs:
        for out in request.outputs:
            ids = list(out.token_ids)
            completions.append(ids)
            if out.logprobs is None:
                logprobs = None
            elif logprobs is not None:
                logprobs.append([step[token].logprob for step, token in zip(out.logprobs, ids)])
    return GenerationResult(completions, logprobs)


def _load_on_worker(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    worker.model_runner.model.load_weights(weights=weights)


def load_weights_into_vllm(llm, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Copy named tensors into every worker of the `vllm.LLM` engine `llm` (vLLM shards them for tensor parallelism)."""
    llm.collective_rpc(_load_on_worker, args=(weights,))


class VLLMColocateGenerator(Generator):
    """A `vllm.LLM` engine inside each training process, sharing its GPU (TRL's colocate mode).

    The engine loads `model`'s checkpoint (`model.name_or_path`) with the `external_launcher` executor, so each
    process (or each group of `tensor_parallel_size` processes, which then generate the same completions from the
    group's gathered prompts) runs its own copy. `sync_weights` copies the policy's weights in with the model's
    `load_weights`. With `enable_sleep_mode` the engine's weights and KV cache are released between generations
    (level-2 sleep), and the weights are pushed again before the next one. Identical consecutive prompts are one
    request with `n` completions. Prompts with images send them as the request's multimodal data (one request per
    prompt), as TRL's colocate mode does.
    """

    supports_images = True

    def __init__(
        self,
        model,
        sampling: SamplingConfig,
        *,
        accelerator=None,
        eos_token_id: int | list[int] | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.3,
        max_model_length: int | None = None,
        max_num_seqs: int | None = None,
        enable_sleep_mode: bool = False,
        model_impl: str = "vllm",
        trust_remote_code: bool = False,
        structured_outputs_regex: str | None = None,
    ):
        require_vllm()  # before touching the process groups or the environment
        rank = accelerator.process_index if accelerator is not None else 0
        local_rank = accelerator.local_process_index if accelerator is not None else 0
        world_size = accelerator.num_processes if accelerator is not None else 1
        if world_size % tensor_parallel_size != 0:
            raise ValueError(
                f"vllm_tensor_parallel_size ({tensor_parallel_size}) must divide the number of processes "
                f"({world_size}); pick a divisor of it."
            )
        self.model = model
        self.sampling = sampling
        self.eos_token_ids = as_id_list(eos_token_id)
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_sleep_mode = enable_sleep_mode
        self.structured_outputs_regex = structured_outputs_regex
        self.tp_group = None
        if tensor_parallel_size > 1:  # ranks [0..tp), [tp..2tp), ... each share one engine
            self.tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                [list(range(s, s + tensor_parallel_size)) for s in range(0, world_size, tensor_parallel_size)]
            )
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        self.llm = load_vllm(
            model.name_or_path,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_length,
            max_num_seqs=max_num_seqs,
            enable_sleep_mode=enable_sleep_mode,
            model_impl=model_impl,
            distributed_executor_backend="external_launcher",
            seed=rank // tensor_parallel_size,  # the ranks of a TP group must sample alike
            max_num_batched_tokens=4096,
            trust_remote_code=trust_remote_code,
        )
        self._weights_asleep = False
        if enable_sleep_mode:
            self.llm.sleep(level=2)
            self._weights_asleep = True
        if accelerator is not None:
            accelerator.wait_for_everyone()

    def sync_weights(self, model) -> None:
        if self._weights_asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
            self._weights_asleep = False
        for name, tensor in iter_named_weights(model):
            load_weights_into_vllm(self.llm, [(name, tensor)])
        self.llm.reset_prefix_cache()

    def generate(
        self, prompt_ids: list[list[int]], images: list[list[Any]] | None = None, vision: Any = None
    ) -> GenerationResult:
        """One completion per prompt; `images` (PIL images per prompt) go to vLLM with their prompt (`vision`, the
        trainer's processor tensors, is not needed: vLLM processes the images itself)."""
        check_prompts(prompt_ids)
        if self._weights_asleep:  # level-2 sleep dropped them; vLLM can only reload the initial checkpoint
            self.sync_weights(self.model)
        all_prompts, all_images = prompt_ids, images
        if self.tp_group is not None:  # every rank of a group gathers images too (None where it has none)
            gathered = [None] * self.tensor_parallel_size
            torch.distributed.all_gather_object(gathered, (list(prompt_ids), images), group=self.tp_group)
            all_prompts = [ids for part, _ in gathered for ids in part]
            all_images = None
            if any(part is not None for _, part in gathered):
                all_images = [
                    pics for ids, part in gathered for pics in (part if part is not None else [[]] * len(ids))
                ]
        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
        if all_images is None:
            prompts, counts = consecutive_runs(all_prompts)
        else:  # repeats of a prompt look alike as token ids whatever their images: one request each
            prompts, counts = all_prompts, [1] * len(all_prompts)
        result = generate_runs(
            self.llm, prompts, counts, self.sampling, self.eos_token_ids, self.structured_outputs_regex, all_images
        )
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
            self._weights_asleep = True
        if self.tp_group is None:
            return result
        start = torch.distributed.get_rank(group=self.tp_group) * len(prompt_ids)
        part = slice(start, start + len(prompt_ids))
        return GenerationResult(
            result.completion_ids[part], result.logprobs[part] if result.logprobs is not None else None
        )

    def close(self) -> None:
        self.llm = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
