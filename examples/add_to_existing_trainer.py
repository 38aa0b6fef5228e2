"""Adding lin_probe to a training script you already have: one callback, nothing else changes.

Below is an ordinary PyTorch Lightning classifier (a two-hidden-layer MLP with PyTorch's default
initialisation, cross-entropy, SGD with momentum) on scikit-learn's breast-cancer data. The only
lin_probe line is ``LinearRegimeMonitor(...)`` in the Trainer's callbacks. It prints the step at
which the network left the linear regime of Hu et al. (2020), and the command to open TensorBoard
on the run (the dashboard: network vs linear charts, Custom Scalars, text cards, figures, HParams).

Run: ``python examples/add_to_existing_trainer.py`` (``--fast`` for a few-second smoke run).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lin_probe import LinearRegimeMonitor


class TumourClassifier(pl.LightningModule):
    """A plain MLP classifier; nothing here knows about lin_probe."""

    def __init__(self, d: int, width: int = 256, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2)
        )
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def breast_cancer() -> tuple[DataLoader, DataLoader, int]:
    """Standardised features, a fixed 400 / 169 split."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = order[:400], order[400:]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / std
    loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=32, shuffle=True)
    val_loader = DataLoader(TensorDataset(x[val], y[val]), batch_size=len(val))
    return loader, val_loader, x.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--log-dir", type=Path, default=Path("runs"), help="TensorBoard log directory")
    parser.add_argument("--fast", action="store_true", help="tiny settings (used by the tests)")
    args = parser.parse_args()
    epochs = 3 if args.fast else args.epochs

    pl.seed_everything(0, verbose=False)
    train, val, d = breast_cancer()
    model = TumourClassifier(d)
    logger = TensorBoardLogger(str(args.log_dir), name="existing_trainer")
    monitor = LinearRegimeMonitor(loss="cross_entropy")  # <- the only lin_probe line
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[monitor],
        logger=logger,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=5,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, train, val)

    last = monitor.history[-1]
    print(f"\n{trainer.global_step} optimizer steps; at the last check (step {int(last['step'])}):")
    print(
        f"  functional_distance_rel {last['functional_distance_rel']:.4f}, "
        f"accuracy network {last['accuracy_network']:.3f} vs linear model {last['accuracy_linear']:.3f}"
    )
    if monitor.exit_step is None:
        print("exit step: none (no exit: see the verdict)")
    else:
        print(f"exit step: {monitor.exit_step}")
    print(f"verdict: {monitor.verdict.describe()}")
    if monitor.diagnosis is not None:
        print(f"diagnosis: {monitor.diagnosis.title}. {monitor.diagnosis.explanation()}")
    print(f"TensorBoard logs: {logger.log_dir}")
    print(f"View them with:   tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
