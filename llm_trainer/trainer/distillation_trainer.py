"""`DistillationTrainer`: on-policy knowledge distillation, a drop-in for TRL 1.16's `DistillationTrainer`.

The student (the trained model) samples one completion per prompt; the loss is the generalized JSD between the
student's and a frozen teacher's next-token distributions over the completion tokens
(`llm_trainer.losses.distillation`), computed from both models' hidden states chunk by chunk, so neither model's
`(tokens, vocab)` logits are ever held whole. Generation, prompt tokenization and the completion-length metrics are
shared with the online RL trainers (`OnPolicyGenerationMixin`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import gather, gather_object, is_peft_model, set_seed
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback

from ..generation import make_generator
from ..generation.factory import eos_token_ids
from ..losses.distillation import chunked_distillation_loss
from ..modeling import check_causal_lm, load_model, logit_transform
from .base_trainer import BaseTrainer
from .distillation_config import DistillationConfig
from .online_trainer import OnPolicyGenerationMixin
from .utils import disable_dropout_in_model


class DistillationTrainer(OnPolicyGenerationMixin, BaseTrainer):
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
        self.pad_to_multiple_of = args.pad_to_multiple_of
        self.shuffle_dataset = args.shuffle_dataset
        self.init_trainer(model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers)
        teacher_model.eval().requires_grad_(False)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            self.teacher_model = teacher_model.to(self.accelerator.device)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        if args.disable_dropout:
            disable_dropout_in_model(model)

        self.log_completions = args.log_completions
        self.num_completions_to_print = args.num_completions_to_print
        generation_batch_size = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        self._logs: dict[str, deque] = {
            "prompt": deque(maxlen=generation_batch_size),
            "completion": deque(maxlen=generation_batch_size),
        }
        set_seed(args.seed, device_specific=True)
        self.generator = make_generator(
            args, self.model, processing_class, accelerator=self.accelerator, unwrap=self.unwrapped_for_generation
        )
        self._last_loaded_step = -1

    # ----------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _check_dataset(train_dataset: Any, eval_dataset: Any, args: DistillationConfig) -> None:
        OnPolicyGenerationMixin.check_iterable_datasets(train_dataset, eval_dataset, args)
        BaseTrainer.check_train_dataset(train_dataset, args, "a dataset with a 'prompt' column")
        columns = OnPolicyGenerationMixin.dataset_columns(train_dataset)
        if {"image", "images"} & set(columns):
            raise NotImplementedError(
                "DistillationTrainer does not train vision-language models yet: drop the image column(s) or use TRL."
            )
        if "prompt" not in columns:
            raise ValueError(
                f"The training dataset has no 'prompt' column (columns: {columns}); rename the "
                "column holding the prompts to 'prompt'. Completions are sampled by the student, not read from data."
            )
        OnPolicyGenerationMixin.check_prompts(train_dataset, eval_dataset)

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
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """One student completion per prompt, padded, with the number of completion tokens across processes."""
        mode = "train" if self.model.training else "eval"
        if self.state.global_step != self._last_loaded_step:
            self.generator.sync_weights(self.accelerator.unwrap_model(self.model))
            self._last_loaded_step = self.state.global_step
        prompt_ids_list = self._tokenize_prompts([row["prompt"] for row in inputs])
        completion_ids_list = self.generator.generate(prompt_ids_list).completion_ids
        self._log_lengths(prompt_ids_list, completion_ids_list, mode)

        prompt_ids, prompt_mask = self._pad([torch.tensor(ids) for ids in prompt_ids_list], "left")
        completion_ids, completion_mask = self._pad([torch.tensor(ids) for ids in completion_ids_list], "right")
        if self.log_completions:
            self._logs["prompt"].extend(
                gather_object(self.processing_class.batch_decode(prompt_ids, skip_special_tokens=True))
            )
            self._logs["completion"].extend(
                gather_object(self.processing_class.batch_decode(completion_ids, skip_special_tokens=True))
            )
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "num_items_in_batch": gather(completion_mask.sum()).sum(),
        }

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The divergence summed over the completion tokens, divided by their count in the generation batch
        (training) or in this batch (evaluation). `num_items_in_batch` from `Trainer` is ignored: it counts the
        dataset's tokens, not the sampled completions'."""
        num_items = None
        if self.model.training:  # each process divides by its share; DDP averages the gradients
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        student = self.accelerator.unwrap_model(model)
        loss, entropy_sum, num_valid = _call_as_forward(model, student, self._loss, student, inputs, num_items)
        mode = "train" if self.model.training else "eval"
        num_valid = self.accelerator.gather_for_metrics(num_valid).sum()
        entropy_sum = self.accelerator.gather_for_metrics(entropy_sum).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        return (loss, None) if return_outputs else loss

    def _loss(self, student: PreTrainedModel, inputs: dict[str, Any], num_items: torch.Tensor | None):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        completion_length = inputs["completion_ids"].size(1)
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
            inputs["completion_mask"].to(device),
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
            self._save_completions_table(
                {
                    "step": [self.state.global_step] * len(self._logs["prompt"]),
                    "prompt": list(self._logs["prompt"]),
                    "completion": list(self._logs["completion"]),
                }
            )

    def close(self) -> None:
        """Stop the generation back end."""
        self.generator.close()


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
