"""The structured path's output slicing: a budget too small for every output's features records slices.

The kernel is a sum over outputs, so recording ``k`` outputs at a time (each chunk once per slice)
must give the same kernel as one pass over all ``C``; checked against the float64 brute force of
``_ntk_reference``. The planner's choice is pinned on budgets found from its own size arithmetic
(``plan_structured`` is pure planning), the pricing rule as arithmetic.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _ntk_reference import DTYPE, assert_close, brute_force_ntk, spy_generic, structured_plan
from torch import Tensor, nn

from lin_probe.ntk import empirical_ntk
from lin_probe.ntk import structured as structured_module
from lin_probe.ntk.structured import StructuredPlan


def _sliced_budget(model: nn.Module, x: Tensor) -> tuple[int, StructuredPlan]:
    """The largest power-of-two budget at which the planner slices the outputs."""
    for power in range(24, 8, -1):
        plan = structured_plan(model, x, 2**power)
        if plan is not None and plan.k < plan.width:
            return 2**power, plan
    raise AssertionError("no budget made the planner slice the outputs")


def _spy_recordings(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """``(examples, outputs)`` of every chunk recording the structured path makes."""
    recorded: list[tuple[int, int]] = []
    original = structured_module._chunk_features

    def spy(
        model: nn.Module, constants: Any, layers: Any, rows: Tensor, to_matrix: Any, width: int, *rest: Any
    ) -> Any:
        recorded.append((rows.shape[0], width))
        return original(model, constants, layers, rows, to_matrix, width, *rest)

    monkeypatch.setattr(structured_module, "_chunk_features", spy)
    return recorded


def _wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 9)).to(
        DTYPE
    )


def _sequence_model() -> nn.Module:
    """A Conv1d and a sequence Linear: both strategies (weight gradients, patch Gram) are priced."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 10, 12)).to(
        DTYPE
    )


@pytest.mark.parametrize(("build", "shape"), [(_wide_mlp, (6,)), (_sequence_model, (3, 10))])
def test_sliced_outputs_match_brute_force(
    build: Any, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build()
    x = torch.randn(24, *shape, dtype=DTYPE)
    budget, plan = _sliced_budget(model, x)
    assert structured_plan(model, x, 2**30).k == plan.width, "a generous budget records every output at once"
    recorded = _spy_recordings(monkeypatch)
    generic = spy_generic(monkeypatch)
    theta = empirical_ntk(model, x, method="structured", memory_budget=budget)
    assert generic == []
    assert_close(theta, brute_force_ntk(model, x))
    # every output recorded for every example, slice by slice, and no recording of more than k outputs
    widths = [k for _, k in recorded]
    assert max(widths) == plan.k < plan.width
    assert sum(b * k for b, k in recorded) >= x.shape[0] * plan.width
    assert len(recorded) == plan.loads


def test_one_example_over_the_budget_at_full_width_is_sliced_not_generic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before slicing, an example whose all-output features exceeded the budget sent everything generic."""
    model = _wide_mlp()
    x = torch.randn(6, 6, dtype=DTYPE)
    budgets = [2**power for power in range(20, 8, -1) if structured_plan(model, x, 2**power) is not None]
    smallest = budgets[-1]
    assert structured_plan(model, x, smallest).k < 9
    with monkeypatch.context() as unsliced:
        unsliced.setattr(structured_module, "_slice_widths", lambda width: [width])
        assert structured_plan(model, x, smallest) is None, "all outputs at once must not fit this budget"
    generic = spy_generic(monkeypatch)
    theta = empirical_ntk(model, x, method="structured", memory_budget=smallest)
    assert generic == []
    assert_close(theta, brute_force_ntk(model, x))


def test_slice_widths_halve_down_to_one() -> None:
    assert structured_module._slice_widths(9) == [9, 5, 3, 2, 1]
    assert structured_module._slice_widths(1) == [1]
    assert structured_module._slice_widths(16) == [16, 8, 4, 2, 1]


def test_recorded_examples_price_each_slice_by_its_outputs() -> None:
    """A cached plan of C = 7 in slices of 3 (3, 3, 1): each slice costs (1 + k)/(1 + C) of an all-output pass."""
    plan = StructuredPlan([], width=7, n=10, b=10, cache=True, k=3)
    assert [s.stop - s.start for s in plan.output_slices] == [3, 3, 1]
    assert plan.recorded_examples == pytest.approx(10 * (4 + 4 + 2) / 8)
    assert plan.loads == 3
    unsliced = StructuredPlan([], width=7, n=10, b=10, cache=True)
    assert (unsliced.k, unsliced.recorded_examples, unsliced.loads) == (7, 10, 1)
    # recomputed pairs: 3 chunks of 4 → 3·2/2 + 1 = 4 loads per slice
    recomputed = StructuredPlan([], width=7, n=12, b=4, cache=False, k=7)
    assert (recomputed.loads, recomputed.recorded_examples) == (4, 16)


def test_a_plan_counts_its_multiply_adds_split_into_recordings_and_grams() -> None:
    """MLP 5 → 7 → 3 on n examples, both layers on the patch Gram (one position): per layer the Gram
    is ``n²·(C·O + D)``, and each recording ``(1 + C)`` forwards of ``Σ O·D`` (patches need no forming)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DTYPE)
    n, c = 40, 3
    plan = structured_plan(model, torch.randn(n, 5, dtype=DTYPE), 2**30)
    assert [ly.strategy for ly in plan.layers] == ["patch", "patch"]
    gram = n * n * ((c * 7 + 5) + (c * 3 + 7))
    assert plan.gram_macs == gram
    assert plan.macs == gram + n * (1 + c) * (7 * 5 + 3 * 7)
