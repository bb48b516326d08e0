"""`DistillationTrainer`: on-policy knowledge distillation, a drop-in for TRL 1.16's `DistillationTrainer`.

The student (the trained model) samples one completion per prompt; the loss is the generalized JSD between the
student's and a frozen teacher's next-token distributions over the completion tokens
(`llm_trainer.losses.distillation`), computed from both models' hidden states chunk by chunk, so neither model's
`(tokens, vocab)` logits are ever held whole. Generation, its buffer and the completion-length metrics are the
trainer's `GenerationLoop`, as for the online RL trainers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import gather, gather_object, is_peft_model
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback

from ..generation.loop import (
    GenerationLoop,
    OnlineBatch,
    check_streaming,
    configure_streaming,
    prompt_columns,
    save_completions_table,
)
from ..losses.distillation import chunked_distillation_loss
from ..losses.policy_gradient import loss_scale
from ..modeling import add_token_logprob_head, check_causal_lm, load_model
from .base_trainer import BaseTrainer, init_arguments
from .distillation_config import DistillationConfig
from .utils import identity


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
    dataset_description = "a dataset with a 'prompt' column"

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
        super().__init__(**init_arguments(locals()))

    # ----------------------------------------------------------------------------------------------- set-up hooks
    def set_options(self, args: DistillationConfig, *, teacher_model: Any = None, tools: Any = None) -> None:
        if tools:
            raise NotImplementedError(
                "DistillationTrainer does not support tool calling yet; drop `tools`, or use TRL's DistillationTrainer "
                "(or llm_trainer's GRPOTrainer with an environment) for multi-turn tool use."
            )
        self._teacher_source = teacher_model
        self.tools: list[Callable] = []  # tool calling is not supported yet (refused above)
        self.beta = args.beta
        self.temperature = args.temperature
        self.max_completion_length = args.max_completion_length

    def check_inputs(self, args: DistillationConfig, *, train_dataset: Any, eval_dataset: Any = None, **inputs):
        if args.log_unique_prompts:
            raise NotImplementedError(
                "`log_unique_prompts=True` is not supported yet; every prompt is logged. Deduplicate the saved "
                "`completions/*.parquet` tables instead."
            )
        check_streaming(train_dataset, eval_dataset, args)
        self.check_train_dataset(train_dataset, self.dataset_description)
        prompt_columns(train_dataset, eval_dataset, "DistillationTrainer")

    def configure(self, model: PreTrainedModel, args: DistillationConfig, train_dataset: Any) -> None:
        """Refuse what the split loss cannot run; load and check the teacher."""
        configure_streaming(train_dataset, args)
        if is_peft_model(model) and any(config.is_prompt_learning for config in model.peft_config.values()):
            raise ValueError(
                "Prompt-learning PEFT methods (prompt, prefix or P-tuning) are not supported: the loss runs the "
                "student's backbone directly, which never sees their virtual tokens. Use a weight adapter such as LoRA."
            )
        _check_splittable(model.get_base_model() if is_peft_model(model) else model, "student")
        self._teacher = load_teacher(model, self._teacher_source, args, "DistillationTrainer")
        add_token_logprob_head(self._teacher, outputs=())

    def default_collator(self, args: DistillationConfig) -> Any:
        return identity  # the rows reach `make_batch` as they are

    def logprob_head(self, args: DistillationConfig) -> dict[str, Any]:
        return {"outputs": ()}  # the loss runs the heads itself, through `head_fn`

    def finish_init(self, args: DistillationConfig) -> None:
        """The teacher placed beside the student, the completion log, the generation loop."""
        if isinstance(self.processing_class, ProcessorMixin):
            raise NotImplementedError(
                "DistillationTrainer does not train vision-language models yet; pass a tokenizer, or use TRL."
            )
        self.teacher_model = place_teacher(self, self._teacher)
        del self._teacher
        self.log_completions = args.log_completions
        self.num_completions_to_print = args.num_completions_to_print
        self.chat_template_kwargs = args.chat_template_kwargs or {}
        self.generation = GenerationLoop.from_args(args, self)
        self.eos_token_ids = self.generation.eos_token_ids
        size = self.generation.geometry.generation_batch_size
        self._logs: dict[str, deque] = {"prompt": deque(maxlen=size), "completion": deque(maxlen=size)}

    # ----------------------------------------------------------------------------------------------- data
    def make_batch(self, rows: list[dict[str, Any]]) -> OnlineBatch:
        """One student completion per prompt, padded, with the number of completion tokens across processes."""
        mode = "train" if self.model.training else "eval"
        self.generation.sync_weights(self.accelerator.unwrap_model(self.model), self.state.global_step)
        rollout = self.generation.generate([row["prompt"] for row in rows], rows)
        self.record_generation(mode, *self.generation.completion_metrics(rollout))
        batch = self.generation.pad(rollout)
        if self.log_completions:
            decode = self.processing_class.batch_decode
            self._logs["prompt"].extend(gather_object(decode(batch.prompt_ids, skip_special_tokens=True)))
            self._logs["completion"].extend(gather_object(decode(batch.completion_ids, skip_special_tokens=True)))
        batch.num_items_in_batch = gather(batch.completion_mask.sum()).sum()
        return batch

    # ----------------------------------------------------------------------------------------------- loss
    def training_step(self, model, inputs, num_items_in_batch=None):  # TRL's signature
        return super().training_step(model, inputs, num_items_in_batch)

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
        input_ids, attention_mask, n = inputs.input_ids, inputs.attention_mask, inputs.completion_ids.size(1)
        self.accelerator.unwrap_model(self.teacher_model).eval()
        with torch.no_grad():
            teacher_hidden, teacher_head = self.teacher_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                head_fn=keep_head(self.teacher_model, functools.partial(_completion_states, n)),
            )
        divergence = functools.partial(
            self._divergence, n, teacher_hidden, teacher_head, inputs.completion_mask, num_items
        )
        loss, entropy_sum, num_valid = model(input_ids=input_ids, attention_mask=attention_mask, head_fn=divergence)
        mode = "train" if self.model.training else "eval"
        num_valid = self.accelerator.gather_for_metrics(num_valid).sum()
        entropy_sum = self.accelerator.gather_for_metrics(entropy_sum).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        return (loss, None) if return_outputs else loss

    def _divergence(self, n, teacher_hidden, teacher_head, mask, num_items, hidden, head):
        """The loss from the student's hidden states and head (run inside its forward, see `head_fn`)."""
        student_hidden, _ = _completion_states(n, hidden, head)
        device = head.weight.device
        if teacher_head.weight.device != device:
            raise ValueError(
                f"The student's LM head is on {device} but the teacher's is on {teacher_head.weight.device}; place "
                "both heads on the same device (see `device_map`)."
            )
        return chunked_distillation_loss(
            student_hidden.to(device),
            head.weight,
            teacher_hidden.to(device),
            teacher_head.weight,
            mask.to(device),
            self.beta,
            self.temperature,
            num_items,
            student_bias=head.bias,
            teacher_bias=teacher_head.bias,
            student_logit_scale=head.logit_scale,
            student_softcap=head.softcap,
            teacher_logit_scale=teacher_head.logit_scale,
            teacher_softcap=teacher_head.softcap,
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


def load_teacher(
    student: PreTrainedModel, teacher_model: str | PreTrainedModel | None, args: Any, trainer_name: str
) -> PreTrainedModel:
    """The teacher as given, or loaded by name; checked to share the student's vocabulary."""
    teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
    if teacher_model is None:
        raise ValueError(
            f"{trainer_name} needs a teacher: pass `teacher_model` (a model or its name/path) or set "
            "`teacher_model_name_or_path` in the config."
        )
    if isinstance(teacher_model, str):
        init_kwargs = dict(args.teacher_model_init_kwargs or {})
        if getattr(args, "teacher_model_revision", None) is not None:  # a DistillationConfig field
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
            f"The student's vocab_size is {student_vocab} but the teacher's is {teacher_vocab}. {trainer_name} "
            "matches the teacher's full next-token distribution, so both must share one vocabulary (tokenizer); "
            "use a teacher from the student's model family."
        )
    return teacher_model


def _check_splittable(model: PreTrainedModel, role: str) -> None:
    """The loss runs the backbone and projects with the LM head's weight itself: both must be plain modules."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or getattr(model, "base_model", model) is model:
        raise ValueError(
            f"The {role} must be a causal LM with a backbone (`base_model`) and a plain `nn.Linear` LM head, got "
            f"{type(model).__name__} with head {type(head).__name__}. An adapter on `lm_head` is not supported: "
            "remove 'lm_head' from the PEFT `target_modules`."
        )


def place_teacher(trainer: Any, teacher: PreTrainedModel) -> torch.nn.Module:
    """The frozen teacher on the trainer's devices, in eval mode: sharded like the student under FSDP2 and DeepSpeed
    ZeRO-3 (`reference_policy.shard_reference`: one decoder layer gathered at a time, freed after its forward),
    replicated under FSDP v1 and other ZeRO stages, else placed by `accelerator.prepare_model`. A sharded teacher's
    forward is a collective: every process runs it for every batch (the loss does)."""
    from .reference_policy import shard_reference

    teacher = teacher.eval().requires_grad_(False)
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return shard_reference(teacher, trainer.accelerator)
    return trainer.accelerator.prepare_model(teacher, evaluation_mode=True)


def keep_head(teacher: torch.nn.Module, head_fn: Callable[..., Any]) -> Callable[..., Any]:
    """`head_fn` for a teacher forward whose returned head is used after the forward. A sharded teacher (FSDP2)
    frees its gathered weights when the forward ends, so its LM head (that one layer, `vocab x hidden`) is copied
    whole first; an unsharded teacher's head is returned as is."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in teacher.parameters()):
        return head_fn

    def with_kept_head(hidden: torch.Tensor, head: Any) -> Any:
        states, head = head_fn(hidden, head)
        bias = head.bias.detach().clone() if head.bias is not None else None
        return states, dataclasses.replace(head, weight=head.weight.detach().clone(), bias=bias)

    return with_kept_head


def _completion_states(completion_length: int, hidden: torch.Tensor, head: Any) -> tuple[torch.Tensor, Any]:
    """The final hidden states at the positions predicting the last `completion_length` tokens, and the head."""
    return hidden[:, :-1][:, -completion_length:], head
