"""LinearRegimeMonitor under ``strategy="ddp"``: 2 CPU processes (gloo), launched as a script.

The reference is a single-process plain-PyTorch replay of the same *global* batches (DDP averages
the two ranks' gradients, i.e. full 32-example batches here) on rank zero's probe shard — the
probe every rank must use once it is broadcast.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ddp_worker as W
import pytest
import torch
from _lightning_setups import Dashboard, TwoLayerNet, sphere_data
from _robustness_helpers import replay
from torch import Tensor
from torch.utils.data import DistributedSampler

WORKER = Path(__file__).resolve().parents[1] / "ddp_worker.py"
MOMENTUM = 0.9


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_worker(out: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env.pop("LOCAL_RANK", None)
    # Lightning seeds its DistributedSampler from PL_GLOBAL_SEED, which any earlier seed_everything()
    # in this pytest process leaves in os.environ; the replay assumes Lightning's default seed 0.
    env.pop("PL_GLOBAL_SEED", None)
    done = subprocess.run(
        [sys.executable, str(WORKER), str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def _global_batches(x: Tensor, y: Tensor) -> list[list[tuple[Tensor, Tensor]]]:
    """Each step's two per-rank micro-batches, as Lightning's DistributedSampler deals them out.

    Lightning always shuffles the training sampler under DDP (seed 0, ``set_epoch`` each epoch);
    DDP averages the ranks' mean-loss gradients, which the replay's ``loss / len(micro)`` does too.
    """
    per_epoch = len(x) // (2 * W.PER_RANK_BATCH)
    steps = []
    for step in range(W.MAX_STEPS):
        epoch, j = divmod(step, per_epoch)
        micro = []
        for rank in (0, 1):
            sampler = DistributedSampler(range(len(x)), num_replicas=2, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            rows = torch.tensor(list(sampler))[j * W.PER_RANK_BATCH : (j + 1) * W.PER_RANK_BATCH]
            micro.append((x[rows], y[rows]))
        steps.append(micro)
    return steps


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict]]]:
    runs = {}
    for name, extra in (("monitor", ()), ("plain", ("--no-monitor",))):
        out = tmp_path_factory.mktemp(f"ddp_{name}")
        runs[name] = (out, _run_worker(out, "--momentum", str(MOMENTUM), *extra))
    return runs


@pytest.mark.slow
def test_ddp_ranks_agree_and_match_single_process_replay(ddp_runs) -> None:
    out, (rank0, rank1) = ddp_runs["monitor"]
    # Every rank: the same probe (so the same fit), the same metrics and the same verdict. (This width-8
    # net misfits the affine kernel: "not in the linear regime from the start", decided on rank zero's record.)
    assert rank0["kernel"] == rank1["kernel"]
    assert rank0["history"] == rank1["history"]
    assert rank0["exit_step"] == rank1["exit_step"]
    assert rank0["verdict"] == rank1["verdict"] != "inside"
    assert rank0["callback_metrics"] == rank1["callback_metrics"]
    assert rank0["global_step"] == rank1["global_step"] == W.MAX_STEPS

    # Only rank zero writes TensorBoard events.
    event_files = list(out.rglob("events.out.tfevents*"))
    event_dirs = {p.parent for p in event_files}
    assert event_dirs and all(d.is_relative_to(out / "tb" / "version_0") for d in event_dirs)
    assert len(event_files) == len(event_dirs), "one writer per run: a second rank wrote events too"

    dashboard = Dashboard(out / "tb" / "version_0")
    a, b = dashboard.series("fit_a")[0], dashboard.series("fit_b")[0]
    x, y = sphere_data(W.N_TRAIN + W.N_VAL, W.D)
    x_train, y_train, x_val = x[: W.N_TRAIN], y[: W.N_TRAIN], x[W.N_TRAIN :]
    probe = x_val[0::2][: W.N_PROBE]  # rank 0's DistributedSampler shard (shuffle=False): 0, 2, 4, ...
    ref = replay(
        TwoLayerNet(W.D, W.WIDTH),
        a,
        b,
        _global_batches(x_train, y_train),
        probe,
        lambda params: torch.optim.SGD(params, lr=W.LR, momentum=MOMENTUM),
    )
    logged = dashboard.series("functional_distance")
    rel = dashboard.series("functional_distance_rel")
    assert max(logged) == W.MAX_STEPS
    assert max(logged.values()) > 1e-2, "training must move the network away from the shadow"
    for step, value in logged.items():
        # float32 network and shadow vs a float64 shadow in the replay, summed in a different order
        # across ranks: ~1e-6 relative; 1e-4 is loose for that yet far below a lost rank's gradient
        # (un-averaged shadow gradients or per-rank probes change these values by > 10 %).
        assert value == pytest.approx(ref.distance(step), rel=1e-4, abs=1e-6), f"step {step}"
        assert rel[step] == pytest.approx(ref.distance_rel(step), rel=1e-4, abs=1e-6), f"step {step}"


@pytest.mark.slow
def test_ddp_user_parameters_identical_with_and_without_monitor(ddp_runs) -> None:
    _, with_monitor = ddp_runs["monitor"]
    _, without = ddp_runs["plain"]
    for rank in (0, 1):
        assert with_monitor[rank]["params"] == without[rank]["params"], f"rank {rank}"


def test_a_planned_monitor_runs_rank_zeros_plan_on_every_rank(tmp_path: Path) -> None:
    """With the budget planning (no n_probe / every_n_steps), each rank times its own parts; the ranks
    must still measure the same probe on the same schedule, or their collectives would not pair up:
    rank zero's plan is broadcast. The worker makes the ranks' pilots disagree (rank 0: a free NTK,
    rank 1: one over any budget, whose own plan would be the minimal one, NTK at step 0 only). Same
    checks, same records, same training on both ranks, and they are rank zero's."""
    ranks = _run_worker(tmp_path, "--planned")
    assert ranks[0]["probe_size"] == ranks[1]["probe_size"] is not None
    assert ranks[0]["schedule"] == ranks[1]["schedule"]
    for rank in (0, 1):  # rank zero's plan: NTK checks after step 0 (the minimal plan has none)
        assert [r["step"] for r in ranks[rank]["history"] if "ntk_gap" in r][:3] == [0, 1, 2], rank
    assert [r["step"] for r in ranks[0]["history"]] == [r["step"] for r in ranks[1]["history"]]
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["params"] == ranks[1]["params"]
