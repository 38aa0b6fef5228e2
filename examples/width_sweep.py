"""When does a two-layer net on digits leave the linear regime, as a function of width and learning rate?

Hu et al. (2020): the linear model describes the *early* phase of training, and the network
escapes it later; the wider the net, the longer the NTK stays put, so the later the exit. This
script trains the paper's two-layer ReLU net (NTK parameterisation) on scikit-learn's digits (MSE on
one-hot labels, plain SGD, batch 100) at several widths and learning rates, each run with
``LinearRegimeMonitor`` on 256 held-out digits, and prints one row per run: the exit step, the exit
"time" ``lr × step`` (gradient flow runs on that clock), the relative functional distance at
steps 10 and 100, and the steps actually run. Each run stops at its exit: an ``EarlyStopping`` on ``lin_probe/in_linear_regime``
(checked at epoch ends, every 14 steps) — the monitor's values are ordinary callback metrics.

Run: ``python examples/width_sweep.py --widths 256 1024 4096 --lrs 1 2 4`` (``--fast``: a smoke run).
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lin_probe import LinearRegimeMonitor


class TwoLayerNet(nn.Module):
    """``m^{-1/2} Σ_r v_r relu(w_rᵀx/√d)`` (N(0, 1) weights, NTK scaling in ``forward``)."""

    def __init__(self, d: int, width: int, outputs: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(d, width, bias=False)
        self.readout = nn.Linear(width, outputs, bias=False)
        nn.init.normal_(self.hidden.weight)
        nn.init.normal_(self.readout.weight)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.hidden(x) / math.sqrt(self.hidden.in_features))
        return self.readout(h) / math.sqrt(self.readout.in_features)


class DigitsRegression(pl.LightningModule):
    """MSE on one-hot labels with plain SGD (the paper's loss and optimizer)."""

    def __init__(self, width: int, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()  # width and lr: columns of TensorBoard's HParams table, beside lin_probe's
        self.net = TwoLayerNet(64, width, 10)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def digits_one_hot() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits centred and scaled to norm √64, one-hot targets; 1400 train / 397 held out."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = x - x.mean(dim=0)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(x.shape[1])
    y = F.one_hot(torch.tensor(data.target), 10).float()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = order[:1400], order[1400:]
    return x[train], y[train], x[val], y[val]


def run(width: int, lr: float, max_steps: int, log_dir: Path | None, seed: int = 0) -> dict[str, float]:
    """One training run; returns the exit step (NaN: none) and the relative distance at steps 10 and 100."""
    pl.seed_everything(seed, verbose=False)
    x, y, x_val, y_val = digits_one_hot()
    monitor = LinearRegimeMonitor(
        probe=(x_val, y_val), n_probe=256, every_n_steps=5, ntk_every_n_steps=0, progress_bar=False
    )
    stop = EarlyStopping(  # stop when the flag drops to 0; never for "no improvement" (huge patience)
        "lin_probe/in_linear_regime",
        mode="max",
        divergence_threshold=0.5,
        patience=10**9,
        check_on_train_epoch_end=True,
    )
    logger: TensorBoardLogger | bool = False
    if log_dir is not None:
        logger = TensorBoardLogger(str(log_dir), name="width_sweep", version=f"width{width}_lr{lr:g}")
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=[monitor, stop],
        logger=logger,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    train = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*no logger.*")
        trainer.fit(DigitsRegression(width, lr), train)
    rel = {int(r["step"]): r["functional_distance_rel"] for r in monitor.history}
    return {
        "width": width,
        "lr": lr,
        # 0: not in the linear regime from the start (the narrow net misfits the affine kernel at init)
        "exit_step": 0.0
        if monitor.verdict.state == "outside_from_start"
        else math.nan
        if monitor.exit_step is None
        else float(monitor.exit_step),
        "rel_10": rel.get(10, math.nan),
        "rel_100": rel.get(100, math.nan),
        "steps_run": trainer.global_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--lrs", type=float, nargs="+", default=[2.0])
    parser.add_argument("--steps", type=int, default=1000, help="at most this many steps per run")
    parser.add_argument("--log-dir", type=Path, default=Path("runs"), help="TensorBoard log directory")
    parser.add_argument("--fast", action="store_true", help="tiny settings (used by the tests)")
    args = parser.parse_args()
    if args.fast:
        args.widths, args.lrs, args.steps = [64, 2048], [2.0], 120

    print(
        f"{'width':>7s} {'lr':>6s} {'exit_step':>9s} {'lr*exit':>8s} {'rel@10':>8s} {'rel@100':>8s} {'steps':>6s}"
    )
    for lr in args.lrs:
        for width in args.widths:
            r = run(width, lr, args.steps, args.log_dir)
            exit_step = "none" if math.isnan(r["exit_step"]) else f"{int(r['exit_step'])}"
            time = "-" if math.isnan(r["exit_step"]) else f"{lr * r['exit_step']:.0f}"
            print(
                f"{width:7d} {lr:6g} {exit_step:>9s} {time:>8s} {r['rel_10']:8.4f} {r['rel_100']:8.4f} "
                f"{int(r['steps_run']):6d}",
                flush=True,
            )
    print(
        f"(exit step 'none': still in the linear regime after {args.steps} steps; 0: not in the linear "
        "regime from the start, its affine kernel misfits the NTK at init)"
    )
    print(f"View the runs with: tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
