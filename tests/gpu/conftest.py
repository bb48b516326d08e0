"""The GPU suite: every test here is marked `gpu` and needs a CUDA device.

Without CUDA every test is skipped at collection (the modules import nothing heavy at import time, so a CPU run of
`python -m pytest -q` passes through in a second). Under CI (`CI` set) they are deselected unless asked for with
`-m gpu`. Run them with `python -m pytest -q tests/gpu` or `bash benchmarks/gpu.sh` on a GPU machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (tests/gpu; skipped without one)")


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "needs a CUDA device (the GPU suite; see benchmarks/gpu.sh)"
    return None


@pytest.hookimpl(tryfirst=True)  # mark before `-m gpu` selects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if HERE in Path(str(item.fspath)).resolve().parents]
    if not ours:
        return
    asked = "gpu" in (config.getoption("markexpr", "") or "")
    if os.environ.get("CI") and not asked:
        config.hook.pytest_deselected(items=ours)
        deselected = {id(item) for item in ours}
        items[:] = [item for item in items if id(item) not in deselected]
        return
    reason = _cuda_reason()
    for item in ours:
        item.add_marker(pytest.mark.gpu)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


# A Qwen2.5-0.5B-shaped model with fewer layers (about 0.2B parameters), built locally with random weights (no Hub).
SMALL_QWEN2 = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "num_hidden_layers": 4,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Folder of a small real-architecture (Qwen2) causal LM and the shipped tokenizer, loadable offline."""
    from llm_trainer.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("small_qwen2") / "model", **SMALL_QWEN2)
