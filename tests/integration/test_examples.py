"""Every example runs with ``--fast`` as a user would run it, and prints / logs what it claims.

Each script is run in a subprocess (``sys.executable``) with its TensorBoard logs in a temporary
directory; the tests parse the printed exit step and tables and read the event files back. One
BLAS/OpenMP thread: on a shared, oversubscribed machine multi-threaded LAPACK calls (the NTK's
``eigvalsh``) can take seconds instead of milliseconds.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from _examples import example_process, run_example
from _lightning_setups import SCALAR_TAGS, Dashboard, read_events, scalar_series

LIN_PROBE_TAGS = tuple(name for name in SCALAR_TAGS if name != "exit_step")  # the exit only once found
EXIT = re.compile(r"^exit step: (\d+|none)", re.MULTILINE)


def printed_exit(stdout: str) -> int | None:
    found = EXIT.findall(stdout)
    assert len(found) == 1, f"expected one 'exit step:' line, got {found}:\n{stdout}"
    return None if found[0] == "none" else int(found[0])


VERDICT = re.compile(r"^\s*verdict: (.*)$", re.MULTILINE)


def printed_from_start(stdout: str) -> bool:
    """Whether the example printed the verdict "not in the linear regime from the start"."""
    return any("not in the linear regime from the start" in v for v in VERDICT.findall(stdout)) or (
        "was not in the linear regime from the start" in stdout
    )


def check_event_file(
    run_dir: Path, exit_step: int | None, *, ntk: bool = True, from_start: bool = False
) -> None:
    """The lin_probe scalars exist with finite values, and the logged verdict is the printed one: the exit
    step, or (``from_start``) "not in the regime from the start", with the flag at 0 from the first check."""
    assert list(run_dir.glob("events.out.tfevents.*")), f"no event file in {run_dir}"
    dashboard = Dashboard(run_dir)
    for name in LIN_PROBE_TAGS:
        if not ntk and name in ("ntk_gap", "ntk_drift"):
            continue
        values = dashboard.series(name)
        # A verdict the init fit explains takes no NTK at the exit when the plan is over budget, so
        # Θ_0's is the only one and the velocity (two NTKs apart) is not logged (RegimeProbe.conclude).
        if from_start and name == "kernel_velocity" and not values:
            continue
        assert values and all(math.isfinite(v) for v in values.values()), name
    rel = dashboard.series("functional_distance_rel")
    assert rel[0] == 0.0 and len(rel) >= 4
    logged_exit = dashboard.series("exit_step")
    regime = dashboard.series("in_linear_regime")
    assert sorted(regime) == sorted(rel), "every check's regime is written by the end of the run"
    if from_start:
        assert not logged_exit and list(dashboard.series("outside_from_start").values()) == [1.0]
        assert regime == {step: float(step == 0) for step in rel}
    elif exit_step is None:
        assert not logged_exit
        assert all(v == 1.0 for v in regime.values())
    else:
        assert list(logged_exit.values()) == [float(exit_step)]
        assert regime == {step: float(step < exit_step) for step in rel}


def table_rows(stdout: str, n_columns: int) -> list[list[str]]:
    """Whitespace-separated rows of numbers with exactly ``n_columns`` cells (the printed tables)."""
    number = re.compile(r"^-?(\d+(\.\d*)?|nan|none|-)$")
    rows = []
    for line in stdout.splitlines():
        cells = line.split()
        if len(cells) == n_columns and all(number.match(c) for c in cells):
            rows.append(cells)
    return rows


def final_accuracies(stdout: str) -> tuple[float, float, float]:
    match = re.search(r"final: accuracy network ([\d.]+), linear ([\d.]+), agreement ([\d.]+)", stdout)
    assert match, stdout
    return float(match[1]), float(match[2]), float(match[3])


@pytest.mark.slow
def test_add_to_existing_trainer(tmp_path: Path) -> None:
    out = run_example("add_to_existing_trainer.py", tmp_path)
    exit_step = printed_exit(out)
    assert f"tensorboard --logdir {tmp_path}" in out
    match = re.search(r"accuracy network ([\d.]+) vs linear model ([\d.]+)", out)
    assert match and float(match[1]) > 0.8, out  # the ordinary classifier still learns
    check_event_file(
        tmp_path / "existing_trainer" / "version_0", exit_step, from_start=printed_from_start(out)
    )


@pytest.mark.slow
def test_paper_two_layer(tmp_path: Path) -> None:
    out = run_example("paper_two_layer.py", tmp_path)
    coefficients = {}
    for label in ("closed", "fitted"):
        match = re.search(rf"^\s*{label}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.MULTILINE)
        assert match, out
        coefficients[label] = [float(v) for v in match.groups()]
    # ReLU, both layers, s = 1/d: a = 1/4 + 1/4, c = E[φ'²] + E[φ²] − a − b = 1 − a − b
    closed, fitted = coefficients["closed"], coefficients["fitted"]
    assert closed[0] == pytest.approx(0.5, abs=1e-4)
    assert sum(closed) == pytest.approx(1.0, abs=1e-3)
    for c, f in zip(closed, fitted, strict=True):
        assert f == pytest.approx(c, abs=0.05), coefficients  # width 512: finite-width error ~ a few %
    rel_error = float(re.search(r"relative spectral error of the fit: ([\d.]+)", out)[1])
    assert 0 < rel_error < 0.2
    rows = table_rows(out, 5)  # step dist_rel loss_net loss_lin ntk_drift
    steps = [int(r[0]) for r in rows]
    assert steps[:2] == [1, 10] and steps[-1] == 60, out
    loss_first, loss_last = float(rows[0][2]), float(rows[-1][2])
    assert loss_last < loss_first  # training moved
    for r in rows:
        assert 0 < float(r[1]) < 1.0  # early agreement: the shadow explains most of the movement
    check_event_file(
        tmp_path / "paper_two_layer_relu" / "version_0", printed_exit(out), from_start=printed_from_start(out)
    )


@pytest.mark.slow
def test_digits_mlp(tmp_path: Path) -> None:
    out = run_example("digits_mlp.py", tmp_path)
    assert re.search(r"^4-hidden-layer ReLU MLP", out, re.MULTILINE), out
    network, linear, agreement = final_accuracies(out)
    assert network > 0.5 and linear > 0.5 and 0 < agreement <= 1
    rows = table_rows(out, 6)
    assert [int(r[0]) for r in rows][:5] == [0, 1, 2, 4, 8]
    assert float(rows[0][1]) == 0.0 and float(rows[0][4]) == 1.0  # identical at init
    check_event_file(
        tmp_path / "digits_mlp" / "version_0", printed_exit(out), from_start=printed_from_start(out)
    )


@pytest.mark.slow
def test_digits_cnn(tmp_path: Path) -> None:
    out = run_example("digits_cnn.py", tmp_path)
    assert re.search(r"^CNN \(16 channels\) on 8×8 digits", out, re.MULTILINE), out
    network, _, agreement = final_accuracies(out)
    assert network > 0.3 and 0 < agreement <= 1
    rows = table_rows(out, 6)
    assert float(rows[0][1]) == 0.0 and float(rows[0][2]) == pytest.approx(float(rows[0][3]))
    check_event_file(
        tmp_path / "digits_cnn" / "version_0", printed_exit(out), from_start=printed_from_start(out)
    )


@pytest.mark.slow
def test_width_sweep_wider_leaves_later(tmp_path: Path) -> None:
    out = run_example("width_sweep.py", tmp_path)
    rows = table_rows(out, 7)  # width lr exit_step lr*exit rel@10 rel@100 steps
    assert [int(r[0]) for r in rows] == [64, 2048], out
    exits = {int(r[0]): (math.inf if r[2] == "none" else int(r[2])) for r in rows}  # 0: never inside
    rel_10 = {int(r[0]): float(r[4]) for r in rows}
    assert exits[64] < exits[2048], out  # the paper's claim: wider nets stay linear longer
    assert rel_10[2048] < rel_10[64]
    for r in rows:  # a run stops early only after its exit (at the next epoch end, 14 steps per epoch)
        steps_run = int(r[6])
        if r[2] == "none":
            assert steps_run == 120, out
        else:
            assert int(r[2]) <= steps_run < int(r[2]) + 3 * 14 + 14, out
    for width, exit_step in exits.items():
        check_event_file(
            tmp_path / "width_sweep" / f"width{width}_lr2",
            None if math.isinf(exit_step) or exit_step == 0 else exit_step,
            ntk=False,
            from_start=exit_step == 0,
        )


def test_plain_pytorch_loop(tmp_path: Path) -> None:
    """The Lightning-free core from a plain loop: the table, the exit line and the event file."""
    out = run_example("plain_pytorch_loop.py", tmp_path)
    exit_step = printed_exit(out)
    rows = table_rows(out, 5)  # step, rel distance, loss net, loss lin, ntk drift
    steps = [int(r[0]) for r in rows]
    assert steps[:5] == [0, 1, 2, 4, 8] and steps[-1] == 64, out
    assert float(rows[0][1]) == 0.0 and 0 < float(rows[1][1]) < 1.0
    assert float(rows[-1][2]) < float(rows[0][2]), "training moved"
    acc = read_events(tmp_path / "plain_pytorch_loop")
    rel = scalar_series(acc, "lin_probe/functional_distance_rel")
    assert sorted(rel) == steps and rel[0] == 0.0
    regime = scalar_series(acc, "lin_probe/in_linear_regime")
    assert (exit_step is None and not printed_from_start(out)) == all(v == 1.0 for v in regime.values())


@pytest.mark.slow
def test_demo_runs_without_warnings(tmp_path: Path) -> None:
    """``make demo`` is a new user's first look: no Lightning or lin_probe warning may clutter it."""
    proc = example_process("demo.py", tmp_path)  # Python's default warning filters
    # warnings.warn / rank_zero_warn print "<file>:<line>: <message>"
    warned = [line for line in proc.stderr.splitlines() if re.search(r"\.py:\d+: ", line)]
    assert not warned, "\n".join(warned)
    found = re.findall(r"exit step: the network left the linear regime at step (\d+)", proc.stdout)
    stayed = "stayed in the linear regime" in proc.stdout
    from_start = printed_from_start(proc.stdout)
    assert len(found) + stayed + from_start == 1, proc.stdout
    check_event_file(tmp_path / "demo" / "version_0", int(found[0]) if found else None, from_start=from_start)
