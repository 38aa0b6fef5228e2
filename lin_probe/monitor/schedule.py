"""Which optimizer steps get a check.

Checks at step 0, every ``every_n_steps`` steps and (``log_spaced``) at 1, 2, 4, 8, …: the
interesting part of the early-time dynamics happens on a logarithmic time scale, and a linear
schedule alone would miss it.
"""

from __future__ import annotations


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
