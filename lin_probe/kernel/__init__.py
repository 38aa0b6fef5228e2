"""The data kernel and its affine transform ``a·XXᵀ/d + b·11ᵀ + c·I``: the fit, and two-layer closed forms."""

from lin_probe.kernel.affine import (
    AffineKernel,
    data_kernel,
    fit_affine_kernel,
    fit_affine_kernel_matrix_free,
)
from lin_probe.kernel.closed_form import GaussianMoments, gaussian_moments, two_layer_coefficients

__all__ = [
    "AffineKernel",
    "GaussianMoments",
    "data_kernel",
    "fit_affine_kernel",
    "fit_affine_kernel_matrix_free",
    "gaussian_moments",
    "two_layer_coefficients",
]
