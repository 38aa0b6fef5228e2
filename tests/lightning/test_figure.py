"""The summary panels: one readable image each, the right panels for the history, pyplot untouched."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text

from lin_probe.lightning.figure import PANELS, render, summary_figures, summary_images

NAN = float("nan")
STEP_PANELS = ("1_loss", "2_distance", "3_ntk")
# at least 16 px native (the module uses 12 pt = 16.7 px at dpi 100): ~9.5 px once TensorBoard
# shrinks a 560 px image to 330 px; 10 pt text (13.9 px) must fail this.
MIN_TEXT_PX = 16.0


def _history(*, memo: bool = False) -> list[dict[str, float]]:
    records = [
        {"step": 0, "functional_distance": 0.0, "functional_distance_rel": 0.0, "ntk_gap": 0.12,
         "ntk_drift": 0.0, "loss_network": 1.0, "loss_linear": 1.0},
        {"step": 1, "functional_distance": 0.01, "functional_distance_rel": NAN, "loss_network": 0.9},
        {"step": 10, "functional_distance": 0.05, "functional_distance_rel": 0.04, "ntk_gap": 0.15,
         "ntk_drift": 0.05, "loss_network": 0.5, "loss_linear": 0.55},
        {"step": 75, "functional_distance": 0.2, "functional_distance_rel": 0.12, "loss_network": 0.2,
         "loss_linear": 0.35},
        {"step": 100, "functional_distance": 0.4, "functional_distance_rel": 0.3, "ntk_gap": 0.5,
         "ntk_drift": 0.6, "loss_network": 0.1, "loss_linear": 0.3},
    ]  # fmt: skip
    if memo:
        for record in records:
            record["memo/loss_linear"] = 1.1
            record["memo/functional_distance_rel"] = 0.2
    return records


SPECTRA = {
    "init (step 0)": np.array([0.5, 4.0, -1e-9, 0.0, 2.0, NAN, 1.0, math.inf]),
    "step 300": np.array([3.0, 9.0, 0.09]),
}


def _only_axes(fig: Figure):
    (ax,) = fig.axes
    return ax


def _legend_texts(fig: Figure) -> list[str]:
    legend = _only_axes(fig).get_legend()
    assert legend is not None
    return [text.get_text() for text in legend.get_texts()]


def _labelled(fig: Figure, label: str) -> list[Line2D]:
    return [line for line in _only_axes(fig).get_lines() if line.get_label() == label]


def test_panel_names_are_fixed() -> None:
    assert PANELS == ("1_loss", "2_distance", "3_ntk", "4_spectrum")


def test_images_are_landscape_rgb_uint8_about_560_px_wide() -> None:
    images = summary_images(_history(memo=True), exit_step=75, tolerance=0.1, spectra=SPECTRA)
    assert list(images) == list(PANELS)
    for name, image in images.items():
        assert image.dtype == np.uint8, name
        assert image.ndim == 3 and image.shape[2] == 3, name
        height, width = image.shape[:2]
        assert 500 <= width <= 700, name
        assert 300 <= height < width, name
        assert (image < 200).any() and (image == 255).any(), name  # something drawn on white


def test_render_is_height_by_width_and_gives_a_plain_figure_an_agg_canvas() -> None:
    fig = Figure(figsize=(2.0, 1.0), dpi=100)
    fig.add_subplot().plot([0, 1], [0, 1])
    image = render(fig)
    assert image.shape == (100, 200, 3) and image.dtype == np.uint8


@pytest.mark.parametrize(
    ("history", "spectra", "expected"),
    [
        (_history(), SPECTRA, PANELS),
        (_history(), None, ("1_loss", "2_distance", "3_ntk")),
        (_history(), {}, ("1_loss", "2_distance", "3_ntk")),
        (_history(), {"all dropped": np.array([0.0, -1.0, NAN])}, ("1_loss", "2_distance", "3_ntk")),
        ([{k: v for k, v in r.items() if not k.startswith("ntk")} for r in _history()], None, ("1_loss", "2_distance")),
        ([{**r, "ntk_gap": NAN, "ntk_drift": NAN} for r in _history()], None, ("1_loss", "2_distance")),
        ([{"step": 0, "functional_distance_rel": NAN, "loss_network": NAN}], None, ("2_distance",)),
        ([{"step": 0, "functional_distance_rel": 0.0, "ntk_gap": 0.1}], SPECTRA, ("2_distance", "3_ntk", "4_spectrum")),
        ([], None, ("2_distance",)),
    ],
    ids=["all", "no-spectra", "empty-spectra", "spectrum-all-dropped", "no-ntk", "ntk-all-nan",
         "single-nan-check", "single-check", "empty-history"],
)  # fmt: skip
def test_which_panels_appear(history, spectra, expected: tuple[str, ...]) -> None:
    figures = summary_figures(history, exit_step=None, tolerance=0.1, spectra=spectra)
    assert tuple(figures) == expected
    for name, fig in figures.items():
        assert render(fig).shape[2] == 3, name  # a single point, an all-NaN curve or no data still draw


def test_single_check_draws_a_visible_point_in_every_panel() -> None:
    (record,) = _history()[:1]
    figures = summary_figures(
        [record], exit_step=0, tolerance=0.1, spectra={"init (step 0)": np.array([5.0])}
    )
    assert tuple(figures) == PANELS
    for name, fig in figures.items():
        render(fig)
        drawn = [line for line in _only_axes(fig).get_lines() if line.get_marker() not in (None, "None", "")]
        assert drawn, f"{name}: a lone check needs a marker to be seen"


def test_exit_line_is_at_the_exit_step_in_every_step_panel() -> None:
    figures = summary_figures(_history(), exit_step=75, tolerance=0.1, spectra=SPECTRA)
    for name in STEP_PANELS:
        (line,) = _labelled(figures[name], "exit (step 75)")
        assert list(line.get_xdata()) == [75, 75], name
        assert "exit (step 75)" in _legend_texts(figures[name]), name
    assert not _labelled(figures["4_spectrum"], "exit (step 75)")  # no step axis there


def test_no_exit_line_without_an_exit() -> None:
    figures = summary_figures(_history(), exit_step=None, tolerance=0.1)
    for name, fig in figures.items():
        assert not any(line.get_label().startswith("exit") for line in _only_axes(fig).get_lines()), name


def test_tolerance_line_is_horizontal_at_the_tolerance() -> None:
    fig = summary_figures(_history(), exit_step=75, tolerance=0.25)["2_distance"]
    (line,) = _labelled(fig, "tolerance 0.25")
    assert list(line.get_ydata()) == [0.25, 0.25]
    assert line.get_linestyle() == "--"
    assert _only_axes(fig).get_ylim()[0] == 0.0


def test_tolerance_line_stays_inside_the_frame_without_any_distance() -> None:
    fig = summary_figures([{"step": 0, "functional_distance_rel": NAN}], exit_step=None, tolerance=0.1)[
        "2_distance"
    ]
    bottom, top = _only_axes(fig).get_ylim()
    assert bottom == 0.0 and top >= 0.12  # headroom above the line, so it is not drawn on the frame


def test_step_panels_share_a_symlog_step_axis_past_the_last_check() -> None:
    figures = summary_figures(_history(), exit_step=75, tolerance=0.1)
    for name in STEP_PANELS:
        ax = _only_axes(figures[name])
        assert ax.get_xscale() == "symlog", name
        left, right = ax.get_xlim()
        assert left < 0 and right > 100, name


@pytest.mark.parametrize("memo", [False, True])
def test_legends_use_readable_names(memo: bool) -> None:
    figures = summary_figures(_history(memo=memo), exit_step=75, tolerance=0.1)
    shadows = ["linear model", "memorizing shadow"] if memo else ["linear model"]
    assert _legend_texts(figures["1_loss"]) == ["network", *shadows, "exit (step 75)"]
    assert _legend_texts(figures["2_distance"]) == [*shadows, "tolerance 0.1", "exit (step 75)"]
    assert _legend_texts(figures["3_ntk"]) == ["gap to affine kernel", "drift from init", "exit (step 75)"]


def test_every_visible_text_is_large_enough_for_a_shrunk_thumbnail() -> None:
    figures = summary_figures(_history(memo=True), exit_step=75, tolerance=0.1, spectra=SPECTRA)
    for name, fig in figures.items():
        render(fig)  # tick labels only exist once drawn
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        assert len(texts) > 8, name  # ticks, labels, title and legend were all found
        for text in texts:
            pixels = text.get_fontsize() * fig.dpi / 72.0
            assert pixels >= MIN_TEXT_PX, f"{name}: {text.get_text()!r} is {pixels:.1f} px"


def test_no_text_is_mathtext_and_log_ticks_read_as_decades() -> None:
    """Plain-text labels only (mathtext's parser ran on every draw); log ticks at decades, written out."""
    figures = summary_figures(_history(memo=True), exit_step=75, tolerance=0.1, spectra=SPECTRA)
    for name, fig in figures.items():
        render(fig)
        texts = [t.get_text() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        assert not [t for t in texts if "$" in t], name
    step_ticks = [t.get_text() for t in _only_axes(figures["1_loss"]).get_xticklabels() if t.get_text()]
    assert step_ticks == ["0", "1", "10", "100"]  # symlog steps 0 … 130: the checks at 0 … 100
    spectrum = _only_axes(figures["4_spectrum"])
    y_ticks = [t.get_text() for t in spectrum.get_yticklabels() if t.get_text()]
    assert "1" in y_ticks and "10⁻¹" in y_ticks and all(t == "1" or t.startswith("10") for t in y_ticks)


@pytest.mark.parametrize(
    ("value", "label"),
    [(0.0, "0"), (1.0, "1"), (10.0, "10"), (1000.0, "1000"), (1e4, "10⁴"), (1e-1, "10⁻¹"), (1e-12, "10⁻¹²"),
     (-100.0, "−100"), (2.0, ""), (0.05, "")],
)  # fmt: skip
def test_decade_labels(value: float, label: str) -> None:
    from lin_probe.lightning.figure import _decade_label

    assert _decade_label(value) == label


def test_spectrum_is_eigenvalues_over_the_largest_against_rank_on_log_log_axes() -> None:
    fig = summary_figures(_history(), exit_step=None, tolerance=0.1, spectra=SPECTRA)["4_spectrum"]
    ax = _only_axes(fig)
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert _legend_texts(fig) == list(SPECTRA)
    for label, eigenvalues in SPECTRA.items():
        kept = eigenvalues[np.isfinite(eigenvalues) & (eigenvalues > 0)]
        expected = np.sort(kept)[::-1] / kept.max()
        (line,) = _labelled(fig, label)
        np.testing.assert_allclose(line.get_ydata(), expected)
        np.testing.assert_array_equal(line.get_xdata(), np.arange(1, kept.size + 1))
    (init,) = _labelled(fig, "init (step 0)")
    np.testing.assert_allclose(init.get_ydata(), [1.0, 0.5, 0.25, 0.125])  # written out by hand


def test_nan_in_history_is_a_gap_and_a_missing_value_is_skipped() -> None:
    history = _history()
    history[2] = {"step": 10, "functional_distance_rel": NAN, "loss_network": NAN, "ntk_gap": NAN}
    figures = summary_figures(history, exit_step=75, tolerance=0.1)
    for fig in figures.values():
        render(fig)
    (rel,) = _labelled(figures["2_distance"], "linear model")
    np.testing.assert_array_equal(rel.get_xdata(), [0.0, 1.0, 10.0, 75.0, 100.0])
    assert math.isnan(rel.get_ydata()[1]) and math.isnan(rel.get_ydata()[2])
    (linear_loss,) = _labelled(figures["1_loss"], "linear model")
    np.testing.assert_array_equal(linear_loss.get_xdata(), [0.0, 75.0, 100.0])  # not recorded at 1, 10
    (drift,) = _labelled(figures["3_ntk"], "drift from init")
    np.testing.assert_array_equal(drift.get_xdata(), [0.0, 100.0])


def test_pyplot_figures_are_left_alone() -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    summary_images(_history(memo=True), exit_step=75, tolerance=0.1, spectra=SPECTRA)
    assert plt.get_fignums() == before


def test_pyplot_is_never_imported_and_rc_params_are_unchanged() -> None:
    # a fresh interpreter: in this one pyplot may already be imported, rcParams changed by earlier tests
    script = textwrap.dedent(
        """
        import sys
        import matplotlib
        import numpy as np
        from lin_probe.lightning.figure import summary_images
        def rc():  # reading "backend" would resolve it, importing pyplot
            return {k: matplotlib.rcParams[k] for k in matplotlib.rcParams if k != "backend"}
        rc_before = rc()
        images = summary_images([{"step": 0, "loss_network": 1.0, "functional_distance_rel": 0.0,
                                  "ntk_gap": 0.1}], exit_step=0, tolerance=0.1,
                                spectra={"init (step 0)": np.array([2.0, 1.0])})
        assert len(images) == 4
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        assert rc() == rc_before, "rcParams changed"
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_missing_matplotlib_raises_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match="needs matplotlib"):
        summary_images(_history(), exit_step=None, tolerance=0.1)
