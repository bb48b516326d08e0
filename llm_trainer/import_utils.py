"""Which optional packages are installed, at TRL's import path (`trl.import_utils`).

Each `is_<package>_available()` answers whether the package can be imported (found on the path, without importing
it); `is_liger_kernel_available` and `is_vllm_available` also take a minimum version. Test suites and scripts written
for TRL gate optional features on these, so the names and answers match TRL's.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from packaging.version import Version

LIGER_KERNEL_MIN_VERSION = "0.8.2"
# The vLLM releases TRL 1.16 is tested against; others still work but warn.
VLLM_SUPPORTED_RANGE = ("0.22.0", "0.31.0")
PACKAGE_DISTRIBUTION_MAPPING = importlib.metadata.packages_distributions()


def _installed_version(pkg_name: str) -> str:
    """The version of the distribution providing import name `pkg_name` (`"N/A"` if it declares none)."""
    distributions = PACKAGE_DISTRIBUTION_MAPPING.get(pkg_name, [])
    # Import and distribution names differ (PIL / pillow); prefer the distribution named like the import.
    preferred = [d for d in (pkg_name.replace("_", "-"), pkg_name) if d in distributions]
    for distribution in preferred or distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    # No metadata (e.g. a source checkout on the path): the module's own `__version__`.
    return getattr(importlib.import_module(pkg_name), "__version__", "N/A")


def _is_package_available(pkg_name: str, return_version: bool = False) -> tuple[bool, str] | bool:
    """Whether `pkg_name` is importable, and with `return_version=True` also its version (`"N/A"` when absent)."""
    try:
        found = importlib.util.find_spec(pkg_name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module with no spec
        found = False
    if not return_version:
        return found
    return found, _installed_version(pkg_name) if found else "N/A"


def _at_least(pkg_name: str, min_version: str | None) -> bool:
    found, installed = _is_package_available(pkg_name, return_version=True)
    if not found or min_version is None:
        return found
    try:
        return Version(installed) >= Version(min_version)
    except ValueError:  # an unparsable version ("N/A"): cannot vouch for it
        return False


def _availability_check(pkg_name: str) -> Callable[[], bool]:
    """TRL's `is_<pkg_name>_available()`: whether `pkg_name` can be imported (found on the path, not imported)."""

    def is_available() -> bool:
        return _is_package_available(pkg_name)

    is_available.__name__ = is_available.__qualname__ = f"is_{pkg_name}_available"
    is_available.__doc__ = f"Whether `{pkg_name}` is installed."
    return is_available


is_aiohttp_available = _availability_check("aiohttp")
is_deepspeed_available = _availability_check("deepspeed")
is_harbor_available = _availability_check("harbor")
is_jmespath_available = _availability_check("jmespath")
is_math_verify_available = _availability_check("math_verify")
is_mergekit_available = _availability_check("mergekit")
is_openreward_available = _availability_check("openreward")
is_requests_available = _availability_check("requests")
is_unsloth_available = _availability_check("unsloth")
is_weave_available = _availability_check("weave")


def is_liger_kernel_available(min_version: str = LIGER_KERNEL_MIN_VERSION) -> bool:
    """Whether Liger kernels of at least `min_version` are installed."""
    return _at_least("liger_kernel", min_version)


def is_vllm_available(min_version: str | None = None) -> bool:
    """Whether vLLM (of at least `min_version`, if given) is installed; warns outside the tested release range."""
    found, installed = _is_package_available("vllm", return_version=True)
    if not found:
        return False
    try:
        release = Version(Version(installed).base_version)  # drop local tags such as "+cu129"
    except ValueError:
        return min_version is None
    low, high = VLLM_SUPPORTED_RANGE
    if not Version(low) <= release <= Version(high):
        warnings.warn(
            f"TRL currently supports vLLM versions from {low} to {high}; you have {installed}. Other versions may "
            "not work with the vLLM back ends.",
            stacklevel=2,
        )
    return min_version is None or Version(installed) >= Version(min_version)


class TRLExperimentalWarning(UserWarning):
    """Emitted on importing an experimental (`trl.experimental`) API, whose interface may change."""


@contextmanager
def suppress_warning(category: type[Warning]) -> Iterator[None]:
    """Silence warnings of `category` inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=category)
        yield


def suppress_experimental_warning():
    """Silence `TRLExperimentalWarning` inside the block."""
    return suppress_warning(TRLExperimentalWarning)
