"""Spectral norms of symmetric operators: exact for small matrices, Lanczos for matrix-free ones.

The monitor reports ``‖Θ_t − Θ_lin‖₂`` and ``‖Θ_t − Θ_0‖₂``. Those differences are symmetric but
indefinite, so the norm is the largest *absolute* eigenvalue and may come from the most negative
end of the spectrum. Small kernels are materialised and solved exactly with ``eigvalsh``; large
ones are only available as products ``u ↦ Θu`` and go through Lanczos.

Why Lanczos with full reorthogonalisation rather than power iteration: power iteration converges
at the rate ``|λ₂/λ₁|``, which is hopeless for NTKs, whose top eigenvalues are often nearly
degenerate, and it finds only one end of an indefinite spectrum. Lanczos builds a Krylov basis in
which *both* extremes converge together, and its residual gives an error bound even inside a
cluster. Plain Lanczos loses orthogonality as Ritz values converge and then reports spurious
copies ("ghosts"); keeping the basis explicitly orthogonal (Gram–Schmidt twice against all stored
vectors) costs ``O(k·n)`` per step and memory ``k·n``, which is cheap next to one NTK product.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lin_probe._validation import check_finite

MatVec = Callable[[Tensor], Tensor]

_DENSE_MAX_N = 4096
"""Above this ``eigvalsh`` (``O(n³)``) costs seconds per check, too slow for a training callback."""

_DENSE_COPIES = 2
"""Float64 ``n × n`` buffers the dense path holds: the matrix and ``eigvalsh``'s working copy."""

_CHECK_EVERY_STEP_UNTIL = 64
"""Below this Krylov dimension the tridiagonal eigenproblem is negligible, so test every step."""


def dense_or_matrix_free(n: int, *, memory_budget: int = 1 << 30) -> str:
    """Say whether the ``n × n`` spectral norm should be computed densely or matrix-free.

    Dense (``"dense"``) when ``n ≤ 4096`` (so ``eigvalsh``'s ``O(n³)`` stays well under a second)
    *and* the float64 matrix plus ``eigvalsh``'s working copy, ``2·8·n²`` bytes, fits in a quarter
    of ``memory_budget`` (bytes), leaving room for the NTK computation around it. With the default
    1 GiB budget both limits meet at ``n = 4096``. Otherwise ``"matrix_free"`` (Lanczos on
    ``u ↦ Θu``).
    """
    _check_positive_int(n, "n")
    _check_positive_int(memory_budget, "memory_budget")
    dense_bytes = _DENSE_COPIES * 8 * n * n
    if n <= _DENSE_MAX_N and 4 * dense_bytes <= memory_budget:
        return "dense"
    return "matrix_free"


def spectral_norm(
    op: Tensor | MatVec,
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

    ``op`` is either a symmetric ``n × n`` tensor (solved exactly with ``eigvalsh`` in float64) or
    a callable ``v ↦ Av`` on 1-D tensors of length ``n`` (solved by Lanczos; ``n`` is required).

    Lanczos options: it stops once the residual bound of the extreme Ritz values certifies
    relative accuracy ``rtol``, or the Krylov space is exhausted (at most ``max_iter`` steps,
    default ``n``). The recurrence runs in ``dtype`` on ``device`` (default CPU); the callable
    receives vectors in ``op_dtype`` (default ``dtype``; pass ``torch.float32`` for a float32 NTK
    product) and may return any floating dtype. The start vector comes from a local generator
    seeded with ``seed``, so the result is reproducible and the global RNG is untouched.
    """
    if isinstance(op, Tensor):
        return _dense_spectral_norm(op, n)
    if not callable(op):
        raise TypeError(
            f"`op` must be a square torch.Tensor or a callable v ↦ Av, got {type(op).__name__}; "
            "convert arrays with `torch.as_tensor`."
        )
    if n is None:
        raise ValueError(
            "`n` is required when `op` is a callable: pass the length of the vectors it acts on."
        )
    _check_positive_int(n, "n")
    _check_lanczos_options(rtol, max_iter, seed, dtype)
    run = _LanczosRun(
        matvec=op,
        n=n,
        dtype=dtype,
        device=torch.device("cpu") if device is None else torch.device(device),
        op_dtype=dtype if op_dtype is None else op_dtype,
    )
    return _lanczos_spectral_norm(run, rtol, n if max_iter is None else min(max_iter, n), seed)


# ---------------------------------------------------------------------------------------- dense


def _dense_spectral_norm(matrix: Tensor, n: int | None) -> float:
    """Exact norm via ``eigvalsh`` in float64 after checking the matrix is square, finite, symmetric."""
    a = _checked_symmetric(matrix, n)
    eigenvalues = torch.linalg.eigvalsh(a)
    return float(eigenvalues.abs().max())


def _checked_symmetric(matrix: Tensor, n: int | None) -> Tensor:
    """Validate ``matrix`` and return ``(A + Aᵀ)/2`` in float64, removing round-off asymmetry."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"`op` must be a square n × n matrix, got shape {tuple(matrix.shape)}.")
    if matrix.shape[0] == 0:
        raise ValueError("`op` is an empty 0 × 0 matrix; the spectral norm needs at least one row.")
    if n is not None and n != matrix.shape[0]:
        raise ValueError(f"`n`={n} disagrees with the matrix size {matrix.shape[0]}; omit `n` for a tensor.")
    if not matrix.is_floating_point():
        raise TypeError(f"`op` has dtype {matrix.dtype}; pass a real floating-point matrix.")
    check_finite(matrix, "op")
    a = matrix.to(torch.float64)
    _check_symmetric(a, _symmetry_rtol(matrix.dtype))
    return (a + a.T) / 2


def _symmetry_rtol(source_dtype: torch.dtype) -> float:
    """Allowed ``‖A − Aᵀ‖_F / ‖A‖_F``: ``√eps`` of the matrix's own dtype.

    A kernel computed in float32 (chunked ``J Jᵀ``) is symmetric only to round-off, ~1e-7
    relative; ``√eps`` (3e-4 for float32) accepts that with a wide margin while a genuinely
    non-symmetric matrix (asymmetry of order one) is refused.
    """
    return math.sqrt(torch.finfo(source_dtype).eps)


def _check_symmetric(a: Tensor, rtol: float) -> None:
    """Raise ``ValueError`` if ``a`` is further from symmetric than round-off explains."""
    asymmetry = float(torch.linalg.matrix_norm(a - a.T))
    scale = float(torch.linalg.matrix_norm(a))
    if asymmetry > rtol * scale:
        raise ValueError(
            f"`op` is not symmetric: ‖A − Aᵀ‖_F / ‖A‖_F = {asymmetry / scale:.3g} > {rtol:.3g}. "
            "The spectral norm here is for symmetric operators (kernels and their differences); "
            "for a general matrix use `torch.linalg.matrix_norm(A, ord=2)`."
        )


# -------------------------------------------------------------------------------------- Lanczos


@dataclass(frozen=True)
class _LanczosRun:
    """Where and how the operator is applied: recurrence dtype/device and the callable's dtype."""

    matvec: MatVec
    n: int
    dtype: torch.dtype
    device: torch.device
    op_dtype: torch.dtype

    def apply(self, v: Tensor) -> Tensor:
        """``Av`` in the recurrence dtype/device, after checking the callable's output."""
        w = self.matvec(v.to(dtype=self.op_dtype))
        if not isinstance(w, Tensor):
            raise TypeError(f"the matvec must return a torch.Tensor, got {type(w).__name__}.")
        if w.shape != (self.n,):
            raise ValueError(
                f"the matvec must map a vector of shape ({self.n},) to one of the same shape, "
                f"got {tuple(w.shape)}."
            )
        check_finite(w, "op(v)")
        return w.to(dtype=self.dtype, device=self.device)


class _KrylovBasis:
    """Orthonormal Lanczos vectors stored as rows of a buffer that grows by doubling.

    Growing on demand keeps memory at ``O(k·n)`` for ``k`` steps taken, not ``O(max_iter·n)``.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self._rows = torch.empty((min(n, 16), n), dtype=dtype, device=device)
        self.size = 0

    @property
    def vectors(self) -> Tensor:
        """The ``k × n`` matrix of stored basis vectors."""
        return self._rows[: self.size]

    def append(self, v: Tensor) -> None:
        """Store ``v`` as the next basis vector."""
        if self.size == self._rows.shape[0]:
            grown = torch.empty((2 * self.size, self._rows.shape[1]), dtype=v.dtype, device=v.device)
            grown[: self.size] = self._rows
            self._rows = grown
        self._rows[self.size] = v
        self.size += 1

    def orthogonalise(self, w: Tensor) -> Tensor:
        """Remove from ``w`` its components along the basis (classical Gram–Schmidt, twice).

        One pass leaves errors of size ``eps·‖w‖/‖w_⊥‖``; the second pass ("twice is enough")
        brings orthogonality to working precision even when ``w`` nearly lies in the span.
        """
        v = self.vectors
        for _ in range(2):
            w = w - v.T @ (v @ w)
        return w


def _start_vector(n: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Unit Gaussian start vector from a local CPU generator (same on every device, global RNG untouched)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(n, generator=generator, dtype=dtype).to(device)
    return v / torch.linalg.vector_norm(v)


def _extreme_ritz(alphas: list[float], betas: list[float], beta_next: float) -> tuple[float, float]:
    """Current estimate of max |λ| and a bound on how far the true max |λ| can lie above it.

    The Ritz values of the tridiagonal ``T_k`` bracket the spectrum from inside; each Ritz pair has
    residual ``β_k·|s_k|`` (last component of its eigenvector), and some eigenvalue of the operator
    lies within that residual of it. So ``max(|θ_min| + r_min, |θ_max| + r_max)`` bounds the answer
    from above (once the extremes are the ones being approximated) and ``max(|θ_min|, |θ_max|)``
    from below.
    """
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(t)
    residual = beta_next * s[-1].abs()
    ends = (0, k - 1)
    estimate = max(abs(float(theta[i])) for i in ends)
    upper = max(abs(float(theta[i])) + float(residual[i]) for i in ends)
    return estimate, upper - estimate


def _should_check(k: int) -> bool:
    """Test convergence every step while cheap, then about 16 times per doubling of ``k``."""
    return k <= _CHECK_EVERY_STEP_UNTIL or k % max(1, k // 16) == 0


def _lanczos_spectral_norm(run: _LanczosRun, rtol: float, max_iter: int, seed: int) -> float:
    """Lanczos with full reorthogonalisation until the residual bound certifies ``rtol`` or breakdown."""
    basis = _KrylovBasis(run.n, run.dtype, run.device)
    breakdown = 10.0 * torch.finfo(run.dtype).eps
    alphas: list[float] = []
    betas: list[float] = []
    v = _start_vector(run.n, seed, run.dtype, run.device)
    beta_prev, op_scale = 0.0, 0.0
    estimate, error = 0.0, math.inf
    for k in range(1, max_iter + 1):
        basis.append(v)
        w = run.apply(v)
        op_scale = max(op_scale, float(torch.linalg.vector_norm(w)))
        alpha = float(torch.dot(v, w))
        w = w - alpha * v
        if k > 1:
            w = w - beta_prev * basis.vectors[k - 2]
        w = basis.orthogonalise(w)
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        # Invariant subspace (or the whole space) reached: the Ritz values are exact eigenvalues.
        exhausted = beta <= breakdown * op_scale or k == run.n
        if exhausted or k == max_iter or _should_check(k):
            estimate, error = _extreme_ritz(alphas, betas, 0.0 if exhausted else beta)
            if exhausted or error <= rtol * estimate:
                return estimate
        betas.append(beta)
        beta_prev = beta
        v = w / beta
    warnings.warn(
        f"Lanczos stopped after max_iter={max_iter} steps with relative error bound "
        f"{error / max(estimate, 1e-300):.3g} > rtol={rtol:g}; raise `max_iter` for a tighter value.",
        RuntimeWarning,
        stacklevel=3,
    )
    return estimate


# ---------------------------------------------------------------------------------- validation


def _check_positive_int(value: object, name: str) -> None:
    """Raise unless ``value`` is a positive ``int`` (``bool`` excluded)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be a positive int, got {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value}.")


def _check_lanczos_options(rtol: float, max_iter: int | None, seed: int, dtype: torch.dtype) -> None:
    """Refuse Lanczos options that would make the run meaningless or never stop."""
    if not isinstance(rtol, (int, float)) or isinstance(rtol, bool) or not 0.0 < rtol < 1.0:
        raise ValueError(f"`rtol` must be a number in (0, 1), got {rtol!r}.")
    if max_iter is not None:
        _check_positive_int(max_iter, "max_iter")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}.")
