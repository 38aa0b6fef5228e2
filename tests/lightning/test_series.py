"""Per-series runs: which run draws which point, and the regime flag written once decided."""

from __future__ import annotations

import math

import pytest

from lin_probe.lightning.series import RegimeTimeline, check_points
from lin_probe.monitor.regime import RegimeTracker


def test_check_points_put_each_value_in_its_series_run() -> None:
    record = {
        "step": 8, "loss_network": 0.5, "loss_linear": 0.6, "memo/loss_linear": 0.55,
        "functional_distance": 0.01, "functional_distance_rel": 0.02, "memo/functional_distance_rel": 0.03,
        "ntk_gap": 0.2, "ntk_drift": 0.1, "accuracy_network": 0.9, "in_linear_regime": 1.0,
    }  # fmt: skip
    points = {(run, chart): (step, value) for run, chart, step, value in check_points(record, 0.1)}
    assert points == {
        ("network", "loss"): (8, 0.5),
        ("linear", "loss"): (8, 0.6),
        ("memorizing", "loss"): (8, 0.55),
        ("linear", "functional_distance"): (8, 0.01),
        ("linear", "functional_distance_rel"): (8, 0.02),
        ("memorizing", "functional_distance_rel"): (8, 0.03),
        ("ntk_gap", "ntk"): (8, 0.2),
        ("ntk_drift", "ntk"): (8, 0.1),
        ("network", "accuracy"): (8, 0.9),
        ("tolerance", "functional_distance_rel"): (8, 0.1),
    }  # the regime flag is not a per-check point: RegimeTimeline writes it once decided


def _replay(values: list[float], steps: list[int], *, tolerance: float, patience: int, final: bool = False):
    """Feed a tracker and a timeline check by check, as the publisher does; all points in write order."""
    tracker, timeline = RegimeTracker(tolerance, patience), RegimeTimeline()
    history: list[dict[str, float]] = []
    written = []
    for step, value in zip(steps, values, strict=True):
        tracker.update(step, value)
        history.append({"step": step, "functional_distance_rel": value})
        undecided = tracker.streak_start if tracker.streak else None
        written += timeline.decided(history, exit_step=tracker.exit_step, undecided_from=undecided)
    if final:
        undecided = tracker.streak_start if tracker.streak else None
        written += timeline.decided(
            history, exit_step=tracker.exit_step, undecided_from=undecided, final=True
        )
    return tracker, written


def test_exit_is_marked_at_the_exit_step_not_the_confirmation() -> None:
    steps = [0, 1, 2, 4, 8, 16, 32]
    values = [0.0, 0.05, 0.2, 0.3, 0.4, 0.5, 0.6]  # outside from step 2; confirmed at step 8 (patience 3)
    tracker, written = _replay(values, steps, tolerance=0.1, patience=3)
    assert tracker.exit_step == 2
    regime = [(run, step, value) for run, chart, step, value in written if chart == "in_linear_regime"]
    assert regime == [("linear", 0, 1.0), ("linear", 1, 1.0)] + [
        ("since_exit", s, 0.0) for s in (2, 4, 8, 16, 32)
    ]
    exit_rel = [(step, value) for run, chart, step, value in written if chart == "functional_distance_rel"]
    assert exit_rel == list(zip(steps[2:], values[2:], strict=True))  # the exit run starts AT the exit step
    # each run's flag is constant, so TensorBoard's smoothing leaves it a step function
    assert {value for run, _, value in regime if run == "linear"} == {1.0}
    assert {value for run, _, value in regime if run == "since_exit"} == {0.0}


def test_a_transient_excursion_is_written_inside_once_it_ends() -> None:
    steps = [0, 10, 20, 30, 40]
    values = [0.0, 0.2, 0.3, 0.05, 0.04]  # two outside checks, patience 3: no exit
    tracker, written = _replay(values, steps, tolerance=0.1, patience=3)
    assert tracker.exit_step is None
    assert [(run, step) for run, _, step, _ in written] == [("linear", s) for s in steps]
    steps_in_order = [step for _, _, step, _ in written]
    assert steps_in_order == sorted(steps_in_order)  # each run receives its steps in order


def test_undecided_checks_wait_and_are_inside_at_the_end() -> None:
    steps, values = [0, 10, 20], [0.0, 0.2, 0.3]
    _, pending = _replay(values, steps, tolerance=0.1, patience=3)
    assert [step for _, _, step, _ in pending] == [0]  # 10 and 20 may still be the start of an exit
    _, final = _replay(values, steps, tolerance=0.1, patience=3, final=True)
    assert [(run, step) for run, _, step, _ in final] == [("linear", 0), ("linear", 10), ("linear", 20)]


def test_nan_checks_neither_extend_nor_decide_and_are_not_plotted_on_the_exit_run() -> None:
    steps = [0, 1, 2, 3, 4]
    values = [0.0, 0.5, math.nan, 0.5, 0.5]  # NaN carries no evidence: the exit still starts at 1
    tracker, written = _replay(values, steps, tolerance=0.1, patience=3)
    assert tracker.exit_step == 1
    exit_rel = [step for run, chart, step, _ in written if chart == "functional_distance_rel"]
    assert exit_rel == [1, 3, 4]
    assert [
        step for run, chart, step, _ in written if run == "since_exit" and chart == "in_linear_regime"
    ] == [
        1,
        2,
        3,
        4,
    ]


@pytest.mark.parametrize("patience", [1, 2])
def test_nothing_is_written_twice(patience: int) -> None:
    steps = list(range(10))
    values = [0.0, 0.2, 0.0, 0.2, 0.2, 0.2, 0.0, 0.3, 0.3, 0.3]
    _, written = _replay(values, steps, tolerance=0.1, patience=patience, final=True)
    keys = [(run, chart, step) for run, chart, step, _ in written]
    assert len(keys) == len(set(keys))
    assert sorted({step for _, chart, step, _ in written if chart == "in_linear_regime"}) == steps
