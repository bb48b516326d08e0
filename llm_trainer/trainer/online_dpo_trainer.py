"""`OnlineDPOTrainer`: DPO on pairs the policy samples itself, ranked by reward functions or a pairwise judge."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from transformers.utils import logging

from ..data.chat_template import maybe_apply_chat_template
from ..data.formats import is_conversational
from ..generation.loop import GenerationLoop, OnlineBatch, Rollout, completion_logps, prompt_columns, tokenize_prompts
from ..losses.preference import online_dpo_loss, rank_pairs
from .base_trainer import BaseTrainer, init_arguments
from .online_dpo_config import OnlineDPOConfig
from .reference_policy import ReferencePolicy
from .reward_functions import RewardFunc, RewardFunctions
from .utils import identity

logger = logging.get_logger(__name__)


class OnlineDPOTrainer(BaseTrainer):
    """Online DPO: for each prompt, two completions sampled from the current policy, ranked into (chosen, rejected)
    by `reward_funcs` (summed with `reward_weights`, minus `missing_eos_penalty` for a completion without eos) or by
    a pairwise `judge`, then the DPO loss (`loss_type` "sigmoid" or "ipo") against the reference policy: `ref_model`,
    else a frozen copy of the initial model, else (PEFT) the model with its adapter off.

    Drop-in for TRL 1.16's `trl.experimental.online_dpo.OnlineDPOTrainer`: same arguments, dataset format (a 'prompt'
    column, text or conversational) and logged metrics; `judge=` (a `llm_trainer.judges.BasePairwiseJudge`) is the
    argument older TRL releases had. Log-probs go through the fused log-prob head (no vocabulary-sized logits) and
    generation through the shared back ends (`transformers` `generate`, or vLLM with `use_vllm=True`).

    Args:
        model: the policy, a model or its name or path.
        ref_model: the reference policy; None uses a frozen copy of `model` (or, with PEFT, the adapter-free model).
        reward_funcs: a reward function (`f(prompts, completions, completion_ids, **columns) -> list[float]`), a
            sequence-classification reward model or its name or path, or a list of them. None with a `judge`, or
            with `args.reward_model_path`.
        judge: a pairwise judge (`judge(prompts, [[a, b], ...]) -> [0 | 1 | -1, ...]`) ranking each pair instead of
            rewards; pairs it cannot decide (-1) are left out of the loss (their share is logged as
            `judge/undecided`).
        reward_processing_classes: tokenizers of the reward models (None loads each model's own).
    """

    config_class = OnlineDPOConfig
    loss_is_scaled_for_ga = False  # `compute_loss` returns the pairs' mean; `Trainer` divides it for accumulation
    _name = "Online DPO"
    _tag_names = ["llm-trainer", "online-dpo"]
    dataset_description = "a dataset with a 'prompt' column"

    def __init__(
        self,
        model: PreTrainedModel | torch.nn.Module | str,
        ref_model: PreTrainedModel | torch.nn.Module | None = None,
        reward_funcs: RewardFunc | list[RewardFunc] | None = None,
        args: OnlineDPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase] | None = None,
        peft_config: Any = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        judge: Any = None,
    ):
        super().__init__(**init_arguments(locals()))

    # ----------------------------------------------------------------------------------------------- set-up hooks
    def set_options(
        self, args: OnlineDPOConfig, *, reward_funcs: Any = None, judge: Any = None, reward_processing_classes=None
    ) -> None:
        if reward_funcs is None and judge is None and args.reward_model_path is not None:
            reward_funcs = args.reward_model_path
        self._reward_source, self._reward_processing_source, self.judge = (
            reward_funcs,
            reward_processing_classes,
            judge,
        )

    def check_inputs(self, args: OnlineDPOConfig, *, train_dataset: Any, eval_dataset: Any = None, **inputs) -> None:
        """No reward source, two of them, a judge without `judge(...)`, a dataset without 'prompt': refused here."""
        rewards = self._reward_source
        has_rewards = rewards is not None and not (isinstance(rewards, list | tuple) and not rewards)
        if has_rewards and self.judge is not None:
            raise ValueError(
                "Pass either `reward_funcs` (or `reward_model_path`) or `judge`, not both: one of them ranks each "
                "pair of completions."
            )
        if not has_rewards and self.judge is None:
            raise ValueError(
                "No way to rank the completions: pass `reward_funcs` (a function, a reward model or its name or path, "
                "or a list of them), `OnlineDPOConfig(reward_model_path=...)`, or a pairwise `judge`."
            )
        if self.judge is not None and not callable(getattr(self.judge, "judge", None)):
            raise TypeError(
                f"`judge` must be a pairwise judge with a `judge(prompts, completions)` method (e.g. a "
                f"`llm_trainer.judges.BasePairwiseJudge`), got {type(self.judge).__name__}."
            )
        if inputs.get("ref_model") is not None and inputs.get("ref_model") is inputs.get("model"):
            raise ValueError("`model` and `ref_model` cannot be the same object; omit `ref_model` for a frozen copy.")
        self.check_train_dataset(train_dataset, self.dataset_description)
        prompt_columns(train_dataset, eval_dataset, "OnlineDPOTrainer")

    def reference_policy(self, model, ref_model, peft_config, args) -> ReferencePolicy:
        return ReferencePolicy.for_policy(model, ref_model, copy_given_adapter=peft_config is None)

    def configure(self, model: PreTrainedModel, args: OnlineDPOConfig, train_dataset: Any) -> None:
        self.reward_functions = None
        if self._reward_source is not None:
            self.reward_functions = RewardFunctions(
                self._reward_source,
                args.reward_weights,
                self._reward_processing_source,
                model_init_kwargs=args.model_init_kwargs,
                trust_remote_code=args.trust_remote_code,
            )
        elif args.reward_weights is not None:
            raise ValueError("`reward_weights` weigh reward functions; with a `judge` there are none to weigh.")
        rewards = self.reward_functions
        self.reward_funcs = rewards.funcs if rewards is not None else None
        self.reward_func_names = rewards.names if rewards is not None else []
        self.reward_weights = rewards.weights if rewards is not None else None
        self.reward_processing_classes = rewards.processing_classes if rewards is not None else None
        self.max_length, self.num_generations = args.max_length, 2
        self.use_vllm, self.temperature = args.use_vllm, args.temperature
        self._beta = args.beta

    def default_collator(self, args: OnlineDPOConfig) -> Any:
        return identity  # rows reach `compute_loss` as they are

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def logprob_head(self, args: OnlineDPOConfig) -> dict[str, Any]:
        return {"temperature": 1.0, "outputs": ()}  # the loss scores the unscaled logits, as TRL's does

    def finish_init(self, args: OnlineDPOConfig) -> None:
        """Reward models on the device, and the generation loop (the back end `args` selects): one call per step
        samples both completions of every prompt."""
        if self.reward_functions is not None:
            for i, func in enumerate(self.reward_functions.funcs):
                if isinstance(func, torch.nn.Module):
                    self.reward_functions.funcs[i] = self.accelerator.prepare_model(func, evaluation_mode=True)
        from ..generation import make_generator
        from ..generation.loop import generation_tokens

        eos = generation_tokens(self.accelerator.unwrap_model(self.model), self._tokenizer)
        generator = make_generator(
            args, self.model, self.processing_class, accelerator=self.accelerator, unwrap=self.unwrapped_for_generation
        )
        # Both completions of a prompt come from one generate call; the sampler/buffer geometry is not used.
        self.rollouts = GenerationLoop(generator, self.processing_class, None, self.accelerator.device, eos, args)
        self.eos_token_ids = eos

    @property
    def beta(self) -> float:
        """β for the current epoch (a list gives one per epoch, the last for later epochs)."""
        if isinstance(self._beta, list | tuple):
            epoch = int(self.state.epoch or 0)
            return self._beta[min(epoch, len(self._beta) - 1)]
        return self._beta

    @staticmethod
    def tokenize_row(feature: dict[str, Any], is_encoder_decoder: bool, tokenizer: Any) -> dict[str, Any]:
        """TRL's helper: `prompt_input_ids` / `prompt_attention_mask` of a row's text prompt, with the tokenizer's
        BOS put first when it has one and the prompt lacks it (encoder-decoders: the tokenizer's special tokens)."""
        encoded = tokenizer(feature["prompt"], add_special_tokens=is_encoder_decoder)
        ids, mask = list(encoded["input_ids"]), list(encoded["attention_mask"])
        bos = tokenizer.bos_token_id
        if not is_encoder_decoder and bos is not None and (not ids or ids[0] != bos):
            ids, mask = [bos, *ids], [1, *mask]
        return {"prompt_input_ids": ids, "prompt_attention_mask": mask}

    def close(self) -> None:
        self.rollouts.close()

    # ----------------------------------------------------------------------------------------------- one step
    def _prepare_inputs(self, inputs: Any) -> Any:
        return inputs  # prompt rows: `compute_loss` samples the completions

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def sample_pairs(self, rows: list[dict[str, Any]], model: torch.nn.Module) -> tuple[list[Any], OnlineBatch]:
        """Two completions per prompt from the current policy, as a [first; second] batch of 2B rows (prompts
        left-truncated so that prompt + completion fits `max_length`)."""
        prompts = [row["prompt"] for row in rows]
        self.rollouts.sync_weights(self.accelerator.unwrap_model(model), self.state.global_step)
        if is_conversational({"prompt": prompts[0]}):
            prompt_ids = tokenize_prompts(self.processing_class, prompts, self.args.chat_template_kwargs or {})
        else:
            prompt_ids = self._tokenizer(text=prompts, add_special_tokens=False)["input_ids"]
        prompt_ids = list(prompt_ids) * 2
        completion_ids = self.rollouts.generator.generate(prompt_ids).completion_ids
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            texts = [[{"role": "assistant", "content": text}] for text in texts]
        batch = self.rollouts.pad(Rollout(prompt_ids, completion_ids, texts))
        cut = max(batch.prompt_ids.size(1) + batch.completion_ids.size(1) - self.max_length, 0)
        batch.prompt_ids, batch.prompt_mask = batch.prompt_ids[:, cut:], batch.prompt_mask[:, cut:]
        return texts, batch

    def pair_scores(self, rows, texts, batch: OnlineBatch, contains_eos: torch.Tensor) -> torch.Tensor | None:
        """The rewards of the 2B completions (weighted sum over the reward functions, minus `missing_eos_penalty`);
        None with a judge."""
        if self.reward_functions is None:
            return None
        prompts = [row["prompt"] for row in rows] * 2
        columns = RewardFunctions.columns(rows * 2, {"trainer_state": self.state})
        completion_ids = [ids[mask.bool()].tolist() for ids, mask in zip(batch.completion_ids, batch.completion_mask)]
        per_func = self.reward_functions.score(
            prompts, texts, completion_ids, columns, self.accelerator.device, self.args.chat_template_kwargs
        )
        rewards = (per_func * self.reward_functions.weights.to(per_func.device)).nansum(dim=1)
        if self.args.missing_eos_penalty is not None:
            rewards = rewards - self.args.missing_eos_penalty * (~contains_eos).float()
        return rewards

    def judge_pairs(self, rows: list[dict[str, Any]], texts: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The judge's verdicts as (second completion wins, decided) per prompt; prompts and completions reach it as
        text (conversations through the chat template)."""
        prompts = [row["prompt"] for row in rows]
        size = len(prompts)
        if is_conversational({"prompt": prompts[0]}):
            prompts = [maybe_apply_chat_template({"prompt": p}, self.processing_class)["prompt"] for p in prompts]
            texts = [c[0]["content"] for c in texts]
        verdicts = list(self.judge.judge(prompts, [[texts[i], texts[i + size]] for i in range(size)]))
        if len(verdicts) != size or any(v not in (0, 1, -1) for v in verdicts):
            raise ValueError(f"The judge must return 0, 1 or -1 for each of the {size} pairs, got {verdicts!r}.")
        device = self.accelerator.device
        second = torch.tensor([v == 1 for v in verdicts], device=device)
        return second, torch.tensor([v != -1 for v in verdicts], device=device)

    def compute_loss(self, model, inputs: list[dict[str, Any]], return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("OnlineDPOTrainer does not return model outputs from `compute_loss`.")
        mode = "train" if self.model.training else "eval"
        size = len(inputs)
        texts, batch = self.sample_pairs(inputs, model)
        mask = batch.completion_mask
        eos = torch.tensor(self.eos_token_ids, device=batch.completion_ids.device)
        contains_eos = (torch.isin(batch.completion_ids, eos) & mask.bool()).any(dim=1)
        packed = getattr(self.args, "packed_forward", None)
        logps_of = functools.partial(completion_logps, autocast=self.accelerator.autocast, packed_forward=packed)
        logps = logps_of(model, batch)[0] * mask
        with torch.no_grad():
            unwrapped = self.accelerator.unwrap_model(model)
            reference = self.reference.model if self.reference.model is not None else model
            with self.reference.context(unwrapped):
                ref_logps = logps_of(reference, batch)[0] * mask
        rewards = self.pair_scores(inputs, texts, batch, contains_eos)
        if rewards is not None:
            chosen, rejected = rank_pairs(*rewards.split(size))
            decided = torch.ones(size, dtype=torch.bool, device=rewards.device)
        else:
            second, decided = self.judge_pairs(inputs, texts)
            self._metrics[mode]["judge/undecided"].append(
                self.accelerator.gather_for_metrics((~decided).float()).mean().item()
            )
            rows = torch.arange(size, device=second.device)
            chosen, rejected = rows + second.long() * size, rows + (~second).long() * size
        seq, ref_seq = logps.sum(1), ref_logps.sum(1)
        beta = self.beta
        losses = online_dpo_loss(
            seq[chosen], seq[rejected], ref_seq[chosen], ref_seq[rejected], beta=beta, loss_type=self.args.loss_type
        )
        weights = decided.float()
        loss = (losses * weights).sum() / weights.sum().clamp(min=1.0)
        self.record_metrics(mode, beta, logps, ref_logps, seq, ref_seq, chosen, rejected, rewards, contains_eos)
        return loss

    def record_metrics(self, mode, beta, logps, ref_logps, seq, ref_seq, chosen, rejected, rewards, contains_eos):
        """TRL's Online DPO metrics (`objective/*`, `rewards/*`, `logps/*`, `val/contain_eos_token`, `beta`)."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        with torch.no_grad():
            if rewards is not None:
                metrics["objective/scores_margin"].append(
                    gather((rewards[chosen] - rewards[rejected]).mean()).mean().item()
                )
                metrics["objective/scores"].append(gather(rewards.mean()).mean().item())
            metrics["val/contain_eos_token"].append(contains_eos.float().mean().item())
            metrics["logps/chosen"].append(gather(seq[chosen].detach()).mean().item())
            metrics["logps/rejected"].append(gather(seq[rejected].detach()).mean().item())
            kl = (logps.detach() - ref_logps).sum(1)
            metrics["objective/kl"].append(gather(kl.mean()).mean().item())
            non_score = -beta * kl
            metrics["objective/non_score_reward"].append(gather(non_score.mean()).mean().item())
            if rewards is not None:
                metrics["objective/rlhf_reward"].append(gather(rewards + non_score).mean().item())
            metrics["objective/entropy"].append(gather(-seq.detach().mean()).mean().item())
            chosen_rewards = gather(beta * (seq[chosen].detach() - ref_seq[chosen]))
            rejected_rewards = gather(beta * (seq[rejected].detach() - ref_seq[rejected]))
            metrics["rewards/chosen"].append(chosen_rewards.mean().item())
            metrics["rewards/rejected"].append(rejected_rewards.mean().item())
            margins = chosen_rewards - rejected_rewards
            metrics["rewards/margins"].append(margins.mean().item())
            metrics["rewards/accuracies"].append((margins > 0).float().mean().item())
            metrics["beta"].append(beta)

    def training_step(self, model, inputs, num_items_in_batch=None):  # TRL's signature
        return super().training_step(model, inputs, num_items_in_batch)
