"""Network-vs-shadow comparisons against numpy written out from their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lin_probe.monitor.metrics import functional_distance, prediction_agreement


def test_functional_distance_against_numpy() -> None:
    gen = torch.Generator().manual_seed(0)
    net, lin, init = (torch.randn(20, 3, generator=gen) for _ in range(3))
    got = functional_distance(net, lin, init)
    f, g, f0 = net.double().numpy(), lin.double().numpy(), init.double().numpy()
    assert got["functional_distance"] == pytest.approx(np.sqrt(np.mean((f - g) ** 2)), rel=1e-12)
    assert got["functional_distance_rel"] == pytest.approx(
        np.linalg.norm(f - g) / np.linalg.norm(f - f0), rel=1e-12
    )


def test_relative_distance_is_zero_before_the_network_moves_and_nan_when_it_diverged() -> None:
    net = torch.ones(4, 2)
    assert functional_distance(net, torch.zeros(4, 2), net) == {
        "functional_distance": 1.0,
        "functional_distance_rel": 0.0,
    }
    diverged = torch.full((4, 2), math.nan)
    assert math.isnan(functional_distance(diverged, net, torch.zeros(4, 2))["functional_distance_rel"])


def test_prediction_agreement_counts_by_hand() -> None:
    net = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])  # classes 0 1 0 1
    lin = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, 0.0], [1.0, 0.0]])  # classes 1 1 0 0
    targets = torch.tensor([0, 1, 1, 1])
    assert prediction_agreement(net, lin, targets) == {
        "agreement": 0.5,
        "accuracy_network": 0.75,
        "accuracy_linear": 0.25,
    }
    assert prediction_agreement(net, lin, targets.float()) == {"agreement": 0.5}  # soft targets: no accuracy
