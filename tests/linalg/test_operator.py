"""Tests for ``lin_probe.linalg.operator.SymmetricOperator``: norms and eigenvalues against numpy.

References: ``numpy.linalg.eigvalsh`` (an independent LAPACK call and code path) on matrices with a
planted spectrum. Dense tolerances: float64 ``eigvalsh`` on both sides, ~``n·eps`` ≈ 1e-13, so
1e-10; Lanczos certifies ``rtol`` (default 1e-5), so 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _spectra import with_spectrum
from torch import Tensor

from lin_probe.linalg import NonFiniteOperator, SymmetricOperator

DENSE_RTOL = 1e-10
LANCZOS_RTOL = 1e-4


def _indefinite(n: int, seed: int) -> np.ndarray:
    """Spectrum in [-0.9, 0.8] plus a planted -1.3: the norm comes from the negative end."""
    rng = np.random.default_rng(seed)
    return with_spectrum(np.concatenate([[-1.3, 0.8], rng.uniform(-0.9, 0.8, n - 2)]), seed + 1)


def _psd(n: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed).standard_normal((n, 2 * n))
    return g @ g.T / (2 * n)


def _reference_norm(a: np.ndarray) -> float:
    return float(np.abs(np.linalg.eigvalsh(a)).max())


def _products(a: np.ndarray) -> SymmetricOperator:
    matrix = torch.from_numpy(a)
    return SymmetricOperator.from_products(lambda u: matrix @ u, a.shape[0], "A")


@pytest.mark.parametrize(
    "make", [lambda: _indefinite(120, 1), lambda: _psd(90, 2)], ids=["indefinite", "psd"]
)
def test_dense_and_product_norms_match_numpy(make: object) -> None:
    a = make()  # type: ignore[operator]
    expected = _reference_norm(a)
    dense = SymmetricOperator.dense(torch.from_numpy(a), "A")
    assert dense.is_dense and dense.n == a.shape[0]
    assert abs(dense.norm() - expected) <= DENSE_RTOL * expected
    products = _products(a)
    assert not products.is_dense and products.matrix is None
    assert abs(products.norm() - expected) <= LANCZOS_RTOL * expected
    np.testing.assert_allclose(dense.eigenvalues().numpy(), np.linalg.eigvalsh(a), rtol=0, atol=1e-12)


def test_products_are_float64_cpu_and_shape_checked() -> None:
    a32 = torch.from_numpy(_psd(10, 3)).to(torch.float32)
    op = SymmetricOperator.from_products(lambda u: a32 @ u.to(torch.float32), 10)
    u = torch.randn(10, dtype=torch.float64)
    w = op(u)
    assert w.dtype == torch.float64 and w.device.type == "cpu"
    torch.testing.assert_close(w, (a32 @ u.float()).double(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        SymmetricOperator.from_products(lambda u: u[:-1], 10)(u)
    with pytest.raises(TypeError, match=r"return a torch\.Tensor"):
        SymmetricOperator.from_products(lambda u: u.numpy(), 10)(u)


def test_dense_is_symmetrised_float64_cpu_copy() -> None:
    """A float32 matrix symmetric to round-off is accepted and stored as ``(A + Aᵀ)/2`` in float64."""
    a = torch.from_numpy(_psd(30, 4)).to(torch.float32)
    noisy = a.clone()
    noisy[0, 1] += 1e-6
    op = SymmetricOperator.dense(noisy)
    assert op.matrix is not None and op.matrix.dtype == torch.float64
    expected = (noisy.double() + noisy.double().T) / 2
    assert torch.equal(op.matrix, expected)
    assert torch.equal(op.matrix, op.matrix.T)


@pytest.mark.parametrize(
    ("matrix", "error", "match"),
    [
        (torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64), ValueError, "not symmetric"),
        # float64: √eps ≈ 1.5e-8 relative; an asymmetry of 1e-6 is far beyond float64 round-off
        (
            torch.eye(3, dtype=torch.float64) + 1e-6 * torch.triu(torch.ones(3, 3, dtype=torch.float64), 1),
            ValueError,
            "not symmetric",
        ),
        (torch.ones(2, 3), ValueError, "square"),
        (torch.zeros(0, 0), ValueError, "empty"),
        (torch.eye(2, dtype=torch.int64), TypeError, "floating"),
        (np.eye(2), TypeError, "torch.Tensor"),
    ],
)
def test_dense_refusals(matrix: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SymmetricOperator.dense(matrix)  # type: ignore[arg-type]


def test_symmetry_tolerance_follows_the_source_dtype() -> None:
    """The same 1e-6 asymmetry is round-off for float32 (√eps ≈ 3e-4) but refused in float64."""
    a = torch.eye(3) + 1e-6 * torch.triu(torch.ones(3, 3), 1)
    SymmetricOperator.dense(a)  # float32: accepted
    with pytest.raises(ValueError, match="not symmetric"):
        SymmetricOperator.dense(a.double())


def test_non_finite_matrix_and_product_raise_non_finite_operator() -> None:
    bad = torch.eye(3, dtype=torch.float64)
    bad[1, 1] = float("nan")
    with pytest.raises(NonFiniteOperator, match="NaN"):
        SymmetricOperator.dense(bad)
    op = SymmetricOperator.from_products(lambda u: u * float("inf"), 3, "Θ")
    with pytest.raises(NonFiniteOperator, match="NaN/inf"):
        op(torch.ones(3, dtype=torch.float64))
    assert issubclass(NonFiniteOperator, ValueError)


def test_subtraction_dense_and_products() -> None:
    """``A − B`` has the spectrum of numpy's ``A − B``; dense − dense stays dense, any products give products."""
    a, b = _indefinite(60, 5), _psd(60, 6)
    expected = _reference_norm(a - b)
    dense_a, dense_b = (
        SymmetricOperator.dense(torch.from_numpy(a)),
        SymmetricOperator.dense(torch.from_numpy(b)),
    )
    difference = dense_a - dense_b
    assert difference.is_dense
    assert difference.matrix is not None and torch.equal(difference.matrix, difference.matrix.T)
    assert abs(difference.norm() - expected) <= DENSE_RTOL * expected
    for mixed in (dense_a - _products(b), _products(a) - dense_b, _products(a) - _products(b)):
        assert not mixed.is_dense
        assert abs(mixed.norm() - expected) <= LANCZOS_RTOL * expected
        u = torch.randn(60, dtype=torch.float64)
        torch.testing.assert_close(mixed(u), torch.from_numpy(a - b) @ u, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="subtract"):
        dense_a - SymmetricOperator.dense(torch.eye(3, dtype=torch.float64))


def test_eigenvalues_need_a_dense_operator() -> None:
    with pytest.raises(ValueError, match="products only"):
        _products(_psd(5, 7)).eigenvalues()


def test_lanczos_norm_is_certified_and_reproducible() -> None:
    a = _indefinite(150, 8)
    calls: list[int] = []
    matrix = torch.from_numpy(a)

    def counting(u: Tensor) -> Tensor:
        calls.append(1)
        return matrix @ u

    op = SymmetricOperator.from_products(counting, 150)
    first = op.norm()
    assert abs(first - 1.3) <= LANCZOS_RTOL * 1.3  # the planted eigenvalue
    assert op.norm() == first  # seeded start vector
    assert len(calls) <= 2 * 150
