"""One TensorBoard run per series, so the network and its linear model are told apart by colour.

TensorBoard colours a chart's lines by *run*, not by tag: two tags of one run drawn on one chart
share a colour. So, as ``SummaryWriter.add_scalars`` does, every series lives in its own run, a
sub-directory of the logger's run (``<log_dir>/lin_probe/network``, ``…/linear``, …), and every chart
is one tag written by several runs. The legend then reads ``…/lin_probe/network`` against
``…/lin_probe/linear`` in Time Series, Scalars and Custom Scalars alike.

Two series exist for the reader's eye only, both constant per run because TensorBoard does not
smooth a constant series (its default smoothing would otherwise turn a 0/1 flag into a slow slide):

- ``tolerance``: the tolerance at every check, drawn beside the relative distance;
- ``since_exit``: from the exit step on, the relative distance again and ``in_linear_regime = 0``, so
  the exit is marked on the step axis *at the exit step*, not at the later check that confirmed it.

A check's regime is only known once the rule has decided it (a check outside the tolerance may be
the start of an exit or a transient), so the regime flag is written with that delay (at most
``patience − 1`` checks) by :class:`RegimeTimeline`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lin_probe.monitor.runs import LINEARIZED as _LINEARIZED_PREFIX
from lin_probe.monitor.runs import MEMO

SERIES_DIR = "lin_probe"

NETWORK = "network"
LINEAR = "linear"
MEMORIZING = "memorizing"
LINEARIZED = "linearized"
TOLERANCE = "tolerance"
EXIT = "since_exit"  # sorts after "linear": TensorBoard draws runs in name order, so it lies on top

# record key -> (chart, series run). The chart's tag is ``lin_probe/<chart>``.
SERIES: dict[str, tuple[str, str]] = {
    "loss_network": ("loss", NETWORK),
    "loss_linear": ("loss", LINEAR),
    MEMO + "loss_linear": ("loss", MEMORIZING),
    "accuracy_network": ("accuracy", NETWORK),
    "accuracy_linear": ("accuracy", LINEAR),
    "agreement": ("agreement", LINEAR),
    "functional_distance": ("functional_distance", LINEAR),
    MEMO + "functional_distance": ("functional_distance", MEMORIZING),
    "functional_distance_rel": ("functional_distance_rel", LINEAR),
    MEMO + "functional_distance_rel": ("functional_distance_rel", MEMORIZING),
    _LINEARIZED_PREFIX + "loss_linear": ("loss", LINEARIZED),
    _LINEARIZED_PREFIX + "functional_distance": ("functional_distance", LINEARIZED),
    _LINEARIZED_PREFIX + "functional_distance_rel": ("functional_distance_rel", LINEARIZED),
    "ntk_gap": ("ntk", "ntk_gap"),
    "ntk_drift": ("ntk", "ntk_drift"),
    # the network's own kernel: one chart per measure, each in the network's colour
    "kernel_distance": ("kernel_distance", NETWORK),
    "kernel_velocity": ("kernel_velocity", NETWORK),
    "kernel_alignment": ("kernel_alignment", NETWORK),
    "ntk_scale": ("ntk_scale", NETWORK),
    "ntk_sketch_error": ("ntk_sketch_error", NETWORK),  # a sketched NTK's estimated error, per check
}

REL_CHART = "functional_distance_rel"
REGIME_CHART = "in_linear_regime"

Point = tuple[str, str, int, float]  # (series run, chart, step, value)


def check_points(record: Mapping[str, float], tolerance: float) -> list[Point]:
    """The points one check adds to the per-series charts (the regime flag aside)."""
    step = int(record["step"])
    points = [(run, chart, step, float(record[key])) for key, (chart, run) in SERIES.items() if key in record]
    points.append((TOLERANCE, REL_CHART, step, float(tolerance)))
    return points


class RegimeTimeline:
    """Writes each check's regime once the exit rule has decided it, in step order.

    ``decided(history, exit_step, undecided_from)`` returns the new points: ``linear`` at 1.0 for a
    check inside the regime, and ``since_exit`` at 0.0 (plus its relative distance) from the exit step on.
    ``undecided_from`` is the first step of a run of outside checks that may still become the exit
    (the tracker's ``streak_start``); checks from there on wait, unless ``final`` (the run ended: an
    unconfirmed run of outside checks is not an exit, by the rule).
    """

    def __init__(self) -> None:
        self.written_until = -1

    def decided(
        self,
        history: Sequence[Mapping[str, float]],
        *,
        exit_step: int | None,
        undecided_from: int | None,
        final: bool = False,
    ) -> list[Point]:
        points: list[Point] = []
        for record in history:
            step = int(record["step"])
            if step <= self.written_until:
                continue
            exited = exit_step is not None and step >= exit_step
            if not exited and undecided_from is not None and step >= undecided_from and not final:
                break
            if exited:
                points.append((EXIT, REGIME_CHART, step, 0.0))
                rel = float(record.get("functional_distance_rel", math.nan))
                if math.isfinite(rel):
                    points.append((EXIT, REL_CHART, step, rel))
            else:
                points.append((LINEAR, REGIME_CHART, step, 1.0))
            self.written_until = step
        return points


class SeriesWriters:
    """A ``SummaryWriter`` per series run under ``<log_dir>/lin_probe/``, created on first use.

    ``writer_type`` is the class of the logger's own writer (torch's or tensorboardX's), so the
    series runs are written the same way as the run they belong to.
    """

    def __init__(self, log_dir: str, writer_type: type) -> None:
        self.root = os.path.join(log_dir, SERIES_DIR)
        self.writer_type = writer_type
        self.writers: dict[str, Any] = {}

    def open(self, runs: Iterable[str]) -> None:
        """Create these runs now, in this order: TensorBoard hands out its colours in the order runs
        appear, so the series that matter most get the strongest ones (the exit run, written last,
        would otherwise get the palette's grey)."""
        for run in runs:
            self._writer(run)

    def write(self, points: Iterable[Point], tag: Any) -> None:
        """Add every point as a scalar ``tag(chart)`` in its series run."""
        for run, chart, step, value in points:
            self._writer(run).add_scalar(tag(chart), value, global_step=step)

    def _writer(self, run: str) -> Any:
        writer = self.writers.get(run)
        if writer is None:
            writer = self.writers[run] = self.writer_type(os.path.join(self.root, run))
        return writer

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers = {}


# Creation order, hence colour order (see SeriesWriters.open).
# The linearised network comes last so that adding it leaves every other series' colour as it was.
SERIES_ORDER = (NETWORK, LINEAR, MEMORIZING, EXIT, TOLERANCE, "ntk_gap", "ntk_drift", LINEARIZED)

__all__ = [
    "EXIT",
    "LINEAR",
    "LINEARIZED",
    "MEMORIZING",
    "NETWORK",
    "SERIES",
    "SERIES_DIR",
    "SERIES_ORDER",
    "TOLERANCE",
    "RegimeTimeline",
    "SeriesWriters",
    "check_points",
]
