"""Screenshots of lin_probe's TensorBoard dashboard for the docs.

Runs ``examples/demo.py`` (full size by default, ``--fast`` for a quick one) into a temporary log
directory, serves it with a real TensorBoard on 127.0.0.1, and has a headless Chromium write

    <out>/dashboard_timeseries.png      Time Series, filtered to the loss / distance / regime charts
    <out>/dashboard_custom_scalars.png  Custom Scalars: network vs linear, distance vs tolerance, ...
    <out>/dashboard_images.png          Images: the run's summary figures
    <out>/dashboard_hparams.png         HParams: the session's settings and summary values

Usage: ``python tools/screenshots.py [--out docs/figures] [--fast] [--log-dir EXISTING_LOGS]``.
Needs Chromium and chromedriver (``make browser``). Offline: nothing leaves the machine. The browser
plumbing is the dashboard tests' (``tests/browser/_tensorboard_browser.py``), imported by path.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
HELPERS = ROOT / "tests" / "browser" / "_tensorboard_browser.py"
VIEWPORT = (1400, 900)
TIMESERIES_TAGS = ["lin_probe/loss", "lin_probe/functional_distance_rel", "lin_probe/in_linear_regime"]
CUSTOM_CHARTS = ["loss: network vs linear", "functional distance (relative) vs tolerance"]
HPARAMS_HEIGHT = 420  # the table holds one session: the header, one row, the left pane's top
RUNS_PANE_PX = 340  # wide enough for "demo/version_0/lin_probe/tolerance"
# Time Series smoothing (TensorBoard's default is 0.6): 0 shows the logged values, so the exit run's
# segment lies on the linear run's curve, as it does in the data. ``--smoothing`` changes it.
SMOOTHING = 0.0


def load_helpers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_tensorboard_browser", HELPERS)
    assert spec is not None and spec.loader is not None, HELPERS
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


tb = load_helpers()


class View(NamedTuple):
    width: int  # CSS pixels; a tab may widen it (HParams) or make it taller (to fit its cards)
    height: int
    smoothing: float


def run_demo(log_dir: Path, *, fast: bool) -> str:
    """``examples/demo.py`` into ``log_dir``; returns its stdout (exits with its output on failure)."""
    cmd = [sys.executable, str(ROOT / "examples" / "demo.py"), "--log-dir", str(log_dir)]
    if fast:
        cmd.append("--fast")
    print("running", " ".join(cmd[1:]), flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ})
    if proc.returncode != 0:
        sys.exit(f"demo.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    exit_lines = [line.strip() for line in proc.stdout.splitlines() if "exit step" in line]
    print(
        f"demo done in {time.monotonic() - start:.0f} s; {exit_lines[-1] if exit_lines else 'no exit line'}"
    )
    return proc.stdout


def set_viewport(driver: Any, width: int, height: int) -> None:
    """An exact CSS-pixel viewport (the window size of headless Chromium includes its frame)."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )


def fit_height(driver: Any, selector: str, *, width: int, min_height: int, max_height: int = 2000) -> None:
    """Grow (or shrink) the viewport to end just below the last element matching ``selector``."""
    bottom = tb.run_js(
        driver,
        "const boxes = deepQueryAll(arguments[0]).map((e) => e.getBoundingClientRect())"
        "  .filter((b) => b.height > 0);"
        "return boxes.length ? Math.max(...boxes.map((b) => b.bottom)) : 0;",
        selector,
    )
    height = max(min_height, min(max_height, int(bottom) + 16))
    set_viewport(driver, width, height)
    settle()


def settle(seconds: float = 1.5) -> None:
    """Let charts finish redrawing after a layout change (they animate and debounce resizes)."""
    time.sleep(seconds)


def shoot_timeseries(driver: Any, server: Any, path: Path, view: View) -> None:
    tb.open_timeseries(driver, server, TIMESERIES_TAGS, query=f"smoothing={view.smoothing}")
    tb.wait_for_timeseries_cards(driver, TIMESERIES_TAGS)
    close = driver.execute_script("return document.querySelector('button[aria-label=\"Close side pane\"]')")
    if close is not None:
        close.click()
    driver.execute_script(
        "const nav = document.querySelector('tb-dashboard-layout nav.sidebar');"
        "if (nav) { nav.style.width = arguments[0] + 'px'; }"
        "window.dispatchEvent(new Event('resize'));",
        RUNS_PANE_PX,
    )
    settle()
    fit_height(driver, "scalar-card", width=view.width, min_height=view.height)
    tb.wait_for_timeseries_cards(driver, TIMESERIES_TAGS)
    settle()
    tb.save_screenshot(driver, path)


def shoot_custom_scalars(driver: Any, server: Any, path: Path, view: View) -> None:
    tb.open_dashboard(driver, server, "custom_scalars")

    def drawn() -> bool:
        cards = tb.custom_scalar_cards(driver, CUSTOM_CHARTS)
        return all(t in cards and cards[t]["lines"] > 0 for t in CUSTOM_CHARTS)

    tb.wait_until(drawn, f"the Custom Scalars charts {CUSTOM_CHARTS}")
    fit_height(driver, "tf-custom-scalar-multi-line-chart-card", width=view.width, min_height=view.height)
    tb.save_screenshot(driver, path)


def shoot_images(driver: Any, server: Any, path: Path, view: View) -> None:
    tb.open_dashboard(driver, server, "images")

    def loaded() -> bool:
        figures = [e for e in tb.image_loaders(driver) if e["tag"].startswith("lin_probe/figure/")]
        return bool(figures) and all(e["loaded"] for e in figures)

    tb.wait_until(loaded, "the Images tab's lin_probe figures to load")
    fit_height(driver, "tf-image-loader", width=view.width, min_height=view.height)
    tb.save_screenshot(driver, path)


def shoot_hparams(driver: Any, server: Any, path: Path, view: View) -> None:
    tb.open_dashboard(driver, server, "hparams")
    tb.wait_until(
        lambda: (t := tb.hparams_table(driver)) and t["body"], "the HParams table to list a session"
    )
    # Wide enough for every column (the metrics come after the hparams; the columns stretch with
    # the grid, so widen until nothing overflows), and short: the table has one row.
    overflow_js = (
        "const table = deepQueryAll('vaadin-grid')[0].shadowRoot.querySelector('#table');"
        "return table.scrollWidth - table.clientWidth;"
    )
    view_width = view.width
    for _ in range(6):
        set_viewport(driver, view_width, HPARAMS_HEIGHT)
        settle(0.5)
        overflow = int(tb.run_js(driver, overflow_js))
        if overflow <= 0 or view_width >= 3000:
            break
        view_width = min(3000, view_width + overflow + 24)
    settle()
    tb.save_screenshot(driver, path)


SHOTS = {
    "dashboard_timeseries.png": shoot_timeseries,
    "dashboard_custom_scalars.png": shoot_custom_scalars,
    "dashboard_images.png": shoot_images,
    "dashboard_hparams.png": shoot_hparams,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures", help="where the PNGs go")
    parser.add_argument("--fast", action="store_true", help="run the demo with --fast (seconds, not minutes)")
    parser.add_argument("--log-dir", type=Path, help="screenshot these logs instead of running the demo")
    parser.add_argument("--width", type=int, default=VIEWPORT[0], help="viewport width in CSS pixels")
    parser.add_argument("--height", type=int, default=VIEWPORT[1], help="viewport height in CSS pixels")
    parser.add_argument("--smoothing", type=float, default=SMOOTHING, help="Time Series smoothing, 0..0.99")
    args = parser.parse_args()
    view = View(args.width, args.height, args.smoothing)

    reason = tb.missing_browser()
    if reason is not None:
        sys.exit(f"cannot take screenshots: {reason}")
    with tempfile.TemporaryDirectory(prefix="lin-probe-screenshots-") as tmp:
        log_dir = args.log_dir
        if log_dir is None:
            log_dir = Path(tmp) / "runs"
            run_demo(log_dir, fast=args.fast)
        with tb.tensorboard_server(log_dir, log_path=Path(tmp) / "tensorboard.log") as server:
            tb.wait_until(lambda: server.get_json("/data/runs"), f"tensorboard to find runs in {log_dir}")
            with tb.chrome_driver(window=(args.width, args.height + 200)) as driver:
                for name, shoot in SHOTS.items():
                    path = args.out / name
                    set_viewport(driver, view.width, view.height)
                    shoot(driver, server, path, view)
                    print(f"wrote {path}")


if __name__ == "__main__":
    main()
