"""Symmetric operators (dense or matrix-free), checked once, and their spectral norms."""

from lin_probe.linalg.operator import NonFiniteOperator, SymmetricOperator
from lin_probe.linalg.spectral import spectral_norm

__all__ = ["NonFiniteOperator", "SymmetricOperator", "spectral_norm"]
