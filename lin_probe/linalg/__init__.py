"""Symmetric operators (dense or matrix-free) and their spectral norms."""

from lin_probe.linalg.spectral import spectral_norm

__all__ = ["spectral_norm"]
