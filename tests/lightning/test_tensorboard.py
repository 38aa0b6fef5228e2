"""TensorBoard panels: what is written must read back with TensorBoard's own reader."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from lin_probe import AffineKernel
from lin_probe.kernel.data_kernels import DataKernelChoice
from lin_probe.lightning.tensorboard import (
    PREFIX,
    TensorBoardPanels,
    custom_scalar_layout,
    exit_card,
    fit_card,
    tag,
)
from lin_probe.monitor.diagnosis import Verdict, diagnose

LAYOUT_TAG = "custom_scalars__config__"

# Every chart tag the series runs write (see lin_probe/lightning/series.py), and the summary tags.
ALL_TAGS = [
    "lin_probe/" + name
    for name in ("loss", "accuracy", "agreement", "functional_distance", "functional_distance_rel", "ntk",
                 "in_linear_regime", "kernel_distance", "kernel_velocity", "kernel_alignment", "ntk_scale")
] + ["lin_probe_summary/fit_a", "lin_probe_summary/exit_step"]  # fmt: skip

EXPECTED_CHARTS = {
    "loss: network vs linear": {"lin_probe/loss"},
    "functional distance": {"lin_probe/functional_distance"},
    "functional distance (relative) vs tolerance": {"lin_probe/functional_distance_rel"},
    "NTK: gap to affine kernel and drift": {"lin_probe/ntk"},
    "in linear regime": {"lin_probe/in_linear_regime"},
    "kernel distance to init (1 − cos)": {"lin_probe/kernel_distance"},
    "kernel velocity (distance per step)": {"lin_probe/kernel_velocity"},
    "kernel-target alignment (centred)": {"lin_probe/kernel_alignment"},
    "NTK scale ‖Θ_t‖/‖Θ_0‖": {"lin_probe/ntk_scale"},
}
CLASSIFICATION_CHART = {"accuracy and agreement": {"lin_probe/accuracy", "lin_probe/agreement"}}


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
def test_layout_read_back_charts_match_only_their_tags(tmp_path: Path, classification: bool) -> None:
    layout = _written_layout(tmp_path, classification=classification)
    expected = {title: set(tags) for title, tags in EXPECTED_CHARTS.items()}
    if classification:
        expected.update(CLASSIFICATION_CHART)

    assert [c.title for c in layout.category] == ["lin_probe"]
    charts = {chart.title: chart for chart in layout.category[0].chart}
    assert set(charts) == set(expected)
    for title, chart in charts.items():
        assert chart.WhichOneof("content") == "multiline"
        assert _matched_tags(chart) == expected[title], title


def test_layout_regexes_are_anchored_at_both_ends() -> None:
    charts = custom_scalar_layout()["lin_probe"]
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
    second.register_layout(classification=True)
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
        AffineKernel(0.4321, 0.0789, 0.2468, rel_error=0.0531, rel_error_centered=0.1234),
        n_probe=64,
        probe_source="validation",
        n_parameters=12345,
        center=True,
    )
    panels.text("1_fit", card, step=0)
    panels.flush()
    writer.close()
    events = _read(tmp_path).Tensors("lin_probe/1_fit/text_summary")
    assert len(events) == 1
    assert events[0].step == 0
    text = events[0].tensor_proto.string_val[0].decode("utf-8")
    _assert_fit_card(
        text, (0.4321, 0.0789, 0.2468, 0.1234, 0.0531), n_probe=64, n_parameters=12345, source="validation"
    )


def _assert_fit_card(
    card: str,
    coefficients: tuple[float, float, float, float, float],
    *,
    n_probe: int,
    n_parameters: int,
    source: str,
) -> None:
    """One row per coefficient (a, b, c, centred and uncentred error, in that order) holding exactly its
    value, one column."""
    table = _table(card)
    assert len(table) == 5
    for (label, cells), expected in zip(table.items(), coefficients, strict=True):
        assert len(cells) == 1, label  # fitted values only: no second column
        assert _cell(cells[0]) == pytest.approx(expected, rel=CARD_REL), label
    assert [label.split()[0].strip("`") for label in table] == ["a", "b", "c", "centred", "relative"]
    prose = _prose_numbers(card)
    assert n_probe in prose and n_parameters in prose
    assert re.search(rf"\b{source}\b", card)


def test_spectrum_histogram_is_log10_of_eigenvalues_over_the_largest(tmp_path: Path) -> None:
    eigenvalues = torch.tensor([3.5e-4, 0.02, 0.7, 1.9, 12.0, 250.0], dtype=torch.float64)
    writer = SummaryWriter(log_dir=str(tmp_path))
    panels = TensorBoardPanels(writer)
    panels.spectrum(eigenvalues, step=7)
    panels.flush()
    writer.close()
    (event,) = _read(tmp_path).Histograms("lin_probe/ntk_spectrum")
    assert event.step == 7
    assert event.histogram_value.num == 6
    assert event.histogram_value.min == pytest.approx(math.log10(3.5e-4 / 250.0))
    assert event.histogram_value.max == pytest.approx(0.0, abs=1e-12)
    # the bulk is spread over decades, not crushed at 0 as on a linear axis
    assert event.histogram_value.sum == pytest.approx(
        sum(math.log10(v / 250.0) for v in eigenvalues.tolist())
    )


def test_spectrum_drops_non_finite_non_positive_and_round_off(tmp_path: Path) -> None:
    eigenvalues = torch.tensor([1.0, float("nan"), 4.0, float("inf"), 0.0, -1e-9, 4e-14], dtype=torch.float32)
    writer = SummaryWriter(log_dir=str(tmp_path))
    panels = TensorBoardPanels(writer)
    panels.spectrum(eigenvalues, step=0)
    panels.spectrum(torch.tensor([float("nan"), -1.0]), step=1)  # nothing left: nothing written
    writer.close()
    (event,) = _read(tmp_path).Histograms("lin_probe/ntk_spectrum")
    hist = event.histogram_value
    assert (hist.num, hist.min, hist.max) == (2, pytest.approx(math.log10(0.25)), 0.0)


def test_images_written_per_panel_as_png(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path))
    panels = TensorBoardPanels(writer)
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255
    panels.images({"1_loss": pixels, "2_distance": pixels[:20]}, step=12)
    panels.flush()
    writer.close()
    acc = _read(tmp_path)
    assert sorted(acc.Tags()["images"]) == ["lin_probe/figure/1_loss", "lin_probe/figure/2_distance"]
    (event,) = acc.Images("lin_probe/figure/2_distance")
    assert (event.step, event.width, event.height) == (12, 40, 20)
    assert event.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


def test_hparams_session_reads_back_params_and_metric_names(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path))
    panels = TensorBoardPanels(writer)
    panels.hparams({"lr": 0.5, "lin_probe/data_kernel": "flat"}, ["hp_metric", "lin_probe_summary/fit_a"])
    panels.summary({"fit_a": 0.25}, step=0)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    contents = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(contents["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["lr"].number_value == 0.5
    assert hparams["lin_probe/data_kernel"].string_value == "flat"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(contents["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["hp_metric", "lin_probe_summary/fit_a"]
    (fit_a,) = acc.Scalars("lin_probe_summary/fit_a")
    assert (fit_a.step, fit_a.value) == (0, 0.25)


def test_series_runs_live_under_the_writers_run(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path / "version_0"))
    panels = TensorBoardPanels(writer)
    panels.series.write([("network", "loss", 3, 1.5), ("linear", "loss", 3, 1.25)], tag)
    panels.flush()
    panels.close()
    writer.close()
    for run, value in (("network", 1.5), ("linear", 1.25)):
        acc = _read(tmp_path / "version_0" / "lin_probe" / run)
        (event,) = acc.Scalars("lin_probe/loss")
        assert (event.step, event.value) == (3, value)


@pytest.mark.parametrize(("centred", "verdict"), [(0.29, "good"), (0.3, "good"), (0.31, "poor")])
def test_fit_card_numbers_and_verdict(centred: float, verdict: str) -> None:
    """The verdict reads the centred error: an uncentred 0.01 (the constant mode fits) does not make it good."""
    card = fit_card(
        AffineKernel(0.5, 0.25, 0.125, rel_error=0.01, rel_error_centered=centred),
        n_probe=32,
        probe_source="train",
        n_parameters=999,
        center=False,
    )
    _assert_fit_card(card, (0.5, 0.25, 0.125, centred, 0.01), n_probe=32, n_parameters=999, source="train")
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
    assert values[3] == values[4] == "n/a"  # no error measured
    assert "unknown" in card and "poor proxy" not in card


def test_exit_card_states_step_and_numbers() -> None:
    record = {"step": 140, "functional_distance_rel": 0.2718, "functional_distance": 0.0314, "ntk_gap": 0.577}
    card = exit_card(Verdict("left", 120), record, tolerance=0.15, patience=3)
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


def test_exit_card_for_a_network_never_inside_gives_no_exit_step_and_its_diagnosis() -> None:
    record = {"step": 4, "functional_distance_rel": 0.34, "ntk_drift": 0.0}
    diagnosis = diagnose(
        {"ntk_drift": 0.0}, step=4, tolerance=0.1, fit_rel_error_centered=0.338, from_start=True
    )
    card = exit_card(Verdict("outside_from_start"), record, tolerance=0.1, patience=3, diagnosis=diagnosis)
    assert card.startswith("### Not in the linear regime from the start")
    assert "left the linear regime at step" not in card
    assert "**Diagnosis: the kernel was never input-linear.**" in card
    assert "centred fit error 0.338" in card


def test_exit_card_of_the_linearised_verdict_names_its_shadow_and_an_indicative_one_says_so() -> None:
    record = {"step": 9, "linearized/functional_distance_rel": 0.25, "functional_distance_rel": 0.9}
    card = exit_card(Verdict("left", 8, "linearized/"), record, tolerance=0.1, patience=2)
    assert "`linearized/functional_distance_rel` (network vs the linearised network) = 0.25" in card
    indicative = exit_card(Verdict("left", 8, "", indicative=True), record, tolerance=0.1, patience=2)
    assert "*Indicative only:*" in indicative and "linearized=True" in indicative


def test_fit_card_names_the_chosen_data_kernel_and_every_candidates_scores() -> None:
    kernel = AffineKernel(0.5, 0.1, 0.2, rel_error=0.016, rel_error_centered=0.062)
    choice = DataKernelChoice(
        "patch_mean", None, kernel, {"flat": (0.057, 0.76), "patch_mean": (0.016, 0.062)}
    )
    card = fit_card(
        kernel, n_probe=8, probe_source="validation", n_parameters=10, center=True, data_kernel=choice
    )
    assert "Data kernel: **patch_mean**, the lowest centred fit error of the candidates" in card
    assert "flat: centred 0.76, uncentred 0.057" in card
