"""Binary Classifier Optimization, with the API of TRL 1.13's `experimental.bco.BCOTrainer` (removed from TRL in 1.14).

BCO trains the policy as a binary classifier of desirable vs undesirable completions whose logit is the implicit
reward β·(logπ − logπ_ref) shifted by δ, the running mean of all rewards seen (`losses.bco_loss`). With an
`embedding_func` and its `embedding_tokenizer`, underlying distribution matching (UDM) reweights undesirable
examples by the density ratio P(desirable | prompt) / P(undesirable | prompt) of a logistic-regression classifier
fitted on prompt embeddings, for datasets whose desirable and undesirable prompts come from different distributions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from transformers import DataCollator, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from transformers.trainer_utils import EvalPrediction

from ..data.collators import pad
from ..data.formats import is_conversational
from ..data.unpaired import DataCollatorForUnpairedPreference
from ..losses import RunningMoments, bco_loss, density_ratio_weights
from .base_trainer import init_arguments
from .bco_config import BCOConfig
from .unpaired_base import UnpairedForward, UnpairedPreferenceTrainer

__all__ = ["BCOTrainer", "DataCollatorForBCO", "PromptClassifier"]

logger = logging.getLogger(__name__)

RUNNING_NAME = "running.json"
CLF_NAME = "clf.pt"


@dataclass
class DataCollatorForBCO(DataCollatorForUnpairedPreference):
    """[`DataCollatorForUnpairedPreference`] that also pads the UDM prompt tokens (`embedding_input_ids`) into
    `embedding_input_ids` / `embedding_attention_mask`, with the embedding tokenizer's pad id."""

    embedding_pad_token_id: int = 0

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        if "embedding_input_ids" in examples[0]:
            ids = [torch.tensor(ex["embedding_input_ids"], dtype=torch.int64) for ex in examples]
            out["embedding_input_ids"] = pad(ids, self.embedding_pad_token_id)
            out["embedding_attention_mask"] = pad([torch.ones_like(i) for i in ids], 0)
        return out


class PromptClassifier:
    """P(desirable | prompt embedding) by L2-regularised logistic regression with balanced class weights, fitted
    with L-BFGS: the objective of scikit-learn's `LogisticRegression(class_weight="balanced")` that TRL's BCO used,
    without the dependency."""

    def __init__(self, C: float = 1.0, max_iter: int = 100):
        self.C, self.max_iter = C, max_iter
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def fit(self, embeddings: torch.Tensor, labels: torch.Tensor) -> PromptClassifier:
        """Fit on `embeddings` `(n, d)` and boolean `labels` `(n,)` (True = desirable)."""
        x, y = embeddings.detach().double().cpu(), labels.detach().double().cpu()
        n_pos = y.sum()
        if n_pos == 0 or n_pos == len(y):
            raise ValueError("The UDM classifier needs prompts of both desirable and undesirable examples.")
        sample_weight = torch.where(y > 0, len(y) / (2 * n_pos), len(y) / (2 * (len(y) - n_pos)))
        weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias], max_iter=self.max_iter, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
        )

        def closure():
            optimizer.zero_grad()
            logits = x @ weight + bias
            nll = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y, weight=sample_weight, reduction="sum"
            )
            loss = 0.5 * weight.pow(2).sum() + self.C * nll
            loss.backward()
            return loss

        optimizer.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()
        return self

    def predict_proba(self, embeddings: torch.Tensor) -> torch.Tensor:
        """P(desirable) for each row of `embeddings`, on their device and in their float dtype."""
        if self.weight is None:
            raise ValueError("The UDM classifier is not fitted yet: call `fit` first.")
        x = embeddings.detach().double().cpu()
        prob = torch.sigmoid(x @ self.weight + self.bias)
        dtype = embeddings.dtype if embeddings.is_floating_point() else torch.float32
        return prob.to(device=embeddings.device, dtype=dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"C": self.C, "max_iter": self.max_iter, "weight": self.weight, "bias": self.bias}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.C, self.max_iter, self.weight, self.bias = state["C"], state["max_iter"], state["weight"], state["bias"]


class BCOTrainer(UnpairedPreferenceTrainer):
    """BCO (Jung et al., 2024) with the signature and dataset formats of TRL 1.13's `BCOTrainer`.

    Datasets: unpaired preference (`prompt`, `completion`, `label`) or paired preference (unpaired automatically),
    standard or conversational. Shares KTO's data preparation, reference policy and forward pass (with no KL
    completions). The running reward shift δ is saved with each checkpoint (`running.json`), as is the UDM
    classifier (`clf.pt`). Logged metrics: `delta`, `rewards/{chosen,rejected,margins}`, `logps/{chosen,rejected}`,
    `logits/{chosen,rejected}` (mean logit over the vocabulary), `entropy`, `num_tokens`.

    >>> from llm_trainer import BCOConfig, BCOTrainer
    >>> trainer = BCOTrainer(model="path/to/model", args=BCOConfig("out"), train_dataset=dataset)
    >>> trainer.train()
    """

    config_class = BCOConfig
    _name = "BCO"
    _tag_names = ["bco"]
    _signature_extra = ("embedding_input_ids",)

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        ref_model: str | PreTrainedModel | None = None,
        args: BCOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        data_collator: DataCollator | None = None,
        model_init: Callable[[], PreTrainedModel] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        peft_config: Any = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        model_adapter_name: str | None = None,
        ref_adapter_name: str | None = None,
        embedding_func: Callable[..., torch.Tensor] | None = None,
        embedding_tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        super().__init__(**init_arguments(locals()))

    def set_options(
        self,
        args: BCOConfig,
        model_adapter_name: str | None = None,
        ref_adapter_name: str | None = None,
        embedding_func: Callable[..., torch.Tensor] | None = None,
        embedding_tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        if (embedding_func is None) != (embedding_tokenizer is None):
            raise ValueError(
                "Underlying distribution matching needs both `embedding_func` and `embedding_tokenizer`; pass both, "
                "or neither to train without it."
            )
        self.model_adapter_name = model_adapter_name
        self.ref_adapter_name = ref_adapter_name
        self.embedding_func = embedding_func
        self.embedding_tokenizer = embedding_tokenizer
        if embedding_tokenizer is not None and embedding_tokenizer.pad_token_id is None:
            embedding_tokenizer.pad_token = embedding_tokenizer.eos_token

    def check_inputs(self, args: BCOConfig, *, model, model_init, train_dataset, **inputs) -> None:
        if model is None or model_init is not None:
            raise ValueError("BCOTrainer needs `model` (a model or its name/path); `model_init` is not supported.")
        super().check_inputs(args, train_dataset=train_dataset)

    def finish_init(self, args: BCOConfig) -> None:
        self.running = RunningMoments()
        self.clf: PromptClassifier | None = None
        if self.match_underlying_distribution and not args.resume_from_checkpoint:
            self.clf = self._fit_prompt_classifier()

    @property
    def match_underlying_distribution(self) -> bool:
        """Whether undesirable examples are reweighted by UDM density ratios."""
        return self.embedding_func is not None and self.embedding_tokenizer is not None

    # ------------------------------------------------------------------------------------------------ data
    def default_collator(self, args: BCOConfig) -> DataCollatorForBCO:
        pad_id = self.embedding_tokenizer.pad_token_id if self.embedding_tokenizer is not None else 0
        return DataCollatorForBCO(
            pad_token_id=self._tokenizer.pad_token_id, max_length=args.max_length, embedding_pad_token_id=pad_id
        )

    def prepare_dataset(self, dataset, name, args):
        dataset = super().prepare_dataset(dataset, name, args)
        if self.embedding_tokenizer is None:
            return dataset
        if not isinstance(dataset, Dataset):
            raise ValueError(
                "Underlying distribution matching samples prompts from the whole dataset, so it needs a map-style "
                f"`Dataset`; the {name} dataset is an `IterableDataset`. Load it without streaming, or drop "
                "`embedding_func`."
            )
        if "prompt" not in dataset.column_names:
            raise ValueError(
                f"Underlying distribution matching embeds the prompt text, but the {name} dataset is pre-tokenized "
                "and has no 'prompt' column. Pass the raw dataset (prompt, completion, label)."
            )
        return dataset.map(
            _embedding_ids,
            fn_kwargs={"tokenizer": self._tokenizer, "embedding_tokenizer": self.embedding_tokenizer},
            desc=f"Tokenizing {name} prompts for the UDM classifier",
        )

    # ------------------------------------------------------------------------------------------------- UDM
    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.embedding_func(input_ids=input_ids, attention_mask=attention_mask)

    def _fit_prompt_classifier(self) -> PromptClassifier:
        """Fit the UDM classifier on up to `prompt_sample_size` desirable and undesirable prompts."""
        dataset = self.train_dataset
        labels = torch.tensor(dataset["label"])
        generator = torch.Generator().manual_seed(self.args.seed)
        embeddings, targets = [], []
        for label in (True, False):
            indices = (labels == label).nonzero().view(-1)
            size = min(len(indices), self.args.prompt_sample_size)
            chosen = indices[torch.randperm(len(indices), generator=generator)[:size]]
            embeddings.append(self._sample_embeddings(dataset.select(chosen.tolist())))
            targets.append(torch.full((len(embeddings[-1]),), label))
        clf = PromptClassifier().fit(torch.cat(embeddings), torch.cat(targets))
        for emb, target in zip(embeddings, targets):
            accuracy = ((clf.predict_proba(emb) > 0.5) == target.to(emb.device)).float().mean().item()
            logger.info(
                "UDM classifier accuracy on %s prompts: %.3f", "desirable" if target[0] else "undesirable", accuracy
            )
        return clf

    def _sample_embeddings(self, dataset: Dataset) -> torch.Tensor:
        loader = self.accelerator.prepare(
            DataLoader(
                dataset.select_columns(["embedding_input_ids", "prompt_ids", "completion_ids", "label"]),
                batch_size=self.args.per_device_train_batch_size,
                collate_fn=self.data_collator,
                shuffle=False,
            )
        )
        chunks = [
            self.accelerator.gather_for_metrics(self._embed(b["embedding_input_ids"], b["embedding_attention_mask"]))
            for b in loader
        ]
        return torch.cat([c.float().cpu() for c in chunks])

    def _rejected_weights(self, batch: dict[str, torch.Tensor], rejected_idx: torch.Tensor) -> torch.Tensor | None:
        if not self.match_underlying_distribution or self.clf is None or rejected_idx.numel() == 0:
            return None
        embeddings = self._embed(
            batch["embedding_input_ids"].index_select(0, rejected_idx),
            batch["embedding_attention_mask"].index_select(0, rejected_idx),
        )
        return density_ratio_weights(
            self.clf.predict_proba(embeddings), self.args.min_density_ratio, self.args.max_density_ratio
        )

    # ------------------------------------------------------------------------------------------------ loss
    def unpaired_loss(
        self, forward: UnpairedForward, batch: dict[str, torch.Tensor], mode: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reduce_sum = (lambda t: self.accelerator.reduce(t, "sum")) if self.accelerator.use_distributed else None
        out = bco_loss(
            forward.chosen_logps,
            forward.rejected_logps,
            forward.ref_chosen_logps,
            forward.ref_rejected_logps,
            self.running,
            beta=self.args.beta,
            update_running=mode == "train",
            rejected_weights=self._rejected_weights(batch, forward.rejected_idx),
            reduce_sum=reduce_sum,
        )
        self._metrics[mode]["delta"].append(self.accelerator.gather_for_metrics(out.delta).mean().item())
        return out.loss, out.chosen_rewards, out.rejected_rewards

    # ----------------------------------------------------------------------------------------- checkpoints
    def _save_extra_state(self, folder: str) -> None:
        super()._save_extra_state(folder)
        if self.accelerator.is_main_process:
            with open(os.path.join(folder, RUNNING_NAME), "w", encoding="utf-8") as f:
                json.dump(dataclasses.asdict(self.running), f, indent=2, sort_keys=True)
            if self.clf is not None:
                torch.save(self.clf.state_dict(), os.path.join(folder, CLF_NAME))

    def _load_extra_state(self, folder: str) -> None:
        super()._load_extra_state(folder)
        running_file = os.path.join(folder, RUNNING_NAME)
        if os.path.isfile(running_file):
            with open(running_file, encoding="utf-8") as f:
                self.running = RunningMoments(**json.load(f))
        clf_file = os.path.join(folder, CLF_NAME)
        if self.match_underlying_distribution and os.path.isfile(clf_file):
            self.clf = PromptClassifier()
            self.clf.load_state_dict(torch.load(clf_file, weights_only=True))


def _embedding_ids(example: dict, tokenizer: Any, embedding_tokenizer: Any) -> dict:
    """The UDM classifier's prompt tokens: the prompt text (chat-templated when conversational) tokenized by the
    embedding model's tokenizer."""
    prompt = example["prompt"]
    if is_conversational({"prompt": prompt}):
        prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return {"embedding_input_ids": embedding_tokenizer(prompt, add_special_tokens=False)["input_ids"]}
