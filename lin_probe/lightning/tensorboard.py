"""TensorBoard panels for lin_probe: custom-scalar layout, text cards, NTK spectrum, summary figure.

The callback logs the scalars through whatever Lightning logger is configured; this module adds the
extras that only a TensorBoard ``SummaryWriter`` can show, so a reader sees network and linear
shadow side by side without assembling the charts by hand. matplotlib is optional: without it the
figure is skipped silently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lin_probe.kernel import AffineKernel
from lin_probe.monitor.checks import NTK_KEYS, POOR_FIT_THRESHOLD

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PREFIX = "lin_probe/"

_CATEGORY = "lin_probe"
_LAYOUT_FLAG = "_lin_probe_layout_registered"


def tag(name: str) -> str:
    """The full TensorBoard tag for a lin_probe metric, so every tag lives under one prefix."""
    return PREFIX + name


# --------------------------------------------------------------------------- custom-scalar layout


def _exact(name: str) -> str:
    """An anchored, escaped regex for one tag: Multiline entries are regexes, matched by prefix."""
    return "^" + re.escape(tag(name)) + "$"


def _multiline(*names: str) -> list[Any]:
    """One Multiline chart entry in ``SummaryWriter.add_custom_scalars`` format."""
    return ["Multiline", [_exact(name) for name in names]]


def _with_memo(names: tuple[str, ...], memo_name: str, memorization: bool) -> tuple[str, ...]:
    """Append the memorisation shadow's tag to a chart when that feature is on."""
    return (*names, f"memo/{memo_name}") if memorization else names


def custom_scalar_layout(*, classification: bool = False, memorization: bool = False) -> dict:
    """The layout for ``SummaryWriter.add_custom_scalars``: network and shadow on shared charts."""
    charts: dict[str, list[Any]] = {
        "loss: network vs linear": _multiline(
            *_with_memo(("loss_network", "loss_linear"), "loss_linear", memorization)
        ),
        "functional distance": _multiline(
            *_with_memo(("functional_distance",), "functional_distance", memorization)
        ),
        "functional distance (relative)": _multiline(
            *_with_memo(("functional_distance_rel",), "functional_distance_rel", memorization)
        ),
        "NTK: gap to affine kernel and drift": _multiline(*NTK_KEYS),
        "in linear regime": _multiline("in_linear_regime"),
    }
    if classification:
        charts["accuracy and agreement"] = _multiline("accuracy_network", "accuracy_linear", "agreement")
    return {_CATEGORY: charts}


# --------------------------------------------------------------------------- markdown cards


def _fmt(value: float | None) -> str:
    """Four significant digits; ``n/a`` when a value was not available."""
    if value is None:
        return "n/a"
    return f"{float(value):.4g}"


def _fit_verdict(rel_error: float | None) -> str:
    """One line saying whether the affine kernel (hence the linear shadow) is trustworthy at init."""
    if rel_error is None or math.isnan(rel_error):
        return "Fit error unknown: cannot say whether the linear model is a good proxy at init."
    if rel_error > POOR_FIT_THRESHOLD:
        return (
            f"**The linear model is a poor proxy at init** "
            f"(fit error {_fmt(rel_error)} > {POOR_FIT_THRESHOLD})."
        )
    return (
        f"**The linear model is a good proxy at init** (fit error {_fmt(rel_error)} ≤ {POOR_FIT_THRESHOLD})."
    )


def _fit_rows(kernel: AffineKernel) -> list[str]:
    """Table rows a, b, c, rel_error."""
    labels = (
        ("a", "`a` (data kernel XXᵀ/d)"),
        ("b", "`b` (constant 11ᵀ)"),
        ("c", "`c` (identity I)"),
        ("rel_error", "relative spectral error"),
    )
    return [f"| {label} | {_fmt(getattr(kernel, field))} |" for field, label in labels]


def fit_card(
    kernel: AffineKernel,
    *,
    n_probe: int,
    probe_source: str,
    n_parameters: int,
    center: bool,
) -> str:
    """Markdown card for the init fit ``Θ_0 ≈ a·K + b·11ᵀ + c·I``, read once at the start of a run."""
    header = ["| coefficient | fitted |", "|---|---:|"]
    shadow = "f₀ + Bᵀψ (centred on the network at init)" if center else "Bᵀψ (pure linear, not centred)"
    context = (
        f"Probe: {n_probe} points ({probe_source}); {n_parameters} trained parameters; "
        f"shadow: {shadow}, `center={center}`."
    )
    lines = [
        "### Affine kernel fit at initialisation: Θ₀ ≈ a·XXᵀ/d + b·11ᵀ + c·I",
        "",
        *header,
        *_fit_rows(kernel),
        "",
        context,
        "",
        _fit_verdict(kernel.rel_error),
    ]
    return "\n".join(lines)


def _record_rows(record: Mapping[str, float]) -> list[str]:
    """Table rows for every recorded value but the step, which the card states separately."""
    return [f"| `{name}` | {_fmt(value)} |" for name, value in record.items() if name != "step"]


def exit_card(exit_step: int, record: Mapping[str, float], *, tolerance: float, patience: int) -> str:
    """Markdown card announcing the exit from the linear regime, with the numbers that decided it."""
    rel = record.get("functional_distance_rel")
    lines = [
        f"### The network left the linear regime at step {exit_step}",
        "",
        f"`functional_distance_rel` = {_fmt(rel)} > tolerance {_fmt(tolerance)} "
        f"for {patience} consecutive checks (patience {patience}); "
        f"the exit step is the first of them.",
    ]
    if "step" in record:
        lines += [
            "",
            f"Values below were recorded at step {int(record['step'])}, when the exit was confirmed.",
        ]
    lines += ["", "| metric | value |", "|---|---:|", *_record_rows(record)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- summary figure


def _series(history: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    """Steps and values of one metric over the checks where it was measured (NaN kept as a gap)."""
    points = [(float(rec["step"]), float(rec[key])) for rec in history if key in rec]
    return [s for s, _ in points], [v for _, v in points]


def _has_data(history: Sequence[Mapping[str, float]], keys: Sequence[str]) -> bool:
    """Whether any of ``keys`` was measured at a finite value at any check."""
    return any(key in rec and math.isfinite(float(rec[key])) for rec in history for key in keys)


def _plot_lines(ax: Axes, history: Sequence[Mapping[str, float]], keys: Sequence[str], **style: Any) -> None:
    """One line (with markers, so a single check still shows) per measured key; memo shadow dash-dotted."""
    for key in keys:
        steps, values = _series(history, key)
        if steps:
            linestyle = "-." if key.startswith("memo/") else "-"
            ax.plot(steps, values, marker="o", markersize=3, linestyle=linestyle, label=key, **style)


def _mark_exit(ax: Axes, exit_step: int | None) -> None:
    """The exit step as a labelled vertical line, so every panel shows where the regime ended."""
    if exit_step is not None:
        ax.axvline(exit_step, color="crimson", linestyle=":", linewidth=1.5, label=f"exit (step {exit_step})")


def _legend(*axes: Axes) -> None:
    """One legend for an axis and its twin, so both curves are named in the same box."""
    handles: list[Any] = []
    labels: list[str] = []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    if handles:
        axes[0].legend(handles, labels, fontsize="small", loc="best")


def _loss_panel(ax: Axes, history: Sequence[Mapping[str, float]], exit_step: int | None) -> None:
    """Probe loss of the network against its linear shadow(s)."""
    _plot_lines(ax, history, ("loss_network", "loss_linear", "memo/loss_linear"))
    _mark_exit(ax, exit_step)
    ax.set_title("probe loss: network vs linear model")
    ax.set_ylabel("loss")
    _legend(ax)


def _distance_panel(
    ax: Axes, history: Sequence[Mapping[str, float]], exit_step: int | None, tolerance: float
) -> None:
    """Absolute distance on the left axis, relative distance and its tolerance on the right."""
    _plot_lines(ax, history, ("functional_distance", "memo/functional_distance"), color="tab:blue")
    ax.set_ylabel("RMS(f − f_lin)")
    rel_ax = ax.twinx()
    _plot_lines(
        rel_ax, history, ("functional_distance_rel", "memo/functional_distance_rel"), color="tab:orange"
    )
    rel_ax.axhline(
        tolerance, color="tab:orange", linestyle="--", linewidth=1, label=f"tolerance {tolerance:g}"
    )
    rel_ax.set_ylabel("‖f − f_lin‖ / ‖f − f₀‖")
    ax.set_ylim(bottom=0.0)
    rel_ax.set_ylim(bottom=0.0)
    _mark_exit(ax, exit_step)
    ax.set_title("functional distance to the linear model")
    _legend(ax, rel_ax)


def _ntk_panel(ax: Axes, history: Sequence[Mapping[str, float]], exit_step: int | None) -> None:
    """NTK gap to the affine data kernel and drift from the initial NTK."""
    _plot_lines(ax, history, NTK_KEYS)
    _mark_exit(ax, exit_step)
    ax.set_title("NTK: gap to affine kernel and drift from init")
    ax.set_ylabel("relative spectral norm")
    _legend(ax)


def _step_limits(history: Sequence[Mapping[str, float]], exit_step: int | None) -> tuple[float, float]:
    """x-range from just left of step 0 to past the last step, never degenerate for a single check."""
    steps = [float(rec["step"]) for rec in history]
    if exit_step is not None:
        steps.append(float(exit_step))
    last = max(steps, default=0.0)
    return -0.2, max(1.0, last) * 1.3


def _new_figure(n_panels: int) -> tuple[Figure, list[Axes]] | None:
    """A Figure on its own Agg canvas (never pyplot, so the user's backend is untouched)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(8.0, 2.8 * n_panels), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_panels, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def run_figure(history: Sequence[Mapping[str, float]], *, exit_step: int | None, tolerance: float):
    """Summary of a run: losses, functional distance and NTK change on a shared symlog step axis.

    Returns a ``matplotlib.figure.Figure``, or None when matplotlib is not installed. The loss and
    NTK panels appear only when something was measured for them; the distance panel always does.
    """
    panels = []
    if _has_data(history, ("loss_network", "loss_linear", "memo/loss_linear")):
        panels.append(lambda ax: _loss_panel(ax, history, exit_step))
    panels.append(lambda ax: _distance_panel(ax, history, exit_step, tolerance))
    if _has_data(history, NTK_KEYS):
        panels.append(lambda ax: _ntk_panel(ax, history, exit_step))
    made = _new_figure(len(panels))
    if made is None:
        return None
    fig, axes = made
    for draw, ax in zip(panels, axes, strict=True):
        draw(ax)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlim(*_step_limits(history, exit_step))
    axes[-1].set_xlabel("optimizer step (symlog)")
    fig.suptitle("lin_probe: network vs its linear model")
    return fig


def _figure_pixels(fig: Figure) -> np.ndarray:
    """Render a Figure to an ``H × W × 3`` uint8 array with Agg, without going through pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


# --------------------------------------------------------------------------- writer wrapper


class TensorBoardPanels:
    """Writes lin_probe's extras to a ``torch.utils.tensorboard.SummaryWriter`` (rank 0 only)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def register_layout(self, *, classification: bool = False, memorization: bool = False) -> None:
        """Write the custom-scalar layout once per writer: TensorBoard keeps a single layout per run.

        The flag lives on the writer, so several panels objects sharing it still write it once; a
        later call with other flags is ignored.
        """
        if getattr(self.writer, _LAYOUT_FLAG, False):
            return
        layout = custom_scalar_layout(classification=classification, memorization=memorization)
        self.writer.add_custom_scalars(layout)
        setattr(self.writer, _LAYOUT_FLAG, True)

    def text(self, name: str, markdown: str, step: int) -> None:
        """A markdown card under ``lin_probe/<name>``."""
        self.writer.add_text(tag(name), markdown, global_step=step)

    def eigenvalue_histogram(self, eigenvalues: Tensor, step: int) -> None:
        """The NTK spectrum under ``lin_probe/ntk_eigenvalues``; non-finite values are dropped."""
        values = eigenvalues.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        values = values[torch.isfinite(values)]
        if values.numel() == 0:
            return
        self.writer.add_histogram(tag("ntk_eigenvalues"), values.numpy(), global_step=step)

    def figure(
        self,
        history: Sequence[Mapping[str, float]],
        *,
        exit_step: int | None,
        tolerance: float,
        step: int,
    ) -> None:
        """The run summary figure as an image under ``lin_probe/summary`` (skipped without matplotlib)."""
        fig = run_figure(history, exit_step=exit_step, tolerance=tolerance)
        if fig is None:
            return
        self.writer.add_image(tag("summary"), _figure_pixels(fig), global_step=step, dataformats="HWC")

    def flush(self) -> None:
        """Push pending events to disk, e.g. before a test or a user reads them back."""
        self.writer.flush()
