"""Which optimizer steps get a check.

Checks at step 0, every ``every_n_steps`` steps and (``log_spaced``) at 1, 2, 4, 8, …: the
interesting part of the early-time dynamics happens on a logarithmic time scale, and a linear
schedule alone would miss it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lin_probe._validation import check_int


def is_check_step(step: int, every_n_steps: int, log_spaced: bool) -> bool:
    """Whether a functional check happens after ``step`` optimizer steps."""
    if step == 0:
        return True
    if every_n_steps > 0 and step % every_n_steps == 0:
        return True
    return log_spaced and step & (step - 1) == 0


def is_ntk_step(step: int, ntk_every_n_steps: int) -> bool:
    """Whether the (costlier) NTK check happens after ``step`` steps; 0 disables it after step 0."""
    return step == 0 or (ntk_every_n_steps > 0 and step % ntk_every_n_steps == 0)


@dataclass(frozen=True)
class CheckSchedule:
    """A run's check schedule: functional checks (and, less often, NTK checks) after these steps.

    ``ntk_every_n_steps=None`` means ``every_n_steps``; 0 means the NTK only at step 0.
    """

    every_n_steps: int = 10
    ntk_every_n_steps: int | None = None
    log_spaced: bool = True

    def __post_init__(self) -> None:
        check_int("every_n_steps", self.every_n_steps, minimum=1)
        if self.ntk_every_n_steps is not None:
            check_int("ntk_every_n_steps", self.ntk_every_n_steps, minimum=0)

    def functional(self, step: int) -> bool:
        return is_check_step(step, self.every_n_steps, self.log_spaced)

    def ntk(self, step: int) -> bool:
        interval = self.every_n_steps if self.ntk_every_n_steps is None else self.ntk_every_n_steps
        return is_ntk_step(step, interval)
