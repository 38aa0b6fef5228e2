"""``MonitorConfig`` refuses bad settings at construction, with the names a user typed."""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from lin_probe.monitor.config import MonitorConfig


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss": "hinge"}, ValueError, "Unknown loss 'hinge'"),
        ({"tolerance": 0.0}, ValueError, "tolerance"),
        ({"patience": 0}, ValueError, "patience"),
        ({"output_fn": 3}, TypeError, "output_fn"),
        ({"features_fn": "x"}, TypeError, "features_fn"),
        ({"plan": {"memory_budget": 1}}, TypeError, "ComputePlan"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MonitorConfig(**kwargs)


def test_loss_and_classification_follow_the_named_loss() -> None:
    assert MonitorConfig(loss="cross_entropy").classification
    assert not MonitorConfig(loss="mse").classification
    assert MonitorConfig(loss=F.cross_entropy).classification
    assert MonitorConfig(loss=F.l1_loss).loss_fn is F.l1_loss
