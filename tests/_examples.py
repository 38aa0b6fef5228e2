"""Running ``examples/*.py`` as a user does, for the tests that check what an example prints or logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def example_process(
    name: str, log_dir: Path, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``examples/<name> --fast --log-dir <log_dir> *args`` from the repository root, one thread,
    Python's default warning filters; fail with its output unless it exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--fast", "--log-dir", str(log_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def run_example(name: str, log_dir: Path, *args: str) -> str:
    """:func:`example_process`'s stdout."""
    return example_process(name, log_dir, *args).stdout
