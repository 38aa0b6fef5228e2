"""The lin_probe dashboard as a user sees it: ``examples/demo.py --fast``'s logs in a real TensorBoard
server, looked at with a headless Chromium.

One demo run, one server and one browser for the whole module. Each test opens one TensorBoard tab,
waits (bounded) for it to render, checks what a user must be able to see there, and saves a
screenshot of the tab under its ``tmp_path`` (the path is printed when the test fails). The layout
checked is the one of the dashboard spec: every series that must be told apart is its own run,
``<main run>/lin_probe/{network,linear,tolerance,since_exit,...}``, so TensorBoard colours them apart.

Needs Chromium and chromedriver (``make browser``); fails, with that hint, without them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from _examples import example_process

from browser._tensorboard_browser import (
    HPARAMS_DEFAULT_COLUMNS,
    TensorBoard,
    chrome_driver,
    custom_scalar_cards,
    hparams_table,
    image_loaders,
    missing_browser,
    open_dashboard,
    open_timeseries,
    pixels_near,
    rgb,
    run_colours,
    save_screenshot,
    tensorboard_server,
    timeseries_canvas,
    wait_for_runs,
    wait_for_timeseries_cards,
    wait_until,
)
from browser._tensorboard_browser import browser_json as api

pytestmark = pytest.mark.slow

MAIN_RUN = "demo/version_0"  # TensorBoardLogger(log_dir, name="demo") in a fresh directory
TOLERANCE = 0.1  # examples/demo.py's LinearRegimeMonitor(tolerance=0.1)
EXIT_LINE = re.compile(r"exit step: .* at step (\d+)")


def sub_run(name: str) -> str:
    return f"{MAIN_RUN}/lin_probe/{name}"


@dataclass
class Demo:
    log_dir: Path
    exit_step: int
    stdout: str


@dataclass
class Dashboard:
    server: TensorBoard
    driver: Any
    demo: Demo


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """``examples/demo.py --fast`` run as a user runs it, into a fresh log directory.

    ``LIN_PROBE_DASHBOARD_LOGDIR`` (with ``LIN_PROBE_DASHBOARD_EXIT_STEP``) points the tests at an
    existing log directory instead, to iterate on the browser checks without re-running the demo.
    """
    if os.environ.get("LIN_PROBE_DASHBOARD_LOGDIR"):
        return Demo(
            Path(os.environ["LIN_PROBE_DASHBOARD_LOGDIR"]),
            int(os.environ["LIN_PROBE_DASHBOARD_EXIT_STEP"]),
            "",
        )
    log_dir = tmp_path_factory.mktemp("dashboard") / "runs"
    proc = example_process("demo.py", log_dir, timeout=600)
    found = EXIT_LINE.findall(proc.stdout)
    assert len(found) == 1, (
        "demo.py --fast should print one 'exit step: ... at step N' line (the dashboard's exit marker "
        f"needs an exit to show); got {found}:\n{proc.stdout[-3000:]}"
    )
    return Demo(log_dir, int(found[0]), proc.stdout)


@pytest.fixture(scope="module")
def browser_available() -> None:
    """Fail at once, with the fix, when Chromium or chromedriver is missing (before the demo runs)."""
    reason = missing_browser()
    if reason is not None:
        pytest.fail(f"the dashboard tests need a headless browser: {reason}", pytrace=False)


@pytest.fixture(scope="module")
def dashboard(
    browser_available: None, demo: Demo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Dashboard]:
    server_log = tmp_path_factory.mktemp("tensorboard") / "tensorboard.log"
    with tensorboard_server(demo.log_dir, log_path=server_log) as server:
        try:
            wait_for_runs(server, [MAIN_RUN, sub_run("network"), sub_run("linear")])
        except AssertionError as exc:
            listed = sorted(server.get_json("/data/runs"))
            raise AssertionError(
                f"{exc}\nThe demo's logs hold the runs {listed}: without separate network/linear runs "
                "TensorBoard draws both losses in one colour and a user cannot tell them apart."
            ) from None
        with chrome_driver() as driver:
            yield Dashboard(server, driver, demo)


@contextmanager
def tab_screenshot(dash: Dashboard, path: Path) -> Iterator[None]:
    """Screenshot the page into ``path`` when the block ends; on a failure print where it is."""
    try:
        yield
    except BaseException:
        try:
            save_screenshot(dash.driver, path)
            print(f"screenshot of the tab at the failure: {path}")
        except Exception as exc:
            print(f"could not save a screenshot to {path}: {exc!r}")
        print(f"tensorboard log (tail):\n{dash.server.log_tail(2000)}")
        raise
    save_screenshot(dash.driver, path)


def series(dash: Dashboard, run: str, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one scalar series, fetched by the browser from the server."""
    rows = api(
        dash.driver, f"/data/plugin/scalars/scalars?run={quote(run, safe='')}&tag={quote(tag, safe='')}"
    )
    return [(int(step), float(value)) for _, step, value in rows]


# --------------------------------------------------------------------------- Time Series


def test_time_series_shows_network_and_linear_in_different_colours(
    dashboard: Dashboard, tmp_path: Path
) -> None:
    dash, driver = dashboard, dashboard.driver
    titles = ["lin_probe/loss", "lin_probe/functional_distance_rel"]
    with tab_screenshot(dash, tmp_path / "timeseries.png"):
        open_timeseries(driver, dash.server, titles)
        cards = wait_for_timeseries_cards(driver, titles, "a user would see no probe-loss or distance chart")
        loss_legend = cards["lin_probe/loss"]["legend"]
        for run in (sub_run("network"), sub_run("linear")):
            assert run in loss_legend, (
                f"the lin_probe/loss card's legend {loss_legend} lacks {run}: a user could not read the "
                "network's and the linear model's probe loss off one chart"
            )
        rel_legend = cards["lin_probe/functional_distance_rel"]["legend"]
        for run in (sub_run("linear"), sub_run("tolerance"), sub_run("since_exit")):
            assert run in rel_legend, (
                f"the lin_probe/functional_distance_rel card's legend {rel_legend} lacks {run}: a user "
                "would not see the distance against the tolerance line and the exit"
            )

        colours = wait_until(
            lambda: (c := run_colours(driver)) and sub_run("network") in c and sub_run("linear") in c and c,
            "the runs table to list the network and linear runs with their colour swatches",
        )
        network, linear = colours[sub_run("network")], colours[sub_run("linear")]
        assert network != linear, (
            f"network and linear runs share the colour {network}: a user cannot tell the network's curve "
            "from its linear model's"
        )
        on_rel = {name: colours.get(sub_run(name)) for name in ("linear", "tolerance", "since_exit")}
        assert len(set(on_rel.values())) == 3, (
            f"the runs on the relative-distance chart have colours {on_rel}: the distance, the tolerance "
            "line and the exit segment would not be told apart"
        )

        def drawn() -> dict[str, int]:
            png = timeseries_canvas(driver, "lin_probe/loss").screenshot_as_png
            return {name: pixels_near(png, rgb(colours[sub_run(name)])) for name in ("network", "linear")}

        counts: dict[str, int] = {}
        try:  # the canvas is sized before it is painted: give the painting a moment
            counts = wait_until(
                lambda: (c := drawn()) and min(c.values()) >= 30 and c, "both curves", timeout=10
            )
        except AssertionError:
            counts = drawn()
        for name, colour in (("network", network), ("linear", linear)):
            assert counts[name] >= 30, (
                f"the lin_probe/loss chart has {counts[name]} pixels of the {name} run's colour {colour}: "
                f"the {name} curve is not drawn, so a user sees one loss curve instead of two"
            )


# --------------------------------------------------------------------------- Custom Scalars


def test_custom_scalars_overlay_network_linear_and_tolerance(dashboard: Dashboard, tmp_path: Path) -> None:
    dash, driver = dashboard, dashboard.driver
    charts = {
        "loss: network vs linear": ("lin_probe/loss", ("network", "linear")),
        "functional distance (relative) vs tolerance": (
            "lin_probe/functional_distance_rel",
            ("linear", "tolerance", "since_exit"),
        ),
    }
    with tab_screenshot(dash, tmp_path / "custom_scalars.png"):
        open_dashboard(driver, dash.server, "custom_scalars")

        def drawn() -> dict | None:
            cards = custom_scalar_cards(driver, list(charts))
            ok = all(
                t in cards and cards[t]["lines"] >= len(runs) and len(cards[t]["entries"]) >= len(runs)
                for t, (_, runs) in charts.items()
            )
            return cards if ok else None

        try:
            cards = wait_until(drawn, f"the Custom Scalars charts {list(charts)} to draw their lines")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nCharts found: {custom_scalar_cards(driver)}. A user opening Custom Scalars would "
                "not get the network and its linear model (or the distance and its tolerance) on one chart."
            ) from None
        for title, (tag, runs) in charts.items():
            entries = {e["name"]: e["colour"] for e in cards[title]["entries"]}
            for name in runs:
                key = f"{tag} ({sub_run(name)})"
                assert key in entries, (
                    f"the Custom Scalars chart {title!r} lists {sorted(entries)}, not {key!r}: a user "
                    f"would not find the {name} series on it"
                )
            shown = [entries[f"{tag} ({sub_run(name)})"] for name in runs]
            assert len(set(shown)) == len(runs), (
                f"the series of {title!r} have colours {dict(zip(runs, shown, strict=True))}: a user "
                "could not tell them apart"
            )


# --------------------------------------------------------------------------- the exit, through the server


def test_exit_is_marked_by_the_exit_and_tolerance_runs(dashboard: Dashboard, tmp_path: Path) -> None:
    dash, driver = dashboard, dashboard.driver
    exit_step = dash.demo.exit_step
    with tab_screenshot(dash, tmp_path / "timeseries_exit.png"):
        titles = ["lin_probe/functional_distance_rel", "lin_probe/in_linear_regime"]
        open_timeseries(driver, dash.server, titles)
        wait_for_timeseries_cards(
            driver, titles, "a user would see neither the distance nor the regime chart"
        )
        runs = api(driver, "/data/runs")
        for name in ("tolerance", "since_exit"):
            assert sub_run(name) in runs, (
                f"the server lists no {sub_run(name)} run ({runs}): a user would see no "
                f"{'tolerance line' if name == 'tolerance' else 'exit marker'} on the distance chart"
            )

        exit_rel = series(dash, sub_run("since_exit"), "lin_probe/functional_distance_rel")
        assert exit_rel, "the exit run has no lin_probe/functional_distance_rel points: no exit marker"
        assert exit_rel[0][0] == exit_step, (
            f"the exit run's curve starts at step {exit_rel[0][0]}, but the demo left the linear regime at "
            f"step {exit_step}: a user reading the exit off the chart would read the wrong step"
        )
        linear_rel = dict(series(dash, sub_run("linear"), "lin_probe/functional_distance_rel"))
        for step, value in exit_rel:
            assert step in linear_rel and math.isclose(value, linear_rel[step], rel_tol=1e-6), (
                f"the exit run's distance at step {step} is {value}, the linear run's is "
                f"{linear_rel.get(step)}: the exit segment would not lie on the distance curve"
            )

        tolerance = series(dash, sub_run("tolerance"), "lin_probe/functional_distance_rel")
        assert tolerance, "the tolerance run has no points: a user would see no tolerance line"
        off = [(s, v) for s, v in tolerance if not math.isclose(v, TOLERANCE, rel_tol=1e-6)]
        assert not off, (
            f"the tolerance run is not the constant {TOLERANCE} at {off}: the line a user compares the "
            "distance against would be wrong"
        )

        inside = series(dash, sub_run("linear"), "lin_probe/in_linear_regime")
        assert [s for s, _ in inside if s < exit_step], (
            f"the linear run has no lin_probe/in_linear_regime point before the exit step {exit_step}: "
            "a user would see no 'inside the regime' segment"
        )
        wrong = [(s, v) for s, v in inside if s < exit_step and v != 1.0]
        late = [s for s, _ in inside if s >= exit_step]
        assert not wrong and not late, (
            f"in_linear_regime of the linear run: values != 1.0 before the exit at {wrong}, points at or "
            f"after the exit step {exit_step} at {late}: the regime segment would not end at the exit"
        )
        outside = series(dash, sub_run("since_exit"), "lin_probe/in_linear_regime")
        assert outside and outside[0][0] == exit_step, (
            f"the exit run's in_linear_regime starts at {outside[:1]}, not at the exit step {exit_step}: "
            "a user would not see where the network left the regime"
        )
        assert all(v == 0.0 for _, v in outside), (
            f"the exit run's in_linear_regime is not all 0.0 from the exit on ({outside}): the chart would "
            "show the network back inside the regime"
        )


def test_exit_segment_is_drawn_on_the_unsmoothed_distance_chart(dashboard: Dashboard, tmp_path: Path) -> None:
    """With smoothing off the exit run's points are the linear run's from the exit on, so the two
    lines coincide there: the exit segment is visible only if TensorBoard draws it on top."""
    dash, driver = dashboard, dashboard.driver
    title = "lin_probe/functional_distance_rel"
    with tab_screenshot(dash, tmp_path / "timeseries_unsmoothed.png"):
        open_timeseries(driver, dash.server, [title], query="smoothing=0")
        wait_for_timeseries_cards(driver, [title], "a user would see no distance chart")
        colours = wait_until(
            lambda: (c := run_colours(driver)) and sub_run("since_exit") in c and c,
            "the runs table to list the exit run with its colour swatch",
        )
        exit_colour = colours[sub_run("since_exit")]

        def exit_pixels() -> int:
            return pixels_near(timeseries_canvas(driver, title).screenshot_as_png, rgb(exit_colour))

        try:
            wait_until(lambda: exit_pixels() >= 30, "the exit segment to be drawn", timeout=5)
        except AssertionError:
            raise AssertionError(
                f"the {title} chart at smoothing 0 has {exit_pixels()} pixels of the exit run's colour "
                f"{exit_colour}: the exit segment is drawn under the linear curve (TensorBoard draws the "
                "runs in name order, and 'exit' sorts before 'linear'), so a user with smoothing off "
                "does not see where the network left the linear regime"
            ) from None


# --------------------------------------------------------------------------- Images


def test_images_tab_shows_the_run_figures(dashboard: Dashboard, tmp_path: Path) -> None:
    dash, driver = dashboard, dashboard.driver
    with tab_screenshot(dash, tmp_path / "images.png"):
        open_dashboard(driver, dash.server, "images")
        tags = api(driver, "/data/plugin/images/tags").get(MAIN_RUN, {})
        figures = sorted(t for t in tags if t.startswith("lin_probe/figure/"))
        assert "lin_probe/figure/2_distance" in figures, (
            f"the main run's images are {sorted(tags)}: a user would not find the distance-vs-tolerance "
            "figure in the Images tab"
        )

        def loaded() -> dict | None:
            shown = {e["tag"]: e for e in image_loaders(driver) if e["run"] == MAIN_RUN}
            return shown if all(t in shown and shown[t]["loaded"] for t in figures) else None

        try:
            wait_until(loaded, f"the Images tab to load the figures {figures}")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nImages on the page: {image_loaders(driver)}. A user would see an empty or broken "
                "image where lin_probe's summary figures should be."
            ) from None


# --------------------------------------------------------------------------- HParams


def test_hparams_table_shows_the_fit_and_the_exit_step(dashboard: Dashboard, tmp_path: Path) -> None:
    dash, driver = dashboard, dashboard.driver
    exit_step = dash.demo.exit_step
    wanted = ["lin_probe_summary/fit_a", "lin_probe_summary/exit_step"]
    with tab_screenshot(dash, tmp_path / "hparams.png"):
        open_dashboard(driver, dash.server, "hparams")

        grid = wait_until(
            lambda: (t := hparams_table(driver)) and t["header"] and t["body"] and t,
            "the HParams table to list a session (a user would find no run to compare)",
        )
        try:  # the columns come with the rows; a short grace period for the last ones to render
            grid = wait_until(
                lambda: (t := hparams_table(driver)) and all(w in t["header"] for w in wanted) and t,
                f"the HParams table to show the columns {wanted}",
                timeout=5,
            )
        except AssertionError as exc:
            experiment = api(driver, "/data/plugin/hparams/experiment", {})
            metrics = [m["name"]["tag"] for m in experiment.get("metricInfos", [])]
            shown = (hparams_table(driver) or {}).get("header") or []
            raise AssertionError(
                f"{exc}\nThe table's columns are {shown}; the experiment's metrics, in order, are "
                f"{metrics}, and TensorBoard shows only the first {HPARAMS_DEFAULT_COLUMNS} metrics (and "
                f"hparams) until a user ticks more. A user comparing runs in HParams would not see "
                f"{[w for w in wanted if w not in shown]}."
            ) from None
        header = grid["header"]
        rows = [r for r in grid["body"] if r and r[0] == MAIN_RUN]
        assert rows, (
            f"the HParams table's rows {grid['body']} have no session {MAIN_RUN!r}: a user would not find "
            "the demo run there"
        )
        cell = rows[0][header.index("lin_probe_summary/exit_step")]
        assert cell and float(cell) == exit_step, (
            f"the HParams table shows exit_step {cell!r} for {MAIN_RUN}, the demo left the regime at step "
            f"{exit_step}: a user comparing runs would read a wrong exit step"
        )
        fit_a = rows[0][header.index("lin_probe_summary/fit_a")]
        assert fit_a and math.isfinite(float(fit_a)), (
            f"the HParams table shows fit_a {fit_a!r}: a user would not see the fitted kernel coefficient"
        )
