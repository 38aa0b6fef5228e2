"""A convolutional net on scikit-learn's 8×8 digits: does the linear-model picture hold for CNNs?

Hu et al. (2020) state that their result extends to convolutional architectures: early in training
the network is mimicked by a model linear in the (flattened) pixels. This script trains a small
CNN (two 3×3 convolutions, a linear readout of the flattened feature maps; NTK parameterisation: N(0, 1)
weights, ``1/√fan_in`` in ``forward``) with cross-entropy and SGD with momentum, and lets
``LinearRegimeMonitor`` compare it with its linear shadow on held-out digits. The probe images are
flattened to 64-vectors for the data kernel ``XXᵀ/d``; the network sees them as 1×8×8 images.

Run: ``python examples/digits_cnn.py`` (``--fast`` for a few-second smoke run).
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from digits_mlp import DigitsClassifier, digits, print_history
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lin_probe import LinearRegimeMonitor


class DigitsCNN(nn.Module):
    """conv3×3 → ReLU → conv3×3 → ReLU → flatten → linear; NTK scaling (``1/√fan_in``) in ``forward``."""

    def __init__(self, channels: int, outputs: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.readout = nn.Linear(channels * 64, outputs)
        for layer in (self.conv1, self.conv2, self.readout):
            nn.init.normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x) / math.sqrt(9))
        h = torch.relu(self.conv2(h) / math.sqrt(9 * self.conv2.in_channels))
        h = h.flatten(1)
        return self.readout(h) / math.sqrt(self.readout.in_features)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--log-dir", type=Path, default=Path("runs"), help="TensorBoard log directory")
    parser.add_argument("--fast", action="store_true", help="tiny settings (used by the tests)")
    args = parser.parse_args()
    if args.fast:
        args.channels, args.steps = 16, 60

    pl.seed_everything(0, verbose=False)
    x, y, x_val, y_val = digits(image=True)
    model = DigitsClassifier(DigitsCNN(args.channels), args.lr, args.momentum)
    monitor = LinearRegimeMonitor(n_probe=256, loss="cross_entropy", every_n_steps=10, ntk_every_n_steps=100)
    logger = TensorBoardLogger(str(args.log_dir), name="digits_cnn")
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
        f"\nCNN ({args.channels} channels) on 8×8 digits, cross-entropy, "
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
