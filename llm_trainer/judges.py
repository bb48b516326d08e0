"""Judges: models (or rules) that compare completions, with the interface TRL's judges had (`trl.judges`).

A judge answers for a batch of prompts at once. Its family fixes the shape of the answer:

- `BasePairwiseJudge.judge(prompts, pairs)` -> the index (0 or 1) of the better completion of each pair, `-1` when
  the judge cannot tell (an invalid answer, an exhausted request budget); with `return_scores=True`, where a judge
  supports it, the probability that the first completion is the better one.
- `BaseBinaryJudge.judge(prompts, completions)` -> 1 when a completion meets the judge's constraint, 0 when it does
  not, -1 when the judge cannot tell.
- `BaseRankJudge.judge(prompts, completion_lists)` -> the completion indices of each list, best first.

`shuffle_order=True` presents each pair in random order, so a judge with a positional bias does not favour one side;
the answer is mapped back to the caller's order.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_PAIRWISE_SYSTEM_PROMPT",
    "AllTrueJudge",
    "BaseBinaryJudge",
    "BaseJudge",
    "BasePairwiseJudge",
    "BaseRankJudge",
    "HfPairwiseJudge",
    "JudgeRequestError",
    "OpenAIPairwiseJudge",
    "PairRMJudge",
]

logger = logging.getLogger(__name__)

# The question the instruction-model judges answer; `{prompt}`, `{response0}` and `{response1}` are filled in.
DEFAULT_PAIRWISE_SYSTEM_PROMPT = """You are judging two answers to the same instruction. Prefer the answer a careful \
human reviewer would choose: the one that follows the instruction, is correct and helpful, and is clearly written. \
Do not let the order of the answers or their length sway you.

### Instruction
{prompt}

### Answer 0
{response0}

### Answer 1
{response1}

### Verdict
Reply with one character and nothing else: 0 if Answer 0 is better, 1 if Answer 1 is better."""


class BaseJudge(ABC):
    """A judge: `judge(prompts, completions, shuffle_order=True)` returns one verdict per prompt."""

    @abstractmethod
    def judge(self, prompts: list[str], completions: list[str], shuffle_order: bool = True) -> list:
        """Return one verdict per prompt."""


class BaseRankJudge(ABC):
    """A judge that ranks several completions per prompt.

    `judge` returns, for each prompt, the indices of its completions from best to worst: `[2, 0, 1]` means the third
    completion is the best and the second the worst.
    """

    @abstractmethod
    def judge(self, prompts: list[str], completions: list[list[str]], shuffle_order: bool = True) -> list[list[int]]:
        """Return, for each prompt, its completion indices ordered best first."""


class BasePairwiseJudge(BaseJudge):
    """A judge that picks the better of two completions per prompt.

    `judge` returns 0 or 1 (the better completion of each pair) or -1 when it cannot tell; with `return_scores=True`
    (judges that support it) the probability that the first completion is better. Subclasses can call
    `shuffle_pairs` / `unshuffle` to implement `shuffle_order`.
    """

    @abstractmethod
    def judge(
        self,
        prompts: list[str],
        completions: list[list[str]],
        shuffle_order: bool = True,
        return_scores: bool = False,
    ) -> list[int | float]:
        """Return, per prompt, the index of the better completion (-1: can't tell), or its probability of being first."""

    @staticmethod
    def check_pairs(prompts: Sequence, completions: Sequence[Sequence[str]]) -> None:
        """Raise a `ValueError` unless there is exactly one pair of completions per prompt."""
        if len(prompts) != len(completions):
            raise ValueError(
                f"Got {len(prompts)} prompts but {len(completions)} completion pairs; expected one pair each."
            )
        for i, pair in enumerate(completions):
            if isinstance(pair, str) or len(pair) != 2:
                raise ValueError(
                    f"A pairwise judge compares exactly 2 completions per prompt; prompt {i} has {pair!r}."
                )

    @staticmethod
    def shuffle_pairs(completions: Sequence[Sequence[str]], shuffle_order: bool) -> tuple[list[list[str]], np.ndarray]:
        """Swap each pair with probability 1/2 (numpy's global generator, so `set_seed` reproduces it).

        Returns the pairs in the order to present them and the boolean mask of swapped pairs.
        """
        flipped = np.random.rand(len(completions)) < 0.5 if shuffle_order else np.zeros(len(completions), dtype=bool)
        pairs = [[pair[1], pair[0]] if flip else [pair[0], pair[1]] for pair, flip in zip(completions, flipped)]
        return pairs, flipped

    @staticmethod
    def unshuffle(results: Sequence[int | float], flipped: np.ndarray, scores: bool = False) -> list[int | float]:
        """Map verdicts on the presented pairs back to the caller's order.

        Indices of swapped pairs become `1 - index` (-1 stays -1); scores (probability that the first completion is
        better) become `1 - score`.
        """
        out: list[int | float] = []
        for result, flip in zip(results, flipped):
            if not flip:
                out.append(result)
            elif scores:
                out.append(1.0 - float(result))
            else:
                out.append(-1 if result == -1 else 1 - int(result))
        return out


class BaseBinaryJudge(BaseJudge):
    """A judge that says whether each completion meets a constraint: 1 yes, 0 no, -1 can't tell.

    Used for the constraint judges of CGPO's mixture of judges (https://huggingface.co/papers/2409.20370).
    """

    @abstractmethod
    def judge(
        self,
        prompts: list[str],
        completions: list[str],
        gold_completions: list[str] | None = None,
        shuffle_order: bool = True,
    ) -> list[int]:
        """Return 1, 0 or -1 per completion."""


class AllTrueJudge(BaseBinaryJudge):
    """Combine binary judges: 1 when every judge says 1, -1 when any judge cannot tell, 0 otherwise.

    This is the mixture of judges of CGPO (https://huggingface.co/papers/2409.20370).

    Args:
        judges: the binary judges to combine.
    """

    def __init__(self, judges: Sequence[BaseBinaryJudge]):
        judges = list(judges)
        if not judges:
            raise ValueError("AllTrueJudge needs at least one binary judge.")
        for judge in judges:
            if not callable(getattr(judge, "judge", None)):
                raise TypeError(f"AllTrueJudge combines binary judges (with a `judge` method); got {judge!r}.")
        self.judges = judges

    def judge(
        self,
        prompts: list[str],
        completions: list[str],
        gold_completions: list[str] | None = None,
        shuffle_order: bool = True,
    ) -> list[int]:
        """Return, per completion, 1 if all judges say 1, -1 if any says -1, else 0."""
        verdicts = [list(judge.judge(prompts, completions, gold_completions, shuffle_order)) for judge in self.judges]
        for judge, answer in zip(self.judges, verdicts):
            if len(answer) != len(prompts):
                raise ValueError(f"{type(judge).__name__} returned {len(answer)} verdicts for {len(prompts)} prompts.")
        combined = []
        for i, row in enumerate(zip(*verdicts)):
            bad = [v for v in row if v not in (0, 1, -1)]
            if bad:
                raise ValueError(f"Binary judges answer 0, 1 or -1; got {bad[0]!r} for prompt {i}.")
            combined.append(-1 if -1 in row else int(all(v == 1 for v in row)))
        return combined


# ---------------------------------------------------------------------------------------------------------------------
# Helpers shared by the real judges


def _as_text(value: Any) -> str:
    """A prompt or completion as plain text: strings pass through, chat messages become `role: content` lines."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, Sequence) and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(
            f"{m.get('role', 'user')}: {m['content']}" if len(value) > 1 else str(m["content"]) for m in value
        )
    raise TypeError(f"Expected a string or a list of chat messages, got {type(value).__name__}: {value!r}.")


def _as_messages(prompt: Any) -> list[dict[str, str]]:
    """A prompt as chat messages: a string becomes one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and all(isinstance(m, dict) and "content" in m for m in prompt):
        return [dict(m) for m in prompt]
    raise TypeError(f"Expected a string or a list of chat messages, got {type(prompt).__name__}: {prompt!r}.")


def _check_system_prompt(system_prompt: str) -> str:
    """Raise unless `system_prompt` formats with exactly the placeholders `{prompt}`, `{response0}`, `{response1}`."""
    try:
        system_prompt.format(prompt="", response0="", response1="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            "system_prompt may only use the placeholders {prompt}, {response0} and {response1} (write literal braces "
            f"as {{{{ and }}}}); formatting it failed on {err!r}."
        ) from err
    for name in ("{prompt}", "{response0}", "{response1}"):
        if name not in system_prompt:
            raise ValueError(f"system_prompt must contain the placeholder {name}.")
    return system_prompt


def _parse_choice(answer: str | None) -> int:
    """0 or 1 from a judge model's reply (its first non-blank character), -1 for anything else."""
    text = (answer or "").strip()
    if text[:1] in ("0", "1") and (len(text) == 1 or not text[1].isdigit()):
        return int(text[0])
    logger.debug("The judge model answered %r, which is neither 0 nor 1; counting it as -1 (can't tell).", answer)
    return -1


def _default_device() -> torch.device:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _load_local(model: Any, tokenizer: Any, auto_class: Any, device: Any, model_init_kwargs: dict | None) -> tuple:
    """(model, tokenizer) from a path or a loaded model; a loaded model stays where it is, a path is moved to `device`."""
    from transformers import AutoTokenizer

    from .modeling import load_model

    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        loaded = load_model(path, auto_class, **dict(model_init_kwargs or {}))
        loaded.to(device if device is not None else _default_device())
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
    else:
        loaded = model
        if device is not None:
            loaded.to(device)
        if tokenizer is None:
            name = getattr(loaded, "name_or_path", None) or getattr(
                getattr(loaded, "config", None), "_name_or_path", ""
            )
            if not name:
                raise ValueError("Pass the model's tokenizer: `tokenizer=` is required with a loaded model.")
            tokenizer = AutoTokenizer.from_pretrained(name)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    loaded.eval()
    return loaded, tokenizer


def _render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> tuple[str, bool]:
    """(text, templated): the chat template's rendering, or the plain contents when the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return text, True
    return "\n\n".join(str(m["content"]) for m in messages), False


def _is_local_model(model: Any) -> bool:
    """A loaded model, or a path to a saved one (a folder on disk), rather than a Hub id."""
    if isinstance(model, (str, os.PathLike)):
        return os.path.isdir(os.fspath(model))
    return model is not None


# ---------------------------------------------------------------------------------------------------------------------
# PairRM: a pairwise reward model


class PairRMJudge(BasePairwiseJudge):
    """Pairwise judge backed by a reward model.

    With no `model` (or `model="llm-blender/PairRM"`) it runs the PairRM ranker through `llm-blender`
    (`pip install llm-blender`), comparing both completions jointly. Given a local sequence-classification reward
    model instead (a folder, or a loaded model with its tokenizer), it scores each prompt-completion pair, rendered
    with the tokenizer's chat template when there is one, and prefers the higher reward.

    Args:
        model: None / `"llm-blender/PairRM"` for llm-blender's PairRM, or a sequence-classification reward model (a
            path or a loaded `PreTrainedModel`).
        tokenizer: the reward model's tokenizer (loaded from `model`'s folder when omitted).
        device: where to run the model (default: the current CUDA device, else CPU). A loaded model is left where it
            is unless `device` is given.
        batch_size: sequences scored per forward pass.
        max_length: prompt+completion tokens kept (truncated from the right); None keeps everything.
        model_init_kwargs: keyword arguments for `from_pretrained` when `model` is a path (e.g. `{"dtype": "bfloat16"}`).
    """

    PAIRRM_ID = "llm-blender/PairRM"

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        max_length: int | None = 1024,
        model_init_kwargs: dict | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.batch_size = batch_size
        self.max_length = max_length
        self.blender = None
        self.model = self.tokenizer = None
        if model is None or (isinstance(model, str) and model == self.PAIRRM_ID):
            self.blender = self._load_blender(device)
        else:
            from transformers import AutoModelForSequenceClassification

            self.model, self.tokenizer = _load_local(
                model, tokenizer, AutoModelForSequenceClassification, device, model_init_kwargs
            )
            num_labels = getattr(self.model.config, "num_labels", 1)
            if num_labels != 1:
                raise ValueError(
                    f"PairRMJudge scores completions with a reward model, which has one output; this model has "
                    f"num_labels={num_labels}."
                )

    def _load_blender(self, device: Any) -> Any:
        from .import_utils import _is_package_available

        if not _is_package_available("llm_blender"):
            raise ImportError(
                "PairRMJudge() runs llm-blender/PairRM through the llm-blender package, which is not installed: "
                "`pip install llm-blender`. Or judge with a local reward model instead: "
                "PairRMJudge(model='path/to/sequence-classification-reward-model')."
            )
        import transformers.utils.hub as hub

        if not hasattr(hub, "TRANSFORMERS_CACHE"):  # llm-blender 0.0.2 reads this constant, gone in transformers 5
            hub.TRANSFORMERS_CACHE = None
        try:
            import llm_blender

            blender = llm_blender.Blender()
            blender.loadranker(self.PAIRRM_ID, device=str(device if device is not None else _default_device()))
        except Exception as err:
            raise RuntimeError(
                f"llm-blender could not load {self.PAIRRM_ID} ({type(err).__name__}: {err}). llm-blender may not "
                "support this transformers version; a local sequence-classification reward model works everywhere: "
                "PairRMJudge(model='path/to/reward-model')."
            ) from err
        return blender

    def reward_scores(self, prompts: Sequence, completions: Sequence) -> list[float]:
        """The reward model's score of each (prompt, completion) pair (local reward models only)."""
        import torch

        if self.model is None:
            raise RuntimeError("reward_scores needs a local reward model; this judge runs llm-blender.")
        texts, templated = [], []
        for prompt, completion in zip(prompts, completions):
            messages = [*_as_messages(prompt), {"role": "assistant", "content": _as_text(completion)}]
            text, has_template = _render_chat(self.tokenizer, messages, add_generation_prompt=False)
            texts.append(text)
            templated.append(has_template)
        pad_id = getattr(self.model.config, "pad_token_id", None)
        # Sequence-classification models find each row's last token through the pad id; without one, go one by one.
        batch_size = self.batch_size if pad_id is not None else 1
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            encoded = self.tokenizer(
                chunk,
                padding=len(chunk) > 1,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                add_special_tokens=not templated[start],
                return_tensors="pt",
            ).to(device)
            with torch.no_grad():
                logits = self.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores

    def judge(
        self,
        prompts: list[str],
        completions: list[list[str]],
        shuffle_order: bool = True,
        return_scores: bool = False,
        temperature: float = 1.0,
    ) -> list[int | float]:
        """Index of the preferred completion of each pair (-1 on an exact tie), or with `return_scores` the
        probability that the first is preferred: softmax of the two scores divided by `temperature`."""
        self.check_pairs(prompts, completions)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        pairs, flipped = self.shuffle_pairs(completions, shuffle_order)
        if self.blender is not None:
            logits = np.asarray(
                self.blender.rank(
                    [_as_text(p) for p in prompts],
                    [[_as_text(c) for c in pair] for pair in pairs],
                    return_scores=True,
                    disable_tqdm=True,
                ),
                dtype=np.float64,
            )
        else:
            flat = self.reward_scores([p for p in prompts for _ in range(2)], [c for pair in pairs for c in pair])
            logits = np.asarray(flat, dtype=np.float64).reshape(len(prompts), 2)
        if return_scores:
            margin = (logits[:, 0] - logits[:, 1]) / temperature
            first = [1.0 / (1.0 + math.exp(-m)) if m >= 0 else math.exp(m) / (1.0 + math.exp(m)) for m in margin]
            return self.unshuffle(first, flipped, scores=True)
        choice = [0 if a > b else 1 if b > a else -1 for a, b in logits]
        return self.unshuffle(choice, flipped)


# ---------------------------------------------------------------------------------------------------------------------
# Instruction models asked which answer is better


class HfPairwiseJudge(BasePairwiseJudge):
    """Pairwise judge that asks an instruction model which of two answers is better.

    The question is `system_prompt` (default `DEFAULT_PAIRWISE_SYSTEM_PROMPT`) filled with the prompt and both
    answers, sent as a user turn; the model answers `0` or `1`.

    - A local `transformers` causal LM (a folder, or a loaded model with `tokenizer`): the question is rendered with
      the chat template and the judge compares the model's next-token logits of `0` and `1`, so it always answers,
      and `return_scores=True` gives the probability of `0` among the two.
    - A Hub model id (not a folder on disk) or an endpoint URL: the question goes through
      `huggingface_hub.InferenceClient.chat_completion` (one token), concurrently; a reply other than 0/1 is -1.

    Args:
        model: a folder, a loaded causal LM, a Hub model id or an inference endpoint URL.
        token: Hugging Face token for the inference endpoint.
        system_prompt: the question, with placeholders `{prompt}`, `{response0}`, `{response1}`.
        tokenizer: the local model's tokenizer (loaded from its folder when omitted).
        device: where a local model runs (default: the current CUDA device, else CPU).
        batch_size: questions per forward pass of a local model.
        max_workers: concurrent endpoint requests.
        model_init_kwargs: keyword arguments for `from_pretrained` when `model` is a folder.
    """

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel = "meta-llama/Meta-Llama-3-70B-Instruct",
        token: str | None = None,
        system_prompt: str | None = None,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 8,
        max_workers: int = 8,
        model_init_kwargs: dict | None = None,
    ):
        self.system_prompt = _check_system_prompt(system_prompt or DEFAULT_PAIRWISE_SYSTEM_PROMPT)
        if batch_size < 1 or max_workers < 1:
            raise ValueError("batch_size and max_workers must be at least 1.")
        self.batch_size = batch_size
        self.max_workers = max_workers
        self.model = self.tokenizer = self.client = None
        if _is_local_model(model):
            from transformers import AutoModelForCausalLM

            self.model, self.tokenizer = _load_local(model, tokenizer, AutoModelForCausalLM, device, model_init_kwargs)
            self.choice_token_ids = [self._single_token_id(digit) for digit in ("0", "1")]
        else:
            from huggingface_hub import InferenceClient

            self.model_id = str(model)
            self.client = InferenceClient(model=self.model_id, token=token)

    def _single_token_id(self, digit: str) -> int:
        ids = self.tokenizer.encode(digit, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"HfPairwiseJudge reads the logits of the answer tokens '0' and '1', but this tokenizer splits {digit!r} "
                f"into {len(ids)} tokens {ids}."
            )
        return ids[0]

    def question(self, prompt: Any, pair: Sequence) -> str:
        """The question asked about one pair."""
        return self.system_prompt.format(
            prompt=_as_text(prompt), response0=_as_text(pair[0]), response1=_as_text(pair[1])
        )

    def choice_logits(self, questions: list[str]) -> np.ndarray:
        """(len(questions), 2): the local model's next-token logits of '0' and '1' after each question."""
        import torch

        texts, templated = [], False
        for question in questions:
            text, templated = _render_chat(self.tokenizer, [{"role": "user", "content": question}], True)
            texts.append(text)
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        out = []
        for start in range(0, len(texts), self.batch_size):
            rows = [
                self.tokenizer.encode(t, add_special_tokens=not templated)
                for t in texts[start : start + self.batch_size]
            ]
            width = max(map(len, rows))
            # Left padding puts every question's last token at the end, so one position of logits is enough.
            input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
            attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            with torch.no_grad():
                try:
                    logits = self.model(**kwargs, logits_to_keep=1).logits[:, -1]
                except TypeError:  # a model without `logits_to_keep`
                    logits = self.model(**kwargs).logits[:, -1]
            out.append(logits[:, self.choice_token_ids].float().cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def _ask_endpoint(self, question: str) -> int:
        try:
            reply = self.client.chat_completion(messages=[{"role": "user", "content": question}], max_tokens=1)
        except Exception as err:
            raise JudgeRequestError(
                f"The inference endpoint for {self.model_id!r} failed: {type(err).__name__}: {err}"
            ) from err
        return _parse_choice(reply.choices[0].message.content)

    def judge(
        self,
        prompts: list[str],
        completions: list[list[str]],
        shuffle_order: bool = True,
        return_scores: bool = False,
        temperature: float = 1.0,
    ) -> list[int | float]:
        """Index of the better completion of each pair (-1 when an endpoint's reply is neither 0 nor 1); with
        `return_scores` (local model only) the probability, from the '0'/'1' logits over `temperature`, that the
        first completion is better."""
        self.check_pairs(prompts, completions)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        pairs, flipped = self.shuffle_pairs(completions, shuffle_order)
        questions = [self.question(p, pair) for p, pair in zip(prompts, pairs)]
        if self.model is None:
            if return_scores:
                raise ValueError(
                    "return_scores needs a local model (the endpoint answers with one token, not logits)."
                )
            with concurrent.futures.ThreadPoolExecutor(max_workers=self.max_workers) as pool:
                return self.unshuffle(list(pool.map(self._ask_endpoint, questions)), flipped)
        logits = self.choice_logits(questions) / temperature
        if return_scores:
            margin = logits[:, 0] - logits[:, 1]
            first = [1.0 / (1.0 + math.exp(-m)) if m >= 0 else math.exp(m) / (1.0 + math.exp(m)) for m in margin]
            return self.unshuffle(first, flipped, scores=True)
        choice = [0 if a > b else 1 if b > a else -1 for a, b in logits]
        return self.unshuffle(choice, flipped)


class JudgeRequestError(RuntimeError):
    """A judge's HTTP endpoint refused a request or kept failing; `status` is the last HTTP status (None if none)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class OpenAIPairwiseJudge(BasePairwiseJudge):
    """Pairwise judge that asks a model behind any OpenAI-compatible `/v1/chat/completions` endpoint.

    OpenAI itself, vLLM's or `llm-trainer vllm-serve`'s OpenAI route, or any compatible server. It speaks HTTP with
    the standard library, so the `openai` package is not needed. Requests run concurrently; a 429, a 5xx or a
    connection error is retried with exponential backoff (honouring `Retry-After`); a rejected key (401/403) or an
    unreachable host raises an error that says so.

    Args:
        model: the model name sent with each request.
        system_prompt: the question, with placeholders `{prompt}`, `{response0}`, `{response1}`.
        max_requests: the most requests this judge sends in its lifetime (None: no limit); pairs beyond the budget are
            answered -1, with one warning.
        base_url: the API root, ending in `/v1` (default: `OPENAI_BASE_URL`, else `https://api.openai.com/v1`).
        api_key: the bearer token (default: `OPENAI_API_KEY`); required for api.openai.com, optional elsewhere.
        max_workers: concurrent requests.
        max_retries: retries of one request after a 429, a 5xx or a connection error.
        retry_backoff: seconds before the first retry, doubled at each further one.
        timeout: seconds to wait for one reply.
        request_kwargs: extra fields merged into each request body (e.g. `{"temperature": 0}`; a None value removes a
            field, e.g. `{"max_tokens": None, "max_completion_tokens": 1}`).
    """

    def __init__(
        self,
        model: str = "gpt-4-turbo-preview",
        system_prompt: str | None = None,
        max_requests: int | None = 1_000,
        base_url: str | None = None,
        api_key: str | None = None,
        max_workers: int = 8,
        max_retries: int = 5,
        retry_backoff: float = 1.0,
        timeout: float = 60.0,
        request_kwargs: dict[str, Any] | None = None,
    ):
        self.model = model
        self.system_prompt = _check_system_prompt(system_prompt or DEFAULT_PAIRWISE_SYSTEM_PROMPT)
        if max_requests is not None and max_requests < 0:
            raise ValueError(f"max_requests must be None or non-negative, got {max_requests}.")
        if max_workers < 1 or max_retries < 0 or retry_backoff < 0 or timeout <= 0:
            raise ValueError("Need max_workers >= 1, max_retries >= 0, retry_backoff >= 0 and timeout > 0.")
        self.max_requests = max_requests
        self.num_requests = 0
        self.max_workers = max_workers
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.timeout = timeout
        self.request_kwargs = dict(request_kwargs or {})
        self._warned = False

        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        parsed = urllib.parse.urlsplit(self.base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(
                f"base_url must be an http(s) URL such as http://localhost:8000/v1, got {self.base_url!r}."
            )
        self.url = f"{self.base_url}/chat/completions"
        api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not api_key and parsed.hostname == "api.openai.com":
            raise ValueError(
                "OpenAIPairwiseJudge needs an API key for api.openai.com: pass api_key= or set OPENAI_API_KEY (or point "
                "base_url / OPENAI_BASE_URL at another OpenAI-compatible server)."
            )
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # A server on this machine is reached directly, whatever proxy the environment names.
        loopback = parsed.hostname in ("localhost", "127.0.0.1", "::1", "0.0.0.0")
        handlers = [urllib.request.ProxyHandler({})] if loopback else []
        self._opener = urllib.request.build_opener(*handlers)

    def question(self, prompt: Any, pair: Sequence) -> str:
        """The question asked about one pair."""
        return self.system_prompt.format(
            prompt=_as_text(prompt), response0=_as_text(pair[0]), response1=_as_text(pair[1])
        )

    def _post(self, body: dict) -> dict:
        """POST `body` to the chat-completions route, with retries; the decoded JSON reply."""
        data = json.dumps(body).encode()
        failure, status, connection_failure = "", None, False
        for attempt in range(self.max_retries + 1):
            retry_after = None
            request = urllib.request.Request(self.url, data=data, headers=self._headers, method="POST")
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)
                except json.JSONDecodeError as err:
                    raise JudgeRequestError(
                        f"{self.url} answered with something that is not JSON: {raw[:200]!r}", status=200
                    ) from err
            except urllib.error.HTTPError as err:
                status, detail = err.code, _error_detail(err)
                if status in (401, 403):
                    raise JudgeRequestError(
                        f"{self.url} rejected the API key (HTTP {status}: {detail}). Pass a valid api_key= or set "
                        f"OPENAI_API_KEY, and check that the key may use model {self.model!r}.",
                        status=status,
                    ) from None
                if status != 429 and status < 500:
                    raise JudgeRequestError(
                        f"{self.url} refused the request (HTTP {status}): {detail}", status
                    ) from None
                failure, connection_failure = f"HTTP {status} ({detail})", False
                retry_after = err.headers.get("Retry-After") if err.headers else None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                reason = getattr(err, "reason", None) or err
                failure, connection_failure = f"{type(err).__name__}: {reason}", True
            if attempt < self.max_retries:
                delay = self.retry_backoff * 2**attempt
                if retry_after is not None:
                    try:
                        delay = max(delay, min(float(retry_after), 60.0))
                    except ValueError:
                        pass
                time.sleep(delay)
        attempts = self.max_retries + 1
        if connection_failure:
            raise ConnectionError(
                f"Could not reach the judge endpoint {self.url} ({attempts} attempts; last: {failure}). Check "
                "base_url (or OPENAI_BASE_URL) and that the server is running."
            )
        raise JudgeRequestError(f"{self.url} kept failing after {attempts} attempts; last answer: {failure}.", status)

    def _ask(self, question: str) -> int:
        body = {"model": self.model, "messages": [{"role": "user", "content": question}], "max_tokens": 1}
        body.update(self.request_kwargs)
        body = {key: value for key, value in body.items() if value is not None}
        reply = self._post(body)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise JudgeRequestError(f"{self.url} answered without choices[0].message.content: {reply!r:.300}") from err
        return _parse_choice(content)

    def judge(
        self,
        prompts: list[str],
        completions: list[list[str]],
        shuffle_order: bool = True,
        return_scores: bool = False,
    ) -> list[int]:
        """Index of the better completion of each pair; -1 when the reply is neither 0 nor 1 or the request budget
        (`max_requests`) is spent."""
        self.check_pairs(prompts, completions)
        if return_scores:
            raise ValueError("OpenAIPairwiseJudge answers with indices only; return_scores needs a local model judge.")
        budget = len(prompts)
        if self.max_requests is not None:
            budget = max(0, min(budget, self.max_requests - self.num_requests))
        if budget < len(prompts) and not self._warned:
            logger.warning(
                "OpenAIPairwiseJudge reached max_requests=%d: pairs beyond it are answered -1 (can't tell). Raise "
                "max_requests, or set it to None for no limit.",
                self.max_requests,
            )
            self._warned = True
        pairs, flipped = self.shuffle_pairs(completions, shuffle_order)
        questions = [self.question(p, pair) for p, pair in zip(prompts[:budget], pairs[:budget])]
        self.num_requests += len(questions)
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            answers = list(pool.map(self._ask, questions))
        return self.unshuffle(answers + [-1] * (len(prompts) - budget), flipped)


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The message of an HTTP error reply (OpenAI's `{"error": {"message": ...}}`, else the body's start)."""
    try:
        raw = err.read().decode(errors="replace")
    except Exception:
        return err.reason or ""
    try:
        payload = json.loads(raw)
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        message = error.get("message") if isinstance(error, dict) else error
        return str(message or raw)[:300]
    except (json.JSONDecodeError, AttributeError):
        return raw[:300] or str(err.reason or "")
