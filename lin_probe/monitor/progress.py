"""Progress lines for long start-up work, and the point where its owner may stop it.

The NTK at init can take a minute on a large model and probe; a silent minute looks like a hang,
and one that ignores SIGTERM (Lightning's handler only sets ``trainer.received_sigterm``, which its
loops read between batches) cannot be stopped by a scheduler. The NTK paths call a
``progress(done, total)`` hook after each unit of work; :class:`StartupProgress` turns that into a
few lines with an estimate of the time left (none for work that ends within
:data:`QUIET_FOR_S`), and calls the owner's ``check_interrupt`` at every unit, which raises to
abort (Lightning's own ``SIGTERMException`` in the callback). Ctrl-C needs nothing here: its
``KeyboardInterrupt`` is not an ``Exception`` and passes every handler of the monitor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

QUIET_FOR_S: Final[float] = 5.0
"""Work that finishes within this many seconds prints nothing."""

EVERY_S: Final[float] = 15.0
"""Seconds between two progress lines."""


class StartupProgress:
    """A ``progress(done, total)`` hook for one named piece of work (module docstring)."""

    def __init__(
        self,
        what: str,
        say: Callable[[str], None],
        check_interrupt: Callable[[], None] = lambda: None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.what, self.say, self.check_interrupt, self.clock = what, say, check_interrupt, clock
        self.started = clock()
        self.last_said: float | None = None

    def __call__(self, done: int, total: int) -> None:
        self.check_interrupt()
        now = self.clock()
        elapsed = now - self.started
        if elapsed < QUIET_FOR_S or total <= 0 or done <= 0 or done >= total:
            return
        if self.last_said is not None and now - self.last_said < EVERY_S:
            return
        self.last_said = now
        left = elapsed * (total - done) / done
        self.say(
            f"lin_probe: {self.what}: {100 * done / total:.0f} % after {elapsed:.0f} s, about {left:.0f} s "
            "left (Ctrl-C or SIGTERM stops it)."
        )


__all__ = ["EVERY_S", "QUIET_FOR_S", "StartupProgress"]
