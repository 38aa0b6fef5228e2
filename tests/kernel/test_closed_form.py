"""Tests for ``lin_probe.kernel.closed_form``: Gaussian moments, two-layer closed forms, and the paper's claim.

References are independent of the code under test: scipy quadrature of hand-written derivatives,
hand-derived closed forms, and an NTK computed analytically from the explicit Jacobians of a
two-layer net (for the claim that a wide net's NTK is the closed-form affine kernel).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy import integrate, special

from lin_probe.kernel import fit_affine_kernel, gaussian_moments, two_layer_coefficients

# ---------------------------------------------------------------------------------------------
# Independent reference moments: scipy.integrate.quad of hand-written φ, φ', φ''
# ---------------------------------------------------------------------------------------------

SQRT2PI = math.sqrt(2.0 * math.pi)


def _rho(g: float) -> float:
    return math.exp(-0.5 * g * g) / SQRT2PI


def _Phi(g: float) -> float:
    return 0.5 * (1.0 + math.erf(g / math.sqrt(2.0)))


def _quad(f: Callable[[float], float], kinks: tuple[float, ...]) -> float:
    """∫ f(g) ρ(g) dg over R, split at the kinks (quad's own error ≪ 1e-11 at these settings)."""
    edges = [-math.inf, *sorted(kinks), math.inf]
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        val, _ = integrate.quad(lambda g: f(g) * _rho(g), lo, hi, epsabs=1e-13, epsrel=1e-13, limit=200)
        total += val
    return total


# name -> (φ, φ', φ'' away from kinks, {kink: jump of φ'})
Scalar = Callable[[float], float]
REFERENCE: dict[str, tuple[Scalar, Scalar, Scalar, dict[float, float]]] = {
    "relu": (lambda g: max(g, 0.0), lambda g: float(g > 0), lambda g: 0.0, {0.0: 1.0}),
    "identity": (lambda g: g, lambda g: 1.0, lambda g: 0.0, {}),
    "tanh": (
        math.tanh,
        lambda g: 1.0 - math.tanh(g) ** 2,
        lambda g: -2.0 * math.tanh(g) * (1.0 - math.tanh(g) ** 2),
        {},
    ),
    "sigmoid": (
        special.expit,
        lambda g: special.expit(g) * (1.0 - special.expit(g)),
        lambda g: special.expit(g) * (1.0 - special.expit(g)) * (1.0 - 2.0 * special.expit(g)),
        {},
    ),
    "softplus": (
        lambda g: float(np.logaddexp(0.0, g)),
        special.expit,
        lambda g: special.expit(g) * (1.0 - special.expit(g)),
        {},
    ),
    "gelu": (lambda g: g * _Phi(g), lambda g: _Phi(g) + g * _rho(g), lambda g: (2.0 - g * g) * _rho(g), {}),
    "erf": (
        math.erf,
        lambda g: 2.0 / math.sqrt(math.pi) * math.exp(-g * g),
        lambda g: -4.0 * g / math.sqrt(math.pi) * math.exp(-g * g),
        {},
    ),
    "leaky_relu_0.1": (
        lambda g: g if g > 0 else 0.1 * g,
        lambda g: 1.0 if g > 0 else 0.1,
        lambda g: 0.0,
        {0.0: 0.9},
    ),
    "abs": (abs, lambda g: 1.0 if g > 0 else -1.0, lambda g: 0.0, {0.0: 2.0}),
    # kink off any grid point, to exercise kink localisation
    "relu_shift": (lambda g: max(g - 0.3137, 0.0), lambda g: float(g > 0.3137), lambda g: 0.0, {0.3137: 1.0}),
    "hardtanh": (
        lambda g: min(max(g, -1.0), 1.0),
        lambda g: float(abs(g) < 1.0),
        lambda g: 0.0,
        {-1.0: 1.0, 1.0: -1.0},
    ),
}


@functools.cache  # scipy quad is the slow part; the same references serve several tests
def _reference_moments(key: str) -> tuple[float, float, float, float, float]:
    """(E φ, E φ', E φ'', E φ², E φ'²); E φ'' = ∫ φ'' ρ + Σ jump·ρ(kink) (distributional derivative)."""
    phi, dphi, d2phi, jumps = REFERENCE[key]
    kinks = tuple(jumps)
    delta = sum(jump * _rho(at) for at, jump in jumps.items())
    return (
        _quad(phi, kinks),
        _quad(dphi, kinks),
        _quad(d2phi, kinks) + delta,
        _quad(lambda g: phi(g) ** 2, kinks),
        _quad(lambda g: dphi(g) ** 2, kinks),
    )


def _design_table(mom: tuple[float, ...], layer: str, s: float) -> tuple[float, float, float]:
    """The two-layer table (NTK of ``m^{-1/2} Σ v_r φ(w_rᵀx/√d)`` at infinite width), written out
    independently of the library: first layer ``a = (Eφ')², b = (Eφ'')²·s, c = Eφ'² − a − b``; second
    layer ``a = (Eφ')², b = (Eφ)² + (Eφ'')²·s/2, c = Eφ² − a − b``; "both" adds them."""
    e_phi, e_dphi, e_d2phi, e_phi_sq, e_dphi_sq = mom
    a = e_dphi**2
    b1, b2 = e_d2phi**2 * s, e_phi**2 + e_d2phi**2 * s / 2.0
    first, second = (a, b1, e_dphi_sq - a - b1), (a, b2, e_phi_sq - a - b2)
    if layer == "first":
        return first
    if layer == "second":
        return second
    return tuple(x + y for x, y in zip(first, second, strict=True))  # type: ignore[return-value]


def _moment_tuple(activation: str | Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, ...]:
    m = gaussian_moments(activation)
    return (m.e_phi, m.e_dphi, m.e_d2phi, m.e_phi_sq, m.e_dphi_sq)


NAMED = ["relu", "identity", "tanh", "sigmoid", "softplus", "gelu", "erf"]
CALLABLES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "leaky_relu_0.1": lambda t: torch.nn.functional.leaky_relu(t, 0.1),
    "abs": torch.abs,
    "relu_shift": lambda t: torch.relu(t - 0.3137),
    "hardtanh": torch.nn.functional.hardtanh,
}


# Moments: the spec asks for 1e-6; scipy's quad here is good to ~1e-12 and our quadratures to
# ~1e-14, so 1e-9 still leaves a wide margin while catching any O(1/nodes) kink error (~1e-3).
@pytest.mark.parametrize("name", NAMED)
def test_named_moments_match_scipy(name: str) -> None:
    np.testing.assert_allclose(_moment_tuple(name), _reference_moments(name), rtol=0, atol=1e-9)


@pytest.mark.parametrize("key", list(CALLABLES))
def test_callable_moments_match_scipy_including_kinks(key: str) -> None:
    np.testing.assert_allclose(_moment_tuple(CALLABLES[key]), _reference_moments(key), rtol=0, atol=1e-9)


def test_kinked_callables_match_closed_forms() -> None:
    """Hand-derived closed forms (Dirac delta in φ'' at the kink), independent of any quadrature."""
    r0 = 1.0 / SQRT2PI
    expected = {
        "relu": (r0, 0.5, r0, 0.5, 0.5),
        "leaky_relu_0.1": (0.9 * r0, 0.55, 0.9 * r0, 0.505, 0.505),
        "abs": (2.0 * r0, 0.0, 2.0 * r0, 1.0, 1.0),
    }
    for key, ref in expected.items():
        np.testing.assert_allclose(_moment_tuple(CALLABLES[key]), ref, rtol=0, atol=1e-9, err_msg=key)
    np.testing.assert_allclose(_moment_tuple("relu"), expected["relu"], rtol=0, atol=1e-12)
    assert _moment_tuple("linear") == _moment_tuple("identity")


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("layer", ["first", "second", "both"])
def test_two_layer_coefficients_match_scipy(name: str, layer: str) -> None:
    s = 1.0 / 7.0  # non-trivial s so the ρ² terms are exercised
    got = two_layer_coefficients(name, layer=layer, s=s)
    ref = _design_table(_reference_moments(name), layer, s)
    np.testing.assert_allclose((got.a, got.b, got.c), ref, rtol=0, atol=1e-6)  # the spec's tolerance
    assert got.rel_error is None


@pytest.mark.parametrize("key", ["leaky_relu_0.1", "relu", "abs"])
def test_two_layer_coefficients_for_kinked_callables(key: str) -> None:
    s = 1.0 / 64.0
    for layer in ("first", "second", "both"):
        got = two_layer_coefficients(CALLABLES[key], layer=layer, s=s)
        ref = _design_table(_reference_moments(key), layer, s)
        np.testing.assert_allclose((got.a, got.b, got.c), ref, rtol=0, atol=1e-6, err_msg=layer)


def test_activation_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*relu.*tanh"):
        two_layer_coefficients("swish")
    with pytest.raises(ValueError, match="unknown layer"):
        two_layer_coefficients("relu", layer="third")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        two_layer_coefficients("relu", s=-0.1)
    with pytest.raises(ValueError, match="discontinuous"):
        gaussian_moments(torch.sign)
    with pytest.raises(TypeError, match="elementwise"):
        gaussian_moments(lambda t: t.sum())
    with pytest.raises(TypeError, match="autograd"):
        gaussian_moments(lambda t: torch.from_numpy(np.tanh(t.detach().numpy())))
    with pytest.raises(TypeError, match="name"):
        gaussian_moments(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The paper's claim (Hu et al. 2020): a wide two-layer net's NTK ≈ the closed-form affine kernel
# ---------------------------------------------------------------------------------------------

_ACTS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "relu": (torch.relu, lambda z: (z > 0).to(z.dtype)),
    "tanh": (torch.tanh, lambda z: 1.0 - torch.tanh(z) ** 2),
}


def _sphere(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x * math.sqrt(d) / x.norm(dim=1, keepdim=True)


def _two_layer_ntk_blocks(
    x: torch.Tensor, m: int, act: str, gen: torch.Generator, chunk: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """First- and second-layer NTK blocks of f(x) = m^{-1/2} Σ v_r φ(w_rᵀx/√d), from the Jacobians.

    ∂f/∂w_r = m^{-1/2} v_r φ'(z_r) x/√d and ∂f/∂v_r = m^{-1/2} φ(z_r), so the blocks are
    (1/m) Σ_r v_r² φ'(z_r(x)) φ'(z_r(x')) xᵀx'/d and (1/m) Σ_r φ(z_r(x)) φ(z_r(x')).
    Neurons are drawn in chunks to bound memory; each chunk is computed in float32 (relative
    round-off ~1e-6, far below the 5 % tolerances) and accumulated in float64.
    """
    n, d = x.shape
    phi, dphi = _ACTS[act]
    x32 = x.to(torch.float32)
    first = torch.zeros(n, n, dtype=torch.float64)
    second = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, m, chunk):
        k = min(chunk, m - start)
        w = torch.randn(k, d, generator=gen)
        v = torch.randn(k, generator=gen)
        z = x32 @ w.T / math.sqrt(d)
        slope = dphi(z) * v.abs()
        first += (slope @ slope.T).double()
        value = phi(z)
        second += (value @ value.T).double()
    return first / m * (x @ x.T / d), second / m


def _close(fit: float, ref: float, rel: float, abs_tol: float) -> bool:
    """Relative tolerance, or an absolute one where the closed form is ~0 (no relative scale)."""
    return abs(fit - ref) <= (abs_tol if abs(ref) < 1e-12 else rel * abs(ref))


@pytest.mark.slow  # 3–7 s alone, well over 10 s when the 2 cores are shared
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_paper_claim_two_layer_ntk_is_affine_in_data_kernel(act: str) -> None:
    # m = 131072 ≥ 8192: the random-feature noise in ‖Θ − EΘ‖₂/‖Θ‖₂ scales like √(r_eff/m) and at
    # m = 8192 already reaches ~0.12 for the tanh second layer; the intrinsic (higher Hermite order)
    # error is ~0.036 for the ReLU first layer at d = 128 and does not shrink with m.
    d, n, m = 128, 256, 131072
    gen = torch.Generator().manual_seed(2020)
    x = _sphere(n, d, gen)
    first, second = _two_layer_ntk_blocks(x, m, act, gen)
    for layer, theta in (("first", first), ("second", second), ("both", first + second)):
        fit = fit_affine_kernel(theta, x)
        ref = two_layer_coefficients(act, layer=layer, s=1.0 / d)
        # A zero closed-form b (odd φ) gets an absolute tolerance: a b-error δ shifts Θ_lin by δ·11ᵀ,
        # of spectral norm n·δ; δ ≤ 0.05·‖Θ‖₂/n keeps that below 5 % of the kernel, the same
        # 5 % budget as the relative tolerances.
        abs_tol = 0.05 * float(torch.linalg.matrix_norm(theta, 2)) / n
        msg = f"{act}/{layer}: fit {fit} vs closed form {ref}"
        assert _close(fit.a, ref.a, 0.05, abs_tol), msg
        assert _close(fit.b, ref.b, 0.05, abs_tol), msg
        assert _close(fit.c, ref.c, 0.10, abs_tol), msg
        assert fit.rel_error is not None and fit.rel_error < 0.05, msg


@pytest.mark.slow  # 3–7 s alone, well over 10 s when the 2 cores are shared
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_paper_claim_error_falls_with_dimension_at_width_d_squared(act: str) -> None:
    n = 256
    errors: dict[str, list[float]] = {"first": [], "second": [], "both": []}
    for d in (64, 128, 256):
        gen = torch.Generator().manual_seed(d)
        x = _sphere(n, d, gen)
        first, second = _two_layer_ntk_blocks(x, d * d, act, gen)
        for layer, theta in (("first", first), ("second", second), ("both", first + second)):
            errors[layer].append(fit_affine_kernel(theta, x).rel_error)  # type: ignore[arg-type]
    for layer, errs in errors.items():
        # theory: noise ∝ √(n/m) = √n/d halves per doubling; the intrinsic part falls ~1/√d. Measured
        # ratios are 0.5–0.7, so demanding < 0.9 per doubling is robust to the seed yet falsifiable.
        assert errs[1] < 0.9 * errs[0] and errs[2] < 0.9 * errs[1], f"{act}/{layer}: {errs}"
