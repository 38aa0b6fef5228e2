"""Measuring a model leaves no trace: train/eval flags, RNG streams and state copies."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from lin_probe._model_state import (
    cpu_state_copy,
    eval_semantics,
    model_buffers,
    preserved_rng_state,
    trainable_parameters,
)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 1))


def _seed(value: int = 3) -> None:
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def _same_draws(a: tuple[float, float, torch.Tensor], b: tuple[float, float, torch.Tensor]) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


# ------------------------------------------------------------------------------------------ eval_semantics


def test_eval_semantics_evaluates_every_submodule_then_restores_each_flag() -> None:
    net = _net().train()
    net[1].eval()  # a user's frozen BatchNorm inside a training model
    before = {name: m.training for name, m in net.named_modules()}
    assert before["1"] is False and before["0"] is True

    with eval_semantics(net) as inside:
        assert inside is net
        assert not any(m.training for m in net.modules())
    assert {name: m.training for name, m in net.named_modules()} == before


def test_eval_semantics_restores_flags_after_an_exception() -> None:
    net = _net().train()
    net[2].eval()
    before = [m.training for m in net.modules()]
    with pytest.raises(RuntimeError, match="boom"), eval_semantics(net):
        raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == before


def test_eval_semantics_uses_running_statistics_and_no_dropout() -> None:
    net = _net().train()
    x = torch.randn(8, 3)
    with torch.no_grad():
        net(x)  # move the running statistics away from their initial values
        manual = net[3](_bn_eval(net[1], net[0](x)))  # dropout is the identity in eval mode
        with eval_semantics(net):
            out = net(x)
        train_out = net(x)
    assert torch.allclose(out, manual, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(train_out, manual, rtol=1e-2, atol=1e-2)  # train mode is another function


def _bn_eval(bn: nn.BatchNorm1d, h: torch.Tensor) -> torch.Tensor:
    """BatchNorm with running statistics, written out."""
    assert bn.running_mean is not None and bn.running_var is not None
    return (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def test_eval_semantics_leaves_the_rng_streams_unmoved() -> None:
    net = _net()
    _seed()
    expected = _draws()
    _seed()
    with eval_semantics(net):
        _draws()
    assert _same_draws(_draws(), expected)


# ------------------------------------------------------------------------------------------ preserved_rng_state


def test_preserved_rng_state_restores_python_numpy_and_torch() -> None:
    _seed()
    expected = _draws()

    _seed()
    with preserved_rng_state():
        inside = _draws()
        _draws()
    assert _same_draws(inside, expected)  # the draws inside start from the outer state
    assert _same_draws(_draws(), expected)  # and after the block the outer state is back

    _seed()
    _draws()  # without the guard the same draws do move the streams
    assert not _same_draws(_draws(), expected)


def test_preserved_rng_state_restores_after_an_exception() -> None:
    _seed()
    expected = _draws()
    _seed()
    with pytest.raises(KeyError), preserved_rng_state():
        _draws()
        raise KeyError("x")
    assert _same_draws(_draws(), expected)


def test_preserved_rng_state_undoes_reseeding_inside() -> None:
    _seed(1)
    expected = _draws()
    _seed(1)
    with preserved_rng_state():
        _seed(99)
    assert _same_draws(_draws(), expected)


# ------------------------------------------------------------------------------------------ parameters and state


def test_trainable_parameters_are_the_requires_grad_ones_detached() -> None:
    net = _net()
    net[0].weight.requires_grad_(False)
    params = trainable_parameters(net)
    expected = [name for name, p in net.named_parameters() if p.requires_grad]
    assert list(params) == expected and "0.weight" not in params and "0.bias" in params
    for name, tensor in params.items():
        live = dict(net.named_parameters())[name]
        assert torch.equal(tensor, live) and not tensor.requires_grad


def test_trainable_parameters_of_a_frozen_model_is_an_error() -> None:
    net = _net().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        trainable_parameters(net)


def test_model_buffers_are_all_buffers_detached() -> None:
    net = _net()
    buffers = model_buffers(net)
    assert set(buffers) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    for name, buf in net.named_buffers():
        assert torch.equal(buffers[name], buf)


def test_cpu_state_copy_detaches_and_clones() -> None:
    weight = torch.randn(3, 2, requires_grad=True)
    derived = weight * 2  # carries a grad_fn
    nested = {"lr": [0.1, 0.2]}
    state = {"weight": weight, "derived": derived, "step": 4, "nested": nested, "name": "B"}
    copy = cpu_state_copy(state)

    assert set(copy) == set(state)
    for key in ("weight", "derived"):
        assert torch.equal(copy[key], state[key].detach())
        assert not copy[key].requires_grad and copy[key].grad_fn is None
        assert copy[key].device.type == "cpu"
        assert copy[key].data_ptr() != state[key].data_ptr()
    assert copy["step"] == 4 and copy["name"] == "B" and copy["nested"] == nested

    with torch.no_grad():
        weight.add_(1.0)
    nested["lr"].append(0.3)
    assert not torch.equal(copy["weight"], weight.detach())  # a clone, not a view
    assert copy["nested"] == {"lr": [0.1, 0.2]}  # a deep copy
