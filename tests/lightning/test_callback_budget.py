"""``LinearRegimeMonitor(max_overhead=…)`` in real fits: the plan is said, adopted and kept.

Timings decide the plan, so these tests never assume a particular plan: they read the plan the
monitor announced and check that what it did is exactly that plan (probe size, the check steps,
the NTK steps, stopping after the exit), and that explicit settings win.
"""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _lightning_setups import Regressor, TwoLayerNet, loaders, make_trainer, sphere_data
from torch import nn

from lin_probe import LinearRegimeMonitor
from lin_probe.lightning import callback as callback_module
from lin_probe.lightning.publishing import Publisher
from lin_probe.monitor import budget_keeper as budget_keeper_module
from lin_probe.monitor.budget import STOP_AFTER_EXIT, Costs
from lin_probe.monitor.budget_keeper import REPLAN_AT_STEP
from lin_probe.ntk import dense as dense_module

D, N_TRAIN, N_VAL = 16, 128, 64


def fit(
    tmp_path: Path,
    monitor: LinearRegimeMonitor,
    *,
    max_steps: int,
    width: int = 64,
    lr: float = 0.5,
    net: nn.Module | None = None,
):
    x, y = sphere_data(N_TRAIN + N_VAL, D)
    train, val = loaders(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], 16)
    trainer = make_trainer(tmp_path, [monitor], max_steps=max_steps)
    trainer.fit(Regressor(net or TwoLayerNet(D, width), lr), train, val)
    return trainer


def plan_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("lin_probe plan")]


def test_the_default_monitor_announces_its_plan_and_does_exactly_that(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = LinearRegimeMonitor(verbose=False)
    with caplog.at_level(logging.INFO):
        trainer = fit(tmp_path, monitor, max_steps=60)
    lines = plan_lines(caplog)
    assert 1 <= len(lines) <= 2  # the start's plan, and the re-plan when it changed anything
    sizes = {int(re.search(r"probe (\d+),", line).group(1)) for line in lines}  # type: ignore[union-attr]
    assert monitor.core is not None and sizes == {len(monitor.core.probe)}
    assert re.search(r"planned overhead \d+\.\d % of 60 steps$", lines[0])
    schedule = monitor.schedule  # the plan in force after the re-plan at step 8
    steps = [int(r["step"]) for r in monitor.history]
    early = [s for s in range(REPLAN_AT_STEP + 1) if s in (0, 1, 2, 4, 8)]
    later = [s for s in range(REPLAN_AT_STEP + 1, 61) if schedule.functional(s)]
    stopped = monitor.verdict is not None and monitor.verdict.state != "inside"
    # stopped after the verdict (maybe at it, before the re-plan): a prefix of the planned checks
    planned = early + later
    assert steps == (planned[: len(steps)] if stopped else planned)
    for record in monitor.history:
        step = int(record["step"])
        concluded = "exit_step" in record or "outside_from_start" in record  # the exit's own NTK
        if step > REPLAN_AT_STEP and not concluded:
            assert ("ntk_gap" in record) == schedule.ntk(step)
    overhead = float(trainer.callback_metrics["lin_probe/overhead"])
    assert 0.0 < overhead < 1.0


def test_auto_reuses_the_pilots_structured_timings_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pilot already timed the structured kernel on 4 and 8 probe examples; ``auto``'s choice for
    ``Θ_0`` extrapolates those instead of timing it again on m and 2m (only the generic one is probed)."""
    structured_sizes: list[int] = []
    original = dense_module._empirical_ntk

    def spy(model: Any, inputs: Any, method: Any, *args: Any, **kwargs: Any) -> Any:
        if method.value == "structured":
            structured_sizes.append(inputs.shape[0])
        return original(model, inputs, method, *args, **kwargs)

    monkeypatch.setattr(dense_module, "_empirical_ntk", spy)
    monitor = LinearRegimeMonitor(verbose=False)
    torch.manual_seed(0)
    fit(tmp_path, monitor, max_steps=2, net=nn.Sequential(nn.Linear(D, 64), nn.Tanh(), nn.Linear(64, 1)))
    assert monitor.core is not None
    n = len(monitor.core.probe)
    choice = monitor.core.ntk.method_choice
    assert n >= 32 and choice is not None
    assert "structured timed before on 4 and 8" in choice.reason
    # the pilot's two kernels, then Θ_0 on the probe (reused by the step-0 check); no probe of 2 or 4
    assert structured_sizes[:3] == [4, 8, n]
    m = max(2, min(n // 32, 8))  # the sizes auto's own probe would time (lin_probe.ntk.choice)
    assert not {m, 2 * m} & set(structured_sizes[2:])


@pytest.mark.parametrize(
    ("shadow_step_s", "user_stop", "after"),
    [
        (1e-12, None, STOP_AFTER_EXIT),  # they fit in the budget: the planned checks after the verdict
        (1.0, None, 0),  # they do not (a verdict the init fit explains): none
        (1.0, 2, 2),  # ... unless the user asked for them
    ],
)
def test_the_plan_stops_measuring_a_few_checks_after_the_verdict(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    shadow_step_s: float,
    user_stop: int | None,
    after: int,
) -> None:
    """A narrow net misfits the affine kernel: 'not in the linear regime from the start' at the first
    checks. Fixed pilot costs: a 1-s step, so the budget (0.05/0.95 of 200 s) holds the monitor's
    real seconds; the checks after the verdict cost their shadow steps. Where those fit, the plan
    keeps measuring for STOP_AFTER_EXIT more checks; where they do not (1 s a shadow step) it stops
    at the verdict, since the init fit explains it and later distances are from a poor proxy, and
    says so in one line; a user's stop_after_exit wins. Then the shadows stop, and the summary
    figure is drawn once (not at the verdict and again at the end)."""
    fixed = Costs(1.0, 0.0, 1e-12, 1e-12, shadow_step_s, shadow_step_s, None, figure_s=0.0)
    monkeypatch.setattr(callback_module, "measure_costs", lambda *args, **kwargs: fixed)
    monkeypatch.setattr(budget_keeper_module, "costs_from_run", lambda previous, **kwargs: previous)
    drawn: list[int] = []
    original = Publisher.figure

    def counted(self: Publisher, trainer, probe) -> None:  # type: ignore[no-untyped-def]
        drawn.append(len(probe.history))
        original(self, trainer, probe)

    monkeypatch.setattr(Publisher, "figure", counted)
    monitor = LinearRegimeMonitor(verbose=False, stop_after_exit=user_stop)
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(tmp_path, monitor, max_steps=200, width=4, lr=2.0)
    # epoch ends may draw too (their own rule); the last checks' figure is drawn once, when measuring stops
    assert drawn[-1] == len(monitor.history) and len(set(drawn)) == len(drawn)
    assert monitor.verdict is not None and monitor.verdict.state == "outside_from_start"
    concluded = next(i for i, r in enumerate(monitor.history) if "outside_from_start" in r)
    assert len(monitor.history) - 1 - concluded == after  # checks after the verdict's
    assert not monitor._active
    said = [r.getMessage() for r in caplog.records if "not fit in what is left" in r.getMessage()]
    assert len(said) == (1 if after == 0 else 0), said


def test_explicit_settings_win_and_warn_when_over_budget(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=1, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, monitor, max_steps=12)
    assert [int(r["step"]) for r in monitor.history] == list(range(13))  # every step, as asked
    assert monitor.core is not None and len(monitor.core.probe) == N_VAL
    over = [str(w.message) for w in caught if "over the budget" in str(w.message)]
    assert len(over) == 1 and f"probe {N_VAL}" in over[0] and "max_overhead=None" in over[0]


def test_no_budget_gives_the_fixed_defaults_and_no_plan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = LinearRegimeMonitor(max_overhead=None, verbose=False)
    with caplog.at_level(logging.INFO):
        fit(tmp_path, monitor, max_steps=25)
    assert plan_lines(caplog) == []
    assert monitor.core is not None and len(monitor.core.probe) == N_VAL  # 256 asked, 64 there
    assert [int(r["step"]) for r in monitor.history] == [0, 1, 2, 4, 8, 10, 16, 20]
    assert all("ntk_gap" in r for r in monitor.history if int(r["step"]) in (0, 10, 20))
    assert all(math.isfinite(r["functional_distance_rel"]) for r in monitor.history)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize(("d", "projections"), [(96, 50), (10, 2)])  # 50 = ⌈2 / (16 · 0.05²)⌉ at n = 16
def test_a_model_gets_the_exact_kernel_only_when_the_budget_affords_it(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    exact: bool,
    d: int,
    projections: int,
) -> None:
    """96 outputs per example: ``outputs="auto"`` would sketch them (50 directions on this 16-example
    probe); 10 (a classifier): the pilot times a 2-direction sketch (the exact kernel costs 5×).
    The pilot's timings are fixed here (the choice is the planner's, tested in
    tests/monitor/test_budget.py; this pins the wiring): a cheap NTK lets the plan take the exact
    kernel, a dear one keeps the sketch; the line says which and the monitor measures what it says.

    The pilot's structured timings reach ``method="auto"`` at start only for the kernel they timed:
    the pilot's sketch at its 32 examples (32 directions for 96 outputs, 2 for 10), which start
    takes again only for the classifier's sketch (50 directions at 16 examples for 96 outputs)."""
    from lin_probe.monitor import checks as checks_module

    ntk_quadratic = 1e-9 if exact else 1.0  # seconds × n²: free, or far over any budget
    factor, timed_over = d / projections, 32 if d == 96 else 2
    fixed = Costs(
        1e-2,
        0.0,
        ntk_quadratic,
        1e-9,
        1e-9,
        1e-9,
        None,
        exact_ntk_factor=factor,
        structured_ntk_s=((4, 1e-3), (8, 2e-3)),
        structured_ntk_projections=timed_over,
        figure_s=0.0,
    )
    monkeypatch.setattr(callback_module, "measure_costs", lambda *args, **kwargs: fixed)
    handed: list[Any] = []
    real_choose = checks_module.choose_method

    def spy(*args: Any, **kwargs: Any) -> Any:
        handed.append(kwargs.get("structured_seconds"))
        return real_choose(*args, **kwargs)

    monkeypatch.setattr(checks_module, "choose_method", spy)
    x, y = sphere_data(N_TRAIN + N_VAL, d, d)
    train, val = loaders(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], 16)
    monitor = LinearRegimeMonitor(n_probe=16, verbose=False)
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dear NTK is over budget, said by OverBudgetWarning
        make_trainer(tmp_path, [monitor], max_steps=6).fit(Regressor(TwoLayerNet(d, 32, d), 0.1), train, val)
    line = plan_lines(caplog)[0]
    said = "NTK over every output" if exact else "NTK over a sketch of the outputs"
    assert said in line, line
    assert monitor.core is not None and monitor.core.kernel_outputs is not None
    sketch = monitor.core.kernel_outputs.sketch
    assert (sketch is None) == exact
    assert sketch is None or sketch.projections == projections
    assert monitor.core.kernel_outputs.outputs == d
    reused = not exact and d == 10
    assert handed and handed[0] == ({4: 1e-3, 8: 2e-3} if reused else {}), handed


def test_the_figures_drawn_at_epoch_ends_and_train_end_count_as_the_monitors_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drawing is the monitor's work: left off its clock, the logged ``lin_probe/overhead`` read
    half the real cost on a small model (the figures were most of it) and the re-plan charged the
    drawing to the user's steps. Each draw here is made to take 0.2 s, more than the whole fit's
    own work otherwise, so the clock must hold at least that per draw."""
    from lin_probe.lightning import figure as figure_module

    draws: list[tuple[str, float]] = []
    real_draw = figure_module.summary_images

    def slow_draw(*args: Any, **kwargs: Any) -> Any:
        images = real_draw(*args, **kwargs)
        time.sleep(SLOW_DRAW_S)
        draws.append((monitor_hook[0], time.perf_counter()))
        return images

    monkeypatch.setattr(figure_module, "summary_images", slow_draw)
    monitor_hook = ["?"]
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, max_overhead=None, stop_after_exit=100)
    for hook in ("on_train_epoch_end", "on_train_end"):
        original = getattr(monitor, hook)

        def tagged(*args: Any, _original: Any = original, _hook: str = hook) -> Any:
            monitor_hook[0] = _hook
            try:
                return _original(*args)
            finally:
                monitor_hook[0] = "?"

        monkeypatch.setattr(monitor, hook, tagged)
    trainer = fit(tmp_path, monitor, max_steps=16)  # 8 batches an epoch: two epoch ends, then train end
    hooks = [hook for hook, _ in draws]
    assert "on_train_epoch_end" in hooks and hooks[-1] == "on_train_end"
    assert monitor.clock.own_s >= SLOW_DRAW_S * len(draws)
    # the last logged share came after the last draw, so it holds that draw too
    total = time.perf_counter() - monitor.clock.started  # type: ignore[operator]
    assert float(trainer.callback_metrics["lin_probe/overhead"]) >= SLOW_DRAW_S * len(draws) / total


SLOW_DRAW_S = 0.2


def test_a_shadow_the_budget_cannot_follow_through_the_run_stops_at_the_planned_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fixed pilot costs (the planner's choice is tested in tests/monitor/test_budget.py; this pins
    the wiring): a 10-ms step and a 1-ms shadow over 600 steps cost 10 % for the shadow alone, so
    the plan measures steps 0-256 (0.26 s of a 0.32-s budget). The monitor says so, takes its last
    check at 256, no shadow step after it, and the user's training runs on to the end."""
    fixed = Costs(1e-2, 0.0, 1e-12, 1e-12, 1e-3, 1e-3, None, figure_s=0.0)  # figures: free here
    monkeypatch.setattr(callback_module, "measure_costs", lambda *args, **kwargs: fixed)
    monkeypatch.setattr(budget_keeper_module, "costs_from_run", lambda previous, **kwargs: previous)
    # the shadows follow past any exit, as in a run that stays linear (this small net leaves early)
    monitor = LinearRegimeMonitor(verbose=False, stop_after_exit=10**6)
    shadow_steps: list[int] = []
    shadow_step = monitor._shadow_step

    def counted(trainer: Any, *args: Any, **kwargs: Any) -> None:
        shadow_steps.append(trainer.global_step)
        shadow_step(trainer, *args, **kwargs)

    monkeypatch.setattr(monitor, "_shadow_step", counted)
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = fit(tmp_path, monitor, max_steps=600)
    (line,) = plan_lines(caplog)
    assert "measures steps 0–256" in line, line
    assert [int(r["step"]) for r in monitor.history] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert shadow_steps == list(range(256))  # the steps up to the check at 256 (global_step before each)
    stop = [r.getMessage() for r in caplog.records if "as the overhead budget planned" in r.getMessage()]
    assert len(stop) == 1 and "measured steps 0–256" in stop[0] and "max_overhead=None" in stop[0]
    assert trainer.global_step == 600 and not monitor._active


def test_the_replan_times_the_users_steps_one_by_one(tmp_path: Path) -> None:
    """The re-plan's step time is the median of the steps timed between step ends (from the second
    step: the first carries the fit's one-off costs), the monitor's own time taken out."""
    monitor = LinearRegimeMonitor(verbose=False, stop_after_exit=100)
    started = time.perf_counter()
    fit(tmp_path, monitor, max_steps=REPLAN_AT_STEP + 4)
    wall = time.perf_counter() - started
    budget = monitor.budget
    assert budget is not None and budget.replanned and budget.costs is not None
    samples = budget.user_step_seconds
    assert len(samples) == REPLAN_AT_STEP + 4 - 1  # every step end after the first
    assert all(0.0 < s for s in samples) and sum(samples) < wall
    at_replan = sorted(samples[: REPLAN_AT_STEP - 1])  # steps 2..8 had ended when it re-planned
    assert budget.costs.step_s == at_replan[len(at_replan) // 2]
