"""`DistillationTrainer`: on-policy knowledge distillation, a drop-in for TRL 1.16's `DistillationTrainer`.

The student (the trained model) samples one completion per prompt; the loss is the generalized JSD between the
student's and a frozen teacher's next-token distributions over the completion tokens
(`llm_trainer.losses.distillation`), computed from both models' hidden states chunk by chunk, so neither model's
`(tokens, vocab)` logits are ever held whole. Generation, its buffer and the completion-length metrics are the
trainer's `GenerationLoop`, as for the online RL trainers.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import gather, gather_object, is_peft_model, set_seed
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback

from ..generation import make_generator
from ..generation.base import Generator
from ..generation.factory import eos_token_ids
from ..generation.loop import (
    BatchGeometry,
    GenerationLoop,
    OnlineBatch,
    configure_streaming,
    prompt_columns,
    save_completions_table,
    streaming_loader,
)
from ..losses.distillation import chunked_distillation_loss
from ..losses.policy_gradient import loss_scale
from ..modeling import check_causal_lm, load_model, logit_transform
from .base_trainer import BaseTrainer
from .distillation_config import DistillationConfig
from .utils import disable_dropout_in_model, identity


class DistillationTrainer(BaseTrainer):
    """On-policy distillation ("On-Policy Distillation of Language Models", Agarwal et al., 2024).

    Each optimizer step, the student samples one completion for each of `per_device_train_batch_size x
    gradient_accumulation_steps` prompts; the batch is shuffled and cut into `gradient_accumulation_steps`
    micro-batches. The loss is the generalized JSD (`args.beta`: 0 forward KL, 1 reverse KL) between the student and
    the teacher at `args.temperature`, summed over the completion tokens and divided by their number in the whole
    generation batch. Logged metrics (TRL's names): `num_tokens`, `completions/{mean,min,max}_length`,
    `completions/{mean,min,max}_terminated_length`, `completions/clipped_ratio`, `entropy` (the student's, in nats)
    and `step_time`.

    Args:
        model: the student: a causal LM or its name/path (loaded with `args.model_init_kwargs`), or a PEFT model.
        teacher_model: the teacher, a causal LM or its name/path (loaded with `args.teacher_model_init_kwargs`);
            None loads `args.teacher_model_name_or_path`. It must share the student's vocabulary; it is frozen.
        args: a `DistillationConfig`; None uses the defaults.
        train_dataset: a `datasets.Dataset` or `IterableDataset` (then set `max_steps`) with a "prompt" column (text
            or conversational); other columns are ignored.
        eval_dataset: a dataset (or dict of them) in the same format.
        processing_class: the student's tokenizer; None loads it from the model.
        callbacks, optimizers: as in `transformers.Trainer`.
        quantization_config: quantization for a student loaded by name (combine with `peft_config` for QLoRA).
        peft_config: wrap the student in this PEFT adapter (the LM head must not be adapted).
        tools: not supported yet (raises).
    """

    config_class = DistillationConfig
    _name = "Distillation"
    _tag_names = ["distillation"]
    _skip_nan_metrics = True
    loss_is_scaled_for_ga = True
    _step_time = 0.0  # seconds spent in this optimizer step's micro-steps

    def __init__(
        self,
        model: str | PreTrainedModel,
        teacher_model: str | PreTrainedModel | None = None,
        args: DistillationConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: list[Callable] | None = None,
    ):
        args = self.resolve_args(args, model)
        if tools:
            raise NotImplementedError(
                "DistillationTrainer does not support tool calling yet; drop `tools`, or use TRL's DistillationTrainer "
                "(or llm_trainer's GRPOTrainer with an environment) for multi-turn tool use."
            )
        if args.log_unique_prompts:
            raise NotImplementedError(
                "`log_unique_prompts=True` is not supported yet; every prompt is logged. Deduplicate the saved "
                "`completions/*.parquet` tables instead."
            )
        self._check_dataset(train_dataset, eval_dataset, args)
        model = self.prepare_model(model, args, quantization_config)
        processing_class = self.prepare_processing_class(model, processing_class, args)
        if isinstance(processing_class, ProcessorMixin):
            raise NotImplementedError(
                "DistillationTrainer does not train vision-language models yet; pass a tokenizer, or use TRL."
            )
        self._tokenizer = processing_class
        model.config.get_text_config().pad_token_id = self._tokenizer.pad_token_id
        model.generation_config.pad_token_id = self._tokenizer.pad_token_id
        self.eos_token_ids = eos_token_ids(model, self._tokenizer)
        model = self.prepare_peft(model, peft_config, args)
        if is_peft_model(model) and any(config.is_prompt_learning for config in model.peft_config.values()):
            raise ValueError(
                "Prompt-learning PEFT methods (prompt, prefix or P-tuning) are not supported: the loss runs the "
                "student's backbone directly, which never sees their virtual tokens. Use a weight adapter such as LoRA."
            )
        _check_splittable(model.get_base_model() if is_peft_model(model) else model, "student")
        teacher_model = self._load_teacher(model, teacher_model, args)

        self.beta = args.beta
        self.temperature = args.temperature
        self.max_completion_length = args.max_completion_length
        self.tools: list[Callable] = []  # tool calling is not supported yet (refused above)
        self.chat_template_kwargs = args.chat_template_kwargs or {}
        super().__init__(
            model=model,
            args=args,
            data_collator=identity,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        if args.n_gpu > 1:
            raise ValueError(
                "DistillationTrainer does not support `nn.DataParallel`; launch with `accelerate launch` or `torchrun`, "
                "or make one GPU visible with `CUDA_VISIBLE_DEVICES`."
            )
        teacher_model.eval().requires_grad_(False)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            self.teacher_model = teacher_model.to(self.accelerator.device)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        if args.disable_dropout:
            disable_dropout_in_model(model)

        self.log_completions = args.log_completions
        self.num_completions_to_print = args.num_completions_to_print
        geometry = BatchGeometry.from_args(args, self.accelerator.num_processes)
        self._logs: dict[str, deque] = {
            "prompt": deque(maxlen=geometry.generation_batch_size),
            "completion": deque(maxlen=geometry.generation_batch_size),
        }
        set_seed(args.seed, device_specific=True)
        generator = make_generator(
            args, self.model, processing_class, accelerator=self.accelerator, unwrap=self.unwrapped_for_generation
        )
        self.generation = GenerationLoop(
            generator,
            processing_class,
            geometry,
            self.accelerator.device,
            eos_token_ids=self.eos_token_ids,
            chat_template_kwargs=self.chat_template_kwargs,
            pad_to_multiple_of=args.pad_to_multiple_of,
            seed=args.seed,
            shuffle=args.shuffle_dataset,
        )

    @property
    def generator(self) -> Generator:
        """The generation back end (TRL's attribute), owned by `generation`."""
        return self.generation.generator

    @generator.setter
    def generator(self, generator: Generator) -> None:
        self.generation.generator = generator

    # ----------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _check_dataset(train_dataset: Any, eval_dataset: Any, args: DistillationConfig) -> None:
        configure_streaming(train_dataset, eval_dataset, args)
        BaseTrainer.check_train_dataset(train_dataset, "a dataset with a 'prompt' column")
        prompt_columns(train_dataset, eval_dataset, "DistillationTrainer")

    @staticmethod
    def _load_teacher(
        student: PreTrainedModel, teacher_model: str | PreTrainedModel | None, args: DistillationConfig
    ) -> PreTrainedModel:
        """The teacher as given, or loaded by name; checked to share the student's vocabulary."""
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError(
                "DistillationTrainer needs a teacher: pass `teacher_model` (a model or its name/path) or set "
                "`teacher_model_name_or_path` in the config."
            )
        if isinstance(teacher_model, str):
            init_kwargs = dict(args.teacher_model_init_kwargs or {})
            if args.teacher_model_revision is not None:
                init_kwargs.setdefault("revision", args.teacher_model_revision)
            if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                init_kwargs["device_map"] = None
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            teacher_model = load_model(teacher_model, None, **init_kwargs)
        elif args.teacher_model_init_kwargs is not None:
            raise ValueError(
                "`teacher_model_init_kwargs` is set but the teacher is already instantiated; unset it or pass the "
                "teacher's name/path instead."
            )
        if teacher_model is student:
            raise ValueError("`teacher_model` is the student itself; pass a separate (frozen) teacher model.")
        check_causal_lm(teacher_model, "teacher model")
        _check_splittable(teacher_model, "teacher")
        student_vocab = student.config.get_text_config().vocab_size
        teacher_vocab = teacher_model.config.get_text_config().vocab_size
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"The student's vocab_size is {student_vocab} but the teacher's is {teacher_vocab}. Distillation "
                "matches the teacher's full next-token distribution, so both must share one vocabulary (tokenizer); "
                "use a teacher from the student's model family."
            )
        return teacher_model

    # ----------------------------------------------------------------------------------------------- data
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt", "image", "images"]

    def get_train_dataloader(self) -> DataLoader:
        return self._get_dataloader(**self.generation.train_loader_kwargs(self.train_dataset, self._train_batch_size))

    def _get_eval_sampler(self, eval_dataset: Dataset):
        return self.generation.eval_sampler(eval_dataset)

    def get_eval_dataloader(self, eval_dataset: str | Dataset | IterableDataset | None = None) -> DataLoader:
        """As `Trainer.get_eval_dataloader`; a streamed dataset is read as `streaming_loader` says."""
        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        dataset = dataset if dataset is not None else self.eval_dataset
        if not isinstance(dataset, IterableDataset):
            return super().get_eval_dataloader(eval_dataset)
        configure_streaming(None, dataset, self.args)
        key = eval_dataset if isinstance(eval_dataset, str) else "eval"
        with streaming_loader(self.args, self.accelerator):
            stream = self.generation.eval_stream(dataset)
            return self._get_dataloader(stream, "Evaluation", self.args.eval_batch_size, dataloader_key=key)

    def min_train_rows(self) -> tuple[int, str, str]:
        return self.generation.geometry.min_train_rows()

    def _prepare_inputs(self, generation_batch: list[dict[str, Any]]) -> OnlineBatch:
        """Training: this micro-step's slice of the generation batch (sampled every `steps_per_generation`
        micro-steps); evaluation: the batch as is."""
        if not self.model.training:
            return self._make_batch(generation_batch)
        if self.generation.needs_generation():
            self.generation.fill(self._make_batch(generation_batch))
        return self.generation.next_batch()

    def training_step(self, model, inputs, num_items_in_batch=None):
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_time += time.perf_counter() - start
        if self.generation.step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._step_time)
            self._step_time = 0.0
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.mean().detach(), None, None

    def _save_extra_state(self, folder: str) -> None:
        super()._save_extra_state(folder)
        self.generation.save(folder, self.accelerator.process_index, self.accelerator.num_processes)

    def _load_extra_state(self, folder: str) -> None:
        super()._load_extra_state(folder)
        step = self.state.global_step * self.args.gradient_accumulation_steps
        self.generation.load(folder, self.accelerator.process_index, self.accelerator.num_processes, step)

    def _make_batch(self, rows: list[dict[str, Any]]) -> OnlineBatch:
        """One student completion per prompt, padded, with the number of completion tokens across processes."""
        mode = "train" if self.model.training else "eval"
        self.generation.sync_weights(self.accelerator.unwrap_model(self.model), self.state.global_step)
        rollout = self.generation.generate([row["prompt"] for row in rows], rows)
        tokens, metrics = self.generation.completion_metrics(rollout)
        if mode == "train":
            self.state.num_input_tokens_seen += tokens
        self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        batch = self.generation.pad(rollout)
        if self.log_completions:
            decode = self.processing_class.batch_decode
            self._logs["prompt"].extend(gather_object(decode(batch.prompt_ids, skip_special_tokens=True)))
            self._logs["completion"].extend(gather_object(decode(batch.completion_ids, skip_special_tokens=True)))
        batch.num_items_in_batch = gather(batch.completion_mask.sum()).sum()
        return batch

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The divergence summed over the completion tokens, divided by their count in the generation batch
        (training) or in this batch (evaluation). `num_items_in_batch` from `Trainer` is ignored: it counts the
        dataset's tokens, not the sampled completions'."""
        num_items = None
        if self.model.training:  # the token count of the generation batch, as `loss_scale` derives it
            num_items = loss_scale(
                inputs.num_items_in_batch,
                self.accelerator.num_processes,
                self.current_gradient_accumulation_steps,
                self.args.steps_per_generation,
                training=True,
            ).token_normalizer
        student = self.accelerator.unwrap_model(model)
        loss, entropy_sum, num_valid = _call_as_forward(model, student, self._loss, student, inputs, num_items)
        mode = "train" if self.model.training else "eval"
        num_valid = self.accelerator.gather_for_metrics(num_valid).sum()
        entropy_sum = self.accelerator.gather_for_metrics(entropy_sum).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        return (loss, None) if return_outputs else loss

    def _loss(self, student: PreTrainedModel, inputs: OnlineBatch, num_items: torch.Tensor | None):
        input_ids, attention_mask = inputs.input_ids, inputs.attention_mask
        completion_length = inputs.completion_ids.size(1)
        student_hidden = _completion_hidden_states(student, input_ids, attention_mask, completion_length)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        teacher.eval()
        with torch.no_grad():
            teacher_hidden = _call_as_forward(
                self.teacher_model,
                teacher,
                _completion_hidden_states,
                teacher,
                input_ids,
                attention_mask,
                completion_length,
            )
        student = student.get_base_model() if is_peft_model(student) else student
        student_head, teacher_head = student.get_output_embeddings(), teacher.get_output_embeddings()
        device = student_head.weight.device
        if teacher_head.weight.device != device:
            raise ValueError(
                f"The student's LM head is on {device} but the teacher's is on {teacher_head.weight.device}; place "
                "both heads on the same device (see `device_map`)."
            )
        student_scale, student_softcap = logit_transform(student.config)
        teacher_scale, teacher_softcap = logit_transform(teacher.config)
        return chunked_distillation_loss(
            student_hidden.to(device),
            student_head.weight,
            teacher_hidden.to(device),
            teacher_head.weight,
            inputs.completion_mask.to(device),
            self.beta,
            self.temperature,
            num_items,
            student_bias=student_head.bias,
            teacher_bias=teacher_head.bias,
            student_logit_scale=student_scale,
            student_softcap=student_softcap,
            teacher_logit_scale=teacher_scale,
            teacher_softcap=teacher_softcap,
        )

    # ----------------------------------------------------------------------------------------------- logs
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self.accelerator.is_main_process and self.log_completions and self._logs["prompt"]:
            table = {
                "step": [self.state.global_step] * len(self._logs["prompt"]),
                "prompt": list(self._logs["prompt"]),
                "completion": list(self._logs["completion"]),
            }
            save_completions_table(table, self.args, self.state.global_step, self.num_completions_to_print)

    def close(self) -> None:
        """Stop the generation back end."""
        self.generation.close()


def _check_splittable(model: PreTrainedModel, role: str) -> None:
    """The loss runs the backbone and projects with the LM head's weight itself: both must be plain modules."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or getattr(model, "base_model", model) is model:
        raise ValueError(
            f"The {role} must be a causal LM with a backbone (`base_model`) and a plain `nn.Linear` LM head, got "
            f"{type(model).__name__} with head {type(head).__name__}. An adapter on `lm_head` is not supported: "
            "remove 'lm_head' from the PEFT `target_modules`."
        )


def _completion_hidden_states(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int
) -> torch.Tensor:
    """The backbone's final hidden states at the positions predicting the last `completion_length` tokens."""
    if is_peft_model(model):
        model = model.base_model.model
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return hidden[:, :-1][:, -completion_length:]


def _call_as_forward(wrapper: torch.nn.Module, module: torch.nn.Module, fn: Callable, *args: Any) -> Any:
    """`fn(*args)`, run as the forward of `wrapper` (DDP / FSDP / DeepSpeed around `module`) so its hooks fire."""
    if wrapper is module:
        return fn(*args)
    had_own_forward = "forward" in module.__dict__
    original = module.forward

    def forward(*_: Any, **__: Any) -> Any:
        return fn(*args)

    module.forward = forward
    try:
        return wrapper()
    finally:
        if had_own_forward:
            module.forward = original
        else:
            del module.forward
