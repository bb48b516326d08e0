"""`NashMDTrainer`: Nash Mirror Descent, the policy's completions against those of the policy/reference mixture."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback

from ..data.chat_template import maybe_apply_chat_template
from ..data.formats import is_conversational
from ..generation.loop import completion_logps
from ..losses.online_preference import nash_md_loss
from .base_trainer import init_arguments
from .nash_md_config import NashMDConfig
from .online_dpo_trainer import OnlineDPOTrainer
from .online_pairs import first_half, reference_last_logits, sample_against, scheduled, second_generator
from .reward_functions import RewardFunc


class NashMDTrainer(OnlineDPOTrainer):
    """Nash-MD ([Munos et al., 2023](https://huggingface.co/papers/2312.00886)): for each prompt, one completion
    from the policy and one from the geometric mixture of the policy and the reference policy (weight
    `mixture_coef` on the reference); the probability that the policy's completion is preferred, `sigmoid(score
    difference)` from `reward_funcs` or a pairwise `judge`'s score, drives a REINFORCE loss (0.5 as the baseline)
    with `beta` times a REINFORCE KL term to the reference (`beta` and `mixture_coef` may change per epoch).

    Drop-in for TRL 1.13's `trl.experimental.nash_md.NashMDTrainer` (removed from TRL in 1.14): same arguments,
    dataset format (a 'prompt' column) and logged metrics (`loss/score`, `loss/kl`, `rewards/*`, `logps/*`,
    `objective/entropy`, `val/*_contain_eos_token`, `beta`, `mixture_coef`). Generation uses `transformers`
    `generate` (the mixture needs both models' logits at each token: `use_vllm` is refused). Arguments are
    `OnlineDPOTrainer`'s; a `judge` is called with `return_scores=True` and must return the probability that the
    first completion is the better one.
    """

    config_class = NashMDConfig
    _name = "Nash-MD"
    _tag_names = ["llm-trainer", "nash-md"]

    def __init__(
        self,
        model: PreTrainedModel | torch.nn.Module | str,
        ref_model: PreTrainedModel | torch.nn.Module | None = None,
        reward_funcs: RewardFunc | list[RewardFunc] | None = None,
        args: NashMDConfig | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        peft_config: Any = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase] | None = None,
        judge: Any = None,
    ):
        super().__init__(**init_arguments(locals()))

    def check_inputs(self, args: NashMDConfig, **inputs) -> None:
        if args.use_vllm:
            raise ValueError(
                "Nash-MD samples the second completion of each pair from the policy/reference mixture with "
                "`transformers` `generate`; `use_vllm=True` is not supported. Set `use_vllm=False`."
            )
        super().check_inputs(args, **inputs)

    def finish_init(self, args: NashMDConfig) -> None:
        super().finish_init(args)
        self.second_sampler = second_generator(
            self,
            args,
            unwrap=self.unwrapped_for_generation,
            reference=reference_last_logits(self),
            coef=lambda: self.mixture_coef,
        )

    @property
    def mixture_coef(self) -> float:
        """The reference's weight in the mixture for the current epoch (a list gives one per epoch)."""
        return scheduled(self.args.mixture_coef, self.state.epoch)

    @property
    def beta(self) -> float:
        """β for the current epoch (a list gives one per epoch, the last for later epochs)."""
        return scheduled(self.args.beta, self.state.epoch)

    def judge_probability(self, rows: list[dict[str, Any]], texts: list[Any]) -> torch.Tensor:
        """The judge's probability that the policy's completion beats the mixture's, per prompt."""
        prompts = [row["prompt"] for row in rows]
        size = len(prompts)
        if is_conversational({"prompt": prompts[0]}):
            prompts = [maybe_apply_chat_template({"prompt": p}, self.processing_class)["prompt"] for p in prompts]
            texts = [c[0]["content"] for c in texts]
        scores = list(
            self.judge.judge(prompts, [[texts[i], texts[i + size]] for i in range(size)], return_scores=True)
        )
        if len(scores) != size or any(not isinstance(s, int | float) or not 0 <= s <= 1 for s in scores):
            raise ValueError(
                f"With `return_scores=True` the judge must return one probability in [0, 1] for each of the {size} "
                f"pairs, got {scores!r}."
            )
        return torch.tensor(scores, dtype=torch.float32, device=self.accelerator.device)

    def compute_loss(self, model, inputs: list[dict[str, Any]], return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("NashMDTrainer does not return model outputs from `compute_loss`.")
        mode = "train" if self.model.training else "eval"
        size = len(inputs)
        texts, batch = sample_against(self, inputs, model, self.second_sampler)
        eos = torch.tensor(self.eos_token_ids, device=batch.completion_ids.device)
        contains_eos = (torch.isin(batch.completion_ids, eos) & batch.completion_mask.bool()).any(dim=1)
        policy_batch = first_half(batch)
        mask = policy_batch.completion_mask
        packed = getattr(self.args, "packed_forward", None)
        logps_of = functools.partial(completion_logps, autocast=self.accelerator.autocast, packed_forward=packed)
        logps = logps_of(model, policy_batch)[0] * mask
        with torch.no_grad():
            unwrapped = self.accelerator.unwrap_model(model)
            reference = self.reference.model if self.reference.model is not None else model
            with self.reference.context(unwrapped):
                ref_logps = logps_of(reference, policy_batch)[0] * mask
        rewards = self.pair_scores(inputs, texts, batch, contains_eos)
        if rewards is not None:
            policy_scores, mixture_scores = rewards.split(size)
            probability = torch.sigmoid(policy_scores - mixture_scores)
        else:
            probability = self.judge_probability(inputs, texts)
        beta = self.beta
        losses, score, kl = nash_md_loss(logps, ref_logps, mask, probability.to(logps.dtype), beta=beta)
        self.log_nash_md(mode, logps, ref_logps, probability, score, kl, rewards, contains_eos, beta)
        return losses.mean()

    def log_nash_md(self, mode, logps, ref_logps, probability, score, kl, rewards, contains_eos, beta) -> None:
        """TRL 1.13's Nash-MD metrics."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        size = probability.size(0)
        with torch.no_grad():
            seq, ref_seq = logps.detach().sum(1), ref_logps.sum(1)
            metrics["loss/score"].append(gather(score.detach()).mean().item())
            metrics["loss/kl"].append(gather(kl).mean().item())
            metrics["logps/chosen"].append(gather(seq).mean().item())
            metrics["logps/rejected"].append(gather(ref_seq).mean().item())
            if rewards is not None:
                policy_scores, mixture_scores = rewards.split(size)
                metrics["rewards/chosen"].append(gather(policy_scores).mean().item())
                metrics["rewards/rejected"].append(gather(mixture_scores).mean().item())
            metrics["rewards/probabilities"].append(gather(probability.float()).mean().item())
            metrics["objective/entropy"].append(gather(-seq).mean().item())
            margins = seq - ref_seq
            metrics["rewards/margins"].append(gather(margins).mean().item())
            metrics["rewards/accuracies"].append(gather((margins > 0).float()).mean().item())
            metrics["val/model_contain_eos_token"].append(gather(contains_eos[:size].float()).mean().item())
            metrics["val/ref_contain_eos_token"].append(gather(contains_eos[size:].float()).mean().item())
            metrics["beta"].append(beta)
            metrics["mixture_coef"].append(self.mixture_coef)
