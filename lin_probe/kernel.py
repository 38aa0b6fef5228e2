"""The data kernel ``K = XXᵀ/d``, the affine fit ``Θ ≈ a·K + b·11ᵀ + c·I`` and the two-layer closed forms.

Hu et al. (2020) show that early in training a network's NTK is close to an affine transform of
the data kernel; these three numbers are what the linear "shadow" model is built from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lin_probe._validation import as_feature_matrix


def data_kernel(inputs: Tensor) -> Tensor:
    """``K = XXᵀ/d`` in float64, with ``X`` the inputs flattened per example (``n × d``)."""
    x = as_feature_matrix(inputs).to(torch.float64)
    return x @ x.T / x.shape[1]


@dataclass(frozen=True)
class AffineKernel:
    """``Θ_lin = a·K + b·11ᵀ + c·I`` with ``K = XXᵀ/d``.

    ``rel_error`` is ``‖Θ − Θ_lin‖₂ / ‖Θ‖₂`` for a fitted kernel (how well the paper's claim holds for
    this model) and ``None`` for a closed form, which was not fitted to anything.
    """

    a: float
    b: float
    c: float
    rel_error: float | None = None

    def matrix(self, inputs: Tensor) -> Tensor:
        """The ``n × n`` matrix ``a·K + b·11ᵀ + c·I`` (float64)."""
        k = data_kernel(inputs)
        n = k.shape[0]
        eye = torch.eye(n, dtype=k.dtype, device=k.device)
        return self.a * k + self.b + self.c * eye

    def features(self, inputs: Tensor) -> Tensor:
        """``ψ(x) = [√a·x/√d ; √b]`` (``n × (d+1)``, inputs' dtype), so that ``ψψᵀ = a·K + b·11ᵀ``.

        The ``c·I`` part has no feature map linear in the inputs: it is what the network uses to fit
        individual training points, and the linear model lacks it by construction.
        """
        x = as_feature_matrix(inputs)
        d = x.shape[1]
        scaled = x * math.sqrt(max(self.a, 0.0) / d)
        bias = torch.full((x.shape[0], 1), math.sqrt(max(self.b, 0.0)), dtype=x.dtype, device=x.device)
        return torch.cat([scaled, bias], dim=1)
