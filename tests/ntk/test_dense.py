"""Tests for ``lin_probe.ntk.dense``: the dense kernel and the predictions, against an independent brute force.

The references (``_ntk_reference``: one ``torch.autograd.grad`` per example and output on an
eval-mode deep copy) share nothing with the code under test; the tolerance is explained there.
"""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from _ntk_reference import DTYPE, assert_close, brute_force_ntk, mlp
from torch import Tensor, nn

import lin_probe.ntk.dense as dense_module
from lin_probe.ntk import METHODS, NTKMethod, empirical_ntk, predict
from lin_probe.plan import DEFAULT_MEMORY_BUDGET_BYTES


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
    b, k = dense_module._plan_dense(n, width, r, a, budget, None)
    assert b * k * (2 * r + a) <= budget
    assert (b, k) != (n, width)


def _count_jacobian_blocks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of examples in every Jacobian block the dense path computes."""
    sizes: list[int] = []
    original = dense_module._jacobian_block

    def counting(forward: object, params: object, rows: Tensor, outputs: slice) -> dict[str, Tensor]:
        sizes.append(rows.shape[0])
        return original(forward, params, rows, outputs)  # type: ignore[arg-type]

    monkeypatch.setattr(dense_module, "_jacobian_block", counting)
    return sizes


def test_memory_budget_argument_sets_the_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``None`` is the plan's 1 GiB default (one block for a small probe); 1 byte forces one example per block."""
    model, x = mlp(), torch.randn(5, 5, dtype=DTYPE)
    sizes = _count_jacobian_blocks(monkeypatch)
    default = empirical_ntk(model, x, method="generic")
    assert sizes == [5]
    sizes.clear()
    assert torch.equal(
        empirical_ntk(model, x, method="generic", memory_budget=DEFAULT_MEMORY_BUDGET_BYTES), default
    )
    assert sizes == [5]
    sizes.clear()
    tight = empirical_ntk(model, x, method="generic", memory_budget=1)
    # 5 one-example chunks × 3 one-output slices, each slice visiting 5·4/2 + 1 = 11 blocks
    assert sizes == [1] * 33
    assert_close(tight, brute_force_ntk(model, x))
    assert_close(default, brute_force_ntk(model, x))


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


def test_predict_memory_budget_sets_the_chunks() -> None:
    """A 1-byte budget runs one example per forward; the default runs the probe at once. Same outputs."""
    model, x = mlp(), torch.randn(6, 5, dtype=DTYPE)
    batches: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    try:
        tight = predict(model, x, memory_budget=1)
        tight_batches, batches[:] = list(batches), []
        roomy = predict(model, x)
    finally:
        handle.remove()
    # each call first measures one example, then runs its chunks
    assert tight_batches == [1] + [1] * 6
    assert batches == [1, 6]
    with torch.no_grad():
        expected = model(x)
    assert_close(tight, expected)
    assert_close(roomy, expected)


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
        predict(mlp(), x)


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


def test_method_enum_and_strings_are_the_same_choice() -> None:
    """``NTKMethod`` members and their strings select the same path; anything else is refused."""
    assert METHODS == ("auto", "generic", "structured")
    model, x = mlp(), torch.randn(5, 5, dtype=DTYPE)
    reference = brute_force_ntk(model, x)
    for member in NTKMethod:
        by_member = empirical_ntk(model, x, method=member)
        assert torch.equal(by_member, empirical_ntk(model, x, method=member.value))
        assert_close(by_member, reference)
    with pytest.raises(ValueError, match=r"`method` must be one of \('auto', 'generic', 'structured'\)"):
        empirical_ntk(model, x, method="fast")
