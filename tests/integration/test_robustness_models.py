"""Odd models, precisions and bad input: the monitor measures correctly or says clearly what to do.

References are plain-PyTorch: :func:`_robustness_helpers.replay` for logged distances, direct
forward passes for losses, per-example autograd Jacobians for Θ_0. Tolerance notes sit with each
assertion.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _lightning_setups import (
    Regressor,
    TwoLayerNet,
    loaders,
    make_trainer,
    read_events,
    scalar_series,
    sphere_data,
)
from _robustness_helpers import (
    BatchNormDropoutNet,
    DictOutputNet,
    OutputKeyRegressor,
    TokenNet,
    cycle_batches,
    params_and_buffers,
    replay,
)
from torch import Tensor, nn

from lin_probe.lightning.callback import LinearRegimeMonitor

D, N_TRAIN, N_VAL, BATCH, LR = 16, 64, 32, 16, 0.5
X, Y = sphere_data(N_TRAIN + N_VAL, D)
VOCAB, LENGTH = 12, 6


def _tokens() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (N_TRAIN + N_VAL, LENGTH), generator=gen)
    target = torch.sin(tokens.float().mean(dim=1, keepdim=True))
    return tokens, target


def _one_hot_bag(tokens: Tensor) -> Tensor:
    """Token ids → bag-of-words frequencies, the vectors the data kernel sees."""
    return F.one_hot(tokens, VOCAB).float().mean(dim=1)


def _fit(
    tmp_path: Path,
    module: pl.LightningModule,
    monitor: LinearRegimeMonitor | None,
    *,
    x: Tensor = X,
    y: Tensor = Y,
    name: str = "run",
    **trainer_kwargs: Any,
) -> pl.Trainer:
    train, val = loaders(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], BATCH)
    trainer_kwargs.setdefault("max_steps", 8)
    trainer = make_trainer(tmp_path, [] if monitor is None else [monitor], name=name, **trainer_kwargs)
    trainer.fit(module, train, val)
    return trainer


def _assert_matches_replay(
    trainer: pl.Trainer, initial: nn.Module, x: Tensor = X, y: Tensor = Y, **replay_kwargs: Any
) -> None:
    acc = read_events(trainer.logger.log_dir)
    a, b = scalar_series(acc, "lin_probe/fit_a")[0], scalar_series(acc, "lin_probe/fit_b")[0]
    logged = scalar_series(acc, "lin_probe/functional_distance")
    steps = cycle_batches(x[:N_TRAIN], y[:N_TRAIN], BATCH, max(logged))
    ref = replay(initial, a, b, steps, x[N_TRAIN:], lambda p: torch.optim.SGD(p, lr=LR), **replay_kwargs)
    assert max(logged.values()) > 1e-3, "training must move the network away from the shadow"
    for step, value in logged.items():
        # float32 network/shadow vs float64 replay shadow over 8 steps: ~1e-6 relative; 2e-4 is far
        # below what a wrong f_0, a wrong feature map or a wrong output changes (> 1 %).
        assert value == pytest.approx(ref.distance(step), rel=2e-4, abs=1e-6), f"step {step}"


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
    assert monitor.state_dict()["ntk0"].dtype == torch.float64
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
    assert monitor.state_dict()["shadow"]["B"].dtype == torch.float64


# ------------------------------------------------------------------------------------------ models


def test_batchnorm_and_dropout_measured_in_eval_mode(tmp_path: Path) -> None:
    net = BatchNormDropoutNet(D, 32)
    initial = copy.deepcopy(net).eval()
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4)
    _fit(tmp_path, Regressor(net, LR), monitor)
    x_val, y_val = X[N_TRAIN:], Y[N_TRAIN:]
    with torch.no_grad():
        eval_loss = float(F.mse_loss(initial(x_val), y_val))
        train_loss = float(F.mse_loss(copy.deepcopy(initial).train()(x_val), y_val))
    assert abs(eval_loss - train_loss) > 1e-2 * eval_loss, "the two modes must differ for this test"
    # same float32 eval forward on the same inputs: equal up to summation order
    assert monitor.history[0]["loss_network"] == pytest.approx(eval_loss, rel=1e-6)
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


def test_token_inputs_need_features_fn(tmp_path: Path) -> None:
    tokens, target = _tokens()
    with pytest.raises(TypeError, match="features_fn"):
        _fit(
            tmp_path,
            Regressor(TokenNet(VOCAB, LENGTH, 16), LR),
            LinearRegimeMonitor(n_probe=N_VAL),
            x=tokens,
            y=target,
        )
    net = TokenNet(VOCAB, LENGTH, 16)
    initial = copy.deepcopy(net)
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, features_fn=_one_hot_bag)
    trainer = _fit(tmp_path, Regressor(net, LR), monitor, x=tokens, y=target, name="ok")
    _assert_matches_replay(trainer, initial, x=tokens, y=target, features=_one_hot_bag)


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
    assert torch.allclose(monitor.state_dict()["ntk0"], jac @ jac.T, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ user's run unharmed


def _token_case() -> tuple[pl.LightningModule, dict, dict, tuple[Tensor, Tensor]]:
    return Regressor(TokenNet(VOCAB, LENGTH, 16), LR), {}, {"features_fn": _one_hot_bag}, _tokens()


MODEL_CASES: dict[str, Callable[[], tuple[pl.LightningModule, dict, dict, tuple[Tensor, Tensor]]]] = {
    "batchnorm-dropout": lambda: (Regressor(BatchNormDropoutNet(D, 16), LR, momentum=0.9), {}, {}, (X, Y)),
    "bf16-mixed": lambda: (Regressor(TwoLayerNet(D, 16), LR), {"precision": "bf16-mixed"}, {}, (X, Y)),
    "float64": lambda: (Regressor(TwoLayerNet(D, 16).double(), LR), {}, {}, (X.double(), Y.double())),
    "dict-output": lambda: (
        OutputKeyRegressor(DictOutputNet(TwoLayerNet(D, 16)), LR),
        {},
        {"output_fn": lambda out: out["pred"]},
        (X, Y),
    ),
    "tokens": _token_case,
    "compiled": lambda: (torch.compile(Regressor(TwoLayerNet(D, 16), LR), backend="eager"), {}, {}, (X, Y)),
    "nonfinite-network": lambda: (Regressor(TwoLayerNet(D, 8), 500.0), {}, {}, (X, Y)),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_user_parameters_bit_identical_with_and_without_monitor(tmp_path: Path, case: str) -> None:
    def fit(with_monitor: bool) -> list[Tensor]:
        pl.seed_everything(11, verbose=False)
        module, trainer_kwargs, monitor_kwargs, (x, y) = MODEL_CASES[case]()
        monitor = (
            LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2, **monitor_kwargs) if with_monitor else None
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _fit(tmp_path, module, monitor, x=x, y=y, name=f"{case}{with_monitor}", **trainer_kwargs)
        if with_monitor:
            assert len(monitor.history) == 6, "the monitor must have measured at steps 0, 1, 2, 4, 6, 8"
        inner = getattr(module, "_orig_mod", module)
        return params_and_buffers(inner)

    for p, q in zip(fit(False), fit(True), strict=True):
        # bit for bit; NaN == NaN in the diverging case
        assert torch.allclose(p, q, rtol=0.0, atol=0.0, equal_nan=True)
