"""The generation loop an on-policy trainer owns (GRPO, RLOO, distillation, the teacher trainer).

One *generation batch* (`generation_batch_size` rows over every process: each prompt repeated `num_generations`
times) is generated at once, shuffled, cut into `steps_per_generation` micro-batches and reused for
`num_iterations` passes. `GenerationLoop` holds what that takes: the batch geometry (`BatchGeometry`, computed
once), the buffer with the one step clock that indexes it, weight sync to the back end, generate-and-pad (a
`Rollout`, then an `OnlineBatch`) and the completion-length metrics. It returns values; the trainer records them.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather, set_seed
from datasets import Dataset, IterableDataset
from transformers import PaliGemmaProcessor, ProcessorMixin
from transformers.utils import logging

from ..data.collators import pad
from ..data.formats import is_conversational, prepare_multimodal_messages
from ..data.sampling import RepeatSampler, repeat_iterable_dataset
from ..data.validation import check_text_columns
from ..data.vision import IMAGE_COLUMNS, row_images
from ..trainer.utils import shuffle_sequence_dict, split_tensor_dict
from .base import TOKEN_TYPE_KEYS, Generator, VisionInputs
from .factory import eos_token_ids

logger = logging.get_logger(__name__)

GENERATION_BUFFER_NAME = "generation_buffer_{}.pt"
"""A checkpoint's buffered generation batch, one file per process (by process index)."""

RolloutFunc = Callable[..., dict[str, Any]]
"""TRL's `rollout_func(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs", ...}`; one that declares a
`rows` parameter also gets the prompts' dataset rows."""


@dataclass(frozen=True)
class BatchGeometry:
    """How prompts are grouped, generated and reused, computed once from the config."""

    steps_per_generation: int
    generation_batch_size: int
    num_generations: int = 1
    num_generations_eval: int = 1
    num_iterations: int = 1

    @classmethod
    def from_args(cls, args: Any, num_processes: int) -> BatchGeometry:
        per_device, steps = args.per_device_train_batch_size, args.steps_per_generation
        num_generations = getattr(args, "num_generations", 1)
        return cls(
            steps_per_generation=steps,
            generation_batch_size=getattr(args, "generation_batch_size", None) or per_device * num_processes * steps,
            num_generations=num_generations,
            num_generations_eval=getattr(args, "num_generations_eval", None) or num_generations,
            num_iterations=getattr(args, "num_iterations", 1),
        )

    @property
    def generate_every(self) -> int:
        """Micro-steps trained on one generation batch."""
        return self.steps_per_generation * self.num_iterations

    def repeat_counts(self) -> dict[str, int]:
        """Each prompt once per generation, `generation_batch_size` rows at a time, each batch once per step."""
        return {
            "mini_repeat_count": self.num_generations,
            "batch_size": self.generation_batch_size // self.num_generations,
            "repeat_count": self.generate_every,
        }

    def min_train_rows(self) -> tuple[int, str, str]:
        """Whole generation batches only: an incomplete one is dropped."""
        needed = self.generation_batch_size // self.num_generations
        why = (
            f"one generation batch takes {needed} prompts (generation_batch_size={self.generation_batch_size} / "
            f"num_generations={self.num_generations}), and an incomplete one is dropped"
        )
        fix = "Add prompts, or lower `per_device_train_batch_size`, `steps_per_generation` or `generation_batch_size`."
        return needed, why, fix

    def needs_old_logps(self, gradient_accumulation_steps: int) -> bool:
        """Whether the policy moves before a generation batch is used up (so the sampler's log-probs are kept)."""
        return gradient_accumulation_steps % self.generate_every != 0


@dataclass
class Rollout:
    """What generation returns for a batch of prompts, one entry per prompt, in order."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[Any]
    """Decoded completions: text, or `[{"role": "assistant", ...}]` for conversational prompts."""
    logprobs: list[list[float | None]] | None = None
    """The sampler's log-probs of `completion_ids` (None entries for tokens it did not sample), when it reports them."""
    env_mask: list[list[int]] | None = None
    """1 where the policy wrote the token, 0 where an environment did; None without one."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further fields of a rollout function's output: reward-function keywords."""
    prompts: list[Any] | None = None
    """The prompts as generated from, when they differ from the dataset's: conversations with the row's images in
    their content (`prepare_multimodal_messages`), which reward functions and logs get, as in TRL."""
    images: list[list[Any]] | None = None
    """Each prompt's images (PIL), None when no prompt of the batch has one."""
    vision: VisionInputs | None = None
    """The processor's image tensors of the prompts (None without images)."""


@dataclass
class OnlineBatch:
    """The padded batch the loss reads: rollout tensors plus what the trainer computed for them."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    tool_mask: torch.Tensor | None = None
    """0 on tokens an environment wrote: attended to, not trained on."""
    sampling_per_token_logps: torch.Tensor | None = None
    old_per_token_logps: torch.Tensor | None = None
    ref_per_token_logps: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    importance_sampling_ratio: torch.Tensor | None = None
    num_items_in_batch: torch.Tensor | None = None
    """Loss tokens of the whole generation batch, over every process."""
    vision: VisionInputs | None = None
    """The prompts' image tensors (vision-language models); `token_types` span the prompt columns."""

    @property
    def loss_mask(self) -> torch.Tensor:
        """The completion tokens the loss trains on: the completion mask, without environment-written tokens."""
        return self.completion_mask if self.tool_mask is None else self.completion_mask * self.tool_mask

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def as_dict(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def select(self, rows: torch.Tensor) -> OnlineBatch:
        """The batch of `rows` (indices); per-batch scalars (`num_items_in_batch`) are kept as they are, and each row
        keeps its own images."""
        size = self.prompt_ids.size(0)

        def pick(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == size:
                return value[rows]
            if isinstance(value, VisionInputs):
                return value.select(rows.cpu() if isinstance(rows, torch.Tensor) else rows)
            return value

        return OnlineBatch(**{name: pick(value) for name, value in self.as_dict().items()})

    def model_kwargs(self, rows: slice | None = None) -> dict[str, torch.Tensor]:
        """The image keywords of the model's forward on `input_ids` (of `rows`): none without images."""
        if self.vision is None:
            return {}
        vision = self.vision
        if rows is not None:
            vision = vision.select(range(*rows.indices(vision.rows)))
        return vision.model_kwargs(self.prompt_ids.size(1) + self.completion_ids.size(1))

    def state(self) -> dict[str, Any]:
        """The batch as plain tensors (for `torch.save` / `torch.load(weights_only=True)`); `from_state` undoes it."""
        state = self.as_dict()
        state["vision"] = self.vision.state() if self.vision is not None else None
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> OnlineBatch:
        vision = state.get("vision")
        return cls(**{**state, "vision": VisionInputs.from_state(vision) if vision is not None else None})


class GenerationLoop:
    """Generates, pads and buffers the completions of an on-policy trainer.

    Args:
        generator: the generation back end.
        processing_class: the policy's tokenizer or processor (tokenizes prompts, decodes completions).
        geometry: the batch geometry.
        device: where the padded tensors go.
        eos_token_ids: the ids that end a completion (one ending otherwise was truncated).
        args: the trainer's config: `chat_template_kwargs`, `pad_to_multiple_of`, `seed`, `shuffle_dataset`.
        mask_truncated_completions: drop truncated completions from the loss.
    """

    def __init__(
        self,
        generator: Generator,
        processing_class: Any,
        geometry: BatchGeometry,
        device: torch.device,
        eos_token_ids: list[int],
        args: Any,
        mask_truncated_completions: bool = False,
    ):
        self.generator, self.processing_class, self.geometry = generator, processing_class, geometry
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.is_vlm = isinstance(processing_class, ProcessorMixin)
        self.device, self.eos_token_ids = device, eos_token_ids
        self.chat_template_kwargs = args.chat_template_kwargs or {}
        self.pad_to_multiple_of, self.seed, self.shuffle = args.pad_to_multiple_of, args.seed, args.shuffle_dataset
        self.mask_truncated_completions = mask_truncated_completions
        self.step = 0
        """Micro-steps trained so far: the one clock of the buffer (set from `global_step` on resume)."""
        self.buffer: list[OnlineBatch] | None = None
        self._synced_at, self._step_time = -1, 0.0

    @classmethod
    def from_args(cls, args: Any, trainer: Any, mask_truncated_completions: bool = False) -> GenerationLoop:
        """The loop of an on-policy `trainer` once `Trainer.__init__` ran, with the back end `args` selects (seeded
        per process); the policy gets the tokenizer's pad token. `nn.DataParallel`, which splits a generation batch
        arbitrarily, is refused."""
        if args.n_gpu > 1:
            raise ValueError(
                f"{type(trainer).__name__} does not support `nn.DataParallel`; launch with `accelerate launch` or "
                "`torchrun`, or make one GPU visible with `CUDA_VISIBLE_DEVICES`."
            )
        from . import make_generator

        set_seed(args.seed, device_specific=True)
        accelerator, processing_class = trainer.accelerator, trainer.processing_class
        eos = generation_tokens(accelerator.unwrap_model(trainer.model), trainer._tokenizer)
        unwrap = trainer.unwrapped_for_generation
        generator = make_generator(args, trainer.model, processing_class, accelerator=accelerator, unwrap=unwrap)
        geometry = BatchGeometry.from_args(args, accelerator.num_processes)
        return cls(generator, processing_class, geometry, accelerator.device, eos, args, mask_truncated_completions)

    # ----------------------------------------------------------------------------------------------- data
    def train_sampler(self, dataset: Dataset) -> RepeatSampler:
        return RepeatSampler(dataset, **self.geometry.repeat_counts(), shuffle=self.shuffle, seed=self.seed)

    def eval_sampler(self, dataset: Dataset) -> RepeatSampler:
        return RepeatSampler(dataset, mini_repeat_count=self.geometry.num_generations_eval, seed=self.seed)

    def eval_stream(self, dataset: IterableDataset) -> IterableDataset:
        return repeat_iterable_dataset(dataset, self.geometry.num_generations_eval, seed=self.seed)

    def train_loader_kwargs(self, dataset: Dataset | IterableDataset, batch_size: int) -> dict[str, Any]:
        """`Trainer._get_dataloader`'s arguments for training: batches of `steps_per_generation` micro-batches, one
        generation batch per refill. A stream, which a sampler cannot index, is reordered as the sampler would."""
        if isinstance(dataset, IterableDataset):
            dataset = repeat_iterable_dataset(
                dataset, **self.geometry.repeat_counts(), seed=self.seed if self.shuffle else None
            )
        return {
            "dataset": dataset,
            "description": "Training",
            "batch_size": batch_size * self.geometry.steps_per_generation,
            "sampler_fn": self.train_sampler,
            "is_training": True,
        }

    # ----------------------------------------------------------------------------------------------- buffer
    def needs_generation(self) -> bool:
        """Whether the next training micro-step samples a new generation batch (else it reuses the buffer)."""
        return self.buffer is None or self.step % self.geometry.generate_every == 0

    def fill(self, batch: OnlineBatch) -> None:
        """Buffer a generation batch: shuffled and cut into `steps_per_generation` micro-batches (rows with images
        take theirs along: the same permutation, drawn the same way)."""
        steps = self.geometry.steps_per_generation
        if batch.vision is None:
            parts = split_tensor_dict(shuffle_sequence_dict(batch.as_dict()), steps)
            self.buffer = [OnlineBatch(**part) for part in parts]
            return
        order = torch.randperm(batch.prompt_ids.size(0))
        size = order.numel() // steps
        self.buffer = [
            batch.select(order[i * size : (i + 1) * size].to(batch.prompt_ids.device)) for i in range(steps)
        ]

    def next_batch(self) -> OnlineBatch:
        """This micro-step's slice of the buffer; advances the clock."""
        batch = self.buffer[self.step % self.geometry.steps_per_generation]
        self.step += 1
        return batch

    def time_step(self, seconds: float, accumulation_steps: int) -> float | None:
        """Add a micro-step's `seconds`; at the end of an optimizer step (by the clock), return its total."""
        self._step_time += seconds
        if self.step % accumulation_steps != 0:
            return None
        total, self._step_time = self._step_time, 0.0
        return total

    def save(self, folder: str, process_index: int, num_processes: int) -> None:
        """Save this process's buffer with the clock when the checkpoint falls while it is being consumed: a resumed
        run then trains on the very generations the uninterrupted run does, instead of sampling anew (as TRL does)
        with the dataloader's prompts out of step with the buffer."""
        if self.needs_generation():
            return
        os.makedirs(folder, exist_ok=True)
        buffer = [batch.state() for batch in self.buffer]
        state = {"step": self.step, "num_processes": num_processes, "buffer": buffer}
        torch.save(state, os.path.join(folder, GENERATION_BUFFER_NAME.format(process_index)))

    def load(self, folder: str, process_index: int, num_processes: int, micro_step: int) -> None:
        """Resume at `micro_step` with the buffer saved in `folder`; without one (the checkpoint fell between
        generation batches), the next micro-step samples a new batch."""
        self.step, self.buffer = micro_step, None
        path = os.path.join(folder, GENERATION_BUFFER_NAME.format(process_index))
        if not os.path.isfile(path):
            return
        location = "cpu" if self.device.type == "cpu" else self.device  # torch.load cannot map to "cpu:0"
        state = torch.load(path, map_location=location, weights_only=True)
        saved = (state["num_processes"], len(state["buffer"]))
        now = (num_processes, self.geometry.steps_per_generation)
        if saved != now:
            logger.warning(
                f"The generation buffer in {folder} was saved with {saved[0]} processes and {saved[1]} steps per "
                f"generation, not {now[0]} and {now[1]}: sampling a new generation batch instead of resuming from it."
            )
            return
        self.step, self.buffer = state["step"], [OnlineBatch.from_state(batch) for batch in state["buffer"]]

    # ----------------------------------------------------------------------------------------------- generation
    def sync_weights(self, model: torch.nn.Module, global_step: int) -> None:
        """Push the policy's weights to the back end, once per optimizer step."""
        if global_step != self._synced_at:
            self.generator.sync_weights(model)
            self._synced_at = global_step

    def generate(
        self,
        prompts: list[Any],
        rows: list[dict[str, Any]],
        rollout_func: RolloutFunc | None = None,
        trainer: Any = None,
    ) -> Rollout:
        """Completions of `prompts`: from the back end, or from `rollout_func(prompts, trainer[, rows=rows])`.

        Rows with images (an `image` or `images` column) have them put into their conversation
        (`prepare_multimodal_messages`); the processor's image tensors go to the back end and into the rollout."""
        extra: dict[str, Any] = {}
        images = batch_images(rows)
        given = prompts
        if images is not None:
            prompts = [prepare_multimodal_messages(p, images=i) for p, i in zip(prompts, images, strict=True)]
        vision = None
        if rollout_func is not None:
            output = call_rollout_func(rollout_func, copy.deepcopy(prompts), trainer, rows)
            prompt_ids, completion_ids, logprobs = output["prompt_ids"], output["completion_ids"], output["logprobs"]
            extra = {k: v for k, v in output.items() if k not in ("prompt_ids", "completion_ids", "logprobs")}
            if images is not None:
                vision = tokenize_vision_prompts(self.processing_class, prompts, self.chat_template_kwargs)[1]
                vision = vision.to(self.device)
        elif images is not None:
            prompt_ids, vision = tokenize_vision_prompts(self.processing_class, prompts, self.chat_template_kwargs)
            vision = vision.to(self.device)  # once: generation and the log-prob passes share it
            result = self.generator.generate(prompt_ids, images=images, vision=vision)
            completion_ids, logprobs = result.completion_ids, result.logprobs
        else:
            if self.is_vlm and is_conversational({"prompt": prompts[0]}):  # the processor's content-block format
                prompts = [prepare_multimodal_messages(p) for p in prompts]
            prompt_ids = tokenize_prompts(self.processing_class, prompts, self.chat_template_kwargs)
            prompts = given
            result = self.generator.generate(prompt_ids)
            completion_ids, logprobs = result.completion_ids, result.logprobs
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        conversational = is_conversational({"prompt": prompts[0]})
        completions = [[{"role": "assistant", "content": text}] for text in texts] if conversational else texts
        env_mask = extra.pop("env_mask", None)
        shown = prompts if prompts is not given else None
        return Rollout(prompt_ids, completion_ids, completions, logprobs, env_mask, extra, shown, images, vision)

    def pad(self, rollout: Rollout) -> OnlineBatch:
        """The rollout as left-padded prompts and right-padded completions (truncated completions masked out of the
        loss when `mask_truncated_completions`)."""
        prompt_ids, prompt_mask = self._pad([torch.tensor(ids) for ids in rollout.prompt_ids], "left")
        completion_ids, completion_mask = self._pad([torch.tensor(ids) for ids in rollout.completion_ids], "right")
        tool_mask = sampling = None
        if rollout.env_mask is not None:
            rows = [torch.tensor(mask, dtype=torch.long) for mask in rollout.env_mask]
            tool_mask = pad(rows, 1, "right", self.pad_to_multiple_of).to(self.device)
        if self.mask_truncated_completions:
            kept = (~self._truncated(rollout.completion_ids)).unsqueeze(1).int()
            completion_mask = completion_mask * kept
            tool_mask = tool_mask * kept if tool_mask is not None else None
        if rollout.logprobs is not None:
            rows = [torch.tensor([math.nan if x is None else x for x in row]) for row in rollout.logprobs]
            sampling = self._pad(rows, "right")[0].float()
        batch = OnlineBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, tool_mask, sampling)
        if rollout.vision is not None:
            batch.vision = self._prompt_vision(rollout, prompt_ids.size(1))
        return batch

    def _prompt_vision(self, rollout: Rollout, width: int) -> VisionInputs:
        """The rollout's image inputs with their token types left-padded to the padded prompts' `width` (whose
        tokens they describe: their last columns)."""
        vision = rollout.vision.to(self.device)  # a no-op for the rollouts `generate` makes
        token_types = {}
        for key, value in vision.token_types.items():
            if value.size(1) > width:
                raise ValueError(
                    f"The processor's '{key}' spans {value.size(1)} prompt tokens but the prompts have at most {width}; "
                    "a `rollout_func` must return the prompt ids the processor makes from the prompts."
                )
            token_types[key] = torch.cat([value.new_zeros(value.size(0), width - value.size(1)), value], dim=1)
        return VisionInputs(vision.num_images, vision.tensors, token_types, vision.completion_types)

    def _pad(self, rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        values = pad(rows, self.tokenizer.pad_token_id, side, self.pad_to_multiple_of).to(self.device)
        mask = pad([torch.ones(len(row), dtype=torch.long) for row in rows], 0, side, self.pad_to_multiple_of)
        return values, mask.to(self.device)

    def _truncated(self, completion_ids: list[list[int]]) -> torch.Tensor:
        ends = {*self.eos_token_ids, self.tokenizer.pad_token_id}
        return torch.tensor([not ids or ids[-1] not in ends for ids in completion_ids], device=self.device)

    def completion_metrics(self, rollout: Rollout) -> tuple[int, dict[str, float]]:
        """The batch's tokens over every process, and the completion-length metrics (TRL's names); with an
        environment mask, only the policy's tokens count."""
        prompt_lengths = gather(torch.tensor([len(ids) for ids in rollout.prompt_ids], device=self.device))
        env_mask = rollout.env_mask
        written = [sum(m) for m in env_mask] if env_mask is not None else [len(ids) for ids in rollout.completion_ids]
        lengths = gather(torch.tensor(written, device=self.device))
        if lengths.numel() == 0:
            raise RuntimeError("No completions were generated; see the generation logs above for the cause.")
        truncated = gather(self._truncated(rollout.completion_ids))
        terminated = lengths[~truncated].float()
        terminated = terminated if terminated.numel() else torch.zeros(1, device=self.device)
        metrics = {}
        for prefix, values in (("", lengths.float()), ("terminated_", terminated)):
            metrics[f"completions/mean_{prefix}length"] = values.mean().item()
            metrics[f"completions/min_{prefix}length"] = values.min().item()
            metrics[f"completions/max_{prefix}length"] = values.max().item()
        metrics["completions/clipped_ratio"] = truncated.float().mean().item()
        return int(prompt_lengths.sum() + lengths.sum()), metrics

    def close(self) -> None:
        """Stop the generation back end."""
        self.generator.close()


def check_streaming(train_dataset: Any, eval_dataset: Any, args: Any) -> None:
    """Streamed (`IterableDataset`) prompts are repeated and grouped in the stream itself, so every process must read
    its own batches: refuse an explicit `dispatch_batches=True`."""
    evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
    streamed = any(isinstance(dataset, IterableDataset) for dataset in (train_dataset, *evals))
    if streamed and args.accelerator_config.dispatch_batches:
        raise ValueError(
            "Iterable datasets require `dispatch_batches=False` (each process reads its own slice of the prompt "
            "stream), but `accelerator_config` sets it to True: set it to False or leave it unset."
        )


def configure_streaming(train_dataset: Any, args: Any) -> None:
    """A training stream is read by a single loader process (several would interleave it and split the groups of
    repeated prompts): set `dataloader_num_workers=0`, with a warning when that changes it."""
    if isinstance(train_dataset, IterableDataset) and args.dataloader_num_workers != 0:
        logger.warning(
            f"An `IterableDataset` is read with `dataloader_num_workers=0` (not {args.dataloader_num_workers}): "
            "several workers would interleave the stream and split the groups of repeated prompts."
        )
        args.dataloader_num_workers = 0


def dataset_columns(dataset: Dataset | IterableDataset) -> list[str]:
    """The dataset's columns; for a stream of unknown features, the keys of its first record."""
    if dataset.column_names is not None:
        return dataset.column_names
    return list(next(iter(dataset.take(1)), {}))


def generation_tokens(model: Any, tokenizer: Any) -> list[int]:
    """Give `model` the tokenizer's pad token (config and generation config); return the ids that end a
    completion."""
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return eos_token_ids(model, tokenizer)


def prompt_columns(
    train_dataset: Any, eval_dataset: Any, trainer_name: str, has_rollout: bool = False, images: bool = False
) -> list[str]:
    """The training dataset's columns, checked: no images unless the trainer takes them (`images`; see
    `check_image_prompts`), a 'prompt' column (unless a rollout function makes the prompts), and every 'prompt' cell
    (train and eval) a string or a conversation."""
    columns = dataset_columns(train_dataset)
    if not images and set(IMAGE_COLUMNS) & set(columns):
        raise NotImplementedError(
            f"{trainer_name} does not train vision-language models yet: drop the image column(s) or use TRL."
        )
    if "prompt" not in columns and not has_rollout:
        raise ValueError(
            f"The training dataset has no 'prompt' column (columns: {columns}); rename the column holding the prompts "
            "to 'prompt'."
        )
    evals = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]
    for name, dataset in [("train", train_dataset), *evals]:
        if isinstance(dataset, Dataset | IterableDataset):
            check_text_columns(dataset, ["prompt"], name)
    return columns


@contextlib.contextmanager
def streaming_loader(args: Any, accelerator: Any) -> Iterator[None]:
    """While a loader for a streamed eval dataset is built: `dispatch_batches=False` (each process reads its own
    slice) and a single loader process; both are restored afterwards."""
    config = accelerator.dataloader_config
    saved = config.dispatch_batches, args.dataloader_num_workers
    config.dispatch_batches, args.dataloader_num_workers = False, 0
    try:
        yield
    finally:
        config.dispatch_batches, args.dataloader_num_workers = saved


def save_completions_table(
    table: dict[str, list],
    args: Any,
    step: int,
    num_to_print: int | None,
    reward_columns: tuple[str, ...] = (),
    images: list[list[Any]] | None = None,
) -> None:
    """Print a sample of `table` (rich) and save it all to `completions/*.parquet` in `args.output_dir`; also log it
    to wandb / trackio when those are in `report_to`, with each row's `images` (PIL, `log_multimodal`) as an 'image'
    column there. `table` needs the columns `step`, `prompt` and `completion`; it may have `advantage`, the
    `reward_columns` and other (extra) columns."""
    import pandas as pd

    from ..trainer.utils import print_prompt_completions_sample

    frame = pd.DataFrame(table)
    shown = {"step", "prompt", "completion", "advantage", *reward_columns}
    print_prompt_completions_sample(
        table["prompt"],
        table["completion"],
        {name: table[name] for name in reward_columns},
        table.get("advantage"),
        step,
        num_to_print,
        extra={name: values for name, values in table.items() if name not in shown},
    )
    folder = os.path.join(args.output_dir, "completions")
    os.makedirs(folder, exist_ok=True)
    frame.astype({"prompt": str, "completion": str}).to_parquet(
        os.path.join(folder, f"completions_{step:05d}.parquet")
    )
    report_to = args.report_to or []
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.log({"completions": wandb.Table(dataframe=_with_images(frame.astype(str), images, wandb.Image))})
    if "trackio" in report_to:
        import trackio

        trackio.log({"completions": trackio.Table(dataframe=_with_images(frame.astype(str), images, trackio.Image))})


def _with_images(frame: Any, images: list[list[Any]] | None, image_type: Any) -> Any:
    """`frame` with an 'image' column of each row's images as the tracker's image type (as is without images)."""
    if images is None:
        return frame
    import pandas as pd

    column = pd.Series([[image_type(image) for image in row or []] for row in images], name="image")
    return pd.concat([frame.reset_index(drop=True), column], axis=1)


def call_rollout_func(
    rollout_func: RolloutFunc, prompts: list[Any], trainer: Any, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """`rollout_func(prompts, trainer)` (TRL's contract), with `rows=rows` when it declares a `rows` parameter;
    checks the output's keys."""
    try:
        takes_rows = "rows" in inspect.signature(rollout_func).parameters
    except (TypeError, ValueError):  # builtins and some callables have no signature
        takes_rows = False
    output = rollout_func(prompts, trainer, rows=rows) if takes_rows else rollout_func(prompts, trainer)
    missing = {"prompt_ids", "completion_ids", "logprobs"} - output.keys()
    if missing:
        raise ValueError(
            f"rollout_func must return keys {sorted(missing)} in its output dict (it returned {sorted(output)})."
        )
    return output


def batch_images(rows: list[dict[str, Any]]) -> list[list[Any]] | None:
    """Each row's images (its `image` or `images` column, decoded), or None when no row of the batch has one (the
    processor then takes no images, as in TRL)."""
    if not rows or not set(IMAGE_COLUMNS) & rows[0].keys():
        return None
    images = [row_images(row, index) for index, row in enumerate(rows)]
    return images if any(images) else None


def tokenize_vision_prompts(
    processor: Any, prompts: list[Any], chat_template_kwargs: dict[str, Any]
) -> tuple[list[list[int]], VisionInputs]:
    """Token ids of conversational `prompts` whose content holds images (through the processor's chat template with
    the generation prompt), and the processor's image tensors for them (`VisionInputs`, token types left-padded)."""
    out = processor.apply_chat_template(
        conversation=prompts, add_generation_prompt=True, tokenize=True, return_dict=True, **chat_template_kwargs
    )
    prompt_ids = [list(ids) for ids in out["input_ids"]]
    num_images = [
        sum(part.get("type") == "image" for m in p if isinstance(m["content"], list) for part in m["content"])
        for p in prompts
    ]
    tensors, token_types = {}, {}
    for key, value in out.items():
        if key in ("input_ids", "attention_mask", "labels"):  # PaliGemma's processor adds labels: not an input here
            continue
        if key in TOKEN_TYPE_KEYS:
            rows = [torch.as_tensor(list(row), dtype=torch.long) for row in value]
            token_types[key] = pad(rows, 0, "left")
        else:
            tensors[key] = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.array(value))
    # PaliGemma marks its prefix (image + prompt) 0 and the suffix it generates 1 (bidirectional vs causal attention)
    completion_types = {"token_type_ids": 1} if isinstance(processor, PaliGemmaProcessor) else {}
    return prompt_ids, VisionInputs(num_images, tensors, token_types, completion_types)


def check_image_prompts(dataset: Any, dataset_name: str = "train") -> None:
    """Rows with images need conversational prompts (the images go into the conversation): refuse a dataset with
    images whose prompts are plain text, naming the fix. (A stream is judged by its first row.)"""
    columns = dataset_columns(dataset) if isinstance(dataset, Dataset | IterableDataset) else []
    column = next((name for name in IMAGE_COLUMNS if name in columns), None)
    if column is None or "prompt" not in columns:
        return
    first = next(iter(dataset.select_columns(["prompt", column]).take(1)), None)
    if first is None or is_conversational(first) or not _holds_images(dataset, column, first):
        return
    raise ValueError(
        f"The {dataset_name} dataset has images (column '{column}') but plain-text prompts (row 0): the images go "
        "into the conversation, so its 'prompt' column must hold conversational prompts (lists of messages). Keep "
        "the raw conversations and let the trainer apply the chat template, e.g. "
        "`{'prompt': [{'role': 'user', 'content': ...}]}`."
    )


def _holds_images(dataset: Dataset | IterableDataset, column: str, first: dict[str, Any]) -> bool:
    """Whether any row's `column` holds an image (read from the Arrow column, without decoding; a stream: its first
    row)."""
    if not isinstance(dataset, Dataset):
        return bool(first[column])
    import pyarrow.compute as pc

    values = dataset.with_format("arrow")[column]
    if column == "image":
        return values.null_count < len(values)
    return bool(pc.sum(pc.list_value_length(values)).as_py())


def tokenize_prompts(
    processing_class: Any, prompts: list[Any], chat_template_kwargs: dict[str, Any]
) -> list[list[int]]:
    """Token ids of each prompt: plain text as is, conversations through the chat template with the generation
    prompt appended."""
    if is_conversational({"prompt": prompts[0]}):
        return processing_class.apply_chat_template(
            conversation=prompts,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **chat_template_kwargs,
        )["input_ids"]
    return processing_class(text=prompts)["input_ids"]


def completion_logps(
    model: torch.nn.Module,
    batch: OnlineBatch,
    batch_size: int | None = None,
    entropy: bool = False,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    packed_forward: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs (and entropies, and the MoE aux loss) of `batch`'s completion tokens under `model`, `[B, C]` (0
    outside the completion mask), through the fused log-prob head: the vocabulary-sized logits are never built.

    `packed_forward` (the configs' field; None: wherever the model's attention supports it, True: required, False:
    never) runs the batch packed, without padding and with each group of rows sharing a prompt computing it once
    (`llm_trainer.trainer.packed_rl`), in chunks of whole groups of at most `batch_size` rows; otherwise the padded
    rows are forwarded as they are, `batch_size` at a time. Both give the same values up to summation order."""
    from ..trainer import packed_rl

    if packed_rl.use_packed(model, packed_forward):
        groups = packed_rl.prompt_groups(batch)
        if groups:  # None: masks only the padded layout reproduces; []: no completion token at all
            return packed_rl.packed_completion_logps(model, batch, groups, batch_size, entropy, autocast)
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    completion_length = batch.completion_ids.size(1)
    batch_size = batch_size or input_ids.size(0)
    logps, entropies, aux_losses = [], [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : ids.size(1) - completion_length] = -100
        rows = slice(start, start + batch_size) if batch_size < input_ids.size(0) else None
        images = batch.model_kwargs(rows) if batch.vision is not None else {}
        with autocast():
            out = model(input_ids=ids, attention_mask=mask, labels=labels, token_logprobs=True, **images)
        logps.append(out.log_probs[:, -completion_length:])
        if entropy:
            entropies.append(out.entropy[:, -completion_length:])
        if out.aux_loss is not None:
            aux_losses.append(out.aux_loss)
    return (
        torch.cat(logps),
        torch.cat(entropies) if entropy else None,
        torch.stack(aux_losses).mean() if aux_losses else None,
    )
