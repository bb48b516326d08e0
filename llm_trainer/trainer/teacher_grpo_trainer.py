"""`TeacherGRPOTrainer`: GRPO on a teacher policy, rewarded by how much its teaching helps a frozen student."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback

from ..data.formats import is_conversational
from ..generation.base import SamplingConfig
from ..generation.factory import eos_token_ids
from ..generation.loop import tokenize_prompts
from ..generation.transformers_backend import TransformersGenerator
from ..modeling import create_reference_model, reference_adapter
from ..rewards.adaptive_teaching import AdaptiveTeachingReward
from .base_trainer import BaseTrainer, init_arguments
from .grpo_trainer import GRPOTrainer
from .reward_functions import RewardFunc
from .teacher_grpo_config import TeacherGRPOConfig

CorrectnessFunc = Callable[[str, dict[str, Any]], float | bool | None]


def answer_in_response(response: str, row: dict[str, Any]) -> float:
    """1.0 when the row's `answer` appears in `response` as a whole word or number, else 0.0 (the default
    `correctness_fn` of `TeacherGRPOTrainer`).

    Both are normalised first: case-folded, runs of whitespace collapsed, thousands separators dropped ("1,000" reads
    as "1000"); the answer's surrounding whitespace and a final period are ignored. "12" matches "x = 12." but not
    "123".
    """
    if "answer" not in row:
        raise ValueError(
            "The default `correctness_fn` compares the student's response with the row's 'answer' column, but the row "
            f"has none (columns: {sorted(row)}). Add an 'answer' column or pass `correctness_fn=`."
        )
    answer = _normalise(str(row["answer"])).strip().removesuffix(".").strip()
    if not answer:
        raise ValueError(f"The row's 'answer' is empty ({row['answer']!r}); every problem needs a non-empty answer.")
    return float(re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", _normalise(response)) is not None)


def _normalise(text: str) -> str:
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text.casefold())
    return re.sub(r"\s+", " ", text)


class TeacherGRPOTrainer(GRPOTrainer):
    """GRPO where the policy is a TEACHER and the reward is a student's improvement.

    For each problem (a dataset row with a `prompt` and, for the default `correctness_fn`, an `answer`):

    1. the student answers the problem without teaching (`answer_template`);
    2. the student writes a diagnostic probe, at most `max_probe_tokens` long, of what it finds hard
       (`probe_template`);
    3. the teacher (the policy) writes `num_generations` teachings from the problem and the probe
       (`teaching_template`): these are the completions GRPO trains on;
    4. the student answers again with each teaching (`taught_answer_template`).

    The rollout passes `correct_without`, `correct_with` and `teaching_tokens` (and, for inspection, `student_attempt`,
    `student_probe` and `student_answer`) to the reward functions as columns; the default reward is
    `AdaptiveTeachingReward()`. The student's mean correctness is logged as `student/accuracy_without_teaching` and
    `student/accuracy_with_teaching`. The student generates with `transformers`' `generate`, the teacher with the
    configured back end (`trainer.generator`, vLLM included).

    Args:
        model / args / datasets / processing_class / callbacks / optimizers / quantization_config / peft_config: as
            for `GRPOTrainer` (the model is the teacher); `args` is a `TeacherGRPOConfig`.
        reward_funcs: reward function(s) with the GRPO contract; default `[AdaptiveTeachingReward()]`.
        student_model: the frozen student, any causal LM (a model or a name or path). Default: the reference model
            when `beta != 0`, the policy with its adapter disabled under PEFT, else a frozen copy of the initial
            policy. It must not be the policy itself.
        student_processing_class: the student's tokenizer. Default: loaded from `student_model` when it is a name or
            path, else the teacher's tokenizer.
        correctness_fn: `f(response, row) -> float | bool | None`, whether the student's `response` solves the
            problem of dataset `row` (partial credit in [0, 1] allowed; `None` skips the sample). Default:
            `answer_in_response`, the row's `answer` appearing in the response.
    """

    config_class = TeacherGRPOConfig
    _name = "TeacherGRPO"
    _tag_names = ["llm-trainer", "grpo", "teacher-grpo"]

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: RewardFunc | list[RewardFunc] | None = None,
        args: TeacherGRPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        student_model: str | PreTrainedModel | None = None,
        student_processing_class: PreTrainedTokenizerBase | None = None,
        correctness_fn: CorrectnessFunc | None = None,
    ):
        BaseTrainer.__init__(self, **init_arguments(locals()))  # GRPOTrainer's `__init__` only forwards too

    # ----------------------------------------------------------------------------------------------- set-up hooks
    def set_options(
        self,
        args: TeacherGRPOConfig,
        *,
        reward_funcs: Any = None,
        reward_processing_classes: Any = None,
        student_model: Any = None,
        student_processing_class: Any = None,
        correctness_fn: CorrectnessFunc | None = None,
    ) -> None:
        if correctness_fn is not None and not callable(correctness_fn):
            raise TypeError(
                f"`correctness_fn` must be callable as f(response, row), got {type(correctness_fn).__name__}."
            )
        self.correctness_fn = correctness_fn or answer_in_response
        self._needs_answer = correctness_fn is None
        self._student_source, self._student_tokenizer_source = student_model, student_processing_class
        super().set_options(
            args,
            reward_funcs=[AdaptiveTeachingReward()] if reward_funcs is None else reward_funcs,
            reward_processing_classes=reward_processing_classes,
            rollout_func=self._teaching_rollout,
        )

    def check_inputs(self, args: TeacherGRPOConfig, *, train_dataset: Any, eval_dataset: Any = None, **inputs):
        evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        for name, dataset in (("train_dataset", train_dataset), *(("eval_dataset", d) for d in evals)):
            self._check_columns(name, dataset, needs_answer=self._needs_answer)
        super().check_inputs(args, train_dataset=train_dataset, eval_dataset=eval_dataset, **inputs)

    def finish_init(self, args: TeacherGRPOConfig) -> None:
        """GRPO's set-up, then the student: placed on the device (the reference model when it is the student), its
        tokenizer, and its answer and probe generators."""
        super().finish_init(args)
        if self._student_source is not None:
            if not getattr(self.student_model, "hf_device_map", None):
                self.student_model = self.student_model.to(self.accelerator.device)
        if self._student_source is None and not is_peft_model(self.model) and self.beta != 0.0:
            self.student_model = self.ref_model
        self.student_processing_class = self._student_tokenizer(self._student_source, self._student_tokenizer_source)
        generator_model = self.student_model if self.student_model is not None else self.model
        eos = eos_token_ids(generator_model, self.student_processing_class)
        pad = self.student_processing_class.pad_token_id
        unwrap = self._peft_student if self.student_model is None else None
        self.student_generator, self.probe_generator = (
            TransformersGenerator(
                self.student_model,
                SamplingConfig(max_tokens=max_tokens, temperature=args.student_temperature),
                pad_token_id=eos[0] if pad is None else pad,
                eos_token_id=eos,
                unwrap=unwrap,
            )
            for max_tokens in (args.max_student_tokens, args.max_probe_tokens)
        )

    # ----------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _check_columns(name: str, dataset: Any, needs_answer: bool) -> None:
        columns = getattr(dataset, "column_names", None)
        if columns is None:
            return
        if "prompt" not in columns:
            raise ValueError(
                f"`{name}` has no 'prompt' column (columns: {columns}); the problems must be in 'prompt'."
            )
        if needs_answer and "answer" not in columns:
            raise ValueError(
                f"`{name}` has no 'answer' column (columns: {columns}), which the default `correctness_fn` compares "
                "the student's responses with. Add one, or pass `correctness_fn=f(response, row)`."
            )

    def reference_policy(self, model, ref_model, peft_config, args):
        """GRPO's reference, and the student beside it: given (loaded by name), the PEFT policy's reference route,
        the reference model (see `finish_init`), or a frozen copy of the initial policy when `beta == 0`."""
        source = self._student_source
        policy_parts = (model, model.get_base_model()) if is_peft_model(model) else (model,)
        if any(source is part for part in policy_parts):
            raise ValueError(
                "`student_model` is the policy itself, so the student would learn along with the teacher. Omit it to "
                "use a frozen copy of the initial policy, or pass a separate model."
            )
        if isinstance(source, str):
            source = self.prepare_model(source, args)
        self.student_model = None  # the PEFT policy run with its reference adapter (see `_peft_student`)
        if source is not None:
            self.student_model = source.eval().requires_grad_(False)
        elif not is_peft_model(model) and args.beta == 0.0:
            self.student_model = create_reference_model(model)
        return super().reference_policy(model, ref_model, peft_config, args)

    def _student_tokenizer(
        self, student_model: str | PreTrainedModel | None, processing_class: PreTrainedTokenizerBase | None
    ) -> PreTrainedTokenizerBase:
        """The student's tokenizer: given, loaded from the student's path, or the teacher's; checked against the
        student's embeddings."""
        if processing_class is None and not isinstance(student_model, str):
            tokenizer = self._tokenizer
        else:
            model = self.student_model if self.student_model is not None else self.accelerator.unwrap_model(self.model)
            processing_class = self.prepare_processing_class(model, processing_class, self.args)
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if self.student_model is not None:
            num_embeddings = self.student_model.get_input_embeddings().num_embeddings
            if len(tokenizer) > num_embeddings:
                raise ValueError(
                    f"The student's tokenizer has {len(tokenizer)} tokens but the student model only {num_embeddings} "
                    "embeddings; pass the student's own tokenizer as `student_processing_class`."
                )
        return tokenizer

    @contextlib.contextmanager
    def _peft_student(self) -> Iterator[PreTrainedModel]:
        """The PEFT policy run as its reference (adapter disabled, or the frozen "ref" adapter): the default student."""
        with self.unwrapped_for_generation() as policy, reference_adapter(policy):
            yield policy

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt", "answer"]

    # ----------------------------------------------------------------------------------------------- rollout
    def _teaching_rollout(self, prompts: list[Any], trainer: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The `rollout_func`: student attempt and probe once per problem, teachings, student answers with them;
        `rows` are the prompts' dataset rows (the answers are in them)."""
        args = self.args
        conversational = is_conversational({"prompt": prompts[0]})
        owner: list[int] = []  # row -> problem; a problem's rows (its group of generations) are consecutive
        problems: list[str] = []
        for i, prompt in enumerate(prompts):
            if i == 0 or prompt != prompts[i - 1]:
                problems.append(_problem_text(prompt))
            owner.append(len(problems) - 1)

        attempts = self._student_write(
            self.student_generator, [args.answer_template.format(problem=p) for p in problems], conversational
        )
        probes = self._student_write(
            self.probe_generator,
            [args.probe_template.format(problem=p, attempt=a) for p, a in zip(problems, attempts)],
            conversational,
        )
        teacher_prompts = [
            args.teaching_template.format(problem=p, probe=q, attempt=a) for p, q, a in zip(problems, probes, attempts)
        ]
        unique_ids = _encode(self._tokenizer, teacher_prompts, conversational, self.chat_template_kwargs)
        prompt_ids = [list(unique_ids[k]) for k in owner]
        result = self.generator.generate(prompt_ids)
        teachings = self._tokenizer.batch_decode(result.completion_ids, skip_special_tokens=True)
        answers = self._student_write(
            self.student_generator,
            [
                args.taught_answer_template.format(problem=problems[k], teaching=t, probe=probes[k])
                for k, t in zip(owner, teachings)
            ],
            conversational,
        )

        correct_without = [self._correctness(attempts[k], row) for k, row in zip(owner, rows)]
        correct_with = [self._correctness(answer, row) for answer, row in zip(answers, rows)]
        for name, values in (("without", correct_without), ("with", correct_with)):
            for value in values:
                if value is not None:
                    self.online.log_metric(f"student/accuracy_{name}_teaching", value)
        self.online.log_extra("student_probe", [probes[k] for k in owner])
        self.online.log_extra("student_answer", answers)
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": result.completion_ids,
            "logprobs": result.logprobs,
            "correct_without": correct_without,
            "correct_with": correct_with,
            "teaching_tokens": [len(ids) for ids in result.completion_ids],
            "student_attempt": [attempts[k] for k in owner],
            "student_probe": [probes[k] for k in owner],
            "student_answer": answers,
        }

    def _student_write(self, generator: TransformersGenerator, texts: list[str], conversational: bool) -> list[str]:
        """The student's responses to `texts` (sent as user messages when the dataset is conversational)."""
        tokenizer = self.student_processing_class
        ids = _encode(tokenizer, texts, conversational, self.chat_template_kwargs)
        return tokenizer.batch_decode(generator.generate(ids).completion_ids, skip_special_tokens=True)

    def _correctness(self, response: str, row: dict[str, Any]) -> float | None:
        value = self.correctness_fn(response, row)
        if value is None:
            return None
        if not isinstance(value, bool | int | float):
            raise TypeError(
                f"`correctness_fn` must return a bool, a number or None for each response, got {type(value).__name__}."
            )
        return float(value)


def _problem_text(prompt: Any) -> str:
    """The problem: the prompt itself, or the content of a conversation's last user message."""
    if isinstance(prompt, str):
        return prompt
    contents = [message.get("content") for message in prompt if message.get("role") == "user"]
    if not contents or not isinstance(contents[-1], str):
        raise ValueError(
            "A conversational prompt must end its problem statement in a user message with text content; got "
            f"{prompt!r:.200}."
        )
    return contents[-1]


def _encode(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], conversational: bool, chat_template_kwargs: dict
) -> list[list[int]]:
    """Token ids of `texts`: plain, or each as one user message through the chat template."""
    if not conversational:
        return tokenize_prompts(tokenizer, texts, chat_template_kwargs)
    if tokenizer.chat_template is None:
        raise ValueError(
            "The dataset's prompts are conversational but a tokenizer (the teacher's or the student's) has no chat "
            "template; give it one, pass a `student_processing_class` with one, or use plain-text prompts."
        )
    return tokenize_prompts(tokenizer, [[{"role": "user", "content": text}] for text in texts], chat_template_kwargs)
