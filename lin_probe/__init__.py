"""lin_probe: is your network still training like a linear model on its inputs?

Re-exports the public API (DESIGN §2) and nothing else.
"""

from lin_probe.callback import LinearRegimeMonitor
from lin_probe.kernel import AffineKernel, fit_affine_kernel, two_layer_coefficients
from lin_probe.ntk import empirical_ntk
from lin_probe.shadow import LinearShadow
from lin_probe.spectral import spectral_norm

__all__ = [
    "AffineKernel",
    "LinearRegimeMonitor",
    "LinearShadow",
    "empirical_ntk",
    "fit_affine_kernel",
    "spectral_norm",
    "two_layer_coefficients",
]
