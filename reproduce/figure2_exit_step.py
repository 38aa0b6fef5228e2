"""Figure 2: the exit step from the linear regime vs width and vs learning rate (digits, two-layer net).

The paper: the network follows the linear model early and escapes it later in training; wider nets
stay longer. Each point is one run of ``examples/width_sweep.py``'s ``run`` (two-layer ReLU net,
NTK parameterisation, MSE on one-hot digits, plain SGD, batch 100, 256 held-out probe digits,
tolerance 0.1, patience 3, a check every 5 steps), stopped at its exit or after ``--steps`` steps.
Left: exit step vs width at lr 2. Right: exit step and exit "time" ``lr × step`` vs learning rate
at width 4096. Several seeds per point (network init and batch order). Prints the table.

Run: ``python reproduce/figure2_exit_step.py`` (``--fast``: two widths, one seed, no figure).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the examples' models and data
from width_sweep import run  # noqa: E402


def exits(width: int, lr: float, steps: int, seeds: list[int]) -> list[float]:
    """Exit step per seed (``inf``: still in the regime after ``steps`` steps)."""
    out = []
    for seed in seeds:
        r = run(width, lr, steps, log_dir=None, seed=seed)
        out.append(math.inf if math.isnan(r["exit_step"]) else r["exit_step"])
    return out


def fmt(values: list[float]) -> str:
    return ", ".join("none" if math.isinf(v) else f"{int(v)}" for v in values)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def plot(by_width: dict[int, list[float]], by_lr: dict[float, list[float]], steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_w, ax_lr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, data in ((ax_w, by_width), (ax_lr, by_lr)):
        for x, values in data.items():
            shown = [min(v, steps) for v in values]
            ax.scatter([x] * len(shown), shown, color="tab:blue", alpha=0.5, s=18)
            censored = [steps for v in values if math.isinf(v)]
            if censored:
                ax.scatter([x] * len(censored), censored, marker="^", color="tab:red", s=30)
        xs = list(data)
        ax.plot(
            xs,
            [min(median(v), steps) for v in data.values()],
            "-o",
            color="tab:blue",
            label="median exit step",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylabel("exit step")
    ax_lr.plot(
        list(by_lr),
        [min(median(v), steps) * lr for lr, v in by_lr.items()],
        "-s",
        color="tab:green",
        label="median lr × exit step (time)",
    )
    ax_w.set_xlabel("width m (lr 2)")
    ax_lr.set_xlabel("learning rate (width 4096)")
    ax_w.set_title("Wider nets leave the linear regime later")
    ax_lr.set_title("Exit step vs learning rate")
    ax_w.legend(fontsize=8, title=f"▲: no exit within {steps} steps", title_fontsize=8)
    ax_lr.legend(fontsize=8)
    fig.suptitle("Two-layer ReLU net on digits, MSE, SGD batch 100: exit from the linear regime (held-out)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--lr-width", type=int, default=4096, help="width of the learning-rate sweep")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3000, help="at most this many steps per run")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: predictable on a shared machine)"
    )
    parser.add_argument("--fast", action="store_true", help="tiny settings (smoke run, no figure)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.fast:
        args.widths, args.lrs, args.seeds, args.steps, args.lr_width = [64, 1024], [2.0, 4.0], 1, 150, 1024
    seeds = list(range(args.seeds))
    start = time.perf_counter()

    print(f"### Figure 2 data — exit step per seed ({args.seeds} seeds), at most {args.steps} steps")
    print()
    print("| sweep | width | lr | exit steps (per seed) | median | median lr × exit |")
    print("|---|---|---|---|---|---|")
    by_width: dict[int, list[float]] = {}
    for width in args.widths:
        by_width[width] = exits(width, 2.0, args.steps, seeds)
        med = median(by_width[width])
        print(
            f"| width | {width} | 2 | {fmt(by_width[width])} | {fmt([med])} | {fmt([2.0 * med])} |",
            flush=True,
        )
    by_lr: dict[float, list[float]] = {}
    for lr in args.lrs:
        by_lr[lr] = (
            by_width[args.lr_width]
            if lr == 2.0 and args.lr_width in by_width
            else exits(args.lr_width, lr, args.steps, seeds)
        )
        med = median(by_lr[lr])
        print(
            f"| lr | {args.lr_width} | {lr:g} | {fmt(by_lr[lr])} | {fmt([med])} | {fmt([lr * med])} |",
            flush=True,
        )
    if not args.fast:
        plot(by_width, by_lr, args.steps, args.figures / "figure2_exit_step.png")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
