"""Tests for ``lin_probe.kernel.affine``: the affine fit (dense and matrix-free), features, operators.

References are independent of the code under test: ``numpy.linalg.lstsq`` and scipy's bounded
``lsq_linear`` over all ``n²`` entries, numpy's exact 2-norm (centred errors with ``H = I − 11ᵀ/n``
built explicitly), and the affine kernel written out in numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import optimize
from torch import nn

from lin_probe.kernel import (
    AffineKernel,
    centered_rel_error,
    fit_affine_kernel,
    fit_affine_kernel_matrix_free,
)
from lin_probe.linalg import SymmetricOperator
from lin_probe.ntk import empirical_ntk

# ---------------------------------------------------------------------------------------------
# Affine fit
# ---------------------------------------------------------------------------------------------


_NONNEG = (0.0, np.inf)  # a, b, c >= 0: the fit's bounds, for scipy's bounded least squares


def _inputs(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 3, 4, generator=gen, dtype=torch.float64)


def _basis_np(x: torch.Tensor) -> np.ndarray:
    """Columns vec(K), vec(11ᵀ), vec(I) in numpy (independent of lin_probe's data_kernel)."""
    xf = x.reshape(x.shape[0], -1).numpy()
    n, d = xf.shape
    k = xf @ xf.T / d
    return np.stack([k.ravel(), np.ones(n * n), np.eye(n).ravel()], axis=1)


def _sym_noise(n: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    e = torch.randn(n, n, generator=gen, dtype=torch.float64) * scale
    return (e + e.T) / 2


def _rel_spectral(theta: np.ndarray, fitted: np.ndarray) -> float:
    return float(np.linalg.norm(theta - fitted, 2) / np.linalg.norm(theta, 2))


def test_fit_recovers_exact_affine_kernel() -> None:
    gen = torch.Generator().manual_seed(1)
    x = _inputs(40, gen)
    theta = AffineKernel(0.7, 0.3, 0.1).matrix(x)
    fit = fit_affine_kernel(theta, x)
    # exact data: only float64 round-off (~1e-15 relative) separates fit from truth
    np.testing.assert_allclose((fit.a, fit.b, fit.c), (0.7, 0.3, 0.1), rtol=1e-10, atol=1e-12)
    assert fit.rel_error is not None and fit.rel_error < 1e-12


def test_fit_with_noise_matches_numpy_lstsq() -> None:
    gen = torch.Generator().manual_seed(2)
    x = _inputs(50, gen)
    theta = AffineKernel(1.3, 0.4, 0.25).matrix(x) + _sym_noise(50, 0.05, gen)
    fit = fit_affine_kernel(theta.to(torch.float32), x.to(torch.float32))
    design = _basis_np(x)
    coef, *_ = np.linalg.lstsq(design, theta.numpy().ravel(), rcond=None)
    assert coef[0] > 0 and coef[1] > 0  # unconstrained optimum is feasible here
    # float32 inputs: entries carry ~6e-8 relative round-off, so agree to 1e-5 relative
    np.testing.assert_allclose((fit.a, fit.b, fit.c), coef, rtol=1e-5, atol=1e-6)
    ref_err = _rel_spectral(theta.numpy(), (design @ coef).reshape(50, 50))
    assert fit.rel_error == pytest.approx(ref_err, rel=1e-4)
    assert ref_err > 1e-3  # the noise is really there


@pytest.mark.parametrize(
    ("a", "b", "c", "zero"),
    [
        (0.8, -0.5, 0.7, "b"),
        (-0.6, 0.3, 0.8, "a"),
        (0.7, 0.3, -0.2, "c"),
        (0.8, -0.5, 0.2, "bc"),  # b clamped pushes c below zero: both bounds active
        (-0.6, 0.3, 0.4, "ac"),
        (-0.6, -0.3, 0.4, "abc"),
    ],
)
def test_fit_enforces_nonnegative_a_b_c(a: float, b: float, c: float, zero: str) -> None:
    gen = torch.Generator().manual_seed(3)
    n = 30
    x = _inputs(n, gen)
    theta = torch.as_tensor(a * _kernel_np(x) + b + c * np.eye(n)) + _sym_noise(n, 0.01, gen)
    fit = fit_affine_kernel(theta, x)
    # independent bounded solver (scipy's trust-region reflective), tight tolerance
    design = _basis_np(x)
    ref = optimize.lsq_linear(design, theta.numpy().ravel(), bounds=_NONNEG, tol=1e-14).x
    got = np.array([fit.a, fit.b, fit.c])
    assert [name for name, value in zip("abc", got, strict=True) if value == 0.0] == list(zero)
    # independent boundary solve: drop the clamped columns, plain lstsq on the others
    keep = [i for i, name in enumerate("abc") if name not in zero]
    if keep:
        sub, *_ = np.linalg.lstsq(design[:, keep], theta.numpy().ravel(), rcond=None)
        np.testing.assert_allclose(got[keep], sub, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8)  # lsq_linear converges to ~1e-8


def _kernel_np(x: torch.Tensor) -> np.ndarray:
    xf = x.reshape(x.shape[0], -1).numpy()
    return xf @ xf.T / xf.shape[1]


def test_fit_accepts_float32_round_off_asymmetry() -> None:
    gen = torch.Generator().manual_seed(4)
    x = _inputs(20, gen)
    jac = torch.randn(20, 500, generator=gen)
    theta32 = jac @ jac.T
    theta32[0, 1] += 1e-6 * float(theta32.abs().max())  # round-off-sized asymmetry
    sym = (theta32.double() + theta32.double().T) / 2
    coef = optimize.lsq_linear(_basis_np(x), sym.numpy().ravel(), bounds=_NONNEG, tol=1e-14).x
    fit = fit_affine_kernel(theta32, x)
    np.testing.assert_allclose((fit.a, fit.b, fit.c), coef, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def test_features_reproduce_affine_kernel() -> None:
    gen = torch.Generator().manual_seed(5)
    x = _inputs(9, gen)
    ker = AffineKernel(0.6, 0.2, 0.35)
    psi = ker.features(x)
    assert psi.shape == (9, 13)
    ref = 0.6 * _kernel_np(x) + 0.2  # a·xᵀx'/d + b, d = 12
    np.testing.assert_allclose((psi @ psi.T).numpy(), ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ker.matrix(x).numpy(), ref + 0.35 * np.eye(9), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_fit_bad_input() -> None:
    gen = torch.Generator().manual_seed(6)
    x = _inputs(6, gen)
    theta = AffineKernel(1.0, 0.5, 0.1).matrix(x)
    with pytest.raises(ValueError, match="need at least 2 probe examples"):
        fit_affine_kernel(theta[:1, :1], x[:1])
    bad = theta.clone()
    bad[2, 3] = math.nan
    with pytest.raises(ValueError, match=r"ntk.*NaN"):
        fit_affine_kernel(bad, x)
    xbad = x.clone()
    xbad[1, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"inputs.*NaN"):
        fit_affine_kernel(theta, xbad)
    with pytest.raises(ValueError, match="square"):
        fit_affine_kernel(theta[:, :5], x)
    with pytest.raises(ValueError, match=r"6×6.*5 example"):
        fit_affine_kernel(theta, x[:5])
    with pytest.raises(ValueError, match="identically zero"):
        fit_affine_kernel(torch.zeros(6, 6), x)
    asym = theta.clone()
    asym[0, 1] += 0.5
    with pytest.raises(ValueError, match="not symmetric"):
        fit_affine_kernel(asym, x)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        fit_affine_kernel(theta.numpy(), x)  # type: ignore[arg-type]


def test_fit_refuses_unidentifiable_designs() -> None:
    """Where K, 11ᵀ, I are linearly dependent, any (a, b, c) split would be arbitrary: refuse."""
    gen = torch.Generator().manual_seed(7)
    theta = AffineKernel(1.0, 0.5, 0.1).matrix(_inputs(6, gen))
    same = torch.randn(1, 12, generator=gen, dtype=torch.float64).expand(6, 12)  # K ∝ 11ᵀ
    with pytest.raises(ValueError, match="not identifiable"):
        fit_affine_kernel(theta, same)
    two = torch.randn(2, 12, generator=gen, dtype=torch.float64)
    two = two / two.norm(dim=1, keepdim=True)  # equal norms: K ∈ span(11ᵀ, I) for n = 2
    with pytest.raises(ValueError, match="not identifiable"):
        fit_affine_kernel(theta[:2, :2], two)
    with pytest.raises(ValueError, match="not identifiable"):
        fit_affine_kernel(theta, torch.eye(6, dtype=torch.float64))  # one-hot: K ∝ I
    with pytest.raises(ValueError, match="all zero"):
        fit_affine_kernel(theta, torch.zeros(6, 4))


# ---------------------------------------------------------------------------------------------
# Operators and operator inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dense", [True, False])
def test_affine_operator_is_the_affine_matrix(dense: bool) -> None:
    gen = torch.Generator().manual_seed(8)
    x = _inputs(25, gen)
    op = AffineKernel(0.9, 0.35, 0.15).operator(x, dense=dense)
    assert isinstance(op, SymmetricOperator) and op.is_dense == dense and op.n == 25
    reference = 0.9 * _kernel_np(x) + 0.35 + 0.15 * np.eye(25)
    u = torch.randn(25, generator=gen, dtype=torch.float64)
    np.testing.assert_allclose(op(u).numpy(), reference @ u.numpy(), rtol=1e-12, atol=1e-12)
    expected = float(np.abs(np.linalg.eigvalsh(reference)).max())
    assert op.norm() == pytest.approx(expected, rel=1e-10 if dense else 1e-4)


@pytest.mark.parametrize("dense", [True, False])
def test_gap_to_the_affine_operator_matches_numpy(dense: bool) -> None:
    """``‖Θ − Θ_lin‖₂`` (the monitor's gap numerator) from operators equals numpy's 2-norm of the matrices."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(60, 300, generator=gen, dtype=torch.float64)
    j = torch.randn(60, 90, generator=gen, dtype=torch.float64)
    theta = j @ j.T / 90
    kernel = AffineKernel(0.8, 0.1, 0.3)
    ntk = SymmetricOperator.dense(theta)
    if not dense:
        ntk = SymmetricOperator.from_products(lambda u: theta @ u, 60)
    gap = (ntk - kernel.operator(x, dense=dense)).norm()
    reference = 0.8 * _kernel_np(x) + 0.1 + 0.3 * np.eye(60)
    expected = float(np.linalg.norm((theta.numpy() + theta.numpy().T) / 2 - reference, 2))
    assert gap == pytest.approx(expected, rel=1e-10 if dense else 1e-4)
    with pytest.raises(ValueError, match="not finite"):
        AffineKernel(math.nan, 0.1, 0.3).operator(x, dense=True)


def test_fit_accepts_a_dense_operator_and_refuses_products() -> None:
    gen = torch.Generator().manual_seed(9)
    x = _inputs(30, gen)
    theta = AffineKernel(1.1, 0.2, 0.4).matrix(x) + _sym_noise(30, 0.02, gen)
    from_tensor = fit_affine_kernel(theta, x)
    from_operator = fit_affine_kernel(SymmetricOperator.dense(theta), x)
    assert from_operator == from_tensor  # the same checked float64 matrix: identical numbers
    coef, *_ = np.linalg.lstsq(_basis_np(x), theta.numpy().ravel(), rcond=None)
    np.testing.assert_allclose((from_tensor.a, from_tensor.b, from_tensor.c), coef, rtol=1e-9, atol=1e-12)
    products = SymmetricOperator.from_products(lambda u: theta @ u, 30)
    with pytest.raises(ValueError, match="fit_affine_kernel_matrix_free"):
        fit_affine_kernel(products, x)


@pytest.mark.parametrize(
    ("coef", "clamped"), [((0.7, 0.3, 0.2), None), ((0.8, -0.4, 0.3), "b"), ((-0.5, 0.3, 0.6), "a")]
)
@pytest.mark.parametrize("form", ["callable", "products", "dense"])
def test_matrix_free_fit_matches_bounded_least_squares(
    coef: tuple[float, float, float], clamped: str | None, form: str
) -> None:
    gen = torch.Generator().manual_seed(11)
    n = 40
    x = _inputs(n, gen)
    theta = torch.as_tensor(coef[0] * _kernel_np(x) + coef[1] + coef[2] * np.eye(n)) + _sym_noise(
        n, 0.01, gen
    )
    op: object = {
        "callable": lambda u: theta @ u,
        "products": SymmetricOperator.from_products(lambda u: theta @ u, n),
        "dense": SymmetricOperator.dense(theta),
    }[form]
    free = fit_affine_kernel_matrix_free(op, x, trace=float(theta.trace()))  # type: ignore[arg-type]
    ref = optimize.lsq_linear(_basis_np(x), theta.numpy().ravel(), bounds=_NONNEG, tol=1e-14).x
    np.testing.assert_allclose((free.a, free.b, free.c), ref, rtol=1e-6, atol=1e-8)  # lsq_linear: ~1e-8
    if clamped is not None:
        assert getattr(free, clamped) == 0.0
    fitted = AffineKernel(free.a, free.b, free.c).matrix(x).numpy()
    exact = np.linalg.norm(theta.numpy() - fitted, 2) / np.linalg.norm(theta.numpy(), 2)
    # numerator Lanczos (rtol 1e-5); denominator Lanczos or exact (dense): ratio good to 2e-5
    assert free.rel_error == pytest.approx(exact, rel=2e-5)


def test_matrix_free_fit_bad_operator() -> None:
    x = torch.randn(10, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        fit_affine_kernel_matrix_free(lambda u: u[:-1], x, trace=1.0)
    with pytest.raises(TypeError, match="callable"):
        fit_affine_kernel_matrix_free("not an operator", x, trace=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="acts on 3-vectors"):
        fit_affine_kernel_matrix_free(
            SymmetricOperator.dense(torch.eye(3, dtype=torch.float64)), x, trace=1.0
        )


def test_matrix_free_fit_equals_dense_fit_with_few_products_on_rank_deficient_inputs() -> None:
    """d > n with two all-zero features: ⟨Θ, K⟩ needs rank(X) products (the SVD drops the rest)."""
    gen = torch.Generator().manual_seed(12)
    n = 40
    x = torch.randn(n, 60, generator=gen, dtype=torch.float64)
    x[:, :2] = 0.0
    j = torch.randn(n, 3 * n, generator=gen, dtype=torch.float64)
    theta = AffineKernel(1.1, 0.2, 0.4).matrix(x) + 0.05 * j @ j.T / (3 * n)
    calls = 0

    def matvec(u: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return theta @ u

    free = fit_affine_kernel_matrix_free(matvec, x, trace=float(theta.trace()))
    dense = fit_affine_kernel(theta, x)
    # the same normal equations and active-set solve in float64: only summation order differs
    np.testing.assert_allclose((free.a, free.b, free.c), (dense.a, dense.b, dense.c), rtol=1e-9, atol=1e-12)
    ref = optimize.lsq_linear(_basis_np(x), theta.numpy().ravel(), bounds=_NONNEG, tol=1e-14).x
    np.testing.assert_allclose((free.a, free.b, free.c), ref, rtol=1e-6, atol=1e-8)
    rank = int(np.linalg.matrix_rank(x.numpy()))
    assert rank == n
    # rank(X) products for ⟨Θ, K⟩, one for 1ᵀΘ1, then two Lanczos runs of at most n products each
    assert calls <= rank + 1 + 2 * n


# ---------------------------------------------------------------------------------------------
# c >= 0
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dense", "matrix_free"])
def test_negative_identity_part_is_clamped_to_zero(form: str) -> None:
    """``a·K + b·11ᵀ − 0.5·I`` (+ noise): the unconstrained c is negative, the fit's is exactly 0."""
    gen = torch.Generator().manual_seed(21)
    n = 40
    x = _inputs(n, gen)
    theta = torch.as_tensor(1.2 * _kernel_np(x) + 0.4 - 0.5 * np.eye(n)) + _sym_noise(n, 0.01, gen)
    if form == "dense":
        fit = fit_affine_kernel(theta, x)
    else:
        fit = fit_affine_kernel_matrix_free(lambda u: theta @ u, x, trace=float(theta.trace()))
    design = _basis_np(x)
    unconstrained, *_ = np.linalg.lstsq(design, theta.numpy().ravel(), rcond=None)
    assert unconstrained[2] < -0.4  # the bound really binds
    assert fit.c == 0.0
    # BVLS is an exact active-set solver (no iterative tolerance): agreement to float64 round-off of
    # the 3×3 normal equations (condition number ~1e3 here), far inside 1e-8 relative
    ref = optimize.lsq_linear(design, theta.numpy().ravel(), bounds=_NONNEG, method="bvls").x
    np.testing.assert_allclose((fit.a, fit.b, fit.c), ref, rtol=1e-8, atol=1e-12)
    assert fit.a > 0 and fit.b > 0


# ---------------------------------------------------------------------------------------------
# Centred fit error
# ---------------------------------------------------------------------------------------------


def _centering(n: int) -> np.ndarray:
    return np.eye(n) - np.ones((n, n)) / n


def _centered_error_np(theta: np.ndarray, fitted: np.ndarray) -> float:
    """Brute force: ``‖H(Θ − F)H‖₂ / ‖HΘH‖₂`` with ``H`` as a matrix and numpy's exact 2-norm."""
    h = _centering(theta.shape[0])
    sym = (theta + theta.T) / 2
    return float(np.linalg.norm(h @ (sym - fitted) @ h, 2) / np.linalg.norm(h @ sym @ h, 2))


def test_affine_kernel_keeps_old_constructor_calls() -> None:
    """Saved kernels (dicts without the new key) and positional/keyword calls still build."""
    old = {"a": 0.5, "b": 0.2, "c": 0.1, "rel_error": 0.3}
    assert AffineKernel(**old).rel_error_centered is None
    assert AffineKernel(0.5, 0.2, 0.1, 0.3) == AffineKernel(**old)
    assert AffineKernel(a=0.5, b=0.2, c=0.1).rel_error_centered is None


@pytest.mark.parametrize("dense", [True, False])
def test_centered_rel_error_matches_numpy_on_random_psd_kernels(dense: bool) -> None:
    gen = torch.Generator().manual_seed(22)
    n = 50
    x = torch.randn(n, 20, generator=gen, dtype=torch.float64)
    j = torch.randn(n, 80, generator=gen, dtype=torch.float64)
    theta = j @ j.T / 80 + 3.0  # PSD with a large constant mode, as a ReLU NTK on [0, 1] inputs
    kernel = AffineKernel(0.6, 2.5, 0.4)
    fitted = kernel.matrix(x)
    if dense:
        got = centered_rel_error(SymmetricOperator.dense(theta), kernel.operator(x, dense=True))
    else:
        products = SymmetricOperator.from_products(lambda u: theta @ u, n)
        got = centered_rel_error(products, kernel.operator(x, dense=False), rtol=1e-6)
    expected = _centered_error_np(theta.numpy(), fitted.numpy())
    # dense: both norms exact eigvalsh, only round-off; products: two Lanczos norms each to 1e-6
    # relative, so the ratio is good to ~2e-6
    assert got == pytest.approx(expected, rel=1e-10 if dense else 5e-6)
    uncentred = _rel_spectral(theta.numpy(), fitted.numpy())
    assert abs(got - uncentred) > 0.1  # the constant mode really changes the number


@pytest.mark.parametrize("dense", [True, False])
def test_centered_rel_error_is_nan_for_a_constant_kernel(dense: bool) -> None:
    n = 12
    theta = torch.full((n, n), 0.37, dtype=torch.float64)
    kernel = AffineKernel(0.1, 0.2, 0.0)
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    op = SymmetricOperator.dense(theta)
    if not dense:
        op = SymmetricOperator.from_products(lambda u: theta @ u, n)
    assert math.isnan(centered_rel_error(op, kernel.operator(x, dense=dense)))


def test_centered_rel_error_bad_input() -> None:
    eye = SymmetricOperator.dense(torch.eye(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="SymmetricOperator"):
        centered_rel_error(torch.eye(3), eye)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="3-dimensional but `fitted` is 4"):
        centered_rel_error(eye, SymmetricOperator.dense(torch.eye(4, dtype=torch.float64)))


def _tanh_mlp_ntk(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3))
    model.double()
    x = torch.rand(n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return empirical_ntk(model, x).detach(), x


@pytest.mark.parametrize("centered_fit", [False, True])
def test_fits_fill_centered_error_on_a_real_ntk(centered_fit: bool) -> None:
    """Empirical NTK of a tanh MLP: both fits' ``rel_error_centered`` equal the brute-force number."""
    theta, x = _tanh_mlp_ntk(40, seed=24)
    dense = fit_affine_kernel(theta, x, centered_fit=centered_fit)
    free = fit_affine_kernel_matrix_free(
        lambda u: theta @ u, x, trace=float(theta.trace()), rtol=1e-7, centered_fit=centered_fit
    )
    # the same normal equations in float64 (dense Frobenius sums vs. products along SVD directions)
    np.testing.assert_allclose((free.a, free.b, free.c), (dense.a, dense.b, dense.c), rtol=1e-8, atol=1e-12)
    fitted = AffineKernel(dense.a, dense.b, dense.c).matrix(x).numpy()
    expected = _centered_error_np(theta.numpy(), fitted)
    assert dense.rel_error_centered == pytest.approx(expected, rel=1e-10)  # exact eigvalsh both sides
    assert free.rel_error_centered == pytest.approx(expected, rel=5e-7)  # two Lanczos norms at 1e-7
    assert dense.rel_error == pytest.approx(_rel_spectral(theta.numpy(), fitted), rel=1e-10)
    assert expected > 1e-3  # a real fit error, not round-off


# ---------------------------------------------------------------------------------------------
# Centred fit (option)
# ---------------------------------------------------------------------------------------------


def _centered_reference(theta: np.ndarray, x: torch.Tensor) -> np.ndarray:
    """``a, c ≥ 0`` by BVLS on ``vec(HKH), vec(H)`` against ``vec(HΘH)``, then the constant mode's ``b``."""
    n = theta.shape[0]
    h = _centering(n)
    k = _kernel_np(x)
    design = np.stack([(h @ k @ h).ravel(), h.ravel()], axis=1)
    a, c = optimize.lsq_linear(design, (h @ theta @ h).ravel(), bounds=_NONNEG, method="bvls").x
    b = max(0.0, float(np.ones(n) @ (theta - a * k - c * np.eye(n)) @ np.ones(n)) / n**2)
    return np.array([a, b, c])


@pytest.mark.parametrize("coef", [(0.9, 0.5, 0.3), (0.9, 0.5, -0.4), (0.9, -0.5, 0.3)])
@pytest.mark.parametrize("form", ["dense", "matrix_free"])
def test_centered_fit_matches_bounded_least_squares(coef: tuple[float, float, float], form: str) -> None:
    gen = torch.Generator().manual_seed(25)
    n = 40
    x = _inputs(n, gen).abs()  # non-negative inputs: K has a mean component, as images do
    theta = torch.as_tensor(coef[0] * _kernel_np(x) + coef[1] + coef[2] * np.eye(n)) + _sym_noise(
        n, 0.02, gen
    )
    if form == "dense":
        fit = fit_affine_kernel(theta, x, centered_fit=True)
    else:
        fit = fit_affine_kernel_matrix_free(
            lambda u: theta @ u, x, trace=float(theta.trace()), centered_fit=True
        )
    ref = _centered_reference(theta.numpy(), x)
    # BVLS is exact; the 2×2 centred normal equations are well conditioned: float64 round-off only
    np.testing.assert_allclose((fit.a, fit.b, fit.c), ref, rtol=1e-8, atol=1e-12)
    if coef[2] < 0:
        assert fit.c == 0.0
    if coef[1] < 0:
        assert fit.b == 0.0
    uncentred = fit_affine_kernel(theta, x)
    assert fit.rel_error_centered is not None and uncentred.rel_error_centered is not None
    # the centred fit minimises the centred Frobenius error; its spectral error cannot be far worse
    assert fit.rel_error_centered <= uncentred.rel_error_centered * 1.05


def test_centered_fit_refuses_unidentifiable_designs() -> None:
    gen = torch.Generator().manual_seed(26)
    theta = AffineKernel(1.0, 0.5, 0.1).matrix(_inputs(6, gen))
    with pytest.raises(ValueError, match="not identifiable"):
        fit_affine_kernel(theta, torch.eye(6, dtype=torch.float64), centered_fit=True)
    with pytest.raises(ValueError, match="not identifiable"):
        fit_affine_kernel_matrix_free(
            lambda u: theta @ u, torch.eye(6, dtype=torch.float64), trace=1.0, centered_fit=True
        )


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "matrix-free"])
def test_norms_handed_in_give_the_same_fit_as_norms_computed_inside(dense: bool) -> None:
    """Fitting one Θ with several data kernels passes ‖Θ‖₂ and ‖HΘH‖₂ once; the result must not change."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    a = torch.randn(20, 30, generator=gen, dtype=torch.float64)
    theta = SymmetricOperator.dense(a @ a.T / 30 + 0.5, "ntk")
    # the reference norms from numpy, not from the code under test
    h = np.eye(20) - 1.0 / 20
    norms = {
        "ntk_norm": float(np.linalg.norm(theta.matrix.numpy(), 2)),
        "centered_ntk_norm": float(np.linalg.norm(h @ theta.matrix.numpy() @ h, 2)),
    }
    if dense:
        plain, handed = (
            fit_affine_kernel(theta, x, centered_fit=True),
            fit_affine_kernel(theta, x, centered_fit=True, **norms),
        )
    else:
        trace = float(torch.trace(theta.matrix))
        products = SymmetricOperator.from_products(lambda u: theta.matrix @ u, 20, "ntk")
        plain = fit_affine_kernel_matrix_free(products, x, trace=trace, centered_fit=True)
        handed = fit_affine_kernel_matrix_free(products, x, trace=trace, centered_fit=True, **norms)
    assert (handed.a, handed.b, handed.c) == (plain.a, plain.b, plain.c)
    rtol = 1e-12 if dense else 3e-5  # Lanczos norms are certified to 1e-5 each
    assert handed.rel_error == pytest.approx(plain.rel_error, rel=rtol)
    assert handed.rel_error_centered == pytest.approx(plain.rel_error_centered, rel=rtol)
