"""The paper's own setting: a two-layer net on the sphere, trained by SGD on MSE.

Hu et al. (2020), Section 3: ``f(x) = m^{-1/2} Σ_r v_r φ(w_rᵀx/√d)`` with N(0, 1) weights and inputs
on the sphere of radius √d. Their Theorem: early in training this net is mimicked by the linear
model ``f_0(x) + Bᵀ[√a·x/√d; √b]``, with ``a, b`` given in closed form by Gaussian moments of φ.

This script (1) prints the closed-form ``a, b, c`` next to the ones fitted to the net's empirical
NTK at init, (2) trains the net with ``LinearRegimeMonitor`` on a synthetic teacher task (a linear
part plus a quadratic part that a linear model cannot fit), and (3) reports the early agreement
(relative functional distance on held-out points) and the exit step from the linear regime.

Run: ``python examples/paper_two_layer.py --activation tanh`` (``--fast`` for a smoke run).
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lin_probe import LinearRegimeMonitor, empirical_ntk, fit_affine_kernel, two_layer_coefficients

ACTIVATIONS = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "erf": torch.erf,
}


class TwoLayerNet(nn.Module):
    """``m^{-1/2} Σ_r v_r φ(w_rᵀx/√d)`` in NTK parameterisation (N(0, 1) weights, scaling in ``forward``)."""

    def __init__(self, d: int, width: int, outputs: int = 1, activation: str = "relu") -> None:
        super().__init__()
        self.hidden = nn.Linear(d, width, bias=False)
        self.readout = nn.Linear(width, outputs, bias=False)
        nn.init.normal_(self.hidden.weight)
        nn.init.normal_(self.readout.weight)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        h = ACTIVATIONS[self.activation](self.hidden(x) / math.sqrt(self.hidden.in_features))
        return self.readout(h) / math.sqrt(self.readout.in_features)


class Regressor(pl.LightningModule):
    """MSE with plain SGD: the loss and optimizer of the paper's theorem."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def sphere_task(n: int, d: int, seed: int) -> tuple[Tensor, Tensor]:
    """Isotropic inputs on the sphere of radius √d; target = linear + quadratic teacher (both O(1))."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(d)
    beta = torch.randn(d, generator=gen)
    beta = beta / beta.norm()
    u = torch.randn(d, generator=gen)
    u = u / u.norm()
    y = x @ beta + ((x @ u) ** 2 - 1) / math.sqrt(2)
    return x, y.unsqueeze(1)


def compare_coefficients(activation: str, d: int, width: int, n: int) -> None:
    """Closed form vs fit to the empirical NTK at init, both layers trained (s = 1/d: isotropic inputs)."""
    torch.manual_seed(0)
    x, _ = sphere_task(n, d, seed=1)
    fitted = fit_affine_kernel(empirical_ntk(TwoLayerNet(d, width, 1, activation), x), x)
    closed = two_layer_coefficients(activation, layer="both", s=1.0 / d)
    print(f"NTK at init, {activation} two-layer net (d={d}, width={width}, n={n}), both layers trained")
    print(f"  {'':8s}{'a':>9s}{'b':>9s}{'c':>9s}")
    print(f"  {'closed':8s}{closed.a:9.4f}{closed.b:9.4f}{closed.c:9.4f}")
    print(f"  {'fitted':8s}{fitted.a:9.4f}{fitted.b:9.4f}{fitted.c:9.4f}")
    print(f"  relative spectral error of the fit: {fitted.rel_error:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu")
    parser.add_argument("--d", type=int, default=128, help="input dimension")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--n", type=int, default=1024, help="training examples")
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--log-dir", type=Path, default=Path("runs"), help="TensorBoard log directory")
    parser.add_argument("--fast", action="store_true", help="tiny settings (used by the tests)")
    args = parser.parse_args()
    if args.fast:
        args.d, args.width, args.n, args.steps = 32, 512, 256, 60

    compare_coefficients(args.activation, args.d, args.width, n=256)

    pl.seed_everything(0, verbose=False)
    x, y = sphere_task(args.n + 256, args.d, seed=2)
    held_out = (x[args.n :], y[args.n :])
    model = Regressor(TwoLayerNet(args.d, args.width, 1, args.activation), args.lr)
    monitor = LinearRegimeMonitor(probe=held_out, n_probe=256, every_n_steps=10, ntk_every_n_steps=100)
    logger = TensorBoardLogger(str(args.log_dir), name=f"paper_two_layer_{args.activation}")
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[monitor],
        logger=logger,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    train = DataLoader(TensorDataset(x[: args.n], y[: args.n]), batch_size=args.batch_size, shuffle=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, train)

    print(
        f"\nTraining: SGD lr={args.lr}, batch {args.batch_size}, {args.steps} steps, MSE, 256 held-out probes"
    )
    print(f"  {'step':>6s} {'dist_rel':>9s} {'loss_net':>9s} {'loss_lin':>9s} {'ntk_drift':>9s}")
    for r in monitor.history:
        step = int(r["step"])
        if step in (1, 10, 100, 1000) or step == args.steps:
            print(
                f"  {step:6d} {r['functional_distance_rel']:9.4f} {r['loss_network']:9.4f} "
                f"{r['loss_linear']:9.4f} {r.get('ntk_drift', math.nan):9.4f}"
            )
    print(f"exit step: {monitor.exit_step if monitor.exit_step is not None else 'none'}")
    print(f"verdict: {monitor.verdict.describe()}")
    if monitor.diagnosis is not None:
        print(f"diagnosis: {monitor.diagnosis.title}. {monitor.diagnosis.explanation()}")
    print(f"TensorBoard logs: {logger.log_dir}")
    print(f"View them with:   tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
