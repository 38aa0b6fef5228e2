"""``StartupProgress``: quiet for short work, a few lines with an estimate for long work, interruptible."""

from __future__ import annotations

import pytest

from lin_probe.monitor.progress import EVERY_S, QUIET_FOR_S, StartupProgress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_short_work_says_nothing() -> None:
    clock, lines = Clock(), []
    progress = StartupProgress("NTK at init", lines.append, clock=clock)
    for done in range(11):
        clock.now += (QUIET_FOR_S - 0.5) / 10
        progress(done, 10)
    assert lines == []


def test_long_work_says_its_share_and_a_linear_estimate_every_so_often() -> None:
    clock, lines = Clock(), []
    progress = StartupProgress("NTK at init on 256 probe examples", lines.append, clock=clock)
    progress(0, 100)
    for done in range(1, 101):
        clock.now += 1.0  # one second per unit: after k units, 100 − k seconds are left
        progress(done, 100)
    assert lines[0] == (
        "lin_probe: NTK at init on 256 probe examples: 5 % after 5 s, about 95 s left (Ctrl-C or SIGTERM "
        "stops it)."
    )
    assert len(lines) == 1 + int((99 - QUIET_FOR_S) // EVERY_S)  # never at 100 %: the work is done
    assert "20 % after 20 s, about 80 s left" in lines[1]


def test_the_owners_interrupt_check_runs_at_every_unit_and_its_exception_propagates() -> None:
    calls: list[int] = []

    class Stop(SystemExit):
        pass

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    progress = StartupProgress("NTK", lambda line: None, check)
    progress(0, 10)
    progress(1, 10)
    with pytest.raises(Stop):
        progress(2, 10)
