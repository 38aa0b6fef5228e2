"""When did the network leave the linear regime?

The rule: the exit step is the first step of the first run of ``patience`` consecutive
checks whose ``functional_distance_rel`` exceeds ``tolerance``. Requiring a run, not a single check,
keeps one noisy mini-batch from being reported as a regime change. Once found the exit step never
moves, and the whole state is a small dict so it survives checkpoint/resume.
"""

from __future__ import annotations

import math
from typing import Any


class RegimeTracker:
    """Streaming detector of the exit from the linear regime.

    Args:
        tolerance: a check counts as "outside" when ``functional_distance_rel > tolerance``.
        patience: how many consecutive outside checks confirm the exit.
    """

    def __init__(self, tolerance: float, patience: int) -> None:
        validate_tolerance(tolerance)
        validate_patience(patience)
        self.tolerance = float(tolerance)
        self.patience = int(patience)
        self.exit_step: int | None = None
        self.streak = 0
        self.streak_start: int | None = None
        self.first_step: int | None = None  # the first check after init that carried evidence

    @property
    def outside_from_first_check(self) -> bool:
        """Whether the exit's run of outside checks began at the first check after init: the shadow
        was never seen inside (see :mod:`lin_probe.monitor.diagnosis` for what that means)."""
        return self.exit_step is not None and self.exit_step == self.first_step

    @property
    def exited(self) -> bool:
        return self.exit_step is not None

    def update(self, step: int, value: float) -> bool:
        """Feed one check; return True exactly once, at the check that confirms the exit.

        NaN values (the measurement failed) neither extend nor break a run: they carry no evidence.
        """
        if self.exited or math.isnan(value):
            return False
        if self.first_step is None and step > 0:
            self.first_step = step
        if value > self.tolerance:
            if self.streak == 0:
                self.streak_start = step
            self.streak += 1
        else:
            self.streak = 0
            self.streak_start = None
        if self.streak >= self.patience:
            self.exit_step = self.streak_start
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "patience": self.patience,
            "exit_step": self.exit_step,
            "streak": self.streak,
            "streak_start": self.streak_start,
            "first_step": self.first_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved run; refuse one saved under another rule (its streak means something else)."""
        for name in ("tolerance", "patience"):
            saved = state.get(name, getattr(self, name))
            if saved != getattr(self, name):
                raise ValueError(
                    f"This RegimeTracker has {name}={getattr(self, name)} but the state was saved with "
                    f"{name}={saved}; construct it with the saved values to resume, or start afresh."
                )
        self.exit_step = state.get("exit_step")
        self.streak = int(state.get("streak", 0))
        self.streak_start = state.get("streak_start")
        self.first_step = state.get("first_step")


def validate_tolerance(tolerance: float) -> None:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance):
        raise TypeError(f"`tolerance` must be a finite number, got {tolerance!r}.")
    if tolerance <= 0:
        raise ValueError(
            f"`tolerance` must be > 0 (a relative functional distance, e.g. 0.1), got {tolerance}."
        )


def validate_patience(patience: int) -> None:
    if isinstance(patience, bool) or not isinstance(patience, int):
        raise TypeError(f"`patience` must be an int >= 1, got {patience!r}.")
    if patience < 1:
        raise ValueError(f"`patience` must be >= 1 (consecutive checks above tolerance), got {patience}.")
