"""The empirical NTK of any model: dense kernels, structured Linear/Conv Grams and matrix-free products."""

from lin_probe.ntk.dense import METHODS, empirical_ntk, ntk_matvec, predict

__all__ = ["METHODS", "empirical_ntk", "ntk_matvec", "predict"]
