"""A deep fully connected net on scikit-learn's digits: cross-entropy, SGD with momentum.

Hu et al. (2020) prove their linear-model picture for two-layer nets and show it numerically for
deeper ones. This script checks it on a 4-hidden-layer ReLU MLP (NTK parameterisation: N(0, 1)
weights, ``1/√fan_in`` in ``forward``) trained the way a practitioner would (softmax
cross-entropy, SGD with momentum 0.9, mini-batches), with ``LinearRegimeMonitor`` probing
held-out digits. It prints the affine fit of the NTK at init, a few checks (relative functional
distance, network vs linear-model loss and class agreement) and the exit step.

Run: ``python examples/digits_mlp.py`` (``--fast`` for a few-second smoke run).
"""

from __future__ import annotations

import argparse
import itertools
import math
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lin_probe import LinearRegimeMonitor


class DeepMLP(nn.Module):
    """``depth`` hidden ReLU layers of ``width`` units, NTK parameterisation (scaling in ``forward``)."""

    def __init__(self, d: int, width: int, depth: int, outputs: int) -> None:
        super().__init__()
        sizes = [d] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(i, o) for i, o in itertools.pairwise(sizes))
        self.readout = nn.Linear(width, outputs)
        for layer in [*self.hidden, self.readout]:
            nn.init.normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for layer in self.hidden:
            h = torch.relu(layer(h / math.sqrt(layer.in_features)))
        return self.readout(h / math.sqrt(self.readout.in_features))


class DigitsClassifier(pl.LightningModule):
    """Cross-entropy on class indices, SGD with momentum: an ordinary classification module."""

    def __init__(self, net: nn.Module, lr: float, momentum: float) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.momentum = momentum

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
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def digits(image: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits centred and scaled to norm √64 (the paper's inputs on the sphere); 1400 train / 397 held out."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = x - x.mean(dim=0)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(x.shape[1])
    if image:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = order[:1400], order[1400:]
    return x[train], y[train], x[val], y[val]


def print_history(monitor: LinearRegimeMonitor, every: int) -> None:
    """The log-spaced early checks and every ``every``-th step: enough to see the trend."""
    print(
        f"  {'step':>6s} {'dist_rel':>9s} {'loss_net':>9s} {'loss_lin':>9s} {'agree':>6s} {'ntk_drift':>9s}"
    )
    for r in monitor.history:
        step = int(r["step"])
        if step > 8 and step % every:
            continue
        print(
            f"  {step:6d} {r['functional_distance_rel']:9.4f} {r['loss_network']:9.4f} "
            f"{r['loss_linear']:9.4f} {r.get('agreement', math.nan):6.3f} {r.get('ntk_drift', math.nan):9.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4, help="hidden layers")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--log-dir", type=Path, default=Path("runs"), help="TensorBoard log directory")
    parser.add_argument("--fast", action="store_true", help="tiny settings (used by the tests)")
    args = parser.parse_args()
    if args.fast:
        args.width, args.steps = 64, 60

    pl.seed_everything(0, verbose=False)
    x, y, x_val, y_val = digits()
    model = DigitsClassifier(DeepMLP(64, args.width, args.depth, 10), args.lr, args.momentum)
    monitor = LinearRegimeMonitor(n_probe=256, loss="cross_entropy", every_n_steps=10, ntk_every_n_steps=100)
    logger = TensorBoardLogger(str(args.log_dir), name="digits_mlp")
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[monitor],
        logger=logger,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        check_val_every_n_epoch=10,
    )
    train = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=len(x_val))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, train, val)

    kernel = monitor.kernel
    assert kernel is not None
    print(
        f"\n{args.depth}-hidden-layer ReLU MLP (width {args.width}) on digits, cross-entropy, "
        f"SGD lr={args.lr} momentum={args.momentum}, {args.steps} steps"
    )
    print(f"fit at init: a={kernel.a:.4f} b={kernel.b:.4f} c={kernel.c:.4f} rel_error={kernel.rel_error:.4f}")
    print_history(monitor, every=100)
    last = monitor.history[-1]
    print(
        f"final: accuracy network {last['accuracy_network']:.3f}, linear {last['accuracy_linear']:.3f}, "
        f"agreement {last['agreement']:.3f}"
    )
    print(f"exit step: {monitor.exit_step if monitor.exit_step is not None else 'none'}")
    print(f"verdict: {monitor.verdict.describe()}")
    if monitor.diagnosis is not None:
        print(f"diagnosis: {monitor.diagnosis.title}. {monitor.diagnosis.explanation()}")
    print(f"TensorBoard logs: {logger.log_dir}")
    print(f"View them with:   tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
