"""Proximal Policy Optimization for RLHF, drop-in for TRL 1.12's `trl.experimental.ppo.PPOTrainer` (the last TRL
release with PPO; it was removed in 1.13)."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import TrainOutput
from transformers.utils import SAFE_WEIGHTS_NAME

from ..data.collators import pad
from ..generation import SamplingConfig, TransformersGenerator
from ..losses.ppo import (
    INVALID_LOGPROB,
    first_true_indices,
    gae_advantages,
    kl_shaped_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    response_padding_masks,
    whiten_rewards,
)
from .base_trainer import BaseTrainer, init_arguments
from .ppo_config import PPOConfig
from .reference_policy import ReferencePolicy
from .utils import disable_dropout_in_model

try:  # transformers >= 5
    from transformers.trainer_utils import compare_trainer_and_checkpoint_args
except ImportError:
    compare_trainer_and_checkpoint_args = None

__all__ = ["OnlineTrainerState", "PPOTrainer", "PolicyAndValueWrapper"]

logger = logging.getLogger(__name__)

VALUE_MODEL_DIR = "value_model"
"""Checkpoint subfolder holding the value model (the checkpoint itself holds the policy, as TRL's)."""
DATA_STATE_NAME = "dataloader_state.pt"
"""Checkpoint file holding the position in the prompts (see `_RolloutBatches`)."""


@dataclass
class OnlineTrainerState(TrainerState):
    """`TrainerState` with the number of episodes (prompts) trained on so far."""

    episode: int = 0


class PolicyAndValueWrapper(nn.Module):
    """The policy and the value model as one module, so that one optimizer and one `accelerator.prepare` cover both.

    `forward` returns `(policy_output, values)`: the policy's output for the keyword arguments it is given, and the
    value head's `[batch, seq, 1]` predictions from the value model's backbone and `score` head.
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.critic_backbone = getattr(value_model, value_model.base_model_prefix)
        self.config = policy.config

    @property
    def is_gradient_checkpointing(self) -> bool:
        return getattr(self.policy, "is_gradient_checkpointing", False)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Recompute the activations of the policy and, when it supports it, of the value model."""
        kwargs["gradient_checkpointing_kwargs"] = gradient_checkpointing_kwargs
        self.policy.gradient_checkpointing_enable(**kwargs)
        if hasattr(self.value_model, "gradient_checkpointing_enable"):
            self.value_model.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.policy.gradient_checkpointing_disable()
        if hasattr(self.value_model, "gradient_checkpointing_disable"):
            self.value_model.gradient_checkpointing_disable()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        **policy_kwargs: Any,
    ) -> tuple[Any, torch.Tensor]:
        values = score_positions(self.value_model, input_ids, attention_mask, position_ids)
        policy_output = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **policy_kwargs
        )
        return policy_output, values


def model_inputs(query_responses: torch.Tensor, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Every pad token masked out, positions counted over the real tokens (TRL's PPO `forward` inputs)."""
    attention_mask = query_responses != pad_token_id
    return {
        "input_ids": query_responses.masked_fill(~attention_mask, 0),
        "attention_mask": attention_mask.long(),
        "position_ids": attention_mask.long().cumsum(1) - attention_mask.long(),
    }


def score_positions(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """The `score` head of a sequence-classification model applied at every position: `[batch, seq, num_labels]`."""
    backbone = getattr(model, model.base_model_prefix)
    output = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        return_dict=True,
        use_cache=False,
    )
    return model.score(output.hidden_states[-1])


def _check_scoring_model(model: Any, name: str) -> None:
    prefix = getattr(model, "base_model_prefix", None)
    if not isinstance(model, nn.Module) or not prefix or not hasattr(model, prefix) or not hasattr(model, "score"):
        raise TypeError(
            f"`{name}` must be a sequence-classification model with a backbone named by `base_model_prefix` and a "
            f"`score` head, e.g. `AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`; got "
            f"{type(model).__name__}."
        )


class LeftPaddingCollator:
    """Stacks the `input_ids` of tokenized prompts, left-padded with `pad_token_id` (other columns are dropped)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [torch.as_tensor(feature["input_ids"], dtype=torch.long) for feature in features]
        return {"input_ids": pad(rows, self.pad_token_id, "left")}


class PPOTrainer(BaseTrainer):
    """PPO for RLHF (Ziegler et al., 2019) with the signature, config, dataset format, metrics and numerics of TRL
    1.12's `PPOTrainer`.

    Four models: the `model` (policy) being trained; a frozen `ref_model` for the KL penalty (a copy of the policy
    when None, or with PEFT the policy with its adapter disabled); a `reward_model` scoring each response; and a
    `value_model` trained alongside the policy (a trainable copy of the reward model when None). Reward and value
    models are sequence-classification models (a backbone and a `score` head, e.g.
    `AutoModelForSequenceClassification` with `num_labels=1`). The dataset holds tokenized prompts (`input_ids`).

    Each update samples `batch_size` responses with the shared generator, scores them, builds per-token rewards
    (−`kl_coef`·KL plus the score after the last token), GAE advantages and returns, then runs `num_ppo_epochs` passes
    of `num_mini_batches` clipped policy + value steps. Log-probs come from `llm_trainer.kernels` (the logits are
    never built). Metrics, logged every update: `objective/{kl,entropy,non_score_reward,rlhf_reward,scores}`,
    `policy/{approxkl_avg,clipfrac_avg,entropy_avg}`, `loss/{policy_avg,value_avg}`,
    `val/{clipfrac_avg,ratio,ratio_var,num_eos_tokens}`, `lr`, `episode`, `eps`.

    A checkpoint is the policy, as TRL's, plus the value model in `value_model/` and what
    `train(resume_from_checkpoint=...)` needs to continue the run exactly (optimizer, scheduler, RNG, data position).

    >>> trainer = PPOTrainer(PPOConfig("out"), tokenizer, policy, None, reward_model, dataset, value_model)
    >>> trainer.train()
    """

    config_class = PPOConfig
    _name = "PPO"
    _tag_names = ["ppo"]

    def __init__(
        self,
        args: PPOConfig | TrainingArguments | None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None,
        model: str | PreTrainedModel,
        ref_model: str | PreTrainedModel | None,
        reward_model: str | nn.Module,
        train_dataset: Dataset,
        value_model: str | nn.Module | None = None,
        data_collator: Any = None,
        eval_dataset: Dataset | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        callbacks: list[TrainerCallback] | None = None,
        peft_config: Any = None,
    ) -> None:
        super().__init__(**init_arguments(locals()))

    # ----------------------------------------------------------------------------------------------- set-up
    def set_options(self, args: PPOConfig, reward_model: str | nn.Module, value_model: str | nn.Module | None) -> None:
        self.reward_model, self._value_model = reward_model, value_model  # loaded with the policy, see `load_model`

    def check_inputs(self, args: PPOConfig, *, train_dataset, eval_dataset, **inputs) -> None:
        super().check_inputs(args, train_dataset=train_dataset)
        if isinstance(train_dataset, IterableDataset):
            raise TypeError(
                "PPOTrainer needs a map-style `datasets.Dataset` (it counts episodes by its length); convert the "
                "iterable dataset with `Dataset.from_generator`."
            )
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if dataset is not None and "input_ids" not in dataset.column_names:
                raise ValueError(
                    f"`{name}` has no 'input_ids' column (columns: {dataset.column_names}). PPOTrainer trains on "
                    "tokenized prompts: e.g. `dataset.map(lambda row: tokenizer(row['prompt']), "
                    "remove_columns=dataset.column_names)`."
                )

    def load_model(self, model: Any, args: PPOConfig, quantization_config: Any) -> PreTrainedModel:
        """The policy, then the reward and value models (loaded by name as sequence classifiers; the value model
        defaults to a trainable copy of the reward model, as TRL's example script does)."""
        policy = self.prepare_model(model, args)
        reward_model, value_model = self.reward_model, self._value_model
        if isinstance(reward_model, str):
            reward_model = self.prepare_model(reward_model, args, auto_class=AutoModelForSequenceClassification)
        if isinstance(value_model, str):
            value_model = self.prepare_model(value_model, args, auto_class=AutoModelForSequenceClassification)
        _check_scoring_model(reward_model, "reward_model")
        if value_model is None:
            value_model = copy.deepcopy(reward_model).requires_grad_(True)
        _check_scoring_model(value_model, "value_model")
        self.reward_model, self._value_model = reward_model.eval(), value_model
        return policy

    def configure_tokenizer(self, model: PreTrainedModel, args: PPOConfig) -> None:
        self.pad_token_id, self.eos_token_id = self._tokenizer.pad_token_id, self._tokenizer.eos_token_id
        self.stop_token_id = self.eos_token_id if args.stop_token == "eos" else args.stop_token_id

    def reference_policy(self, model, ref_model, peft_config, args: PPOConfig) -> ReferencePolicy:
        return ReferencePolicy.for_policy(
            model, ref_model, args, adapter_name=args.ref_adapter_name, policy_adapter=args.model_adapter_name
        )

    prepare_reference = False  # moved to the device, as TRL's PPO

    def configure(self, model: PreTrainedModel, args: PPOConfig, train_dataset: Any) -> None:
        for module in (model, self.ref_model, self._value_model, self.reward_model):
            if module is not None:
                disable_dropout_in_model(module)

    def default_collator(self, args: PPOConfig) -> LeftPaddingCollator:
        return LeftPaddingCollator(self.pad_token_id)

    def trainer_model(self, model: PreTrainedModel, args: PPOConfig) -> PolicyAndValueWrapper:
        """The policy and the value model as one module, trained and checkpointed together."""
        wrapper = PolicyAndValueWrapper(model, self._value_model)
        if args.gradient_checkpointing:
            wrapper.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs or {"use_reentrant": False}
            )
        return wrapper

    def logprob_head(self, args: PPOConfig) -> dict[str, Any]:
        """Log-probs at the sampling temperature (TRL adds 1e-7 to avoid dividing by 0)."""
        return {"temperature": args.temperature + 1e-7, "outputs": ("entropy",)}

    @property
    def policy_model(self) -> nn.Module:
        return self.model.policy

    @property
    def value_model(self) -> nn.Module:
        return self.model.value_model

    @property
    def is_peft_model(self) -> bool:
        return is_peft_model(self.policy_model)

    def finish_init(self, args: PPOConfig) -> None:
        """PPO's own training loop: its state, batch sizes, optimizer, prompt loaders and generators."""
        train_dataset, eval_dataset, data_collator = self.train_dataset, self.eval_dataset, self.data_collator
        self.state = OnlineTrainerState(
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
            stateful_callbacks=[
                cb for cb in [*self.callback_handler.callbacks, self.control] if isinstance(cb, ExportableState)
            ],
        )
        self._compute_batch_sizes(args, self.accelerator.num_processes)
        if len(self.train_dataset) < args.local_batch_size:
            raise ValueError(
                f"`train_dataset` has {len(self.train_dataset)} prompts, fewer than one rollout batch "
                f"(`per_device_train_batch_size` * `gradient_accumulation_steps` = {args.local_batch_size}). Add "
                "prompts or lower the batch size."
            )

        self.create_optimizer_and_scheduler(num_training_steps=args.num_total_batches)
        self.model_wrapped, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.callback_handler.optimizer = self.optimizer
        self.callback_handler.lr_scheduler = self.lr_scheduler
        self.reward_model = self.reward_model.to(self.accelerator.device)

        set_seed(args.seed)
        self.dataloader = self.accelerator.prepare(
            DataLoader(
                train_dataset,
                batch_size=args.local_batch_size,
                shuffle=True,
                collate_fn=data_collator,
                drop_last=True,  # every rollout batch has the same number of rows
            )
        )
        self._batches: _RolloutBatches | None = None  # the prompt stream of `train`, positioned on resume
        self._data_state_to_resume: dict[str, Any] | None = None  # read from the checkpoint by `_load_extra_state`
        self.eval_dataloader = None
        if eval_dataset is not None:
            self.eval_dataloader = self.accelerator.prepare(
                DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=data_collator)
            )
        self.local_seed = args.seed + self.accelerator.process_index * 100003  # different samples on each process
        set_seed(self.local_seed)

        self.sample_generations_freq = max(1, args.num_total_batches // max(1, args.num_sample_generations))
        stop_ids = [token for token in (self.stop_token_id, self.pad_token_id) if token is not None]
        # A pad token also ends a response: everything after it is masked out (TRL's `padding_mask`), so
        # generating past it would change nothing that is trained on.
        policy = self.policy_model
        self.rollout_generator = TransformersGenerator(
            policy,
            SamplingConfig(max_tokens=args.response_length, temperature=args.temperature + 1e-7, top_p=1.0, top_k=0),
            pad_token_id=self.pad_token_id,
            eos_token_id=list(dict.fromkeys(stop_ids)),
            batch_size=args.local_rollout_forward_batch_size,
            unwrap=self._unwrapped_policy,
        )
        self.eval_generator = TransformersGenerator(
            policy,
            SamplingConfig(max_tokens=args.response_length, temperature=0.01 + 1e-7, top_p=1.0, top_k=0),
            pad_token_id=self.pad_token_id,
            eos_token_id=list(dict.fromkeys(stop_ids)),
            unwrap=self._unwrapped_policy,
        )

    def _compute_batch_sizes(self, args: PPOConfig, world_size: int) -> None:
        """Fill in TRL's derived batch-size fields of `args` (they are config fields, read by scripts)."""
        if args.total_episodes is None:
            args.total_episodes = int(args.num_train_epochs * len(self.train_dataset))
        args.world_size = world_size
        args.local_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        args.micro_batch_size = args.per_device_train_batch_size * world_size
        args.batch_size = args.local_batch_size * world_size
        if args.local_batch_size % args.num_mini_batches:
            raise ValueError(
                f"The rollout batch per process (`per_device_train_batch_size` * `gradient_accumulation_steps` = "
                f"{args.local_batch_size}) must be a multiple of `num_mini_batches` ({args.num_mini_batches})."
            )
        args.mini_batch_size = args.batch_size // args.num_mini_batches
        args.local_mini_batch_size = args.local_batch_size // args.num_mini_batches
        if args.local_mini_batch_size % args.per_device_train_batch_size:
            raise ValueError(
                f"Each mini-batch ({args.local_mini_batch_size} rows per process) must be a whole number of "
                f"`per_device_train_batch_size` ({args.per_device_train_batch_size}) micro-batches: make "
                "`gradient_accumulation_steps` a multiple of `num_mini_batches`."
            )
        if args.whiten_rewards and args.local_mini_batch_size < 8:
            raise ValueError(
                f"`whiten_rewards=True` needs at least 8 rows per mini-batch and process, got "
                f"{args.local_mini_batch_size}; raise the batch size or set `whiten_rewards=False`."
            )
        args.num_total_batches = -(-args.total_episodes // args.batch_size)  # may train past `total_episodes`

    def get_train_dataloader(self) -> DataLoader:
        return self.dataloader

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader | None:
        return self.eval_dataloader

    @contextlib.contextmanager
    def _unwrapped_policy(self) -> Iterator[nn.Module]:
        with self._policy_alone(), self.unwrapped_for_generation(lambda model: model.policy) as policy:
            yield policy

    @contextlib.contextmanager
    def _policy_alone(self) -> Iterator[None]:
        """Around a call of the policy that bypasses the policy-and-value wrapper's forward (generation, the PEFT
        reference). Under FSDP2 the wrapper is the root FSDP module: its own parameters (those no inner FSDP module
        holds: the embeddings, final norms and heads) are gathered only by its forward, so they are gathered here for
        the block and freed after; the inner modules (decoder layers) gather their own. Else nothing."""
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # pragma: no cover - older torch
            FSDPModule = ()  # noqa: N806
        root = self.model_wrapped
        if not isinstance(root, FSDPModule):
            yield
            return
        state = root._get_fsdp_state()
        if state._is_root is None:
            state._lazy_init()  # as the wrapper's first forward would: it, not a decoder layer, is the root
        root.unshard()
        try:
            yield
        finally:
            root.reshard()

    def null_ref_context(self) -> contextlib.AbstractContextManager:
        """Run the PEFT policy as the reference: the `ref_adapter_name` adapter if set, else adapters disabled."""
        return self.reference.context(self.policy_model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the policy alone (with the tokenizer), as a model to sample from."""
        wrapper = self.model
        self.model = wrapper.policy
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self.model = wrapper

    def evaluate(self, *args: Any, **kwargs: Any):
        raise NotImplementedError(
            "PPOTrainer has no evaluation loss. Call `generate_completions()` to sample responses to the eval "
            "prompts and score them, or set `num_sample_generations` to do it during training."
        )

    # ------------------------------------------------------------------------------------------------ rollouts
    def _queries(self, input_ids: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]:
        """Prompt ids without their outer padding, and the prompts left-padded into one tensor (any collator's
        padding side works)."""
        prompts = []
        for row in input_ids.tolist():
            real = [i for i, token in enumerate(row) if token != self.pad_token_id]
            prompts.append(row[real[0] : real[-1] + 1] if real else row[-1:])
        queries = pad([torch.tensor(p) for p in prompts], self.pad_token_id, "left")
        return prompts, queries.to(self.accelerator.device)

    def _responses(self, completions: list[list[int]]) -> torch.Tensor:
        rows = [torch.tensor(ids, dtype=torch.long) for ids in completions]
        return pad(rows, self.pad_token_id, "right").to(self.accelerator.device)

    def _policy_forward(
        self, model: nn.Module, query_responses: torch.Tensor, context_length: int
    ) -> tuple[Any, torch.Tensor | None]:
        """Token log-probs (and entropies) of the responses under `model` (the wrapper, or a reference policy),
        plus the wrapper's value predictions over the responses; shapes `[batch, response_length]`."""
        inputs = model_inputs(query_responses, self.pad_token_id)
        labels = query_responses.clone()
        labels[:, :context_length] = -100
        output = model(**inputs, labels=labels, token_logprobs=True)
        if isinstance(output, tuple):  # the policy-and-value wrapper
            output, values = output
            return output, values[:, context_length - 1 : -1].squeeze(-1)
        return output, None

    def _score(self, query_responses: torch.Tensor, context_length: int) -> torch.Tensor:
        """Reward-model score of each query + response, read at the response's last non-pad token."""
        inputs = model_inputs(query_responses, self.pad_token_id)
        scores = score_positions(self.reward_model, **inputs)
        last = first_true_indices(query_responses[:, context_length:] == self.pad_token_id) - 1 + context_length
        rows = torch.arange(scores.size(0), device=scores.device)
        return scores[rows, last].squeeze(-1)

    @torch.no_grad()
    def _rollout(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Generate responses to a batch of prompts and compute everything the PPO epochs need."""
        args = self.args
        prompts, queries = self._queries(input_ids)
        responses = self._responses(self.rollout_generator.generate(prompts).completion_ids)
        context_length = queries.size(1)
        query_responses = torch.cat([queries, responses], dim=1)

        logprobs, ref_logprobs, values, scores = [], [], [], []
        step = args.local_rollout_forward_batch_size
        for start in range(0, queries.size(0), step):
            chunk = query_responses[start : start + step]
            output, value = self._policy_forward(self.model_wrapped, chunk, context_length)
            logprobs.append(output.log_probs[:, context_length - 1 :])
            values.append(value)
            if self.ref_model is not None:
                ref_output, _ = self._policy_forward(self.ref_model, chunk, context_length)
            else:
                with self._policy_alone(), self.null_ref_context():
                    ref_output, _ = self._policy_forward(self.policy_model, chunk, context_length)
            ref_logprobs.append(ref_output.log_probs[:, context_length - 1 :])
            scores.append(self._score(chunk, context_length))
        logprobs, ref_logprobs = torch.cat(logprobs).float(), torch.cat(ref_logprobs).float()
        values, scores = torch.cat(values).float(), torch.cat(scores).float()

        contains_eos = (responses == self.eos_token_id).any(-1)
        if args.missing_eos_penalty is not None:
            scores = torch.where(contains_eos, scores, scores - args.missing_eos_penalty)
        sequence_lengths = first_true_indices(responses == self.pad_token_id) - 1
        padding_mask, padding_mask_p1 = response_padding_masks(sequence_lengths, responses.size(1))
        logprobs = logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
        ref_logprobs = ref_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
        values = values.masked_fill(padding_mask_p1, 0.0)

        shaped = kl_shaped_rewards(
            logprobs, ref_logprobs, scores, sequence_lengths, padding_mask, args.kl_coef, args.kl_estimator
        )
        rewards = whiten_rewards(shaped.rewards, padding_mask_p1) if args.whiten_rewards else shaped.rewards
        advantages, returns = gae_advantages(rewards, values, padding_mask, args.gamma, args.lam)
        return {
            "query_responses": query_responses,
            "responses": responses,
            "context_length": context_length,
            "logprobs": logprobs,
            "values": values,
            "scores": scores,
            "kl": shaped.kl,
            "non_score_reward": shaped.non_score_reward,
            "padding_mask": padding_mask,
            "padding_mask_p1": padding_mask_p1,
            "advantages": advantages,
            "returns": returns,
        }

    # ------------------------------------------------------------------------------------------------ training
    def _ppo_epochs(self, batch: dict[str, torch.Tensor]) -> dict[str, list[float]]:
        """`num_ppo_epochs` shuffled passes over the rollout, one optimizer step per mini-batch, gradients
        accumulated over its micro-batches. Returns the per-micro-batch statistics."""
        args = self.args
        context_length = batch["context_length"]
        stats: dict[str, list[torch.Tensor]] = {
            name: [] for name in ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio")
        }
        micro_per_mini = args.local_mini_batch_size // args.per_device_train_batch_size
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(args.local_batch_size, device=self.accelerator.device)
            for mini_start in range(0, args.local_batch_size, args.local_mini_batch_size):
                mini = order[mini_start : mini_start + args.local_mini_batch_size]
                for micro_index, micro_start in enumerate(range(0, len(mini), args.per_device_train_batch_size)):
                    rows = mini[micro_start : micro_start + args.per_device_train_batch_size]
                    last = micro_index == micro_per_mini - 1
                    sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.model_wrapped)
                    with sync:
                        output, values = self._policy_forward(
                            self.model_wrapped, batch["query_responses"][rows], context_length
                        )
                        new_logprobs = output.log_probs[:, context_length - 1 :].float()
                        values = values.float().masked_fill(batch["padding_mask_p1"][rows], 0.0)
                        vf_loss, vf_clipfrac = ppo_value_loss(
                            values,
                            batch["values"][rows],
                            batch["returns"][rows],
                            batch["padding_mask_p1"][rows],
                            args.cliprange_value,
                        )
                        policy = ppo_policy_loss(
                            new_logprobs,
                            batch["logprobs"][rows],
                            batch["advantages"][rows],
                            batch["padding_mask"][rows],
                            args.cliprange,
                        )
                        loss = policy.loss + args.vf_coef * vf_loss
                        self.accelerator.backward(loss / micro_per_mini)
                    stats["approxkl"].append(policy.approxkl)
                    stats["clipfrac"].append(policy.clipfrac)
                    stats["pg_loss"].append(policy.loss.detach())
                    stats["vf_loss"].append(vf_loss.detach())
                    stats["vf_clipfrac"].append(vf_clipfrac)
                    stats["entropy"].append(output.entropy[:, context_length - 1 :].detach().float().mean())
                    stats["ratio"].append(policy.ratio)
                self.optimizer.step()
                self.optimizer.zero_grad()
        return {name: self._gather(torch.stack(values)) for name, values in stats.items()}

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather_for_metrics(tensor.detach().reshape(-1).float())

    def _metrics_of(self, batch: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], eps: int) -> dict:
        """TRL's PPO metrics for one update (`eps`: episodes per second so far in this session)."""

        def mean(tensor: torch.Tensor) -> float:
            return self._gather(tensor).mean().item()

        with torch.no_grad():
            valid = (~batch["padding_mask"]).float()
            non_score_reward = batch["non_score_reward"].sum(1).mean()
            ratio = stats["ratio"]
            return {
                "eps": eps,
                "objective/kl": mean(batch["kl"].sum(1).mean()),
                "objective/entropy": mean((-batch["logprobs"] * valid).sum(1).mean()),
                "objective/non_score_reward": mean(non_score_reward),
                "objective/rlhf_reward": mean(non_score_reward + batch["scores"].mean()),
                "objective/scores": mean(batch["scores"].mean()),
                "policy/approxkl_avg": stats["approxkl"].mean().item(),
                "policy/clipfrac_avg": stats["clipfrac"].mean().item(),
                "loss/policy_avg": stats["pg_loss"].mean().item(),
                "loss/value_avg": stats["vf_loss"].mean().item(),
                "val/clipfrac_avg": stats["vf_clipfrac"].mean().item(),
                "policy/entropy_avg": stats["entropy"].mean().item(),
                "val/ratio": ratio.mean().item(),
                "val/ratio_var": ratio.var().item() if ratio.numel() > 1 else 0.0,
                "val/num_eos_tokens": (batch["responses"] == self.eos_token_id).sum().item(),
                "lr": self.lr_scheduler.get_last_lr()[0],
                "episode": self.state.episode,
            }

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> TrainOutput:
        """Run `num_total_batches` PPO updates (rollout, then `num_ppo_epochs` of optimization) and return a
        `TrainOutput` whose `training_loss` is the mean of `loss/policy_avg + vf_coef * loss/value_avg` over the run's
        updates (those before a resumed checkpoint included).

        `resume_from_checkpoint` (a `checkpoint-N` folder, or True for the newest complete one in `output_dir`)
        continues the run from that checkpoint with the very numbers of a run that was never stopped.
        """
        self.require_built()
        args = self.args
        self._batches = _RolloutBatches(self.dataloader)
        checkpoint = self.checkpoint_to_resume(resume_from_checkpoint)
        if checkpoint is not None:
            self._resume(checkpoint)
        else:
            self.state.global_step = 0
            self.state.episode = 0
            self.state.compute_steps(args, args.num_total_batches)
        self.state.max_steps = args.num_total_batches
        self.state.num_train_epochs = args.total_episodes / len(self.train_dataset)
        self.state.train_batch_size = args.per_device_train_batch_size
        losses = [  # the updates before the checkpoint, if any (every update is logged)
            entry["loss/policy_avg"] + args.vf_coef * entry["loss/value_avg"]
            for entry in self.state.log_history
            if "loss/policy_avg" in entry and "loss/value_avg" in entry
        ]
        first_update, first_episode, start = self.state.global_step + 1, self.state.episode, time.time()
        if first_update > args.num_total_batches:
            logger.warning(
                f"The checkpoint is at update {self.state.global_step}, which already reaches the "
                f"{args.num_total_batches} updates of this run: nothing left to train. Raise `total_episodes` (or "
                "`num_train_epochs`) to train further."
            )
            return self._train_output(losses, start)

        self.model.train()
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        for update in range(first_update, args.num_total_batches + 1):
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            self.state.episode += args.batch_size
            batch = self._rollout(next(self._batches)["input_ids"])
            stats = self._ppo_epochs(batch)
            metrics = self._metrics_of(batch, stats, int((self.state.episode - first_episode) / (time.time() - start)))
            losses.append(metrics["loss/policy_avg"] + args.vf_coef * metrics["loss/value_avg"])
            self.state.epoch = self.state.episode / len(self.train_dataset)
            self.state.global_step += 1
            self.log(metrics)
            self.lr_scheduler.step()
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            # Sampled before the checkpoint (TRL samples after it) so that the checkpoint's random state is the one
            # the next update starts from.
            if args.num_sample_generations > 0 and (update - 1) % self.sample_generations_freq == 0:
                self.generate_completions(sampling=True)
            if self.control.should_save:
                self._save_checkpoint(self.model, trial=None)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
            if self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        if self.control.should_save:
            self._save_checkpoint(self.model, trial=None)
            self.control = self.callback_handler.on_save(args, self.state, self.control)
        return self._train_output(losses, start)

    def _train_output(self, losses: list[float], start: float) -> TrainOutput:
        runtime = time.time() - start
        training_loss = sum(losses) / len(losses) if losses else 0.0
        return TrainOutput(
            self.state.global_step, training_loss, {"train_runtime": runtime, "train_loss": training_loss}
        )

    # ------------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_to_resume(self, resume_from_checkpoint: str | bool | None, trial: Any = None) -> str | None:
        """As `BaseTrainer.checkpoint_to_resume`, refusing DeepSpeed/FSDP and checkpoints without PPO's state."""
        checkpoint = super().checkpoint_to_resume(resume_from_checkpoint, trial)
        if checkpoint is None:
            return None
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError(
                "PPOTrainer resumes from checkpoints only without DeepSpeed or FSDP (their sharded optimizer states "
                f"are not restored). Start a new run from the policy in {checkpoint} and the value model in "
                f"{os.path.join(checkpoint, VALUE_MODEL_DIR)} instead."
            )
        rng_file = "rng_state.pth" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}.pth"
        needed = (TRAINER_STATE_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, rng_file, VALUE_MODEL_DIR, DATA_STATE_NAME)
        missing = [name for name in needed if not os.path.exists(os.path.join(checkpoint, name))]
        if missing:
            raise ValueError(
                f"{checkpoint} is not a complete PPO checkpoint: it lacks {', '.join(missing)} (a checkpoint written "
                "with `save_only_model=True`, by TRL, or by an older llm_trainer, none of which saved the value model "
                "and the position in the data). Resume from a checkpoint of this version, or start a new run from "
                "the policy it holds."
            )
        return checkpoint

    def _resume(self, checkpoint: str) -> None:
        """Restore the policy, value model, optimizer, scheduler, trainer state, data position and random state of
        `checkpoint`. The random state comes last: replaying the data order to the checkpoint's position draws from
        it."""
        self._load_weights(checkpoint, self.policy_model)
        self._load_optimizer_and_scheduler(checkpoint)  # and `_load_extra_state`: the value model, the data position
        self.state = OnlineTrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()
        if compare_trainer_and_checkpoint_args is not None:
            compare_trainer_and_checkpoint_args(self.args, self.state)
        else:  # a Trainer method before transformers 5
            self.compare_trainer_and_checkpoint_args(self.args, self.state)
        self._load_callback_state()
        self._batches.load_state_dict(self._data_state_to_resume)
        self._load_rng_state(checkpoint)

    def _load_weights(self, folder: str, module: nn.Module) -> None:
        """Load the weights saved in `folder` into `module` in place, so the optimizer keeps its parameters
        (transformers' loader reads `self.model` for the tied weights, hence the swap)."""
        wrapper, self.model = self.model, module
        try:
            self._load_from_checkpoint(folder, model=module)
        finally:
            self.model = wrapper

    def _save_extra_state(self, folder: str) -> None:
        """Add to the checkpoint (which holds the policy, as TRL's does) the value model, in `value_model/` (a model
        `AutoModelForSequenceClassification.from_pretrained` loads), and the position in the prompts."""
        super()._save_extra_state(folder)
        if not self.args.should_save:
            return
        value_model = self.accelerator.unwrap_model(self.value_model)
        value_dir = os.path.join(folder, VALUE_MODEL_DIR)
        if isinstance(value_model, PreTrainedModel):
            value_model.save_pretrained(value_dir)
        else:
            os.makedirs(value_dir, exist_ok=True)
            safetensors.torch.save_model(value_model, os.path.join(value_dir, SAFE_WEIGHTS_NAME))
        if self._batches is not None:
            torch.save(self._batches.state_dict(), os.path.join(folder, DATA_STATE_NAME))

    def _load_extra_state(self, folder: str) -> None:
        """Load the value model saved by `_save_extra_state` and keep the data position for `train` to seek to."""
        super()._load_extra_state(folder)
        value_model = self.accelerator.unwrap_model(self.value_model)
        value_dir = os.path.join(folder, VALUE_MODEL_DIR)
        if isinstance(value_model, PreTrainedModel):
            self._load_weights(value_dir, value_model)
        else:
            safetensors.torch.load_model(value_model, os.path.join(value_dir, SAFE_WEIGHTS_NAME))
        self._data_state_to_resume = torch.load(os.path.join(folder, DATA_STATE_NAME), weights_only=True)

    @torch.no_grad()
    def generate_completions(self, sampling: bool = False) -> dict[str, list] | None:
        """Respond to the eval prompts at temperature 0.01 and score the responses; print the first five rows (with
        rich) and log the table to Weights & Biases when it is in `report_to`. `sampling=True` stops after one batch.

        Returns the table (`query`, `model response`, `score` columns), or None without an eval dataset.
        """
        if self.eval_dataloader is None:
            return None
        table: dict[str, list] = {"query": [], "model response": [], "score": []}
        for batch in self.eval_dataloader:
            prompts, queries = self._queries(batch["input_ids"])
            responses = self._responses(self.eval_generator.generate(prompts).completion_ids)
            scores = self._score(torch.cat([queries, responses], dim=1), queries.size(1))
            table["query"] += self.processing_class.batch_decode(prompts, skip_special_tokens=True)
            table["model response"] += self.processing_class.batch_decode(responses)
            table["score"] += scores.float().tolist()
            if sampling:
                break
        if self.accelerator.is_main_process:
            _print_table(table, rows=5)
            if "wandb" in self.args.report_to:
                import wandb

                if wandb.run is not None:
                    wandb.log({"completions": wandb.Table(columns=list(table), data=list(zip(*table.values())))})
        return table


class _RolloutBatches:
    """The dataloader's prompt batches, epoch after epoch (reshuffled by the dataloader each epoch), keeping the
    position a resumed run needs to continue with the very batch an uninterrupted run would take next.

    The position is the epoch, the batches taken from it, and the random state as the epoch began. Transformers'
    default sampler shuffles by seed and epoch; without it (`accelerator_config={"use_seedable_sampler": False}`) the
    shuffling is drawn from that random state, so the epoch's order is reproduced by replaying its first batches from
    it, whatever the sampler.
    """

    def __init__(self, dataloader: DataLoader) -> None:
        self.dataloader = dataloader
        self.epoch: int = getattr(dataloader, "iteration", 0)
        self.taken = 0
        self.epoch_rng: dict[str, torch.Tensor | None] = {}
        self._iterator: Iterator[dict[str, torch.Tensor]] | None = None

    def __iter__(self) -> _RolloutBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        for _ in range(2):  # the current epoch, else the next
            if self._iterator is None:
                self.taken, self.epoch_rng = 0, self._rng_state()
                self._iterator = iter(self.dataloader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch += 1
                continue
            self.taken += 1
            return batch
        raise RuntimeError("The PPO dataloader yields no batch.")

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "taken": self.taken,
            "batches_per_epoch": len(self.dataloader),
            "epoch_rng": self.epoch_rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Seek to the batch after `state`'s: set the dataloader's epoch, then replay the batches taken from it."""
        per_epoch = len(self.dataloader)
        if state["batches_per_epoch"] != per_epoch:
            logger.warning(
                f"The checkpoint was written with {state['batches_per_epoch']} prompt batches per epoch and this run "
                f"has {per_epoch}: the prompts will not come in the order of the interrupted run. Resume with the same "
                "`train_dataset`, batch sizes and number of processes to continue it exactly."
            )
        epoch, taken = state["epoch"], state["taken"]
        if taken >= per_epoch:  # the checkpoint's epoch is used up: the next batch opens the next one
            epoch, taken = epoch + 1, 0
        self.epoch, self.taken, self._iterator = epoch, 0, None
        if hasattr(self.dataloader, "set_epoch"):
            self.dataloader.set_epoch(epoch)
        if taken:
            self._set_rng_state(state["epoch_rng"])
            for _ in range(taken):
                next(self)

    def _generator(self) -> torch.Generator | None:
        """The generator accelerate shuffles with across processes (None on one process or with the seeded sampler)."""
        return getattr(self.dataloader, "synchronized_generator", None)

    def _rng_state(self) -> dict[str, torch.Tensor | None]:
        generator = self._generator()
        return {"cpu": torch.random.get_rng_state(), "generator": generator.get_state() if generator else None}

    def _set_rng_state(self, state: dict[str, torch.Tensor | None]) -> None:
        torch.random.set_rng_state(state["cpu"])
        generator = self._generator()
        if generator is not None and state["generator"] is not None:
            generator.set_state(state["generator"])


def _print_table(table: dict[str, list], rows: int) -> None:
    from rich.console import Console  # rich is a dependency of llm_trainer
    from rich.table import Table

    view = Table(show_lines=True)
    for column in table:
        view.add_column(column)
    for values in list(zip(*table.values()))[:rows]:
        view.add_row(*map(str, values))
    Console().print(view)
