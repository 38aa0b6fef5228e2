"""The data kernel ``K = XXᵀ/d``, the affine fit ``Θ ≈ a·K + b·11ᵀ + c·I`` and the two-layer closed forms.

Hu et al. (2020) show that early in training a network's NTK is close to an affine transform of
the data kernel; these three numbers are what the linear "shadow" model is built from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lin_probe._validation import as_feature_matrix
from lin_probe.linalg.operator import MatVec, NonFiniteOperator, SymmetricOperator


def data_kernel(inputs: Tensor) -> Tensor:
    """``K = XXᵀ/d`` in float64, with ``X`` the inputs flattened per example (``n × d``)."""
    x = as_feature_matrix(inputs).to(torch.float64)
    return x @ x.T / x.shape[1]


@dataclass(frozen=True)
class AffineKernel:
    """``Θ_lin = a·K + b·11ᵀ + c·I`` with ``K = XXᵀ/d``.

    ``rel_error`` is ``‖Θ − Θ_lin‖₂ / ‖Θ‖₂`` for a fitted kernel (how well the paper's claim holds for
    this model) and ``None`` for a closed form, which was not fitted to anything.
    ``rel_error_centered`` is the same ratio after centring both kernels, ``‖H(Θ − Θ_lin)H‖₂ / ‖HΘH‖₂``
    with ``H = I − 11ᵀ/n`` (:func:`centered_rel_error`): the constant mode ``b·11ᵀ`` often dominates
    ``‖Θ‖₂``, so the uncentred ratio looks good even when ``a·K + c·I`` explains little of the rest.
    It is ``None`` where not computed (a closed form, or a kernel saved before the field existed) and
    NaN when ``HΘH`` vanishes (a constant kernel: nothing is left to explain).
    """

    a: float
    b: float
    c: float
    rel_error: float | None = None
    rel_error_centered: float | None = None

    def matrix(self, inputs: Tensor) -> Tensor:
        """The ``n × n`` matrix ``a·K + b·11ᵀ + c·I`` (float64)."""
        k = data_kernel(inputs)
        n = k.shape[0]
        eye = torch.eye(n, dtype=k.dtype, device=k.device)
        return self.a * k + self.b + self.c * eye

    def matvec(self, inputs: Tensor) -> MatVec:
        """``u ↦ (a·K + b·11ᵀ + c·I)u`` in float64 from ``X`` alone: ``a·X(Xᵀu)/d + b·1(1ᵀu) + c·u``.

        For probe sets too large for :meth:`matrix`: ``O(n·d)`` per product, nothing ``n × n``.
        """
        x = as_feature_matrix(inputs).to(torch.float64)
        d = x.shape[1]
        a, b, c = self.a, self.b, self.c

        def apply(u: Tensor) -> Tensor:
            u = u.to(dtype=x.dtype, device=x.device)
            return a * (x @ (x.T @ u)) / d + b * u.sum() + c * u

        return apply

    def operator(self, inputs: Tensor, *, dense: bool) -> SymmetricOperator:
        """``Θ_lin`` on ``inputs`` as an operator: the :meth:`matrix` if ``dense``, else :meth:`matvec`'s products.

        The matrix is symmetric by construction (``K = XXᵀ/d`` from checked, finite inputs); it is
        kept exactly as computed, round-off included, rather than re-symmetrised, so that
        ``Θ_t − Θ_lin`` is the same matrix as before this operator type existed.
        """
        if dense:
            for value in (self.a, self.b, self.c):
                if not math.isfinite(value):
                    raise NonFiniteOperator(
                        f"the affine kernel ({self.a}, {self.b}, {self.c}) is not finite."
                    )
            return SymmetricOperator._exact(self.matrix(inputs), "affine kernel")
        return SymmetricOperator.from_products(self.matvec(inputs), inputs.shape[0], "affine kernel")

    def features(self, inputs: Tensor, *, check_values: bool = True) -> Tensor:
        """``ψ(x) = [√a·x/√d ; √b]`` (``n × (d+1)``, inputs' dtype), so that ``ψψᵀ = a·K + b·11ᵀ``.

        The ``c·I`` part has no feature map linear in the inputs: it is what the network uses to fit
        individual training points, and the linear model lacks it by construction.
        ``check_values=False``: no NaN/inf check (:func:`~lin_probe._validation.as_feature_matrix`).
        """
        x = as_feature_matrix(inputs, check_values=check_values)
        d = x.shape[1]
        scaled = x * math.sqrt(max(self.a, 0.0) / d)
        bias = torch.full((x.shape[0], 1), math.sqrt(max(self.b, 0.0)), dtype=x.dtype, device=x.device)
        return torch.cat([scaled, bias], dim=1)


# ---------------------------------------------------------------------------------------------
# Affine fit Θ ≈ a·K + b·11ᵀ + c·I
# ---------------------------------------------------------------------------------------------

_NOT_IDENTIFIABLE_TOL = 1e-10  # smallest eigenvalue of the basis' Frobenius correlation matrix

# ‖HΘH‖₂ at or below this many float64 eps per example, relative to |1ᵀΘ1|/n (= ‖Θ‖₂ for a constant
# kernel), is the round-off of centring a constant kernel, not structure: the centred error is NaN.
# Centring b·11ᵀ leaves entries of a few eps·|b| (the means' summation error), so ‖HΘH‖₂ ≲ n·eps·n|b|.
_CONSTANT_KERNEL_EPS = 16.0


def fit_affine_kernel(
    ntk: Tensor | SymmetricOperator,
    inputs: Tensor,
    *,
    centered_fit: bool = False,
    ntk_norm: float | None = None,
    centered_ntk_norm: float | None = None,
) -> AffineKernel:
    """Least-squares fit of ``Θ ≈ a·K + b·11ᵀ + c·I`` over all ``n²`` entries, with ``a, b, c ≥ 0``.

    The three numbers are what the linear shadow is built from, so the fit is exact (not iterative):
    the 3×3 Frobenius normal equations, and when their solution breaks a bound, the best of the
    boundary sub-problems (exact for a convex quadratic, see :func:`_best_feasible`). ``c ≥ 0``
    because the memorizing shadow scales its offsets by ``√c``, and a negative ``c·I`` is no kernel
    of any network on these points. Everything is computed in float64. ``rel_error`` is
    ``‖Θ − Θ_lin‖₂ / ‖Θ‖₂`` and ``rel_error_centered`` is :func:`centered_rel_error`, both with exact
    spectral norms of the symmetrised ``Θ``.

    ``ntk_norm`` (``‖Θ‖₂``) and ``centered_ntk_norm`` (``‖HΘH‖₂``, :func:`centered_norm`), when the
    caller already has them, save their eigendecompositions (e.g. fitting one ``Θ`` with several
    data kernels).

    ``centered_fit=True`` fits the centred kernel instead: ``a, c ≥ 0`` minimise
    ``‖H(Θ − a·K − c·I)H‖_F`` (``H = I − 11ᵀ/n``; ``b·11ᵀ`` is invisible there), then
    ``b = max(0, 1ᵀ(Θ − a·K − c·I)1 / n²)`` fits the constant mode. The uncentred fit spends most
    of its budget on the constant mode when ``b·n`` dominates ``‖Θ‖``; the centred one spends it on
    the structure the linear model must reproduce.

    ``ntk`` is the ``n × n`` kernel (checked and symmetrised by :meth:`SymmetricOperator.dense`) or
    a dense :class:`SymmetricOperator`; for products only use :func:`fit_affine_kernel_matrix_free`.

    Probe sets for which ``K``, ``11ᵀ`` and ``I`` are linearly dependent (identical inputs,
    two inputs of equal norm, orthogonal inputs of equal norm, all-zero inputs) do not determine
    ``a, b, c``; they raise ``ValueError`` rather than return one arbitrary split.
    """
    op = _dense_ntk(ntk)
    theta = op.matrix
    assert theta is not None
    n = op.n
    x = as_feature_matrix(inputs, "inputs")
    if x.shape[0] != n:
        raise ValueError(
            f"`ntk` is {n}×{n} but `inputs` has {x.shape[0]} example(s); pass the NTK of exactly these inputs."
        )
    if n < 2:
        raise ValueError("need at least 2 probe examples to fit a, b, c (got 1); probe with more examples.")
    k = data_kernel(x).to(theta.device)
    basis = _affine_basis(k)
    gram, rhs = _normal_equations(basis, theta)
    _check_identifiable(gram)
    if centered_fit:
        coef = _dense_centered_coefficients(theta, k)
    else:

        def residual(coef: Tensor) -> float:
            return float(torch.linalg.matrix_norm(theta - torch.einsum("k,kij->ij", coef, basis)))

        coef = _best_feasible(gram, rhs, residual)
    fitted = torch.einsum("k,kij->ij", coef, basis)
    norm = op.norm() if ntk_norm is None else float(ntk_norm)
    rel_error = SymmetricOperator._exact(theta - fitted, "ntk − fit").norm() / norm
    centered = centered_rel_error(
        op, SymmetricOperator._exact(fitted, "affine fit"), theta_norm=centered_ntk_norm
    )
    a, b, c = (float(v) for v in coef)
    return AffineKernel(a=a, b=b, c=c, rel_error=rel_error, rel_error_centered=centered)


def fit_affine_kernel_matrix_free(
    op: SymmetricOperator | MatVec,
    inputs: Tensor,
    *,
    trace: float,
    ntk_norm: float | None = None,
    rtol: float = 1e-5,
    centered_fit: bool = False,
    centered_ntk_norm: float | None = None,
) -> AffineKernel:
    """:func:`fit_affine_kernel` from products ``u ↦ Θu`` only, for probe sets too large for ``n × n``.

    The Frobenius normal equations need only ``⟨Θ, K⟩_F``, ``1ᵀΘ1``, ``tr Θ`` and the Gram matrix
    of ``{K, 11ᵀ, I}``. The Gram comes from ``X`` (``n × d``) alone. ``⟨Θ, K⟩_F = tr(ΘXXᵀ)/d`` is
    exact with ``rank(X) ≤ min(n, d)`` products: with the thin SVD ``X = USVᵀ`` it is
    ``Σ_i s_i² u_iᵀΘu_i / d`` (singular values below round-off are dropped: each contributes at
    most ``‖Θ‖₂ s_i²``). ``1ᵀΘ1`` is one product. ``trace`` (``tr Θ``) is the caller's, exact:
    a product cannot give it without ``n`` of them or a noisy estimate, while per-example
    gradients give it at about the cost of one product. The constrained solve (``a, b, c ≥ 0``) is
    the dense fit's. ``rel_error`` = ``‖Θ − Θ_lin‖₂ / ‖Θ‖₂`` by Lanczos to relative accuracy
    ``rtol``; pass ``ntk_norm`` (``‖Θ‖₂``) when already known to save one Lanczos run.
    ``rel_error_centered`` (:func:`centered_rel_error`) costs two more Lanczos runs, one when
    ``centered_ntk_norm`` (``‖HΘH‖₂``) is passed.

    ``centered_fit=True`` is the dense fit's centred variant by the same trick: with ``X_c = HX``,
    ``⟨HΘH, HKH⟩_F = tr(Θ X_c X_cᵀ)/d`` takes ``rank(X_c)`` products along ``X_c``'s singular
    directions, ``⟨HΘH, H⟩_F = tr Θ − 1ᵀΘ1/n``, and the Gram of ``{HKH, H}`` comes from ``X_c``.

    ``op`` is a :class:`SymmetricOperator` or a callable mapping a float64 ``(n,)`` vector to ``Θu``
    (any floating dtype and device; it is wrapped with :meth:`SymmetricOperator.from_products`).
    """
    x = as_feature_matrix(inputs, "inputs").to(torch.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError("need at least 2 probe examples to fit a, b, c (got 1); probe with more examples.")
    if not (isinstance(trace, (int, float)) and math.isfinite(trace)):
        raise ValueError(f"`trace` must be a finite number (tr Θ), got {trace!r}.")
    if trace <= 0.0:
        raise ValueError("`ntk` is identically zero: there is no kernel to fit (are all parameters frozen?).")
    if not isinstance(op, SymmetricOperator):
        op = SymmetricOperator.from_products(op, n, "ntk")
    elif op.n != n:
        raise ValueError(f"`op` acts on {op.n}-vectors but `inputs` has {n} example(s).")
    ones = torch.ones(n, dtype=torch.float64)
    if centered_fit:
        _check_identifiable(_basis_gram(torch.linalg.svdvals(x), x, d))
        coef = _matrix_free_centered_coefficients(op, x, float(trace), float(ones @ op(ones)))
    else:
        directions, singular = _data_directions(x)
        gram = _basis_gram(singular, x, d)
        _check_identifiable(gram)
        inner_k = sum(float(w @ op(w)) for w in directions.T) / d
        rhs = torch.tensor([inner_k, float(ones @ op(ones)), float(trace)], dtype=torch.float64)
        coef = _best_feasible(gram, rhs, _quadratic_residual(gram, rhs))
    a, b, c = (float(v) for v in coef)
    fitted = AffineKernel(a=a, b=b, c=c).operator(x, dense=False)
    norm = op.norm(rtol) if ntk_norm is None else float(ntk_norm)
    if not norm > 0.0:
        raise ValueError("`ntk` is identically zero: there is no kernel to fit (are all parameters frozen?).")
    rel_error = (op - fitted).norm(rtol) / norm
    centered = centered_rel_error(op, fitted, rtol, theta_norm=centered_ntk_norm)
    return AffineKernel(a=a, b=b, c=c, rel_error=rel_error, rel_error_centered=centered)


def centered_norm(theta: SymmetricOperator, rtol: float = 1e-5) -> float:
    """``‖HΘH‖₂`` with ``H = I − 11ᵀ/n``: exact (``eigvalsh``) when dense, else Lanczos to ``rtol``
    on the products ``u ↦ H·Θ(Hu)`` (``Hu = u − mean(u)``)."""
    if theta.matrix is not None:
        return SymmetricOperator._exact(_center(theta.matrix), f"H({theta.name})H").norm()
    return _centered_products(theta).norm(rtol)


def centered_rel_error(
    theta: SymmetricOperator,
    fitted: SymmetricOperator,
    rtol: float = 1e-5,
    *,
    theta_norm: float | None = None,
) -> float:
    """``‖H(Θ − Θ_lin)H‖₂ / ‖HΘH‖₂`` with ``H = I − 11ᵀ/n``: the fit error once the constant mode is gone.

    A large constant mode ``b·11ᵀ`` (ReLU nets on non-negative inputs) makes ``‖Θ‖₂ ≈ b·n`` and the
    uncentred ratio small whatever ``a·K + c·I`` does; centring removes that mode from both kernels,
    so this ratio says how much of the rest the fit explains. Both norms are :func:`centered_norm`'s:
    exact when the operators are dense, else Lanczos to relative accuracy ``rtol`` each (the ratio
    to about ``2·rtol``). ``theta_norm`` is ``‖HΘH‖₂`` when the caller already has it.

    NaN when ``HΘH`` vanishes (a constant kernel ``Θ = β·11ᵀ``: there is nothing left to explain,
    and no ratio): ``‖HΘH‖₂ ≤ 16·n·eps·|1ᵀΘ1|/n``, the round-off of centring a constant matrix.
    """
    for name, value in (("theta", theta), ("fitted", fitted)):
        if not isinstance(value, SymmetricOperator):
            raise TypeError(
                f"`{name}` must be a SymmetricOperator (SymmetricOperator.dense(matrix) or .from_products), "
                f"got {type(value).__name__}."
            )
    if fitted.n != theta.n:
        raise ValueError(f"`theta` is {theta.n}-dimensional but `fitted` is {fitted.n}-dimensional.")
    n = theta.n
    ones = torch.ones(n, dtype=torch.float64)
    constant_scale = abs(float(ones @ theta(ones))) / n
    denominator = centered_norm(theta, rtol) if theta_norm is None else float(theta_norm)
    if _is_constant(denominator, constant_scale, n):
        return math.nan
    return centered_norm(theta - fitted, rtol) / denominator


def _is_constant(centered_norm: float, constant_scale: float, n: int) -> bool:
    """Whether ``‖HΘH‖₂`` is only the round-off of centring a constant kernel (see ``_CONSTANT_KERNEL_EPS``)."""
    scale = max(constant_scale, centered_norm)
    return centered_norm <= _CONSTANT_KERNEL_EPS * n * torch.finfo(torch.float64).eps * scale


def _center(m: Tensor) -> Tensor:
    """``HMH`` for a symmetric ``M`` by subtracting row and column means, symmetrised (round-off)."""
    c = m - m.mean(dim=0, keepdim=True) - m.mean(dim=1, keepdim=True) + m.mean()
    return (c + c.T) / 2


def _centered_products(op: SymmetricOperator) -> SymmetricOperator:
    """``u ↦ H·op(Hu)`` with ``Hu = u − mean(u)``: the centred operator from the operator's products."""

    def apply(u: Tensor) -> Tensor:
        w = op(u - u.mean())
        return w - w.mean()

    return SymmetricOperator.from_products(apply, op.n, f"H({op.name})H")


def _dense_centered_coefficients(theta: Tensor, k: Tensor) -> Tensor:
    """``(a, b, c)`` of the centred fit from the dense ``Θ`` and ``K`` (see :func:`fit_affine_kernel`)."""
    n = k.shape[0]
    eye = torch.eye(n, dtype=k.dtype, device=k.device)
    basis = torch.stack([_center(k), eye - 1.0 / n])  # HKH and H = HIH
    theta_c = _center(theta)
    gram, rhs = _normal_equations(basis, theta_c)
    _check_identifiable(gram)

    def residual(coef: Tensor) -> float:
        return float(torch.linalg.matrix_norm(theta_c - torch.einsum("k,kij->ij", coef, basis)))

    a, c = (float(v) for v in _best_feasible(gram, rhs, residual))
    b = max(0.0, (float(theta.sum()) - a * float(k.sum()) - c * n) / n**2)
    return torch.tensor([a, b, c], dtype=torch.float64)


def _matrix_free_centered_coefficients(
    op: SymmetricOperator, x: Tensor, trace: float, ones_theta_ones: float
) -> Tensor:
    """``(a, b, c)`` of the centred fit from products (see :func:`fit_affine_kernel_matrix_free`)."""
    n, d = x.shape
    xc = x - x.mean(dim=0, keepdim=True)
    directions, singular = _data_directions(xc)
    cross = float(xc.square().sum()) / d  # ⟨HKH, H⟩_F = tr HKH
    gram = torch.tensor(
        [[float((singular**4).sum()) / d**2, cross], [cross, float(n - 1)]], dtype=torch.float64
    )
    _check_identifiable(gram)
    inner_k = sum(float(w @ op(w)) for w in directions.T) / d
    rhs = torch.tensor([inner_k, trace - ones_theta_ones / n], dtype=torch.float64)
    a, c = (float(v) for v in _best_feasible(gram, rhs, _quadratic_residual(gram, rhs)))
    ones_k_ones = float(x.sum(dim=0).square().sum()) / d
    b = max(0.0, (ones_theta_ones - a * ones_k_ones - c * n) / n**2)
    return torch.tensor([a, b, c], dtype=torch.float64)


def _quadratic_residual(gram: Tensor, rhs: Tensor) -> Callable[[Tensor], float]:
    """``β ↦ βᵀGβ − 2βᵀr``: ``‖Θ − Σβ_k B_k‖²_F`` less the constant ``‖Θ‖²_F`` (the same ranking, without ``Θ``)."""

    def residual(coef: Tensor) -> float:
        return float(coef @ gram @ coef - 2.0 * coef @ rhs)

    return residual


def _dense_ntk(ntk: Tensor | SymmetricOperator) -> SymmetricOperator:
    """The dense, checked NTK operator; a zero kernel or a products-only operator is refused."""
    if isinstance(ntk, SymmetricOperator):
        if not ntk.is_dense:
            raise ValueError(
                "`ntk` is given by products only; fit it with `fit_affine_kernel_matrix_free(op, inputs, trace=...)`."
            )
        op = ntk
    else:
        op = SymmetricOperator.dense(ntk, "ntk")
    assert op.matrix is not None
    if not float(op.matrix.abs().max()) > 0.0:
        raise ValueError("`ntk` is identically zero: there is no kernel to fit (are all parameters frozen?).")
    return op


def _data_directions(x: Tensor) -> tuple[Tensor, Tensor]:
    """Columns ``w_i = s_i u_i`` with ``Σ_i w_i w_iᵀ = XXᵀ`` (numerical rank only), and all ``s_i``."""
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    cutoff = float(s.max()) * max(x.shape) * torch.finfo(x.dtype).eps if s.numel() else 0.0
    keep = s > cutoff
    return u[:, keep] * s[keep], s


def _basis_gram(singular: Tensor, x: Tensor, d: int) -> Tensor:
    """Frobenius Gram of ``{K, 11ᵀ, I}`` from ``X``: ``‖K‖²_F = Σ s⁴/d²``, ``1ᵀK1 = ‖Xᵀ1‖²/d``, ``tr K = ‖X‖²_F/d``."""
    n = x.shape[0]
    kk = float((singular**4).sum()) / d**2
    k1 = float(x.sum(dim=0).square().sum()) / d
    ki = float(x.square().sum()) / d
    return torch.tensor(
        [[kk, k1, ki], [k1, float(n * n), float(n)], [ki, float(n), float(n)]], dtype=torch.float64
    )


def _affine_basis(k: Tensor) -> Tensor:
    """The three basis matrices ``K, 11ᵀ, I`` stacked as a ``3 × n × n`` tensor."""
    n = k.shape[0]
    ones = torch.ones_like(k)
    eye = torch.eye(n, dtype=k.dtype, device=k.device)
    return torch.stack([k, ones, eye])


def _normal_equations(basis: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Frobenius Gram matrix ``⟨B_i, B_j⟩`` and right-hand side ``⟨B_i, Θ⟩``."""
    flat = basis.reshape(basis.shape[0], -1)
    return flat @ flat.T, flat @ theta.reshape(-1)


def _check_identifiable(gram: Tensor) -> None:
    """Refuse probe sets for which ``K``, ``11ᵀ``, ``I`` are (numerically) linearly dependent."""
    diag = torch.diagonal(gram)
    if bool((diag <= 0).any()):
        raise ValueError(
            "The probe inputs are all zero, so K = XXᵀ/d vanishes and `a` is not determined; "
            "probe with non-zero inputs."
        )
    scale = diag.rsqrt()
    corr = gram * scale[:, None] * scale[None, :]
    if float(torch.linalg.eigvalsh(corr)[0]) < _NOT_IDENTIFIABLE_TOL:
        raise ValueError(
            "a, b, c are not identifiable from these probe inputs: K = XXᵀ/d, 11ᵀ and I are linearly "
            "dependent (identical inputs, 2 inputs of equal norm, or mutually orthogonal inputs of "
            "equal norm, e.g. one-hot). Probe with more, and more varied, examples."
        )


def _feasible_candidates(gram: Tensor, rhs: Tensor) -> Iterator[Tensor]:
    """Unconstrained optima of every active set (each coefficient free or fixed at 0) that are all ``≥ 0``.

    For ``(a, b, c)`` these are the 8 subsets of ``{a, b, c}`` held at zero (for the centred fit's
    ``(a, c)``, 4); the empty active set comes first, and the all-zero candidate is always feasible.
    Every sub-block of ``gram`` is invertible because ``gram`` itself is positive definite
    (:func:`_check_identifiable`).
    """
    size = gram.shape[0]
    for mask in range(2**size):  # bit k set: coefficient k held at zero
        free = [k for k in range(size) if not (mask >> k) & 1]
        coef = torch.zeros(size, dtype=gram.dtype, device=gram.device)
        if free:
            coef[free] = torch.linalg.solve(gram[free][:, free], rhs[free])
        if not bool((coef < 0).any()):
            yield coef


def _best_feasible(gram: Tensor, rhs: Tensor, residual: Callable[[Tensor], float]) -> Tensor:
    """Exact minimiser of ``‖Θ − Σ β_k B_k‖_F`` subject to every ``β_k ≥ 0``.

    For a strictly convex quadratic the constrained optimum has some active set ``A`` (the
    coefficients at zero) and its free coefficients are strictly positive, so it is the
    unconstrained optimum on the subspace ``{β_A = 0}`` -- one of the candidates -- and every other
    feasible candidate is a feasible point, hence at least as bad. Enumerating all ``2^k`` active
    sets and keeping the feasible candidate of least ``residual`` is therefore exact (8 solves of
    at most 3×3 systems). ``residual`` ranks candidates: the dense fit measures
    ``‖Θ − Σβ_k B_k‖_F`` itself, the matrix-free fit uses the quadratic form of the normal equations
    (the same ranking, without ``Θ``).
    """
    best: Tensor | None = None
    best_loss = math.inf
    for coef in _feasible_candidates(gram, rhs):
        loss = residual(coef)
        if loss < best_loss:
            best, best_loss = coef, loss
    assert best is not None  # the all-zero candidate is always feasible
    return best
