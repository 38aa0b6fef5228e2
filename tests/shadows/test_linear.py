"""LinearShadow against independent references: ψ and f_0 written out, the cached-f_0 forward against
the one that runs f_0, freezing of the caller's f_0 copy, and the checkpoint key layout."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from _shadow_helpers import centred_shadow, mlp, psi, roundtrip
from torch import Tensor, nn

from lin_probe.kernel import AffineKernel
from lin_probe.shadows.linear import LinearShadow
from lin_probe.shadows.offsets import UNKNOWN_ID, ExampleOffsets

KERNEL = AffineKernel(a=0.7, b=0.3, c=0.1)


# ---------------------------------------------------------------------------------------------
# forward pass
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("center", [True, False])
def test_forward_is_initial_output_plus_features_times_B(center: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 2, 3, generator=gen, dtype=torch.float64)  # flattened to d = 6
    model = nn.Sequential(nn.Flatten(), mlp(6, 3, seed=1))
    with torch.no_grad():
        f0 = model(x)
    initial = copy.deepcopy(model) if center else None
    shadow = LinearShadow.from_model(model, KERNEL, x, initial_model=initial)
    b_value = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        shadow.B.copy_(b_value)
    expected = (f0 if center else 0.0) + psi(x, KERNEL.a, KERNEL.b) @ b_value
    # float64 throughout: only round-off (~1e-16 relative) separates the two computations.
    torch.testing.assert_close(shadow(x), expected, rtol=1e-12, atol=1e-12)
    # ψψᵀ = a·XXᵀ/d + b·11ᵀ, from the raw inputs.
    flat = x.reshape(12, -1)
    gram = KERNEL.a * flat @ flat.T / 6 + KERNEL.b
    feats = shadow.features(x)
    torch.testing.assert_close(feats @ feats.T, gram, rtol=1e-12, atol=1e-12)
    assert shadow.B.shape == (7, 3) and shadow.B.dtype == torch.float64
    assert shadow.centered is center and shadow.offsets is None


class _CountingNet(nn.Module):
    """A float32 MLP that counts its forward calls (to see whether f_0 was run)."""

    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.net = mlp(d, c, seed=4, dtype=torch.float32)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("center", [True, False])
def test_forward_with_cached_initial_outputs_equals_the_forward_that_runs_f0(center: bool) -> None:
    d, c, n = 5, 3, 9
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=gen)
    model = _CountingNet(d, c)
    initial = copy.deepcopy(model) if center else None
    shadow = LinearShadow.from_model(model, KERNEL, x, initial_model=initial, offsets_capacity=6)
    with torch.no_grad():
        shadow.B.copy_(torch.randn(d + 1, c, generator=gen))
        shadow.offsets.V.copy_(torch.randn(6, c, generator=gen))
        f0 = model.net(x)  # the network at init, computed apart from the shadow
    ids = torch.tensor([0, 5, UNKNOWN_ID, 2, 10**6, 1, 3, UNKNOWN_ID, 4])
    for row_ids in (None, ids):
        with torch.no_grad():
            ran = shadow(x, row_ids)
            calls = initial.calls if center else None
            cached = shadow(x, row_ids, initial_outputs=f0)
        if center:
            assert initial.calls == calls  # the cache replaced the f_0 forward
        assert torch.equal(cached, ran)  # same f_0 values, same float32 arithmetic: bit-identical
        assert cached.dtype == torch.float32
    # The float64 sum the monitor measures: every term cast to float64 before it is added, the
    # offsets on training rows only. The reference is written out from ψ, B, V and f_0 (tolerance:
    # float32 rounding of ψ and of ψB, outputs O(1): ~1e-6).
    with torch.no_grad():
        measured = shadow(x, ids, initial_outputs=f0, dtype=torch.float64)
        known = (ids >= 0) & (ids < 6)
        offsets = torch.zeros(n, c, dtype=torch.float64)
        offsets[known] = math.sqrt(KERNEL.c) * shadow.offsets.V[ids[known]].double()
        linear = psi(x, KERNEL.a, KERNEL.b) @ shadow.B.double()
        reference = linear + (f0.double() if center else 0.0) + offsets
    assert measured.dtype == torch.float64
    torch.testing.assert_close(measured, reference, rtol=0, atol=1e-5)
    # ... bit for bit the float64 sum of the float32 terms, not their float32 sum cast afterwards.
    with torch.no_grad():
        terms = [shadow.features(x) @ shadow.B, f0, shadow.offsets(ids, n, c=KERNEL.c)]
    if not center:
        terms.pop(1)
    assert torch.equal(measured, _sum64(terms))
    assert not torch.equal(measured, cached.double())


def _sum64(terms: list[Tensor]) -> Tensor:
    """Left-to-right float64 sum of float32 terms."""
    total = terms[0].double()
    for term in terms[1:]:
        total = total + term.double()
    return total


def test_forward_refuses_bad_cached_outputs_and_ids_without_offsets() -> None:
    x = torch.randn(4, 3, dtype=torch.float64)
    model = mlp(3, 2, seed=0)
    shadow = centred_shadow(model, KERNEL, x)
    with pytest.raises(ValueError, match="initial_outputs"):
        shadow(x, initial_outputs=torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="no example offsets"):
        shadow(x, torch.arange(4))


def test_shadow_dtype_follows_model_and_B_starts_at_zero() -> None:
    x = torch.randn(5, 4)
    shadow32 = LinearShadow.from_model(mlp(4, 2, seed=0, dtype=torch.float32), KERNEL, x)
    shadow64 = LinearShadow.from_model(mlp(4, 2, seed=0), KERNEL, x.double(), offsets_capacity=3)
    assert shadow32.B.dtype == torch.float32 and shadow64.B.dtype == torch.float64
    assert shadow64.offsets.V.dtype == torch.float64 and shadow64.offsets.V.shape == (3, 2)
    assert torch.count_nonzero(shadow32.B) == 0 and shadow32.B.shape == (5, 2)
    assert torch.count_nonzero(shadow64.offsets.V) == 0


def test_trained_parameters_are_B_or_B_and_V() -> None:
    x = torch.randn(5, 4, dtype=torch.float64)
    paper = centred_shadow(mlp(4, 2, seed=0), KERNEL, x)
    memo = centred_shadow(mlp(4, 2, seed=0), KERNEL, x, offsets_capacity=0)
    assert [id(p) for p in paper.trained_parameters()] == [id(paper.B)]
    assert [id(p) for p in memo.trained_parameters()] == [id(memo.B), id(memo.offsets.V)]
    # f_0's parameters are never trained (frozen), whatever the shadow.
    trained = {id(p) for p in memo.parameters() if p.requires_grad}
    assert trained == {id(memo.B), id(memo.offsets.V)}


def test_initial_model_is_frozen_and_refused_when_it_is_the_live_model() -> None:
    x = torch.randn(8, 4, dtype=torch.float64)
    model = mlp(4, 2, seed=3)
    with torch.no_grad():
        f0 = model(x).clone()
    initial = copy.deepcopy(model).train()
    for p in initial.parameters():
        p.grad = torch.ones_like(p)
    shadow = LinearShadow.from_model(model, KERNEL, x, initial_model=initial)
    assert shadow.initial_model is initial
    assert all(not p.requires_grad and p.grad is None for p in initial.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the user's model is untouched
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training the user's model must not move f_0
    shadow.train()
    assert not shadow.initial_model.training
    assert torch.equal(shadow.initial_output(x), f0)
    assert not torch.allclose(model(x), f0)  # the edit did change the original
    with pytest.raises(ValueError, match="copy"):
        LinearShadow.from_model(model, KERNEL, x, initial_model=model)


class _NoisyInEval(nn.Module):
    """Draws from the global RNG in every forward, even in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) + 0.0 * torch.rand(x.shape[0], 2)


def test_running_f0_leaves_global_rng_untouched() -> None:
    x = torch.randn(4, 3)
    shadow = centred_shadow(_NoisyInEval(), KERNEL, x)
    before = torch.get_rng_state()
    shadow(x)
    assert torch.equal(torch.get_rng_state(), before)


class _WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(torch.tanh(self.body(x))))


def test_from_model_leaves_flags_and_every_rng_untouched() -> None:
    torch.manual_seed(0)
    module = _WithDropout()
    x = torch.randn(5, 4)
    module.train()
    module.head.eval()  # a per-submodule flag that must survive
    flags = [m.training for m in module.modules()]
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

    shadow = centred_shadow(module, KERNEL, x)

    assert [m.training for m in module.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    assert shadow.out_features == 2 and shadow.in_features == 4
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(shadow.initial_output(x), module(x), rtol=0, atol=0)


def test_inputs_with_wrong_width_are_refused() -> None:
    shadow = centred_shadow(mlp(4, 2, seed=0), KERNEL, torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="4"):
        shadow.features(torch.randn(3, 5))


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="in_features"):
        LinearShadow(KERNEL, in_features=0, out_features=2)
    with pytest.raises(TypeError, match="output_fn"):
        LinearShadow(KERNEL, in_features=3, out_features=2, output_fn=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outputs per example"):
        LinearShadow(KERNEL, in_features=3, out_features=2, offsets=ExampleOffsets(3))
    with pytest.raises(ValueError, match="offsets_capacity"):
        LinearShadow.from_model(mlp(3, 2, seed=0), KERNEL, torch.randn(2, 3), offsets_capacity=-1)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def test_state_dict_keys_and_round_trip_restore_B_V_and_the_kernel() -> None:
    x = torch.randn(6, 3, dtype=torch.float64)
    model = mlp(3, 2, seed=5)
    kernel = AffineKernel(a=0.6, b=0.2, c=0.25)
    saved = centred_shadow(model, kernel, x, offsets_capacity=4)
    with torch.no_grad():
        saved.B.copy_(torch.randn(4, 2, dtype=torch.float64))
        saved.offsets.V.copy_(torch.randn(4, 2, dtype=torch.float64))
    state = roundtrip(saved.state_dict())
    f0_keys = {f"initial_model.{k}" for k in model.state_dict()}
    assert set(state) == {"B", "offsets.V", "_extra_state"} | f0_keys
    paper = LinearShadow.from_model(model, kernel, x)
    assert set(paper.state_dict()) == {"B", "_extra_state"}  # uncentred, no offsets

    # Restored into a shadow with another kernel, another f_0 and a smaller table: all come back.
    other = mlp(3, 2, seed=6)
    restored = centred_shadow(other, AffineKernel(a=1.0, b=1.0, c=0.0), x, offsets_capacity=1)
    restored.load_state_dict(state)
    assert restored.kernel == kernel and restored.offsets.rows == 4
    ids = torch.tensor([3, 0, UNKNOWN_ID, 1, 2, 2])
    with torch.no_grad():
        assert torch.equal(restored(x, ids), saved(x, ids))
