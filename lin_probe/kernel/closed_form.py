"""Closed-form ``a, b, c`` of two-layer networks' NTK, from Gaussian moments of the activation.

For ``f(x) = m^{-1/2} Σ_r v_r φ(w_rᵀx/√d)`` at infinite width the NTK is exactly affine in the
data kernel up to the Hermite terms kept here; these numbers are the reference the fitted
``a, b, c`` are checked against (Hu et al., 2020, two-layer case). Kept apart from the affine fit:
this is numerical quadrature, the fit is linear algebra.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lin_probe._validation import check_finite
from lin_probe.kernel.affine import AffineKernel


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
    """Closed-form ``a, b, c`` of the NTK of ``f(x) = m^{-1/2} Σ_r v_r φ(w_rᵀx/√d)`` at infinite width.

    With ``g ~ N(0, 1)``: training the first layer gives ``a = (Eφ')²``, ``b = (Eφ'')²·s`` and
    ``c = Eφ'² − a − b``; the second ``a = (Eφ')²``, ``b = (Eφ)² + (Eφ'')²·s/2`` and
    ``c = Eφ² − a − b``; both layers (same learning rate) add the two. ``c`` is what the affine
    terms leave of the diagonal ``Θ(x, x)``. ``layer`` is the trained layer: ``"first"`` (W), ``"second"`` (v) or ``"both"`` (same lr).
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
