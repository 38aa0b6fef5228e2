"""The data kernel and its affine transform ``a·XXᵀ/d + b·11ᵀ + c·I``: the fit, architecture-aware data
kernels (:mod:`~lin_probe.kernel.data_kernels`), and two-layer closed forms."""

from lin_probe.kernel.affine import (
    AffineKernel,
    centered_norm,
    centered_rel_error,
    data_kernel,
    fit_affine_kernel,
    fit_affine_kernel_matrix_free,
)
from lin_probe.kernel.closed_form import GaussianMoments, gaussian_moments, two_layer_coefficients
from lin_probe.kernel.data_kernels import (
    DATA_KERNELS,
    DataKernelChoice,
    PatchMeanFeatures,
    choose_data_kernel,
    data_kernel_candidates,
    first_convolution,
)

__all__ = [
    "DATA_KERNELS",
    "AffineKernel",
    "DataKernelChoice",
    "GaussianMoments",
    "PatchMeanFeatures",
    "centered_norm",
    "centered_rel_error",
    "choose_data_kernel",
    "data_kernel",
    "data_kernel_candidates",
    "first_convolution",
    "fit_affine_kernel",
    "fit_affine_kernel_matrix_free",
    "gaussian_moments",
    "two_layer_coefficients",
]
