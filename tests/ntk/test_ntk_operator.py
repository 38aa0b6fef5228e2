"""Tests for ``lin_probe.ntk.ntk_operator`` and ``ntk_diagonal`` (the monitor's entry points).

References: the brute-force kernel of ``_ntk_reference`` (per-example autograd on a deep copy) and
numpy's ``eigvalsh`` for the norm; tolerances as explained in ``_ntk_reference``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _ntk_reference import DTYPE, assert_close, brute_force_ntk, mlp

from lin_probe.linalg import NonFiniteOperator, SymmetricOperator
from lin_probe.ntk import ntk_diagonal, ntk_operator
from lin_probe.plan import ComputePlan

DENSE = ComputePlan()
MATRIX_FREE = ComputePlan(dense_max_n=1)  # every probe of ≥ 2 examples gets products


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(99)


@pytest.mark.parametrize("plan", [DENSE, MATRIX_FREE], ids=["dense", "products"])
def test_operator_is_the_brute_force_kernel(plan: ComputePlan) -> None:
    model, x = mlp(c=2), torch.randn(7, 5, dtype=DTYPE)
    weights = {"0.weight": 0.5}
    reference = brute_force_ntk(model, x, weights=weights)
    op = ntk_operator(model, x, plan=plan, param_weights=weights)
    assert isinstance(op, SymmetricOperator) and op.n == 7
    assert op.is_dense == (plan is DENSE)
    u = torch.randn(7, dtype=DTYPE)
    w = op(u)
    assert w.dtype == torch.float64 and w.device.type == "cpu"
    assert_close(w, reference @ u)
    if op.is_dense:
        assert_close(op.matrix, reference)  # type: ignore[arg-type]
    expected = float(np.abs(np.linalg.eigvalsh(reference.numpy())).max())
    # dense: eigvalsh on both sides (1e-9 covers the kernels' own difference); products: Lanczos to 1e-5.
    assert op.norm() == pytest.approx(expected, rel=1e-9 if op.is_dense else 1e-4)


def test_float32_model_gives_a_float64_operator() -> None:
    model, x = mlp().float(), torch.randn(6, 5)
    op = ntk_operator(model, x, plan=DENSE)
    assert op.matrix is not None and op.matrix.dtype == torch.float64
    # float32 rounding over ~60 parameters: ~1e-6 relative; 1e-4 is loose but meaningful.
    assert_close(op.matrix, brute_force_ntk(model.double(), x.double()), rtol=1e-4)


def test_plan_memory_budget_reaches_the_products() -> None:
    """``plan.memory_budget`` is passed down: an invalid one is refused by the product builder."""
    with pytest.raises(ValueError, match="memory_budget"):
        ComputePlan(memory_budget=0)
    tight = ComputePlan(memory_budget=1, dense_max_n=1)
    model, x = mlp(), torch.randn(5, 5, dtype=DTYPE)
    u = torch.randn(5, dtype=DTYPE)
    assert_close(ntk_operator(model, x, plan=tight)(u), brute_force_ntk(model, x) @ u)


@pytest.mark.parametrize("plan", [DENSE, MATRIX_FREE], ids=["dense", "products"])
def test_diverged_model_raises_non_finite(plan: ComputePlan) -> None:
    model, x = mlp(), torch.randn(4, 5, dtype=DTYPE)
    with torch.no_grad():
        model[2].weight.fill_(float("inf"))
    with pytest.raises(NonFiniteOperator):
        op = ntk_operator(model, x, plan=plan)
        op(torch.ones(4, dtype=DTYPE))


@pytest.mark.parametrize("block", [64, 3, 1])
def test_diagonal_is_the_kernel_diagonal(block: int) -> None:
    model, x = mlp(), torch.randn(8, 5, dtype=DTYPE)
    diag = ntk_diagonal(model, x, plan=DENSE, block=block)
    assert diag.dtype == torch.float64 and diag.shape == (8,)
    assert_close(diag, torch.diagonal(brute_force_ntk(model, x)))
    with pytest.raises(ValueError, match="block"):
        ntk_diagonal(model, x, plan=DENSE, block=0)
