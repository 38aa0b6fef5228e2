"""Tests for ``lin_probe.ntk``: every kernel is checked against an independent brute force.

The brute force takes one ``torch.autograd.grad`` per example and output over the ``requires_grad``
parameters of an eval-mode deep copy and forms ``(1/C) Σ_c Σ_p w_p g_{i,c,p}·g_{j,c,p}`` — no
``torch.func``, no chunking, nothing shared with the code under test.

Tolerance: float64 throughout unless a test is about dtypes. The two computations differ only in
summation order over at most a few thousand terms, so their relative difference is
``O(P · eps) ≈ 1e-13``; ``RTOL = 1e-9`` leaves four orders of margin, while every bug these
tests target (a parameter too many or missing, cross-output terms, a wrong ``1/C``, train-mode
statistics, a weight applied twice) changes entries by ``O(1)`` relative amounts.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Mapping

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import lin_probe.ntk.dense as ntk_module
from lin_probe.ntk.dense import empirical_ntk, ntk_matvec, predict

RTOL = 1e-9
DTYPE = torch.float64


# ------------------------------------------------------------------------------------ references


def brute_force_ntk(
    model: nn.Module,
    inputs: Tensor,
    *,
    weights: Mapping[str, float] | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
) -> Tensor:
    """``(1/C) Σ_c Σ_p w_p g_{i,c,p}·g_{j,c,p}`` from per-example, per-output autograd gradients."""
    reference = copy.deepcopy(model).eval()
    named = [(name, p) for name, p in reference.named_parameters() if p.requires_grad]
    weights = weights or {}
    rows = []
    for i in range(inputs.shape[0]):
        raw = reference(inputs[i : i + 1])
        out = (output_fn(raw) if output_fn else raw).reshape(-1)
        per_output = []
        for c in range(out.shape[0]):
            grads = torch.autograd.grad(out[c], [p for _, p in named], retain_graph=True, allow_unused=True)
            flat = [
                math.sqrt(weights.get(name, 1.0)) * (torch.zeros_like(p) if g is None else g).reshape(-1)
                for (name, p), g in zip(named, grads, strict=True)
            ]
            per_output.append(torch.cat(flat))
        rows.append(torch.stack(per_output))
    jac = torch.stack(rows)  # (n, C, P)
    return torch.einsum("icp,jcp->ij", jac, jac) / jac.shape[1]


def assert_close(actual: Tensor, expected: Tensor, rtol: float = RTOL) -> None:
    """Entrywise match relative to the kernel's scale (diagonal entries are O(scale))."""
    scale = expected.abs().max().item()
    assert actual.shape == expected.shape
    err = (actual.detach() - expected.detach()).abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3e} exceeds {rtol:.0e} × scale {scale:.3e}"


def mlp(d_in: int = 5, hidden: int = 7, c: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, c)).to(DTYPE)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


# ---------------------------------------------------------------------------- kernels vs brute force


def test_mlp_with_biases_and_several_outputs() -> None:
    model, x = mlp(), torch.randn(6, 5, dtype=DTYPE)
    theta = empirical_ntk(model, x)
    assert theta.dtype == DTYPE
    assert_close(theta, brute_force_ntk(model, x))
    assert torch.equal(theta, theta.T)


def test_small_cnn() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)
    ).to(DTYPE)
    x = torch.randn(5, 2, 6, 6, dtype=DTYPE)
    assert_close(empirical_ntk(model, x), brute_force_ntk(model, x))


def test_layernorm_gelu_net() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 2)).to(DTYPE)
    x = torch.randn(5, 6, dtype=DTYPE)
    assert_close(empirical_ntk(model, x), brute_force_ntk(model, x))


def test_frozen_parameter_is_excluded() -> None:
    model, x = mlp(), torch.randn(6, 5, dtype=DTYPE)
    model[0].weight.requires_grad_(False)
    theta = empirical_ntk(model, x)
    assert_close(theta, brute_force_ntk(model, x))  # brute force differentiates requires_grad only
    assert not model[0].weight.requires_grad
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "0.weight")


def test_embedding_model_accepts_integer_inputs() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(3 * 4, 2)).to(DTYPE)
    tokens = torch.randint(0, 10, (5, 3))
    assert_close(empirical_ntk(model, tokens), brute_force_ntk(model, tokens))


class TwoLayer(nn.Module):
    """The paper's net ``f(x) = m^{-1/2} Σ_r v_r φ(w_rᵀx / √d)``."""

    def __init__(self, d: int, m: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(m, d, dtype=DTYPE))
        self.v = nn.Parameter(torch.randn(m, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        pre = x @ self.w.T / math.sqrt(x.shape[1])
        return (torch.tanh(pre) @ self.v / math.sqrt(self.v.shape[0])).unsqueeze(1)


def test_paper_two_layer_net_matches_closed_form() -> None:
    # Exact finite-width NTK, written out by hand (independent of autograd):
    # Θ(x, x') = (1/m) Σ_r [φ(z_r) φ(z'_r) + v_r² φ'(z_r) φ'(z'_r) xᵀx'/d],  z_r = w_rᵀx/√d.
    d, m = 4, 16
    model, x = TwoLayer(d, m), torch.randn(7, d, dtype=DTYPE)
    with torch.no_grad():
        z = x @ model.w.T / math.sqrt(d)
        phi, dphi = torch.tanh(z), 1 - torch.tanh(z) ** 2
        expected = (phi @ phi.T + (dphi * model.v**2) @ dphi.T * (x @ x.T / d)) / m
    assert_close(empirical_ntk(model, x), expected)


def test_batchnorm_in_train_mode_uses_running_stats_and_leaves_them() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).to(DTYPE)
    with torch.no_grad():  # running stats far from any batch's own statistics
        model[1].running_mean.copy_(torch.linspace(-1.0, 1.0, 6))
        model[1].running_var.fill_(3.0)
        model[1].num_batches_tracked.fill_(7)
    model.train()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    x = torch.randn(6, 4, dtype=DTYPE)
    theta = empirical_ntk(model, x)
    assert_close(theta, brute_force_ntk(model, x))  # brute force runs in eval mode
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert all(module.training for module in model.modules())


def test_dropout_model_is_deterministic_and_leaves_state_alone() -> None:
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).to(DTYPE)
    model.train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(6, 5, dtype=DTYPE)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()

    first = empirical_ntk(model, x)
    second = empirical_ntk(model, x)

    assert torch.equal(first, second)
    assert_close(first, brute_force_ntk(model, x))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state, strict=True))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert all(module.training for module in model.modules())


# ------------------------------------------------------------------------------- param_weights


def test_param_weights_match_weighted_brute_force() -> None:
    model, x = mlp(), torch.randn(6, 5, dtype=DTYPE)
    weights = {"0.weight": 0.25, "0.bias": 3.0, "2.weight": 0.0}  # "2.bias" missing -> 1.0
    assert_close(empirical_ntk(model, x, param_weights=weights), brute_force_ntk(model, x, weights=weights))


def test_param_weights_reject_unknown_name_and_bad_values() -> None:
    model, x = mlp(), torch.randn(3, 5, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"unknown parameter.*not_a_param"):
        empirical_ntk(model, x, param_weights={"not_a_param": 1.0})
    with pytest.raises(ValueError, match="≥ 0"):
        empirical_ntk(model, x, param_weights={"0.weight": -1.0})
    with pytest.raises(ValueError, match="weight 0"):
        empirical_ntk(model, x, param_weights=dict.fromkeys(dict(model.named_parameters()), 0.0))


# --------------------------------------------------------------------------------------- chunking


@pytest.mark.parametrize(
    ("chunk_size", "memory_budget"),
    [(1, None), (2, None), (4, None), (None, 1), (None, 4_000), (3, 1)],
)
def test_chunked_kernel_equals_brute_force(chunk_size: int | None, memory_budget: int | None) -> None:
    # memory_budget=1 forces one example and one output per block (output slicing as well);
    # 4_000 bytes gives a few examples per block with all outputs; n=7 leaves ragged last chunks.
    model, x = mlp(), torch.randn(7, 5, dtype=DTYPE)
    theta = empirical_ntk(model, x, chunk_size=chunk_size, memory_budget=memory_budget)
    assert_close(theta, brute_force_ntk(model, x))


def test_chunk_plan_respects_budget() -> None:
    # 2 blocks of b examples × k outputs × r bytes, plus activations, must fit the budget.
    n, width, r, a, budget = 100, 10, 1_000, 200, 50_000
    b, k = ntk_module._plan_dense(n, width, r, a, budget, None)
    assert b * k * (2 * r + a) <= budget
    assert (b, k) != (n, width)


def test_default_budget_knob_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = mlp(), torch.randn(5, 5, dtype=DTYPE)
    calls: list[int] = []
    original = ntk_module._jacobian_block

    def counting(*args: object, **kwargs: object) -> dict[str, Tensor]:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ntk_module, "_jacobian_block", counting)
    monkeypatch.setattr(ntk_module, "DEFAULT_MEMORY_BUDGET_BYTES", 1)
    theta = empirical_ntk(model, x)
    assert len(calls) > 1  # a 1-byte default forces chunking
    assert_close(theta, brute_force_ntk(model, x))


# ------------------------------------------------------------------------------ matrix-free product


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_ntk_matvec_matches_brute_force(chunk_size: int | None) -> None:
    model, x = mlp(c=4), torch.randn(7, 5, dtype=DTYPE)
    weights = {"2.weight": 0.5}
    reference = brute_force_ntk(model, x, weights=weights)
    matvec = ntk_matvec(model, x, param_weights=weights, chunk_size=chunk_size)
    for _ in range(3):
        u = torch.randn(7, dtype=DTYPE)
        assert_close(matvec(u), reference @ u)


def test_ntk_matvec_with_output_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 1-byte budget forces one output per vjp/jvp slice and one example per chunk.
    monkeypatch.setattr(ntk_module, "DEFAULT_MEMORY_BUDGET_BYTES", 1)
    model, x = mlp(c=3), torch.randn(5, 5, dtype=DTYPE)
    u = torch.randn(5, dtype=DTYPE)
    assert_close(ntk_matvec(model, x)(u), brute_force_ntk(model, x) @ u)


def test_ntk_matvec_rejects_wrong_shape() -> None:
    matvec = ntk_matvec(mlp(), torch.randn(4, 5, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        matvec(torch.randn(3, dtype=DTYPE))


# ---------------------------------------------------------------------------------------- predict


def test_predict_is_eval_mode_output_and_keeps_train_flags() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.Linear(6, 3)).to(DTYPE)
    with torch.no_grad():
        model[1].running_mean.fill_(0.4)
    model.train()
    x = torch.randn(7, 4, dtype=DTYPE)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x)
    out = predict(model, x, chunk_size=3)
    assert not out.requires_grad
    assert_close(out, expected)
    assert all(module.training for module in model.modules())


def test_predict_works_for_frozen_models() -> None:
    model = mlp().requires_grad_(False)
    x = torch.randn(4, 5, dtype=DTYPE)
    assert_close(predict(model, x), model(x))


# ------------------------------------------------------------------------------------- bad input


class TupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.body(x), x.sum(dim=1)


def test_tuple_output_needs_output_fn() -> None:
    model, x = TupleOutput(), torch.randn(4, 5, dtype=DTYPE)
    with pytest.raises(TypeError, match="output_fn"):
        empirical_ntk(model, x)
    with pytest.raises(TypeError, match="output_fn"):
        predict(model, x)

    def pick(out: object) -> Tensor:
        return out[0]  # type: ignore[index]

    assert_close(empirical_ntk(model, x, output_fn=pick), brute_force_ntk(model, x, output_fn=pick))
    assert_close(predict(model, x, output_fn=pick), model.body(x))


def test_nan_inputs_raise() -> None:
    x = torch.randn(4, 5, dtype=DTYPE)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        empirical_ntk(mlp(), x)
    with pytest.raises(ValueError, match="NaN"):
        ntk_matvec(mlp(), x)


def test_no_trainable_parameters_raise() -> None:
    with pytest.raises(ValueError, match="no trainable parameters"):
        empirical_ntk(mlp().requires_grad_(False), torch.randn(3, 5, dtype=DTYPE))


def test_non_tensor_inputs_and_bad_chunk_size_raise() -> None:
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        empirical_ntk(mlp(), [[0.0] * 5])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        empirical_ntk(mlp(), torch.randn(3, 5, dtype=DTYPE), chunk_size=0)


def test_float32_model_gives_float32_kernel() -> None:
    model = mlp().float()
    x = torch.randn(5, 5)
    theta = empirical_ntk(model, x)
    assert theta.dtype == torch.float32
    # float32 rounding over ~60 parameters: relative error ~1e-6; 1e-4 is a loose but meaningful bound.
    assert_close(theta.double(), brute_force_ntk(model.double(), x.double()), rtol=1e-4)
