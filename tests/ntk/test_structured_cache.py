"""The structured path's chunking: keep every chunk's features when they fit next to one small chunk.

Exactness against the float64 brute force of ``_ntk_reference``; the chunking rule as arithmetic.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _ntk_reference import DTYPE, assert_close, brute_force_ntk
from torch import nn

from lin_probe.ntk import empirical_ntk
from lin_probe.ntk import structured as structured_module


def test_chunking_keeps_features_when_they_fit_beside_a_small_chunk() -> None:
    n, t, r = 64, 1_000, 100
    # all features (6 400) + 4 examples recorded (4 400) fit 11 000: cached, chunks of 4
    assert structured_module._chunking(n, t, r, 11_000, None) == (4, True)
    # 10 000 leaves room for 3 < 4: two chunks at a time (b·(t + 2r) ≤ budget), recomputed
    b, cache = structured_module._chunking(n, t, r, 10_000, None)
    assert not cache and b * (t + 2 * r) <= 10_000
    # generous budget: one chunk of everything
    assert structured_module._chunking(n, t, r, 10**9, None) == (n, True)
    # a forced chunk size is kept; cached when features plus that chunk fit
    assert structured_module._chunking(n, t, r, 6_400 + 2 * (t + r), 2) == (2, True)
    assert structured_module._chunking(n, t, r, 6_400 + 2 * (t + r) - 1, 2) == (2, False)


def test_cached_small_chunks_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget where only the keep-all rule caches: each chunk recorded once, kernel exact."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2)).to(DTYPE)
    x = torch.randn(12, 2, 6, dtype=DTYPE)
    recorded: list[int] = []
    original = structured_module._chunk_features

    def spy(model: nn.Module, constants: Any, layers: Any, rows: torch.Tensor, *args: Any) -> Any:
        recorded.append(rows.shape[0])
        return original(model, constants, layers, rows, *args)

    chosen: list[tuple[int, bool]] = []
    chunking = structured_module._chunking

    def budget_for_keep_all(n: int, t: int, r: int, budget: int, chunk_size: int | None) -> tuple[int, bool]:
        result = chunking(n, t, r, n * r + 4 * (t + r), chunk_size)  # room for all features + 4 examples
        chosen.append(result)
        return result

    monkeypatch.setattr(structured_module, "_chunk_features", spy)
    monkeypatch.setattr(structured_module, "_chunking", budget_for_keep_all)
    kernel = empirical_ntk(model, x, method="structured")
    assert chosen == [(4, True)]
    assert recorded == [4, 4, 4]  # each chunk once: no pairwise recomputation
    assert_close(kernel, brute_force_ntk(model, x))
