"""The asynchronous RL engine: rollout workers fill a trajectory pool while a trainer consumes it, and a weight-sync
controller bounds how stale the generators' weights (and so the samples) may be.

    PromptSource ─▶ RolloutWorker threads ──HTTP──▶ generation server(s)
                      │ score (reward errors: drop + count)      ▲ weights, versioned
                      ▼                                         │
    TrajectoryPool / GroupedTrajectoryPool ──▶ AsyncTrainer.run() ──▶ WeightSyncController.on_train_step

`AsyncGRPOTrainer` (TRL's API), `SelfHostedGrpoTrainer` and the remote-service trainers are built on these pieces;
the GRPO batch preparation they share is `prepare_grpo_batch`.
"""

from .grpo import DEFAULT_IMPORTANCE_SAMPLING, importance_sampling_ratio, pad_trajectories, prepare_grpo_batch
from .pool import GroupedTrajectoryPool, PoolClosed, TrajectoryPool
from .rollout_worker import PromptSource, RolloutWorker, reward_scorer
from .self_hosted import SelfHostedGrpoTrainer
from .trainer_base import AsyncTrainer, PromptsExhausted
from .trajectory import Trajectory
from .weight_sync import SYNC_MODES, GenerationPublisher, WeightPublisher, WeightSnapshot, WeightSyncController

__all__ = [
    "AsyncTrainer",
    "DEFAULT_IMPORTANCE_SAMPLING",
    "SYNC_MODES",
    "GenerationPublisher",
    "GroupedTrajectoryPool",
    "PoolClosed",
    "PromptSource",
    "PromptsExhausted",
    "RolloutWorker",
    "SelfHostedGrpoTrainer",
    "Trajectory",
    "TrajectoryPool",
    "WeightPublisher",
    "WeightSnapshot",
    "WeightSyncController",
    "importance_sampling_ratio",
    "pad_trajectories",
    "prepare_grpo_batch",
    "reward_scorer",
]
