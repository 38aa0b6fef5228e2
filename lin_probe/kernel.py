"""The data kernel ``K = XXᵀ/d``, the affine fit ``Θ ≈ a·K + b·11ᵀ + c·I`` and the two-layer closed forms.

Hu et al. (2020) show that early in training a network's NTK is close to an affine transform of
the data kernel; these three numbers are what the linear "shadow" model is built from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lin_probe._validation import as_feature_matrix, check_finite
from lin_probe.spectral import spectral_norm

MatVec = Callable[[Tensor], Tensor]


def data_kernel(inputs: Tensor) -> Tensor:
    """``K = XXᵀ/d`` in float64, with ``X`` the inputs flattened per example (``n × d``)."""
    x = as_feature_matrix(inputs).to(torch.float64)
    return x @ x.T / x.shape[1]


@dataclass(frozen=True)
class AffineKernel:
    """``Θ_lin = a·K + b·11ᵀ + c·I`` with ``K = XXᵀ/d``.

    ``rel_error`` is ``‖Θ − Θ_lin‖₂ / ‖Θ‖₂`` for a fitted kernel (how well the paper's claim holds for
    this model) and ``None`` for a closed form, which was not fitted to anything.
    """

    a: float
    b: float
    c: float
    rel_error: float | None = None

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

    def features(self, inputs: Tensor) -> Tensor:
        """``ψ(x) = [√a·x/√d ; √b]`` (``n × (d+1)``, inputs' dtype), so that ``ψψᵀ = a·K + b·11ᵀ``.

        The ``c·I`` part has no feature map linear in the inputs: it is what the network uses to fit
        individual training points, and the linear model lacks it by construction.
        """
        x = as_feature_matrix(inputs)
        d = x.shape[1]
        scaled = x * math.sqrt(max(self.a, 0.0) / d)
        bias = torch.full((x.shape[0], 1), math.sqrt(max(self.b, 0.0)), dtype=x.dtype, device=x.device)
        return torch.cat([scaled, bias], dim=1)


# ---------------------------------------------------------------------------------------------
# Affine fit Θ ≈ a·K + b·11ᵀ + c·I
# ---------------------------------------------------------------------------------------------

_NOT_IDENTIFIABLE_TOL = 1e-10  # smallest eigenvalue of the basis' Frobenius correlation matrix


def fit_affine_kernel(ntk: Tensor, inputs: Tensor) -> AffineKernel:
    """Least-squares fit of ``Θ ≈ a·K + b·11ᵀ + c·I`` over all ``n²`` entries, with ``a, b ≥ 0``.

    The three numbers are what the linear shadow is built from, so the fit is exact (not iterative):
    the 3×3 Frobenius normal equations, and when their solution breaks a bound, the best of the
    boundary sub-problems (exact for a convex quadratic). Everything is computed in float64.
    ``rel_error`` is ``‖Θ − Θ_lin‖₂ / ‖Θ‖₂`` with exact spectral norms of the symmetrised ``Θ``.

    Probe sets for which ``K``, ``11ᵀ`` and ``I`` are linearly dependent (identical inputs,
    two inputs of equal norm, orthogonal inputs of equal norm, all-zero inputs) do not determine
    ``a, b, c``; they raise ``ValueError`` rather than return one arbitrary split.
    """
    theta = _checked_ntk(ntk)
    n = theta.shape[0]
    x = as_feature_matrix(inputs, "inputs")
    if x.shape[0] != n:
        raise ValueError(
            f"`ntk` is {n}×{n} but `inputs` has {x.shape[0]} example(s); pass the NTK of exactly these inputs."
        )
    if n < 2:
        raise ValueError("need at least 2 probe examples to fit a, b, c (got 1); probe with more examples.")
    basis = _affine_basis(data_kernel(x).to(theta.device))
    gram, rhs = _normal_equations(basis, theta)
    _check_identifiable(gram)
    coef = _best_feasible(basis, gram, rhs, theta)
    fitted = torch.einsum("k,kij->ij", coef, basis)
    rel_error = _spectral_norm_sym(theta - fitted) / _spectral_norm_sym(theta)
    a, b, c = (float(v) for v in coef)
    return AffineKernel(a=a, b=b, c=c, rel_error=rel_error)


def fit_affine_kernel_matrix_free(
    matvec: MatVec,
    inputs: Tensor,
    *,
    trace: float,
    ntk_norm: float | None = None,
    rtol: float = 1e-5,
) -> AffineKernel:
    """:func:`fit_affine_kernel` from products ``u ↦ Θu`` only, for probe sets too large for ``n × n``.

    The Frobenius normal equations need only ``⟨Θ, K⟩_F``, ``1ᵀΘ1``, ``tr Θ`` and the Gram matrix
    of ``{K, 11ᵀ, I}``. The Gram comes from ``X`` (``n × d``) alone. ``⟨Θ, K⟩_F = tr(ΘXXᵀ)/d`` is
    exact with ``rank(X) ≤ min(n, d)`` products: with the thin SVD ``X = USVᵀ`` it is
    ``Σ_i s_i² u_iᵀΘu_i / d`` (singular values below round-off are dropped: each contributes at
    most ``‖Θ‖₂ s_i²``). ``1ᵀΘ1`` is one product. ``trace`` (``tr Θ``) is the caller's, exact:
    a product cannot give it without ``n`` of them or a noisy estimate, while per-example
    gradients give it at about the cost of one product. The constrained solve (``a, b ≥ 0``) is
    the dense fit's. ``rel_error`` = ``‖Θ − Θ_lin‖₂ / ‖Θ‖₂`` by Lanczos to relative accuracy
    ``rtol``; pass ``ntk_norm`` (``‖Θ‖₂``) when already known to save one Lanczos run.

    ``matvec`` maps a float64 ``(n,)`` vector to ``Θu`` (any floating dtype and device).
    """
    x = as_feature_matrix(inputs, "inputs").to(torch.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError("need at least 2 probe examples to fit a, b, c (got 1); probe with more examples.")
    if not (isinstance(trace, (int, float)) and math.isfinite(trace)):
        raise ValueError(f"`trace` must be a finite number (tr Θ), got {trace!r}.")
    if trace <= 0.0:
        raise ValueError("`ntk` is identically zero: there is no kernel to fit (are all parameters frozen?).")
    op = _float64_operator(matvec, n)
    directions, singular = _data_directions(x)
    gram = _basis_gram(singular, x, d)
    _check_identifiable(gram)
    ones = torch.ones(n, dtype=torch.float64)
    inner_k = sum(float(w @ op(w)) for w in directions.T) / d
    rhs = torch.tensor([inner_k, float(ones @ op(ones)), float(trace)], dtype=torch.float64)
    a, b, c = (float(v) for v in _best_feasible_quadratic(gram, rhs))
    fitted = AffineKernel(a=a, b=b, c=c).matvec(x)
    norm = spectral_norm(op, n, rtol=rtol) if ntk_norm is None else float(ntk_norm)
    if not norm > 0.0:
        raise ValueError("`ntk` is identically zero: there is no kernel to fit (are all parameters frozen?).")
    rel_error = spectral_norm(lambda u: op(u) - fitted(u), n, rtol=rtol) / norm
    return AffineKernel(a=a, b=b, c=c, rel_error=rel_error)


def _float64_operator(matvec: MatVec, n: int) -> MatVec:
    """``matvec`` with its output checked (``(n,)``, finite) and returned as float64 on CPU."""
    if not callable(matvec):
        raise TypeError(f"`matvec` must be a callable u ↦ Θu, got {type(matvec).__name__}.")

    def apply(u: Tensor) -> Tensor:
        w = matvec(u)
        if not isinstance(w, Tensor) or tuple(w.shape) != (n,):
            raise ValueError(
                f"`matvec` must return a tensor of shape ({n},), got {getattr(w, 'shape', w)!r}."
            )
        check_finite(w, "matvec(u)")
        return w.detach().to("cpu", torch.float64)

    return apply


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


def _checked_ntk(ntk: Tensor) -> Tensor:
    """Validate the NTK (square, finite, symmetric, non-zero) and return its float64 symmetrisation.

    A float32 ``JJᵀ`` is symmetric only up to round-off, so a small asymmetry is tolerated and
    averaged away; a larger one means the matrix is not an NTK.
    """
    if not isinstance(ntk, Tensor):
        raise TypeError(f"`ntk` must be a torch.Tensor (n × n), got {type(ntk).__name__}.")
    if not ntk.is_floating_point():
        raise TypeError(f"`ntk` must be a real floating-point tensor, got dtype {ntk.dtype}.")
    if ntk.dim() != 2 or ntk.shape[0] != ntk.shape[1]:
        raise ValueError(f"`ntk` must be a square n × n matrix, got shape {tuple(ntk.shape)}.")
    check_finite(ntk, "ntk")
    theta = ntk.to(torch.float64)
    scale = float(theta.abs().max()) if theta.numel() else 0.0
    if scale == 0.0:
        raise ValueError("`ntk` is identically zero: there is no kernel to fit (are all parameters frozen?).")
    tol = max(1e-6, 100.0 * torch.finfo(ntk.dtype).eps)
    asym = float((theta - theta.T).abs().max())
    if asym > tol * scale:
        raise ValueError(
            f"`ntk` is not symmetric (max |Θ − Θᵀ| = {asym:.3g}, {asym / scale:.3g} of max |Θ|); "
            "an NTK is J Jᵀ — check that rows and columns index the same probe examples."
        )
    return 0.5 * (theta + theta.T)


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
    """Unconstrained optima of the four active sets (none, ``a = 0``, ``b = 0``, both) with ``a, b ≥ 0``."""
    for fixed in ((), (0,), (1,), (0, 1)):
        free = [k for k in range(3) if k not in fixed]
        coef = torch.zeros(3, dtype=gram.dtype, device=gram.device)
        coef[free] = torch.linalg.solve(gram[free][:, free], rhs[free])
        if not bool((coef[:2] < 0).any()):
            yield coef


def _best_feasible(basis: Tensor, gram: Tensor, rhs: Tensor, theta: Tensor) -> Tensor:
    """Exact minimiser of ``‖Θ − Σ β_k B_k‖_F`` subject to ``β_0 = a ≥ 0``, ``β_1 = b ≥ 0``.

    For a strictly convex quadratic the constrained optimum is the unconstrained optimum of its own
    active set, and every feasible candidate is at least as bad, so enumerating the four active
    sets and keeping the best feasible candidate is exact.
    """
    best: Tensor | None = None
    best_loss = math.inf
    for coef in _feasible_candidates(gram, rhs):
        loss = float(torch.linalg.matrix_norm(theta - torch.einsum("k,kij->ij", coef, basis)))
        if loss < best_loss:
            best, best_loss = coef, loss
    assert best is not None  # the (a, b) = (0, 0) candidate is always feasible
    return best


def _best_feasible_quadratic(gram: Tensor, rhs: Tensor) -> Tensor:
    """:func:`_best_feasible` without ``Θ``: ``‖Θ − Σβ_k B_k‖²_F = ‖Θ‖²_F − 2βᵀr + βᵀGβ``, and the
    constant ``‖Θ‖²_F`` does not change which candidate is best."""
    best: Tensor | None = None
    best_loss = math.inf
    for coef in _feasible_candidates(gram, rhs):
        loss = float(coef @ gram @ coef - 2.0 * coef @ rhs)
        if loss < best_loss:
            best, best_loss = coef, loss
    assert best is not None  # the (a, b) = (0, 0) candidate is always feasible
    return best


def _spectral_norm_sym(matrix: Tensor) -> float:
    """Largest |eigenvalue| of a symmetric matrix (exact, via ``eigvalsh``)."""
    return float(torch.linalg.eigvalsh(matrix).abs().max())


# ---------------------------------------------------------------------------------------------
# Gaussian moments of an activation and the two-layer closed forms
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianMoments:
    """Moments of an activation ``φ`` under ``g ~ N(0, 1)``: the inputs to the two-layer table.

    ``e_d2phi`` is the distributional ``E φ''(g)`` (a kink contributes its Dirac delta, e.g.
    ``1/√(2π)`` for ReLU).
    """

    e_phi: float  # E φ(g)
    e_dphi: float  # E φ'(g)
    e_d2phi: float  # E φ''(g)
    e_phi_sq: float  # E φ(g)²
    e_dphi_sq: float  # E φ'(g)²


_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

_CLOSED_FORM: dict[str, GaussianMoments] = {
    "relu": GaussianMoments(_INV_SQRT_2PI, 0.5, _INV_SQRT_2PI, 0.5, 0.5),
    "identity": GaussianMoments(0.0, 1.0, 0.0, 1.0, 1.0),
    # erf: odd; E erf'(g) = (2/√π)·E e^{-g²} = 2/√(3π); E erf(g)² = (2/π)·asin(2/3); E erf'(g)² = 4/(π√5)
    "erf": GaussianMoments(
        0.0,
        2.0 / math.sqrt(3.0 * math.pi),
        0.0,
        2.0 / math.pi * math.asin(2.0 / 3.0),
        4.0 / (math.pi * math.sqrt(5.0)),
    ),
}

_SMOOTH: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "gelu": lambda t: torch.nn.functional.gelu(t, approximate="none"),
    "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus,
}

_ALIASES = {"linear": "identity"}
_LAYERS = ("first", "second", "both")
ACTIVATION_NAMES: tuple[str, ...] = tuple(sorted([*_CLOSED_FORM, *_SMOOTH, *_ALIASES]))

_HERMITE_NODES = 240  # analytic activations: error ≪ 1e-12 (checked against scipy.integrate.quad)
_RANGE = 12.0  # N(0, 1) mass beyond ±12 is ~4e-33: negligible for any polynomially bounded φ
_KINK_GRID = 16385  # grid on which jumps of φ and φ' are detected (spacing ~1.5e-3)
_LEGENDRE_NODES = 16
_PANEL_TOL = 1e-14  # adaptive Gauss–Legendre: accepted per-panel error (× panel width, × scale)


def gaussian_moments(activation: str | Callable[[Tensor], Tensor]) -> GaussianMoments:
    """``E φ, E φ', E φ'', E φ², E φ'²`` for ``g ~ N(0, 1)``, accurate to ~1e-10.

    Named activations use closed forms (relu, identity, erf) or high-order Gauss–Hermite (smooth
    ones). A callable (an elementwise torch function, differentiable by autograd) may have kinks:
    ``E φ'`` and ``E φ''`` come from Stein's identities ``E[g φ(g)]`` and ``E[(g² − 1) φ(g)]`` (no
    derivatives, so kinks and their Dirac deltas are exact), ``E φ'²`` from autograd, all integrated
    by adaptive Gauss–Legendre on [-12, 12] split at detected kinks.
    """
    if isinstance(activation, str):
        name = _canonical_name(activation)
        if name in _CLOSED_FORM:
            return _CLOSED_FORM[name]
        return _hermite_moments(_SMOOTH[name])
    if callable(activation):
        return _callable_moments(activation)
    raise TypeError(
        f"`activation` must be a name ({', '.join(ACTIVATION_NAMES)}) or an elementwise torch function, "
        f"got {type(activation).__name__}."
    )


def two_layer_coefficients(
    activation: str | Callable[[Tensor], Tensor], *, layer: str = "both", s: float = 0.0
) -> AffineKernel:
    """Closed-form ``a, b, c`` of the NTK of ``f(x) = m^{-1/2} Σ_r v_r φ(w_rᵀx/√d)`` (DESIGN §1).

    ``layer`` is the trained layer: ``"first"`` (W), ``"second"`` (v) or ``"both"`` (same lr).
    ``s = tr(Σ²)/d²`` for inputs with ``‖x‖² = d`` and second moment ``Σ`` (``1/d`` for isotropic
    inputs); it carries the ``ρ²`` Hermite term, which matters at moderate ``d``.
    ``rel_error`` is ``None``: nothing was fitted.
    """
    if layer not in _LAYERS:
        raise ValueError(f"unknown layer {layer!r}; use one of {', '.join(map(repr, _LAYERS))}.")
    if not (isinstance(s, (int, float)) and math.isfinite(s) and 0.0 <= s <= 1.0):
        raise ValueError(f"`s` = tr(Σ²)/d² must be a number in [0, 1] (1/d for isotropic inputs), got {s!r}.")
    mom = gaussian_moments(activation)
    a = mom.e_dphi**2
    first = (a, mom.e_d2phi**2 * s, mom.e_dphi_sq)
    second = (a, mom.e_phi**2 + mom.e_d2phi**2 * s / 2.0, mom.e_phi_sq)
    rows = {"first": [first], "second": [second], "both": [first, second]}[layer]
    a_sum = sum(r[0] for r in rows)
    b_sum = sum(r[1] for r in rows)
    c_sum = sum(r[2] - r[0] - r[1] for r in rows)
    return AffineKernel(a=a_sum, b=b_sum, c=c_sum, rel_error=None)


def _canonical_name(name: str) -> str:
    """Map a user-given activation name to a key of the tables, or raise listing the valid names."""
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in _CLOSED_FORM and key not in _SMOOTH:
        raise ValueError(
            f"unknown activation {name!r}; use one of {', '.join(ACTIVATION_NAMES)}, "
            "or pass an elementwise torch function (e.g. torch.nn.functional.silu)."
        )
    return key


def _values_and_slopes(phi: Callable[[Tensor], Tensor], points: Tensor) -> tuple[Tensor, Tensor]:
    """``φ`` and ``φ'`` (autograd, float64) at ``points``, checking that ``φ`` is elementwise."""
    x = points.detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        y = phi(x)
        if not isinstance(y, Tensor) or y.shape != x.shape or not y.is_floating_point():
            raise TypeError(
                "`activation` must map a float tensor to a float tensor of the same shape (elementwise), "
                f"got {type(y).__name__} {tuple(getattr(y, 'shape', ()))} for input {tuple(x.shape)}."
            )
        if not y.requires_grad:
            raise TypeError(
                "`activation` must be differentiable by torch.autograd (torch ops only; no .detach(), "
                "numpy or in-place tricks), and not constant."
            )
        (dy,) = torch.autograd.grad(y.sum(), x)
    y, dy = y.detach().to(torch.float64), dy.to(torch.float64)
    check_finite(y, "activation(g)")
    check_finite(dy, "activation'(g)")
    return y, dy


def _stein_integrands(g: Tensor, y: Tensor, dy: Tensor) -> Tensor:
    """Rows whose Gaussian expectations are ``E φ, E φ', E φ'', E φ², E φ'²`` (Stein for φ', φ'')."""
    return torch.stack([y, g * y, (g * g - 1.0) * y, y * y, dy * dy])


def _as_moments(values: Tensor) -> GaussianMoments:
    """Package the five expectations, in the order of ``_stein_integrands``."""
    return GaussianMoments(*(float(v) for v in values))


def _hermite_moments(phi: Callable[[Tensor], Tensor]) -> GaussianMoments:
    """Probabilists' Gauss–Hermite: spectrally accurate for analytic activations."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(_HERMITE_NODES)
    g = torch.from_numpy(nodes)
    w = torch.from_numpy(weights / math.sqrt(2.0 * math.pi))
    y, dy = _values_and_slopes(phi, g)
    return _as_moments(_stein_integrands(g, y, dy) @ w)


def _callable_moments(phi: Callable[[Tensor], Tensor]) -> GaussianMoments:
    """Kink-aware moments of an arbitrary elementwise activation (see ``gaussian_moments``)."""
    grid = torch.linspace(-_RANGE, _RANGE, _KINK_GRID, dtype=torch.float64)
    y, dy = _values_and_slopes(phi, grid)
    _refuse_jumps(phi, grid, y)
    kinks = _locate_jumps(lambda t: _values_and_slopes(phi, t)[1], grid, dy)
    breaks = torch.cat([torch.linspace(-_RANGE, _RANGE, 49, dtype=torch.float64), kinks])
    breaks = torch.unique(breaks)  # sorted
    return _as_moments(_adaptive_gauss_legendre(phi, breaks))


def _suspect_intervals(values: Tensor) -> Tensor:
    """Grid intervals whose increment dwarfs those two intervals away: where a jump may sit.

    A smooth function's increments vary slowly, so a ratio above 4 flags a jump; a false alarm only
    adds a harmless split point. Comparing two intervals away (not adjacent) still catches a jump
    that straddles a grid point, which splits it over two adjacent intervals.
    """
    inc = (values[1:] - values[:-1]).abs()
    pad = torch.nn.functional.pad(inc, (2, 2), value=math.inf)
    ref = torch.maximum(pad[:-4], pad[4:])
    floor = 1e-10 * (1.0 + float(values.abs().max()))
    return torch.nonzero((inc > 4.0 * ref) & (inc > floor)).flatten()


def _bisect_jumps(fn: Callable[[Tensor], Tensor], lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Shrink each ``[lo, hi]`` onto the jump of ``fn`` inside it (60 halvings: to round-off)."""
    f_lo, f_hi = fn(lo), fn(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        f_mid = fn(mid)
        go_left = (f_mid - f_lo).abs() > (f_hi - f_mid).abs()
        hi, f_hi = torch.where(go_left, mid, hi), torch.where(go_left, f_mid, f_hi)
        lo, f_lo = torch.where(go_left, lo, mid), torch.where(go_left, f_lo, f_mid)
    return 0.5 * (lo + hi), (f_hi - f_lo).abs()


def _locate_jumps(fn: Callable[[Tensor], Tensor], grid: Tensor, values: Tensor) -> Tensor:
    """Positions of (suspected) jumps of ``fn``, sampled as ``values`` on ``grid``."""
    idx = _suspect_intervals(values)
    if idx.numel() == 0:
        return grid[:0]
    return _bisect_jumps(fn, grid[idx], grid[idx + 1])[0]


def _refuse_jumps(phi: Callable[[Tensor], Tensor], grid: Tensor, values: Tensor) -> None:
    """Raise if ``φ`` itself jumps: then ``E φ'(g)²`` is infinite and no kernel table applies."""
    idx = _suspect_intervals(values)
    if idx.numel() == 0:
        return
    where, size = _bisect_jumps(lambda t: _values_and_slopes(phi, t)[0], grid[idx], grid[idx + 1])
    bad = size > 1e-6 * (1.0 + float(values.abs().max()))
    if bool(bad.any()):
        at = float(where[bad][0])
        raise ValueError(
            f"`activation` is discontinuous near x = {at:.6g}: E φ'(g)² is infinite and the NTK "
            "closed forms do not apply. Use a continuous activation."
        )


def _adaptive_gauss_legendre(phi: Callable[[Tensor], Tensor], breaks: Tensor) -> Tensor:
    """Gaussian expectations of the five Stein integrands over ``[breaks[0], breaks[-1]]``.

    Each panel is compared with its two halves; panels that disagree by more than the tolerance
    are split, so a kink missed by detection still converges (only its panel is refined).
    """
    nodes, weights = np.polynomial.legendre.leggauss(_LEGENDRE_NODES)
    ref = (torch.from_numpy(nodes), torch.from_numpy(weights))
    lo, hi = breaks[:-1], breaks[1:]
    coarse = _panel_integrals(phi, lo, hi, ref)
    scale = 1.0 + coarse.sum(dim=1).abs()
    total = torch.zeros(5, dtype=torch.float64)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        left, right = _panel_integrals(phi, lo, mid, ref), _panel_integrals(phi, mid, hi, ref)
        fine = left + right
        err = ((fine - coarse).abs() / scale[:, None]).amax(dim=0)
        done = err <= _PANEL_TOL * (hi - lo) + 1e-300
        total += fine[:, done].sum(dim=1)
        keep = ~done
        if not bool(keep.any()):
            return total
        lo, hi = torch.cat([lo[keep], mid[keep]]), torch.cat([mid[keep], hi[keep]])
        coarse = torch.cat([left[:, keep], right[:, keep]], dim=1)
    return total + coarse.sum(dim=1)  # refinement cap: accept the finest estimate


def _panel_integrals(
    phi: Callable[[Tensor], Tensor], lo: Tensor, hi: Tensor, ref: tuple[Tensor, Tensor]
) -> Tensor:
    """``∫ f_k(g) ρ(g) dg`` over each panel ``[lo_j, hi_j]`` (``5 × panels``), Gauss–Legendre."""
    nodes, weights = ref
    half = 0.5 * (hi - lo)
    g = (0.5 * (hi + lo))[:, None] + half[:, None] * nodes[None, :]
    y, dy = _values_and_slopes(phi, g.reshape(-1))
    density = torch.exp(-0.5 * g * g) * _INV_SQRT_2PI
    w = (half[:, None] * weights[None, :] * density).reshape(-1)
    f = _stein_integrands(g.reshape(-1), y, dy) * w
    return f.reshape(5, *g.shape).sum(dim=2)
