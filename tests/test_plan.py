"""Tests for ``lin_probe.plan.ComputePlan``: the dense-vs-matrix-free rule, written out by hand."""

from __future__ import annotations

import pytest

from lin_probe.plan import DEFAULT_MEMORY_BUDGET_BYTES, DENSE_MAX_N, ComputePlan


def test_dense_rule() -> None:
    gib = 1 << 30
    plan = ComputePlan()
    assert plan.memory_budget == plan.kernel_budget == DEFAULT_MEMORY_BUDGET_BYTES == gib
    assert DENSE_MAX_N == 4096
    assert plan.dense(10)
    # 2 float64 copies of a 4096² matrix = 2^28 bytes = exactly a quarter of 1 GiB.
    assert plan.dense(4096)
    assert not ComputePlan(kernel_budget=1000 * gib).dense(4097)  # eigvalsh cost cap
    assert not plan.dense(1_000_000)
    assert not ComputePlan(kernel_budget=1 << 20).dense(1000)  # 16 MB > 1 MiB / 4
    # 64·n² bytes: n = 32 fits exactly in a budget of 64·32², n = 33 does not
    assert ComputePlan(kernel_budget=64 * 32**2).dense(32)
    assert not ComputePlan(kernel_budget=64 * 32**2).dense(33)
    assert not ComputePlan(dense_max_n=100).dense(101)
    # the working budget does not decide: a tiny one still gives dense checks
    assert ComputePlan(memory_budget=1).dense(256)


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="`n` must be >= 1"):
        ComputePlan().dense(0)
    with pytest.raises(ValueError, match="kernel_budget"):
        ComputePlan(kernel_budget=0)
    with pytest.raises(TypeError, match="dense_max_n"):
        ComputePlan(dense_max_n=1.5)  # type: ignore[arg-type]


def test_resolve_takes_a_memory_budget_shorthand_or_a_plan_but_not_both() -> None:
    assert ComputePlan.resolve(None, None) == ComputePlan()
    assert ComputePlan.resolve(4096, None) == ComputePlan(memory_budget=4096)
    plan = ComputePlan(kernel_budget=1)
    assert ComputePlan.resolve(None, plan) is plan
    with pytest.raises(ValueError, match="not both"):
        ComputePlan.resolve(4096, plan)
    with pytest.raises(ValueError, match="memory_budget"):
        ComputePlan(memory_budget=0)
