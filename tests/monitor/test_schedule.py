"""The check schedule against a brute-force enumeration of its rule.

Rule: a functional check at step 0, at every multiple of ``every_n_steps`` and, with
``log_spaced``, at every power of two; an NTK check at step 0 and every multiple of
``ntk_every_n_steps``, where 0 means step 0 only.
"""

from __future__ import annotations

import pytest

from lin_probe.monitor.schedule import CheckSchedule, is_check_step, is_ntk_step

HORIZON = 1100  # past 2^10, so several powers of two and many multiples are enumerated


def _expected_checks(every_n_steps: int, log_spaced: bool) -> set[int]:
    steps = {0, *range(0, HORIZON, every_n_steps)}
    if log_spaced:
        steps |= {2**j for j in range(HORIZON.bit_length()) if 2**j < HORIZON}
    return steps


@pytest.mark.parametrize("every_n_steps", [1, 3, 5, 10, 64, 1000])
@pytest.mark.parametrize("log_spaced", [False, True])
def test_check_steps_match_enumeration(every_n_steps: int, log_spaced: bool) -> None:
    actual = {step for step in range(HORIZON) if is_check_step(step, every_n_steps, log_spaced)}
    assert actual == _expected_checks(every_n_steps, log_spaced)


def test_log_spacing_adds_exactly_the_powers_of_two() -> None:
    linear = {s for s in range(HORIZON) if is_check_step(s, 10, False)}
    logged = {s for s in range(HORIZON) if is_check_step(s, 10, True)}
    assert logged - linear == {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024} - linear
    assert 3 not in logged and 6 not in logged and 12 not in logged  # not powers of two, not multiples of 10


@pytest.mark.parametrize("ntk_every_n_steps", [1, 2, 7, 10, 500])
def test_ntk_steps_are_zero_and_multiples(ntk_every_n_steps: int) -> None:
    actual = {step for step in range(HORIZON) if is_ntk_step(step, ntk_every_n_steps)}
    assert actual == set(range(0, HORIZON, ntk_every_n_steps))


def test_ntk_every_zero_means_only_step_zero() -> None:
    assert {step for step in range(HORIZON) if is_ntk_step(step, 0)} == {0}


def test_check_schedule_object_follows_the_rule_and_validates() -> None:
    schedule = CheckSchedule(every_n_steps=10, ntk_every_n_steps=None, log_spaced=True)
    assert [s for s in range(41) if schedule.functional(s)] == [0, 1, 2, 4, 8, 10, 16, 20, 30, 32, 40]
    assert [s for s in range(41) if schedule.ntk(s)] == [0, 10, 20, 30, 40]  # None: every_n_steps
    only_init = CheckSchedule(every_n_steps=5, ntk_every_n_steps=0, log_spaced=False)
    assert [s for s in range(21) if only_init.ntk(s)] == [0]
    with pytest.raises(ValueError, match="every_n_steps"):
        CheckSchedule(every_n_steps=0, log_spaced=False)  # no check after step 0 at all
    with pytest.raises(TypeError, match="ntk_every_n_steps"):
        CheckSchedule(ntk_every_n_steps=1.5)  # type: ignore[arg-type]


def test_log_only_schedule_checks_at_powers_of_two_and_ntk_up_to_its_limit() -> None:
    """A budgeted plan: functional checks at 0, 1, 2, 4, … only; NTK at the log steps up to 16."""
    schedule = CheckSchedule(every_n_steps=0, ntk_every_n_steps=0, log_spaced=True, ntk_log_until=16)
    assert [s for s in range(100) if schedule.functional(s)] == [0, 1, 2, 4, 8, 16, 32, 64]
    assert [s for s in range(100) if schedule.ntk(s)] == [0, 1, 2, 4, 8, 16]


@pytest.mark.parametrize(
    ("every", "ntk_every", "log_spaced", "log_until"),
    [(10, None, True, None), (0, 0, True, 64), (7, 21, True, 8), (5, 0, False, None), (3, 6, True, 1000)],
)
def test_count_equals_the_listed_steps(
    every: int, ntk_every: int | None, log_spaced: bool, log_until: int | None
) -> None:
    """``count`` (used by the budget) against listing every step of the horizon."""
    schedule = CheckSchedule(every, ntk_every, log_spaced, log_until)
    for horizon in (0, 1, 7, 64, 500):
        listed = [s for s in range(horizon + 1) if schedule.functional(s)]
        ntk = [s for s in range(horizon + 1) if schedule.ntk(s)]
        assert schedule.count(horizon) == (len(listed), len(ntk))


def test_ntk_steps_text_names_the_log_steps_and_the_interval() -> None:
    assert CheckSchedule(0, 0, True, 512).ntk_steps_text(2000) == "0, 1, 2, 4, …, 512"
    assert CheckSchedule(100, 1000, True, 4).ntk_steps_text(5000) == "0, 1, 2, 4 and every 1,000"
    assert CheckSchedule(10, 0, True, None).ntk_steps_text(50) == "0"


@pytest.mark.parametrize(
    "schedule",
    [
        CheckSchedule(0, 0, True),
        CheckSchedule(10, 0, True),
        CheckSchedule(7, 0, False),
        CheckSchedule(64, 0, True),
    ],
)
def test_next_functional_is_the_first_check_after_the_step(schedule: CheckSchedule) -> None:
    checks = [s for s in range(2 * HORIZON + 2) if schedule.functional(s)]  # the rule, step by step
    for step in range(HORIZON):
        assert schedule.next_functional(step) == next(s for s in checks if s > step), step
