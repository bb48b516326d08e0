"""Every public name of TRL 1.16's trainer, config and collator classes exists here with a compatible signature.

Walks `trl.trainer.*_trainer` / `*_config` and the `trl.experimental` modules llm_trainer twins: each public class
defined there must exist at the same path here, with every public method, property, class attribute and dataclass
field of TRL's class; methods keep TRL's parameter names in TRL's order (extra trailing parameters must be optional),
and static methods stay static. Instance attributes TRL's trainers set in `__init__` are read from TRL's source and
checked on trainers built here on the tiny offline model. Skipped when TRL is not installed.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import textwrap

import pytest

trl = pytest.importorskip("trl")

TRAINER_MODULES = [
    f"trainer.{name}"
    for name in [
        "base_config",
        "base_trainer",
        "model_config",
        "distillation_config",
        "distillation_trainer",
        "dpo_config",
        "dpo_trainer",
        "grpo_config",
        "grpo_trainer",
        "kto_config",
        "kto_trainer",
        "reward_config",
        "reward_trainer",
        "rloo_config",
        "rloo_trainer",
        "sft_config",
        "sft_trainer",
    ]
]
# TRL's experimental modules with a twin here; TRL defines their classes in submodules of the package.
EXPERIMENTAL_PACKAGES = [
    "experimental.cpo",
    "experimental.orpo",
    "experimental.kto",
    "experimental.gkd",
    "experimental.online_dpo",
    "experimental.async_grpo",
]

# TRL's experimental CPO/ORPO keep the tokenize-and-forward helpers of the pre-1.0 DPO trainer. Here CPO and ORPO share
# the preference pipeline of the stable trainers (`data.preference_dataset`, `trainer.preference_forward`), whose
# steps have other names; these helpers are deliberately not reproduced.
LEGACY_PREFERENCE_HELPERS = {
    "build_tokenized_answer",
    "tokenize_row",
    "concatenated_inputs",
    "get_batch_logps",
    "get_batch_loss_metrics",
    "generate_from_model",
    "store_metrics",
}
NOT_PROVIDED: dict[str, set[str]] = {
    "CPOTrainer": LEGACY_PREFERENCE_HELPERS | {"cpo_loss"},
    "ORPOTrainer": LEGACY_PREFERENCE_HELPERS | {"odds_ratio_loss"},
    # TRL's per-row image preprocessing for vision-language policies; Online DPO here trains text-only models.
    "OnlineDPOTrainer": {"process_vision_row"},
}

# Instance attributes TRL's `__init__` sets that are deliberately absent here, with the reason.
INSTANCE_NOT_PROVIDED: dict[str, str] = {
    # Generation runs through one back end object, `trainer.generator`, built from the config.
    "vllm_generation": "TRL's vLLM wrapper; the vLLM back end here is `trainer.generator` (needs vLLM)",
    "generation_config": "sampling settings live in `trainer.generator`, built from `args`",
    "generation_kwargs": "sampling settings live in `trainer.generator`, built from `args`",
    "continuous_batching_config": "transformers continuous batching is not a generation back end here",
    "async_loop": "TRL's async-reward event loop; ours is `llm_trainer._background_loop`",
    "async_loop_thread": "TRL's async-reward event loop; ours is `llm_trainer._background_loop`",
    "async_loop_ready_event": "TRL's async-reward event loop; ours is `llm_trainer._background_loop`",
    "commit_scheduler": "TRL's Hub upload of completion logs; not provided",
    "environments": "environments are driven by the rollout function, `trainer.rollout_func`",
    "environment_factories": "environments are driven by the rollout function, `trainer.rollout_func`",
    "model_kwarg_keys": "TRL's cache of the model's forward keywords; not needed here",
    "max_tool_calling_iterations": "the tool-call limit lives in the rollout function, `trainer.rollout_func`",
    "chat_template": "a replacement training chat template is applied where it is used, not kept on the trainer",
    # Legacy (pre-1.0 DPO) state of TRL's experimental CPO/ORPO; see LEGACY_PREFERENCE_HELPERS.
    "decoder_start_token_id": "encoder-decoder models are not supported by CPO/ORPO here",
    "is_encoder_decoder": "encoder-decoder models are not supported by CPO/ORPO here",
    "use_dpo_data_collator": "legacy collator switch of TRL's experimental CPO/ORPO",
    "pad_token_id": "CPO/ORPO's pad id is `trainer.padding_value` (TRL's ORPO has both)",
    # TRL's experimental Online DPO: vision-language policies and its own vLLM handles.
    "is_vision_model": "Online DPO here trains text-only policies (no vision-language models)",
    "image_token": "Online DPO here trains text-only policies (no vision-language models)",
    "image_token_id": "Online DPO here trains text-only policies (no vision-language models)",
    "vision_start_token_id": "Online DPO here trains text-only policies (no vision-language models)",
    "vision_end_token_id": "Online DPO here trains text-only policies (no vision-language models)",
    "llm": "TRL's colocated vLLM engine; the vLLM back end here is `trainer.generator` (needs vLLM)",
    "vllm_client": "TRL's vLLM server client; the server back end here is `trainer.generator`",
    "structured_outputs_regex": "read from `args.vllm_structured_outputs_regex` by the vLLM back ends of `trainer.generator`",
    "stats": "Online DPO's metric lists live in `trainer._metrics[mode]` (as for the other trainers here), logged each step",
}


def _ours(path: str):
    return importlib.import_module(f"llm_trainer.{path}")


def _trl_classes(path: str) -> list[tuple[str, type]]:
    """Public classes defined in TRL's module (or, for an experimental package, in its submodules)."""
    module = importlib.import_module(f"trl.{path}")
    prefix = f"trl.{path}"
    return [
        (name, obj)
        for name, obj in vars(module).items()
        if not name.startswith("_") and inspect.isclass(obj) and obj.__module__.startswith(prefix)
    ]


def _cases() -> list[tuple[str, str]]:
    return [(path, name) for path in TRAINER_MODULES + EXPERIMENTAL_PACKAGES for name, _ in _trl_classes(path)]


def _public_members(cls: type) -> dict[str, object]:
    """Public attributes of `cls` and its TRL bases (not what it inherits from transformers)."""
    members: dict[str, object] = {}
    for klass in cls.__mro__:
        if not klass.__module__.startswith("trl."):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_"):
                members.setdefault(name, value)
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            members.setdefault(f.name, f)
    return members


def _has(cls: type, name: str) -> bool:
    return hasattr(cls, name) or (dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)})


def _check_signature(theirs, ours, where: str) -> list[str]:
    try:
        their_params = list(inspect.signature(theirs).parameters.values())
        our_params = list(inspect.signature(ours).parameters.values())
    except (TypeError, ValueError):
        return []
    problems = []
    their_names = [p.name for p in their_params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    our_names = [p.name for p in our_params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if our_names[: len(their_names)] != their_names:
        problems.append(f"{where}: parameters {our_names}, TRL has {their_names}")
    for extra in our_params[len(their_names) :]:
        if extra.kind in (extra.VAR_POSITIONAL, extra.VAR_KEYWORD):
            continue
        if extra.default is inspect.Parameter.empty:
            problems.append(f"{where}: extra parameter `{extra.name}` must be optional")
    return problems


TRL_MODULES = [
    "trl",
    "trl.chat_template_utils",
    "trl.data_utils",
    "trl.import_utils",
    "trl.models",
    "trl.models.utils",
    "trl.models.activation_offloading",
    "trl.models.selective_activation_checkpointing",
    "trl.kernels",
    "trl.rewards",
    "trl.scripts.utils",
    "trl.trainer",
    "trl.trainer.callbacks",
    "trl.trainer.utils",
    "trl.generation.vllm_client",
    "trl.extras.profiling",
]


@pytest.mark.parametrize("module_name", TRL_MODULES)
def test_every_public_name_of_a_trl_module_has_a_twin(module_name: str) -> None:
    """`from trl.x import y` works on llm_trainer for every `y` TRL lists in `trl.x.__all__` (or defines there)."""
    theirs = importlib.import_module(module_name)
    ours = importlib.import_module("llm_trainer" + module_name[len("trl") :])
    names = getattr(theirs, "__all__", None) or [
        name
        for name, value in vars(theirs).items()
        if not name.startswith("_")
        and getattr(value, "__module__", None) == module_name
        and (inspect.isfunction(value) or inspect.isclass(value))
    ]
    assert names, f"{module_name} lists no public names"
    assert [name for name in names if not hasattr(ours, name)] == []


@pytest.mark.parametrize(("path", "name"), _cases())
def test_class_surface_matches_trl(path: str, name: str) -> None:
    theirs = getattr(importlib.import_module(f"trl.{path}"), name)
    ours = getattr(_ours(path), name, None)
    assert ours is not None, f"llm_trainer.{path} has no `{name}`"
    problems = []
    for member, value in _public_members(theirs).items():
        if member in NOT_PROVIDED.get(name, set()):
            assert not _has(ours, member), f"{name}.{member} now exists: drop it from NOT_PROVIDED"
            continue
        if not _has(ours, member):
            problems.append(f"{name}.{member} is missing")
            continue
        if isinstance(value, staticmethod) and not isinstance(inspect.getattr_static(ours, member), staticmethod):
            problems.append(f"{name}.{member} must be a staticmethod, as in TRL")
        if callable(value) or isinstance(value, (staticmethod, classmethod)):
            problems += _check_signature(getattr(theirs, member), getattr(ours, member), f"{name}.{member}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------ instance attributes
def _init_attributes(cls: type) -> set[str]:
    """Public `self.<name>` that the `__init__` of TRL's `cls` assigns."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and not node.attr.startswith("_")
    }


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from llm_trainer.testing import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {
        "lm": make_tiny_model(root / "lm"),
        "rm": make_tiny_model(root / "rm", task="sequence-classification"),
    }


def _zero_reward(completions, **kwargs):
    return [0.0] * len(completions)


def _build(name: str, models: dict[str, str], out: str):
    import llm_trainer as L
    from llm_trainer.testing import zen_dataset

    lm, rm = models["lm"], models["rm"]
    common = dict(output_dir=out, report_to="none", bf16=False, max_steps=1)
    online = dict(common, per_device_train_batch_size=4, num_generations=4)
    if name == "DPOTrainer":
        return L.DPOTrainer(lm, args=L.DPOConfig(**common), train_dataset=zen_dataset("standard_preference"))
    if name == "KTOTrainer":
        data = zen_dataset("standard_unpaired_preference")
        return L.KTOTrainer(lm, args=L.KTOConfig(**common), train_dataset=data)
    if name == "RewardTrainer":
        return L.RewardTrainer(rm, args=L.RewardConfig(**common), train_dataset=zen_dataset("standard_preference"))
    if name == "SFTTrainer":
        return L.SFTTrainer(lm, args=L.SFTConfig(**common), train_dataset=zen_dataset("standard_language_modeling"))
    if name in ("GRPOTrainer", "RLOOTrainer"):
        trainer, config = getattr(L, name), getattr(L, name.replace("Trainer", "Config"))
        data = zen_dataset("standard_prompt_only")
        return trainer(lm, reward_funcs=_zero_reward, args=config(**online), train_dataset=data)
    if name == "OnlineDPOTrainer":
        args = L.OnlineDPOConfig(**common, per_device_train_batch_size=4)
        data = zen_dataset("standard_prompt_only")
        return L.OnlineDPOTrainer(lm, reward_funcs=_zero_reward, args=args, train_dataset=data)
    if name == "GKDTrainer":
        from llm_trainer.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(**common, per_device_train_batch_size=4)
        data = zen_dataset("conversational_language_modeling")
        return GKDTrainer(lm, teacher_model=lm, args=args, train_dataset=data)
    if name == "DistillationTrainer":
        args = L.DistillationConfig(**common, per_device_train_batch_size=4)
        return L.DistillationTrainer(
            lm, teacher_model=lm, args=args, train_dataset=zen_dataset("standard_prompt_only")
        )
    trainer, config = getattr(L, name), getattr(L, name.replace("Trainer", "Config"))
    return trainer(lm, args=config(**common), train_dataset=zen_dataset("standard_preference"))


TRAINERS = {
    "DPOTrainer": "trl.trainer.dpo_trainer",
    "GRPOTrainer": "trl.trainer.grpo_trainer",
    "KTOTrainer": "trl.trainer.kto_trainer",
    "RewardTrainer": "trl.trainer.reward_trainer",
    "RLOOTrainer": "trl.trainer.rloo_trainer",
    "SFTTrainer": "trl.trainer.sft_trainer",
    "DistillationTrainer": "trl.trainer.distillation_trainer",
    "CPOTrainer": "trl.experimental.cpo.cpo_trainer",
    "ORPOTrainer": "trl.experimental.orpo.orpo_trainer",
    "OnlineDPOTrainer": "trl.experimental.online_dpo.online_dpo_trainer",
    "GKDTrainer": "trl.experimental.gkd.gkd_trainer",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRAINERS))
def test_init_attributes_match_trl(name: str, tiny_models, tmp_path) -> None:
    """TRL's public instance attributes exist on our trainer. Those TRL copies from a config field of the same name
    (`self.top_p = args.top_p`) may instead be read from `trainer.args` here (a deliberate difference)."""
    theirs = getattr(importlib.import_module(TRAINERS[name]), name)
    trainer = _build(name, tiny_models, str(tmp_path))
    missing = sorted(
        attr
        for attr in _init_attributes(theirs) - INSTANCE_NOT_PROVIDED.keys()
        if not hasattr(trainer, attr) and not hasattr(trainer.args, attr)
    )
    assert not missing, f"{name} lacks TRL's instance attributes {missing}"


# ------------------------------------------------------------------------------------------ behaviour of added names
def test_grpo_static_helpers_are_the_loss_path() -> None:
    import torch

    from llm_trainer import GRPOTrainer

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([[-1.0], [-1.0]])
    sampling = torch.zeros(2, 3)
    logps = torch.tensor([[-2.0, -2.0, 50.0], [-0.5, -0.5, -0.5]])  # mean KL 2 (padding ignored) and 0.5
    keep = GRPOTrainer.get_off_policy_mask(advantages, logps, sampling, mask, off_policy_threshold=1.0)
    assert keep.tolist() == [[0.0], [1.0]]
    # w = 1 (log-ratio 0) gives phi(1) = 1 for either sign of the advantage.
    weights = GRPOTrainer.get_gamma_weights(torch.tensor([[1.0], [-1.0]]), torch.zeros(2, 3), mask, None)
    torch.testing.assert_close(weights, torch.ones(2, 1))


def test_packed_position_ids_restart_per_sequence() -> None:
    from llm_trainer.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = DataCollatorForLanguageModeling.get_position_ids_from_packed_seq_lengths([[3, 2], [1, 1, 2]])
    assert [r.tolist() for r in rows] == [[0, 1, 2, 0, 1], [0, 0, 0, 1]]


# ------------------------------------------------------------------------------------------ vision collators
VISION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for c in m.content %}{% if c.type == 'image' %}<image>{% else %}{{ c.text }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def vision_processor():
    """A tiny offline LLaVA processor: the shipped tokenizer plus `<image>`, 8x8 images in 4x4 patches (4 tokens)."""
    pytest.importorskip("PIL")
    from transformers import LlavaProcessor

    from llm_trainer.testing import get_tokenizer

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    tokenizer = get_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = ImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="full",
        chat_template=VISION_TEMPLATE,
        image_token="<image>",
    )


def _vision_rows(conversational: bool) -> list[dict]:
    from PIL import Image

    red, blue = Image.new("RGB", (10, 10), (255, 0, 0)), Image.new("RGB", (12, 9), (0, 0, 255))
    texts = [("What color?", "Red.", "Blue, surely not."), ("Describe the picture", "Blue.", "Red.")]
    rows = []
    for image, (prompt, chosen, rejected) in zip((red, blue), texts):
        if conversational:
            row = {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        else:
            row = {"prompt": "<image>" + prompt, "chosen": " " + chosen, "rejected": " " + rejected}
        rows.append({"images": [image], **row})
    return rows


def _assert_same_batch(ours: dict, theirs: dict) -> None:
    """Same keys and tensors; token ids compared where attended (TRL pads with eos when the pad id is 0)."""
    import torch

    assert set(ours) == set(theirs)
    for key, value in ours.items():
        if key.endswith("input_ids"):
            mask = ours[key.replace("input_ids", "attention_mask")]
            assert torch.equal(value * mask, theirs[key] * mask), key
        else:
            assert torch.equal(value, theirs[key]), key


@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("max_length", [None, 9])
def test_vision_collators_match_trl(vision_processor, conversational: bool, max_length: int | None) -> None:
    import copy

    import trl.trainer.dpo_trainer as trl_dpo
    import trl.trainer.kto_trainer as trl_kto
    import trl.trainer.sft_trainer as trl_sft

    from llm_trainer.trainer import dpo_trainer, kto_trainer, sft_trainer

    def both(ours_cls, theirs_cls, rows, **kwargs):
        ours = ours_cls(vision_processor, max_length=max_length, **kwargs)(copy.deepcopy(rows))
        theirs = theirs_cls(vision_processor, max_length=max_length, **kwargs)(copy.deepcopy(rows))
        _assert_same_batch(ours, theirs)
        return ours

    rows = _vision_rows(conversational)
    batch = both(dpo_trainer.DataCollatorForVisionPreference, trl_dpo.DataCollatorForVisionPreference, rows)
    assert batch["input_ids"].size(0) == 4 and batch["pixel_values"].size(0) == 4  # chosen rows, then rejected
    assert (batch["completion_mask"] <= batch["attention_mask"]).all()
    unpaired = [
        {"images": r["images"], "prompt": r["prompt"], "completion": r["chosen"], "label": i == 0}
        for i, r in enumerate(rows)
    ]
    for kl in (True, False):
        batch = both(
            kto_trainer.DataCollatorForVisionUnpairedPreference,
            trl_kto.DataCollatorForVisionUnpairedPreference,
            unpaired,
            calculate_kl=kl,
        )
        assert ("KL_input_ids" in batch) is kl and batch["label"].tolist() == [True, False]
    completions = [{k: v for k, v in r.items() if k != "label"} for r in unpaired]
    for completion_only_loss in (True, False):
        both(
            sft_trainer.DataCollatorForVisionLanguageModeling,
            trl_sft.DataCollatorForVisionLanguageModeling,
            completions,
            completion_only_loss=completion_only_loss,
        )
    text_rows = [{"images": r["images"], "text": "<image> a square"} for r in rows]
    both(sft_trainer.DataCollatorForVisionLanguageModeling, trl_sft.DataCollatorForVisionLanguageModeling, text_rows)


def test_vision_collators_refuse_pad_to_multiple_of(vision_processor) -> None:
    from llm_trainer.trainer.dpo_trainer import DataCollatorForVisionPreference

    with pytest.raises(NotImplementedError, match="pad_to_multiple_of"):
        DataCollatorForVisionPreference(vision_processor, pad_to_multiple_of=8)(_vision_rows(False))
