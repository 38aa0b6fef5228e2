"""Spectral norms against ``numpy.linalg.eigvalsh`` (an independent LAPACK driver and code path).

Tolerances: the dense path is float64 ``eigvalsh`` on both sides; both are backward stable, so
they agree to ~``n·eps·‖A‖`` ≈ 1e-13 for n ≤ 200, and 1e-10 leaves a wide margin. Lanczos runs
with the default ``rtol=1e-5``, a certified residual bound, so 1e-4 leaves a factor 10.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from _spectra import with_spectrum
from torch import Tensor

from lin_probe.linalg import NonFiniteOperator, SymmetricOperator, spectral_norm

DENSE_RTOL = 1e-10
LANCZOS_RTOL = 1e-4


def _reference_norm(a: np.ndarray) -> float:
    """Largest |eigenvalue| by numpy's eigvalsh."""
    return float(np.abs(np.linalg.eigvalsh(a)).max())


def _psd(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, 2 * n))
    return g @ g.T / (2 * n)


def _indefinite_negative_dominant(n: int, seed: int) -> np.ndarray:
    """Spectrum spread in [-0.9, 0.8] plus one eigenvalue -1.3: the norm comes from the negative end."""
    rng = np.random.default_rng(seed)
    eigenvalues = np.concatenate([[-1.3, 0.8], rng.uniform(-0.9, 0.8, n - 2)])
    return with_spectrum(eigenvalues, seed + 1)


def _near_degenerate(n: int, seed: int) -> np.ndarray:
    """λ₁ = 1, λ₂ = 1 − 1e-6, the rest spread over [-0.5, 0.9]: where power iteration stalls."""
    eigenvalues = np.concatenate([[1.0, 1.0 - 1e-6], np.linspace(-0.5, 0.9, n - 2)])
    return with_spectrum(eigenvalues, seed)


def _big_gap(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    eigenvalues = np.concatenate([[100.0], rng.uniform(-1.0, 1.0, n - 1)])
    return with_spectrum(eigenvalues, seed + 1)


def _matvec(a: np.ndarray) -> Callable[[Tensor], Tensor]:
    matrix = torch.from_numpy(a)
    return lambda v: matrix @ v


def _counting_matvec(a: np.ndarray) -> tuple[Callable[[Tensor], Tensor], list[int]]:
    """``v ↦ Av`` and the list it appends to on each product (how many Lanczos used)."""
    apply, calls = _matvec(a), []

    def counting(v: Tensor) -> Tensor:
        calls.append(1)
        return apply(v)

    return counting, calls


MATRICES = {
    "psd": lambda: _psd(150, 0),
    "indefinite_negative": lambda: _indefinite_negative_dominant(150, 1),
    "near_degenerate": lambda: _near_degenerate(200, 2),
    "big_gap": lambda: _big_gap(150, 3),
}


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_dense_matches_numpy(name: str) -> None:
    a = MATRICES[name]()
    expected = _reference_norm(a)
    got = spectral_norm(torch.from_numpy(a))
    assert abs(got - expected) <= DENSE_RTOL * expected


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_lanczos_matches_numpy(name: str) -> None:
    a = MATRICES[name]()
    expected = _reference_norm(a)
    got = spectral_norm(_matvec(a), a.shape[0])
    assert abs(got - expected) <= LANCZOS_RTOL * expected


def test_negative_end_is_the_answer() -> None:
    """Guard the test input: the dominant eigenvalue really is negative, and it is what is found."""
    a = _indefinite_negative_dominant(150, 1)
    eigenvalues = np.linalg.eigvalsh(a)
    assert abs(eigenvalues[0]) > abs(eigenvalues[-1])
    got = spectral_norm(_matvec(a), a.shape[0])
    assert abs(got - 1.3) <= LANCZOS_RTOL * 1.3  # 1.3 is the planted eigenvalue


def test_lanczos_stops_early_on_a_big_gap() -> None:
    """With a gap of 100 vs 1 the top Ritz value converges in a few steps: far fewer than n products."""
    a = _big_gap(300, 4)
    counting, calls = _counting_matvec(a)

    got = spectral_norm(counting, 300)
    assert abs(got - _reference_norm(a)) <= LANCZOS_RTOL * 100.0
    # Convergence factor ≈ (1/100)^k per step for the residual: 1e-5 needs ~10 steps; 60 is generous.
    assert len(calls) < 60


def test_float32_matvec_reaches_float64_accuracy() -> None:
    """An NTK product arrives in float32: the float64 recurrence still gets 1e-4 vs the float64 truth.

    Rounding A to float32 moves eigenvalues by ≤ ‖E‖₂ ≈ √n·6e-8·max|a_ij| ≪ 1e-4, so the reference
    is the float64 matrix itself.
    """
    a = _near_degenerate(200, 5)
    a32 = torch.from_numpy(a).to(torch.float32)
    got = spectral_norm(lambda v: a32 @ v, 200, op_dtype=torch.float32)
    expected = _reference_norm(a)
    assert abs(got - expected) <= LANCZOS_RTOL * expected


def test_callable_may_return_another_dtype() -> None:
    """A product that casts to float32 internally and returns float32 is folded back into float64."""
    a = _psd(100, 6)
    a32 = torch.from_numpy(a).to(torch.float32)
    got = spectral_norm(lambda v: a32 @ v.to(torch.float32), 100)
    expected = _reference_norm(a)
    assert abs(got - expected) <= LANCZOS_RTOL * expected


def test_float32_dense_with_roundoff_asymmetry_is_accepted() -> None:
    """A float32 kernel symmetric only to round-off (~1e-7) is symmetrised, not refused."""
    a = _psd(80, 7)
    rng = np.random.default_rng(8)
    noisy = (a + 1e-7 * rng.standard_normal(a.shape)).astype(np.float32)
    got = spectral_norm(torch.from_numpy(noisy))
    expected = _reference_norm(a)
    # float32 storage + 1e-7 noise perturb eigenvalues by ~1e-6 relative; 1e-5 is a safe bound.
    assert abs(got - expected) <= 1e-5 * expected


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_sizes(n: int) -> None:
    a = np.array([[-3.0]]) if n == 1 else np.array([[1.0, 2.0], [2.0, -4.0]])
    expected = _reference_norm(a)
    assert abs(spectral_norm(torch.from_numpy(a)) - expected) <= DENSE_RTOL * expected
    # Lanczos exhausts the Krylov space in n steps, so it is exact up to round-off.
    assert abs(spectral_norm(_matvec(a), n) - expected) <= 1e-12 * expected


def test_zero_operator_is_zero() -> None:
    assert spectral_norm(torch.zeros(5, 5)) == 0.0
    assert spectral_norm(lambda v: torch.zeros_like(v), 5) == 0.0


def test_scaled_identity_breaks_down_after_one_step() -> None:
    """An invariant subspace of dimension 1 (Av ∥ v) ends the recurrence with the exact answer."""
    calls = []

    def identity(v: Tensor) -> Tensor:
        calls.append(1)
        return -2.5 * v

    assert abs(spectral_norm(identity, 50) - 2.5) <= 1e-12
    assert len(calls) == 1


def test_lanczos_leaves_global_rng_alone() -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    spectral_norm(_matvec(_psd(60, 9)), 60, seed=17)
    assert torch.equal(before, torch.get_rng_state())


def test_max_iter_caps_products_and_warns() -> None:
    a = _near_degenerate(200, 10)
    counting, calls = _counting_matvec(a)

    with pytest.warns(RuntimeWarning, match="max_iter"):
        got = spectral_norm(counting, 200, max_iter=3)
    assert len(calls) == 3
    # Ritz values lie inside the spectrum, so even an unconverged estimate never overshoots.
    assert got <= _reference_norm(a) * (1 + 1e-12)


@pytest.mark.parametrize(
    ("op", "kwargs", "error", "match"),
    [
        (torch.ones(3, 4), {}, ValueError, "square"),
        (torch.ones(4), {}, ValueError, "square"),
        (torch.zeros(0, 0), {}, ValueError, "empty"),
        (torch.tensor([[1.0, 2.0], [0.0, 1.0]]), {}, ValueError, "not symmetric"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), {}, ValueError, "NaN"),
        (torch.eye(3, dtype=torch.int64), {}, TypeError, "floating"),
        (torch.eye(3), {"n": 4}, ValueError, "disagrees"),
        (np.eye(3), {}, TypeError, "as_tensor"),
        (lambda v: v, {}, ValueError, "`n` is required"),
        (lambda v: v, {"n": 0}, ValueError, "`n` must be >= 1"),
        (lambda v: v, {"n": 3, "rtol": 0.0}, ValueError, "rtol"),
        (lambda v: v, {"n": 3, "max_iter": 0}, ValueError, "max_iter"),
        (lambda v: v, {"n": 3, "dtype": torch.int32}, ValueError, "dtype"),
        (lambda v: v[:2], {"n": 3}, ValueError, "same shape"),
        (lambda v: v * float("nan"), {"n": 3}, ValueError, "NaN"),
        (lambda v: v.numpy(), {"n": 3}, TypeError, "return a torch.Tensor"),
    ],
)
def test_bad_input_is_refused(op: object, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        spectral_norm(op, **kwargs)  # type: ignore[arg-type]


def test_nan_product_is_a_non_finite_operator() -> None:
    """A diverged network's NaN product raises the type the monitor turns into a NaN check."""
    with pytest.raises(NonFiniteOperator, match="NaN"):
        spectral_norm(lambda v: v * float("nan"), 3)
    with pytest.raises(NonFiniteOperator, match="NaN"):
        spectral_norm(torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]]))


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_operator_argument_matches_numpy(name: str) -> None:
    """A ``SymmetricOperator`` is accepted in both forms: exact when dense, Lanczos on products."""
    a = MATRICES[name]()
    expected = _reference_norm(a)
    dense = SymmetricOperator.dense(torch.from_numpy(a))
    assert abs(spectral_norm(dense) - expected) <= DENSE_RTOL * expected
    products = SymmetricOperator.from_products(_matvec(a), a.shape[0])
    assert abs(spectral_norm(products, rtol=1e-8) - expected) <= 1e-7 * expected
