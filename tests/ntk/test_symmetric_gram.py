"""Symmetric Gram products: a kernel's diagonal blocks multiply only their upper triangle of tiles.

``gram_product(a, a)`` is checked against the plain ``a @ aᵀ`` (torch's matmul, not the tiles),
and each kernel path that now tiles — the structured rules' weight-gradient, patch and token Grams,
and the generic Jacobian contraction — against the float64 brute force of ``_ntk_reference``, at
sizes where the tiles are taken (≥ 2 × ``GRAM_TILE_ROWS`` rows). Which strategy a layer uses is
asserted from the plan, so each test exercises the Gram it names.
"""

from __future__ import annotations

import pytest
import torch
from _ntk_reference import DTYPE, assert_close, brute_force_ntk, structured_plan
from torch import Tensor, nn

from lin_probe.ntk import empirical_ntk
from lin_probe.ntk._plumbing import GRAM_TILE_ROWS, gram_product, gram_tile


@pytest.mark.parametrize(
    "rows", [1, 2 * GRAM_TILE_ROWS - 1, 2 * GRAM_TILE_ROWS, 2 * GRAM_TILE_ROWS + 1, 1000]
)
def test_gram_product_of_a_matrix_with_itself_is_its_full_gram(rows: int) -> None:
    a = torch.randn(rows, 37, dtype=DTYPE, generator=torch.Generator().manual_seed(rows))
    out = gram_product(a, a)
    torch.testing.assert_close(out, a @ a.T, rtol=1e-12, atol=1e-12)  # the mirrored tiles included


def test_gram_product_of_two_matrices_is_their_product() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(600, 9, dtype=DTYPE, generator=generator) for _ in range(2))
    torch.testing.assert_close(gram_product(a, b), a @ b.T, rtol=1e-12, atol=1e-12)


def test_gram_tiles_are_a_quarter_of_the_rows_but_never_small() -> None:
    assert gram_tile(1024) == 256
    assert gram_tile(300) == GRAM_TILE_ROWS
    assert gram_tile(40) == 40


def _inputs(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def _strategies(model: nn.Module, x: Tensor) -> set[str]:
    plan = structured_plan(model, x, 2**30)
    assert plan is not None and plan.cache, "the test needs every feature gathered (one symmetric Gram)"
    return {ly.strategy for ly in plan.layers}


def test_patch_gram_tiles_match_the_brute_force() -> None:
    """An MLP: Linear layers take the patch Gram with one position, 300 rows → three tiles."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DTYPE)
    x = _inputs(300, 5)
    assert _strategies(model, x) == {"patch"}
    assert_close(empirical_ntk(model, x, method="structured"), brute_force_ntk(model, x))


def test_patch_gram_tiles_over_positions_match_the_brute_force() -> None:
    """A convolution with few positions keeps the patch Gram; 40 examples × 8 positions = 320 rows."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(24, 2)).to(DTYPE)
    x = _inputs(40, 2, 17, seed=1)
    assert "patch" in _strategies(model, x)
    assert_close(empirical_ntk(model, x, method="structured"), brute_force_ntk(model, x))


def test_weight_gradient_gram_tiles_match_the_brute_force() -> None:
    """A convolution over many positions reduces to per-example weight gradients (300 rows)."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.Tanh(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(3, 2)
    ).to(DTYPE)
    x = _inputs(300, 2, 40, seed=2)
    assert "grads" in _strategies(model, x)
    assert_close(empirical_ntk(model, x, method="structured"), brute_force_ntk(model, x))


def test_token_gram_tiles_match_the_brute_force() -> None:
    """An embedding over a large vocabulary takes the token Gram; 40 sequences × 8 tokens = 320 rows."""
    torch.manual_seed(3)

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(500, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, tokens: Tensor) -> Tensor:
            return self.head(torch.tanh(self.embed(tokens)).mean(dim=1))

    model = Bag().to(DTYPE)
    tokens = torch.randint(0, 20, (40, 8), generator=torch.Generator().manual_seed(3))  # repeats
    assert "tokens" in _strategies(model, tokens)
    assert_close(empirical_ntk(model, tokens, method="structured"), brute_force_ntk(model, tokens))


def test_generic_contraction_tiles_match_the_brute_force() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DTYPE)
    x = _inputs(300, 5, seed=4)
    assert_close(empirical_ntk(model, x, method="generic"), brute_force_ntk(model, x))
