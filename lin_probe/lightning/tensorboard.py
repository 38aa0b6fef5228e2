"""lin_probe's TensorBoard dashboard: per-series runs, custom-scalar layout, cards, spectrum, figures, HParams.

What a reader finds, and where (``L`` is the logger's run directory):

- **Charts** ``lin_probe/loss``, ``…/functional_distance_rel``, ``…/functional_distance``, ``…/ntk``,
  ``…/in_linear_regime`` (``…/accuracy``, ``…/agreement`` for classifiers): one tag each, written by
  one run per series (``L/lin_probe/network``, ``…/linear``, ``…/memorizing``, ``…/tolerance``,
  ``…/since_exit``, ``…/ntk_gap``, ``…/ntk_drift``), so TensorBoard draws them in distinct colours with
  those names (:mod:`lin_probe.lightning.series`). The Custom Scalars tab groups them.
- **Cards** ``lin_probe/1_fit`` (the init fit) and ``lin_probe/2_exit`` (the exit), in reading order.
- **Spectrum** ``lin_probe/ntk_spectrum``: ``log10(λ/λ_max)`` of the NTK at each dense NTK check, so
  the bulk of the spectrum is visible beside its one dominant eigenvalue.
- **Figures** ``lin_probe/figure/*``: one readable image per panel (:mod:`lin_probe.lightning.figure`).
- **HParams**: one session per run with the model's hyperparameters, lin_probe's settings and the
  ``lin_probe_summary/*`` values (fit ``a, b, c``, fit error, exit step), so a sweep reads as a table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lin_probe.kernel import AffineKernel
from lin_probe.kernel.data_kernels import DataKernelChoice
from lin_probe.lightning.series import SeriesWriters
from lin_probe.monitor.checks import POOR_FIT_THRESHOLD
from lin_probe.monitor.diagnosis import INDICATIVE_NOTE, Diagnosis, Verdict

PREFIX = "lin_probe/"
SUMMARY_PREFIX = "lin_probe_summary/"  # its own group: single-value charts stay out of lin_probe/'s

FIT_CARD = "1_fit"
EXIT_CARD = "2_exit"
SPECTRUM = "ntk_spectrum"
FIGURE = "figure/"

# The per-run values HParams shows as metric columns (scalars of the main run).
SUMMARY_METRICS = ("exit_step", "outside_from_start", "fit_rel_error_centered", "fit_rel_error", "fit_a",
                   "fit_b", "fit_c", "final_in_linear_regime", "memo_exit_step", "linearized_exit_step")  # fmt: skip

_CATEGORY = "lin_probe"
_LAYOUT_FLAG = "_lin_probe_layout_registered"
_SPECTRUM_FLOOR = 1e-12  # λ/λ_max below this (round-off of a rank-deficient kernel) is not shown


def tag(name: str) -> str:
    """The full TensorBoard tag for a lin_probe metric, so every tag lives under one prefix."""
    return PREFIX + name


def summary_tag(name: str) -> str:
    """A per-run value's tag: a group of its own, after ``lin_probe/`` in Scalars and Time Series."""
    return SUMMARY_PREFIX + name


# --------------------------------------------------------------------------- custom-scalar layout


def _exact(name: str) -> str:
    """An anchored, escaped regex for one tag: Multiline entries are regexes, matched by prefix."""
    return "^" + re.escape(tag(name)) + "$"


def _multiline(*names: str) -> list[Any]:
    """One Multiline chart entry in ``SummaryWriter.add_custom_scalars`` format."""
    return ["Multiline", [_exact(name) for name in names]]


def custom_scalar_layout(*, classification: bool = False) -> dict:
    """The layout for ``SummaryWriter.add_custom_scalars``: each chart is one tag, its series are runs.

    The memorizing shadow needs no entry of its own: its run writes the same tags.
    """
    charts: dict[str, list[Any]] = {
        "loss: network vs linear": _multiline("loss"),
        "functional distance (relative) vs tolerance": _multiline("functional_distance_rel"),
        "in linear regime": _multiline("in_linear_regime"),
        "NTK: gap to affine kernel and drift": _multiline("ntk"),
        "functional distance": _multiline("functional_distance"),
    }
    if classification:
        charts["accuracy and agreement"] = _multiline("accuracy", "agreement")
    charts["kernel distance to init (1 − cos)"] = _multiline("kernel_distance")
    charts["kernel velocity (distance per step)"] = _multiline("kernel_velocity")
    charts["kernel-target alignment (centred)"] = _multiline("kernel_alignment")
    charts["NTK scale ‖Θ_t‖/‖Θ_0‖"] = _multiline("ntk_scale")
    return {_CATEGORY: charts}


def spectrum_values(eigenvalues: Tensor) -> np.ndarray | None:
    """``log10(λ/λ_max)`` of the positive finite eigenvalues (≥ 1e-12·λ_max); None when none is left."""
    values = eigenvalues.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    values = values[torch.isfinite(values) & (values > 0)]
    if values.numel() == 0:
        return None
    ratios = values / values.max()
    ratios = ratios[ratios >= _SPECTRUM_FLOOR]
    return torch.log10(ratios).numpy()


def hparams_summaries(params: Mapping[str, Any], metrics: Sequence[str]) -> tuple[Any, Any, Any]:
    """The experiment, session-start and session-end summaries of one HParams session.

    torch's ``hparams`` builds them (the same function Lightning's ``TensorBoardLogger`` uses); only
    the metric *names* matter here: HParams reads their values from the run's scalars.
    """
    from torch.utils.tensorboard.summary import hparams

    return hparams(dict(params), dict.fromkeys(metrics, math.nan))


# --------------------------------------------------------------------------- markdown cards


def _fmt(value: float | None) -> str:
    """Four significant digits; ``n/a`` when a value was not available."""
    if value is None:
        return "n/a"
    return f"{float(value):.4g}"


def _fit_verdict(kernel: AffineKernel) -> str:
    """One line saying whether the affine kernel (hence the linear shadow) is trustworthy at init.

    Judged on the *centred* error: the uncentred one is dominated by the ``b·11ᵀ`` eigenvalue
    (≈ n·b) and calls gross misfits of everything else good.
    """
    error = kernel.rel_error_centered
    if error is None or math.isnan(error):
        return "Fit error unknown: cannot say whether the linear model is a good proxy at init."
    if error > POOR_FIT_THRESHOLD:
        return (
            f"**The linear model is a poor proxy at init** (centred fit error {_fmt(error)} > "
            f"{POOR_FIT_THRESHOLD}): expect *not in the linear regime from the start*."
        )
    return (
        f"**The linear model is a good proxy at init** (centred fit error {_fmt(error)} ≤ "
        f"{POOR_FIT_THRESHOLD})."
    )


def _fit_rows(kernel: AffineKernel) -> list[str]:
    """Table rows a, b, c, the centred and the uncentred error."""
    labels = (
        ("a", "`a` (data kernel K)"),
        ("b", "`b` (constant 11ᵀ)"),
        ("c", "`c` (identity I)"),
        ("rel_error_centered", "centred relative spectral error ‖H(Θ₀ − Θ_lin)H‖₂/‖HΘ₀H‖₂"),
        ("rel_error", "relative spectral error ‖Θ₀ − Θ_lin‖₂/‖Θ₀‖₂"),
    )
    return [f"| {label} | {_fmt(getattr(kernel, field))} |" for field, label in labels]


def _data_kernel_line(choice: DataKernelChoice | None) -> str:
    """Which data kernel the shadow uses, and every candidate's scores when there were several."""
    if choice is None:
        return "Data kernel: flat (the inputs flattened)."
    describe = getattr(choice.features_fn, "describe", None)
    name = describe() if callable(describe) else choice.name
    scores = [
        f"{candidate}: centred {_fmt(centred)}, uncentred {_fmt(plain)}"
        for candidate, (plain, centred) in choice.scores.items()
    ]
    chosen = f"Data kernel: **{name}**"
    if len(scores) > 1:
        return f"{chosen}, the lowest centred fit error of the candidates ({'; '.join(scores)})."
    return chosen + "."


def fit_card(
    kernel: AffineKernel,
    *,
    n_probe: int,
    probe_source: str,
    n_parameters: int,
    center: bool,
    data_kernel: DataKernelChoice | None = None,
    outputs_line: str | None = None,
) -> str:
    """Markdown card for the init fit ``Θ_0 ≈ a·K + b·11ᵀ + c·I``, read once at the start of a run."""
    header = ["| coefficient | fitted |", "|---|---:|"]
    shadow = "f₀ + Bᵀψ (centred on the network at init)" if center else "Bᵀψ (pure linear, not centred)"
    context = (
        f"Probe: {n_probe} points ({probe_source}); {n_parameters} trained parameters; "
        f"shadow: {shadow}, `center={center}`. H = I − 11ᵀ/n removes the constant mode."
    )
    lines = [
        "### Affine kernel fit at initialisation: Θ₀ ≈ a·K + b·11ᵀ + c·I",
        "",
        _data_kernel_line(data_kernel),
        "",
        *header,
        *_fit_rows(kernel),
        "",
        context,
        *([] if outputs_line is None else ["", outputs_line]),
        "",
        _fit_verdict(kernel),
    ]
    return "\n".join(lines)


def _record_rows(record: Mapping[str, float]) -> list[str]:
    """Table rows for every recorded value but the step, which the card states separately."""
    return [f"| `{name}` | {_fmt(value)} |" for name, value in record.items() if name != "step"]


def exit_card(
    verdict: Verdict,
    record: Mapping[str, float],
    *,
    tolerance: float,
    patience: int,
    diagnosis: Diagnosis | None = None,
) -> str:
    """Markdown card announcing the verdict at the exit (or "never inside"), its cause and the numbers."""
    prefix = verdict.run
    rel = record.get(prefix + "functional_distance_rel")
    shadow = "the linearised network" if prefix else "the linear model"
    if verdict.state == "outside_from_start":
        title = "### Not in the linear regime from the start"
        rule = (
            f"`functional_distance_rel` > tolerance {_fmt(tolerance)} from the first check after init on "
            f"({patience} consecutive checks), and the affine kernel already misfits the centred NTK at "
            "init by more than the tolerance: no exit step, since nothing was left."
        )
    else:
        title = f"### The network left the linear regime at step {verdict.exit_step}"
        rule = (
            f"`{prefix}functional_distance_rel` (network vs {shadow}) = {_fmt(rel)} > tolerance "
            f"{_fmt(tolerance)} for {patience} consecutive checks (patience {patience}); the exit step is "
            "the first of them."
        )
    lines = [title, "", rule]
    if verdict.indicative:
        lines += ["", f"*Indicative only:* {INDICATIVE_NOTE}."]
    if diagnosis is not None:
        lines += ["", f"**Diagnosis: {diagnosis.title}.** {diagnosis.explanation()}"]
    if "step" in record:
        lines += [
            "",
            f"Values below were recorded at step {int(record['step'])}, when the verdict was confirmed.",
        ]
    lines += ["", "| metric | value |", "|---|---:|", *_record_rows(record)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the dashboard


class TensorBoardPanels:
    """Writes lin_probe's extras for one TensorBoard run (rank 0 only): ``writer`` is the run's own
    ``SummaryWriter``; the series runs are created beside it, under ``<log_dir>/lin_probe/``."""

    def __init__(self, writer: Any, log_dir: str | None = None) -> None:
        self.writer = writer
        self.series = SeriesWriters(log_dir or _log_dir(writer), type(writer))

    def register_layout(self, *, classification: bool = False) -> None:
        """Write the custom-scalar layout once per writer: TensorBoard keeps a single layout per run.

        The flag lives on the writer, so several panels objects sharing it still write it once; a
        later call with other flags is ignored.
        """
        if getattr(self.writer, _LAYOUT_FLAG, False):
            return
        self.writer.add_custom_scalars(custom_scalar_layout(classification=classification))
        setattr(self.writer, _LAYOUT_FLAG, True)

    def hparams(self, params: Mapping[str, Any], metrics: Sequence[str]) -> None:
        """The run's HParams session. TensorBoard keeps the *first* session written to a run."""
        file_writer = self.writer._get_file_writer()
        for summary in hparams_summaries(params, metrics):
            file_writer.add_summary(summary)

    def summary(self, values: Mapping[str, float], step: int) -> None:
        """Per-run values (``lin_probe_summary/*``) in the main run, where HParams reads them."""
        for name, value in values.items():
            self.writer.add_scalar(summary_tag(name), float(value), global_step=step)

    def scalar(self, name: str, value: float, step: int) -> None:
        """One main-run value with no series of its own (``lin_probe/overhead``)."""
        self.writer.add_scalar(tag(name), float(value), global_step=step)

    def text(self, name: str, markdown: str, step: int) -> None:
        """A markdown card under ``lin_probe/<name>``."""
        self.writer.add_text(tag(name), markdown, global_step=step)

    def spectrum(self, eigenvalues: Tensor, step: int) -> None:
        """The NTK spectrum as a histogram of ``log10(λ/λ_max)`` under ``lin_probe/ntk_spectrum``."""
        values = spectrum_values(eigenvalues)
        if values is not None:
            self.writer.add_histogram(tag(SPECTRUM), values, global_step=step)

    def images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        """Figure panels (``H × W × 3`` uint8) under ``lin_probe/figure/<name>``."""
        for name, pixels in images.items():
            self.writer.add_image(tag(FIGURE + name), pixels, global_step=step, dataformats="HWC")

    def flush(self) -> None:
        """Push pending events to disk, e.g. before a test or a user reads them back."""
        self.writer.flush()
        self.series.flush()

    def close(self) -> None:
        """Close the series runs' writers (the main writer belongs to the logger)."""
        self.series.close()


def _log_dir(writer: Any) -> str:
    """A writer's run directory: torch's ``log_dir`` or tensorboardX's ``logdir``."""
    return str(getattr(writer, "log_dir", None) or writer.logdir)
