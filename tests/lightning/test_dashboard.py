"""The dashboard a Trainer run leaves behind, read back from its event files with TensorBoard's reader.

Each test runs a small Trainer with ``LinearRegimeMonitor`` and a ``TensorBoardLogger`` and checks
one promise of the dashboard: the HParams session (model hyperparameters + lin_probe's settings +
summary metric names, written before Lightning's), figures at the exit / epoch ends / the end, a
matplotlib-less run that warns once and writes everything else, and other loggers keeping the flat
names.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from _lightning_setups import (
    Dashboard,
    Regressor,
    TwoLayerNet,
    loaders,
    make_trainer,
    read_events,
    sphere_data,
)
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lin_probe import LinearRegimeMonitor

D, N_TRAIN, N_VAL = 6, 48, 16
X, Y = sphere_data(N_TRAIN + N_VAL, D, seed=3)


class HyperRegressor(Regressor):
    """A module that saves its hyperparameters, as most users' modules do."""

    def __init__(self, width: int, lr: float) -> None:
        super().__init__(TwoLayerNet(D, width), lr)
        self.save_hyperparameters()


def _fit(tmp_path: Path, monitor: LinearRegimeMonitor, *, max_steps: int = 12, batch: int = 16, **kw: Any):
    train, val = loaders(X[:N_TRAIN], Y[:N_TRAIN], X[N_TRAIN:], Y[N_TRAIN:], batch)
    trainer = make_trainer(tmp_path, [monitor], max_steps=max_steps, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|log_every_n_steps).*")
        trainer.fit(HyperRegressor(8, 3.0), train, val)
    return trainer


def _hparams(log_dir: str) -> tuple[Any, Any]:
    acc = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    return start.session_start_info, experiment.experiment


def test_hparams_session_holds_model_hparams_lin_probe_settings_and_summary_metrics(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2, tolerance=0.05, patience=2)
    trainer = _fit(tmp_path, monitor)
    start, experiment = _hparams(trainer.logger.log_dir)
    # the first session of a run is the one TensorBoard shows: it must carry the model's own hparams
    assert start.hparams["width"].number_value == 8 and start.hparams["lr"].number_value == 3.0
    assert start.hparams["lin_probe/tolerance"].number_value == 0.05
    assert start.hparams["lin_probe/data_kernel"].string_value == "auto"
    metrics = [m.name.tag for m in experiment.metric_infos]
    # TensorBoard shows the first five metric columns: the verdict and the (centred) fit come first
    assert metrics[:3] == [
        "lin_probe_summary/exit_step",
        "lin_probe_summary/outside_from_start",
        "lin_probe_summary/fit_rel_error_centered",
    ]
    assert {"hp_metric", "lin_probe_summary/fit_a"} <= set(metrics)
    # ... and the summary values are scalars of the same run, where HParams reads them
    dashboard = Dashboard(trainer.logger.log_dir)
    assert dashboard.series("fit_a") == {0: pytest.approx(monitor.kernel.a, rel=1e-6)}
    # a width-8 net misfits the affine kernel (centred error > tolerance): never inside, no exit step
    assert monitor.kernel.rel_error_centered > 0.05
    assert monitor.verdict.state == "outside_from_start" and monitor.exit_step is None
    assert list(dashboard.series("outside_from_start").values()) == [1.0]
    assert not dashboard.has("exit_step")
    acc = read_events(trainer.logger.log_dir)
    (final,) = acc.Scalars("lin_probe_summary/final_in_linear_regime")
    assert final.value == 0.0


def test_no_lin_probe_session_when_the_user_manages_hparams(tmp_path: Path) -> None:
    """``default_hp_metric=False`` is how users log their own HParams metrics: theirs must win."""
    logger = TensorBoardLogger(str(tmp_path), name="own", version=0, default_hp_metric=False)
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4)
    trainer = _fit(tmp_path, monitor, logger=logger, max_steps=4)
    logger.log_hyperparams({"width": 8}, {"my/metric": 1.0})
    logger.experiment.flush()
    start, experiment = _hparams(trainer.logger.log_dir)
    assert [m.name.tag for m in experiment.metric_infos] == ["my/metric"]
    assert "lin_probe/tolerance" not in start.hparams


def test_figures_at_exit_epoch_ends_and_the_end(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2, tolerance=0.05, patience=2)
    trainer = _fit(tmp_path, monitor, max_steps=12, batch=N_TRAIN)  # one batch per epoch: 12 epoch ends
    acc = read_events(trainer.logger.log_dir)
    steps = [event.step for event in acc.Images("lin_probe/figure/2_distance")]
    # (this width-8 net is not in the regime from the start: that verdict is the one drawn)
    confirmed_at = next(int(r["step"]) for r in monitor.history if "outside_from_start" in r)
    assert confirmed_at in steps, "the figure is redrawn when the verdict is confirmed"
    assert steps[0] <= 2, "the first epoch end draws it: the Images tab is not empty during training"
    assert steps[-1] == 12, "and the end of training draws the final one"
    event = acc.Images("lin_probe/figure/2_distance")[-1]
    assert 500 <= event.width <= 700, "readable at TensorBoard's ~330 px card width"
    assert {f"lin_probe/figure/{name}" for name in ("1_loss", "2_distance", "3_ntk")} <= set(
        acc.Tags()["images"]
    )


def test_without_matplotlib_one_warning_and_every_other_panel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2, tolerance=0.05, patience=2)
    train, val = loaders(X[:N_TRAIN], Y[:N_TRAIN], X[N_TRAIN:], Y[N_TRAIN:], N_TRAIN)
    trainer = make_trainer(tmp_path, [monitor], max_steps=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(HyperRegressor(8, 3.0), train, val)
    messages = [str(w.message) for w in caught if "matplotlib" in str(w.message)]
    assert len(messages) == 1 and "pip install matplotlib" in messages[0], messages
    acc = read_events(trainer.logger.log_dir)
    assert acc.Tags()["images"] == []
    assert "lin_probe/1_fit/text_summary" in acc.Tags()["tensors"]
    assert Dashboard(trainer.logger.log_dir).series("functional_distance_rel")


def test_other_loggers_keep_the_flat_names_and_tensorboard_gets_series(tmp_path: Path) -> None:
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    csv = CSVLogger(str(tmp_path), name="csv", version=0)
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2)
    _fit(tmp_path, monitor, logger=[tb, csv], max_steps=6)
    import csv as csv_module

    with open(Path(csv.log_dir) / "metrics.csv") as handle:
        rows = list(csv_module.DictReader(handle))
    logged = {
        int(r["step"]): float(r["lin_probe/functional_distance_rel"])
        for r in rows
        if r.get("lin_probe/functional_distance_rel")
    }
    expected = {int(r["step"]): r["functional_distance_rel"] for r in monitor.history}
    assert logged == {s: pytest.approx(v, rel=1e-6) for s, v in expected.items()}
    assert {"lin_probe/fit_a", "lin_probe/loss_network"} <= set(rows[0]) | {k for r in rows for k in r}
    tb_rel = Dashboard(tb.log_dir).series("functional_distance_rel")
    assert tb_rel == {s: pytest.approx(v, rel=1e-6) for s, v in expected.items()}
    assert not math.isnan(sum(tb_rel.values()))


class CrashingRegressor(HyperRegressor):
    """Fails at a given step, as a user's run can (a bug, an OOM, Ctrl-C)."""

    def __init__(self, width: int, lr: float, crash_at: int) -> None:
        super().__init__(width, lr)
        self.crash_at = crash_at

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_step == self.crash_at:
            raise RuntimeError("user's bug")
        return super().training_step(batch, batch_idx)


def test_after_a_crash_the_figure_and_every_decided_check_are_on_disk(tmp_path: Path) -> None:
    # every check after step 0 is outside a tiny tolerance, and patience 50 never confirms: all undecided
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2, tolerance=1e-9, patience=50)
    train, val = loaders(X[:N_TRAIN], Y[:N_TRAIN], X[N_TRAIN:], Y[N_TRAIN:], 16)  # 3 batches an epoch
    trainer = make_trainer(tmp_path, [monitor], max_steps=50)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="user's bug"):
        warnings.filterwarnings("ignore", message=".*(num_workers|log_every_n_steps).*")
        trainer.fit(CrashingRegressor(8, 0.1, crash_at=7), train, val)
    acc = read_events(trainer.logger.log_dir)
    (last,) = acc.Images("lin_probe/figure/2_distance")[-1:]
    assert last.step == 7, "the figure drawn when the run died shows every check up to it"
    checks = [int(r["step"]) for r in monitor.history]
    assert max(checks) == 6
    # the run's end decides them: an unconfirmed run of outside checks is not an exit, by the rule
    assert Dashboard(trainer.logger.log_dir).series("in_linear_regime") == dict.fromkeys(checks, 1.0)
