"""LinearRegimeMonitor in real (tiny) Trainer fits, read back from the TensorBoard event files.

The reference for every logged distance is an independent replay: plain PyTorch gradient descent
on a copy of the network and on ``f_0 + Bᵀψ`` built from the *logged* ``a, b`` — no lin_probe code.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

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
from pytorch_lightning.callbacks import ModelCheckpoint
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import Tensor
from torch.utils.data import DataLoader

from lin_probe.lightning.callback import LinearRegimeMonitor

D, N_TRAIN, N_VAL = 16, 64, 32


def _run(
    tmp_path: Path,
    *,
    width: int = 64,
    lr: float = 0.5,
    batch_size: int = N_TRAIN,
    max_steps: int = 24,
    accumulate: int = 1,
    scheduler=None,
    monitor: LinearRegimeMonitor | None = None,
    name: str = "run",
    **trainer_kwargs,
) -> tuple[pl.Trainer, Regressor, LinearRegimeMonitor | None, dict]:
    x, y = sphere_data(N_TRAIN + N_VAL, D)
    train, val = loaders(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], batch_size)
    model = Regressor(TwoLayerNet(D, width), lr, scheduler=scheduler)
    initial = copy.deepcopy(model.net)
    callbacks = [] if monitor is None else [monitor]
    trainer = make_trainer(
        tmp_path,
        callbacks,
        name=name,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        **trainer_kwargs,
    )
    trainer.fit(model, train, val)
    data = {
        "x": x[:N_TRAIN],
        "y": y[:N_TRAIN],
        "x_val": x[N_TRAIN:],
        "y_val": y[N_TRAIN:],
        "initial": initial,
    }
    return trainer, model, monitor, data


def _replay(data: dict, a: float, b: float, *, lr_at, batch_size: int, accumulate: int, steps: int) -> dict:
    """Plain-PyTorch GD on the network and on f_0 + Bᵀψ; returns {step: RMS(f − f_lin) on the probe}."""
    net = copy.deepcopy(data["initial"])
    f0 = copy.deepcopy(data["initial"]).eval()
    x, y, probe = data["x"], data["y"], data["x_val"]
    d = x.shape[1]

    def psi(inp: Tensor) -> Tensor:
        return torch.cat([inp * math.sqrt(a / d), torch.full((len(inp), 1), math.sqrt(b))], dim=1)

    B = torch.zeros(d + 1, 1, requires_grad=True)
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    distances = {}
    with torch.no_grad():
        distances[0] = (net(probe) - f0(probe)).pow(2).mean().sqrt().item()
    batch_iter = iter([])
    for step in range(1, steps + 1):
        grads = [torch.zeros_like(p) for p in net.parameters()]
        grad_b = torch.zeros_like(B)
        for _ in range(accumulate):
            try:
                xb, yb = next(batch_iter)
            except StopIteration:
                batch_iter = iter(batches)
                xb, yb = next(batch_iter)
            loss = F.mse_loss(net(xb), yb) / accumulate
            for g, gp in zip(grads, torch.autograd.grad(loss, list(net.parameters())), strict=True):
                g += gp
            with torch.no_grad():
                f0_b = f0(xb)
            loss_lin = F.mse_loss(f0_b + psi(xb) @ B, yb) / accumulate
            grad_b += torch.autograd.grad(loss_lin, B)[0]
        lr = lr_at(step - 1)
        with torch.no_grad():
            for p, g in zip(net.parameters(), grads, strict=True):
                p -= lr * g
            B -= lr * grad_b
            distances[step] = (net(probe) - (f0(probe) + psi(probe) @ B)).pow(2).mean().sqrt().item()
    return distances


@pytest.mark.parametrize(
    ("batch_size", "accumulate", "gamma"),
    [(N_TRAIN, 1, None), (16, 1, None), (16, 1, 0.9), (16, 2, None)],
    ids=["full-batch", "mini-batch", "steplr", "accumulate2"],
)
def test_logged_distance_matches_independent_replay(
    tmp_path: Path, batch_size: int, accumulate: int, gamma
) -> None:
    scheduler = (
        None
        if gamma is None
        else (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=gamma))
    )
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=5, log_spaced=True)
    steps = 20
    trainer, _, _, data = _run(
        tmp_path,
        batch_size=batch_size,
        accumulate=accumulate,
        scheduler=scheduler,
        monitor=monitor,
        max_steps=steps,
    )
    acc = read_events(trainer.logger.log_dir)
    a = scalar_series(acc, "lin_probe/fit_a")[0]
    b = scalar_series(acc, "lin_probe/fit_b")[0]
    logged = scalar_series(acc, "lin_probe/functional_distance")
    expected_steps = {0, 1, 2, 4, 5, 8, 10, 15, 16, 20}
    assert set(logged) == expected_steps
    lr0 = 0.5
    lr_at = (lambda t: lr0) if gamma is None else (lambda t: lr0 * gamma**t)
    replay = _replay(data, a, b, lr_at=lr_at, batch_size=batch_size, accumulate=accumulate, steps=steps)
    assert max(logged.values()) > 1e-3, "training must move the network away from the shadow"
    for step, value in logged.items():
        # float32 training in two implementations: agreement to ~1e-5 relative; 2e-4 + 1e-6 abs is loose enough
        # for accumulated round-off over 20 steps yet far below the distances themselves (> 1e-3).
        assert value == pytest.approx(replay[step], rel=2e-4, abs=1e-6), f"step {step}"


def test_every_tag_and_layout_present(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, tolerance=0.01, patience=2)
    trainer, _, _, _ = _run(tmp_path, width=16, lr=2.0, monitor=monitor, max_steps=16)
    acc = read_events(trainer.logger.log_dir)
    scalars = set(acc.Tags()["scalars"])
    for name in [
        "functional_distance",
        "functional_distance_rel",
        "ntk_gap",
        "ntk_drift",
        "loss_network",
        "loss_linear",
        "in_linear_regime",
        "exit_step",
        "fit_a",
        "fit_b",
        "fit_c",
        "fit_rel_error",
    ]:
        assert f"lin_probe/{name}" in scalars, name
    # ntk_gap at step 0 equals the fit's own error (same denominator ‖Θ_0‖₂)
    gap0 = scalar_series(acc, "lin_probe/ntk_gap")[0]
    assert gap0 == pytest.approx(scalar_series(acc, "lin_probe/fit_rel_error")[0], rel=1e-6)
    assert scalar_series(acc, "lin_probe/ntk_drift")[0] == pytest.approx(0.0, abs=1e-9)
    assert scalar_series(acc, "lin_probe/functional_distance_rel")[0] == 0.0
    layouts = acc.Tensors("custom_scalars__config__")
    assert len(layouts) == 1
    layout = layout_pb2.Layout()
    layout.ParseFromString(layouts[0].tensor_proto.string_val[0])
    assert layout.category[0].title == "lin_probe"
    texts = set(acc.Tags()["tensors"])
    assert "lin_probe/fit/text_summary" in texts and "lin_probe/exit/text_summary" in texts
    assert "lin_probe/ntk_eigenvalues" in acc.Tags()["histograms"]
    assert "lin_probe/summary" in acc.Tags()["images"]
    # callback_metrics feed EarlyStopping / ModelCheckpoint
    assert "lin_probe/functional_distance_rel" in trainer.callback_metrics
    assert monitor.exit_step is not None
    assert scalar_series(acc, "lin_probe/exit_step") == {
        next(iter(scalar_series(acc, "lin_probe/exit_step"))): float(monitor.exit_step)
    }


def _brute_force_exit(history: list[dict], tolerance: float, patience: int) -> int | None:
    rel = [(int(r["step"]), r["functional_distance_rel"]) for r in history]
    for i in range(len(rel) - patience + 1):
        if all(v > tolerance for _, v in rel[i : i + patience]):
            return rel[i][0]
    return None


def test_exit_follows_rule_on_a_run_that_leaves(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=5, tolerance=0.1, patience=3)
    trainer, _, _, _ = _run(tmp_path, width=8, lr=4.0, monitor=monitor, max_steps=40)
    acc = read_events(trainer.logger.log_dir)
    rel = scalar_series(acc, "lin_probe/functional_distance_rel")
    history = [{"step": s, "functional_distance_rel": v} for s, v in sorted(rel.items())]
    expected = _brute_force_exit(history, 0.1, 3)
    assert expected is not None, "narrow net at a large learning rate must leave the linear regime"
    assert monitor.exit_step == expected
    flags = scalar_series(acc, "lin_probe/in_linear_regime")
    assert flags[0] == 1.0 and flags[max(flags)] == 0.0


def test_lazy_wide_net_stays_linear(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=5, tolerance=0.1, patience=3)
    trainer, _, _, _ = _run(tmp_path, width=4096, lr=0.05, monitor=monitor, max_steps=10)
    rel = scalar_series(read_events(trainer.logger.log_dir), "lin_probe/functional_distance_rel")
    assert monitor.exit_step is None
    assert max(rel.values()) < 0.1


def test_training_is_bit_identical_with_and_without_monitor(tmp_path: Path) -> None:
    def fit(with_monitor: bool) -> list[Tensor]:
        pl.seed_everything(7, verbose=False)
        x, y = sphere_data(N_TRAIN + N_VAL, D)
        train, val = loaders(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], 16, shuffle=True)
        model = Regressor(TwoLayerNet(D, 32, dropout=0.2), 0.3, momentum=0.9)
        callbacks = [LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=3)] if with_monitor else []
        trainer = make_trainer(
            tmp_path, callbacks, name=f"bit{with_monitor}", max_steps=12, limit_val_batches=1.0
        )
        trainer.fit(model, train, val)
        return [p.detach().clone() for p in model.parameters()]

    without, with_ = fit(False), fit(True)
    for p, q in zip(without, with_, strict=True):
        assert torch.equal(p, q)


def test_state_dict_round_trip(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=5)
    _run(tmp_path, monitor=monitor, max_steps=8)
    state = monitor.state_dict()
    fresh = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=5)
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.history == monitor.history
    assert fresh.regime.state_dict() == monitor.regime.state_dict()
    assert fresh._pending_state is not None
    assert torch.equal(fresh._pending_state["shadow"]["B"], state["shadow"]["B"])
    assert torch.equal(fresh._pending_state["ntk0"], state["ntk0"])


def test_resume_from_mid_run_checkpoint_gives_same_exit(tmp_path: Path) -> None:
    def monitor() -> LinearRegimeMonitor:
        return LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, tolerance=0.1, patience=3)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=12, save_top_k=-1)
    full = monitor()
    x, y = sphere_data(N_TRAIN + N_VAL, D)
    train, val = loaders(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], N_TRAIN)
    trainer = make_trainer(tmp_path, [full, ckpt], name="full", max_steps=36, enable_checkpointing=True)
    trainer.fit(Regressor(TwoLayerNet(D, 8), 4.0), train, val)
    assert full.exit_step is not None
    ckpt_path = next(p for p in (tmp_path / "ckpt").iterdir() if "step=12" in p.name)

    resumed = monitor()
    trainer2 = make_trainer(tmp_path, [resumed], name="resumed", max_steps=36)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer2.fit(Regressor(TwoLayerNet(D, 8, seed=99), 4.0), train, val, ckpt_path=str(ckpt_path))
    assert resumed.exit_step == full.exit_step
    assert [r["step"] for r in resumed.history] == [r["step"] for r in full.history]
    for r_full, r_resumed in zip(full.history, resumed.history, strict=True):
        assert r_resumed["functional_distance"] == pytest.approx(
            r_full["functional_distance"], rel=1e-5, abs=1e-7
        )


def test_no_logger_keeps_history_and_warns_once(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2)
    with pytest.warns(UserWarning, match="no logger") as record:
        _run(tmp_path, monitor=monitor, max_steps=6, logger=False)
    assert sum("no logger" in str(w.message) for w in record) == 1
    assert [r["step"] for r in monitor.history] == [0, 1, 2, 4, 6]


def test_stop_after_exit_stops_measuring(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(
        n_probe=N_VAL, every_n_steps=2, tolerance=0.05, patience=1, stop_after_exit=1
    )
    _run(tmp_path, width=8, lr=4.0, monitor=monitor, max_steps=30)
    assert monitor.exit_step is not None
    after = [r for r in monitor.history if r["step"] >= monitor.exit_step]
    assert len(after) == 2  # the exit check itself, then one more


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"tolerance": 0.0}, ValueError, "tolerance"),
        ({"patience": 0}, ValueError, "patience"),
        ({"loss": "hinge"}, ValueError, "mse"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"n_probe": 1}, ValueError, "n_probe"),
        ({"batch_to_xy": 3}, TypeError, "batch_to_xy"),
        ({"probe": torch.tensor([[float("nan"), 1.0], [0.0, 1.0]])}, ValueError, "NaN"),
    ],
)
def test_constructor_validates(kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        LinearRegimeMonitor(**kwargs)


def test_unknown_batch_structure_names_batch_to_xy(tmp_path: Path) -> None:
    x, y = sphere_data(N_TRAIN, D)

    class DictBatches(Regressor):
        def training_step(self, batch, batch_idx):
            return F.mse_loss(self(batch["inputs"]), batch["targets"])

    batches = [{"inputs": x[i : i + 16], "targets": y[i : i + 16]} for i in range(0, N_TRAIN, 16)]
    data = DataLoader(batches, batch_size=None)  # yields each dict as it is
    monitor = LinearRegimeMonitor(probe=(x[:16], y[:16]))
    trainer = make_trainer(tmp_path, [monitor], max_steps=2)
    with pytest.raises(TypeError, match="batch_to_xy"):
        trainer.fit(DictBatches(TwoLayerNet(D, 8), 0.1), data)
    ok = LinearRegimeMonitor(probe=(x[:16], y[:16]), batch_to_xy=lambda b: (b["inputs"], b["targets"]))
    make_trainer(tmp_path, [ok], name="ok", max_steps=2).fit(DictBatches(TwoLayerNet(D, 8), 0.1), data)
    assert [r["step"] for r in ok.history] == [0, 1, 2]


def test_progress_bar_shows_relative_distance(tmp_path: Path) -> None:
    trainer, _, _, _ = _run(
        tmp_path, monitor=LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2), max_steps=4
    )
    assert "lin_probe/functional_distance_rel" in trainer.progress_bar_metrics
    trainer, _, _, _ = _run(
        tmp_path, monitor=LinearRegimeMonitor(n_probe=N_VAL, progress_bar=False), max_steps=2, name="nobar"
    )
    assert "lin_probe/functional_distance_rel" not in trainer.progress_bar_metrics


def test_diverging_network_warns_once_and_training_continues(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=1, log_spaced=False)
    with pytest.warns(UserWarning, match="Non-finite") as record:
        trainer, _, _, _ = _run(tmp_path, width=8, lr=500.0, monitor=monitor, max_steps=12)
    assert trainer.global_step == 12  # the run was not cut short by the monitor
    assert sum("Non-finite" in str(w.message) for w in record) == 1
    assert any(not math.isfinite(r["loss_network"]) for r in monitor.history)


def test_configurable_from_lightning_cli_yaml(tmp_path: Path) -> None:
    from pytorch_lightning.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_steps: 2\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  callbacks:\n"
        "    - class_path: lin_probe.LinearRegimeMonitor\n"
        "      init_args:\n"
        "        every_n_steps: 2\n"
        "        tolerance: 0.25\n"
        "        loss: cross_entropy\n"
        "        log_spaced: false\n"
    )
    cli = LightningCLI(pl.LightningModule, run=False, args=["--config", str(config)])
    monitors = [cb for cb in cli.trainer.callbacks if isinstance(cb, LinearRegimeMonitor)]
    assert len(monitors) == 1
    assert (monitors[0].every_n_steps, monitors[0].tolerance, monitors[0].loss, monitors[0].log_spaced) == (
        2,
        0.25,
        "cross_entropy",
        False,
    )


def test_uncentered_shadow_starts_inside_the_regime(tmp_path: Path) -> None:
    """center=False: f_lin,0 = 0 ≠ f_0, yet before any step the relative distance is 0 by definition."""
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2, center=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(tmp_path, monitor=monitor, max_steps=4)
    first = monitor.history[0]
    assert first["step"] == 0 and first["functional_distance_rel"] == 0.0
    assert first["functional_distance"] > 0  # the absolute gap is f_0 itself, and it is reported
    assert not any("Non-finite" in str(w.message) for w in caught)
    assert monitor.regime.streak_start != 0
