"""The kernel measures the field uses, as pure functions of dense NTKs (float64).

- ``kernel_distance`` ``1 − ⟨Θ_a, Θ_b⟩_F / (‖Θ_a‖_F ‖Θ_b‖_F)`` (Fort et al., NeurIPS 2020): how far the
  kernel has *turned*, blind to its scale; ``kernel_velocity`` is that distance between consecutive
  NTK checks per optimizer step between them.
- ``kernel_alignment`` ``⟨HΘH, HYYᵀH⟩_F / (‖HΘH‖_F ‖HYYᵀH‖_F)``, ``H = I − 11ᵀ/n`` (centred
  kernel–target alignment, Cortes, Mohri & Rostamizadeh, JMLR 2012): how much of the kernel points
  at the task; ``Y`` is one-hot for class labels, the targets themselves for regression.
- ``ntk_scale`` ``‖Θ_t‖₂ / ‖Θ_0‖₂``: the size the distance ignores.

Only ``ntk_scale`` has a cheap matrix-free form (two Lanczos norms); the others need Frobenius inner
products, which products alone give only with ``n`` of them, so the monitor logs them as NaN there
(and says so once) rather than pay ``n`` products per check.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

KERNEL_MEASURE_KEYS = ("kernel_distance", "kernel_velocity", "kernel_alignment", "ntk_scale")


def kernel_distance(first: Tensor, second: Tensor) -> float:
    """``1 − cos`` of the angle between two kernels in Frobenius geometry; NaN if either is zero."""
    a, b = first.to(torch.float64), second.to(first.device, torch.float64)
    norms = torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b)
    if not float(norms) > 0.0:
        return math.nan
    return float(1.0 - (a * b).sum() / norms)


def kernel_velocity(previous: Tensor, current: Tensor, steps: int) -> float:
    """:func:`kernel_distance` between consecutive checks per step between them (NaN for ``steps ≤ 0``)."""
    if steps <= 0:
        return math.nan
    return kernel_distance(previous, current) / steps


def target_matrix(targets: Tensor, n_outputs: int) -> Tensor:
    """``Y`` (``n × C``, float64): one-hot rows for 1-D integer class labels, the targets otherwise."""
    if targets.dim() == 1 and not targets.is_floating_point():
        return F.one_hot(targets.long(), num_classes=max(n_outputs, int(targets.max()) + 1)).to(torch.float64)
    return targets.reshape(targets.shape[0], -1).to(torch.float64)


def kernel_alignment(theta: Tensor, targets: Tensor) -> float:
    """Centred kernel–target alignment of ``theta`` with ``Y = targets`` (``n × C``); NaN when either
    centred matrix is zero (constant targets, or a kernel that only has the constant mode)."""
    kernel = theta.to(torch.float64)
    y = targets.to(kernel.device, torch.float64)
    y = y - y.mean(dim=0, keepdim=True)  # H Y: then H Y Yᵀ H = (HY)(HY)ᵀ
    centred = _double_centre(kernel)
    target_kernel = y @ y.T
    norms = torch.linalg.matrix_norm(centred) * torch.linalg.matrix_norm(target_kernel)
    if not float(norms) > 0.0:
        return math.nan
    # ⟨HΘH, HYYᵀH⟩ = ⟨Θ, HYYᵀH⟩ since H is a projector; the centred form is kept for clarity.
    return float((centred * target_kernel).sum() / norms)


def ntk_scale(norm: float, norm0: float) -> float:
    """``‖Θ_t‖₂ / ‖Θ_0‖₂`` (NaN for a zero initial kernel)."""
    return norm / norm0 if norm0 > 0 else math.nan


def _double_centre(kernel: Tensor) -> Tensor:
    """``HKH``: subtract row means and column means, add back the grand mean."""
    return kernel - kernel.mean(dim=0, keepdim=True) - kernel.mean(dim=1, keepdim=True) + kernel.mean()


__all__ = [
    "KERNEL_MEASURE_KEYS",
    "kernel_alignment",
    "kernel_distance",
    "kernel_velocity",
    "ntk_scale",
    "target_matrix",
]
