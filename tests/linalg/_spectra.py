"""Test matrices with a chosen, known spectrum: the reference the spectral tests compare against."""

from __future__ import annotations

import numpy as np


def with_spectrum(eigenvalues: np.ndarray, seed: int) -> np.ndarray:
    """Symmetric matrix ``Q diag(λ) Qᵀ`` with a random orthogonal ``Q`` (a chosen, known spectrum)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((eigenvalues.size, eigenvalues.size)))
    a = (q * eigenvalues) @ q.T
    return (a + a.T) / 2
