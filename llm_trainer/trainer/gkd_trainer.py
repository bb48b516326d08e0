"""`GKDTrainer`: generalized knowledge distillation, a drop-in for TRL 1.16's `trl.experimental.gkd.GKDTrainer`.

The data are conversations (`messages`); the trained tokens are those of the last assistant turn. Each training step
draws one number: with probability `lmbda` the batch's completions are replaced by ones the student samples for the
same prompts (on-policy), else, with `seq_kd`, by ones the teacher samples; otherwise the dataset's completions are
kept. The loss is the generalized JSD between the student's and the frozen teacher's next-token distributions over
the completion tokens, computed chunk by chunk from both models' hidden states (`chunked_distillation_loss`), so the
student never holds more than one `(chunk, vocab)` block of logits.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback

from ..data.chat_template import read_chat_template
from ..data.formats import get_dataset_column_names
from ..data.vision import refuse_image_columns
from ..generation.transformers_backend import needs_lockstep
from ..losses.distillation import fused_distillation_loss, generalized_jsd
from ..modeling import add_token_logprob_head
from .base_trainer import BaseTrainer, init_arguments
from .distillation_trainer import _check_splittable, keep_head, load_teacher, place_teacher
from .gkd_config import GKDConfig
from .special_tokens import configure_special_tokens


class GKDTrainer(BaseTrainer):
    """Generalized knowledge distillation ("On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes", Agarwal et al., 2024) with TRL 1.16's signature, dataset format, loss and metrics.

    The loss is summed over the completion tokens and divided by `num_items_in_batch` (the dataset's completion
    tokens in the accumulation window, as TRL; on a step whose completions were sampled it is still the dataset's
    count), or by this batch's completion tokens when `Trainer` passes none (evaluation). Logged metrics: TRL
    GKD's, i.e. `Trainer`'s (`loss`, `grad_norm`, `learning_rate`).

    Args:
        model: the student: a causal LM or its name/path (loaded with `args.model_init_kwargs`), or a PEFT model.
        teacher_model: the frozen teacher, a causal LM or its name/path (loaded with `args.teacher_model_init_kwargs`);
            None loads `args.teacher_model_name_or_path`. It must share the student's vocabulary.
        args: a `GKDConfig`; None uses the defaults.
        data_collator: None pads left (`GKDCollator`); a custom one must return `input_ids`, `attention_mask`,
            `labels`, `prompts` and `prompt_attention_mask`.
        train_dataset, eval_dataset: datasets with a conversational `messages` column ending in an assistant turn.
        processing_class: the student's tokenizer; None loads it from the model.
        compute_metrics, callbacks, optimizers, preprocess_logits_for_metrics: as in `transformers.Trainer`.
        peft_config: wrap the student in this PEFT adapter (the LM head must not be adapted).
        formatting_func: not supported (the conversations are rendered with the chat template); must be None.
    """

    config_class = GKDConfig
    _name = "GKD"
    _tag_names = ["gkd"]
    dataset_description = "a dataset with a conversational 'messages' column"

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        teacher_model: str | PreTrainedModel | None = None,
        args: GKDConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config: Any = None,
        formatting_func: Callable | None = None,
    ):
        super().__init__(**init_arguments(locals()))

    # ----------------------------------------------------------------------------------------------- set-up hooks
    def set_options(self, args: GKDConfig, *, teacher_model: Any = None, formatting_func: Any = None) -> None:
        if formatting_func is not None:
            raise ValueError(
                "GKDTrainer does not take a `formatting_func`: it renders the 'messages' column with the chat template "
                "(TRL's GKD ignores it too). Format the conversations into 'messages' beforehand."
            )
        self._teacher_source = teacher_model
        self.lmbda, self.beta, self.seq_kd = args.lmbda, args.beta, args.seq_kd
        self.temperature = args.temperature

    def check_inputs(self, args: GKDConfig, *, train_dataset: Any, eval_dataset: Any = None, **inputs: Any) -> None:
        super().check_inputs(args, train_dataset=train_dataset)
        if isinstance(train_dataset, IterableDataset):
            raise NotImplementedError("GKDTrainer does not stream datasets yet; pass a `datasets.Dataset`.")
        for option in ("packing", "padding_free", "assistant_only_loss"):
            if getattr(args, option):
                raise ValueError(
                    f"`{option}=True` is not supported by GKDTrainer: it trains on the last assistant turn of each "
                    "padded conversation. Unset it."
                )
        if inputs.get("compute_loss_func") is not None:
            raise ValueError("GKDTrainer sets its own loss; drop `compute_loss_func`.")
        datasets = {"train": train_dataset}
        if isinstance(eval_dataset, dict):
            datasets |= eval_dataset
        elif eval_dataset is not None:
            datasets["eval"] = eval_dataset
        for name, dataset in datasets.items():
            _check_messages(dataset, name)

    def configure_tokenizer(self, model: PreTrainedModel, args: GKDConfig) -> None:
        configure_special_tokens(model, self._tokenizer, args.eos_token, args.pad_token)
        if args.chat_template_path is not None:
            self._tokenizer.chat_template = read_chat_template(args.chat_template_path)
        if not self._tokenizer.chat_template:
            raise ValueError("GKDTrainer renders 'messages' with a chat template; this tokenizer has none.")

    def configure(self, model: PreTrainedModel, args: GKDConfig, train_dataset: Any) -> None:
        _check_splittable(model.get_base_model() if is_peft_model(model) else model, "student")
        self._teacher = load_teacher(model, self._teacher_source, args, "GKDTrainer")
        add_token_logprob_head(self._teacher, outputs=())

    def default_collator(self, args: GKDConfig) -> GKDCollator:
        return GKDCollator(self._tokenizer.pad_token_id)

    def prepare_dataset(self, dataset: Dataset, name: str, args: GKDConfig) -> Dataset:
        """Render each conversation with the chat template and tokenize it: `input_ids` (the last `max_length`
        tokens) and `prompt_length` (where the last assistant turn starts)."""
        refuse_image_columns(dataset, "GKDTrainer", name)
        if name not in ("train", "eval"):
            _check_messages(dataset, name)
        tokenize = functools.partial(_tokenize_conversation, tokenizer=self._tokenizer, max_length=args.max_length)
        columns = get_dataset_column_names(dataset)
        return dataset.map(tokenize, remove_columns=columns, num_proc=args.dataset_num_proc, desc=f"Tokenizing {name}")

    def logprob_head(self, args: GKDConfig) -> dict[str, Any]:
        return {"outputs": ()}  # the loss runs the heads itself, through `head_fn`

    def finish_init(self, args: GKDConfig) -> None:
        self.teacher_model = place_teacher(self, self._teacher)
        del self._teacher
        self.generation_config = GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            use_cache=not args.gradient_checkpointing,
            pad_token_id=self._tokenizer.pad_token_id,
        )
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is not None:
            self.generation_config.eos_token_id = eos

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "prompt_length"]

    # ----------------------------------------------------------------------------------------------- data per step
    def training_step(self, model, inputs, num_items_in_batch=None):
        """One step on the batch, after replacing its completions by the student's samples (probability `lmbda`)
        or, otherwise with `seq_kd`, by the teacher's."""
        if random.random() <= self.lmbda:
            with self.unwrapped_for_generation() as student:
                inputs = self.sample_completions(student, inputs)
        elif self.seq_kd:
            inputs = self.sample_completions(self.accelerator.unwrap_model(self.teacher_model), inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    @torch.no_grad()
    def sample_completions(self, model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`inputs` with `input_ids`, `attention_mask` and `labels` replaced by the prompts and `model`'s samples."""
        input_ids, attention_mask, labels = self.generate_on_policy_outputs(model, inputs, self.generation_config)
        return {**inputs, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    @staticmethod
    @torch.no_grad()
    def generate_on_policy_outputs(
        model: PreTrainedModel, inputs: dict[str, torch.Tensor], generation_config: GenerationConfig
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample completions of the (left-padded) `inputs["prompts"]`: the prompts followed by the completions, their
        attention mask (completions end at their first stop token, included) and labels (-100 but on completions)."""
        prompts, prompt_mask = inputs["prompts"], inputs["prompt_attention_mask"]
        sequences = model.generate(
            input_ids=prompts,
            attention_mask=prompt_mask,
            generation_config=generation_config,
            synced_gpus=True if needs_lockstep(model) else None,  # sharded: stop together, or the others hang
        )
        completions = sequences[:, prompts.shape[1] :]
        completion_mask = torch.ones_like(completions)
        eos = generation_config.eos_token_id
        if eos is not None:
            is_eos = torch.isin(completions, torch.tensor(eos, device=completions.device).reshape(-1))
            first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), completions.shape[1])
            positions = torch.arange(completions.shape[1], device=completions.device)
            completion_mask = (positions[None, :] <= first_eos[:, None]).to(completion_mask.dtype)
        attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
        labels = torch.cat([torch.full_like(prompts, -100), completions.masked_fill(completion_mask == 0, -100)], 1)
        return sequences, attention_mask, labels

    @staticmethod
    def generalized_jsd_loss(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        beta: float = 0.5,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """TRL's full-logits generalized JSD (`(B, T, V)` logits, labels already shifted): the per-token divergence
        of `losses.distillation.generalized_jsd` at `temperature`, over the tokens whose label is not -100, summed
        and divided by `num_items_in_batch` when given, else reduced by `reduction` ("batchmean": per counted token,
        "sum", "mean", "none"). The trainer's own loss never builds these logits (`chunked_distillation_loss`)."""
        divergence, _ = generalized_jsd(student_logits / temperature, teacher_logits / temperature, beta)
        if labels is not None:
            divergence = divergence[labels != -100]
        if num_items_in_batch is not None:
            total = divergence.sum()
            return total / (
                num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
            )
        if reduction == "batchmean":
            count = divergence.numel() if labels is not None else divergence.shape[0]
            return divergence.sum() / max(count, 1)
        if reduction == "sum":
            return divergence.sum()
        if reduction == "mean":
            return divergence.mean()
        if reduction == "none":
            return divergence
        raise ValueError(f"reduction must be 'batchmean', 'sum', 'mean' or 'none', got {reduction!r}.")

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The generalized JSD summed over the completion tokens (labels shifted by one), divided by
        `num_items_in_batch`, or by their number here when None."""
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        mask = inputs["labels"][:, 1:] != -100
        self.accelerator.unwrap_model(self.teacher_model).eval()
        with torch.no_grad():
            teacher_hidden, teacher_head = self.teacher_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                head_fn=keep_head(self.teacher_model, _predicting_states),
            )
        divergence = functools.partial(self._divergence, teacher_hidden, teacher_head, mask, num_items_in_batch)
        loss, _, _ = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, head_fn=divergence)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # the count is over every process; DDP averages gradients
        return (loss, None) if return_outputs else loss

    def _divergence(self, teacher_hidden, teacher_head, mask, num_items, hidden, head):
        """The loss from the student's hidden states and head (run inside its forward, see `head_fn`)."""
        device = head.weight.device
        if teacher_head.weight.device != device:
            raise ValueError(
                f"The student's LM head is on {device} but the teacher's is on {teacher_head.weight.device}; place "
                "both heads on the same device (see `device_map`)."
            )
        return fused_distillation_loss(
            hidden[:, :-1],
            head.weight,
            teacher_hidden.to(device),
            teacher_head.weight,
            mask.to(device),
            self.beta,
            1.0,  # TRL's GKD samples at `temperature` but compares the distributions at temperature 1
            num_items,
            student_bias=head.bias,
            teacher_bias=teacher_head.bias,
            student_logit_scale=head.logit_scale,
            student_softcap=head.softcap,
            teacher_logit_scale=teacher_head.logit_scale,
            teacher_softcap=teacher_head.softcap,
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The evaluation loss only: the loss never builds the logits `compute_metrics` would need."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class GKDCollator:
    """Left-pads tokenized conversations (`input_ids`, `prompt_length`) into `input_ids`, `attention_mask`, `labels`
    (-100 on the prompt and padding), and the prompts alone (`prompts`, `prompt_attention_mask`) for sampling."""

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError("GKDTrainer needs a pad token; set `pad_token` in the config or on the tokenizer.")
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(example["input_ids"]) for example in examples]
        cuts = [int(example["prompt_length"]) for example in examples]
        labels = [[-100] * cut + row[cut:] for row, cut in zip(ids, cuts)]
        prompts = [row[:cut] for row, cut in zip(ids, cuts)]
        return {
            "input_ids": _left_pad(ids, self.pad_token_id),
            "attention_mask": _left_pad([[1] * len(row) for row in ids], 0),
            "labels": _left_pad(labels, -100),
            "prompts": _left_pad(prompts, self.pad_token_id),
            "prompt_attention_mask": _left_pad([[1] * len(row) for row in prompts], 0),
        }


def _left_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([[value] * (width - len(row)) + row for row in rows], dtype=torch.long)


def _predicting_states(hidden: torch.Tensor, head: Any) -> tuple[torch.Tensor, Any]:
    """The hidden states at the positions that predict the next token (all but the last), and the head."""
    return hidden[:, :-1], head


def _check_messages(dataset: Any, name: str) -> None:
    """A conversational dataset whose conversations end with an assistant turn (the one distilled)."""
    columns = get_dataset_column_names(dataset)
    if "messages" not in columns:
        raise ValueError(
            f"GKDTrainer needs a conversational 'messages' column in the {name} dataset (lists of {{'role', "
            f"'content'}} ending with the assistant's turn); got columns {sorted(columns)}."
        )
    if len(dataset) == 0:
        raise ValueError(f"The {name} dataset is empty.")
    messages = dataset[0]["messages"]
    if not isinstance(messages, list) or not messages or not isinstance(messages[0], dict):
        raise ValueError(f"'messages' in the {name} dataset must be lists of {{'role', 'content'}} dicts.")
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        raise ValueError(
            f"Each conversation in the {name} dataset must have a prompt and end with an 'assistant' turn (the "
            f"completion distilled); the first ends with role {messages[-1].get('role')!r} after {len(messages) - 1} "
            "message(s)."
        )


def _tokenize_conversation(example: dict[str, Any], tokenizer: Any, max_length: int | None) -> dict[str, Any]:
    """`input_ids` of the rendered conversation (its last `max_length` tokens) and the index where its last
    assistant turn starts (the first token at or after the end of the rendered prompt)."""
    messages = example["messages"]
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        start = next((i for i, (begin, _) in enumerate(encoded["offset_mapping"]) if begin >= len(prompt)), len(ids))
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if max_length is not None and len(ids) > max_length:  # drop the oldest context first
        start = max(0, start - (len(ids) - max_length))
        ids = ids[-max_length:]
    if start == 0:
        raise ValueError(
            f"A conversation has no prompt tokens left after truncation to max_length={max_length}: the completion "
            "fills the whole window, so nothing is left to sample from. Increase `max_length`."
        )
    return {"input_ids": ids, "prompt_length": start}
