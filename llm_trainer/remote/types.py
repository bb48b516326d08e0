"""The data the remote training service and its client exchange, with Tinker's names.

Everything converts to and from plain JSON (`to_json` / `from_json`): tensors travel as flat lists with a dtype and
a shape, so the client needs neither torch nor numpy to build requests (both are accepted when present).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

_DTYPES = ("int64", "float32")


@dataclass
class TensorData:
    """A tensor as a flat list of numbers with its `dtype` ("int64" or "float32") and `shape`."""

    data: list[float] | list[int]
    dtype: str = "float32"
    shape: list[int] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"TensorData.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        self.data = list(self.data)
        if self.shape is None:
            self.shape = [len(self.data)]

    @classmethod
    def from_torch(cls, tensor: Any) -> TensorData:
        """From a torch tensor (integer tensors become int64, the rest float32)."""
        dtype = "float32" if tensor.is_floating_point() else "int64"
        return cls(tensor.detach().cpu().reshape(-1).tolist(), dtype, list(tensor.shape))

    @classmethod
    def from_numpy(cls, array: Any) -> TensorData:
        """From a numpy array (integer arrays become int64, the rest float32)."""
        dtype = "int64" if array.dtype.kind in "iub" else "float32"
        return cls(array.reshape(-1).tolist(), dtype, list(array.shape))

    @classmethod
    def coerce(cls, value: Any) -> TensorData:
        """A TensorData from a TensorData, torch tensor, numpy array or (flat) list of numbers."""
        if isinstance(value, TensorData):
            return value
        if hasattr(value, "detach"):
            return cls.from_torch(value)
        if hasattr(value, "dtype") and hasattr(value, "reshape"):
            return cls.from_numpy(value)
        if isinstance(value, (list, tuple)):
            values = list(value)
            integral = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            return cls(values, "int64" if values and integral else "float32")
        raise TypeError(f"expected a TensorData, tensor, array or list of numbers, got {type(value).__name__}")

    def to_torch(self):
        """As a torch tensor of `shape`."""
        import torch

        dtype = torch.int64 if self.dtype == "int64" else torch.float32
        return torch.tensor(self.data, dtype=dtype).reshape(self.shape)

    def tolist(self) -> list:
        return list(self.data)

    def to_json(self) -> dict:
        return {"data": self.data, "dtype": self.dtype, "shape": self.shape}

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> TensorData:
        return cls(payload["data"], payload.get("dtype", "float32"), payload.get("shape"))


@dataclass
class EncodedTextChunk:
    """A run of token ids."""

    tokens: list[int]
    type: str = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class ModelInput:
    """The tokens a model reads, as a list of chunks (text only here: one `EncodedTextChunk` per run)."""

    chunks: list[EncodedTextChunk] = field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> ModelInput:
        return cls([EncodedTextChunk([int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls([])

    def to_ints(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append_int(self, token: int) -> ModelInput:
        """A new ModelInput with `token` appended."""
        return ModelInput.from_ints([*self.to_ints(), int(token)])

    def to_json(self) -> dict:
        return {"chunks": [{"type": c.type, "tokens": c.tokens} for c in self.chunks]}

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> ModelInput:
        return cls([EncodedTextChunk(list(c["tokens"]), c.get("type", "encoded_text")) for c in payload["chunks"]])


@dataclass
class Datum:
    """One training example: the tokens read (`model_input`) and per-target-token loss inputs.

    `loss_fn_inputs["target_tokens"][t]` is the token predicted after reading `model_input[: t + 1]` (so for a
    sequence `s`, `model_input = s[:-1]` and `target_tokens = s[1:]`); the other inputs (`weights`, `logprobs`,
    `advantages`) are aligned with it. Values may be TensorData, torch tensors, numpy arrays or lists.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.loss_fn_inputs = {name: TensorData.coerce(value) for name, value in self.loss_fn_inputs.items()}

    def to_json(self) -> dict:
        return {
            "model_input": self.model_input.to_json(),
            "loss_fn_inputs": {name: value.to_json() for name, value in self.loss_fn_inputs.items()},
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> Datum:
        inputs = {name: TensorData.from_json(value) for name, value in payload.get("loss_fn_inputs", {}).items()}
        return cls(ModelInput.from_json(payload["model_input"]), inputs)


@dataclass
class AdamParams:
    """AdamW settings of one `optim_step` (Tinker's defaults). `grad_clip_norm` > 0 clips the global gradient norm
    first (as `max_grad_norm` in the local trainers); 0 disables it."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SamplingParams:
    """How `SamplingClient.sample` samples: `temperature` 0 is greedy, `top_k` 0 and `top_p` 1 disable those filters;
    `seed` makes a request reproducible; `stop` lists extra token ids that end a sequence."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[int] | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ForwardBackwardOutput:
    """What `forward` / `forward_backward` return: per datum, the target tokens' `logprobs` (TensorData) under the
    weights before the update; and `metrics` (`loss:sum`, the summed loss)."""

    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> ForwardBackwardOutput:
        outputs = [{k: TensorData.from_json(v) for k, v in out.items()} for out in payload["loss_fn_outputs"]]
        return cls(outputs, dict(payload.get("metrics", {})))


@dataclass
class OptimStepResponse:
    """The step count after an `optim_step` and its metrics (`grad_norm`: the norm before clipping)."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SampledSequence:
    """One sampled continuation: its `tokens`, their sampling `logprobs`, and why it stopped ("stop" or "length")."""

    tokens: list[int]
    logprobs: list[float] | None
    stop_reason: str


@dataclass
class SampleResponse:
    sequences: list[SampledSequence]


@dataclass
class SaveWeightsResponse:
    """`path` names saved weights: pass it to `ServiceClient.create_sampling_client(model_path=...)` or
    `TrainingClient.load_state`."""

    path: str
