"""A 2-process CPU (gloo) DDP fit with LinearRegimeMonitor, run by tests/test_robustness_ddp.py.

``strategy="ddp"`` re-launches ``sys.argv`` for the other ranks, which inside pytest would re-run
pytest; a standalone script relaunches itself instead. Each rank writes ``rank{R}.json`` (its
``monitor.history``, ``exit_step``, fitted kernel and final parameters); rank zero's TensorBoard
logs land under ``OUT/tb``.

Usage: ``python tests/ddp_worker.py OUT [--momentum M] [--no-monitor]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lightning_setups import Regressor, TwoLayerNet, loaders, sphere_data

from lin_probe import LinearRegimeMonitor

# Shared with the test: the data, model and schedule the single-process replay must reproduce.
D, N_TRAIN, N_VAL, WIDTH, LR = 16, 64, 32, 8, 2.0
PER_RANK_BATCH, MAX_STEPS, N_PROBE = 16, 12, 16
EVERY_N_STEPS, TOLERANCE, PATIENCE = 3, 0.05, 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--no-monitor", action="store_true")
    parser.add_argument("--planned", action="store_true", help="the budget plans probe and schedule")
    args = parser.parse_args()
    if args.planned:
        _make_the_ranks_pilots_disagree()

    x, y = sphere_data(N_TRAIN + N_VAL, D)
    train, val = loaders(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], PER_RANK_BATCH)
    model = Regressor(TwoLayerNet(D, WIDTH), LR, momentum=args.momentum)
    settings = {} if args.planned else {"n_probe": N_PROBE, "every_n_steps": EVERY_N_STEPS}
    monitor = LinearRegimeMonitor(tolerance=TOLERANCE, patience=PATIENCE, **settings)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[] if args.no_monitor else [monitor],
        logger=TensorBoardLogger(str(args.out), name="tb", version=0),
        max_steps=MAX_STEPS,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    trainer.fit(model, train, val)
    kernel = monitor.kernel
    report = {
        "rank": trainer.global_rank,
        "history": monitor.history,
        "exit_step": monitor.exit_step,
        "verdict": None if monitor.verdict is None else monitor.verdict.state,
        "kernel": None if kernel is None else [kernel.a, kernel.b, kernel.c],
        "callback_metrics": {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("lin_probe/") and k != "lin_probe/overhead"  # a timing
        },
        "params": [p.detach().flatten().tolist() for p in model.parameters()],
        "global_step": trainer.global_step,
        "probe_size": None if monitor.core is None else len(monitor.core.probe),
        "schedule": repr(monitor.schedule),
    }
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def _make_the_ranks_pilots_disagree() -> None:
    """Rank 0's pilot reports a free NTK, rank 1's one far over any budget, so left alone the ranks
    would plan differently (linear NTK checks against the minimal plan) and their collectives would
    not pair up: the test then sees rank zero's plan on both ranks only if it is broadcast."""
    from dataclasses import replace

    import torch.distributed as dist

    from lin_probe.lightning import callback

    measured = callback.measure_costs

    def disagreeing(*args: Any, **kwargs: Any) -> Any:
        costs = measured(*args, **kwargs)
        dear = dist.is_initialized() and dist.get_rank() == 1
        # 10-s steps: a budget of ~6 s, which the free NTK fits with checks to spare and the dear one not at all
        return replace(costs, ntk_linear=0.0, ntk_quadratic=10.0 if dear else 1e-12, step_s=10.0)

    callback.measure_costs = disagreeing  # type: ignore[assignment]


if __name__ == "__main__":
    main()
