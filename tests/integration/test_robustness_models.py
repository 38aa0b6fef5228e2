"""Odd models, precisions and bad input: the monitor measures correctly or says clearly what to do.

References are plain-PyTorch: :func:`_robustness_helpers.replay` for logged distances (tolerance
argued in :func:`_robustness_helpers.assert_matches_replay`: a wrong f_0, feature map or output
changes the values by > 1 %), direct forward passes for losses, per-example autograd Jacobians for
Θ_0. Tolerance notes sit with each assertion. These models' parameters being bit-identical with and
without the monitor is ``tests/integration/test_bit_identity.py``.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _lightning_setups import Regressor, TwoLayerNet, sphere_data
from _robustness_helpers import (
    LENGTH,
    VOCAB,
    BatchNormDropoutNet,
    DictOutputNet,
    OutputKeyRegressor,
    TokenNet,
    assert_matches_replay,
    fit,
    one_hot_bag,
    saved,
    token_data,
)
from torch import Tensor, nn

from lin_probe import LinearRegimeMonitor

D, N_TRAIN, N_VAL, BATCH, LR = 16, 64, 32, 16, 0.5
X, Y = sphere_data(N_TRAIN + N_VAL, D)


_fit = functools.partial(fit, x=X, y=Y, n_train=N_TRAIN, batch_size=BATCH, max_steps=8)


def _assert_matches_replay(
    trainer: pl.Trainer, initial: nn.Module, x: Tensor = X, y: Tensor = Y, **replay_kwargs: Any
) -> None:
    assert_matches_replay(
        trainer,
        initial,
        x[:N_TRAIN],
        y[:N_TRAIN],
        x[N_TRAIN:],
        BATCH,
        lambda p: torch.optim.SGD(p, lr=LR),
        **replay_kwargs,
    )


# ------------------------------------------------------------------------------------------ precision


def test_bf16_mixed_measures_in_float32(tmp_path: Path) -> None:
    net = TwoLayerNet(D, 32)
    initial = copy.deepcopy(net)
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4)
    _fit(tmp_path, Regressor(net, LR), monitor, precision="bf16-mixed")
    x_val, y_val = X[N_TRAIN:], Y[N_TRAIN:]
    with torch.no_grad():
        first, last = F.mse_loss(initial(x_val), y_val), F.mse_loss(net(x_val), y_val)
    # float32 forwards differ only by summation order (~1e-7); under bf16 autocast they would be ~1e-3 off
    assert monitor.history[0]["loss_network"] == pytest.approx(float(first), rel=1e-6)
    assert monitor.history[-1]["step"] == 8
    assert monitor.history[-1]["loss_network"] == pytest.approx(float(last), rel=1e-6)
    assert saved(monitor.state_dict(), "ntk0").dtype == torch.float64
    assert all(math.isfinite(v) for record in monitor.history for v in record.values())


def test_float64_model_with_float32_probe(tmp_path: Path) -> None:
    net = TwoLayerNet(D, 32).double()
    x64, y64 = X.double(), Y.double()
    monitor = LinearRegimeMonitor(probe=(X[N_TRAIN:], Y[N_TRAIN:]), every_n_steps=4)  # float32 probe
    _fit(tmp_path, Regressor(net, LR), monitor, x=x64, y=y64)
    with torch.no_grad():
        last = F.mse_loss(net(x64[N_TRAIN:]), y64[N_TRAIN:])
    # measured in float64 (the probe is cast to the model's dtype): agreement to float64 round-off,
    # where a float32 measurement would be ~1e-7 off.
    assert monitor.history[-1]["loss_network"] == pytest.approx(float(last), rel=1e-12)
    assert saved(monitor.state_dict(), "B").dtype == torch.float64


# ------------------------------------------------------------------------------------------ models


def test_batchnorm_on_the_probe_statistics_and_dropout_off(tmp_path: Path) -> None:
    """The measured network is the one training moves: BatchNorm normalises the probe with its own batch
    statistics (as train mode does), dropout is off (lin_probe.monitor.batch_statistics)."""
    net = BatchNormDropoutNet(D, 32)
    initial = copy.deepcopy(net).eval()
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4)
    _fit(tmp_path, Regressor(net, LR), monitor)
    x_val, y_val = X[N_TRAIN:], Y[N_TRAIN:]
    measured = copy.deepcopy(initial)
    for module in measured.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()  # batch statistics of the probe; dropout stays in eval
    with torch.no_grad():
        eval_loss = float(F.mse_loss(initial(x_val), y_val))
        expected = float(F.mse_loss(measured(x_val), y_val))
    assert abs(eval_loss - expected) > 1e-2 * eval_loss, "running and batch statistics must differ here"
    # same float32 forward on the same inputs: equal up to summation order
    assert monitor.history[0]["loss_network"] == pytest.approx(expected, rel=1e-5)
    assert net.training, "the user's module must be back in train mode"


def test_dict_output_needs_output_fn(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="output_fn"):
        _fit(
            tmp_path,
            OutputKeyRegressor(DictOutputNet(TwoLayerNet(D, 32)), LR),
            LinearRegimeMonitor(n_probe=N_VAL),
        )
    net = DictOutputNet(TwoLayerNet(D, 32))
    initial = copy.deepcopy(net)
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, output_fn=lambda out: out["pred"])
    trainer = _fit(tmp_path, OutputKeyRegressor(net, LR), monitor, name="ok")
    _assert_matches_replay(trainer, initial, output=lambda out: out["pred"])


def test_image_shaped_inputs_are_flattened(tmp_path: Path) -> None:
    images = X.reshape(-1, 1, 4, 4)
    net = nn.Sequential(nn.Flatten(), TwoLayerNet(D, 32))
    initial = copy.deepcopy(net)
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4)
    trainer = _fit(tmp_path, Regressor(net, LR), monitor, x=images)
    _assert_matches_replay(trainer, initial, x=images)


def test_token_inputs_get_a_token_data_kernel_or_features_fn(tmp_path: Path) -> None:
    tokens, target = token_data(N_TRAIN + N_VAL)
    default = LinearRegimeMonitor(n_probe=N_VAL)
    _fit(tmp_path, Regressor(TokenNet(VOCAB, LENGTH, 16), LR), default, x=tokens, y=target)
    assert default.core is not None and default.core.data_kernel.name.startswith("token_")
    net = TokenNet(VOCAB, LENGTH, 16)
    initial = copy.deepcopy(net)
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, features_fn=one_hot_bag)
    trainer = _fit(tmp_path, Regressor(net, LR), monitor, x=tokens, y=target, name="ok")
    _assert_matches_replay(trainer, initial, x=tokens, y=target, features=one_hot_bag)


@pytest.mark.parametrize("where", ["submodule", "lightning-module"])
def test_torch_compiled_models(tmp_path: Path, where: str) -> None:
    net = TwoLayerNet(D, 32)
    initial = copy.deepcopy(net)
    if where == "submodule":
        module: Any = Regressor(torch.compile(net, backend="eager"), LR)
    else:
        module = torch.compile(Regressor(net, LR), backend="eager")
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4)
    trainer = _fit(tmp_path, module, monitor)
    # f_0 must stay the network at init (a deep copy of a compiled LightningModule used to call the live one)
    _assert_matches_replay(trainer, initial)


# ------------------------------------------------------------------------------------------ bad input


def test_nan_in_dataloader_probe_is_a_clear_error_at_fit_start(tmp_path: Path) -> None:
    x = X.clone()
    x[N_TRAIN + 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        _fit(tmp_path, Regressor(TwoLayerNet(D, 8), LR), LinearRegimeMonitor(n_probe=N_VAL), x=x)


def test_nan_in_a_training_batch_is_reported_at_the_next_check_and_training_goes_on(tmp_path: Path) -> None:
    """Training batches are not checked for NaN/inf as they arrive (reading a value back would wait
    for an accelerator every step): the poisoned step makes the network and the shadow non-finite,
    the next check says so, and the user's run is the one it would have been without the monitor."""
    x = X.clone()
    x[BATCH + 3, 0] = float("nan")  # a training row of the second batch; the probe (validation) is clean
    runs = {}
    for monitored in (False, True):
        torch.manual_seed(0)
        net = TwoLayerNet(D, 8)
        monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2) if monitored else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit(tmp_path, Regressor(net, LR), monitor, x=x, name=f"nan{monitored}")
        runs[monitored] = (net, [str(w.message) for w in caught])
    for plain, watched in zip(runs[False][0].parameters(), runs[True][0].parameters(), strict=True):
        torch.testing.assert_close(watched, plain, rtol=0, atol=0, equal_nan=True)
    assert any("Non-finite values measured at step 2" in message for message in runs[True][1])
    assert not any("NaN/inf" in message for message in runs[False][1])


def test_probe_of_one_example_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        LinearRegimeMonitor(probe=X[:1])


def test_tiny_memory_budget_chunks_the_ntk(tmp_path: Path) -> None:
    net = TwoLayerNet(D, 32)
    initial = copy.deepcopy(net)
    budget = 4096  # bytes: a few examples' Jacobians per block, so the NTK is built in many chunks
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, memory_budget=budget)
    _fit(tmp_path, Regressor(net, LR), monitor, max_steps=2)
    x_val = X[N_TRAIN:]
    rows = []
    for i in range(N_VAL):  # plain per-example gradients
        grads = torch.autograd.grad(initial(x_val[i : i + 1]).sum(), list(initial.parameters()))
        rows.append(torch.cat([g.flatten() for g in grads]).double())
    jac = torch.stack(rows)
    # float32 Jacobians, float64 Gram: agreement ~1e-6 relative
    assert torch.allclose(saved(monitor.state_dict(), "ntk0"), jac @ jac.T, rtol=1e-5, atol=1e-6)
