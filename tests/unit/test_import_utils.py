"""`llm_trainer.import_utils` answers TRL's `is_*_available` questions as TRL does."""

from __future__ import annotations

import importlib.metadata
import warnings

import pytest
import trl.import_utils as trl_import_utils

from llm_trainer import import_utils

CHECKS = sorted(name for name in dir(trl_import_utils) if name.startswith("is_") and name.endswith("_available"))


def test_has_every_public_name_of_trl():
    public = {name for name in dir(trl_import_utils) if not name.startswith("_")}
    ours = set(dir(import_utils))
    # names TRL merely imports (modules, typing helpers) are not part of its surface
    defined = {
        name
        for name in public
        if getattr(getattr(trl_import_utils, name), "__module__", None) == trl_import_utils.__name__
    }
    assert defined | {"LIGER_KERNEL_MIN_VERSION", "PACKAGE_DISTRIBUTION_MAPPING"} <= ours


@pytest.mark.parametrize("name", CHECKS)
def test_same_answers_as_trl(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's vLLM range warning, when vLLM is installed
        assert getattr(import_utils, name)() == getattr(trl_import_utils, name)()


def test_package_presence_and_versions():
    assert import_utils._is_package_available("torch") is True
    assert import_utils._is_package_available("no_such_package_xyz") is False
    assert import_utils._is_package_available("no_such_package_xyz", return_version=True) == (False, "N/A")
    found, version = import_utils._is_package_available("transformers", return_version=True)
    assert found and version == importlib.metadata.version("transformers")
    # a dotted name whose parent is missing is simply absent, not an error
    assert import_utils._is_package_available("no_such_package_xyz.sub") is False


def test_minimum_versions(monkeypatch):
    versions = {"liger_kernel": (True, "0.8.1"), "vllm": (True, "0.25.0+cu129")}
    monkeypatch.setattr(import_utils, "_is_package_available", lambda name, return_version=False: versions[name])
    assert import_utils.is_liger_kernel_available() is False  # below TRL's 0.8.2 minimum
    assert import_utils.is_liger_kernel_available(min_version="0.8.0") is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the supported range: no warning
        assert import_utils.is_vllm_available() is True
        assert import_utils.is_vllm_available(min_version="0.26.0") is False
    versions["vllm"] = (True, "0.40.0")
    with pytest.warns(UserWarning, match="supports vLLM versions from 0.22.0 to 0.31.0"):
        assert import_utils.is_vllm_available() is True


def test_experimental_warning_can_be_suppressed():
    assert issubclass(import_utils.TRLExperimentalWarning, UserWarning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with import_utils.suppress_experimental_warning():
            warnings.warn("hidden", import_utils.TRLExperimentalWarning, stacklevel=1)
        warnings.warn("shown", import_utils.TRLExperimentalWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["shown"]
