"""Remote training: a Tinker-style client (`ServiceClient`, `TrainingClient`, `SamplingClient`) of the
`llm-trainer train-serve` service, its data types, and trainers that drive it from a rollout loop.

The service hosts the model and optimizer; the client only builds `Datum`s and reads back log-probs and metrics, so a
training loop can run on a machine without the GPUs. See `llm_trainer.remote.service` for the routes.
"""

from __future__ import annotations

from typing import Any

from .client import SamplingClient, ServiceClient, TrainingClient
from .types import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ModelInput,
    OptimStepResponse,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    SaveWeightsResponse,
    TensorData,
)

_TRAINERS = ("RemoteApiTrainer", "RemoteApiGrpoTrainer", "RemoteApiCrossEntropyTrainer", "SamplerPublisher")

__all__ = [
    "AdamParams",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "ModelInput",
    "OptimStepResponse",
    "SampleResponse",
    "SampledSequence",
    "SamplingClient",
    "SamplingParams",
    "SaveWeightsResponse",
    "ServiceClient",
    "TensorData",
    "TrainingClient",
    *_TRAINERS,
]


def __getattr__(name: str) -> Any:  # the trainers import the async engine: load them on first use
    if name in _TRAINERS:
        from . import trainers

        return getattr(trainers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
