"""`MergeModelCallback` and `MergeConfig` at TRL's path, `trl.experimental.merge_model_callback`."""

from ..trainer.callbacks import MergeConfig, MergeModelCallback, merge_models, upload_model_to_hf

__all__ = ["MergeConfig", "MergeModelCallback", "merge_models", "upload_model_to_hf"]
