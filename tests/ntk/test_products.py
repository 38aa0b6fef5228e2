"""Tests for ``lin_probe.ntk.products``: ``u ↦ Θu`` against the independent brute-force kernel times ``u``.

The reference (``_ntk_reference.brute_force_ntk``, per-example autograd on a deep copy) never
forms a product the way the code under test does (vjp then jvp), so agreement checks the whole
path; tolerance as explained there.
"""

from __future__ import annotations

import pytest
import torch
from _ntk_reference import DTYPE, assert_close, brute_force_ntk, mlp
from torch import Tensor

import lin_probe.ntk.products as products_module
from lin_probe.ntk import ntk_matvec


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_ntk_matvec_matches_brute_force(chunk_size: int | None) -> None:
    model, x = mlp(c=4), torch.randn(7, 5, dtype=DTYPE)
    weights = {"2.weight": 0.5}
    reference = brute_force_ntk(model, x, weights=weights)
    matvec = ntk_matvec(model, x, param_weights=weights, chunk_size=chunk_size)
    for _ in range(3):
        u = torch.randn(7, dtype=DTYPE)
        assert_close(matvec(u), reference @ u)


def _record_push_forwards(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record ``(examples, outputs)`` of every jvp chunk the product runs."""
    calls: list[tuple[int, int]] = []
    original = products_module._push_forward

    def spy(forward: object, params: object, rows: Tensor, tangents: object, outputs: slice) -> Tensor:
        calls.append((rows.shape[0], outputs.stop - outputs.start))
        return original(forward, params, rows, tangents, outputs)  # type: ignore[arg-type]

    monkeypatch.setattr(products_module, "_push_forward", spy)
    return calls


def test_ntk_matvec_honours_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1-byte budget gives one output per vjp/jvp slice and one example per chunk; the default, one chunk.

    Before the fix ``ntk_matvec`` took no budget and always read the module default.
    """
    model, x = mlp(c=3), torch.randn(5, 5, dtype=DTYPE)
    u = torch.randn(5, dtype=DTYPE)
    expected = brute_force_ntk(model, x) @ u
    calls = _record_push_forwards(monkeypatch)
    assert_close(ntk_matvec(model, x, memory_budget=1)(u), expected)
    assert calls == [(1, 1)] * 15  # 3 output slices × 5 one-example chunks
    calls.clear()
    assert_close(ntk_matvec(model, x)(u), expected)
    assert calls == [(5, 3)]
    with pytest.raises(ValueError, match="memory_budget"):
        ntk_matvec(model, x, memory_budget=0)


def test_ntk_matvec_tracks_the_current_parameters() -> None:
    """The product re-reads θ at each call: after an in-place change it is the new model's Θu."""
    model, x = mlp(), torch.randn(6, 5, dtype=DTYPE)
    matvec = ntk_matvec(model, x)
    u = torch.randn(6, dtype=DTYPE)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    assert_close(matvec(u), brute_force_ntk(model, x) @ u)


def test_ntk_matvec_rejects_nan_inputs_and_vectors() -> None:
    x = torch.randn(4, 5, dtype=DTYPE)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ntk_matvec(mlp(), bad)
    u = torch.randn(4, dtype=DTYPE)
    u[0] = float("inf")
    with pytest.raises(ValueError, match="NaN"):
        ntk_matvec(mlp(), x)(u)


def test_ntk_matvec_rejects_wrong_shape() -> None:
    matvec = ntk_matvec(mlp(), torch.randn(4, 5, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        matvec(torch.randn(3, dtype=DTYPE))
