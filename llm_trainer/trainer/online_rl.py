"""How GRPO and RLOO are set up, as functions their constructor hooks call (no base class): the rollout source,
the input checks, the KL reference and the reward functions. What they share per step is `OnlineRL`
(`reward_functions.py`)."""

from __future__ import annotations

from typing import Any

from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers.utils import logging

from ..data.vision import IMAGE_COLUMNS, check_vision_dataset
from ..environments.rollout import EnvironmentRollout, rollout_and_rewards
from ..environments.tools import EnvironmentToolRollout, ToolRollout
from ..generation.loop import (
    check_image_prompts,
    check_streaming,
    dataset_columns,
    prompt_columns,
)
from ..models.vision import is_vision_model
from .base_trainer import BaseTrainer
from .reference_policy import ReferencePolicy
from .reward_functions import RewardFunctions

logger = logging.get_logger(__name__)


def rollout_source(
    args: Any,
    reward_funcs: Any,
    rollout_func: Any = None,
    tools: Any = None,
    environment_factory: Any = None,
    environment: Any = None,
) -> tuple[Any, Any]:
    """The rollout function that `tools`, `environment_factory` (TRL's) or `environment` (llm_trainer's) make, and
    the reward functions with an environment's."""
    max_tool_calls = getattr(args, "max_tool_calling_iterations", None)
    if environment_factory is not None:
        if rollout_func is not None or environment is not None:
            raise ValueError(
                "Pass `environment_factory` or `rollout_func` / `environment`, not both: the factory's environments "
                "make the rollout."
            )
        rollout_func = EnvironmentToolRollout(environment_factory, tools, max_tool_calls)
    elif tools:
        if rollout_func is not None or environment is not None:
            raise ValueError("Pass `tools` or `rollout_func` / `environment`, not both: tools make the rollout.")
        rollout_func = ToolRollout(tools, max_tool_calls)
    if environment is not None:
        if rollout_func is not None:
            raise ValueError("Pass `environment` or `rollout_func`, not both: an environment is a rollout.")
        rollout_func, reward_funcs = rollout_and_rewards(environment, reward_funcs)
    return rollout_func, reward_funcs


def placeholder_dataset(rollout: EnvironmentToolRollout, args: Any) -> Dataset:
    """Empty prompts driving a run whose environments make the prompts in `reset` (TRL's no-dataset path): one
    generation's worth of rows, cycled for `max_steps`."""
    if rollout.multi_environment:
        raise ValueError(
            "A dict `environment_factory` needs a `train_dataset` whose 'environment' column routes each row to its "
            "environment; pass one, or a single factory."
        )
    if args.max_steps <= 0:
        raise ValueError(
            "Without a `train_dataset` (the environment writes the prompt in `reset`), set `GRPOConfig(max_steps=...)` "
            "to a positive number: it is the length of training."
        )
    rows = max(1, args.generation_batch_size // args.num_generations)
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": ""}]] * rows})


def check_reward_source(reward_funcs: Any, rollout_func: Any) -> None:
    """Refuse to train without rewards: every advantage would be 0 and the policy would never move. A rollout
    function with a `reward_funcs()` method (environments that define `get_reward`) is a reward source too."""
    if reward_funcs is not None and not (isinstance(reward_funcs, list | tuple) and not reward_funcs):
        return
    rollout_rewards = getattr(rollout_func, "reward_funcs", None)
    if callable(rollout_rewards) and rollout_rewards():
        return
    raise ValueError(
        f"No reward source provided: `reward_funcs` is {reward_funcs!r}, so every completion would score 0 and the "
        "policy would get no gradient. Pass `reward_funcs` (a function, a reward model's name or path, or a list of "
        "them), or, with GRPOTrainer, an `environment_factory` whose environment defines `get_reward`."
    )


def check_online_inputs(
    trainer_name: str, args: Any, train_dataset: Any, eval_dataset: Any, reward_funcs: Any, rollout_func: Any
) -> None:
    """What GRPO and RLOO refuse before loading anything: no reward source, streams with `dispatch_batches`, a bad
    training set (none is fine for environments that write their prompts), unsupported options."""
    check_reward_source(reward_funcs, rollout_func)
    check_streaming(train_dataset, eval_dataset, args)
    if train_dataset is not None or not isinstance(rollout_func, EnvironmentToolRollout):
        BaseTrainer.check_train_dataset(train_dataset, "a dataset with a 'prompt' column")
        columns = prompt_columns(train_dataset, eval_dataset, trainer_name, rollout_func is not None, images=True)
        if set(IMAGE_COLUMNS) & set(columns):
            check_image_rollout(args, rollout_func)
    if args.use_transformers_continuous_batching:
        raise NotImplementedError(
            "`use_transformers_continuous_batching` is not supported yet; generation uses batched `generate` with "
            "a KV cache (or vLLM with `use_vllm=True`)."
        )
    if args.sync_ref_model and args.beta == 0.0:
        raise ValueError(
            "`sync_ref_model=True` needs a reference model, but `beta=0.0` uses none; set `beta` > 0 or "
            "`sync_ref_model=False`."
        )


def _named_datasets(train_dataset: Any, eval_dataset: Any) -> list[tuple[str, Any]]:
    evals = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]
    return [(name, dataset) for name, dataset in [("train", train_dataset), *evals] if dataset is not None]


def check_image_rollout(args: Any, rollout_func: Any) -> None:
    """What cannot generate from a dataset's images, refused before anything loads: `llm-trainer vllm-serve` (text
    and token ids only) and the tool / environment rollouts (their turns are generated from text)."""
    if getattr(args, "use_vllm", False) and getattr(args, "vllm_mode", None) == "server":
        raise ValueError(
            "The dataset has an image column, but `use_vllm=True, vllm_mode='server'` generates with "
            "`llm-trainer vllm-serve`, which takes text and token ids only, not images. Use `vllm_mode='colocate'`, "
            "or `use_vllm=False` to generate with the policy through transformers."
        )
    if isinstance(rollout_func, EnvironmentRollout):  # tools and TRL's environments too
        raise NotImplementedError(
            "Tool calling and environments generate their turns from text, so they cannot use the dataset's images: "
            "drop the image column, or pass a `rollout_func` that generates from the images itself."
        )


def check_vision_data(trainer_name: str, model: Any, train_dataset: Any, eval_dataset: Any) -> bool:
    """Whether the prompts come with images, after checking every dataset (`data.vision.check_vision_dataset`: an
    image column needs a vision-language model, every image decodes, no row asks for more images than it holds;
    `check_image_prompts`: the prompts of rows with images are conversations)."""
    vision = False
    for name, dataset in _named_datasets(train_dataset, eval_dataset):
        is_vlm = is_vision_model(model)
        if check_vision_dataset(
            dataset, model_is_vlm=is_vlm, message_columns=["prompt"], trainer=trainer_name, dataset_name=name
        ):
            check_image_prompts(dataset, name)
            vision = True
    return vision


def check_image_generation(trainer: Any, vision_data: bool) -> None:
    """Prompts with images need a processor (not a bare tokenizer) and a generation back end that takes images:
    refuse before training, naming the fix."""
    if not vision_data:
        return
    from transformers import ProcessorMixin

    name = type(trainer).__name__
    if not isinstance(trainer.processing_class, ProcessorMixin):
        raise ValueError(
            f"The dataset has images, but {name}'s `processing_class` is a {type(trainer.processing_class).__name__}, "
            "which cannot read them. Pass the model's processor (`AutoProcessor.from_pretrained(...)`) as "
            "`processing_class`, or leave it None to load it from the model."
        )
    generator = trainer.generation.generator
    if trainer.rollout_func is None and not getattr(generator, "supports_images", False):
        hint = ""
        if getattr(trainer.args, "use_vllm", False) and getattr(trainer.args, "vllm_mode", None) == "server":
            hint = (
                " `llm-trainer vllm-serve` generates from text and token ids only; use `vllm_mode='colocate'`, or "
                "`use_vllm=False` to generate with the policy through transformers."
            )
        raise ValueError(
            f"The dataset has images, but the generation back end {type(generator).__name__} cannot generate from "
            f"images.{hint or ' Set `use_vllm=False` to generate with the policy through transformers.'}"
        )


def online_reference(model: Any, peft_config: Any, args: Any) -> ReferencePolicy | None:
    """The KL reference of GRPO / RLOO (None when `beta == 0`): a frozen copy, or under PEFT the adapter-free
    policy (a given adapter is copied as the frozen "ref" adapter)."""
    if args.beta == 0.0:
        return None
    if args.sync_ref_model and is_peft_model(model):
        raise NotImplementedError(
            "`sync_ref_model=True` is not supported with a PEFT model: the reference is the adapter-free base "
            "model. Set `sync_ref_model=False`."
        )
    return ReferencePolicy.for_policy(model, copy_given_adapter=peft_config is None)


def online_reward_functions(
    args: Any, reward_funcs: Any, processing_classes: Any, rollout_func: Any, train_dataset: Any
) -> RewardFunctions:
    """The reward functions, their signatures checked against the dataset's columns, with the `get_reward` of
    environments that score themselves."""
    rewards = RewardFunctions(
        reward_funcs,
        args.reward_weights,
        processing_classes,
        model_init_kwargs=args.model_init_kwargs,
        trust_remote_code=args.trust_remote_code,
    )
    columns = dataset_columns(train_dataset) if train_dataset is not None else ["prompt"]
    rewards.check_signatures(columns, exact=rollout_func is None)
    if isinstance(rollout_func, EnvironmentToolRollout):
        for func in rollout_func.reward_funcs():
            rewards.append(func)
    return rewards


def online_attributes(args: Any, rewards: RewardFunctions) -> dict[str, Any]:
    """The settings TRL's GRPO and RLOO trainers expose as attributes (`trainer.num_generations`, ...), by name."""
    return {
        "reward_funcs": rewards.funcs,
        "reward_func_names": rewards.names,
        "reward_weights": rewards.weights,
        "reward_processing_classes": rewards.processing_classes,
        "num_generations": args.num_generations,
        "num_generations_eval": args.num_generations_eval or args.num_generations,
        "num_iterations": args.num_iterations,
        "max_completion_length": args.max_completion_length,
        "temperature": args.temperature,
        "epsilon_low": args.epsilon,
        "epsilon_high": args.epsilon_high if args.epsilon_high is not None else args.epsilon,
    }
