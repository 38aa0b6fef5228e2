"""Lanczos with full reorthogonalisation: the largest ``|eigenvalue|`` of a symmetric operator from products.

Why Lanczos rather than power iteration: power iteration converges at the rate ``|λ₂/λ₁|``, which
is hopeless for NTKs, whose top eigenvalues are often nearly degenerate, and it finds only one end
of an indefinite spectrum (the kernel differences the monitor reports are indefinite). Lanczos
builds a Krylov basis in which *both* extremes converge together, and its residual gives an error
bound even inside a cluster. Plain Lanczos loses orthogonality as Ritz values converge and then
reports spurious copies ("ghosts"); keeping the basis explicitly orthogonal (Gram–Schmidt twice
against all stored vectors) costs ``O(k·n)`` per step and memory ``k·n``, which is cheap next to
one NTK product.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

_CHECK_EVERY_STEP_UNTIL = 64
"""Below this Krylov dimension the tridiagonal eigenproblem is negligible, so test every step."""


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


def lanczos_norm(
    apply: Callable[[Tensor], Tensor],
    n: int,
    *,
    rtol: float,
    max_iter: int,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
) -> float:
    """Max ``|λ|`` of ``v ↦ apply(v)`` until the residual bound certifies ``rtol`` or the space is exhausted.

    ``apply`` receives and must return ``(n,)`` vectors in ``dtype`` on ``device`` (the recurrence's);
    it is the caller's job to have checked the product. Warns if ``max_iter`` steps do not reach ``rtol``.
    """
    basis = _KrylovBasis(n, dtype, device)
    breakdown = 10.0 * torch.finfo(dtype).eps
    alphas: list[float] = []
    betas: list[float] = []
    v = _start_vector(n, seed, dtype, device)
    beta_prev, op_scale = 0.0, 0.0
    estimate, error = 0.0, math.inf
    for k in range(1, max_iter + 1):
        basis.append(v)
        w = apply(v)
        op_scale = max(op_scale, float(torch.linalg.vector_norm(w)))
        alpha = float(torch.dot(v, w))
        w = w - alpha * v
        if k > 1:
            w = w - beta_prev * basis.vectors[k - 2]
        w = basis.orthogonalise(w)
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        # Invariant subspace (or the whole space) reached: the Ritz values are exact eigenvalues.
        exhausted = beta <= breakdown * op_scale or k == n
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
