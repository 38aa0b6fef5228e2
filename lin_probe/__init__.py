"""lin_probe: is your network still training like a linear model on its inputs?

Re-exports the public API and nothing else; the subpackages say where each piece lives.
"""

from lin_probe.kernel import AffineKernel, fit_affine_kernel, two_layer_coefficients
from lin_probe.lightning.callback import LinearRegimeMonitor
from lin_probe.linalg import spectral_norm
from lin_probe.ntk import empirical_ntk
from lin_probe.shadows.linear import LinearShadow

__all__ = [
    "AffineKernel",
    "LinearRegimeMonitor",
    "LinearShadow",
    "empirical_ntk",
    "fit_affine_kernel",
    "spectral_norm",
    "two_layer_coefficients",
]
