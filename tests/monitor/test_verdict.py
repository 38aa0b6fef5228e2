"""The verdict and the diagnosis on constructed cases whose cause is known, from a plain loop.

float64 throughout: at a learning rate of 1e-7 a float32 network moves by less than its outputs'
round-off, and the relative distance would measure rounding, not the regime.

- *Good fit*: the paper's two-layer ReLU net, wide (4096) on the sphere in d = 128; its centred fit
  error is ~0.06, below the 0.1 tolerance, so its shadow stays inside at any learning rate here.
- *Poor fit*: the same net at width 8 (centred error ~0.7): outside from the first check at any
  learning rate — the first step's relative distance is the init misfit, not training.
- *Memorisation*: the probe is the training set itself, where the network's c·I kernel term acts and
  the paper's shadow has none; the memorizing shadow has it.
- *Kernel moved*: a narrower net at a learning rate that drives it out of its lazy regime, so its
  own linearisation departs too.
- *Never input-linear while lazy*: width 1024 in d = 16 (centred error 0.11 > 0.1) follows its own
  linearisation within 1 % while the paper's shadow departs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _lightning_setups import TwoLayerNet, sphere_data

from lin_probe import RegimeProbe
from lin_probe.monitor.core import MonitorConfig


def _run(
    d: int,
    width: int,
    lr: float,
    *,
    steps: int = 16,
    optimizer: str = "sgd",
    probe_on_training_set: bool = False,
    **config: object,
) -> RegimeProbe:
    x, y = sphere_data(64 + 32, d)
    x, y = x.double(), y.double()
    train, probe = (x[:64], y[:64]), (x[64:], y[64:])
    if probe_on_training_set:
        probe = train
    torch.manual_seed(0)
    model = TwoLayerNet(d, width).double()
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(model.parameters(), lr=lr)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=lr)
    )
    monitor = RegimeProbe.start(
        model, probe, opt, MonitorConfig(tolerance=0.1, patience=3, **config), train_size=64
    )
    monitor.check(model, 0)
    for step in range(1, steps + 1):
        loss = F.mse_loss(model(train[0]), train[1])
        opt.zero_grad()
        loss.backward()
        monitor.accumulate(*train)
        monitor.step(opt.param_groups[0]["lr"])
        opt.step()
        if step & (step - 1) == 0 or step % 8 == 0:  # log-spaced, then every 8 steps
            monitor.check(model, step, ntk=step % 8 == 0)
    return monitor


def _rel(monitor: RegimeProbe, key: str = "functional_distance_rel") -> list[float]:
    return [record[key] for record in monitor.history if record["step"] > 0]


@pytest.mark.parametrize("lr", [1e-7, 1e-1])
def test_a_good_fit_shows_no_exit_at_any_learning_rate(lr: float) -> None:
    monitor = _run(128, 4096, lr)
    assert monitor.kernel.rel_error_centered < 0.1
    assert monitor.verdict.state == "inside" and monitor.exit_step() is None
    assert max(_rel(monitor)) < 0.1
    assert all(record["in_linear_regime"] == 1.0 for record in monitor.history)


@pytest.mark.parametrize("lr", [1e-7, 1e-1])
def test_a_poor_fit_is_not_in_the_regime_from_the_start_at_any_learning_rate(lr: float) -> None:
    monitor = _run(64, 8, lr)
    assert monitor.kernel.rel_error_centered > 0.3
    assert monitor.verdict.state == "outside_from_start"
    assert monitor.exit_step() is None, "not an exit: it was never inside"
    assert not any("exit_step" in record for record in monitor.history)
    assert sum("outside_from_start" in record for record in monitor.history) == 1
    assert [record["in_linear_regime"] for record in monitor.history][-1] == 0.0
    # the first step's distance is the init misfit, the same at both rates (to 1 % here)
    assert _rel(monitor)[0] == pytest.approx(0.8787, rel=0.01)
    assert monitor.diagnosis is not None and monitor.diagnosis.cause == "never_input_linear"
    assert monitor.diagnosis.from_start


@pytest.mark.parametrize(("kernel_when_explained", "ntk_off"), [(True, False), (False, False), (True, True)])
def test_a_verdict_the_init_fit_explains_takes_the_exit_kernel_only_when_asked(
    kernel_when_explained: bool, ntk_off: bool
) -> None:
    """The poor fit's verdict at step 1 (no NTK planned there): its cause is the init fit's either way,
    and the exit's NTK (Θ_0's cost again) is taken only when the caller can afford it and the NTK
    checks have not been switched off by an earlier failure."""
    x, y = sphere_data(64 + 32, 64)
    x, y = x.double(), y.double()
    torch.manual_seed(0)
    model = TwoLayerNet(64, 8).double()
    opt = torch.optim.SGD(model.parameters(), lr=1e-7)
    monitor = RegimeProbe.start(model, (x[64:], y[64:]), opt, MonitorConfig(tolerance=0.1, patience=1))
    monitor.ntk_off = ntk_off
    for step in (0, 1):
        if step:
            F.mse_loss(model(x[:64]), y[:64]).backward()
            monitor.accumulate(x[:64], y[:64])
            monitor.step(0.1)
            opt.step()
        record = monitor.measure(model, step, ntk=step == 0).record
        monitor.observe(record)
        monitor.conclude(model, record, kernel_when_explained=kernel_when_explained)
    assert monitor.verdict.state == "outside_from_start"
    assert monitor.diagnosis is not None and monitor.diagnosis.cause == "never_input_linear"
    assert ("ntk_drift" in monitor.history[-1]) == (kernel_when_explained and not ntk_off)


def test_the_memorizing_shadow_close_on_training_points_diagnoses_memorisation() -> None:
    monitor = _run(64, 4096, 2.0, probe_on_training_set=True, memorization=True)
    assert monitor.kernel.rel_error_centered < 0.1, "the affine kernel itself fits: not a misfit"
    assert monitor.verdict.state == "left"
    assert max(_rel(monitor, "memo/functional_distance_rel")) < 0.1
    assert monitor.diagnosis is not None and monitor.diagnosis.cause == "memorisation"


def test_a_net_driven_out_of_its_lazy_regime_diagnoses_a_moved_kernel() -> None:
    monitor = _run(16, 1024, 6.0, linearized=True)
    assert monitor.verdict.state == "left" and monitor.exit_step() == 2, "inside at step 1, then out"
    diagnosis = monitor.diagnosis
    assert diagnosis is not None and diagnosis.cause == "kernel_moved"
    assert diagnosis.linearized_distance_rel is not None and diagnosis.linearized_distance_rel > 0.1
    assert diagnosis.ntk_drift > 0.0, "the NTK is measured at the confirming check for the diagnosis"


def test_a_lazy_net_whose_kernel_is_not_input_linear_is_diagnosed_so() -> None:
    monitor = _run(16, 1024, 4.0, linearized=True)
    assert 0.1 < monitor.kernel.rel_error_centered < 0.3
    assert monitor.verdict.state == "left"
    diagnosis = monitor.diagnosis
    assert diagnosis is not None and diagnosis.cause == "never_input_linear" and not diagnosis.from_start
    assert max(_rel(monitor, "linearized/functional_distance_rel")) < 0.05
    assert diagnosis.ntk_drift < 0.1


def test_under_adam_the_verdict_is_the_linearised_shadows(recwarn: pytest.WarningsRecorder) -> None:
    monitor = _run(16, 1024, 0.05, optimizer="adam", steps=32, linearized=True)
    assert monitor.verdict.run == "linearized/" and not monitor.verdict.indicative
    # the paper's shadow means little under Adam: far off from step 1, while the Taylor model tracks
    assert _rel(monitor)[0] > 0.5 and _rel(monitor, "linearized/functional_distance_rel")[0] < 0.05
    in_regime = [record["in_linear_regime"] for record in monitor.history]
    linearized_exit = monitor.exit_step("linearized/")
    assert in_regime[-1] == (0.0 if linearized_exit is not None else 1.0)


def test_under_adam_without_the_linearised_shadow_the_verdict_is_indicative_and_says_how_to_fix_it() -> None:
    with pytest.warns(UserWarning, match="pass linearized=True") as caught:
        monitor = _run(16, 1024, 0.05, optimizer="adam", steps=4)
    assert sum("linearized=True" in str(w.message) for w in caught) == 1
    assert monitor.verdict.run == "" and monitor.verdict.indicative
    assert "indicative only" in monitor.verdict.describe()


def test_a_misfit_net_that_also_leaves_its_own_linearisation_has_left_not_never_been_inside() -> None:
    """Near divergence a net whose affine kernel misfits (centred 0.15) departs from its Taylor model too
    by the confirming check: the network moved, so this is an exit (at step 1), caused by the kernel."""
    monitor = _run(16, 256, 8.0, steps=4, linearized=True)
    assert monitor.kernel.rel_error_centered > 0.1
    assert monitor.verdict.state == "left" and monitor.exit_step() == 1
    assert monitor.diagnosis is not None and monitor.diagnosis.cause == "kernel_moved"
    same_fit_small_lr = _run(16, 256, 1e-3, steps=4, linearized=True)
    assert same_fit_small_lr.verdict.state == "outside_from_start"
