"""Figure 1 and Table 3: network vs linear shadow over training on real data (scikit-learn digits).

Figure 1 — the paper's main picture on digits: the two-layer ReLU net (width 4096, NTK
parameterisation, MSE on one-hot labels, plain SGD lr 2, batch 100) and its linear shadow; losses
on 256 training and 256 held-out digits, and the relative functional distance on both, with the
exit step (held-out) marked; log-scaled step axis. Two ``LinearRegimeMonitor`` callbacks ride on
the same run, one per probe set (each keeps its own shadow, trained on the same batches).

Table 3 — early-time agreement: ``functional_distance_rel`` on held-out digits at steps 10, 100,
1000, the exit step and the NTK drift at step 1000, for the two-layer net (wide and narrow), the
deep MLP of ``examples/digits_mlp.py`` and the CNN of ``examples/digits_cnn.py`` (their default
settings: cross-entropy, SGD with momentum 0.9), with each monitor's verdict and diagnosis (the cause
it names, the centred fit error and NTK drift it read it from, and the step it was decided at).

Run: ``python reproduce/digits_runs.py`` (``--fast``: 120 steps, narrow nets; figure not written).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the examples' models and data
from digits_cnn import DigitsCNN  # noqa: E402
from digits_mlp import DeepMLP, DigitsClassifier, digits  # noqa: E402
from width_sweep import DigitsRegression, digits_one_hot  # noqa: E402

from lin_probe import LinearRegimeMonitor  # noqa: E402

Monitors = dict[str, LinearRegimeMonitor]


class NamedMonitor(LinearRegimeMonitor):
    """A monitor with its own ``state_key``: Lightning refuses two stateful callbacks with one key.

    Works around ``LinearRegimeMonitor`` keeping the default (class-name) ``state_key``, which makes
    one Trainer with two monitors (here: a training and a held-out probe) raise at construction.
    """

    def __init__(self, name: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.name = name

    @property
    def state_key(self) -> str:
        return self._generate_state_key(probe=self.name)


def fit(model: pl.LightningModule, data: tuple, monitors: Monitors, steps: int) -> None:
    """Train ``model`` for ``steps`` SGD steps (batch 100) with the given monitors; no logger."""
    x, y = data[0], data[1]
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=list(monitors.values()),
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*no logger.*")
        trainer.fit(model, loader)


def monitor(name: str, probe: tuple, loss: str, ntk_every: int) -> LinearRegimeMonitor:
    return NamedMonitor(
        name,
        probe=probe,
        n_probe=256,
        loss=loss,
        every_n_steps=10,
        ntk_every_n_steps=ntk_every,
        verbose=False,
    )


def two_layer(width: int, steps: int, ntk_every: int) -> Monitors:
    pl.seed_everything(0, verbose=False)
    data = digits_one_hot()
    monitors = {
        "held_out": monitor("held_out", (data[2], data[3]), "mse", ntk_every),
        "train": monitor("train", (data[0][:256], data[1][:256]), "mse", 0),
    }
    fit(DigitsRegression(width, lr=2.0), data, monitors, steps)
    return monitors


def classifier(net: torch.nn.Module, image: bool, steps: int, ntk_every: int) -> Monitors:
    data = digits(image=image)
    monitors = {"held_out": monitor("held_out", (data[2], data[3]), "cross_entropy", ntk_every)}
    fit(DigitsClassifier(net, lr=0.1, momentum=0.9), data, monitors, steps)
    return monitors


def figure1(monitors: Monitors, path: Path, tolerance: float) -> None:
    """Losses (train and held-out, network and shadow) and the relative functional distance; log steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dist) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"train": "tab:blue", "held_out": "tab:orange"}
    for name, mon in monitors.items():
        hist = [r for r in mon.history if r["step"] > 0]
        steps = [r["step"] for r in hist]
        label = name.replace("_", "-")
        ax_loss.plot(steps, [r["loss_network"] for r in hist], color=colours[name], label=f"network, {label}")
        ax_loss.plot(
            steps,
            [r["loss_linear"] for r in hist],
            "--",
            color=colours[name],
            label=f"linear shadow, {label}",
        )
        ax_dist.plot(
            steps,
            [r["functional_distance_rel"] for r in hist],
            color=colours[name],
            label=f"‖f − f_lin‖ / ‖f − f_0‖, {label}",
        )
    drift = [
        (r["step"], r["ntk_drift"])
        for r in monitors["held_out"].history
        if "ntk_drift" in r and r["step"] > 0
    ]
    if drift:
        ax_dist.plot(
            *zip(*drift, strict=True), "s:", color="tab:green", ms=3, label="NTK drift ‖Θ_t − Θ_0‖/‖Θ_0‖"
        )
    ax_dist.axhline(tolerance, color="grey", lw=0.8, ls=":", label=f"tolerance {tolerance}")
    exit_step = monitors["held_out"].exit_step
    for ax in (ax_loss, ax_dist):
        ax.set_xscale("log")
        ax.set_xlabel("SGD step")
        if exit_step is not None:
            ax.axvline(exit_step, color="red", lw=1, label=f"exit step {exit_step} (held-out)")
    ax_loss.set_ylabel("MSE on one-hot labels")
    ax_loss.set_title("Loss: network vs linear shadow")
    ax_dist.set_yscale("log")
    ax_dist.set_title("Distance from the linear shadow")
    ax_loss.legend(fontsize=7)
    ax_dist.legend(fontsize=7)
    fig.suptitle("Two-layer ReLU net (width 4096) on digits, SGD lr 2, batch 100")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def row(name: str, mon: LinearRegimeMonitor, steps: int) -> str:
    by_step = {int(r["step"]): r for r in mon.history}

    def rel(step: int) -> str:
        return f"{by_step[step]['functional_distance_rel']:.3f}" if step in by_step else "–"

    kernel = mon.kernel
    assert kernel is not None
    drift = by_step.get(steps, {}).get("ntk_drift", math.nan)
    exit_step = "none" if mon.exit_step is None else str(mon.exit_step)
    return (
        f"| {name} | {kernel.rel_error:.3f} | {rel(10)} | {rel(100)} | {rel(1000)} | {exit_step} | "
        f"{drift:.3f} | {by_step[steps]['loss_network']:.3f} / {by_step[steps]['loss_linear']:.3f} | "
        f"{verdict_cell(mon)} |"
    )


def verdict_cell(mon: LinearRegimeMonitor) -> str:
    """The monitor's verdict and, once it has one, the diagnosis with the numbers it was read from."""
    verdict = mon.verdict
    assert verdict is not None
    state = {
        "inside": "inside",
        "left": f"left at {verdict.exit_step}",
        "outside_from_start": "outside from start",
    }
    diagnosis = mon.diagnosis
    if diagnosis is None:
        return state[verdict.state]
    return (
        f"{state[verdict.state]}: {diagnosis.title} (centred fit {diagnosis.fit_rel_error_centered:.2f}, "
        f"drift {diagnosis.ntk_drift:.3f} at step {diagnosis.step})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--figure-steps", type=int, default=3000, help="steps of the Figure 1 run")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: predictable on a shared machine)"
    )
    parser.add_argument("--fast", action="store_true", help="tiny settings (smoke run, no figure)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    wide, narrow, mlp_width, cnn_channels = 4096, 256, 512, 64
    if args.fast:
        args.steps = args.figure_steps = 120
        wide, narrow, mlp_width, cnn_channels = 512, 64, 64, 16

    runs: dict[str, tuple[Monitors, str]] = {}
    x_val = digits_one_hot()[2]
    rho = (x_val @ x_val.T / x_val.shape[1]).fill_diagonal_(float("nan"))
    print(
        f"digits (held-out, on the sphere): mean |xᵀx'/d| off the diagonal {rho.abs().nanmean():.3f}, "
        f"max {rho.nan_to_num(0).abs().max():.3f}; isotropic inputs at d = 64: ≈ {math.sqrt(2 / math.pi / 64):.3f}"
    )
    runs[f"two-layer ReLU, width {wide}"] = (two_layer(wide, args.figure_steps, 50), "MSE, SGD lr 2")
    if not args.fast:
        figure1(runs[f"two-layer ReLU, width {wide}"][0], args.figures / "figure1_digits_two_layer.png", 0.1)
    print(f"Figure 1 run done ({time.perf_counter() - start:.0f} s)", flush=True)
    runs[f"two-layer ReLU, width {narrow}"] = (two_layer(narrow, args.steps, 500), "MSE, SGD lr 2")
    torch.manual_seed(0)
    runs[f"4-hidden-layer MLP, width {mlp_width}"] = (
        classifier(DeepMLP(64, mlp_width, 4, 10), False, args.steps, 500),
        "CE, SGD lr 0.1 mom 0.9",
    )
    torch.manual_seed(0)
    runs[f"CNN, {cnn_channels} channels"] = (
        classifier(DigitsCNN(cnn_channels), True, args.steps, 500),
        "CE, SGD lr 0.1 mom 0.9",
    )

    print()
    print("### Table 3 — relative functional distance ‖f_t − f_lin,t‖/‖f_t − f_0‖ on 256 held-out digits")
    print()
    print(
        "| model | loss, optimizer | fit error at init | rel @ 10 | rel @ 100 | rel @ 1000 | exit step | "
        f"NTK drift @ {args.steps} | probe loss @ {args.steps}: network / linear | verdict: diagnosis |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (mons, setting) in runs.items():
        line = row(name, mons["held_out"], args.steps)
        print(line.replace(f"| {name} |", f"| {name} | {setting} |", 1))
    print()
    train = runs[f"two-layer ReLU, width {wide}"][0]["train"]
    held = runs[f"two-layer ReLU, width {wide}"][0]["held_out"]
    print(
        f"Figure 1 run (width {wide}, {args.figure_steps} steps): exit step on held-out digits {held.exit_step}, "
    )
    print(f"on training digits {train.exit_step}; at selected steps (rel distance train / held-out, losses):")
    h_by = {int(r["step"]): r for r in held.history}
    t_by = {int(r["step"]): r for r in train.history}
    print(
        "| step | rel train | rel held-out | loss net train | loss lin train | loss net held-out | loss lin held-out | NTK drift |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for step in (1, 10, 50, 100, 200, 500, 1000, 2000, 3000):
        if step in h_by and step in t_by:
            t, h = t_by[step], h_by[step]
            print(
                f"| {step} | {t['functional_distance_rel']:.3f} | {h['functional_distance_rel']:.3f} | "
                f"{t['loss_network']:.4f} | {t['loss_linear']:.4f} | {h['loss_network']:.4f} | "
                f"{h['loss_linear']:.4f} | {h.get('ntk_drift', math.nan):.4f} |"
            )
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
