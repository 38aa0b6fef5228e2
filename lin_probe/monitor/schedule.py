"""Which optimizer steps get a check.

Checks at step 0, every ``every_n_steps`` steps and (``log_spaced``) at 1, 2, 4, 8, …: the
interesting part of the early-time dynamics happens on a logarithmic time scale, and a linear
schedule alone would miss it. NTK checks (the costly part) follow their own interval and, in a
budgeted plan (:mod:`lin_probe.monitor.budget`), the log-spaced steps up to ``ntk_log_until``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lin_probe._validation import check_int


def is_power_of_two(step: int) -> bool:
    return step > 0 and step & (step - 1) == 0


def is_check_step(step: int, every_n_steps: int, log_spaced: bool) -> bool:
    """Whether a functional check happens after ``step`` optimizer steps (``every_n_steps=0``: no linear ones)."""
    if step == 0:
        return True
    if every_n_steps > 0 and step % every_n_steps == 0:
        return True
    return log_spaced and is_power_of_two(step)


def is_ntk_step(step: int, ntk_every_n_steps: int, log_until: int | None = None) -> bool:
    """Whether the (costlier) NTK check happens after ``step`` steps; 0 disables the linear ones.

    ``log_until``: also at the log-spaced steps 1, 2, 4, … up to it (``None``: none of them).
    """
    if step == 0 or (ntk_every_n_steps > 0 and step % ntk_every_n_steps == 0):
        return True
    return log_until is not None and step <= log_until and is_power_of_two(step)


@dataclass(frozen=True)
class CheckSchedule:
    """A run's check schedule: functional checks (and, less often, NTK checks) after these steps.

    ``ntk_every_n_steps=None`` means ``every_n_steps``; 0 means no linear NTK checks (step 0 only,
    unless ``ntk_log_until`` adds the log-spaced ones). ``every_n_steps=0`` means log-spaced
    functional checks only (it needs ``log_spaced``). NTK checks happen only at functional checks.
    """

    every_n_steps: int = 10
    ntk_every_n_steps: int | None = None
    log_spaced: bool = True
    ntk_log_until: int | None = None

    def __post_init__(self) -> None:
        check_int("every_n_steps", self.every_n_steps, minimum=0 if self.log_spaced else 1)
        if self.ntk_every_n_steps is not None:
            check_int("ntk_every_n_steps", self.ntk_every_n_steps, minimum=0)
        if self.ntk_log_until is not None:
            check_int("ntk_log_until", self.ntk_log_until, minimum=0)

    @property
    def ntk_interval(self) -> int:
        return self.every_n_steps if self.ntk_every_n_steps is None else self.ntk_every_n_steps

    def functional(self, step: int) -> bool:
        return is_check_step(step, self.every_n_steps, self.log_spaced)

    def ntk(self, step: int) -> bool:
        log_until = self.ntk_log_until if self.log_spaced else None
        return self.functional(step) and is_ntk_step(step, self.ntk_interval, log_until)

    def next_functional(self, step: int) -> int:
        """The first functional check after ``step`` (the next power of two or multiple of the interval)."""
        candidates = [(step // self.every_n_steps + 1) * self.every_n_steps] if self.every_n_steps > 0 else []
        if self.log_spaced:
            candidates.append(1 << step.bit_length() if step > 0 else 1)
        return min(candidates)

    def count(self, horizon: int) -> tuple[int, int]:
        """Functional and NTK checks in steps ``0 … horizon`` (step 0 included), without listing them."""
        functional = 1 + _multiples(self.every_n_steps, horizon)
        ntk = 1 + _multiples(self.ntk_interval, horizon)
        if self.log_spaced:
            for power in _powers_of_two(horizon):
                linear = self.every_n_steps > 0 and power % self.every_n_steps == 0
                functional += not linear
                ntk_linear = self.ntk_interval > 0 and power % self.ntk_interval == 0
                in_log = self.ntk_log_until is not None and power <= self.ntk_log_until
                ntk += in_log and not ntk_linear
        return functional, ntk

    def ntk_steps_text(self, horizon: int) -> str:
        """The NTK check steps as a reader wants them: ``"0, 1, 2, 4, …, 512 and every 1,000"``."""
        log = [0, *(p for p in _powers_of_two(horizon) if self.ntk(p))] if self.log_spaced else [0]
        shown = ", ".join(str(s) for s in log) if len(log) <= 6 else f"0, 1, 2, 4, …, {log[-1]:,}"
        interval = self.ntk_interval
        if 0 < interval <= horizon:
            return f"{shown} and every {interval:,}"
        return shown


def _multiples(interval: int, horizon: int) -> int:
    return horizon // interval if interval > 0 else 0


def _powers_of_two(horizon: int) -> list[int]:
    return [1 << k for k in range(max(horizon, 0).bit_length()) if 1 << k <= horizon]
