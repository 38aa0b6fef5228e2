"""Figure 3 and Table 4: the paper's linear shadow vs the memorizing shadow (``memorization=True``).

Why: at init the NTK is ``Θ_0 ≈ a·K + b·11ᵀ + c·I``. The paper's shadow ``f_0 + ψB`` carries only
``a·K + b·11ᵀ``; the ``c·I`` part is what lets the network fit its own training points. When the
number of training points n is a small multiple of d, the paper's shadow then departs from the
network early even though the network's kernel has hardly moved — the linear model simply cannot
memorise. The memorizing shadow adds one offset per training example (kernel ``aK + b11ᵀ + cI`` on
training points), so its distance from the network measures the kernel's own movement (plus the
finite-width noise of Θ_0). This script puts both side by side, with the real
``LinearRegimeMonitor(memorization=True)`` in a Trainer (values read from ``monitor.history``):

1. synthetic: two-layer ReLU net (width 16384, NTK parameterisation, both layers trained), d = 64,
   n_train = 128 (n = 2d) inputs on the sphere ‖x‖² = d, targets ``sign(xᵀβ/√d)``, MSE, full-batch
   SGD at half the stability edge (``lr = n / (2 λ_max(Θ_0 on the training set))``), 256 held-out
   probe points from the validation loader;
2. digits: the two-layer net of Figure 1 (width 4096, MSE on one-hot labels, SGD lr 2, batch 100,
   same seed), training set wrapped in ``WithIndex``, 256 held-out probe digits from the validation
   loader.

For the synthetic setting it also replays kernel gradient descent in function space with three
kernels — the affine one (exactly the memorizing shadow), the network's own finite-width Θ_0 and
the infinite-width ReLU NTK — to split the memorizing shadow's residual distance into the affine
approximation and the finite-width noise of Θ_0.

Run: ``python reproduce/memo_comparison.py`` (~5 min on 2 shared cores; ``--fast``: a smoke run with
tiny settings, no figure).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the examples' models and data
from width_sweep import TwoLayerNet, digits_one_hot  # noqa: E402

from lin_probe import LinearRegimeMonitor, empirical_ntk  # noqa: E402
from lin_probe.data import WithIndex  # noqa: E402

TOLERANCE, PATIENCE = 0.1, 3
TABLE_STEPS = (10, 100, 300, 1000)


class IndexedRegression(pl.LightningModule):
    """MSE with plain SGD; batches are ``(x, y, index)`` from ``WithIndex`` (the index is not used here)."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        return F.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # Present so that Lightning loads the validation loader before training starts: the monitor's
        # default probe is its first n_probe examples (without a validation loop it falls back to the
        # training loader).
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@dataclass
class Run:
    """One Trainer fit with the memorizing monitor."""

    name: str
    monitor: LinearRegimeMonitor
    steps: int
    seconds: float
    lr: float
    extra: dict[str, Any]


def fit(
    name: str,
    module: IndexedRegression,
    train: DataLoader,
    val: DataLoader,
    *,
    steps: int,
    n_probe: int,
    ntk_every: int,
    extra: dict[str, Any],
) -> Run:
    """Train with ``LinearRegimeMonitor(memorization=True)`` (probe: the validation loader's first points)."""
    monitor = LinearRegimeMonitor(
        n_probe=n_probe,
        every_n_steps=10,
        ntk_every_n_steps=ntk_every,
        tolerance=TOLERANCE,
        patience=PATIENCE,
        memorization=True,
        progress_bar=False,
        verbose=False,
    )
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[monitor],
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*no logger.*")
        trainer.fit(module, train, val)
    seconds = time.perf_counter() - start
    source = monitor.core.probe.source if monitor.core is not None else "?"  # shown in the fit card
    if "validation" not in source:
        raise RuntimeError(f"{name}: the probe is not held out ({source})")
    if not any("memo/functional_distance_rel" in r for r in monitor.history):
        raise RuntimeError(f"{name}: the memorizing shadow reported nothing (switched off?)")
    extra = {**extra, "probe": source}
    return Run(name, monitor, trainer.global_step, seconds, module.lr, extra)


def sphere(n: int, d: int, generator: torch.Generator) -> Tensor:
    """Gaussian rows rescaled to ``‖x‖² = d``."""
    x = torch.randn(n, d, generator=generator)
    return x * math.sqrt(d) / x.norm(dim=1, keepdim=True)


def relu_ntk_infinite_width(x: Tensor) -> Tensor:
    """Width → ∞ NTK of the two-layer ReLU net (both layers, ``‖x‖² = d``): ``ρ κ_0(ρ) + κ_1(ρ)``, float64."""
    x = x.double()
    rho = (x @ x.T / x.shape[1]).clamp(-1.0, 1.0)
    angle = torch.arccos(rho)
    return rho * (math.pi - angle) / (2 * math.pi) + (
        torch.sin(angle) + (math.pi - angle) * torch.cos(angle)
    ) / (2 * math.pi)


def kernel_gd(theta: Tensor, f0: Tensor, y: Tensor, n: int, lr: float, steps: list[int]) -> dict[int, Tensor]:
    """Full-batch kernel gradient descent on the mean squared error over train ∪ probe; probe outputs."""
    f, out = f0.clone(), {}
    for step in range(1, max(steps) + 1):
        f = f - lr * theta[:, :n] @ (2.0 * (f[:n] - y) / y.numel())
        if step in steps:
            out[step] = f[n:]
    return out


def rel(f: Tensor, g: Tensor, f0: Tensor) -> float:
    """``‖f − g‖ / ‖f − f_0‖``."""
    return float((f.double() - g.double()).norm() / (f.double() - f0.double()).norm())


def synthetic(d: int, n: int, n_probe: int, width: int, steps: int, seed: int) -> Run:
    """Setting 1: the paper's two-layer net with n = 2d, full-batch SGD at half the stability edge."""
    gen = torch.Generator().manual_seed(seed)
    x_train, x_probe = sphere(n, d, gen), sphere(n_probe, d, gen)
    beta = torch.randn(d, generator=gen)
    y_train = torch.sign(x_train @ beta / math.sqrt(d))[:, None]
    y_probe = torch.sign(x_probe @ beta / math.sqrt(d))[:, None]
    torch.manual_seed(seed)
    net = TwoLayerNet(d, width, 1)
    initial = copy.deepcopy(net)
    lam = float(torch.linalg.eigvalsh(empirical_ntk(net, x_train).double())[-1])
    lr = n / (2 * lam)  # mean over n outputs: the edge of stability of full-batch GD is n / λ_max
    train = DataLoader(WithIndex(TensorDataset(x_train, y_train)), batch_size=n)
    val = DataLoader(TensorDataset(x_probe, y_probe), batch_size=n_probe)
    run = fit(
        "synthetic",
        IndexedRegression(net, lr),
        train,
        val,
        steps=steps,
        n_probe=n_probe,
        ntk_every=10,
        extra={"lambda_max": lam},
    )
    # Function-space replays: the same full-batch GD with three fixed kernels on train ∪ probe.
    x_all = torch.cat([x_train, x_probe])
    with torch.no_grad():
        f0 = initial(x_all).double()
    kernel = run.monitor.kernel
    assert kernel is not None
    checks = [s for s in TABLE_STEPS if s <= steps]
    replays = {
        "affine": kernel_gd(kernel.matrix(x_all), f0, y_train.double(), n, lr, checks),
        "theta0": kernel_gd(empirical_ntk(initial, x_all).double(), f0, y_train.double(), n, lr, checks),
        "inf": kernel_gd(relu_ntk_infinite_width(x_all), f0, y_train.double(), n, lr, checks),
    }
    run.extra["replays"] = {
        step: {
            "affine_vs_theta0": rel(replays["theta0"][step], replays["affine"][step], f0[n:]),
            "inf_vs_theta0": rel(replays["theta0"][step], replays["inf"][step], f0[n:]),
            "affine_vs_inf": rel(replays["inf"][step], replays["affine"][step], f0[n:]),
        }
        for step in checks
    }
    return run


def digits_run(width: int, steps: int, ntk_every: int) -> Run:
    """Setting 2: the Figure 1 net on digits (same seed, init and batch order), training set in ``WithIndex``."""
    pl.seed_everything(0, verbose=False)
    x, y, x_val, y_val = digits_one_hot()
    net = TwoLayerNet(64, width, 10)
    train = DataLoader(WithIndex(TensorDataset(x, y)), batch_size=100, shuffle=True)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=len(x_val))
    return fit(
        "digits",
        IndexedRegression(net, 2.0),
        train,
        val,
        steps=steps,
        n_probe=256,
        ntk_every=ntk_every,
        extra={"n_train": len(x)},
    )


def nearest(by_step: dict[int, dict[str, float]], step: int, key: str) -> dict[str, float] | None:
    """The record at ``step`` if it has ``key``, else ``None``."""
    record = by_step.get(step)
    return record if record is not None and key in record else None


def table(runs: list[Run]) -> None:
    """Table 4, as printed into docs/reproduction.md."""
    print("| setting | step | rel, paper's shadow | rel, memorizing shadow | NTK drift |")
    print("|---|---|---|---|---|")
    for run in runs:
        by_step = {int(r["step"]): r for r in run.monitor.history}
        for step in TABLE_STEPS:
            if step not in by_step:
                continue
            r = by_step[step]
            drift = r.get("ntk_drift", math.nan)
            print(
                f"| {run.name} | {step} | {r['functional_distance_rel']:.3f} | "
                f"{r['memo/functional_distance_rel']:.3f} | {drift:.4f} |"
            )
    print()
    print(
        "| setting | exit step, paper's shadow | exit step, memorizing shadow | steps run | "
        "probe loss at the end: network / paper's shadow / memorizing shadow |"
    )
    print("|---|---|---|---|---|")
    for run in runs:
        last = run.monitor.history[-1]
        paper_exit = "none" if run.monitor.exit_step is None else str(run.monitor.exit_step)
        memo_exit = "none" if run.monitor.memo_exit_step is None else str(run.monitor.memo_exit_step)
        print(
            f"| {run.name} | {paper_exit} | {memo_exit} | {int(last['step'])} | "
            f"{last['loss_network']:.4f} / {last['loss_linear']:.4f} / {last['memo/loss_linear']:.4f} |"
        )


def figure3(runs: list[Run], path: Path) -> None:
    """Relative distance of both shadows vs step (log x), tolerance, exit steps; one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.8 * len(runs), 5.4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        hist = [r for r in run.monitor.history if r["step"] > 0]
        steps = [r["step"] for r in hist]
        ax.plot(
            steps,
            [r["functional_distance_rel"] for r in hist],
            color="tab:blue",
            label="paper's shadow (aK + b11ᵀ)",
        )
        ax.plot(
            steps,
            [r["memo/functional_distance_rel"] for r in hist],
            "--",
            color="tab:orange",
            lw=2,
            label="memorizing shadow (aK + b11ᵀ + cI)",
        )
        drift = [(r["step"], r["ntk_drift"]) for r in hist if "ntk_drift" in r]
        if drift:
            ax.plot(*zip(*drift, strict=True), ":", color="tab:green", label="NTK drift ‖Θ_t − Θ_0‖/‖Θ_0‖")
        ax.axhline(TOLERANCE, color="grey", lw=0.8, ls="--", label=f"tolerance {TOLERANCE}")
        for exit_step, colour, who in (
            (run.monitor.exit_step, "tab:blue", "paper's"),
            (run.monitor.memo_exit_step, "tab:orange", "memorizing"),
        ):
            if exit_step is not None:
                ax.axvline(exit_step, color=colour, lw=1, ls="-.", label=f"exit, {who}: step {exit_step}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("SGD step")
        ax.set_ylabel("‖f_t − f_lin,t‖ / ‖f_t − f_0‖ (held-out probe)")
        ax.set_title(run.extra["title"], fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.suptitle("Held-out distance from the network: paper's vs memorizing shadow (memorization=True)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per setting")
    parser.add_argument("--width", type=int, default=16384, help="width of the synthetic two-layer net")
    parser.add_argument("--digits-width", type=int, default=4096, help="width of the digits net (Figure 1's)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data and network seed")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: predictable on a shared machine)"
    )
    parser.add_argument("--fast", action="store_true", help="tiny settings (smoke run, no figure)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    d, n, n_probe = 64, 128, 256
    digits_ntk_every = 10
    if args.fast:
        args.steps, args.width, args.digits_width = 120, 1024, 256
        d, n, n_probe, digits_ntk_every = 32, 64, 64, 50

    syn = synthetic(d, n, n_probe, args.width, args.steps, args.seed)
    syn.extra["title"] = (
        f"synthetic: two-layer ReLU, width {args.width}, d = {d}, n_train = {n}, full-batch SGD lr {syn.lr:.3g}"
    )
    print(
        f"synthetic: d={d} n_train={n} n_probe={n_probe} width={args.width} steps={syn.steps} "
        f"λ_max(Θ_0 train)={syn.extra['lambda_max']:.3f} lr={syn.lr:.4f}  ({syn.seconds:.0f} s)",
        flush=True,
    )
    dig = digits_run(args.digits_width, args.steps, digits_ntk_every)
    dig.extra["title"] = (
        f"digits: two-layer ReLU, width {args.digits_width}, n_train = {dig.extra['n_train']}, SGD lr 2, batch 100"
    )
    print(
        f"digits: width={args.digits_width} n_train={dig.extra['n_train']} steps={dig.steps} lr=2 batch=100  "
        f"({dig.seconds:.0f} s)",
        flush=True,
    )
    runs = [syn, dig]
    for run in runs:
        kernel = run.monitor.kernel
        assert kernel is not None
        print(
            f"{run.name}: probe = {run.extra['probe']}; fit a={kernel.a:.4f} b={kernel.b:.4f} c={kernel.c:.4f} "
            f"rel_error={kernel.rel_error:.4f}; c/(a+b+c)={kernel.c / (kernel.a + kernel.b + kernel.c):.3f}"
        )

    print()
    print("### Table 4 — paper's vs memorizing shadow, held-out functional_distance_rel")
    print()
    table(runs)
    print()
    for run in runs:
        hist = [r for r in run.monitor.history if r["step"] > 0]
        for key, who in (
            ("functional_distance_rel", "paper's"),
            ("memo/functional_distance_rel", "memorizing"),
        ):
            peak = max(hist, key=lambda r: r[key])
            above = [int(r["step"]) for r in hist if r[key] > TOLERANCE]
            print(
                f"{run.name}, {who} shadow: max rel {peak[key]:.4f} at step {int(peak['step'])}; "
                f"{len(above)} of {len(hist)} checks above {TOLERANCE}"
                + (f" (first at step {above[0]})" if above else "")
            )
    print()
    print("Synthetic setting, kernel GD replays (function space, held-out probe), ‖f_A − f_B‖/‖f_B − f_0‖:")
    print("| step | affine (= memorizing) vs Θ_0 | infinite width vs Θ_0 | affine vs infinite width |")
    print("|---|---|---|---|")
    for step, values in syn.extra["replays"].items():
        print(
            f"| {step} | {values['affine_vs_theta0']:.4f} | {values['inf_vs_theta0']:.4f} | "
            f"{values['affine_vs_inf']:.4f} |"
        )
    if not args.fast:
        path = args.figures / "figure3_memo_vs_paper.png"
        figure3(runs, path)
        print(f"\nwrote {path.relative_to(ROOT)}")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
