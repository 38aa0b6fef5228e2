"""lin_probe: is your network still training like a linear model on its inputs?

Re-exports the public API and nothing else; the subpackages say where each piece lives. Names are
resolved on first use (PEP 562), so ``import lin_probe.ntk`` or the Lightning-free core never
imports pytorch_lightning; ``from lin_probe import LinearRegimeMonitor`` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AffineKernel": "lin_probe.kernel",
    "fit_affine_kernel": "lin_probe.kernel",
    "two_layer_coefficients": "lin_probe.kernel",
    "empirical_ntk": "lin_probe.ntk",
    "spectral_norm": "lin_probe.linalg",
    "LinearShadow": "lin_probe.shadows.linear",
    "RegimeProbe": "lin_probe.monitor.core",
    "ComputePlan": "lin_probe.plan",
    "LinearRegimeMonitor": "lin_probe.lightning.callback",
    "OverBudgetWarning": "lin_probe.monitor.budget",
}

__all__ = [
    "AffineKernel",
    "ComputePlan",
    "LinearRegimeMonitor",
    "LinearShadow",
    "OverBudgetWarning",
    "RegimeProbe",
    "empirical_ntk",
    "fit_affine_kernel",
    "spectral_norm",
    "two_layer_coefficients",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from lin_probe.kernel import AffineKernel, fit_affine_kernel, two_layer_coefficients
    from lin_probe.lightning.callback import LinearRegimeMonitor
    from lin_probe.linalg import spectral_norm
    from lin_probe.monitor.budget import OverBudgetWarning
    from lin_probe.monitor.core import RegimeProbe
    from lin_probe.ntk import empirical_ntk
    from lin_probe.plan import ComputePlan
    from lin_probe.shadows.linear import LinearShadow


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lin_probe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
