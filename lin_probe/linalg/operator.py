"""One symmetric operator type for kernels and their differences: a dense matrix or a product ``u ↦ Au``.

The affine fit, the monitor's checks and the spectral norms all consume this type, so the
validation happens once, here, instead of in a wrapper per consumer:

* dense: square, non-empty, real floating point, finite, symmetric to round-off (below), then
  stored as float64 on CPU and symmetrised ``(A + Aᵀ)/2``;
* products: every product's output is checked (a tensor of shape ``(n,)``, finite) and returned
  as float64 on CPU, where the Lanczos recurrence runs.

NaN/inf (a matrix or a product of a diverged network) raise :class:`NonFiniteOperator`, a
``ValueError`` the monitor catches to report NaN instead of failing the run.

Symmetry tolerance: ``‖A − Aᵀ‖_F / ‖A‖_F ≤ √eps`` of the dtype the matrix arrived in. A kernel
computed in float32 (chunked ``J Jᵀ``, or sums of parts) is symmetric only to round-off, about
``eps·√terms`` relative, which ``√eps`` (3e-4 for float32, 1.5e-8 for float64) accepts with a wide
margin, while a genuinely non-symmetric matrix (rows and columns indexing different examples:
asymmetry of order one) is refused. The affine fit used to apply its own, elementwise test
(``max|Θ − Θᵀ| ≤ max(1e-6, 100·eps)·max|Θ|``); it now shares this one. The only inputs the two
treat differently are float64 matrices with an asymmetry between ~1e-8 and 1e-6: far beyond
float64 round-off, so such a matrix was computed in lower precision and should be passed in it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lin_probe._validation import check_finite, check_int
from lin_probe.linalg._lanczos import lanczos_norm

MatVec = Callable[[Tensor], Tensor]

_CPU = torch.device("cpu")


class NonFiniteOperator(ValueError):
    """A matrix or a product came out NaN/inf (typically a diverged network): there is no norm to report."""


class SymmetricOperator:
    """A symmetric ``n × n`` operator in float64 on CPU, validated once when it is built.

    Build it with :meth:`dense` (a matrix) or :meth:`from_products` (a callable ``u ↦ Au``); both
    forms apply as ``op(u)``, subtract, and give their spectral norm (exact ``eigvalsh`` when dense,
    Lanczos otherwise).
    """

    __slots__ = ("_matvec", "matrix", "n", "name")

    def __init__(self, n: int, matrix: Tensor | None, matvec: MatVec | None, name: str) -> None:
        """Use :meth:`dense` or :meth:`from_products`; this stores already-checked parts."""
        self.n = n
        self.matrix = matrix
        self._matvec = matvec
        self.name = name

    # ------------------------------------------------------------------------------- construction

    @classmethod
    def dense(cls, matrix: Tensor, name: str = "op") -> SymmetricOperator:
        """The checked, symmetrised float64 CPU copy of a square symmetric ``matrix`` (``name`` for messages)."""
        if not isinstance(matrix, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor (n × n), got {type(matrix).__name__}.")
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"`{name}` must be a square n × n matrix, got shape {tuple(matrix.shape)}.")
        if matrix.shape[0] == 0:
            raise ValueError(f"`{name}` is an empty 0 × 0 matrix; an operator needs at least one row.")
        if not matrix.is_floating_point():
            raise TypeError(f"`{name}` has dtype {matrix.dtype}; pass a real floating-point matrix.")
        _check_finite(matrix, name)
        a = matrix.detach().to(_CPU, torch.float64)
        _check_symmetric(a, math.sqrt(torch.finfo(matrix.dtype).eps), name)
        return cls(a.shape[0], (a + a.T) / 2, None, name)

    @classmethod
    def _exact(cls, matrix: Tensor, name: str) -> SymmetricOperator:
        """A float64 CPU matrix taken as it is: symmetric by construction up to round-off, not re-checked.

        For a matrix the library builds itself from checked, symmetric pieces (``a·K + b·11ᵀ + c·I``
        from finite inputs): its round-off asymmetry is left as computed, so that differences with
        it (symmetrised in :meth:`__sub__`) and ``eigvalsh`` (which reads one triangle) give the
        numbers they gave before this type existed.
        """
        return cls(matrix.shape[0], matrix, None, name)

    @classmethod
    def from_products(cls, matvec: MatVec, n: int, name: str = "op") -> SymmetricOperator:
        """``u ↦ matvec(u)``, each product checked (``(n,)``, finite) and returned as float64 on CPU.

        ``matvec`` receives the vector as the caller passes it (float64 CPU from Lanczos) and may
        return any floating dtype on any device. Symmetry is the caller's promise: checking it would
        cost ``n`` products.
        """
        if not callable(matvec):
            raise TypeError(f"`{name}` must be a callable u ↦ Au, got {type(matvec).__name__}.")
        check_int("n", n, minimum=1)
        return cls(n, None, matvec, name)

    # ----------------------------------------------------------------------------------- queries

    @property
    def is_dense(self) -> bool:
        """Whether the matrix is held (exact norms and eigenvalues) rather than only products."""
        return self.matrix is not None

    def __call__(self, u: Tensor) -> Tensor:
        """``Au`` as a float64 CPU vector of shape ``(n,)``."""
        if self.matrix is not None:
            return self.matrix @ u.to(_CPU, torch.float64)
        assert self._matvec is not None
        w = self._matvec(u)
        if not isinstance(w, Tensor):
            raise TypeError(
                f"`{self.name}` must return a torch.Tensor of shape ({self.n},), got {type(w).__name__}."
            )
        if tuple(w.shape) != (self.n,):
            raise ValueError(
                f"`{self.name}` must map a vector of shape ({self.n},) to one of the same shape, "
                f"got {tuple(w.shape)}."
            )
        _check_finite(w, f"{self.name}(u)")
        return w.detach().to(_CPU, torch.float64)

    def __sub__(self, other: SymmetricOperator) -> SymmetricOperator:
        """``A − B``: dense when both are (the symmetrised difference ``(D + Dᵀ)/2``), else products.

        Both operands were checked, so the difference is not checked again; symmetrising it is a
        no-op when both matrices are exactly symmetric and removes round-off asymmetry otherwise.
        """
        if not isinstance(other, SymmetricOperator):
            return NotImplemented
        if other.n != self.n:
            raise ValueError(
                f"cannot subtract a {other.n}-dimensional operator from a {self.n}-dimensional one."
            )
        name = f"{self.name} − {other.name}"
        if self.matrix is not None and other.matrix is not None:
            difference = self.matrix - other.matrix
            return SymmetricOperator._exact((difference + difference.T) / 2, name)
        return SymmetricOperator(self.n, None, lambda u: self(u) - other(u), name)

    def norm(self, rtol: float = 1e-5) -> float:
        """``max |λ|``: exact (``eigvalsh``) when dense, else Lanczos certified to relative accuracy ``rtol``.

        Lanczos runs in float64 on CPU from a start vector seeded with 0 (reproducible; the global
        RNG is untouched) for at most ``n`` steps; see :func:`lin_probe.linalg.spectral_norm` for
        the other knobs.
        """
        if self.matrix is not None:
            return float(self.eigenvalues().abs().max())
        return lanczos_norm(
            self, self.n, rtol=rtol, max_iter=self.n, seed=0, dtype=torch.float64, device=_CPU
        )

    def eigenvalues(self) -> Tensor:
        """All eigenvalues, ascending (float64 CPU); only for a dense operator."""
        if self.matrix is None:
            raise ValueError(
                f"`{self.name}` is given by products only: its eigenvalues would need the n × n matrix; "
                "build it with SymmetricOperator.dense for a spectrum."
            )
        return torch.linalg.eigvalsh(self.matrix)

    def __repr__(self) -> str:
        form = "dense" if self.is_dense else "products"
        return f"SymmetricOperator(n={self.n}, {form}, name={self.name!r})"


def _check_finite(tensor: Tensor, name: str) -> None:
    """:func:`lin_probe._validation.check_finite`, raising :class:`NonFiniteOperator` (same message)."""
    try:
        check_finite(tensor, name)
    except ValueError as error:
        raise NonFiniteOperator(str(error)) from None


def _check_symmetric(a: Tensor, rtol: float, name: str) -> None:
    """Raise ``ValueError`` if ``a`` is further from symmetric than round-off explains (module docstring)."""
    asymmetry = float(torch.linalg.matrix_norm(a - a.T))
    scale = float(torch.linalg.matrix_norm(a))
    if asymmetry > rtol * scale:
        raise ValueError(
            f"`{name}` is not symmetric: ‖A − Aᵀ‖_F / ‖A‖_F = {asymmetry / scale:.3g} > {rtol:.3g}. "
            "Kernels are J Jᵀ: check that rows and columns index the same probe examples. For a general "
            "matrix's 2-norm use `torch.linalg.matrix_norm(A, ord=2)`."
        )


__all__ = ["MatVec", "NonFiniteOperator", "SymmetricOperator"]
