"""A real TensorBoard server on an example's logs serves the lin_probe scalars and dashboard layout.

Runs ``examples/add_to_existing_trainer.py --fast``, starts the package's own server
(``python -m tensorboard.main``) on 127.0.0.1 and a free port, and queries its HTTP data API the
way the web UI does. Offline: the server only reads the local log directory. The server process is
always stopped, in a ``finally``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from test_examples import run_example

TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=10) as response:
        assert response.status == 200
        return json.loads(response.read().decode())


def wait_for(base: str, path: str, ready: Any, proc: subprocess.Popen, deadline: float) -> Any:
    """Poll ``path`` until ``ready(payload)`` holds (the server loads event files in the background)."""
    last: Any = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"tensorboard exited with {proc.returncode}")
        try:
            last = get_json(base, path)
            if ready(last):
                return last
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{path} not ready after {TIMEOUT_S} s; last payload: {last!r}")


@pytest.mark.slow
def test_tensorboard_serves_lin_probe_scalars_and_layout(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    run_example("add_to_existing_trainer.py", log_dir)
    port = free_port()
    server_log = tmp_path / "tensorboard.log"
    with open(server_log, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(log_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--load_fast",
                "false",  # the pure-Python loader: no separate data-server binary
                "--reload_interval",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + TIMEOUT_S
    try:
        plugins = wait_for(
            base,
            "/data/plugins_listing",
            lambda p: p.get("scalars", {}).get("enabled") and p.get("custom_scalars", {}).get("enabled"),
            proc,
            deadline,
        )
        assert plugins["scalars"]["enabled"] and plugins["custom_scalars"]["enabled"]

        run = "existing_trainer/version_0"
        series_runs = [f"{run}/lin_probe/{name}" for name in ("network", "linear", "tolerance")]
        tags = wait_for(
            base,
            "/data/plugin/scalars/tags",
            lambda t: all("lin_probe/loss" in t.get(r, {}) for r in series_runs[:2]),
            proc,
            deadline,
        )
        # one TensorBoard run per series (TensorBoard colours by run), the summary in the main run
        assert set(series_runs) <= set(tags), sorted(tags)
        assert "lin_probe/functional_distance_rel" in tags[f"{run}/lin_probe/linear"]
        assert "lin_probe/ntk" in tags[f"{run}/lin_probe/ntk_drift"]
        assert "lin_probe_summary/fit_a" in tags[run], sorted(tags[run])

        query = f"?run={run}/lin_probe/linear&tag=lin_probe/functional_distance_rel"
        series = get_json(base, "/data/plugin/scalars/scalars" + query)  # [[wall_time, step, value], ...]
        assert series[0][1] == 0 and series[0][2] == 0.0
        assert len(series) >= 4 and all(row[2] >= 0 for row in series)
        query = f"?run={run}/lin_probe/tolerance&tag=lin_probe/functional_distance_rel"
        tolerance = get_json(base, "/data/plugin/scalars/scalars" + query)
        assert [row[1] for row in tolerance] == [row[1] for row in series]
        assert len({row[2] for row in tolerance}) == 1, "the tolerance is a constant line"

        layout = wait_for(
            base, "/data/plugin/custom_scalars/layout", lambda p: bool(p.get("category")), proc, deadline
        )
        category = layout["category"][0]
        assert category["title"] == "lin_probe"
        titles = [chart["title"] for chart in category["chart"]]
        assert "loss: network vs linear" in titles and "accuracy and agreement" in titles, titles
        loss_chart = next(c for c in category["chart"] if c["title"] == "loss: network vs linear")
        assert loss_chart["multiline"]["tag"] == ["^lin_probe/loss$"]
    except AssertionError:
        print(server_log.read_text()[-3000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
