"""A real TensorBoard server on an example's logs serves the lin_probe scalars and dashboard layout.

Runs ``examples/add_to_existing_trainer.py --fast``, starts the package's own server on 127.0.0.1
and a free port (the browser tests' ``tensorboard_server``), and queries its HTTP data API the way
the web UI does. Offline: the server only reads the local log directory, and is always stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _examples import run_example
from browser._tensorboard_browser import TensorBoard, tensorboard_server, wait_until

TIMEOUT_S = 90.0


def wait_json(server: TensorBoard, path: str, ready: Callable[[Any], Any]) -> Any:
    """Poll ``path`` until ``ready(payload)`` holds (the server loads event files in the background)."""

    def payload() -> Any:
        value = server.get_json(path)
        return value if ready(value) else None

    return wait_until(payload, f"{path} to be ready", timeout=TIMEOUT_S)


@pytest.mark.slow
def test_tensorboard_serves_lin_probe_scalars_and_layout(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    run_example("add_to_existing_trainer.py", log_dir)
    server_log = tmp_path / "tensorboard.log"
    with tensorboard_server(log_dir, log_path=server_log, timeout=TIMEOUT_S) as server:
        try:
            plugins = wait_json(
                server,
                "/data/plugins_listing",
                lambda p: p.get("scalars", {}).get("enabled") and p.get("custom_scalars", {}).get("enabled"),
            )
            assert plugins["scalars"]["enabled"] and plugins["custom_scalars"]["enabled"]

            run = "existing_trainer/version_0"
            series_runs = [f"{run}/lin_probe/{name}" for name in ("network", "linear", "tolerance")]
            tags = wait_json(
                server,
                "/data/plugin/scalars/tags",
                lambda t: all("lin_probe/loss" in t.get(r, {}) for r in series_runs[:2]),
            )
            # one TensorBoard run per series (TensorBoard colours by run), the summary in the main run
            assert set(series_runs) <= set(tags), sorted(tags)
            assert "lin_probe/functional_distance_rel" in tags[f"{run}/lin_probe/linear"]
            assert "lin_probe/ntk" in tags[f"{run}/lin_probe/ntk_drift"]
            assert "lin_probe_summary/fit_a" in tags[run], sorted(tags[run])

            query = f"?run={run}/lin_probe/linear&tag=lin_probe/functional_distance_rel"
            series = server.get_json(
                "/data/plugin/scalars/scalars" + query
            )  # [[wall_time, step, value], ...]
            assert series[0][1] == 0 and series[0][2] == 0.0
            assert len(series) >= 4 and all(row[2] >= 0 for row in series)
            query = f"?run={run}/lin_probe/tolerance&tag=lin_probe/functional_distance_rel"
            tolerance = server.get_json("/data/plugin/scalars/scalars" + query)
            assert [row[1] for row in tolerance] == [row[1] for row in series]
            assert len({row[2] for row in tolerance}) == 1, "the tolerance is a constant line"

            layout = wait_json(
                server, "/data/plugin/custom_scalars/layout", lambda p: bool(p.get("category"))
            )
            category = layout["category"][0]
            assert category["title"] == "lin_probe"
            titles = [chart["title"] for chart in category["chart"]]
            assert "loss: network vs linear" in titles and "accuracy and agreement" in titles, titles
            loss_chart = next(c for c in category["chart"] if c["title"] == "loss: network vs linear")
            assert loss_chart["multiline"]["tag"] == ["^lin_probe/loss$"]
        except AssertionError:
            print(server.log_tail())
            raise
