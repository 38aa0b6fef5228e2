"""``measure_costs``: what the pilot records about the NTK's outputs for the planner.

The seconds themselves are timings (the planner's tests use fixed ones); what is pinned here is
what is not timed: ``exact_ntk_factor`` = C/S, set only where ``outputs="auto"`` may sketch (any
model with more outputs than a sketch's directions, a classifier too), so that only there may the
budget choose between the exact kernel and the sketch; and the counted Gram share the
NTK's cost curve is given (against the closed-form multiply-adds of a plain Linear stack).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lin_probe.monitor.outputs import FEW_OUTPUT_PROJECTIONS, MIN_PROJECTIONS
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
    (10, "auto", 10 / FEW_OUTPUT_PROJECTIONS),  # a classifier: timed over 2 directions, planned both ways
    (10, "exact", None),
    (2, "auto", None),  # two outputs: no sketch is cheaper
])  # fmt: skip
def test_the_exact_factor_is_set_only_where_auto_would_sketch(
    outputs: int, setting: str, factor: float | None
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, outputs))
    costs = _costs(model, torch.randn(32, 6), setting)
    assert costs.exact_ntk_factor == factor
    assert costs.ntk_linear >= 0 and costs.ntk_quadratic >= 0 and costs.step_s > 0


class _Scaled(nn.Module):
    """A Linear stack and a bare scale no structured rule covers: a generic rest."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(6, 16), nn.Linear(16, 3)
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(x)) * self.scale)


def test_the_cost_curve_gets_the_counted_gram_share_where_every_multiply_add_is_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lin_probe.monitor.pilot as pilot_module

    shares: list[float | None] = []
    original = pilot_module.ntk_cost_curve

    def spy(samples: list[tuple[int, float]], *, gram_share: float | None = None) -> tuple[float, float]:
        shares.append(gram_share)
        return original(samples, gram_share=gram_share)

    monkeypatch.setattr(pilot_module, "ntk_cost_curve", spy)
    torch.manual_seed(0)
    stack = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    _costs(stack, torch.randn(32, 6), "exact")
    # 8 examples, C = 3; per example: (1 + C) forwards of 6·16 + 16·3 multiply-adds; both layers'
    # patch Grams (one position): n²·(C·O + D) = 64·(3·16 + 6) and 64·(3·3 + 16)
    recording = 8 * (1 + 3) * (6 * 16 + 16 * 3)
    gram = 64 * (3 * 16 + 6) + 64 * (3 * 3 + 16)
    _costs(_Scaled(), torch.randn(32, 6), "exact")
    _costs(stack, torch.randn(32, 6), "auto")  # timed over a 2-direction sketch: its share is counted too
    assert shares[0] == pytest.approx(gram / (recording + gram), rel=1e-9)
    assert shares[1] is None  # the scale's generic kernel is not counted
    assert shares[2] is not None and 0.0 < shares[2] < 1.0


def test_the_pilot_measures_on_the_smallest_probe_only() -> None:
    """Given the 256 candidates, no forward of the pilot sees more than the first 32 examples: the
    BatchNorm calibration on all 256 was the largest part of a ResNet's pilot."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    inputs = torch.randn(256, 6)
    rows: list[int] = []
    model.register_forward_pre_hook(lambda _module, args: rows.append(args[0].shape[0]))
    costs = _costs(model, inputs, "exact")
    assert rows and max(rows) == 32  # the calibration's and the functional check's forward
    assert costs.functional_per_example_s > 0
    assert model.training and all(torch.isfinite(p).all() for p in model.parameters())
