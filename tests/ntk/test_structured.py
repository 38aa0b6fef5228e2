"""Tests for the structured per-layer NTK (``lin_probe.ntk.structured`` through ``empirical_ntk``).

Every kernel is compared with the independent brute force of ``_ntk_reference`` (one
``torch.autograd.grad`` per example and output on an eval-mode deep copy; nothing shared with the
hooks, patches or contractions under test). Float64 throughout; the two computations differ only
in summation order over at most a few thousand terms, so their relative difference is ~1e-15 and
``RTOL = 1e-9`` (``assert_close``'s default) leaves orders of margin, while the bugs targeted here (a patch in the
wrong order, a missing bias or position, cross-output terms, a layer counted twice or not at all,
a weight applied to the wrong term) change entries by O(1) relative amounts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from _ntk_reference import assert_close, brute_force_ntk, spy_generic, structured_plan
from torch import Tensor, nn

import lin_probe.ntk.structured as structured_module
from lin_probe.ntk import empirical_ntk

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(4321)


def _structured(model: nn.Module, x: Tensor, **kwargs: Any) -> Tensor:
    return empirical_ntk(model, x, method="structured", **kwargs)


# ------------------------------------------------------------------------------------ Linear


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_matches_brute_force_and_uses_no_generic_path(
    bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = nn.Sequential(
        nn.Linear(5, 8, bias=bias),
        nn.Tanh(),
        nn.Linear(8, 6, bias=bias),
        nn.GELU(),
        nn.Linear(6, 4, bias=bias),
    ).to(DTYPE)
    x = torch.randn(7, 5, dtype=DTYPE)
    calls = spy_generic(monkeypatch)
    theta = _structured(model, x)
    assert calls == []  # every parameter went through the structured Gram
    assert theta.dtype == DTYPE and torch.equal(theta, theta.T)
    assert_close(theta, brute_force_ntk(model, x))


def test_sequence_linear_sums_over_positions() -> None:
    # Linear on (n, T, d): the weight acts at T positions; outputs (n, T, C) flatten to T·C outputs.
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).to(DTYPE)
    x = torch.randn(5, 3, 5, dtype=DTYPE)
    assert_close(_structured(model, x), brute_force_ntk(model, x))


def test_tuple_output_with_output_fn() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DTYPE)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.body(x), x.sum(dim=1)

    model, x = Pair(), torch.randn(5, 4, dtype=DTYPE)

    def pick(out: Any) -> Tensor:
        return out[0]

    assert_close(_structured(model, x, output_fn=pick), brute_force_ntk(model, x, output_fn=pick))


# -------------------------------------------------------------------------------- convolutions

CONV_CASES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    (
        "conv2d_stride_pad_dilation_groups",
        lambda: nn.Sequential(
            nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
            nn.Tanh(),
            nn.Conv2d(6, 4, 2, padding="same", dilation=2, groups=2, bias=False),  # even kernel: asymmetric
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 3),
        ),
        (4, 8, 8),
    ),
    (
        "conv2d_rect_kernel_valid_circular",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(2, 1), padding_mode="circular"),
            nn.ReLU(),
            nn.Conv2d(3, 2, 3, padding="valid", dilation=(2, 1)),
            nn.Flatten(),
            nn.LazyLinear(2),
        ),
        (2, 7, 6),
    ),
    (
        "conv1d_stride_pad_dilation_groups",
        lambda: nn.Sequential(
            nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
            nn.Tanh(),
            nn.Conv1d(6, 3, 4, padding="same", bias=False),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        (4, 9),
    ),
]


@pytest.mark.parametrize(("name", "build", "shape"), CONV_CASES, ids=[c[0] for c in CONV_CASES])
@pytest.mark.parametrize("strategy", ["auto", "grads", "patch"])
def test_conv_configs_match_brute_force(
    name: str,
    build: Callable[[], nn.Module],
    shape: tuple[int, ...],
    strategy: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Both contractions (per-example weight gradients, patch Gram) are forced in turn: the flop
    # rule picks one per layer, but each must be exact on every configuration.
    if strategy != "auto":
        original = structured_module._choose_strategy
        monkeypatch.setattr(
            structured_module,
            "_choose_strategy",
            lambda ly, n, width: strategy if original(ly, n, width) != "bias" else "bias",
        )
    x = torch.randn(5, *shape, dtype=DTYPE)
    model = build().to(DTYPE)
    model(x[:1])  # materialise lazy layers
    calls = spy_generic(monkeypatch)
    theta = _structured(model, x)
    assert calls == []
    assert_close(theta, brute_force_ntk(model, x))


class Mixed(nn.Module):
    """CNN + LayerNorm + a custom parameter: structured and generic parts must add up."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.LayerNorm(4 * 5 * 5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(torch.relu(self.conv(x)).flatten(1))
        return self.head(h) * self.scale


def test_cnn_layernorm_custom_parameter_parts_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = Mixed().to(DTYPE), torch.randn(6, 2, 5, 5, dtype=DTYPE)
    calls = spy_generic(monkeypatch)
    theta = empirical_ntk(model, x)
    assert calls == [{"scale"}]  # LayerNorm's affine parameters have a structured rule too
    assert_close(theta, brute_force_ntk(model, x))
    assert_close(theta, empirical_ntk(model, x, method="generic"))


# --------------------------------------------------------------------------- fallbacks and guards


class SharedTwice(nn.Module):
    """One Linear applied twice (weight sharing by repeated calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_linear_called_twice_is_structured(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second call feeds on the first: each call's Δ is its total derivative, the calls stack."""
    model, x = SharedTwice().to(DTYPE), torch.randn(6, 4, dtype=DTYPE)
    calls = spy_generic(monkeypatch)
    theta = empirical_ntk(model, x, method="structured")
    assert calls == []
    assert_close(theta, brute_force_ntk(model, x))


class ConvTwice(nn.Module):
    """One convolution applied twice: convolutions do not stack their calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1))


def test_conv_called_twice_falls_back_and_stays_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = ConvTwice().to(DTYPE), torch.randn(5, 2, 6, dtype=DTYPE)
    calls = spy_generic(monkeypatch)
    theta = empirical_ntk(model, x)
    assert calls == [{"conv.weight", "conv.bias"}]
    assert_close(theta, brute_force_ntk(model, x))


def test_layer_called_unlike_on_each_call_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two calls of one Linear on inputs of different shapes cannot stack."""

    class Unlike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.inner(x).mean(dim=1) + self.inner(x[:, :2]).mean(dim=1))

    model, x = Unlike().to(DTYPE), torch.randn(5, 3, 4, dtype=DTYPE)
    calls = spy_generic(monkeypatch)
    theta = empirical_ntk(model, x)
    assert calls == [{"inner.weight", "inner.bias"}]
    assert_close(theta, brute_force_ntk(model, x))


def test_parameter_tied_across_modules_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    model[2].weight = model[0].weight  # tied: each module is called once, the gradient has two terms
    x = torch.randn(6, 4, dtype=DTYPE)
    calls = spy_generic(monkeypatch)
    theta = empirical_ntk(model, x)
    assert calls == [{"0.weight"}]  # named_parameters lists the tied tensor once
    assert_close(theta, brute_force_ntk(model, x))


class BatchSplit(nn.Module):
    """Same function per example, but the layer is called twice on a batch (not on one example)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] == 1:
            return self.lin(x)
        return torch.cat([self.lin(x[:1]), self.lin(x[1:])])


def test_batch_contradicting_the_probe_falls_back_or_raises() -> None:
    model, x = BatchSplit().to(DTYPE), torch.randn(5, 3, dtype=DTYPE)
    assert_close(empirical_ntk(model, x), brute_force_ntk(model, x))
    with pytest.raises(structured_module.NotStructurable, match="lin"):
        _structured(model, x)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_frozen_weight_or_bias(frozen: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 2)).to(DTYPE)
    getattr(model[0], frozen).requires_grad_(False)
    getattr(model[3], frozen).requires_grad_(False)
    x = torch.randn(5, 2, 6, dtype=DTYPE)
    calls = spy_generic(monkeypatch)
    theta = _structured(model, x)
    assert calls == []
    assert_close(theta, brute_force_ntk(model, x))  # brute force differentiates requires_grad only


def test_param_weights_differ_on_weight_and_bias() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 3)).to(
        DTYPE
    )
    x = torch.randn(6, 2, 4, 4, dtype=DTYPE)
    weights = {"0.weight": 0.25, "0.bias": 3.0, "3.weight": 0.0, "3.bias": 0.5}
    assert_close(_structured(model, x, param_weights=weights), brute_force_ntk(model, x, weights=weights))


# ---------------------------------------------------------------------------------------- memory

# For the net below one float64 example costs ~40 kB (recording plus two copies of its kept
# features): 200 kB gives 3 chunks whose features all fit half the budget (recorded once, cached).
# Where they do not, the planner prices slicing the outputs and leaner features against
# recomputing chunk pairs; the streamed case searches down for a budget at which recomputation
# wins. The test asserts which regime ran, so a change in the estimate cannot silently skip one.
BUDGET_CACHED = 200_000
BUDGET_STREAMED = None


def _recorded_chunk_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every chunk the structured path records (a forward and batched backward)."""
    sizes: list[int] = []
    original = structured_module._chunk_features

    def spy(model: nn.Module, constants: Any, layers: Any, x: Tensor, *args: Any) -> Any:
        sizes.append(x.shape[0])
        return original(model, constants, layers, x, *args)

    monkeypatch.setattr(structured_module, "_chunk_features", spy)
    return sizes


@pytest.mark.parametrize(("budget", "mode"), [(BUDGET_CACHED, "cached"), (BUDGET_STREAMED, "streamed")])
def test_tight_memory_budget_gives_the_same_kernel(
    budget: int | None, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.Flatten(), nn.Linear(16, 3)
    ).to(DTYPE)
    x = torch.randn(13, 2, 6, 6, dtype=DTYPE)
    if budget is None:
        budget = _streamed_budget(model, x)
    sizes = _recorded_chunk_sizes(monkeypatch)
    theta = _structured(model, x, memory_budget=budget)
    assert_close(theta, brute_force_ntk(model, x))
    assert len(sizes) > 1
    if mode == "cached":
        assert sum(sizes) == x.shape[0]  # every chunk recorded once, features kept
    else:
        assert sum(sizes) > x.shape[0]  # two chunks resident, the others recomputed


def _streamed_budget(model: nn.Module, x: Tensor) -> int:
    """The largest budget (steps of 5 kB below 100 kB) at which the plan recomputes chunk pairs."""
    for budget in range(100_000, 5_000, -5_000):
        plan = structured_plan(model, x, budget)
        if plan is not None and not plan.cache:
            return budget
    raise AssertionError("no budget made the structured plan recompute chunk pairs")


def test_budget_below_one_example_goes_generic_or_raises() -> None:
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    x = torch.randn(6, 5, dtype=DTYPE)
    # The generic path slices outputs and examples down to one, so it still fits a 1-byte budget.
    assert_close(empirical_ntk(model, x, memory_budget=1), brute_force_ntk(model, x))
    with pytest.raises(ValueError, match="structured"):
        _structured(model, x, memory_budget=1)


# ----------------------------------------------------------------------------------- method switch


def test_generic_and_auto_agree_and_method_is_checked() -> None:
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(20, 3)).to(
        DTYPE
    )
    x = torch.randn(6, 3, 5, dtype=DTYPE)
    assert_close(empirical_ntk(model, x), empirical_ntk(model, x, method="generic"))
    with pytest.raises(ValueError, match="method"):
        empirical_ntk(model, x, method="fast")


def test_structured_raises_without_structurable_layers() -> None:
    # scale_grad_by_freq changes the gradient torch trains with: no structured rule for it
    model = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(12, 2)).to(
        DTYPE
    )
    model[2].requires_grad_(False)
    tokens = torch.randint(0, 10, (5, 3))
    with pytest.raises(ValueError, match="no trainable"):
        _structured(model, tokens)
    assert_close(empirical_ntk(model, tokens), brute_force_ntk(model, tokens))


# ------------------------------------------------------------------------------------ no trace


def test_no_trace_left_on_the_model() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    ).to(DTYPE)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1.0, 1.0)
        model[1].running_var.fill_(2.0)
    model.train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    x = torch.randn(5, 2, 4, 4, dtype=DTYPE)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()

    first = _structured(model, x)
    second = _structured(model, x)

    assert torch.equal(first, second)
    assert_close(first, brute_force_ntk(model, x))  # brute force: eval mode, running statistics
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state, strict=True))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    assert all(module.training for module in model.modules())
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert all(p.requires_grad for p in model.parameters())


class _TiedHead(nn.Module):
    """A language-model-style head that reuses the embedding matrix (``logits = h Eᵀ``) outside its call."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.embed(tokens).mean(dim=1)))
        return h @ self.embed.weight.T


def test_a_parameter_read_outside_its_module_goes_generic_and_stays_exact() -> None:
    """Hooks see only the module's own call: a tied head's read of ``embed.weight`` must not be lost."""
    model, tokens = _TiedHead().to(DTYPE), torch.randint(0, 10, (6, 3))
    assert_close(empirical_ntk(model, tokens), brute_force_ntk(model, tokens))
