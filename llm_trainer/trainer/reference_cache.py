"""On-disk cache of precomputed reference log-probs (`precompute_ref_log_probs=True`).

The reference pass over a whole dataset costs as much as an epoch of forwards; re-running the same recipe (a new
learning rate, a crashed run restarted) need not repeat it. `cached_reference_columns` wraps the computation: the
columns are stored under a key that fingerprints everything that changes their values, and a later run with the
same key loads them and makes no reference forward.

The key hashes:

- the reference model: `name_or_path`, the Hub commit when known, every tensor's name, shape and dtype, and its
  bytes: all of them when the model's (local) tensors total at most `FULL_HASH_BYTES`, else an evenly spaced
  sample of `SAMPLED_ELEMENTS` elements per tensor (a full hash of a multi-GB model would cost seconds of transfers
  and hashing per run; a trained or different checkpoint changes nearly every element, so a sample tells them
  apart; a sparse hand edit of a large model is the case it misses: change its path or disable the cache).
  Sharded tensors (FSDP2 DTensors, ZeRO-3 partitions) are hashed by their local shard, and the ranks' keys are
  combined, so every rank holds the same key. A PEFT policy that is its own reference is hashed without the
  adapters the reference does not run (with adapters disabled: none of them), so a new LoRA rank or seed still hits;
- the prepared dataset's content (its Arrow buffers and index mapping): exactly the token ids the reference reads,
  so the raw data, the tokenizer, the chat template and the dataset-side truncation are covered. (`datasets`'
  `_fingerprint` cannot serve: a DPO-prepared dataset gets a new one in every process, its map functions not
  being hashed deterministically, so a second run would never hit);
- the tokenizer (name, vocabulary size, special tokens) and the collation/forward fields of the config that
  change the values (`CONFIG_FIELDS`), the batch size of the reference pass, the trainer class, its reference
  columns and reference adapter, the process count, device type, mixed precision and the library version.

Files: `<dir>/<key>.safetensors` (one float64 tensor per column, a checksum of their bytes and the key in the
metadata), written to a temporary name and renamed (atomic), by each node's local main process. `<dir>` is
`$LLM_TRAINER_CACHE/ref_logps` when that variable is set, else `llm_trainer_ref_logps/` beside the dataset's cache
files when it has any, else `~/.cache/llm_trainer/ref_logps`. `LLM_TRAINER_REF_CACHE=0` (or a trainer class with
`cache_reference_logps = False`) turns the cache off. A file that fails to load or to check is ignored with a
warning and recomputed; a directory that cannot be written only warns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FULL_HASH_BYTES = 512 * 2**20
"""Models whose (local) tensors total at most this many bytes are hashed in full, larger ones by sampled elements."""
SAMPLED_ELEMENTS = 4096
"""Elements hashed per tensor of a large model (evenly spaced over the flattened tensor, first and last included)."""

CONFIG_FIELDS = (
    "max_length",
    "max_prompt_length",
    "max_completion_length",
    "truncation_mode",
    "padding_free",
    "pad_to_multiple_of",
    "pad_token",
    "padding_value",
    "label_pad_token_id",
    "ld_alpha",
    "use_logits_to_keep",
    "use_liger_kernel",
    "bf16",
    "fp16",
    "tf32",
    "model_init_kwargs",
    "ref_model_init_kwargs",
    "disable_dropout",
    "is_encoder_decoder",
)
"""Config fields read when collating a batch or running the reference forward (absent ones are skipped)."""

CACHE_SUBDIR = "ref_logps"


def cache_enabled(trainer: Any) -> bool:
    """Whether `trainer` caches its precomputed reference log-probs (`LLM_TRAINER_REF_CACHE=0` turns it off)."""
    flag = os.environ.get("LLM_TRAINER_REF_CACHE", "1").strip().lower()
    return flag not in ("0", "false", "no", "off") and getattr(trainer, "cache_reference_logps", True)


def cache_dir(dataset: Any) -> Path:
    """Where the columns of `dataset` are cached (see the module docstring)."""
    root = os.environ.get("LLM_TRAINER_CACHE")
    if root:
        return Path(root).expanduser() / CACHE_SUBDIR
    files = getattr(dataset, "cache_files", None) or []
    if files:
        return Path(files[0]["filename"]).parent / f"llm_trainer_{CACHE_SUBDIR}"
    return Path("~/.cache/llm_trainer").expanduser() / CACHE_SUBDIR


# ------------------------------------------------------------------------------------------------ fingerprints
def _local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this process holds: a DTensor's local shard, a ZeRO-3 partition, else the tensor."""
    if hasattr(tensor, "to_local"):
        return tensor.to_local()
    partition = getattr(tensor, "ds_tensor", None)
    return partition if partition is not None else tensor


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    return flat.cpu().contiguous().view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def model_fingerprint(model: torch.nn.Module, skip_adapters: frozenset[str] = frozenset()) -> str:
    """A hex digest of `model`'s identity and of the weights this process holds (see the module docstring; a
    sharded model's digest differs between ranks, and `cached_reference_columns` combines them). Tensors of the
    PEFT adapters named in `skip_adapters` (the ones the reference does not run) are left out."""

    def kept(name: str) -> bool:
        return not skip_adapters or skip_adapters.isdisjoint(name.split("."))

    tensors = [(f"param:{n}", _local_tensor(p)) for n, p in model.named_parameters(remove_duplicate=False) if kept(n)]
    tensors += [(f"buffer:{n}", _local_tensor(b)) for n, b in model.named_buffers(remove_duplicate=False) if kept(n)]
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    full = total <= FULL_HASH_BYTES
    hasher = hashlib.sha256()
    config = getattr(model, "config", None)
    for value in (getattr(config, "name_or_path", ""), getattr(config, "_commit_hash", None), type(model).__name__):
        hasher.update(f"{value}\0".encode())
    hasher.update(b"full" if full else f"sampled:{SAMPLED_ELEMENTS}".encode())
    for name, tensor in tensors:
        shape = tuple(getattr(tensor, "ds_shape", None) or tensor.shape)
        hasher.update(f"{name}|{shape}|{tuple(tensor.shape)}|{tensor.dtype}\0".encode())
        with torch.no_grad():
            if tensor.is_meta:  # not materialised on this rank (e.g. loaded on the main process only)
                hasher.update(b"meta")
            elif full or tensor.numel() <= SAMPLED_ELEMENTS:
                hasher.update(_tensor_bytes(tensor))
            else:
                flat = tensor.detach().reshape(-1)
                steps = torch.arange(SAMPLED_ELEMENTS, device=flat.device, dtype=torch.int64)
                index = steps * (flat.numel() - 1) // (SAMPLED_ELEMENTS - 1)  # exact integers, ends included
                hasher.update(_tensor_bytes(flat[index]))
    return hasher.hexdigest()


def dataset_fingerprint(dataset: Any) -> str:
    """A hex digest of a map-style dataset's content: every Arrow buffer of its table and of its index mapping."""
    hasher = hashlib.sha256()
    tables = [("data", dataset.data.table)]
    if getattr(dataset, "_indices", None) is not None:
        tables.append(("indices", dataset._indices.table))
    for label, table in tables:
        hasher.update(f"{label}|{table.num_rows}|{table.schema}\0".encode())
        for name, column in zip(table.column_names, table.columns, strict=True):
            hasher.update(f"column:{name}\0".encode())
            for chunk in column.chunks:
                hasher.update(f"{chunk.offset}|{len(chunk)}\0".encode())
                for buffer in chunk.buffers():
                    hasher.update(b"\1" if buffer is None else memoryview(buffer))
    return hasher.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hex digest of the tokenizer's name, vocabulary size and special tokens (the token ids themselves are in
    the dataset's content hash)."""
    if tokenizer is None:
        return "none"
    fields = {
        "class": type(tokenizer).__name__,
        "name": getattr(tokenizer, "name_or_path", None),
        "size": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
        "special": getattr(tokenizer, "special_tokens_map", None),
        "padding_side": getattr(tokenizer, "padding_side", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def config_fingerprint(args: Any) -> dict[str, Any]:
    """The `CONFIG_FIELDS` that `args` has, JSON-ready."""
    return {
        field: json.loads(json.dumps(getattr(args, field), default=str))
        for field in CONFIG_FIELDS
        if hasattr(args, field)
    }


def cache_key(parts: dict[str, Any]) -> str:
    """The cache file's stem: a hash of the JSON of every keyed part."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------------ file format
def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        hasher.update(name.encode() + b"\0" + _tensor_bytes(tensors[name]))
    return hasher.hexdigest()


def save_columns(path: Path, key: str, columns: dict[str, list[float]]) -> None:
    """Write `columns` to `path` atomically (temporary file in the same directory, then `os.replace`)."""
    from safetensors.torch import save_file

    tensors = {name: torch.tensor(values, dtype=torch.float64) for name, values in columns.items()}
    metadata = {"key": key, "checksum": _checksum(tensors), "format": "llm_trainer.ref_logps.v1"}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_columns(path: Path, key: str, num_rows: int) -> dict[str, list[float]] | None:
    """The columns cached at `path` for `key`; None when there is no file, and None with a warning when the file
    is unreadable, truncated, for another key or of the wrong length (it is then recomputed and overwritten)."""
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
        problem = None
        if metadata.get("key") != key:
            problem = "it was written for another key"
        elif not tensors or any(t.dim() != 1 or t.numel() != num_rows for t in tensors.values()):
            problem = f"its columns do not have the dataset's {num_rows} rows"
        elif metadata.get("checksum") != _checksum(tensors):
            problem = "its checksum does not match"
        if problem is None:
            return {name: tensor.tolist() for name, tensor in tensors.items()}
    except Exception as error:  # a partial or corrupt file: any read error
        problem = f"it could not be read ({type(error).__name__}: {error})"
    warnings.warn(
        f"Ignoring the cached reference log-probs at {path}: {problem}. They are recomputed and the file rewritten.",
        stacklevel=2,
    )
    return None


# ------------------------------------------------------------------------------------------------ the wrapper
def cached_reference_columns(
    trainer: Any,
    dataset: Any,
    name: str,
    columns: tuple[str, ...],
    compute: Callable[[Any], Any],
    model: torch.nn.Module | None,
) -> Any:
    """`dataset` with the reference log-prob `columns`: loaded from the cache when its key matches, else
    `compute(dataset)` (every rank: the pass may be collective) and written by each node's local main process.

    All ranks agree on hit or miss (a miss anywhere computes everywhere) and meet at a barrier after writing.
    """
    accelerator = trainer.accelerator
    distributed = accelerator.num_processes > 1
    if distributed:
        from accelerate.utils import gather_object
    try:
        local_key, error = _local_key(trainer, dataset, name, columns, model), None
    except Exception as exc:  # an unhashable model or dataset: run without the cache, on every rank alike
        local_key, error = None, exc
    keys = gather_object([local_key]) if distributed else [local_key]
    if any(k is None for k in keys):
        if error is not None:
            warnings.warn(
                f"Not caching the reference log-probs of the {name} dataset: its cache key could not be computed "
                f"({type(error).__name__}: {error}).",
                stacklevel=2,
            )
        return compute(dataset)
    key = keys[0] if len(set(keys)) == 1 else cache_key({"ranks": keys})  # sharded weights: one key from all
    path = cache_dir(dataset) / f"{key}.safetensors"
    found = load_columns(path, key, len(dataset))
    hit = found is not None
    if distributed:
        hit = all(gather_object([hit]))
    if hit:
        logger.info("Loaded the reference log-probs of the %s dataset from %s", name, path)
        for column in columns:  # in the order the computation adds them
            if column in found and column not in dataset.column_names:
                dataset = dataset.add_column(column, found[column])
        return dataset
    result = compute(dataset)
    if accelerator.is_local_main_process:
        computed = {column: list(result[column]) for column in columns if column in result.column_names}
        try:
            save_columns(path, key, computed)
            logger.info("Cached the reference log-probs of the %s dataset at %s", name, path)
        except Exception as error:  # a read-only or full disk must not stop training
            warnings.warn(
                f"Could not cache the reference log-probs at {path} ({error}); they are recomputed next run. Set "
                "`LLM_TRAINER_CACHE` to a writable directory, or `LLM_TRAINER_REF_CACHE=0` to silence this.",
                stacklevel=2,
            )
    if distributed:
        accelerator.wait_for_everyone()
    return result


def _local_key(trainer: Any, dataset: Any, name: str, columns: tuple[str, ...], model: Any) -> str:
    """This process's cache key (the model part from the weights it holds)."""
    accelerator, args, reference = trainer.accelerator, trainer.args, trainer.reference
    batch_size = getattr(args, "precompute_ref_batch_size", None) or (
        args.per_device_train_batch_size if name == "train" else args.per_device_eval_batch_size
    )
    model = accelerator.unwrap_model(model) if model is not None else None
    adapters = dict(getattr(model, "peft_config", None) or {})
    active = None  # the PEFT adapter the reference runs (None: adapters disabled); see `ReferencePolicy.context`
    if reference.model is None and adapters:
        active = reference.adapter_name or ("ref" if "ref" in adapters else None)
    skip = frozenset(adapters) - {active} if reference.model is None else frozenset()
    parts = {
        "model": model_fingerprint(model, skip) if model is not None else None,
        "separate_reference": reference.model is not None,
        "adapter": active,
        "adapter_config": repr(adapters.get(active)) if active else None,
        "dataset": dataset_fingerprint(dataset),
        "rows": len(dataset),
        "tokenizer": tokenizer_fingerprint(getattr(trainer, "_tokenizer", None)),
        "config": config_fingerprint(args),
        "batch_size": batch_size,
        "trainer": type(trainer).__name__,
        "columns": list(columns),
        "calculate_kl": getattr(trainer, "calculate_kl", None),
        "processes": accelerator.num_processes,
        "device": accelerator.device.type,
        "mixed_precision": str(accelerator.mixed_precision),
        "version": _version(),
    }
    return cache_key(parts)


def _version() -> str:
    from .. import __version__

    return __version__
