"""llm_trainer: post-training for language models, a drop-in replacement for TRL.

`from trl import SFTTrainer` becomes `from llm_trainer import SFTTrainer`; every public name is imported lazily.
"""

from importlib.metadata import PackageNotFoundError, version

from . import data as _data  # lazy: lists its names without importing `datasets`
from ._lazy import lazy_exports

try:
    __version__ = version("llm-trainer")
except PackageNotFoundError:  # running from a source checkout
    __version__ = "0.0.0.dev0"

_EXPORTS = {
    "api": ["TrainResult", "create_trainer", "get_algorithm", "list_algorithms", "register_algorithm", "train"],
    # TRL's top-level data helpers: those of `llm_trainer.data`, less two helpers of our own
    "data_utils": [name for name in _data.__all__ if name not in ("common_prefix_length", "get_dataset_column_names")],
    "trainer": [
        "SFTConfig",
        "SFTTrainer",
        "RewardConfig",
        "RewardTrainer",
        "ORPOConfig",
        "ORPOTrainer",
        "CPOConfig",
        "CPOTrainer",
        "DPOConfig",
        "DPOTrainer",
        "KTOConfig",
        "KTOTrainer",
        "BCOConfig",
        "BCOTrainer",
        "PRMConfig",
        "PRMTrainer",
        "GRPOConfig",
        "GRPOTrainer",
        "AsyncGRPOConfig",
        "AsyncGRPOTrainer",
        "RLOOConfig",
        "RLOOTrainer",
        "OnlineDPOConfig",
        "OnlineDPOTrainer",
        "XPOConfig",
        "XPOTrainer",
        "NashMDConfig",
        "NashMDTrainer",
        "PPOConfig",
        "PPOTrainer",
        "TeacherGRPOConfig",
        "TeacherGRPOTrainer",
        "DistillationConfig",
        "DistillationTrainer",
        "GKDConfig",
        "GKDTrainer",
    ],
    "chat_template_utils": [
        "add_response_schema",
        "clone_chat_template",
        "get_training_chat_template",
        "supports_tool_calling",
    ],
    "callbacks": ["Callback"],
    "trainer.callbacks": [
        "BEMACallback",
        "LogCompletionsCallback",
        "MergeModelCallback",
        "RichProgressCallback",
        "SyncRefModelCallback",
        "WeaveCallback",
        "WinRateCallback",
    ],
    "modeling": ["create_reference_model"],
    "judges": [
        "AllTrueJudge",
        "BaseBinaryJudge",
        "BaseJudge",
        "BasePairwiseJudge",
        "BaseRankJudge",
        "HfPairwiseJudge",
        "OpenAIPairwiseJudge",
        "PairRMJudge",
    ],
    "scripts.utils": ["DatasetMixtureConfig", "ScriptArguments", "TrlParser", "get_dataset", "init_zero_verbose"],
    "trainer.model_config": ["ModelConfig"],
    "trainer.utils": ["get_kbit_device_map", "get_peft_config", "get_quantization_config"],
    "trainer.simple": ["TrainingResult"],
}

# The submodules `trl` lists among its public names
_SUBMODULES = ["chat_template_utils", "data_utils", "models", "scripts", "trainer"]

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, submodules=_SUBMODULES)
