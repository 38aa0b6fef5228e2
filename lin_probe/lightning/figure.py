"""The run's summary figure, one small readable panel per image for TensorBoard's Images tab.

TensorBoard shows each image in a card about 330 px wide, so one tall figure became a thumbnail
whose legends could not be read. Here every panel is its own landscape image of 560 × 380 px with
text sized for that shrink, plain-language legend labels and, on every step-axis panel, the exit
from the linear regime as a labelled vertical line.

matplotlib is imported inside the functions (it is slow to import and only needed when a figure is
drawn) and never through pyplot: each Figure gets its own Agg canvas, so the user's backend, open
windows and figure numbers are untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lin_probe.monitor.checks import NTK_KEYS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PANELS = ("1_loss", "2_distance", "3_ntk", "4_spectrum")
"""Image names in display order; TensorBoard sorts its Images tab by tag, hence the numbers."""

_History = Sequence[Mapping[str, float]]

_FIGSIZE_IN = (5.6, 3.8)
_DPI = 100
# TensorBoard shrinks a 560 px wide image to ~330 px (× 0.59). At dpi 100 one point is 100/72 px,
# so the smallest text (tick labels, legend) at 12 pt is 16.7 px native and ~10 px on screen, the
# size of TensorBoard's own chart labels; 10 pt (~8 px on screen) proved hard to read. Axis labels
# and titles are a step larger so the hierarchy survives the shrink.
_SMALL_PT = 12.0
_LABEL_PT = 13.0
_TITLE_PT = 14.0
_MARGINS = {"left": 0.17, "right": 0.97, "bottom": 0.17, "top": 0.9}

_EXIT_COLOR = "crimson"
_TOLERANCE_COLOR = "dimgray"

# metric key -> (legend label, colour, line style); the same shadow keeps its colour in every panel.
_SERIES: dict[str, tuple[str, str, str]] = {
    "loss_network": ("network", "tab:blue", "-"),
    "loss_linear": ("linear model", "tab:orange", "-"),
    "memo/loss_linear": ("memorizing shadow", "tab:green", "-."),
    "functional_distance_rel": ("linear model", "tab:orange", "-"),
    "memo/functional_distance_rel": ("memorizing shadow", "tab:green", "-."),
    "linearized/loss_linear": ("linearised network", "tab:cyan", "--"),
    "linearized/functional_distance_rel": ("linearised network", "tab:cyan", "--"),
    "ntk_gap": ("gap to affine kernel", "tab:purple", "-"),
    "ntk_drift": ("drift from init", "tab:brown", "-"),
}
_LOSS_KEYS = ("loss_network", "loss_linear", "memo/loss_linear", "linearized/loss_linear")
_DISTANCE_KEYS = (
    "functional_distance_rel",
    "memo/functional_distance_rel",
    "linearized/functional_distance_rel",
)


def _matplotlib() -> tuple[type, type]:
    """``Figure`` and ``FigureCanvasAgg``, or an ImportError that says what to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("lin_probe's summary figure needs matplotlib: pip install matplotlib") from err
    return Figure, FigureCanvasAgg


# --------------------------------------------------------------------------- data helpers


def _series(history: _History, key: str) -> tuple[list[float], list[float]]:
    """Steps and values of one metric at the checks that recorded it; NaN stays in, drawn as a gap."""
    points = [(float(rec["step"]), float(rec[key])) for rec in history if key in rec]
    return [s for s, _ in points], [v for _, v in points]


def _has_finite(history: _History, keys: Sequence[str]) -> bool:
    """Whether any of ``keys`` was measured at a finite value at some check (else the panel is empty)."""
    return any(key in rec and math.isfinite(float(rec[key])) for rec in history for key in keys)


def _normalised_spectrum(eigenvalues: np.ndarray) -> np.ndarray:
    """λ_i / λ_max in descending order over the positive finite eigenvalues (a log axis has no room
    for the rest, and round-off makes the tail of a PSD kernel's spectrum slightly negative)."""
    values = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    values = np.sort(values[np.isfinite(values) & (values > 0)])[::-1]
    return values / values[0] if values.size else values


def _step_limits(history: _History, exit_step: int | None) -> tuple[float, float]:
    """x-range from just left of step 0 to past the last step, never degenerate for a single check."""
    steps = [float(rec["step"]) for rec in history]
    if exit_step is not None:
        steps.append(float(exit_step))
    return -0.2, max(1.0, max(steps, default=0.0)) * 1.3


# --------------------------------------------------------------------------- drawing helpers


def _new_axes() -> tuple[Figure, Axes]:
    """One landscape panel on its own Agg canvas (not pyplot), white, with the panel font sizes."""
    figure_cls, canvas_cls = _matplotlib()
    fig = figure_cls(figsize=_FIGSIZE_IN, dpi=_DPI, facecolor="white")
    canvas_cls(fig)
    # Fixed margins, sized for the fonts above, instead of a layout engine: "constrained" took two
    # thirds of each render (~0.15 s a panel), and the panel size never changes.
    fig.subplots_adjust(**_MARGINS)
    ax = fig.add_subplot()
    ax.tick_params(which="both", labelsize=_SMALL_PT)
    ax.xaxis.get_offset_text().set_fontsize(_SMALL_PT)
    ax.yaxis.get_offset_text().set_fontsize(_SMALL_PT)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _plot_series(ax: Axes, history: _History, keys: Sequence[str]) -> None:
    """One line per recorded key, with markers so a single check still shows as a dot."""
    for key in keys:
        steps, values = _series(history, key)
        if steps:
            label, color, linestyle = _SERIES[key]
            ax.plot(steps, values, color=color, linestyle=linestyle, marker="o", markersize=4, label=label)


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _decade_label(value: float, _pos: object = None) -> str:
    """A log or symlog tick's label in plain text: ``0``, ``1``, ``10``, ``100``, ``1000``, then ``10⁴``,
    and ``10⁻¹``; no label between decades.

    Why not matplotlib's default: it writes ``$10^{k}$`` in mathtext, whose parser took about a fifth
    of each log panel's draw, on every draw (ad hoc cProfile of the spectrum panel).
    """
    if value == 0:
        return "0"
    exponent = math.log10(abs(value))
    if abs(exponent - round(exponent)) > 1e-9:
        return ""
    k = round(exponent)
    text = str(10**k) if 0 <= k <= 3 else "10" + str(k).translate(_SUPERSCRIPT)
    return ("−" if value < 0 else "") + text


def _plain_log_ticks(ax: Axes) -> None:
    """Decade ticks only, labelled without mathtext, on every log or symlog axis of ``ax``.

    No minor ticks: on the spectrum's axes (six decades) their 80 unlabelled tick artists took
    half of the panel's draw (ad hoc timing: 0.22 → 0.09 s), and the decade grid already guides
    the eye.
    """
    from matplotlib.ticker import FuncFormatter, NullLocator

    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() in ("log", "symlog"):
            axis.set_major_formatter(FuncFormatter(_decade_label))
            axis.set_minor_locator(NullLocator())


def _step_axis(ax: Axes, history: _History, exit_step: int | None) -> None:
    """Symlog steps (early checks are dense, late ones sparse) and the exit as a labelled line."""
    if exit_step is not None:
        ax.axvline(
            exit_step, color=_EXIT_COLOR, linestyle=":", linewidth=2.0, label=f"exit (step {exit_step})"
        )
    ax.set_xscale("symlog", linthresh=1.0)
    _plain_log_ticks(ax)
    ax.set_xlim(*_step_limits(history, exit_step))
    ax.set_xlabel("optimizer step (symlog)", fontsize=_LABEL_PT)


def _finish(ax: Axes, *, title: str, ylabel: str) -> None:
    """Title, y label and a legend of every labelled artist, all at the panel font sizes."""
    # An explicit y turns off matplotlib's title auto-positioning (a tight-bbox pass over the axes on
    # every draw, for tick labels on top, which no panel has): the same pixels, ~6 % less drawing.
    ax.set_title(title, fontsize=_TITLE_PT, y=1.0)
    ax.set_ylabel(ylabel, fontsize=_LABEL_PT)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=_SMALL_PT, loc="best", framealpha=0.85)


# --------------------------------------------------------------------------- panels


def _loss_panel(history: _History, exit_step: int | None) -> Figure:
    """Probe loss of the network against its linear model (and memorizing shadow)."""
    fig, ax = _new_axes()
    _plot_series(ax, history, _LOSS_KEYS)
    _step_axis(ax, history, exit_step)
    _finish(ax, title="probe loss", ylabel="loss")
    return fig


def _distance_panel(history: _History, exit_step: int | None, tolerance: float) -> Figure:
    """Relative distance of each shadow to the network against the tolerance that defines the exit.

    The absolute distance is left to the scalar charts: on a twin axis it made the panel unreadable
    at thumbnail size, and the relative one is what the exit is decided on.
    """
    fig, ax = _new_axes()
    _plot_series(ax, history, _DISTANCE_KEYS)
    ax.axhline(
        tolerance, color=_TOLERANCE_COLOR, linestyle="--", linewidth=1.5, label=f"tolerance {tolerance:g}"
    )
    _step_axis(ax, history, exit_step)
    ax.set_ylim(0.0, max(ax.get_ylim()[1], 1.5 * tolerance))  # the tolerance line never on the frame
    _finish(ax, title="distance to the network (relative)", ylabel="‖f − f_lin‖ / ‖f − f₀‖")
    return fig


def _ntk_panel(history: _History, exit_step: int | None) -> Figure:
    """How far the NTK is from the affine data kernel, and how far it moved since init."""
    fig, ax = _new_axes()
    _plot_series(ax, history, NTK_KEYS)
    _step_axis(ax, history, exit_step)
    ax.set_ylim(bottom=0.0)
    _finish(ax, title="NTK change", ylabel="relative spectral norm")
    return fig


def _spectrum_panel(spectra: Mapping[str, np.ndarray]) -> Figure:
    """λ_i/λ_max against rank on log-log axes, one line per spectrum, init darkest."""
    fig, ax = _new_axes()
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    count = len(spectra)
    for index, (label, eigenvalues) in enumerate(spectra.items()):
        ratios = _normalised_spectrum(eigenvalues)
        if ratios.size == 0:
            continue
        color = cmap(0.85 * index / max(1, count - 1))  # stop before viridis' pale yellow end
        marker = "o" if ratios.size <= 32 else None
        ranks = np.arange(1, ratios.size + 1)
        ax.plot(ranks, ratios, color=color, marker=marker, markersize=4, linewidth=2.0, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlabel("eigenvalue rank i", fontsize=_LABEL_PT)
    _finish(ax, title="NTK spectrum on the probe set", ylabel="λᵢ / λ₁ (λ₁ the largest)")
    return fig


# --------------------------------------------------------------------------- public API


def summary_figures(
    history: _History,
    *,
    exit_step: int | None,
    tolerance: float,
    spectra: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Figure]:
    """The run summary as separate panels, keyed by the names in :data:`PANELS` (in that order).

    One image per panel so each stays legible in TensorBoard's narrow image cards. ``"2_distance"``
    is always drawn; ``"1_loss"`` and ``"3_ntk"`` only when some value of theirs is finite (a
    panel of gaps says nothing); ``"4_spectrum"`` only when ``spectra`` (label -> NTK eigenvalues on
    the probe set) holds a positive eigenvalue. Each spectrum is shown as λ_i/λ_max against rank on
    log-log axes, so one dominant eigenvalue no longer hides the rest; non-positive and non-finite
    eigenvalues are dropped, since a log axis cannot show them. NaN in ``history`` is a gap.
    Raises ImportError when matplotlib is not installed.
    """
    _matplotlib()
    builders: dict[str, Callable[[], Figure]] = {}
    if _has_finite(history, _LOSS_KEYS):
        builders["1_loss"] = lambda: _loss_panel(history, exit_step)
    builders["2_distance"] = lambda: _distance_panel(history, exit_step, tolerance)
    if _has_finite(history, NTK_KEYS):
        builders["3_ntk"] = lambda: _ntk_panel(history, exit_step)
    if spectra and any(_normalised_spectrum(values).size for values in spectra.values()):
        builders["4_spectrum"] = lambda: _spectrum_panel(spectra)
    return {name: build() for name, build in builders.items()}


def render(fig: Figure) -> np.ndarray:
    """Draw a Figure to an ``H × W × 3`` uint8 array with Agg, as ``SummaryWriter.add_image`` takes.

    An Agg-based canvas (ours, or an interactive one such as QtAgg) is reused; any other gets a
    fresh Agg canvas. pyplot is never involved.
    """
    _, canvas_cls = _matplotlib()
    canvas: Any = fig.canvas if isinstance(fig.canvas, canvas_cls) else canvas_cls(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def summary_images(
    history: _History,
    *,
    exit_step: int | None,
    tolerance: float,
    spectra: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """:func:`summary_figures` rendered: panel name -> ``H × W × 3`` uint8 image, ready to log."""
    figures = summary_figures(history, exit_step=exit_step, tolerance=tolerance, spectra=spectra)
    return {name: render(fig) for name, fig in figures.items()}
