"""Trainers and their configs, at TRL's module paths (`llm_trainer.trainer.sft_trainer`, ...)."""

from .._lazy import lazy_exports

_EXPORTS = {
    "sft_config": ["SFTConfig"],
    "sft_trainer": ["SFTTrainer"],
    "reward_config": ["RewardConfig"],
    "reward_trainer": ["RewardTrainer"],
    "orpo_config": ["ORPOConfig"],
    "orpo_trainer": ["ORPOTrainer"],
    "cpo_config": ["CPOConfig"],
    "cpo_trainer": ["CPOTrainer"],
    "dpo_config": ["DPOConfig"],
    "dpo_trainer": ["DPOTrainer"],
    "kto_config": ["KTOConfig"],
    "kto_trainer": ["KTOTrainer"],
    "bco_config": ["BCOConfig"],
    "bco_trainer": ["BCOTrainer"],
    "prm_config": ["PRMConfig"],
    "prm_trainer": ["PRMTrainer"],
    "grpo_config": ["GRPOConfig"],
    "grpo_trainer": ["GRPOTrainer"],
    "rloo_config": ["RLOOConfig"],
    "rloo_trainer": ["RLOOTrainer"],
    "online_dpo_config": ["OnlineDPOConfig"],
    "online_dpo_trainer": ["OnlineDPOTrainer"],
    "ppo_config": ["PPOConfig"],
    "ppo_trainer": ["PPOTrainer"],
    "distillation_config": ["DistillationConfig"],
    "distillation_trainer": ["DistillationTrainer"],
    "teacher_grpo_config": ["TeacherGRPOConfig"],
    "teacher_grpo_trainer": ["TeacherGRPOTrainer"],
    "callbacks": [
        "BEMACallback",
        "LogCompletionsCallback",
        "MergeModelCallback",
        "RichProgressCallback",
        "SyncRefModelCallback",
        "WeaveCallback",
        "WinRateCallback",
    ],
    "model_config": ["ModelConfig"],
    "utils": [
        "add_fused_lm_head",
        "disable_dropout_in_model",
        "ensure_master_addr_port",
        "get_peft_config",
        "get_quantization_config",
    ],
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
