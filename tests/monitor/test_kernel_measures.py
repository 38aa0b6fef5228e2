"""The kernel measures against numpy computations written from their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lin_probe.monitor.kernel_measures import (
    kernel_alignment,
    kernel_distance,
    kernel_velocity,
    ntk_scale,
    target_matrix,
)


def _psd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n + 3, generator=g, dtype=torch.float64)
    return a @ a.T


def _numpy_distance(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 - float(np.sum(a * b) / (np.linalg.norm(a, "fro") * np.linalg.norm(b, "fro")))


def _numpy_alignment(k: np.ndarray, y: np.ndarray) -> float:
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    kc, yc = h @ k @ h, h @ y @ y.T @ h
    return float(np.sum(kc * yc) / (np.linalg.norm(kc, "fro") * np.linalg.norm(yc, "fro")))


def test_kernel_distance_matches_its_definition_and_ignores_scale() -> None:
    a, b = _psd(12, 0), _psd(12, 1)
    assert kernel_distance(a, b) == pytest.approx(_numpy_distance(a.numpy(), b.numpy()), rel=1e-12)
    assert kernel_distance(a, 7.5 * a) == pytest.approx(0.0, abs=1e-12)  # the distance ignores scale
    assert math.isnan(kernel_distance(a, torch.zeros_like(a)))


def test_kernel_distance_is_one_for_frobenius_orthogonal_kernels() -> None:
    first = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    second = torch.diag(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert kernel_distance(first, second) == pytest.approx(1.0, abs=1e-15)


def test_kernel_velocity_is_the_distance_per_step() -> None:
    a, b = _psd(8, 2), _psd(8, 3)
    assert kernel_velocity(a, b, 4) == pytest.approx(_numpy_distance(a.numpy(), b.numpy()) / 4, rel=1e-12)
    assert math.isnan(kernel_velocity(a, b, 0))


def test_alignment_matches_the_centred_definition_for_regression_targets() -> None:
    k = _psd(10, 4)
    y = torch.randn(10, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert kernel_alignment(k, y) == pytest.approx(_numpy_alignment(k.numpy(), y.numpy()), rel=1e-12)


def test_alignment_of_the_target_kernel_itself_is_one_and_class_labels_are_one_hot() -> None:
    labels = torch.tensor([0, 2, 1, 2, 0, 1, 1])
    y = target_matrix(labels, n_outputs=3)
    expected = np.eye(3)[labels.numpy()]
    np.testing.assert_array_equal(y.numpy(), expected)
    assert kernel_alignment(y @ y.T, y) == pytest.approx(1.0, abs=1e-12)
    # an extra constant on every entry is removed by the centring
    assert kernel_alignment(y @ y.T + 5.0, y) == pytest.approx(1.0, abs=1e-12)


def test_alignment_is_nan_for_constant_targets() -> None:
    assert math.isnan(kernel_alignment(_psd(6, 6), torch.ones(6, 1, dtype=torch.float64)))


def test_ntk_scale() -> None:
    assert ntk_scale(3.0, 2.0) == 1.5
    assert math.isnan(ntk_scale(1.0, 0.0))
