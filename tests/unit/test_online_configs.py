"""`GRPOConfig` and `RLOOConfig` against TRL 1.16's: the same fields, defaults, derived values and errors."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import trl
from transformers import HfArgumentParser

from llm_trainer.trainer.grpo_config import GRPOConfig
from llm_trainer.trainer.online_config import OnlineRLConfig
from llm_trainer.trainer.rloo_config import RLOOConfig

PAIRS = [(GRPOConfig, trl.GRPOConfig), (RLOOConfig, trl.RLOOConfig)]
IDS = ["grpo", "rloo"]

# `to_dict()` keys whose values may legitimately differ from TRL's. None today: with `use_cpu=True`, our `bf16=None`
# resolves to True exactly like TRL's (they differ only where bf16 cannot run, where TRL raises and we choose False).
ALLOWED_DIFFERENCES: set[str] = set()


def build(config_cls, tmp_path, **kwargs):
    return config_cls(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)


def assert_same_dict(ours, theirs) -> None:
    """Every key of TRL's `to_dict()` is in ours, with an equal value (except the allowlist)."""
    a, b = ours.to_dict(), theirs.to_dict()
    assert set(b) <= set(a), f"fields missing from ours: {sorted(set(b) - set(a))}"
    diffs = {key: (a[key], b[key]) for key in b if key not in ALLOWED_DIFFERENCES and a[key] != b[key]}
    assert not diffs, f"values differ (ours, TRL): {diffs}"


# llm_trainer's own fields (performance switches TRL does not have); every other field is TRL's.
OUR_EXTRAS = {
    "fast_generation",
    "generation_compact_finished",
    "packed_forward",
    "max_tokens_per_batch",
    "freeze_vision_tower",
}


def field_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=IDS)
def test_same_fields_types_and_declared_defaults(ours, theirs):
    our_fields = {f.name: f for f in dataclasses.fields(ours)}
    their_fields = {f.name: f for f in dataclasses.fields(theirs)}
    assert set(our_fields) - OUR_EXTRAS == set(their_fields), (set(our_fields) - OUR_EXTRAS) ^ set(their_fields)
    assert OUR_EXTRAS <= set(our_fields) and all(our_fields[name].metadata.get("help") for name in OUR_EXTRAS)
    our_types, their_types = typing.get_type_hints(ours), typing.get_type_hints(theirs)
    for name, their_field in their_fields.items():
        assert field_default(our_fields[name]) == field_default(their_field), name
        assert our_types[name] == their_types[name], name
        assert our_fields[name].metadata.get("help"), f"{name} has no help"


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=IDS)
def test_defaults_after_post_init_match_trl(ours, theirs, tmp_path):
    config = build(ours, tmp_path)
    assert_same_dict(config, build(theirs, tmp_path))
    # The resolved generation batch: one optimizer step's worth, generated once per step.
    assert (config.steps_per_generation, config.generation_batch_size) == (1, 8)
    assert config.epsilon_high is None  # TRL keeps None in the config; the trainer reads it as `epsilon`


GRPO_CASES = {
    "generation_batch_size": dict(per_device_train_batch_size=4, generation_batch_size=16),
    "steps_per_generation": dict(per_device_train_batch_size=8, steps_per_generation=3),
    "gradient_accumulation": dict(per_device_train_batch_size=4, gradient_accumulation_steps=4),
    "epsilon_high": dict(epsilon=0.1, epsilon_high=0.28),
    "scale_rewards_true": dict(scale_rewards=True),
    "scale_rewards_false": dict(scale_rewards=False),
    "scale_rewards_batch": dict(scale_rewards="batch"),
    "loss_and_sampling": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, num_iterations=2),
    "paged_deprecated": dict(use_transformers_paged=True),
    "cap_deprecated": dict(vllm_importance_sampling_cap=2.0),
    "truncate_mode": dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_min=0.5),
    "pad_from_cli": dict(pad_to_multiple_of="8"),
    "pad_none_from_cli": dict(pad_to_multiple_of="none"),
    "json_kwargs": dict(generation_kwargs='{"max_new_tokens": 4}', chat_template_kwargs='{"enable_thinking": false}'),
    "eval": dict(eval_strategy="steps", per_device_eval_batch_size=16, num_generations_eval=4),
    "hub_repo": dict(log_completions=True, log_completions_hub_repo="me/completions"),
}
RLOO_CASES = {
    "generation_batch_size": dict(per_device_train_batch_size=2, generation_batch_size=6),
    "steps_per_generation": dict(per_device_train_batch_size=4, steps_per_generation=2, num_generations=4),
    "rloo_fields": dict(beta=0.0, normalize_advantages=True, reward_clip_range=(-1.0, 1.0), reward_weights=[1.0, 0.5]),
    "paged_deprecated": dict(use_transformers_paged=True),
}


@pytest.mark.parametrize(
    ("ours", "theirs", "kwargs"),
    [(GRPOConfig, trl.GRPOConfig, kw) for kw in GRPO_CASES.values()]
    + [(RLOOConfig, trl.RLOOConfig, kw) for kw in RLOO_CASES.values()],
    ids=[f"grpo-{name}" for name in GRPO_CASES] + [f"rloo-{name}" for name in RLOO_CASES],
)
def test_non_default_constructions_match_trl(ours, theirs, kwargs, tmp_path):
    assert_same_dict(build(ours, tmp_path, **kwargs), build(theirs, tmp_path, **kwargs))


def test_derived_values(tmp_path):
    config = build(GRPOConfig, tmp_path, per_device_train_batch_size=4, generation_batch_size=16)
    assert config.steps_per_generation == 4
    config = build(GRPOConfig, tmp_path, per_device_train_batch_size=8, steps_per_generation=3)
    assert config.generation_batch_size == 24
    assert build(GRPOConfig, tmp_path, scale_rewards=True).scale_rewards == "group"
    assert build(GRPOConfig, tmp_path, scale_rewards="False").scale_rewards == "none"  # CLI spelling
    with pytest.warns(FutureWarning, match="use_transformers_continuous_batching"):
        assert build(RLOOConfig, tmp_path, use_transformers_paged=True).use_transformers_continuous_batching
    with pytest.warns(FutureWarning, match="vllm_importance_sampling_clip_max"):
        assert build(GRPOConfig, tmp_path, vllm_importance_sampling_cap=2.0).vllm_importance_sampling_clip_max == 2.0
    assert build(GRPOConfig, tmp_path, generation_kwargs='{"top_k": 5}').generation_kwargs == {"top_k": 5}


# Invalid settings that TRL's config rejects too: both must raise ValueError, ours with the given message.
SHARED_ERRORS = {
    "both_batch_settings": (dict(generation_batch_size=8, steps_per_generation=1), "give only one"),
    "gbs_not_multiple_of_global_batch": (
        dict(per_device_train_batch_size=4, generation_batch_size=10, num_generations=2),
        "divisible by the global batch",
    ),
    "gbs_not_multiple_of_num_generations": (
        dict(per_device_train_batch_size=4, steps_per_generation=3, num_generations=8),
        r"divisible by num_generations \(8\)",
    ),
    "one_generation": (dict(num_generations=1), "at least 2 generations"),
    "eval_batch": (
        dict(eval_strategy="steps", per_device_eval_batch_size=6, num_generations=4),
        "global eval batch size",
    ),
    "auto_find_batch_size": (dict(auto_find_batch_size=True), "auto_find_batch_size"),
}
GRPO_ERRORS = {
    "hub_repo_without_logging": (dict(log_completions_hub_repo="me/completions"), "log_completions=True"),
    "clip_min_above_max": (dict(vllm_importance_sampling_clip_min=3.0), "must be less than"),
    "truncate_without_bounds": (
        dict(vllm_importance_sampling_mode="sequence_truncate", vllm_importance_sampling_clip_max=None),
        "clip_min` or `vllm_importance_sampling_clip_max",
    ),
}


@pytest.mark.parametrize(
    ("ours", "theirs", "kwargs", "message"),
    [(ours, theirs, *case) for ours, theirs in PAIRS for case in SHARED_ERRORS.values()]
    + [(GRPOConfig, trl.GRPOConfig, *case) for case in GRPO_ERRORS.values()],
    ids=[f"{algo}-{name}" for algo in IDS for name in SHARED_ERRORS] + [f"grpo-{name}" for name in GRPO_ERRORS],
)
def test_errors_match_trl(ours, theirs, kwargs, message, tmp_path):
    with pytest.raises(ValueError):
        build(theirs, tmp_path, **kwargs)
    with pytest.raises(ValueError, match=message):
        build(ours, tmp_path, **kwargs)


# Settings TRL only rejects later (in the trainer, or at the first step); we reject them when the config is built.
@pytest.mark.parametrize(
    ("config_cls", "kwargs", "message"),
    [
        (GRPOConfig, dict(loss_type="ppo"), "`loss_type` must be one of"),
        (GRPOConfig, dict(scale_rewards="std"), "`scale_rewards` must be one of"),
        (GRPOConfig, dict(importance_sampling_level="batch"), "`importance_sampling_level` must be one of"),
        (GRPOConfig, dict(multi_objective_aggregation="max"), "`multi_objective_aggregation` must be one of"),
        (GRPOConfig, dict(vllm_importance_sampling_mode="token"), "`vllm_importance_sampling_mode` must be one of"),
        (GRPOConfig, dict(top_entropy_quantile=1.5), r"`top_entropy_quantile` must lie in \[0, 1\]"),
        (GRPOConfig, dict(loss_type="vespo", use_vllm=True), "token_truncate"),
        (GRPOConfig, dict(num_generations=0), "at least 2 generations"),
        (RLOOConfig, dict(vllm_mode="remote"), "`vllm_mode` must be one of"),
        (RLOOConfig, dict(reward_clip_range=(1.0, -1.0)), "min <= max"),
        (RLOOConfig, dict(reward_clip_range="-1"), r"\(min, max\) pair"),
        (
            GRPOConfig,
            dict(max_tokens_per_batch=0),
            "`max_tokens_per_batch=0` is invalid.*None runs whole micro-batches",
        ),
        (RLOOConfig, dict(max_tokens_per_batch=-5), "`max_tokens_per_batch=-5` is invalid"),
    ],
)
def test_early_errors(config_cls, kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build(config_cls, tmp_path, **kwargs)


def test_grpo_warns_about_mismatched_loss_and_sampling_level(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="llm_trainer.trainer.grpo_config"):
        build(GRPOConfig, tmp_path, loss_type="dapo", importance_sampling_level="sequence")
    assert "weights each sequence by its completion length" in caplog.text


def test_shared_fields_live_in_the_base():
    base = {f.name for f in dataclasses.fields(OnlineRLConfig)}
    assert {"num_generations", "use_vllm", "generation_batch_size", "reward_weights", "log_completions"} <= base
    for config_cls in (GRPOConfig, RLOOConfig):
        assert issubclass(config_cls, OnlineRLConfig)
    only_rloo = {f.name for f in dataclasses.fields(RLOOConfig)} - base
    assert only_rloo == {"normalize_advantages", "reward_clip_range"}


def test_cli_parsing(tmp_path):
    args = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]
    (config,) = HfArgumentParser(GRPOConfig).parse_args_into_dataclasses(
        args
        + ["--reward_weights", "1.0", "2.0", "--num_generations", "4", "--scale_rewards", "false"]
        + ["--loss_type", "dr_grpo", "--generation_kwargs", '{"max_new_tokens": 3}', "--epsilon_high", "0.28"]
    )
    assert isinstance(config, GRPOConfig)
    assert config.reward_weights == [1.0, 2.0]
    assert (config.num_generations, config.scale_rewards, config.loss_type) == (4, "none", "dr_grpo")
    assert config.generation_kwargs == {"max_new_tokens": 3}
    assert config.epsilon_high == 0.28
    with pytest.raises(SystemExit):  # argparse rejects a value outside the declared choices
        HfArgumentParser(GRPOConfig).parse_args_into_dataclasses(args + ["--loss_type", "ppo"])

    (config,) = HfArgumentParser(RLOOConfig).parse_args_into_dataclasses(
        args + ["--num_generations", "4", "--per_device_train_batch_size", "4", "--normalize_advantages", "true"]
    )
    assert (config.num_generations, config.normalize_advantages, config.beta) == (4, True, 0.05)


@pytest.mark.parametrize("config_cls", [GRPOConfig, RLOOConfig])
def test_cli_help_renders(config_cls):
    assert "--num_generations" in HfArgumentParser(config_cls).format_help()
