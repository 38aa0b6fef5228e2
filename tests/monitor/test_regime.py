"""The exit rule, checked against a brute-force reading of its definition."""

from __future__ import annotations

import math
import random

import pytest

from lin_probe.monitor.regime import RegimeTracker


def brute_force_exit(steps: list[int], values: list[float], tol: float, patience: int) -> int | None:
    """First step of the first window of `patience` consecutive (non-NaN) checks all above tol."""
    kept = [(s, v) for s, v in zip(steps, values, strict=True) if not math.isnan(v)]
    for i in range(len(kept) - patience + 1):
        window = kept[i : i + patience]
        if all(v > tol for _, v in window):
            return window[0][0]
    return None


@pytest.mark.parametrize("seed", range(200))
def test_exit_step_matches_definition(seed: int) -> None:
    rng = random.Random(seed)
    patience = rng.randint(1, 4)
    tol = 0.1
    steps = sorted(rng.sample(range(0, 500), 30))
    values = [rng.choice([0.05, 0.2, 0.1, float("nan"), 0.11, 0.0]) for _ in steps]
    tracker = RegimeTracker(tol, patience)
    confirmations = [s for s, v in zip(steps, values, strict=True) if tracker.update(s, v)]
    expected = brute_force_exit(steps, values, tol, patience)
    assert tracker.exit_step == expected
    assert len(confirmations) == (0 if expected is None else 1)


def test_exit_never_moves_and_equal_to_tolerance_is_inside() -> None:
    tracker = RegimeTracker(0.1, 2)
    assert not tracker.update(0, 0.1)  # equal is inside
    assert not tracker.update(10, 0.2)
    assert tracker.update(20, 0.3)
    assert tracker.exit_step == 10
    for step, value in [(30, 0.0), (40, 0.5), (50, 0.5), (60, 0.5)]:
        assert not tracker.update(step, value)
    assert tracker.exit_step == 10


def test_state_round_trip_mid_streak() -> None:
    full = RegimeTracker(0.1, 3)
    resumed = RegimeTracker(0.1, 3)
    stream = [(0, 0.0), (1, 0.2), (2, 0.3), (4, 0.4), (8, 0.5)]
    for step, value in stream[:3]:
        full.update(step, value)
        resumed.update(step, value)
    fresh = RegimeTracker(0.1, 3)
    fresh.load_state_dict(resumed.state_dict())
    for step, value in stream[3:]:
        full.update(step, value)
        fresh.update(step, value)
    assert fresh.exit_step == full.exit_step == 1


@pytest.mark.parametrize(
    ("tol", "patience", "exc"),
    [
        (0.0, 1, ValueError),
        (-1.0, 1, ValueError),
        (float("nan"), 1, TypeError),
        (0.1, 0, ValueError),
        (0.1, 1.5, TypeError),
        ("0.1", 1, TypeError),
    ],
)
def test_bad_arguments(tol: float, patience: int, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=r"tolerance|patience"):
        RegimeTracker(tol, patience)


def test_load_refuses_a_state_saved_under_another_rule() -> None:
    """A streak counted with tolerance 0.2 means nothing to a tracker with tolerance 0.1."""
    saved = RegimeTracker(0.2, 3)
    for step, value in enumerate([0.15, 0.3, 0.3]):
        saved.update(step, value)
    state = saved.state_dict()
    with pytest.raises(ValueError, match=r"tolerance=0\.2"):
        RegimeTracker(0.1, 3).load_state_dict(state)
    with pytest.raises(ValueError, match="patience=3"):
        RegimeTracker(0.2, 2).load_state_dict(state)
    same = RegimeTracker(0.2, 3)
    same.load_state_dict(state)
    assert (same.streak, same.streak_start, same.exit_step) == (2, 1, None)
    assert same.update(3, 0.5) and same.exit_step == 1


def test_load_fills_missing_keys_with_a_fresh_trackers_values() -> None:
    tracker = RegimeTracker(0.1, 2)
    tracker.load_state_dict({"exit_step": 7})
    assert (tracker.exit_step, tracker.streak, tracker.streak_start) == (7, 0, None)
