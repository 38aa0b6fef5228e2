"""LinearRegimeMonitor in real (tiny) Trainer fits, read back from the TensorBoard event files.

The reference for every logged distance is an independent replay (:func:`_robustness_helpers.replay`):
plain PyTorch training of a copy of the network and of ``f_0 + Bᵀψ`` built from the *logged* ``a, b``
— no lin_probe code. That user parameters are bit-identical with and without the monitor is checked
in ``tests/integration/test_bit_identity.py``.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _lightning_setups import (
    SCALAR_TAGS,
    Dashboard,
    Regressor,
    TwoLayerNet,
    loaders,
    make_trainer,
    read_events,
    scalar_series,
    sphere_data,
)
from _robustness_helpers import assert_matches_replay
from pytorch_lightning.callbacks import ModelCheckpoint
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lin_probe import LinearRegimeMonitor

D, N_TRAIN, N_VAL = 16, 64, 32
LINEARIZED_TAGS = (
    "linearized/functional_distance_rel",
    "linearized/functional_distance",
    "linearized/loss_linear",
)
# A net that is inside the linear regime at first and leaves it within a few steps: at width 1024
# the centred fit error is 0.11 and the first check's distance 0.08 < 0.1; lr 4 takes it out by step 2-4.
# (Narrow nets misfit the affine kernel from the start: width 8 has centred error 0.57.)
LEAVES_WIDTH, LEAVES_LR = 1024, 4.0


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
    logged = assert_matches_replay(
        trainer,
        data["initial"],
        data["x"],
        data["y"],
        data["x_val"],
        batch_size,
        lambda params: torch.optim.SGD(params, lr=0.5),
        accumulate=accumulate,
        make_scheduler=scheduler,
    )
    assert set(logged) == {0, 1, 2, 4, 5, 8, 10, 15, 16, 20}


def test_every_tag_and_layout_present(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, tolerance=0.1, patience=2, linearized=True)
    trainer, _, _, _ = _run(tmp_path, width=LEAVES_WIDTH, lr=LEAVES_LR, monitor=monitor, max_steps=16)
    acc = read_events(trainer.logger.log_dir)
    dashboard = Dashboard(trainer.logger.log_dir)
    for name in (*SCALAR_TAGS, *LINEARIZED_TAGS):
        assert dashboard.has(name), name
    for name in ("kernel_distance", "ntk_scale", "kernel_alignment", "linearized/functional_distance_rel"):
        values = dashboard.series(name)
        assert values and all(math.isfinite(v) for v in values.values()), name
    assert dashboard.series("ntk_scale")[0] == pytest.approx(1.0, rel=1e-9)
    assert dashboard.series("kernel_distance")[0] == pytest.approx(0.0, abs=1e-12)
    assert monitor.diagnosis is not None
    card = acc.Tensors("lin_probe/2_exit/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert f"**Diagnosis: {monitor.diagnosis.title}.**" in card
    # ntk_gap at step 0 equals the fit's own error (same denominator ‖Θ_0‖₂)
    gap0 = dashboard.series("ntk_gap")[0]
    assert gap0 == pytest.approx(dashboard.series("fit_rel_error")[0], rel=1e-6)
    assert dashboard.series("ntk_drift")[0] == pytest.approx(0.0, abs=1e-9)
    assert dashboard.series("functional_distance_rel")[0] == 0.0
    # TensorBoard gets the per-series dashboard, not a second copy of the flat tags in the main run;
    # the monitor's own cost is the one main-run chart (it belongs to no series)
    assert [t for t in acc.Tags()["scalars"] if t.startswith("lin_probe/")] == ["lin_probe/overhead"]
    layouts = acc.Tensors("custom_scalars__config__")
    assert len(layouts) == 1
    layout = layout_pb2.Layout()
    layout.ParseFromString(layouts[0].tensor_proto.string_val[0])
    assert layout.category[0].title == "lin_probe"
    texts = set(acc.Tags()["tensors"])
    assert "lin_probe/1_fit/text_summary" in texts and "lin_probe/2_exit/text_summary" in texts
    assert "lin_probe/ntk_spectrum" in acc.Tags()["histograms"]
    assert "lin_probe/figure/2_distance" in acc.Tags()["images"]
    # callback_metrics feed EarlyStopping / ModelCheckpoint
    assert "lin_probe/functional_distance_rel" in trainer.callback_metrics
    assert monitor.exit_step is not None
    (confirmed_at,) = [int(r["step"]) for r in monitor.history if "exit_step" in r]
    assert dashboard.series("exit_step") == {confirmed_at: float(monitor.exit_step)}


def _brute_force_exit(history: list[dict], tolerance: float, patience: int) -> int | None:
    rel = [(int(r["step"]), r["functional_distance_rel"]) for r in history]
    for i in range(len(rel) - patience + 1):
        if all(v > tolerance for _, v in rel[i : i + patience]):
            return rel[i][0]
    return None


def test_exit_follows_rule_on_a_run_that_leaves(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=5, tolerance=0.1, patience=3)
    trainer, _, _, _ = _run(tmp_path, width=LEAVES_WIDTH, lr=LEAVES_LR, monitor=monitor, max_steps=40)
    dashboard = Dashboard(trainer.logger.log_dir)
    rel = dashboard.series("functional_distance_rel")
    history = [{"step": s, "functional_distance_rel": v} for s, v in sorted(rel.items())]
    expected = _brute_force_exit(history, 0.1, 3)
    assert expected is not None, "a large learning rate must take the net out of the linear regime"
    assert expected > 1, "it must have been inside first (else: not in the regime from the start)"
    assert monitor.exit_step == expected
    # the flag drops AT the exit step (not at the later check that confirmed it), in two constant runs
    assert dashboard.series("in_linear_regime") == {step: float(step < expected) for step in rel}
    exit_marks = scalar_series(dashboard.run("since_exit"), "lin_probe/functional_distance_rel")
    assert min(exit_marks) == expected
    assert exit_marks == {step: value for step, value in rel.items() if step >= expected}
    tolerance = scalar_series(dashboard.run("tolerance"), "lin_probe/functional_distance_rel")
    assert tolerance == dict.fromkeys(rel, pytest.approx(0.1))


def test_lazy_wide_net_stays_linear(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=5, tolerance=0.1, patience=3)
    trainer, _, _, _ = _run(tmp_path, width=4096, lr=0.05, monitor=monitor, max_steps=10)
    rel = Dashboard(trainer.logger.log_dir).series("functional_distance_rel")
    assert monitor.exit_step is None
    assert max(rel.values()) < 0.1


def _same(a: Any, b: Any) -> bool:
    """Value-by-value equality of two states: tensors bit for bit (dtype, shape, NaN where NaN), floats exactly."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.isclose(a, b, rtol=0.0, atol=0.0, equal_nan=True).all())
        )
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (
            isinstance(a, Mapping)
            and isinstance(b, Mapping)
            and set(a) == set(b)
            and all(_same(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (
            isinstance(a, (list, tuple))
            and isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _perturbed(state: Any) -> Any:
    """The same state with every floating tensor scaled by 1 + 1e-3 (what a lossy save/load would do)."""
    if isinstance(state, Tensor):
        return state * (1 + 1e-3) if state.is_floating_point() else state
    if isinstance(state, Mapping):
        return {k: _perturbed(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_perturbed(v) for v in state)
    return state


def test_state_dict_round_trip(tmp_path: Path) -> None:
    """The monitor's state in a mid-run checkpoint is all a NEW monitor and Trainer need to continue.

    A run resumed from the step-6 checkpoint ends with the same history, exit step, kernel and
    ``state_dict`` (value by value, tensors bit for bit) as the uninterrupted run; the same
    checkpoint with its floating tensors perturbed by 0.1 % gives another state, so the comparison
    can fail and the resumed values do come from the saved state.
    """

    def monitor() -> LinearRegimeMonitor:  # linearized: θ', its optimizer state and the diagnosis resume too
        return LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=3, tolerance=0.1, patience=2, linearized=True)

    def module(seed: int) -> Regressor:
        return Regressor(
            TwoLayerNet(D, LEAVES_WIDTH, seed=seed), LEAVES_LR, momentum=0.5
        )  # momentum: optimizer state too

    x, y = sphere_data(N_TRAIN + N_VAL, D)
    train, val = loaders(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], N_TRAIN)  # one batch an epoch
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    full = monitor()
    make_trainer(tmp_path, [full, ckpt], name="full", max_steps=15, enable_checkpointing=True).fit(
        module(0), train, val
    )
    assert [r["step"] for r in full.history] == [0, 1, 2, 3, 4, 6, 8, 9, 12, 15]
    assert full.exit_step is not None and full.exit_step <= 6, full.exit_step
    path = next(p for p in (tmp_path / "ckpt").iterdir() if "step=6." in p.name)
    checkpoint = torch.load(path, weights_only=False)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("LinearRegimeMonitor")]
    saved = checkpoint["callbacks"][key]

    loaded = monitor()
    loaded.load_state_dict(copy.deepcopy(saved))
    assert loaded.history == full.history[:6]  # the checks at steps 0..6
    assert loaded.exit_step == full.exit_step

    def resume(from_path: Path, name: str) -> LinearRegimeMonitor:
        resumed = monitor()
        trainer = make_trainer(tmp_path, [resumed], name=name, max_steps=15)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module(99), train, val, ckpt_path=str(from_path))
        return resumed

    resumed = resume(path, "resumed")
    assert resumed.history == full.history
    assert resumed.exit_step == full.exit_step
    assert resumed.kernel == full.kernel
    assert _same(resumed.state_dict(), full.state_dict())

    checkpoint["callbacks"][key] = _perturbed(saved)
    perturbed_path = tmp_path / "perturbed.ckpt"
    torch.save(checkpoint, perturbed_path)
    perturbed = resume(perturbed_path, "perturbed")
    assert not _same(perturbed.state_dict(), full.state_dict())
    later = [(p, f) for p, f in zip(perturbed.history, full.history, strict=True) if f["step"] > 6]
    assert all(p["functional_distance"] != f["functional_distance"] for p, f in later)


def test_resume_from_mid_run_checkpoint_gives_same_exit(tmp_path: Path) -> None:
    def monitor() -> LinearRegimeMonitor:
        return LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, tolerance=0.1, patience=3)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=12, save_top_k=-1)
    full = monitor()
    x, y = sphere_data(N_TRAIN + N_VAL, D)
    train, val = loaders(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], N_TRAIN)
    trainer = make_trainer(tmp_path, [full, ckpt], name="full", max_steps=36, enable_checkpointing=True)
    trainer.fit(Regressor(TwoLayerNet(D, LEAVES_WIDTH), LEAVES_LR), train, val)
    assert full.exit_step is not None
    ckpt_path = next(p for p in (tmp_path / "ckpt").iterdir() if "step=12" in p.name)

    resumed = monitor()
    trainer2 = make_trainer(tmp_path, [resumed], name="resumed", max_steps=36)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer2.fit(
            Regressor(TwoLayerNet(D, LEAVES_WIDTH, seed=99), LEAVES_LR), train, val, ckpt_path=str(ckpt_path)
        )
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


def test_patch_mean_on_a_model_without_a_convolution_is_a_clear_error_before_training(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, data_kernel="patch_mean")
    with pytest.raises(ValueError, match="data_kernel='flat'"):
        _run(tmp_path, monitor=monitor, max_steps=2)


def test_stop_after_exit_stops_measuring(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(
        n_probe=N_VAL, every_n_steps=2, tolerance=0.1, patience=1, stop_after_exit=1
    )
    _run(tmp_path, width=LEAVES_WIDTH, lr=LEAVES_LR, monitor=monitor, max_steps=30)
    assert monitor.exit_step is not None
    after = [r for r in monitor.history if r["step"] >= monitor.exit_step]
    assert len(after) == 2  # the exit check itself, then one more


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"tolerance": 0.0}, ValueError, "tolerance"),
        ({"patience": 0}, ValueError, "patience"),
        ({"loss": "hinge"}, ValueError, "mse"),
        ({"every_n_steps": 0, "log_spaced": False}, ValueError, "every_n_steps"),  # no check after step 0
        ({"max_overhead": 0.0}, ValueError, "max_overhead"),
        ({"max_overhead": 1.5}, ValueError, "max_overhead"),
        ({"max_overhead": "5%"}, TypeError, "max_overhead"),
        ({"n_probe": 1}, ValueError, "n_probe"),
        ({"batch_to_xy": 3}, TypeError, "batch_to_xy"),
        ({"probe": torch.tensor([[float("nan"), 1.0], [0.0, 1.0]])}, ValueError, "NaN"),
        ({"data_kernel": "patches"}, ValueError, "patch_mean"),
        ({"data_kernel": "flat", "features_fn": lambda x: x}, ValueError, "not both"),
        ({"linearized": 1}, TypeError, "linearized"),
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
    (monitor,) = monitors
    # tolerance (and every_n_steps) are part of the checkpoint key of the configured monitor
    reference = LinearRegimeMonitor(every_n_steps=2, tolerance=0.25, loss="cross_entropy", log_spaced=False)
    assert monitor.state_key == reference.state_key
    assert monitor.state_key != LinearRegimeMonitor(every_n_steps=2, log_spaced=False).state_key
    # every_n_steps=2 without log spacing checks at 0, 2, 4 (not 1); cross_entropy adds the accuracies
    x, _ = sphere_data(N_TRAIN + N_VAL, D)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    train, val = loaders(x[:N_TRAIN], labels[:N_TRAIN], x[N_TRAIN:], labels[N_TRAIN:], 16)
    module = Regressor(TwoLayerNet(D, 16, outputs=3), 0.5, loss="cross_entropy")
    make_trainer(tmp_path, [monitor], name="cli", max_steps=4).fit(module, train, val)
    assert [r["step"] for r in monitor.history] == [0, 2, 4]
    assert all({"agreement", "accuracy_network", "accuracy_linear"} <= set(r) for r in monitor.history)


def test_uncentered_shadow_starts_inside_the_regime(tmp_path: Path) -> None:
    """center=False: f_lin,0 = 0 ≠ f_0, yet before any step the relative distance is 0 by definition."""
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2, center=False, patience=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(tmp_path, monitor=monitor, max_steps=4)
    first = monitor.history[0]
    assert first["step"] == 0 and first["functional_distance_rel"] == 0.0
    assert first["functional_distance"] > 0  # the absolute gap is f_0 itself, and it is reported
    assert not any("Non-finite" in str(w.message) for w in caught)
    # patience 1: had step 0 counted as outside the regime, the exit would be step 0
    assert first["in_linear_regime"] == 1.0 and monitor.exit_step != 0


class _GapCNN(pl.LightningModule):
    """A small CNN with global average pooling on 6×6×2 images: both data kernels apply."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(2, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(32, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return torch.nn.functional.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_auto_data_kernel_says_which_it_chose_with_every_score_in_one_line_and_on_the_card(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 2, 6, 6, generator=gen), torch.randn(24, 1, generator=gen)
    monitor = LinearRegimeMonitor(n_probe=16)
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [monitor], max_steps=2).fit(
            _GapCNN(), DataLoader(TensorDataset(x, y), batch_size=8)
        )
    (line,) = [r.getMessage() for r in caplog.records if "lin_probe: data kernel:" in r.getMessage()]
    choice = monitor.core.data_kernel
    assert set(choice.scores) == {"flat", "patch_mean"}
    assert line.startswith(f"lin_probe: data kernel: {choice.name} (centred fit error")
    other = ({"flat", "patch_mean"} - {choice.name}).pop()
    assert f"; {other} " in line
    chosen = min(choice.scores, key=lambda name: choice.scores[name][1])
    assert choice.name == chosen, "the lowest centred error wins"
    events = read_events(tmp_path / "run" / "version_0")
    text = events.Tensors("lin_probe/1_fit/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "the lowest centred fit error of the candidates" in text


def test_a_sketched_kernel_is_stated_on_the_fit_card_with_its_projections_and_error(tmp_path: Path) -> None:
    """``outputs="sketch"`` on a 10-output model: TensorBoard's fit card says the NTK is sketched, with
    how many directions and the estimated error the monitor measured (its accuracy against the exact
    kernel: tests/monitor/test_outputs.py)."""
    x, y = sphere_data(N_TRAIN + N_VAL, D, outputs=10)
    train, val = loaders(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], N_TRAIN)
    monitor = LinearRegimeMonitor(n_probe=N_VAL, outputs="sketch", loss="mse", max_overhead=None)
    make_trainer(tmp_path, [monitor], max_steps=2).fit(
        Regressor(TwoLayerNet(D, 64, outputs=10), 0.5), train, val
    )
    outputs = monitor.core.kernel_outputs
    assert outputs is not None and outputs.sketch is not None and outputs.error is not None
    events = read_events(tmp_path / "run" / "version_0")
    text = events.Tensors("lin_probe/1_fit/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "NTK over outputs sketched: 2 random projections of the 10 outputs per example" in text
    assert f"estimated relative spectral error {outputs.error:.3g} on {N_VAL} probe examples" in text


def test_the_verdict_is_announced_in_one_line_with_its_diagnosis(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, tolerance=0.1, patience=2)
    with caplog.at_level(logging.INFO):
        _run(tmp_path, width=LEAVES_WIDTH, lr=LEAVES_LR, monitor=monitor, max_steps=8)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lin_probe: the network")]
    assert lines == [
        f"lin_probe: the network has left the linear regime at step {monitor.exit_step} (the paper's linear "
        f"model); functional_distance_rel > 0.1 for 2 consecutive checks, now "
        f"{next(r for r in monitor.history if 'exit_step' in r)['functional_distance_rel']:.3g} at step "
        f"{next(int(r['step']) for r in monitor.history if 'exit_step' in r)}. "
        f"Diagnosis: {monitor.diagnosis.title}."
    ]


def test_default_loss_is_inferred_for_a_classifier_and_announced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """LinearRegimeMonitor() on an integer-label classifier: cross-entropy is chosen (one line), so the
    shadow trains on the user's loss and the accuracies are logged (under "mse" it failed at step 0)."""
    x, _ = sphere_data(N_TRAIN + N_VAL, D)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    train, val = loaders(x[:N_TRAIN], labels[:N_TRAIN], x[N_TRAIN:], labels[N_TRAIN:], 16)
    module = Regressor(TwoLayerNet(D, 16, outputs=3), 0.5, loss="cross_entropy")
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2, log_spaced=False)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        make_trainer(tmp_path, [monitor], max_steps=4).fit(module, train, val)
    assert not any("could not" in str(w.message) for w in caught)  # no check failed and switched off
    assert monitor.core is not None and monitor.core.config.loss == "cross_entropy"
    assert monitor.config.loss == "auto"  # the user's setting is kept (checkpoint key, re-fits)
    assert all({"agreement", "accuracy_network", "accuracy_linear"} <= set(r) for r in monitor.history)
    assert all(math.isfinite(r["functional_distance_rel"]) for r in monitor.history)
    lines = [r.getMessage() for r in caplog.records if 'loss="auto" chose' in r.getMessage()]
    assert lines == ['lin_probe: loss="auto" chose "cross_entropy" (integer class targets and 3 outputs per '
                     'example); pass `loss=` to override.']  # fmt: skip


def test_default_loss_for_float_targets_is_mse(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2, log_spaced=False)
    _run(tmp_path, monitor=monitor, max_steps=2)
    assert monitor.core is not None and monitor.core.config.loss == "mse"


def test_a_probe_the_model_rejects_is_a_clear_error_naming_probe(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(probe=torch.randn(N_VAL, D + 3), loss="mse")
    with pytest.raises(ValueError, match=rf"one probe example of shape \({D + 3},\).*`probe`"):
        _run(tmp_path, monitor=monitor, max_steps=2)


def test_auto_loss_with_a_tensor_probe_asks_for_targets_or_a_loss(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(probe=torch.randn(N_VAL, D))
    with pytest.raises(ValueError, match=r"probe=\(inputs, targets\)"):
        _run(tmp_path, monitor=monitor, max_steps=2)


def _assert_trains_as_without_monitor(tmp_path: Path, module: Regressor, max_steps: int) -> None:
    """``module``'s parameters are bit for bit those of the same run without the monitor."""
    _, reference, _, _ = _run(tmp_path / "plain", monitor=None, max_steps=max_steps)
    for (name, p), (_, q) in zip(module.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_start_up_measurement_failure_switches_the_monitor_off_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An NTK that cannot be computed at train start (not a configuration error) warns once; training
    goes on exactly as without the monitor."""
    import lin_probe.monitor.core as core

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no batching rule for this op")

    monkeypatch.setattr(core, "fit_at_init", fails)
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, module, _, _ = _run(tmp_path, monitor=monitor, max_steps=3)
    messages = [str(w.message) for w in caught if "switched off" in str(w.message)]
    assert len(messages) == 1 and "RuntimeError: no batching rule" in messages[0]
    assert monitor.core is None and monitor.history == []
    _assert_trains_as_without_monitor(tmp_path, module, max_steps=3)


def test_a_later_ntk_failure_switches_the_ntk_checks_off_and_the_functional_checks_carry_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The NTK at a check cannot be computed (after a good start): one warning, NaN at that check,
    no NTK attempted at any later check, functional checks at every scheduled step, training intact."""
    import lin_probe.monitor.core as core

    calls: list[int] = []

    def fails(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise RuntimeError("out of memory")

    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=1, ntk_every_n_steps=2, log_spaced=False)
    monkeypatch.setattr(core, "ntk_check", fails)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, module, _, _ = _run(tmp_path, monitor=monitor, max_steps=8)
    messages = [str(w.message) for w in caught if "could not compute the NTK" in str(w.message)]
    assert len(messages) == 1 and "NTK checks stop" in messages[0] and "out of memory" in messages[0]
    assert len(calls) == 1  # never retried
    assert [int(r["step"]) for r in monitor.history] == list(range(9))
    assert all(math.isfinite(r["functional_distance_rel"]) for r in monitor.history)
    assert math.isnan(monitor.history[0]["ntk_gap"])
    assert all("ntk_gap" not in r for r in monitor.history[1:])
    _assert_trains_as_without_monitor(tmp_path, module, max_steps=8)


def test_a_later_functional_failure_stops_measuring_and_training_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The network and its shadow cannot be compared at the third check: measuring stops there with
    one warning that says so and why (no NaN record is published), and training runs to its end
    exactly as without the monitor."""
    from lin_probe.monitor.core import RegimeProbe

    functional = RegimeProbe._functional
    calls: list[int] = []

    def third_fails(self: RegimeProbe, model: Any) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the probe forward broke")
        return functional(self, model)

    monkeypatch.setattr(RegimeProbe, "_functional", third_fails)
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=1, log_spaced=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, module, _, _ = _run(tmp_path, monitor=monitor, max_steps=8)
    messages = [str(w.message) for w in caught if "stops measuring" in str(w.message)]
    assert len(messages) == 1
    assert (
        "could not compare network and shadow at step 2" in messages[0]
        and "the probe forward broke" in messages[0]
    )
    assert trainer.global_step == 8 and len(calls) == 3  # no check after the failure
    assert [int(r["step"]) for r in monitor.history] == [0, 1]
    assert float(trainer.callback_metrics["lin_probe/functional_distance_rel"]) == pytest.approx(
        monitor.history[-1]["functional_distance_rel"]
    )
    _assert_trains_as_without_monitor(tmp_path, module, max_steps=8)


def test_a_shadow_step_failure_stops_measuring_and_training_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shadows cannot take their third step: one warning says measuring stops and why, no check
    follows, and the user's training is exactly what it is without the monitor."""
    from lin_probe.monitor.core import RegimeProbe

    shadow_step = RegimeProbe.step
    calls: list[int] = []

    def third_fails(self: RegimeProbe, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("shadow optimizer state lost")
        shadow_step(self, *args, **kwargs)

    monkeypatch.setattr(RegimeProbe, "step", third_fails)
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=1, log_spaced=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, module, _, _ = _run(tmp_path, monitor=monitor, max_steps=8)
    messages = [str(w.message) for w in caught if "stops measuring" in str(w.message)]
    assert (
        len(messages) == 1
        and "could not take a step (RuntimeError: shadow optimizer state lost)" in messages[0]
    )
    assert trainer.global_step == 8 and len(calls) == 3
    assert [int(r["step"]) for r in monitor.history] == [0, 1, 2]  # the checks before the failed step
    _assert_trains_as_without_monitor(tmp_path, module, max_steps=8)


def test_overhead_share_is_logged_at_every_check(tmp_path: Path) -> None:
    """lin_probe/overhead: the monitor's measured share of the fit's wall time, in (0, 1), in TensorBoard's
    main run and in callback_metrics; and it counts the start-up (the first check's share is large)."""
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=2, log_spaced=False)
    trainer, _, _, _ = _run(tmp_path, monitor=monitor, max_steps=6)
    series = scalar_series(read_events(trainer.logger.log_dir), "lin_probe/overhead")
    assert sorted(series) == [0, 2, 4, 6]
    assert all(0.0 < v <= 1.0 for v in series.values())
    assert series[0] > 0.5  # at step 0 almost all wall time so far was the monitor's start-up
    assert 0.0 < float(trainer.callback_metrics["lin_probe/overhead"]) <= series[0]  # diluted by training
