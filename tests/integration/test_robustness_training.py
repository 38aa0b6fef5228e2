"""Optimizers, schedulers, training loops and resume: real Trainer fits vs plain-PyTorch replays.

Each logged ``functional_distance`` is compared with :func:`_robustness_helpers.replay`, which
trains the network and ``f_0 + ψB`` with torch optimizers on the same batches (no lin_probe
code); the tolerance is argued in :func:`_robustness_helpers.assert_matches_replay` (a wrong
hyperparameter, a missed scheduler step or a lost optimizer state changes the values by ≥ 1 %,
checked by breaking each). The user's run being bit-identical with and without the monitor is
``tests/integration/test_bit_identity.py``.
"""

from __future__ import annotations

import copy
import functools
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _lightning_setups import (
    Dashboard,
    Regressor,
    TwoLayerNet,
    loaders,
    make_trainer,
    read_events,
    sphere_data,
)
from _robustness_helpers import OptRegressor, assert_matches_replay, fit, saved
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lin_probe import LinearRegimeMonitor

D, N_TRAIN, N_VAL, BATCH = 16, 64, 32, 16
X, Y = sphere_data(N_TRAIN + N_VAL, D)
X_TRAIN, Y_TRAIN, X_VAL, Y_VAL = X[:N_TRAIN], Y[:N_TRAIN], X[N_TRAIN:], Y[N_TRAIN:]
MakeOpt = Callable[[Any], torch.optim.Optimizer]


_fit = functools.partial(fit, x=X, y=Y, n_train=N_TRAIN, batch_size=BATCH, max_steps=12)


def _assert_matches_replay(
    trainer: pl.Trainer, initial: nn.Module, make_opt: MakeOpt, **replay_kwargs: Any
) -> None:
    assert_matches_replay(trainer, initial, X_TRAIN, Y_TRAIN, X_VAL, BATCH, make_opt, **replay_kwargs)


# ------------------------------------------------------------------------------------------ optimizers


#: Lightning's and the fit's own advice, not about mirroring.
UNRELATED_WARNINGS = re.compile("poor proxy|num_workers|log_every_n_steps")


@pytest.mark.parametrize(
    ("make_opt", "exact"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, dampening=0.5), True),
        (lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.8, nesterov=True), True),
        (lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.5, weight_decay=0.05), True),
        (lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), eps=1e-6), False),
        (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), False),
        (lambda p: torch.optim.RMSprop(p, lr=0.005, alpha=0.9, momentum=0.5), False),
    ],
    ids=["momentum-dampening", "nesterov", "weight-decay", "adam", "adamw", "rmsprop"],
)
def test_optimizer_is_mirrored_with_same_class(tmp_path: Path, make_opt: MakeOpt, exact: bool) -> None:
    """SGD variants are mirrored exactly and silently; other optimizers the same way with one warning."""
    net = TwoLayerNet(D, 32)
    initial = copy.deepcopy(net)
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, max_overhead=None)  # about the mirror
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = _fit(tmp_path, OptRegressor(net, make_opt), monitor, max_steps=12)
    user_warnings = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    if exact:  # no "indicative mirror" warning, nor any other of lin_probe's
        assert [m for m in user_warnings if not UNRELATED_WARNINGS.search(m)] == []
    else:
        assert sum("mirroring" in m for m in user_warnings) == 1
    _assert_matches_replay(trainer, initial, make_opt)


def test_param_group_learning_rates_weight_the_ntk(tmp_path: Path) -> None:
    """One small SGD step: Δf(probe) ≈ −η_ref·Θ_w·∂L/∂f with Θ_w weighted by lr_group/lr_ref.

    Probe = the full training batch, one output, so Θ's cross-kernel is Θ itself and the first-
    order prediction is exact up to O(η²). The unweighted kernel is 10× off on the first layer.
    """
    lr_ref, ratio = 1e-3, 10.0
    net = TwoLayerNet(D, 64)
    initial = copy.deepcopy(net)

    def make_opt(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD([{"params": [net.v]}, {"params": [net.w], "lr": lr_ref * ratio}], lr=lr_ref)

    monitor = LinearRegimeMonitor(probe=(X_TRAIN, Y_TRAIN), every_n_steps=1)
    train, _ = loaders(X_TRAIN, Y_TRAIN, X_VAL, Y_VAL, N_TRAIN)
    make_trainer(tmp_path, [monitor], max_steps=1, limit_val_batches=0).fit(
        OptRegressor(net, make_opt), train
    )

    with torch.no_grad():
        f0, f1 = initial(X_TRAIN), net(X_TRAIN)
    dloss_df = (2 * (f0 - Y_TRAIN) / f0.numel()).squeeze(1)  # ∂ mean((f − y)²) / ∂f
    jac = {name: [] for name, _ in initial.named_parameters()}
    for i in range(N_TRAIN):  # plain per-example gradients: J rows
        grads = torch.autograd.grad(initial(X_TRAIN[i : i + 1]).sum(), list(initial.parameters()))
        for (name, _), g in zip(initial.named_parameters(), grads, strict=True):
            jac[name].append(g.flatten())
    gram = {name: torch.stack(rows).double() @ torch.stack(rows).double().T for name, rows in jac.items()}
    weighted, unweighted = gram["v"] + ratio * gram["w"], gram["v"] + gram["w"]

    ntk0 = saved(monitor.state_dict(), "ntk0")
    assert torch.allclose(ntk0, weighted, rtol=1e-4, atol=1e-6)  # float32 Jacobians vs float64 Gram sums
    actual = (f1 - f0).squeeze(1).double()
    predicted = -lr_ref * weighted @ dloss_df.double()
    wrong = -lr_ref * unweighted @ dloss_df.double()
    err = float((actual - predicted).norm() / actual.norm())
    err_unweighted = float((actual - wrong).norm() / actual.norm())
    # O(η) second-order remainder: ~1e-3 here; the unweighted kernel misses most of the step (> 50 %).
    assert err < 2e-2
    assert err_unweighted > 0.5


def test_several_optimizers_raise_a_clear_error(tmp_path: Path) -> None:
    class TwoOptimizers(Regressor):
        def configure_optimizers(self) -> Any:
            return [torch.optim.SGD([self.net.w], lr=0.1), torch.optim.SGD([self.net.v], lr=0.1)]

        def training_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            opt_w, opt_v = self.optimizers()
            loss = F.mse_loss(self(x), y)
            self.manual_backward(loss)
            opt_w.step()
            opt_v.step()

    module = TwoOptimizers(TwoLayerNet(D, 8), 0.1)
    module.automatic_optimization = False
    with pytest.raises(ValueError, match="manual optimization"):
        _fit(tmp_path, module, LinearRegimeMonitor(n_probe=N_VAL))
    monitor = LinearRegimeMonitor(n_probe=N_VAL)
    trainer = make_trainer(tmp_path, [monitor], max_steps=1, name="two")
    trainer.strategy.connect(Regressor(TwoLayerNet(D, 8), 0.1))
    trainer.strategy.optimizers = [torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)] * 2
    with pytest.raises(ValueError, match="exactly one optimizer"):
        monitor.on_train_start(trainer, trainer.lightning_module)


# ------------------------------------------------------------------------------------------ schedulers and loops


def test_epoch_interval_scheduler_with_max_epochs_matches_replay(tmp_path: Path) -> None:
    net = TwoLayerNet(D, 32)
    initial = copy.deepcopy(net)

    def make_opt(p: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(p, lr=0.5, momentum=0.5)

    def sched(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    module = OptRegressor(net, make_opt, {"scheduler": sched, "interval": "epoch"})
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=3, log_spaced=False)
    trainer = _fit(tmp_path, module, monitor, max_steps=-1, max_epochs=5)
    per_epoch = N_TRAIN // BATCH
    assert trainer.global_step == 5 * per_epoch
    assert [r["step"] for r in monitor.history] == list(range(0, 5 * per_epoch + 1, 3))
    _assert_matches_replay(trainer, initial, make_opt, make_scheduler=sched, scheduler_every=per_epoch)


def test_gradient_clipping_warns_once_and_training_continues(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2)
    with pytest.warns(UserWarning, match="clipping is not mirrored") as record:
        trainer = _fit(tmp_path, Regressor(TwoLayerNet(D, 16), 0.5), monitor, gradient_clip_val=0.1)
    assert sum("clipping" in str(w.message) for w in record) == 1
    assert trainer.global_step == 12
    assert [r["step"] for r in monitor.history] == [0, 1, 2, 4, 6, 8, 10, 12]


def test_validation_loops_do_not_change_measurements(tmp_path: Path) -> None:
    def history(**kwargs: Any) -> list[dict]:
        monitor = LinearRegimeMonitor(probe=(X_VAL, Y_VAL), every_n_steps=2)
        _fit(tmp_path, Regressor(TwoLayerNet(D, 16), 0.5), monitor, name=str(kwargs), **kwargs)
        return monitor.history

    with_val = history(val_check_interval=1, limit_val_batches=1.0)  # validation after every step
    without = history(limit_val_batches=0)
    assert with_val == without
    assert len(with_val) == 8


def test_fast_dev_run(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL)
    trainer = _fit(tmp_path, Regressor(TwoLayerNet(D, 16), 0.5), monitor, fast_dev_run=True, max_steps=-1)
    assert trainer.global_step == 1
    assert [r["step"] for r in monitor.history] == [0, 1]
    assert monitor.history[1]["functional_distance"] > 0


@pytest.mark.parametrize("entry", ["validate", "test"])
def test_validate_or_test_without_fit_is_quiet(tmp_path: Path, entry: str) -> None:
    class WithTest(Regressor):
        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.validation_step(batch, batch_idx)

    monitor = LinearRegimeMonitor(n_probe=N_VAL)
    trainer = make_trainer(tmp_path, [monitor])
    _, val = loaders(X_TRAIN, Y_TRAIN, X_VAL, Y_VAL, BATCH)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        getattr(trainer, entry)(WithTest(TwoLayerNet(D, 8), 0.1), val)
    assert not [w for w in record if "lin_probe" in str(w.filename) or "lin_probe" in str(w.message)]
    assert monitor.history == [] and monitor.kernel is None
    assert not any(k.startswith("lin_probe/") for k in trainer.callback_metrics)
    acc = read_events(trainer.logger.log_dir)
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("lin_probe")]
    assert not (Path(trainer.logger.log_dir) / "lin_probe").exists()


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("ckpt_step", [4, 20], ids=["before-exit", "after-exit"])
def test_resume_with_momentum_equals_uninterrupted_run(tmp_path: Path, ckpt_step: int) -> None:
    """SGD with momentum: the shadow's momentum buffer must come back from the checkpoint."""

    def monitor() -> LinearRegimeMonitor:
        return LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2, tolerance=0.25, patience=2)

    def module(seed: int) -> Regressor:
        return Regressor(TwoLayerNet(D, 128, seed=seed), 0.5, momentum=0.9)

    train, val = loaders(X_TRAIN, Y_TRAIN, X_VAL, Y_VAL, N_TRAIN)  # one batch per epoch: resume is exact
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=ckpt_step, save_top_k=-1)
    full = monitor()
    make_trainer(tmp_path, [full, ckpt], name="full", max_steps=24, enable_checkpointing=True).fit(
        module(0), train, val
    )
    assert full.exit_step is not None and 4 < full.exit_step < 20, full.exit_step
    path = next(p for p in (tmp_path / "ckpt").iterdir() if f"step={ckpt_step}." in p.name)

    resumed = monitor()
    trainer = make_trainer(tmp_path, [resumed], name="resumed", max_steps=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module(99), train, val, ckpt_path=str(path))
    assert resumed.exit_step == full.exit_step
    logged = Dashboard(trainer.logger.log_dir).series("functional_distance")
    expected = {int(r["step"]): r["functional_distance"] for r in full.history if r["step"] > ckpt_step}
    assert set(logged) == set(expected)
    for step, value in expected.items():
        # same process, same float32 ops; 1e-6 relative only absorbs checkpoint float round-trips
        assert logged[step] == pytest.approx(value, rel=1e-6, abs=1e-8), f"step {step}"
    # the exit is logged once, by whichever run confirms it: the resumed one only if after the checkpoint
    found_at = next(int(r["step"]) for r in full.history if "exit_step" in r)
    exit_logs = Dashboard(trainer.logger.log_dir).series("exit_step")
    assert exit_logs == ({found_at: float(full.exit_step)} if found_at > ckpt_step else {})
