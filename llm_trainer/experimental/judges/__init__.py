"""The judges at TRL's later path, `trl.experimental.judges` (TRL removed them in 2026); same objects as `llm_trainer.judges`."""

from ...judges import (
    AllTrueJudge,
    BaseBinaryJudge,
    BaseJudge,
    BasePairwiseJudge,
    BaseRankJudge,
    HfPairwiseJudge,
    OpenAIPairwiseJudge,
    PairRMJudge,
)

__all__ = [
    "AllTrueJudge",
    "BaseBinaryJudge",
    "BaseJudge",
    "BasePairwiseJudge",
    "BaseRankJudge",
    "HfPairwiseJudge",
    "OpenAIPairwiseJudge",
    "PairRMJudge",
]
