"""Generation for online RL: one `Generator` interface, three back ends, and `llm-trainer vllm-serve`.

- `TransformersGenerator`: the policy's own `generate` (the default, `use_vllm=False`).
- `VLLMColocateGenerator`: a vLLM engine inside each training process (`use_vllm=True, vllm_mode="colocate"`).
- `VLLMServerGenerator`: a separate `llm-trainer vllm-serve` server, over HTTP (`vllm_mode="server"`).

`make_generator(args, model, processing_class)` picks one from a GRPO/RLOO config. Nothing imports vLLM until a
vLLM back end is built.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "base": ["GenerationResult", "Generator", "SamplingConfig", "VisionInputs"],
    "factory": ["make_generator"],
    "remote": ["GenerationClient", "VLLMServerGenerator"],
    "transformers_backend": ["TransformersGenerator"],
    "vllm_backend": ["VLLMColocateGenerator"],
    "weights": ["iter_named_weights"],
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
