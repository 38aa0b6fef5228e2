"""Structured NTK rules for BatchNorm / LayerNorm / GroupNorm affine parameters and ``nn.Embedding``.

Every kernel is compared with the brute force of ``_ntk_reference``: one ``torch.autograd.grad`` per
example and output over the ``requires_grad`` parameters of an eval-mode deep copy, here in float64,
contracted as ``(1/C) Σ_c Σ_p w_p g_{i,c,p}·g_{j,c,p}`` (nothing from ``lin_probe``). The two computations only
differ in summation order (relative ~1e-14), so ``RTOL = 1e-9`` has orders of margin while the
targeted bugs (x̂ from the output or with batch statistics, a missing position sum, padding rows
updated, a token matched to the wrong position, a weight on the wrong parameter) change entries by
O(1) relative amounts. ``method="structured"`` plus a spy on the generic path proves the rule ran.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from _ntk_reference import assert_close, brute_force_ntk, spy_generic
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import lin_probe.ntk.structured as structured_module
from lin_probe.ntk import empirical_ntk

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


def brute_force(model: nn.Module, x: Tensor, weights: Mapping[str, float] | None = None) -> Tensor:
    """The shared float64 brute force (``_ntk_reference``) on a float64 copy, whatever ``model``'s dtype."""
    x = x.to(DTYPE) if x.is_floating_point() else x
    return brute_force_ntk(copy.deepcopy(model).to(DTYPE), x, weights=weights)


def check_structured(model: nn.Module, x: Tensor, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> Tensor:
    """``structured`` and ``auto`` both equal the brute force and never touch the generic path."""
    calls = spy_generic(monkeypatch)
    expected = brute_force(model, x, kwargs.get("param_weights"))
    theta = empirical_ntk(model, x, method="structured", **kwargs)
    assert_close(theta, expected)
    assert_close(empirical_ntk(model, x, method="auto", **kwargs), expected)
    assert calls == []
    return theta


def randomise_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Non-trivial running statistics and affine parameters (one γ = 0: x̂ must not come from the output)."""
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn_like(bn.running_mean))
        bn.running_var.copy_(torch.rand_like(bn.running_var) * 2 + 0.3)
        bn.weight.copy_(torch.randn_like(bn.weight))
        bn.weight[0] = 0.0
        bn.bias.copy_(torch.randn_like(bn.bias))


# ------------------------------------------------------------------------------- normalisation


def test_cnn_batchnorm2d_eval_running_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 25, 3)
    ).to(DTYPE)
    randomise_bn(model[1])
    model.train()  # the measurement must still use running statistics
    check_structured(model, torch.randn(6, 2, 5, 5, dtype=DTYPE), monkeypatch)
    assert model.training and model[1].training


def test_only_norm_parameters_trainable_is_structured(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 9, 2)
    ).to(DTYPE)
    randomise_bn(model[1])
    for i in (0, 4):
        model[i].requires_grad_(False)
    check_structured(model, torch.randn(5, 2, 5, 5, dtype=DTYPE), monkeypatch)


@pytest.mark.parametrize("sequence", [False, True])
def test_batchnorm1d(sequence: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if sequence:  # (N, C, L) input
        model = nn.Sequential(
            nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5, 2)
        )
        x = torch.randn(6, 3, 7, dtype=DTYPE)
    else:
        model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(6, 5, dtype=DTYPE)
    model = model.to(DTYPE)
    randomise_bn(model[1])
    check_structured(model, x, monkeypatch)


class SeqNorm(nn.Module):
    """Tokens (B, T, D) → LayerNorm → Linear per token → mean over T → head."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 5)
        self.norm = norm
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.norm(self.proj(x))).mean(dim=1))


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_on_sequences(bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model = SeqNorm(nn.LayerNorm(5, bias=bias)).to(DTYPE)
    with torch.no_grad():
        model.norm.weight.copy_(torch.randn(5))
        if bias:
            model.norm.bias.copy_(torch.randn(5))
    check_structured(model, torch.randn(5, 3, 4, dtype=DTYPE), monkeypatch)


def test_layernorm_over_two_dims(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm((3, 5)), nn.Tanh(), nn.Flatten(), nn.Linear(15, 2))
    model = model.to(DTYPE)
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(3, 5))
    check_structured(model, torch.randn(4, 3, 4, dtype=DTYPE), monkeypatch)


def test_layernorm_on_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(6))
        model[1].bias.copy_(torch.randn(6))
    check_structured(model, torch.randn(6, 4, dtype=DTYPE), monkeypatch)


def test_groupnorm_in_cnn(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 16, 2)
    ).to(DTYPE)
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(6))
        model[1].bias.copy_(torch.randn(6))
    check_structured(model, torch.randn(5, 2, 4, 4, dtype=DTYPE), monkeypatch)


def test_batchnorm_without_running_stats_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 9, 2),
    ).to(DTYPE)
    x = torch.randn(5, 2, 5, 5, dtype=DTYPE)
    calls = spy_generic(monkeypatch)
    theta = empirical_ntk(model, x)
    # the BN mixes a chunk's examples, so every layer (not just the BN) must go generic
    assert calls == [{"0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"}]
    assert_close(theta, brute_force(model, x))
    with pytest.raises(structured_module.NotStructurable, match="track_running_stats=False"):
        empirical_ntk(model, x, method="structured")


# ----------------------------------------------------------------------------------- embedding


class Bag(nn.Module):
    """Embedding → mean over positions → Linear head."""

    def __init__(self, vocab: int, dim: int, padding_idx: int | None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.head = nn.Linear(dim, 3)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, dim))  # padding row non-zero too

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(tokens).mean(dim=1)))


def _tokens(n: int, length: int, vocab: int, padding_idx: int | None) -> Tensor:
    tok = torch.randint(0, 4, (n, length))  # few distinct ids: repeats within and across examples
    tok[0, :2] = 1
    tok[1, 0] = 1
    if padding_idx is not None:
        tok[:, -1] = padding_idx
        tok[2, 0] = padding_idx
    return tok


@pytest.mark.parametrize("strategy", [None, "grads", "tokens"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_bag(
    strategy: str | None, padding_idx: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if strategy is not None:
        original = structured_module._choose_strategy
        monkeypatch.setattr(
            structured_module,
            "_choose_strategy",
            lambda ly, n, width: strategy if ly.kind == "embedding" else original(ly, n, width),
        )
    model = Bag(7, 4, padding_idx).to(DTYPE)
    check_structured(model, _tokens(6, 5, 7, padding_idx), monkeypatch)


def test_embedding_only_trainable_and_unbatched_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Embedding(6, 3), nn.Tanh(), nn.Linear(3, 2)).to(DTYPE)  # (n,) tokens
    model[2].requires_grad_(False)
    check_structured(model, torch.tensor([0, 3, 3, 5, 1]), monkeypatch)


def test_large_vocabulary_uses_token_gram(monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[int] = []
    original = structured_module._token_gram
    monkeypatch.setattr(structured_module, "_token_gram", lambda *a: used.append(1) or original(*a))
    model = Bag(5000, 4, padding_idx=0).to(DTYPE)  # C·V·d·8 = 480 kB per example > budget / 4
    check_structured(
        model, _tokens(4, 3, 5000, 0), monkeypatch, memory_budget=1 << 20, param_weights={"emb.weight": 3.0}
    )
    assert used


def test_embedding_scale_grad_by_freq_goes_generic(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Bag(7, 4, None).to(DTYPE)
    model.emb.scale_grad_by_freq = True
    x = _tokens(5, 4, 7, None)
    calls = spy_generic(monkeypatch)
    assert_close(empirical_ntk(model, x), brute_force(model, x))
    assert calls == [{"emb.weight"}]


# ------------------------------------------------------------------------- weights, dtype, guards


def test_param_weights_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 4, padding_idx=0)
            self.norm = nn.LayerNorm(4)
            self.bn = nn.BatchNorm1d(4)
            self.head = nn.Linear(4, 2)

        def forward(self, tok: Tensor) -> Tensor:
            return self.head(torch.tanh(self.bn(self.norm(self.emb(tok)).mean(dim=1))))

    model = Net().to(DTYPE)
    randomise_bn(model.bn)
    with torch.no_grad():
        model.norm.weight.copy_(torch.randn(4))
    weights = {"emb.weight": 3.0, "norm.weight": 0.25, "norm.bias": 2.0, "bn.weight": 5.0, "bn.bias": 0.1}
    x = _tokens(5, 4, 6, 0)
    theta = check_structured(model, x, monkeypatch, param_weights=weights)
    assert (theta - brute_force(model, x)).abs().max() > 1e-3 * theta.abs().max()  # weights matter


def test_float32_within_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 25, 3)
    ).to(DTYPE)
    randomise_bn(model[1])
    x = torch.randn(6, 2, 5, 5, dtype=DTYPE)
    expected = brute_force(model, x)
    model32 = copy.deepcopy(model).float()
    calls = spy_generic(monkeypatch)
    theta = empirical_ntk(model32, x.float(), method="structured")
    assert theta.dtype == torch.float32 and calls == []
    assert_close(theta, expected, rtol=1e-4)


def test_subclass_with_base_forward_is_structured(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(NonDynamicallyQuantizableLinear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(DTYPE)
    check_structured(model, torch.randn(5, 4, dtype=DTYPE), monkeypatch)


def test_subclass_overriding_forward_goes_generic(monkeypatch: pytest.MonkeyPatch) -> None:
    class Doubled(nn.LayerNorm):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x) ** 2

    model = nn.Sequential(nn.Linear(4, 5), Doubled(5), nn.Linear(5, 2)).to(DTYPE)
    x = torch.randn(5, 4, dtype=DTYPE)
    calls = spy_generic(monkeypatch)
    assert_close(empirical_ntk(model, x), brute_force(model, x))
    assert calls == [{"1.weight", "1.bias"}]
