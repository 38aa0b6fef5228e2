"""What ``LinearRegimeMonitor()`` at its defaults costs a real training run: wall time with vs without it.

Models: :mod:`zoo` (a BatchNorm ResNet on 32×32×3, a token Transformer, a token LSTM, the digits MLP),
each in ``zoo.Classifier``, an ordinary cross-entropy ``LightningModule`` trained by SGD (lr 0.05, momentum 0.9, batch 32)
in a ``Trainer`` with a TensorBoard logger, a 256-example validation set checked once per epoch, no
progress bar or checkpointing. Two runs per model:

* ``short`` — 200 optimizer steps in one pass over 6,400 fresh examples (no example is seen twice);
* ``long`` — 5 epochs over 3,200 examples (100 steps per epoch, 500 steps; ``f_0``'s outputs come
  from the cache from the second epoch on).

Both variants run in this one process and alternate (without, with; then with, without; …), each on
a freshly seeded module; a figure is the best of ``--repeats`` (≥ 2) whole ``trainer.fit`` wall times,
the least disturbed by other load. *overhead* is the monitor's share of the monitored run's wall
time, ``(with − without) / with``: the quantity ``max_overhead`` bounds (*logged* is the monitor's own
``lin_probe/overhead`` at its last check, its share as it measures it). The monitor runs at its
defaults (``verbose=False`` only): ``max_overhead=0.05`` plans the probe and the checks, and
``loss="auto"`` picks cross-entropy from the integer labels. *probe*, *checks* and *ntk* are what the
plan did: probe size, checks, NTK checks.

Run: ``python benchmarks/overhead.py`` (``--models resnet_bn lstm``, ``--runs short``,
``--repeats 2``, ``--threads N``; ``--profile``: where a monitored fit's time goes, by cProfile).
Timings on a shared 2-core machine are noisy: compare the ratios of one run, and say whether the
machine was quiet.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import logging
import platform
import pstats
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo

from lin_probe import LinearRegimeMonitor

BATCH, N_VAL = 32, 256
RUNS = {"short": {"train": 200 * BATCH, "epochs": 1}, "long": {"train": 100 * BATCH, "epochs": 5}}


def fit_seconds(
    model: str, run: str, monitored: bool, root: Path
) -> tuple[float, LinearRegimeMonitor | None, float]:
    """One whole ``trainer.fit`` (fresh seeded module and loaders): its wall time, the monitor and the
    monitor's own last logged ``lin_probe/overhead`` (NaN without it)."""
    spec = RUNS[run]
    net, x, y = zoo.build(model, spec["train"] + N_VAL, seed=0)
    train = DataLoader(TensorDataset(x[N_VAL:], y[N_VAL:]), batch_size=BATCH, shuffle=True,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    val = DataLoader(TensorDataset(x[:N_VAL], y[:N_VAL]), batch_size=N_VAL)
    monitor = LinearRegimeMonitor(verbose=False) if monitored else None
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=spec["epochs"], logger=TensorBoardLogger(str(root), name=model),
        callbacks=[monitor] if monitor else [], enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=10,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(zoo.Classifier(net), train, val)
    seconds = time.perf_counter() - start
    logged = trainer.callback_metrics.get("lin_probe/overhead")
    return seconds, monitor, float("nan") if logged is None else float(logged)


def measure(model: str, run: str, repeats: int, root: Path) -> dict[str, Any]:
    times: dict[bool, list[float]] = {False: [], True: []}
    monitor, logged = None, float("nan")
    for rep in range(repeats):
        for monitored in (False, True) if rep % 2 == 0 else (True, False):
            seconds, m, share = fit_seconds(model, run, monitored, root)
            times[monitored].append(seconds)
            if m is not None:
                monitor, logged = m, share
    without, with_ = min(times[False]), min(times[True])
    verdict = None if monitor is None or monitor.verdict is None else monitor.verdict.describe()
    checks = 0 if monitor is None else len(monitor.history)
    ntk = 0 if monitor is None else sum("ntk_gap" in r for r in monitor.history)
    probe = 0 if monitor is None or monitor.core is None else len(monitor.core.probe)
    return {"without": without, "with": with_, "ratio": with_ / without, "overhead": (with_ - without) / with_,
            "checks": checks, "ntk": ntk, "probe": probe, "logged": logged, "verdict": verdict,
            "all": times}  # fmt: skip


def profile(models: list[str], runs: list[str]) -> None:
    """The monitor's own functions by cumulative time in one monitored fit (after a warm-up fit)."""
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for run in runs:
                fit_seconds(model, run, True, Path(tmp))
                profiler = cProfile.Profile()
                profiler.enable()
                seconds = fit_seconds(model, run, True, Path(tmp))[0]
                profiler.disable()
                print(f"## {model} {run}: {seconds:.2f} s monitored")
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(r"lin_probe/", 25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(zoo.MODELS), choices=list(zoo.MODELS))
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile one monitored fit per model and run: where the time goes",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}")  # fmt: skip
    print(
        f"{'model':<12} {'run':<6} {'without s':>10} {'with s':>9} {'ratio':>7} {'overhead':>9} {'logged':>7} "
        f"{'probe':>5} {'checks':>6} {'ntk':>4}"
    )
    if args.profile:
        profile(args.models, args.runs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for run in args.runs:
                r = measure(model, run, args.repeats, Path(tmp))
                print(f"{model:<12} {run:<6} {r['without']:>10.2f} {r['with']:>9.2f} {r['ratio']:>6.2f}× "
                      f"{100 * r['overhead']:>8.1f}% {100 * r['logged']:>6.1f}% {r['probe']:>5} {r['checks']:>6} "
                      f"{r['ntk']:>4}   {r['verdict']}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
