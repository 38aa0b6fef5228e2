"""Spectral norms of symmetric operators: exact for small matrices, Lanczos for matrix-free ones.

The monitor reports ``‖Θ_t − Θ_lin‖₂`` and ``‖Θ_t − Θ_0‖₂``. Those differences are symmetric but
indefinite, so the norm is the largest *absolute* eigenvalue and may come from the most negative
end of the spectrum. Small kernels are materialised and solved exactly with ``eigvalsh``; large
ones are only available as products ``u ↦ Θu`` and go through Lanczos
(:mod:`lin_probe.linalg._lanczos` explains why Lanczos and not power iteration). Validation and the
dense norm are :class:`~lin_probe.linalg.operator.SymmetricOperator`'s; this function adds the
Lanczos knobs (recurrence dtype and device, the product's input dtype, seed, step cap).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lin_probe._validation import check_int
from lin_probe.linalg._lanczos import lanczos_norm
from lin_probe.linalg.operator import MatVec, SymmetricOperator


def spectral_norm(
    op: Tensor | MatVec | SymmetricOperator,
    n: int | None = None,
    *,
    rtol: float = 1e-5,
    max_iter: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    op_dtype: torch.dtype | None = None,
) -> float:
    """Largest ``|eigenvalue|`` of a symmetric operator (its spectral norm).

    ``op`` is a symmetric ``n × n`` tensor (solved exactly with ``eigvalsh`` in float64), a callable
    ``v ↦ Av`` on 1-D tensors of length ``n`` (solved by Lanczos; ``n`` is required), or a
    :class:`SymmetricOperator` (dense: exact; products: Lanczos).

    Lanczos options: it stops once the residual bound of the extreme Ritz values certifies
    relative accuracy ``rtol``, or the Krylov space is exhausted (at most ``max_iter`` steps,
    default ``n``). The recurrence runs in ``dtype`` on ``device`` (default CPU); the callable
    receives vectors in ``op_dtype`` (default ``dtype``; pass ``torch.float32`` for a float32 NTK
    product) and may return any floating dtype. The start vector comes from a local generator
    seeded with ``seed``, so the result is reproducible and the global RNG is untouched.
    """
    if isinstance(op, Tensor):
        operator = SymmetricOperator.dense(op, "op")
        if n is not None and n != operator.n:
            raise ValueError(f"`n`={n} disagrees with the matrix size {operator.n}; omit `n` for a tensor.")
        return operator.norm()
    if isinstance(op, SymmetricOperator):
        if op.is_dense:
            return op.norm()
        operator, n = op, op.n
    elif callable(op):
        if n is None:
            raise ValueError(
                "`n` is required when `op` is a callable: pass the length of the vectors it acts on."
            )
        check_int("n", n, minimum=1)
        operator = SymmetricOperator.from_products(op, n, "op")
    else:
        raise TypeError(
            f"`op` must be a square torch.Tensor or a callable v ↦ Av, got {type(op).__name__}; "
            "convert arrays with `torch.as_tensor`."
        )
    _check_lanczos_options(rtol, max_iter, seed, dtype)
    where = torch.device("cpu") if device is None else torch.device(device)
    into = dtype if op_dtype is None else op_dtype

    def apply(v: Tensor) -> Tensor:
        return operator(v.to(dtype=into)).to(dtype=dtype, device=where)

    steps = n if max_iter is None else min(max_iter, n)
    return lanczos_norm(apply, n, rtol=rtol, max_iter=steps, seed=seed, dtype=dtype, device=where)


def _check_lanczos_options(rtol: float, max_iter: int | None, seed: int, dtype: torch.dtype) -> None:
    """Refuse Lanczos options that would make the run meaningless or never stop."""
    if not isinstance(rtol, (int, float)) or isinstance(rtol, bool) or not 0.0 < rtol < 1.0:
        raise ValueError(f"`rtol` must be a number in (0, 1), got {rtol!r}.")
    if max_iter is not None:
        check_int("max_iter", max_iter, minimum=1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}.")


__all__ = ["spectral_norm"]
