"""Tests for ``lin_probe.ntk._plumbing``: output checks, chunk arithmetic and the saved-bytes count.

References are written out by hand (the expected flattening, slice lists and byte counts).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lin_probe.ntk._plumbing import (
    measure_one_example,
    output_matrix,
    saved_bytes,
    slices,
    stream_block_pairs,
)


def test_output_matrix_flattens_per_example() -> None:
    raw = torch.arange(24.0).reshape(4, 3, 2)
    flat = output_matrix(raw, None, 4)
    assert torch.equal(flat, raw.reshape(4, 6))
    assert torch.equal(output_matrix(raw, None), flat)  # batch=None: the leading dimension, whatever it is
    assert torch.equal(output_matrix((raw, "aux"), lambda out: out[0]), flat)


@pytest.mark.parametrize(
    ("raw", "output_fn", "batch", "error", "match"),
    [
        ((torch.ones(2, 3),), None, 2, TypeError, "the model returned a tuple.*output_fn"),
        (torch.ones(2, 3), lambda out: [out], 2, TypeError, "`output_fn` returned a list"),
        (torch.ones(3, 2), None, 2, ValueError, "must index the 2 input"),
        (torch.tensor(1.0), None, None, ValueError, "leading dimension"),
        (torch.ones(2, 3, dtype=torch.int64), None, 2, TypeError, "real-valued"),
        (torch.ones(2, 0), None, 2, ValueError, "C = 0"),
    ],
)
def test_output_matrix_refusals(
    raw: object, output_fn: object, batch: int | None, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        output_matrix(raw, output_fn, batch)  # type: ignore[arg-type]


def test_slices_cover_the_range() -> None:
    assert list(slices(7, 3)) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert list(slices(4, 10)) == [slice(0, 4)]


@pytest.mark.parametrize("count", [1, 2, 5])
def test_stream_block_pairs_visits_each_pair_once_with_fewest_loads(count: int) -> None:
    loads: list[int] = []
    pairs: list[tuple[int, int]] = []

    def load(i: int) -> int:
        loads.append(i)
        return i

    def add(i: int, j: int, a: int, b: int) -> None:
        assert (a, b) == (i, j)  # the blocks handed over are the ones named
        pairs.append((i, j))

    stream_block_pairs(count, load, add)
    assert sorted(pairs) == [(i, j) for i in range(count) for j in range(i, count)]
    assert len(loads) == count * (count - 1) // 2 + 1


def test_saved_bytes_exclude_parameters() -> None:
    """``y = tanh(x Wᵀ)`` saves x (for ∂W) and tanh's output; W itself is not counted."""
    layer = nn.Linear(5, 4, bias=False).double()
    params = dict(layer.named_parameters())

    def forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.func.functional_call(layer, p, (x,)))

    width, saved = measure_one_example(forward, params, torch.randn(1, 5, dtype=torch.float64))
    assert width == 4
    assert saved == (5 + 4) * 8  # x (1×5) and tanh(xWᵀ) (1×4), float64


def test_saved_bytes_count_storage_once() -> None:
    """An expanded (stride-0) view saved for backward holds its storage only, and a tensor saved by two
    operations is counted once: ``x·e`` and ``x·x`` save ``x`` (5 numbers) and ``e``'s one number."""
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    e = torch.randn(1, dtype=torch.float64).expand(5)  # 5 elements, 1 stored
    with saved_bytes([]) as saved:
        _ = (x * e).sum() + (x * x).sum()
    assert saved[0] == (5 + 1) * 8
