"""What the monitor costs the run it watches: its own wall time as a share of the run's.

A monitoring callback that costs more than the training gets switched off, so the cost is measured,
not guessed, and shown next to what is measured (``lin_probe/overhead``). The clock starts when the
monitor first works on a fit (train start) and counts, in :meth:`OverheadClock.measuring` blocks,
the time the monitor's own hooks take (start-up fit, shadow steps, checks, the figures drawn at
epoch ends and at train end); the share is that over the wall time since the start. On an
accelerator, work queued asynchronously by a block may finish after it, so the share is a lower
bound there (no synchronisation is forced: that would stall the user's steps).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class OverheadClock:
    """Wall time since :meth:`start` and the part of it spent inside :meth:`measuring`."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.own_s = 0.0
        self._inside = False
        self._begin = 0.0

    def start(self) -> None:
        self.started, self.own_s = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Count the block's wall time as the monitor's own (nested blocks count once)."""
        if self.started is None:
            self.start()
        if self._inside:
            yield
            return
        self._inside, self._begin = True, time.perf_counter()
        try:
            yield
        finally:
            self.own_s += time.perf_counter() - self._begin
            self._inside = False

    def share(self) -> float:
        """The monitor's share of the wall time so far, the block running now included (0 before anything ran)."""
        if self.started is None:
            return 0.0
        now = time.perf_counter()
        own = self.own_s + (now - self._begin if self._inside else 0.0)
        total = now - self.started
        return min(1.0, own / total) if total > 0 else 0.0


__all__ = ["OverheadClock"]
