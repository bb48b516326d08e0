"""TRL's public trainer helpers at TRL's path (`trl.trainer.utils`).

Each name behaves as TRL 1.16's. Where the library already has the logic it lives once, here or where it is used,
and the other side delegates: the kernels (`llm_trainer.kernels`), the fused LM head (`llm_trainer.modeling`), the
daemon event loop (`llm_trainer._background_loop`), model loading (`llm_trainer.modeling.load_model`). The on-policy
trainers use `split_tensor_dict`, `shuffle_sequence_dict` and `print_prompt_completions_sample` from here.

Deliberate difference: `generate_model_card` writes a card that credits llm-trainer (tag `llm-trainer`, link,
version) where TRL's credits TRL.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import random
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from itertools import accumulate
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .._background_loop import shutdown_event_loop_in_daemon, start_event_loop_in_daemon
from ..data.collators import pad
from ..data.sampling import RepeatSampler, repeat_iterable_dataset
from ..kernels import ChunkedLogProbFunction, entropy_from_logits, selective_log_softmax
from ..kernels import selective_log_softmax_and_entropy as _fused_logprob_entropy
from ..losses.policy_gradient import nanmax, nanmin, nanstd
from ..losses.unpaired import RunningMoments  # old TRL's `trl.trainer.utils.RunningMoments`
from ..modeling import FusedCausalLMOutput

if TYPE_CHECKING:
    import pandas as pd
    from accelerate import Accelerator
    from huggingface_hub import ModelCard
    from peft import LoraConfig, PeftModel
    from transformers import BitsAndBytesConfig, PretrainedConfig, PreTrainedModel

    from .model_config import ModelConfig

# TRL's private alias, which its tests import
_ChunkedLogProbFunction = ChunkedLogProbFunction

__all__ = [
    "FusedCausalLMOutput",
    "RepeatSampler",
    "RunningMoments",
    "TListOrMapping",
    "add_fused_lm_head",
    "adjusted_mfu",
    "compute_accuracy",
    "compute_flops_per_token",
    "compute_mfu",
    "create_model_from_path",
    "disable_dropout_in_model",
    "empty_cache",
    "ensure_master_addr_port",
    "entropy_from_logits",
    "flush_left",
    "freeze_model_layers",
    "generate_model_card",
    "get_callable_name",
    "get_comet_experiment_url",
    "get_config_model_id",
    "get_kbit_device_map",
    "get_model_param_count",
    "get_peak_flops",
    "get_peak_flops_per_device",
    "get_peft_config",
    "get_quantization_config",
    "get_trackio_space_url",
    "global_then_local_main_first",
    "hash_module",
    "identity",
    "is_async_callable",
    "log_table_to_comet_experiment",
    "maybe_gather_lm_head_ctx",
    "nanmax",
    "nanmin",
    "nanstd",
    "pad",
    "peft_module_casting_to_bf16",
    "print_prompt_completions_sample",
    "remove_none_values",
    "repeat_iterable_dataset",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "shuffle_sequence_dict",
    "shutdown_event_loop_in_daemon",
    "split_pixel_values_by_grid",
    "split_tensor_dict",
    "start_event_loop_in_daemon",
    "strip_images_from_messages",
    "unsplit_pixel_values_by_grid",
    "use_adapter",
]


def disable_dropout_in_model(model: torch.nn.Module) -> None:
    """Set the probability of every dropout layer in `model` to 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def get_quantization_config(model_args: ModelConfig) -> BitsAndBytesConfig | None:
    """The bitsandbytes config `model_args` asks for (`load_in_4bit` / `load_in_8bit`), else None.

    4-bit computes in `model_args.dtype`, the dtype the rest of the model is loaded in.
    """
    from transformers import BitsAndBytesConfig

    if model_args.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=model_args.dtype,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,
        )
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def get_kbit_device_map() -> dict[str, int] | None:
    """Device map putting a quantized model whole on this process's accelerator; None on CPU (older TRL's helper)."""
    from accelerate import PartialState

    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return {"": PartialState().local_process_index}
    return None


def get_peft_config(model_args: ModelConfig) -> LoraConfig | None:
    """A `peft.LoraConfig` built from the `lora_*` fields of `model_args`, or None unless `use_peft` is set."""
    if not model_args.use_peft:
        return None
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError('`use_peft=True` needs the peft library: pip install "llm-trainer[peft]"') from error
    extra = {}
    if model_args.lora_target_parameters is not None:  # a `LoraConfig` argument only since peft 0.17
        extra["target_parameters"] = model_args.lora_target_parameters
    return LoraConfig(
        task_type=model_args.lora_task_type,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        modules_to_save=model_args.lora_modules_to_save,
        bias="none",
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        **extra,
    )


# --------------------------------------------------------------------------------------------- processes, devices
def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free TCP port on this machine, as the OS hands one out (for a server or a process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _free_port() -> int:
    """torch.distributed's usual port when it is free, else one the OS hands out."""
    for port in (29500, 23456, 12355, 12345):
        if _port_is_free(port):
            return port
    return free_port()


def ensure_master_addr_port(addr: str | None = None, port: int | None = None) -> None:
    """Set `MASTER_ADDR` / `MASTER_PORT` for a single-node process group, keeping what the environment already says.

    `MASTER_ADDR` defaults to `addr`, else `localhost`. `MASTER_PORT` is `port` when given, else the environment's
    value, else a free TCP port; `"0"` and `"auto"` in the environment also mean "pick a free port", so two jobs on one
    machine do not collide on 29500.
    """
    os.environ["MASTER_ADDR"] = os.environ.get("MASTER_ADDR") or addr or "localhost"
    if port is None:
        from_env = os.environ.get("MASTER_PORT", "").strip().lower()
        if from_env not in ("", "0", "auto"):
            with contextlib.suppress(ValueError):
                port = int(from_env)
    os.environ["MASTER_PORT"] = str(port if port else _free_port())


def maybe_gather_lm_head_ctx(*params: torch.nn.Parameter | None) -> contextlib.AbstractContextManager:
    """Gather DeepSpeed ZeRO-3 shards of the given LM-head parameters for the block; a null context otherwise.

    A fused loss reads `lm_head.weight` directly instead of calling the head, so ZeRO-3's pre-forward hook never
    materializes it. None entries are skipped, a parameter passed twice (tied embeddings, a shared reference) is
    gathered once, and parameters that are already available are left alone (re-partitioning them on exit would
    break the module that holds them).
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    unique = {id(p): p for p in params if p is not None and p.ds_status != ZeroParamStatus.AVAILABLE}
    return deepspeed.zero.GatheredParameters(list(unique.values())) if unique else contextlib.nullcontext()


def global_then_local_main_first() -> contextlib.AbstractContextManager:
    """Run the block on the global main process first, then on each node's local main, then everywhere else.

    For work that fills a cache: a shared cache is filled once by the global main, a node-local one once per node.
    """
    from accelerate import PartialState

    @contextlib.contextmanager
    def ordered() -> Iterator[None]:
        state = PartialState()
        with state.main_process_first(), state.local_main_process_first():
            yield

    return ordered()


# --------------------------------------------------------------------------------------------- callables
def _unwrap_partial(func: Callable) -> Callable:
    while isinstance(func, functools.partial):
        func = func.func
    return func


def get_callable_name(func: Callable) -> str:
    """A display name for `func`: a function's `__name__` (through any `functools.partial`), else its class name
    (callable instances)."""
    func = _unwrap_partial(func)
    return getattr(func, "__name__", type(func).__name__)


def is_async_callable(func: Callable) -> bool:
    """Whether calling `func` returns a coroutine: an `async def` function, a `functools.partial` of one, or an
    instance whose `__call__` is `async def` (which `inspect.iscoroutinefunction(instance)` misses)."""
    func = _unwrap_partial(func)
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


def identity(x: Any) -> Any:
    """Return `x` unchanged (a picklable no-op transform / collator)."""
    return x


# --------------------------------------------------------------------------------------------- model cards, trackers
_CARD_QUICK_START = {
    "lm_model_card.md": """```python
from transformers import pipeline

generator = pipeline("text-generation", model="{{ hub_model_id }}", device_map="auto")
messages = [{"role": "user", "content": "Which would you rather visit once, the past or the future, and why?"}]
print(generator(messages, max_new_tokens=128, return_full_text=False)[0]["generated_text"])
```""",
    "rm_model_card.md": """```python
from transformers import pipeline

scorer = pipeline("text-classification", model="{{ hub_model_id }}", device_map="auto")
print(scorer("The capital of France is Paris.")[0]["score"])
```""",
}

_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{% if base_model %}Fine-tuned from [{{ base_model }}](https://huggingface.co/{{ base_model }}){% else %}Trained\
{% endif %}{% if dataset_name %} on [{{ dataset_name }}](https://huggingface.co/datasets/{{ dataset_name }}){% endif %} \
with [llm-trainer](https://pypi.org/project/llm-trainer/).

## Quick start

QUICK_START

## Training

Trainer: {{ trainer_name }}{% if paper_id %}, the method of [{{ paper_title }}](https://huggingface.co/papers/\
{{ paper_id }}){% endif %}.
{% if wandb_url %}
- [Weights & Biases run]({{ wandb_url }})
{%- endif %}
{%- if trackio_url %}
- [Trackio dashboard]({{ trackio_url }})
{%- endif %}
{%- if comet_url %}
- [Comet experiment]({{ comet_url }})
{%- endif %}

### Framework versions

- llm-trainer: {{ llm_trainer_version }}
- Transformers: {{ transformers_version }}
- PyTorch: {{ pytorch_version }}
- Datasets: {{ datasets_version }}
- Tokenizers: {{ tokenizers_version }}
{% if trainer_citation %}
## Citation

{{ trainer_name }}:

```bibtex
{{ trainer_citation }}
```
{% endif %}"""


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def generate_model_card(
    base_model: str | None,
    model_name: str,
    hub_model_id: str,
    dataset_name: str | None,
    tags: list[str],
    wandb_url: str | None,
    trackio_url: str | None,
    trainer_name: str,
    trainer_citation: str | None = None,
    template_file: str | None = None,
    paper_title: str | None = None,
    paper_id: str | None = None,
    comet_url: str | None = None,
) -> ModelCard:
    """A `huggingface_hub.ModelCard` for a trained model: metadata (base model, dataset, tags), a quick-start
    snippet for `hub_model_id`, tracker links, the trainer (and its paper and citation) and framework versions.

    `template_file` picks the built-in quick start: `"lm_model_card.md"` (default, text generation) or
    `"rm_model_card.md"` (a reward model, text classification); a path to an existing file is used as the whole
    Jinja template (it gets the same variables). Unlike TRL's card, this one credits llm-trainer.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .. import __version__

    name = template_file or "lm_model_card.md"
    if name in _CARD_QUICK_START:
        template = _CARD_TEMPLATE.replace("QUICK_START", _CARD_QUICK_START[name])
    elif os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            template = f.read()
    else:
        raise FileNotFoundError(
            f"Unknown model card template {name!r}: use 'lm_model_card.md', 'rm_model_card.md' or a template file path."
        )
    card_data = ModelCardData(
        base_model=base_model,
        datasets=dataset_name,
        library_name="transformers",
        licence="license",
        model_name=model_name,
        tags=["generated_from_trainer", *tags],
    )
    return ModelCard.from_template(
        card_data,
        template_str=template,
        base_model=base_model,
        model_name=model_name,
        hub_model_id=hub_model_id,
        dataset_name=dataset_name,
        wandb_url=wandb_url,
        trackio_url=trackio_url,
        comet_url=comet_url,
        trainer_name=trainer_name,
        trainer_citation=trainer_citation,
        paper_title=paper_title,
        paper_id=paper_id,
        llm_trainer_version=__version__,
        transformers_version=_version("transformers"),
        pytorch_version=_version("torch"),
        datasets_version=_version("datasets"),
        tokenizers_version=_version("tokenizers"),
    )


def _comet_ml():
    from transformers import is_comet_available

    if not is_comet_available():
        return None
    import comet_ml

    return comet_ml


def get_comet_experiment_url() -> str | None:
    """The URL of the running Comet experiment, or None (no comet-ml, or no experiment running)."""
    comet_ml = _comet_ml()
    experiment = None if comet_ml is None else comet_ml.get_running_experiment()
    return None if experiment is None else experiment.url


def get_trackio_space_url() -> str | None:
    """The URL of the current Trackio run on its Hugging Face Space, or None (no trackio, no run, or a local run)."""
    from transformers import is_trackio_available

    if not is_trackio_available():
        return None
    from trackio import context_vars

    run = context_vars.current_run.get()
    space_id = None if run is None else run._space_id
    if space_id is None:
        return None
    return f"https://{space_id.replace('/', '-')}.hf.space?project={run.project}&runs={run.name}&sidebar=collapsed"


def log_table_to_comet_experiment(name: str, table: pd.DataFrame) -> None:
    """Log `table` under the file name `name` to the running Comet experiment, if there is one.

    Raises:
        ModuleNotFoundError: comet-ml is not installed.
    """
    comet_ml = _comet_ml()
    if comet_ml is None:
        raise ModuleNotFoundError(
            "Logging a table to Comet needs comet-ml, which is not installed: pip install comet-ml"
        )
    experiment = comet_ml.get_running_experiment()
    if experiment is not None:
        experiment.log_table(tabular_data=table, filename=name)


# --------------------------------------------------------------------------------------------- batches
def flush_left(mask: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Move each row's content to the left and drop the columns that are then empty in every row.

    Each row of the 2-D `mask` is rotated left so that its first non-zero entry lands in column 0; `tensors` (same
    shape) are rotated with it. The result is cut at the first column that is 0 in every row. Returns the new
    mask alone, or `(mask, *tensors)`. Inputs are not modified.
    """
    cols = mask.shape[1]
    start = mask.ne(0).int().argmax(dim=1, keepdim=True)
    order = (torch.arange(cols, device=mask.device).unsqueeze(0) + start) % cols
    mask, *tensors = (t.gather(1, order) for t in (mask, *tensors))
    empty = ~mask.ne(0).any(dim=0)
    width = int(empty.int().argmax()) if bool(empty.any()) else cols
    flushed = [t[:, :width] for t in (mask, *tensors)]
    return flushed[0] if not tensors else tuple(flushed)


def split_tensor_dict(tensor_dict: dict[str, Any], num_chunks: int) -> list[dict[str, Any]]:
    """Cut the rows of every tensor (and list) in `tensor_dict` into `num_chunks` equal consecutive slices.

    Rows are those of tensors with at least one dimension, lists and tuples; the row count is that of the first such
    value. 0-d tensors, None and anything else are shared by every slice. Returns one dict per slice, with the same keys.
    """
    rows = next(len(v) for v in tensor_dict.values() if _has_rows(v))
    size = rows // num_chunks
    return [
        {key: value[i * size : (i + 1) * size] if _has_rows(value) else value for key, value in tensor_dict.items()}
        for i in range(num_chunks)
    ]


def shuffle_sequence_dict(seq_dict: dict[str, Any]) -> dict[str, Any]:
    """Apply one random permutation (from torch's global generator) to the rows of every tensor, list and tuple in
    `seq_dict`; 0-d tensors, None and anything else are kept. Lists and tuples come back as lists."""
    rows = next(len(v) for v in seq_dict.values() if _has_rows(v))
    order = torch.randperm(rows)

    def permute(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value[order] if value.ndim else value
        if _has_rows(value):
            return [value[i] for i in order.tolist()]
        return value

    return {key: permute(value) for key, value in seq_dict.items()}


def _has_rows(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.ndim > 0
    return isinstance(value, list | tuple)


def split_pixel_values_by_grid(batch: dict[str, Any]) -> dict[str, Any]:
    """Turn a batch's flat `pixel_values` into one tensor per sample, using `num_images` (images per sample).

    How many rows of `pixel_values` an image owns depends on the processor: `image_grid_thw` (Qwen-VL: the product
    of each image's grid, and the grids are split too), `image_position_ids` (Gemma: one row per image, split too),
    `spatial_shapes` with `num_tiles` (LFM2-VL: rows per tile; `pixel_attention_mask` and `spatial_shapes` are
    split too), `num_tiles` alone (InternVL), else one row per image (LLaVA; `image_sizes` split too). A batch
    already padded to one row per sample (Idefics), or without `pixel_values` / `num_images`, is returned as is.

    Raises:
        ValueError: the grids do not account for every row of `pixel_values`.
    """
    if "pixel_values" not in batch or "num_images" not in batch:
        return batch
    pixel_values, num_images = batch["pixel_values"], list(batch["num_images"])

    def by(counts: list[int], *keys: str) -> dict[str, Any]:
        return {key: list(torch.split(batch[key], counts)) for key in keys}

    if "image_grid_thw" in batch:
        rows_per_image = batch["image_grid_thw"].prod(-1).tolist()
        if sum(rows_per_image) != pixel_values.size(0):
            raise ValueError(
                f"Mismatch: sum(lengths) = {sum(rows_per_image)} != pixel_values.size(0) = {pixel_values.size(0)}: "
                "image_grid_thw does not account for every row of pixel_values."
            )
        ends = list(accumulate(num_images, initial=0))
        rows_per_sample = [sum(rows_per_image[a:b]) for a, b in zip(ends, ends[1:])]
        return {**batch, **by(rows_per_sample, "pixel_values"), **by(num_images, "image_grid_thw")}
    if "image_position_ids" in batch:
        return {**batch, **by(num_images, "pixel_values", "image_position_ids")}
    if "spatial_shapes" in batch:
        tiles = list(batch["num_tiles"])
        return {**batch, **by(tiles, "pixel_values", "pixel_attention_mask", "spatial_shapes")}
    if "num_tiles" in batch:
        return {**batch, **by(list(batch["num_tiles"]), "pixel_values")}
    if pixel_values.size(0) != sum(num_images):  # already one (padded) row per sample
        return batch
    keys = ("pixel_values", "image_sizes") if "image_sizes" in batch else ("pixel_values",)
    return {**batch, **by(num_images, *keys)}


_PER_SAMPLE_VISION_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "image_position_ids",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
)


def unsplit_pixel_values_by_grid(batch: dict[str, Any]) -> dict[str, Any]:
    """Undo `split_pixel_values_by_grid`: concatenate every per-sample list of vision tensors back along rows."""
    merged = {key: torch.cat(batch[key]) for key in _PER_SAMPLE_VISION_KEYS if isinstance(batch.get(key), list)}
    return {**batch, **merged} if merged else batch


TListOrMapping = TypeVar("TListOrMapping", list, Mapping)


def remove_none_values(example: TListOrMapping) -> TListOrMapping:
    """Drop the None-valued keys of every mapping in a nested list / dict structure (None list items are kept).

    For datasets whose Arrow storage filled absent nested keys with None: `dataset.with_transform(remove_none_values)`.

    Raises:
        TypeError: `example` is neither a list nor a mapping.
    """

    def clean(value: Any) -> Any:
        return remove_none_values(value) if isinstance(value, dict | list) else value

    if isinstance(example, list):
        return [clean(value) for value in example]
    if isinstance(example, Mapping):
        return {key: clean(value) for key, value in example.items() if value is not None}
    raise TypeError(f"Input must be a list or a dictionary, got {type(example).__name__}.")


def strip_images_from_messages(messages: Any) -> Any:
    """A copy of a conversation whose `{"type": "image", "image": ...}` content blocks keep only their type, so it can
    be logged or serialized. Anything but a list (e.g. a plain-text prompt) is returned as is."""
    if not isinstance(messages, list):
        return messages
    stripped = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": "image"} if block.get("type") == "image" else block for block in content]
            message = {**message, "content": content}
        stripped.append(message)
    return stripped


# --------------------------------------------------------------------------------------------- log-probs
def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs at `index (...)` and entropies of `softmax(logits / temperature)` from one pass over `logits (..., V)`.

    Both are 0 where `row_mask` is 0. With `entropy_requires_grad=False` the entropy is detached (for logging).
    Returned in the dtype of `logits`.
    """
    logps, entropy = _fused_logprob_entropy(logits, index, temperature=temperature, row_mask=row_mask)
    if not entropy_requires_grad:
        entropy = entropy.detach()
    return logps.to(logits.dtype), entropy.to(logits.dtype)


# --------------------------------------------------------------------------------------------- printing
def _rich_text(entry: Any):
    """A prompt / completion / extra value as rich `Text`: conversations show each role, reasoning, content (images as
    `[IMAGE]`) and tool calls."""
    import json

    from rich.text import Text

    text = Text()
    if not (isinstance(entry, list) and all(isinstance(m, dict) for m in entry)):
        text.append(str(entry))
        return text
    for i, message in enumerate(entry):
        if i:
            text.append("\n\n")
        text.append(f"{str(message.get('role', '')).upper()}\n", style="bold red")
        reasoning = message.get("reasoning_content") or message.get("thinking")
        if reasoning:
            text.append(f"{reasoning}\n", style="italic dim white")
        content = message.get("content")
        if isinstance(content, str):
            text.append(content)
        elif isinstance(content, list):
            for block in content:
                if block.get("type") == "text":
                    text.append(block["text"])
                elif block.get("type") == "image":
                    text.append("[IMAGE]", style="bold cyan")
        calls = []
        for call in message.get("tool_calls") or []:
            function = call.get("function", {})
            arguments = function.get("arguments", {})
            arguments = arguments if isinstance(arguments, dict) else json.loads(arguments)
            rendered = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
            calls.append(f"{function.get('name', '?')}({rendered})")
        text.append("\n".join(calls))
    return text


def print_prompt_completions_sample(
    prompts: list,
    completions: list,
    rewards: dict[str, list[float]],
    advantages: list[float] | None,
    step: int,
    num_samples: int | None = None,
    extra: dict[str, list] | None = None,
) -> None:
    """Print a table of prompts, completions, one column per reward, the advantage and `extra` columns, with rich.

    Prompts and completions may be text or conversations. Rewards and advantages show two decimals; without
    `advantages` (None) there is no advantage column. `num_samples` rows are drawn at random (`random` module); None,
    or at least the number of prompts, prints them all, and 0 or less prints nothing.
    """
    try:
        from rich.console import Console
        from rich.panel import Panel
        from rich.table import Table
    except ImportError as error:
        raise ImportError("print_prompt_completions_sample needs the rich library: pip install rich") from error
    extra = extra or {}
    rows = list(range(len(prompts)))
    if num_samples is not None and num_samples < len(rows):
        if num_samples <= 0:
            return
        rows = random.sample(rows, num_samples)

    table = Table(show_header=True, header_style="bold white", expand=True)
    table.add_column("Prompt", style="bright_yellow")
    table.add_column("Completion", style="bright_green")
    for name in rewards:
        table.add_column(name, style="bold cyan", justify="right")
    if advantages is not None:
        table.add_column("Advantage", style="bold magenta", justify="right")
    for name in extra:
        table.add_column(name, style="bright_white")
    for i in rows:
        cells = [_rich_text(prompts[i]), _rich_text(completions[i])]
        cells += [f"{values[i]:.2f}" for values in rewards.values()]
        if advantages is not None:
            cells.append(f"{advantages[i]:.2f}")
        cells += [_rich_text(values[i]) for values in extra.values()]
        table.add_row(*cells)
        table.add_section()
    Console().print(Panel(table, expand=False, title=f"Step {step}", border_style="bold white"))


# --------------------------------------------------------------------------------------------- models
def create_model_from_path(model_id: str, architecture: Any = None, **kwargs: Any) -> PreTrainedModel:
    """`from_pretrained` of `model_id` (local folder or Hub id) with `architecture`'s class (an auto class or a model
    class), by default the one the config names.

    `dtype` may be a `torch.dtype`, `"auto"`, None or `"bfloat16" | "float16" | "float32"`; it defaults to float32.
    Without a `device_map`, the model is placed on the accelerator (`"auto"`) unless this process runs on CPU / MPS.

    Raises:
        ValueError: an unknown `dtype` string.
    """
    from accelerate import PartialState

    from ..modeling import load_model

    if "device_map" not in kwargs:
        kwargs["device_map"] = None if PartialState().device.type in ("cpu", "mps") else "auto"
    return load_model(model_id, architecture, **kwargs)


def hash_module(module: torch.nn.Module) -> str:
    """SHA-256 hex digest of a module's state dict (names in sorted order, each tensor's dtype and bytes): equal for
    equal weights, whatever the order the submodules were registered in."""
    digest = hashlib.sha256()
    for _, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu()
        digest.update(str(tensor.dtype).encode())
        if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):  # numpy has no such dtypes
            tensor = tensor.float()
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def get_config_model_id(config: PretrainedConfig) -> str:
    """The model id or path a config was loaded from (`_name_or_path`), or `""`."""
    return getattr(config, "_name_or_path", "")


@contextlib.contextmanager
def use_adapter(model: PeftModel, adapter_name: str | None) -> Iterator[None]:
    """Run the block with PEFT adapter `adapter_name` active (None: every adapter disabled), then restore the adapter
    that was active before."""
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise ImportError('use_adapter needs the peft library: pip install "llm-trainer[peft]"') from error
    if adapter_name is None:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(adapter_name)
    try:
        yield
    finally:
        model.set_adapter(previous)


# --------------------------------------------------------------------------------------------- fused LM head
def add_fused_lm_head(
    model: PreTrainedModel,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
) -> None:
    """Let `model(..., labels=labels, fused_lm_head=True)` return a `FusedCausalLMOutput` of per-token log-probs
    instead of logits, never building the `(batch, seq, vocab)` logits: TRL's interface to the library's one fused
    forward, `llm_trainer.modeling.add_token_logprob_head` (calling either again updates the options).

    The labels are shifted for next-token prediction, unless passed pre-shifted as `shift_labels` (context / sequence
    parallelism). `outputs` names the per-token fields computed besides `log_probs`: `"entropy"`,
    `"log_sum_sq_probs"`, `"mean_logits"`, `"is_top1"`. `cast_lm_head_to_fp32` projects in float32 outside autocast.
    Without `fused_lm_head=True` the forward is the model's own (generation is unchanged). Add the head before
    wrapping with PEFT.

    Raises:
        ValueError: an unknown name in `outputs`.
    """
    from ..modeling import TOKEN_OUTPUTS, add_token_logprob_head

    unknown = set(outputs) - {"log_probs", *TOKEN_OUTPUTS}
    if unknown:
        raise ValueError(f"Unknown outputs {sorted(unknown)}; choose among {('log_probs', *TOKEN_OUTPUTS)}.")
    extras = tuple(name for name in outputs if name != "log_probs")
    add_token_logprob_head(model, temperature, extras, cast_lm_head_to_fp32)


# --------------------------------------------------------------------------------------------- FLOPs and MFU
def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def compute_flops_per_token(config: PretrainedConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward = 3 x forward) of a dense or MoE causal LM.

    Per layer: the Q/K/V/O projections, the attention scores over the full `seq_len` (the non-causal convention of
    PaLM / Megatron; see `adjusted_mfu`), and the MLP (SwiGLU, 3 matmuls), or for MoE layers (every
    `decoder_sparse_step`-th, when the config has `num_experts_per_tok`) the active experts plus the router. Plus the
    LM head, counted whether or not it is tied to the embeddings (the lookup itself is free).
    """
    h, n_heads, head_dim = config.hidden_size, config.num_attention_heads, _head_dim(config)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    attention = 2 * h * head_dim * (n_heads + 2 * n_kv)  # Q, K, V projections
    attention += 2 * n_heads * head_dim * h  # output projection
    attention += 2 * 2 * n_heads * head_dim * seq_len  # Q K^T and scores @ V
    dense_mlp = 2 * 3 * h * config.intermediate_size
    active = getattr(config, "num_experts_per_tok", None)
    if active is None:
        layers = config.num_hidden_layers * (attention + dense_mlp)
    else:
        experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
        moe_mlp = active * 2 * 3 * h * config.moe_intermediate_size + 2 * h * experts
        step = getattr(config, "decoder_sparse_step", 1) or 1
        layers = sum(attention + (moe_mlp if i % step == 0 else dense_mlp) for i in range(config.num_hidden_layers))
    return 3 * (layers + 2 * config.vocab_size * h)


# Dense peak throughput per dtype, by device name; more specific names come before the names they contain
_PEAK_FLOPS = (
    ("GB300", {"bfloat16": 2.5e15}),
    ("GB200", {"bfloat16": 2.5e15}),
    ("B300", {"bfloat16": 2.25e15}),
    ("B200", {"bfloat16": 2.25e15}),
    ("H100 NVL", {"float16": 835e12, "bfloat16": 835e12}),
    ("H100 PCIe", {"float16": 756e12, "bfloat16": 756e12}),
    ("H100", {"float16": 989e12, "bfloat16": 989e12}),
    ("H200 NVL", {"float16": 835e12, "bfloat16": 835e12}),
    ("H200", {"float16": 989e12, "bfloat16": 989e12}),
    ("H20", {"float16": 148e12, "bfloat16": 148e12}),
    ("RTX PRO 6000", {"float16": 500e12, "bfloat16": 500e12}),
    ("A100", {"float16": 312e12, "bfloat16": 312e12}),
    ("A6000", {"float16": 154.85e12, "bfloat16": 154.85e12}),
    ("A10G", {"float16": 125e12, "bfloat16": 125e12}),
    ("A10", {"float16": 125e12, "bfloat16": 125e12}),
    ("L40S", {"float16": 362e12, "bfloat16": 362e12}),
    ("L4", {"float16": 121e12, "bfloat16": 121e12}),
    ("T4", {"float16": 65e12}),
    ("MI355X", {"bfloat16": 2500e12}),
    ("MI325X", {"bfloat16": 1300e12}),
    ("MI300X", {"bfloat16": 1300e12}),
    ("MI250X", {"bfloat16": 191.5e12}),
)


def get_peak_flops(device_name: str, dtype: str) -> float | None:
    """Theoretical dense peak FLOP/s of the accelerator called `device_name` (e.g. "NVIDIA H100 80GB HBM3") for
    matmuls in `dtype` ("bfloat16", "float16"), or None when the device or the dtype is not in the table. The model
    name must appear as a whole word ("A10" does not match "A100")."""
    name = device_name.casefold()
    for model, peaks in _PEAK_FLOPS:
        if re.search(rf"\b{re.escape(model.casefold())}\b", name):
            return peaks.get(dtype)
    return None


def get_peak_flops_per_device(accelerator: Accelerator, dtype: str) -> float | None:
    """`get_peak_flops` for the accelerator's CUDA device; logs (info) and returns None when it is unknown."""
    import logging

    peak = get_peak_flops(torch.cuda.get_device_name(accelerator.device), dtype)
    if peak is None:
        logging.getLogger(__name__).info(
            "MFU metrics are disabled: the peak FLOPs of this device in %s are unknown (throughput is still logged).",
            dtype,
        )
    return peak


def compute_mfu(
    flops_per_token: int, tokens_per_second: float, world_size: int, peak_flops_per_device: float
) -> float:
    """Model FLOPs utilization in percent: achieved FLOP/s (`flops_per_token * tokens_per_second`, the tokens of all
    devices, counted once under context / sequence / tensor parallelism) over `world_size` devices' peak."""
    return 100 * flops_per_token * tokens_per_second / (peak_flops_per_device * world_size)


def adjusted_mfu(mfu: float, config: PretrainedConfig, seq_len: int) -> float:
    """`mfu` (from `compute_flops_per_token`'s full-attention count) under the causal convention (Llama, DeepSpeed
    Ulysses): half the attention-score FLOPs are not performed, so they are taken out of the count."""
    full = compute_flops_per_token(config, seq_len)
    masked_half = config.num_hidden_layers * 3 * 2 * config.num_attention_heads * _head_dim(config) * seq_len
    return mfu * (full - masked_half) / full


# ------------------------------------------------------------------------------------------ training utilities
def compute_accuracy(eval_pred: Any) -> dict[str, float]:
    """Accuracy for `compute_metrics`, the default metric of the PRM and reward trainers.

    - Token classification (PRM): `predictions` are logits `(batch, seq_len, num_labels)` or argmaxed ids
      `(batch, seq_len)`, `label_ids` are `(batch, seq_len)`; positions labelled -100 are skipped.
    - Pairwise rewards: `predictions` are `(batch, 2)` (chosen, rejected) rewards and `label_ids` `(batch,)` (the
      index of the better one); pairs with equal rewards are left out, with a warning.
    """
    import warnings

    import numpy as np

    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if labels.ndim == 1 and predictions.ndim == 2:
        tied = predictions[:, 0] == predictions[:, 1]
        if tied.any():
            warnings.warn(
                f"{int(tied.sum())} of {len(tied)} pairs have equal rewards; they are left out of the accuracy.",
                stacklevel=2,
            )
        predictions, labels = predictions[~tied].argmax(-1), labels[~tied]
        return {"accuracy": float((predictions == labels).mean()) if len(labels) else 0.0}
    if predictions.ndim == labels.ndim + 1:
        predictions = predictions.argmax(-1)
    keep = labels != -100
    return {"accuracy": float((predictions[keep] == labels[keep]).mean()) if keep.any() else 0.0}


def empty_cache() -> None:
    """Free the accelerator's cached memory (CUDA, XPU, MPS or NPU, whichever is present) after a garbage collection."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.empty_cache()
    elif torch.backends.mps.is_available():
        torch.mps.empty_cache()
    elif hasattr(torch, "npu") and torch.npu.is_available():
        torch.npu.empty_cache()


def peft_module_casting_to_bf16(model: torch.nn.Module) -> None:
    """Cast a PEFT model for bf16 training in place: normalisation layers to float32 (for stability), LoRA weights,
    the LM head and the embeddings to bfloat16 when they are float32."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) or "norm" in name.split(".")[-1].lower():
            module.to(torch.float32)
        elif any(key in name for key in ("lora_", "lm_head", "embed_tokens", "wte", "wpe")):
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dtype == torch.float32:
                module.to(torch.bfloat16)


def get_model_param_count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of `model` (only those with `requires_grad` when `trainable_only`).

    Under DeepSpeed ZeRO-3 each rank holds a shard and the local tensor is empty: the full size is `ds_numel`.
    Parameters shared between modules (tied embeddings) count once.
    """
    return sum(
        getattr(param, "ds_numel", None) or param.numel()
        for param in model.parameters()
        if param.requires_grad or not trainable_only
    )


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of transformer blocks of a causal LM, PEFT-wrapped or not."""
    base = model
    if hasattr(base, "get_base_model"):  # PeftModel
        base = base.get_base_model()
    candidates = [base, getattr(base, "base_model", None), getattr(base, "model", None)]
    candidates += [getattr(c, "model", None) for c in candidates[1:] if c is not None]
    candidates += [getattr(base, "transformer", None)]
    for holder in candidates:
        if holder is None:
            continue
        for path in ("layers", "h", "decoder.layers", "language_model.layers"):
            layers = holder
            for part in path.split("."):
                layers = getattr(layers, part, None)
            if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
                return layers
    raise ValueError(
        f"Cannot find the transformer layers of {type(model).__name__}: looked for a `layers`, `h` or `decoder.layers` "
        "module list on its base model."
    )


def freeze_model_layers(model: torch.nn.Module, n: int) -> torch.nn.Module:
    """Freeze the input embeddings and the first `n` transformer layers of `model` (`requires_grad = False`); the
    other layers, the final norm and the LM head keep their setting. Returns the model.

    The layers are the model's decoder blocks (`model.layers`, `transformer.h` or `model.decoder.layers`), in order;
    `n` must be between 0 and their number.
    """
    layers = _decoder_layers(model)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(layers):
        raise ValueError(f"n must be an integer between 0 and {len(layers)} (the number of layers); got {n!r}.")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        embeddings.requires_grad_(False)
    for layer in layers[:n]:
        layer.requires_grad_(False)
    return model
