"""TensorBoard panels: what is written must read back with TensorBoard's own reader."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _lightning_setups import CLASSIFICATION_TAGS, MEMO_TAGS, SCALAR_TAGS
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard import SummaryWriter

from lin_probe import AffineKernel
from lin_probe.lightning.tensorboard import (
    PREFIX,
    TensorBoardPanels,
    custom_scalar_layout,
    exit_card,
    fit_card,
    run_figure,
    tag,
)

LAYOUT_TAG = "custom_scalars__config__"

ALL_TAGS = ["lin_probe/" + name for name in SCALAR_TAGS + CLASSIFICATION_TAGS + MEMO_TAGS]

EXPECTED_CHARTS = {
    "loss: network vs linear": {"lin_probe/loss_network", "lin_probe/loss_linear"},
    "functional distance": {"lin_probe/functional_distance"},
    "functional distance (relative)": {"lin_probe/functional_distance_rel"},
    "NTK: gap to affine kernel and drift": {"lin_probe/ntk_gap", "lin_probe/ntk_drift"},
    "in linear regime": {"lin_probe/in_linear_regime"},
}
MEMO_ADDITIONS = {
    "loss: network vs linear": {"lin_probe/memo/loss_linear"},
    "functional distance": {"lin_probe/memo/functional_distance"},
    "functional distance (relative)": {"lin_probe/memo/functional_distance_rel"},
}
CLASSIFICATION_CHART = {
    "accuracy and agreement": {
        "lin_probe/accuracy_network",
        "lin_probe/accuracy_linear",
        "lin_probe/agreement",
    }
}


def _read(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "histograms": 0, "images": 0})
    acc.Reload()
    return acc


def _layouts(acc: EventAccumulator) -> list[layout_pb2.Layout]:
    layouts = []
    for event in acc.Tensors(LAYOUT_TAG):
        layout = layout_pb2.Layout()
        layout.ParseFromString(event.tensor_proto.string_val[0])
        layouts.append(layout)
    return layouts


def _matched_tags(chart: layout_pb2.Chart) -> set[str]:
    """Every known tag that the chart's regexes pick up, the way the plugin does (``re.match``)."""
    return {t for t in ALL_TAGS if any(re.compile(rx).match(t) for rx in chart.multiline.tag)}


def _written_layout(tmp_path: Path, **flags: bool) -> layout_pb2.Layout:
    writer = SummaryWriter(log_dir=str(tmp_path))
    panels = TensorBoardPanels(writer)
    panels.register_layout(**flags)
    panels.flush()
    writer.close()
    (layout,) = _layouts(_read(tmp_path))
    return layout


#: A number standing alone: not part of a longer number or a word ("0.25" is not found in "0.2513").
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.]*\d)")


def _table(markdown: str) -> dict[str, list[str]]:
    """A markdown table's body as ``{first cell: other cells}`` (header and ``|---|`` rows skipped)."""
    rows = [line.strip().strip("|").split("|") for line in markdown.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in row] for row in rows]
    body = [row for row in cells[1:] if not all(set(c) <= set("-: ") for c in row)]
    table = {row[0]: row[1:] for row in body}
    assert len(table) == len(body), "row labels must be unique"
    return table


def _prose_numbers(markdown: str) -> list[float]:
    """Every stand-alone number outside the tables."""
    text = "\n".join(line for line in markdown.splitlines() if not line.startswith("|"))
    return [float(m) for m in NUMBER.findall(text)]


def _cell(value: str) -> float:
    (number,) = NUMBER.findall(value)
    assert number == value, f"cell {value!r} is not a bare number"
    return float(number)


# Cards round to 4 significant digits: a relative tolerance of 5e-4 accepts that and nothing coarser
# (0.25 vs 0.2513 is 5e-3 apart).
CARD_REL = 5e-4


def _history() -> list[dict[str, float]]:
    return [
        {"step": 0, "functional_distance": 0.0, "functional_distance_rel": 0.0, "ntk_gap": 0.12,
         "ntk_drift": 0.0, "loss_network": 1.0, "loss_linear": 1.0},
        {"step": 1, "functional_distance": 0.01, "functional_distance_rel": float("nan"),
         "loss_network": 0.9},
        {"step": 10, "functional_distance": 0.05, "functional_distance_rel": 0.04, "ntk_gap": 0.15,
         "ntk_drift": 0.05, "loss_network": 0.5, "loss_linear": 0.55},
        {"step": 100, "functional_distance": 0.4, "functional_distance_rel": 0.3, "ntk_gap": 0.5,
         "ntk_drift": 0.6, "loss_network": 0.1, "loss_linear": 0.3},
    ]  # fmt: skip


def test_tag_prefixes_name() -> None:
    assert PREFIX == "lin_probe/"
    assert tag("ntk_gap") == "lin_probe/ntk_gap"


@pytest.mark.parametrize("classification", [False, True])
@pytest.mark.parametrize("memorization", [False, True])
def test_layout_read_back_charts_match_only_their_tags(
    tmp_path: Path, classification: bool, memorization: bool
) -> None:
    layout = _written_layout(tmp_path, classification=classification, memorization=memorization)
    expected = {title: set(tags) for title, tags in EXPECTED_CHARTS.items()}
    if memorization:
        for title, extra in MEMO_ADDITIONS.items():
            expected[title] |= extra
    if classification:
        expected.update(CLASSIFICATION_CHART)

    assert [c.title for c in layout.category] == ["lin_probe"]
    charts = {chart.title: chart for chart in layout.category[0].chart}
    assert set(charts) == set(expected)
    for title, chart in charts.items():
        assert chart.WhichOneof("content") == "multiline"
        assert _matched_tags(chart) == expected[title], title


def test_layout_regexes_are_anchored_at_both_ends() -> None:
    charts = custom_scalar_layout(memorization=True)["lin_probe"]
    (distance_rx,) = charts["functional distance"][1][:1]
    assert re.match(distance_rx, "lin_probe/functional_distance")
    assert not re.match(distance_rx, "lin_probe/functional_distance_rel")
    assert not re.match(distance_rx, "other/lin_probe/functional_distance")
    assert not re.match(distance_rx, "lin_probeXfunctional_distance")


def test_register_layout_twice_writes_once(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path))
    first, second = TensorBoardPanels(writer), TensorBoardPanels(writer)
    first.register_layout()
    first.register_layout(classification=True)
    second.register_layout(memorization=True)
    first.flush()
    writer.close()
    layouts = _layouts(_read(tmp_path))
    assert len(layouts) == 1
    titles = {chart.title for chart in layouts[0].category[0].chart}
    assert titles == set(EXPECTED_CHARTS)


def test_register_layout_on_separate_writers_writes_each(tmp_path: Path) -> None:
    for run in ("a", "b"):
        writer = SummaryWriter(log_dir=str(tmp_path / run))
        TensorBoardPanels(writer).register_layout()
        writer.close()
    assert len(_layouts(_read(tmp_path / "a"))) == 1
    assert len(_layouts(_read(tmp_path / "b"))) == 1


def test_text_card_reads_back_with_numbers(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path))
    panels = TensorBoardPanels(writer)
    card = fit_card(
        AffineKernel(0.4321, 0.0789, 0.2468, rel_error=0.0531),
        n_probe=64,
        probe_source="validation",
        n_parameters=12345,
        center=True,
    )
    panels.text("fit", card, step=0)
    panels.flush()
    writer.close()
    events = _read(tmp_path).Tensors("lin_probe/fit/text_summary")
    assert len(events) == 1
    assert events[0].step == 0
    text = events[0].tensor_proto.string_val[0].decode("utf-8")
    _assert_fit_card(
        text, (0.4321, 0.0789, 0.2468, 0.0531), n_probe=64, n_parameters=12345, source="validation"
    )


def _assert_fit_card(
    card: str,
    coefficients: tuple[float, float, float, float],
    *,
    n_probe: int,
    n_parameters: int,
    source: str,
) -> None:
    """One row per coefficient (a, b, c, rel_error, in that order) holding exactly its value, one column."""
    table = _table(card)
    assert len(table) == 4
    for (label, cells), expected in zip(table.items(), coefficients, strict=True):
        assert len(cells) == 1, label  # fitted values only: no second column
        assert _cell(cells[0]) == pytest.approx(expected, rel=CARD_REL), label
    assert [label.split()[0].strip("`") for label in table] == ["a", "b", "c", "relative"]
    prose = _prose_numbers(card)
    assert n_probe in prose and n_parameters in prose
    assert re.search(rf"\b{source}\b", card)


def test_eigenvalue_histogram_count_min_max(tmp_path: Path) -> None:
    eigenvalues = torch.tensor([3.5e-4, 0.02, 0.7, 1.9, 12.0, 250.0], dtype=torch.float64)
    writer = SummaryWriter(log_dir=str(tmp_path))
    panels = TensorBoardPanels(writer)
    panels.eigenvalue_histogram(eigenvalues, step=7)
    panels.flush()
    writer.close()
    (event,) = _read(tmp_path).Histograms("lin_probe/ntk_eigenvalues")
    assert event.step == 7
    assert event.histogram_value.num == 6
    assert event.histogram_value.min == pytest.approx(3.5e-4)
    assert event.histogram_value.max == pytest.approx(250.0)


def test_eigenvalue_histogram_drops_non_finite(tmp_path: Path) -> None:
    eigenvalues = torch.tensor([1.0, float("nan"), 4.0, float("inf")], dtype=torch.float32)
    writer = SummaryWriter(log_dir=str(tmp_path))
    TensorBoardPanels(writer).eigenvalue_histogram(eigenvalues, step=0)
    writer.close()
    (event,) = _read(tmp_path).Histograms("lin_probe/ntk_eigenvalues")
    assert (event.histogram_value.num, event.histogram_value.min, event.histogram_value.max) == (2, 1.0, 4.0)


def test_figure_logged_as_image(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path))
    panels = TensorBoardPanels(writer)
    panels.figure(_history(), exit_step=100, tolerance=0.1, step=100)
    panels.flush()
    writer.close()
    (event,) = _read(tmp_path).Images("lin_probe/summary")
    assert event.step == 100
    assert event.width > 100 and event.height > 100
    assert event.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_skipped_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    assert run_figure(_history(), exit_step=None, tolerance=0.1) is None
    writer = SummaryWriter(log_dir=str(tmp_path))
    TensorBoardPanels(writer).figure(_history(), exit_step=None, tolerance=0.1, step=3)
    TensorBoardPanels(writer).text("still_alive", "ok", step=3)
    writer.close()
    acc = _read(tmp_path)
    assert acc.Tags()["images"] == []
    assert "lin_probe/still_alive/text_summary" in acc.Tags()["tensors"]


def _exit_lines(fig: Figure) -> int:
    return sum(
        1 for ax in fig.axes for line in ax.get_lines() if line.get_label().startswith("exit (step 100)")
    )


def test_run_figure_panels_axes_and_exit_line() -> None:
    fig = run_figure(_history(), exit_step=100, tolerance=0.1)
    assert isinstance(fig, Figure)
    main_axes = [ax for ax in fig.axes if ax.get_ylabel() != "‖f − f_lin‖ / ‖f − f₀‖"]
    assert len(main_axes) == 3
    assert all(ax.get_xscale() == "symlog" for ax in main_axes)
    assert _exit_lines(fig) == 3
    assert all(ax.get_title() and ax.get_legend() is not None for ax in main_axes)
    (rel_ax,) = [ax for ax in fig.axes if ax not in main_axes]
    tolerance_lines = [ln for ln in rel_ax.get_lines() if ln.get_linestyle() == "--"]
    assert [tuple(ln.get_ydata()) for ln in tolerance_lines] == [(0.1, 0.1)]


def test_run_figure_draws_nan_as_gap() -> None:
    fig = run_figure(_history(), exit_step=None, tolerance=0.1)
    assert fig is not None
    (rel_line,) = [
        ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == "functional_distance_rel"
    ]
    np.testing.assert_array_equal(rel_line.get_xdata(), [0.0, 1.0, 10.0, 100.0])
    assert math.isnan(rel_line.get_ydata()[1])
    (loss_linear,) = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == "loss_linear"]
    np.testing.assert_array_equal(loss_linear.get_xdata(), [0.0, 10.0, 100.0])  # missing at step 1


def test_run_figure_without_exit_ntk_or_loss() -> None:
    history = [{"step": 0, "functional_distance": 0.0, "functional_distance_rel": float("nan")}]
    fig = run_figure(history, exit_step=None, tolerance=0.2)
    assert fig is not None
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == [
        "functional distance to the linear model"
    ]
    assert not any(ln.get_label().startswith("exit") for ax in fig.axes for ln in ax.get_lines())
    fig.canvas.draw()  # renders despite a single point and an all-NaN curve


def test_run_figure_single_record_renders(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path))
    TensorBoardPanels(writer).figure(_history()[:1], exit_step=0, tolerance=0.1, step=0)
    writer.close()
    assert len(_read(tmp_path).Images("lin_probe/summary")) == 1


@pytest.mark.parametrize(("rel_error", "verdict"), [(0.29, "good"), (0.3, "good"), (0.31, "poor")])
def test_fit_card_numbers_and_verdict(rel_error: float, verdict: str) -> None:
    card = fit_card(
        AffineKernel(0.5, 0.25, 0.125, rel_error=rel_error),
        n_probe=32,
        probe_source="train",
        n_parameters=999,
        center=False,
    )
    _assert_fit_card(card, (0.5, 0.25, 0.125, rel_error), n_probe=32, n_parameters=999, source="train")
    other = {"good": "poor", "poor": "good"}[verdict]
    assert f"{verdict} proxy" in card and f"{other} proxy" not in card
    assert "closed form" not in card


def test_fit_card_rounds_to_four_significant_digits() -> None:
    card = fit_card(
        AffineKernel(0.251349, 1234.56, 3.14159e-5, rel_error=None),
        n_probe=8,
        probe_source="validation",
        n_parameters=10,
        center=True,
    )
    table = _table(card)
    values = [cells[0] for cells in table.values()]
    assert [float(v) for v in values[:3]] == pytest.approx([0.2513, 1235.0, 3.142e-5], rel=1e-12)
    assert values[3] == "n/a"  # no error measured
    assert "unknown" in card and "poor proxy" not in card


def test_exit_card_states_step_and_numbers() -> None:
    record = {"step": 140, "functional_distance_rel": 0.2718, "functional_distance": 0.0314, "ntk_gap": 0.577}
    card = exit_card(120, record, tolerance=0.15, patience=3)
    assert re.search(r"left the linear regime at step 120\b", card)
    table = {label.strip("`"): cells for label, cells in _table(card).items()}
    assert set(table) == {"functional_distance_rel", "functional_distance", "ntk_gap"}  # the step is in prose
    for name in table:
        (cell,) = table[name]
        assert _cell(cell) == pytest.approx(record[name], rel=CARD_REL), name
    prose = _prose_numbers(card)
    # the heading's step, the deciding value against the tolerance, the patience, the step of the record
    for number in (120, 0.2718, 0.15, 3, 140):
        assert any(n == pytest.approx(number, rel=CARD_REL) for n in prose), (number, prose)
    assert re.search(r"\bpatience 3\b", card)
