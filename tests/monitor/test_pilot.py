"""``measure_costs``: what the pilot records about the NTK's outputs for the planner.

The seconds themselves are timings (the planner's tests use fixed ones); what is pinned here is
the one non-timed figure, ``exact_ntk_factor`` = C/S: set only where ``outputs="auto"`` would
sketch, so that only there may the budget choose the exact kernel instead.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lin_probe.monitor.outputs import MIN_PROJECTIONS
from lin_probe.monitor.pilot import measure_costs
from lin_probe.plan import ComputePlan


def _costs(model: nn.Module, inputs: torch.Tensor, setting: str):  # type: ignore[no-untyped-def]
    weights = {name: 1.0 for name, _ in model.named_parameters()}
    return measure_costs(
        model,
        inputs,
        outputs_setting=setting,
        output_fn=None,
        param_weights=weights,
        plan=ComputePlan(),
        batch_size=8,
        steps_per_epoch=None,
        center=False,
    )


@pytest.mark.parametrize(("outputs", "setting", "factor"), [
    (256, "auto", 256 / MIN_PROJECTIONS),  # sketched by auto at 32 directions: exact costs 8×
    (256, "sketch", None),  # forced: the budget does not overrule the user
    (256, "exact", None),
    (10, "auto", None),  # a classifier: exact already
])  # fmt: skip
def test_the_exact_factor_is_set_only_where_auto_would_sketch(
    outputs: int, setting: str, factor: float | None
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, outputs))
    costs = _costs(model, torch.randn(32, 6), setting)
    assert costs.exact_ntk_factor == factor
    assert costs.ntk_linear >= 0 and costs.ntk_quadratic >= 0 and costs.step_s > 0
