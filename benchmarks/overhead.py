"""What ``LinearRegimeMonitor()`` at its defaults costs a real training run: wall time with vs without it.

Models: :mod:`zoo` (a BatchNorm ResNet on 32×32×3, a token Transformer, a token LSTM, the digits MLP),
each in ``zoo.Classifier``, an ordinary cross-entropy ``LightningModule`` trained by SGD (lr 0.05, momentum 0.9, batch 32)
in a ``Trainer`` with a TensorBoard logger, a 256-example validation set checked once per epoch, no
progress bar or checkpointing. And ``demo_lm``: Lightning's own ``LightningTransformer`` unmodified
(``pytorch_lightning.demos``: an encoder–decoder ``nn.Transformer``, its SGD at lr 0.1, its NLL loss, no
validation) as a language model on random tokens, vocabulary 33 × length 10, so ``C = T·V = 330``
outputs per example, which ``outputs="auto"`` sketches; its monitor gets only what calling that
model needs (``forward_fn``, ``batch_to_xy`` and the demo's own loss), the rest at the defaults.
Two runs per model:

* ``short`` — 200 optimizer steps in one pass over 6,400 fresh examples (no example is seen twice);
* ``long`` — 5 epochs over 3,200 examples (100 steps per epoch, 500 steps; ``f_0``'s outputs come
  from the cache from the second epoch on);
* ``longer`` (only when asked, ``--runs longer``) — 20 epochs over 8,000 examples (250 steps per
  epoch, 5,000 steps): where a 5-% budget exceeds the monitor's fixed start-up on the small models.

Both variants run in this one process and alternate (without, with; then with, without; …), each on
a freshly seeded module; a figure is the best of ``--repeats`` (≥ 2) whole ``trainer.fit`` wall times,
the least disturbed by other load. *overhead* is the monitor's share of the monitored run's wall
time, ``(with − without) / with``: the quantity ``max_overhead`` bounds (*logged* is the monitor's own
``lin_probe/overhead`` at its last check, its share as it measures it). The monitor runs at its
defaults (``verbose=False`` only): ``max_overhead=0.05`` plans the probe and the checks, and
``loss="auto"`` picks cross-entropy from the integer labels. *probe*, *checks* and *ntk* are what the
plan did: probe size, checks, NTK checks.

Run: ``python benchmarks/overhead.py`` (``--models resnet_bn lstm``, ``--runs short``,
``--repeats 2``, ``--threads N``, ``--accelerator gpu`` on a GPU machine; ``--profile``: where a monitored fit's time goes, by cProfile;
``--follow``: the shadows follow every step, as in a run that stays linear).
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
import torch.nn.functional as F
from pytorch_lightning.demos import LightningTransformer
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo

from lin_probe import LinearRegimeMonitor

BATCH, N_VAL = 32, 256
RUNS = {
    "short": {"train": 200 * BATCH, "epochs": 1},
    "long": {"train": 100 * BATCH, "epochs": 5},
    "longer": {"train": 250 * BATCH, "epochs": 20},
}
DEFAULT_RUNS = ("short", "long")
LM_VOCAB, LM_LENGTH = 33, 10
MODELS = (*zoo.MODELS, "demo_lm")
FOLLOW: dict[str, Any] = {"stop_after_exit": 10**9}
"""``--follow``: the shadows never stop after the verdict. Every zoo model here leaves the linear regime
at once (the affine kernel misfits its NTK at init), so at the defaults the shadows stop after a few
checks; this measures instead what a run pays whose network stays linear: the shadows' step on every
training batch (``f_0`` cached from the second epoch on), and the checks the plan keeps taking."""


def demo_lm(n: int, **options: Any) -> tuple[pl.LightningModule, DataLoader, None, LinearRegimeMonitor]:
    """Lightning's demo ``LightningTransformer`` on ``n`` random token sequences (next-token targets)
    and the monitor as its user would configure it: how to call it, and its loss."""
    tokens = torch.randint(0, LM_VOCAB, (n, LM_LENGTH + 1), generator=torch.Generator().manual_seed(0))
    train = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=BATCH, shuffle=True,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    torch.manual_seed(0)
    module = LightningTransformer(vocab_size=LM_VOCAB)
    module.prepare_data = lambda: None  # the demo downloads WikiText-2 here; these tokens are synthetic

    def nll(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(pred.reshape(-1, LM_VOCAB), target.reshape(-1))

    monitor = LinearRegimeMonitor(
        batch_to_xy=lambda batch: (torch.stack(batch, dim=1), batch[1]),
        forward_fn=lambda module, x: module(x[:, 0], x[:, 1]).reshape(x.shape[0], -1),
        loss=nll,
        verbose=False,
        **options,
    )
    return module, train, None, monitor


def fit_seconds(
    model: str, run: str, monitored: bool, root: Path, accelerator: str = "cpu", follow: bool = False
) -> tuple[float, LinearRegimeMonitor | None, float]:
    """One whole ``trainer.fit`` (fresh seeded module and loaders): its wall time, the monitor and the
    monitor's own last logged ``lin_probe/overhead`` (NaN without it). ``follow``: the shadows follow
    every step (:data:`FOLLOW`)."""
    options = FOLLOW if follow else {}
    spec = RUNS[run]
    module: pl.LightningModule
    val: DataLoader | None
    if model == "demo_lm":
        module, train, val, lm_monitor = demo_lm(spec["train"], **options)
        monitor = lm_monitor if monitored else None
    else:
        net, x, y = zoo.build(model, spec["train"] + N_VAL, seed=0)
        train = DataLoader(TensorDataset(x[N_VAL:], y[N_VAL:]), batch_size=BATCH, shuffle=True,
                           generator=torch.Generator().manual_seed(1))  # fmt: skip
        val = DataLoader(TensorDataset(x[:N_VAL], y[:N_VAL]), batch_size=N_VAL)
        module = zoo.Classifier(net)
        monitor = LinearRegimeMonitor(verbose=False, **options) if monitored else None
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, max_epochs=spec["epochs"], logger=TensorBoardLogger(str(root), name=model),
        callbacks=[monitor] if monitor else [], enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=10,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, train, val)
    seconds = time.perf_counter() - start
    logged = trainer.callback_metrics.get("lin_probe/overhead")
    return seconds, monitor, float("nan") if logged is None else float(logged)


def measure(
    model: str, run: str, repeats: int, root: Path, accelerator: str = "cpu", follow: bool = False
) -> dict[str, Any]:
    times: dict[bool, list[float]] = {False: [], True: []}
    monitor, logged = None, float("nan")
    for rep in range(repeats):
        for monitored in (False, True) if rep % 2 == 0 else (True, False):
            seconds, m, share = fit_seconds(model, run, monitored, root, accelerator, follow)
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


def profile(models: list[str], runs: list[str], accelerator: str = "cpu", follow: bool = False) -> None:
    """The monitor's own functions by cumulative time in one monitored fit (after a warm-up fit)."""
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for run in runs:
                fit_seconds(model, run, True, Path(tmp), accelerator, follow)
                profiler = cProfile.Profile()
                profiler.enable()
                seconds = fit_seconds(model, run, True, Path(tmp), accelerator, follow)[0]
                profiler.disable()
                print(f"## {model} {run}: {seconds:.2f} s monitored")
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(r"lin_probe/", 25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), choices=list(RUNS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--accelerator", default="cpu", help="Lightning's accelerator: cpu, gpu")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile one monitored fit per model and run: where the time goes",
    )
    parser.add_argument(
        "--follow",
        action="store_true",
        help="the shadows follow every step (stop_after_exit very large): the cost of a run that stays linear",
    )
    args = parser.parse_args()
    if args.repeats < 2 and not args.profile:
        parser.error("--repeats must be at least 2: one fit per variant is not a best-of figure")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.accelerator}, "
          f"best of {args.repeats}{', shadows follow every step' if args.follow else ''}")  # fmt: skip
    print(
        f"{'model':<12} {'run':<6} {'without s':>10} {'with s':>9} {'ratio':>7} {'overhead':>9} {'logged':>7} "
        f"{'probe':>5} {'checks':>6} {'ntk':>4}"
    )
    if args.profile:
        profile(args.models, args.runs, args.accelerator, args.follow)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for run in args.runs:
                r = measure(model, run, args.repeats, Path(tmp), args.accelerator, args.follow)
                print(f"{model:<12} {run:<6} {r['without']:>10.2f} {r['with']:>9.2f} {r['ratio']:>6.2f}× "
                      f"{100 * r['overhead']:>8.1f}% {100 * r['logged']:>6.1f}% {r['probe']:>5} {r['checks']:>6} "
                      f"{r['ntk']:>4}   {r['verdict']}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
