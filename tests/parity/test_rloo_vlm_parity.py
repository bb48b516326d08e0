"""RLOOTrainer parity with TRL 1.16 on vision-language models (Qwen2-VL and LLaVA stand-ins, zen-image prompts):
see `test_grpo_vlm_parity` for the set-up."""

from __future__ import annotations

import pytest

from .test_grpo_vlm_parity import FAMILIES, _assert_parity, vlm_paths  # noqa: F401 - the fixture

trl = pytest.importorskip("trl")


@pytest.mark.parametrize("family", FAMILIES)
def test_rloo_vlm_matches_trl(family, vlm_paths, tmp_path):  # noqa: F811
    _assert_parity("RLOO", family, vlm_paths, tmp_path, num_generations=2, gradient_accumulation_steps=2)
