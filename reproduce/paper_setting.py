"""The paper's deep and convolutional claims, checked in the paper's own setting (digits 3 vs 8).

Hu et al. (2020) prove the early-time linear picture for two-layer nets and state it for deep fully
connected nets and for convolutional nets with global average pooling (for those, with the data
kernel of the *mean input patch*). Table 3 (``reproduce/digits_runs.py``) tests these architectures
the way a practitioner trains them (cross-entropy, SGD with momentum, mini-batches); this script
tests them in the setting the claim is made for:

- a binary task, digit 3 vs digit 8 of scikit-learn's digits (of the 45 pairs, the one a ridge
  classifier linear in the pixels separates worst: 95 % held-out accuracy), targets ±1, MSE; inputs
  centred (the pair's mean) and scaled to norm √64 as in ``examples/width_sweep.py``; the split of
  ``digits_one_hot`` (1400 / 397): the pair's 272 training digits train, its 85 held-out ones are the
  probe;
- NTK parameterisation: N(0, 1) weights, ``1/√fan_in`` in ``forward``, biases ``β·b`` with
  ``b ~ N(0, 1)``, ``β = 0.1``;
- full-batch gradient descent (plain SGD, no momentum) at a small learning rate: 1/20 of the
  stability edge ``n / λ_max(Θ_0 on the training set)`` of the MSE ``(1/n) Σ (f − y)²``;
- (1) a 4-hidden-layer ReLU MLP, width 512, data kernel "flat" (``XXᵀ/d``); (2) a CNN: two 3×3
  convolutions (padding 1, 64 channels), ReLU, global average pooling, linear readout, data kernel
  "patch_mean", with the "flat" one run beside it on the same network and "auto"'s choice shown.

Each run drives the Lightning-free ``RegimeProbe`` with ``MonitorConfig(loss="mse", linearized=True,
tolerance=0.1, patience=3)`` at log-spaced steps (0, 1, 2, 3, 4, 6, 8, 11, …, 1024: ``2^(k/2)``
rounded), an NTK check at each. It prints the fit at init, a table over those steps (network train
/ probe loss, the paper's shadow's and the linearised network's probe loss, both relative
distances, ``ntk_drift``, ``kernel_distance``), the verdict and the diagnosis. For contrast, the
same nets at 16× and 30× the learning rate (0.8 and 1.5 times the edge; the second is the
"catapult" phase of large-lr training) give one line each. For the MLP it also replays kernel
gradient descent with the infinite-width NTK of the same architecture and with its affine fit, to
tell the affine form's error from finite width.

Run: ``python reproduce/paper_setting.py`` (about 5 min on 2 shared cores with one torch thread;
``--fast``: tiny nets and steps, a few seconds, no figure). Writes ``docs/figures/paper_setting.png``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lin_probe import RegimeProbe, empirical_ntk
from lin_probe.kernel import AffineKernel, data_kernel, fit_affine_kernel
from lin_probe.monitor.config import Host, MonitorConfig

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE, PATIENCE, BETA = 0.1, 3, 0.1
PAIR = (3, 8)
SMALL_FRACTION = 0.05  # of the stability edge
LARGE_FACTORS = (16.0, 30.0)  # × the small learning rate


# ------------------------------------------------------------------------------------------ data


def pair_task(first: int = PAIR[0], second: int = PAIR[1], n_probe: int = 256) -> tuple[Tensor, ...]:
    """Digits ``first`` (+1) vs ``second`` (−1), centred on the pair's mean and scaled to norm √64.

    The split is ``digits_one_hot``'s (a seeded permutation, 1400 training / 397 held out): the pair's
    training digits train, up to ``n_probe`` of its held-out ones are the probe.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held = order[:1400], order[1400:]

    def of_pair(index: Tensor) -> Tensor:
        return index[(labels[index] == first) | (labels[index] == second)]

    train, held = of_pair(train), of_pair(held)[:n_probe]
    both = torch.cat([train, held])
    x = x[both] - x[both].mean(dim=0)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(x.shape[1])
    y = torch.where(labels[both] == first, 1.0, -1.0)[:, None]
    n = len(train)
    return x[:n], y[:n], x[n:], y[n:]


def linear_separability(task: tuple[Tensor, ...], ridge: float = 30.0) -> tuple[float, float]:
    """Held-out accuracy and MSE of ridge regression linear in the pixels (why this pair)."""
    x, y, x_val, y_val = (t.to(torch.float64) for t in task)

    def rows(inputs: Tensor) -> Tensor:
        return torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)

    a = rows(x)
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=torch.float64), a.T @ y)
    pred = rows(x_val) @ w
    return float((pred.sign() == y_val).double().mean()), float(((pred - y_val) ** 2).mean())


# ------------------------------------------------------------------------------------------ models


class FullyConnected(nn.Module):
    """``depth`` hidden ReLU layers, NTK parameterisation: ``W h/√fan_in + β b``, all N(0, 1)."""

    def __init__(self, d: int, width: int, depth: int, beta: float = BETA) -> None:
        super().__init__()
        sizes = [d] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in itertools.pairwise(sizes))
        self.readout = nn.Linear(width, 1, bias=False)
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(n)) for n in [*sizes[1:], 1])
        for parameter in self.parameters():
            nn.init.normal_(parameter)
        self.beta = beta

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for layer, bias in zip(self.hidden, self.biases, strict=False):
            h = torch.relu(layer(h) / math.sqrt(layer.in_features) + self.beta * bias)
        return self.readout(h) / math.sqrt(self.readout.in_features) + self.beta * self.biases[-1]


class GapCNN(nn.Module):
    """``layers`` 3×3 convolutions (padding 1) with ReLU, global average pooling, a linear readout.

    NTK parameterisation (``conv(h)/√(9·C_in) + β b``); the convolutions are plain ``nn.Conv2d`` without
    bias, so the first one is what ``data_kernel="patch_mean"`` finds, and lin_probe's structured NTK
    handles them exactly.
    """

    def __init__(self, channels: int, layers: int, beta: float = BETA) -> None:
        super().__init__()
        sizes = [1] + [channels] * layers
        self.convs = nn.ModuleList(
            nn.Conv2d(i, o, 3, padding=1, bias=False) for i, o in itertools.pairwise(sizes)
        )
        self.readout = nn.Linear(channels, 1, bias=False)
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(n)) for n in [*sizes[1:], 1])
        for parameter in self.parameters():
            nn.init.normal_(parameter)
        self.beta = beta

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for conv, bias in zip(self.convs, self.biases, strict=False):
            h = torch.relu(conv(h) / math.sqrt(9 * conv.in_channels) + self.beta * bias[:, None, None])
        h = h.mean(dim=(2, 3))
        return self.readout(h) / math.sqrt(self.readout.in_features) + self.beta * self.biases[-1]


@dataclass
class Architecture:
    name: str
    build: Callable[[], nn.Module]
    to_inputs: Callable[[Tensor], Tensor]
    data_kernel: str
    beside: tuple[str, ...] = ()  # other data kernels run on the same network (paper's shadow only)


# ------------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    lr: float
    probes: dict[str, RegimeProbe]
    rows: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def main(self) -> RegimeProbe:
        return next(iter(self.probes.values()))


def log_steps(steps: int) -> list[int]:
    """0 and ``round(2^(k/2))`` up to ``steps`` (and ``steps`` itself)."""
    points = {0, steps} | {round(2 ** (k / 2)) for k in range(2 * int(math.log2(max(steps, 1))) + 2)}
    return sorted(p for p in points if p <= steps)


def stability_edge(model: nn.Module, x: Tensor) -> float:
    """``n / λ_max(Θ_0)`` on the training set: the largest stable GD step of ``(1/n) Σ (f − y)²``."""
    theta = empirical_ntk(model, x).to(torch.float64)
    return len(x) / float(torch.linalg.eigvalsh(theta)[-1])


def train(
    arch: Architecture,
    task: tuple[Tensor, ...],
    lr: float,
    steps: int,
    *,
    stop_after: int | None = None,
) -> Run:
    """Full-batch GD for ``steps`` steps with one ``RegimeProbe`` per data kernel; checks at :func:`log_steps`.

    ``stop_after``: stop that many checks after the main probe's verdict is no longer "inside".
    """
    x, y, x_probe, y_probe = task
    x, x_probe = arch.to_inputs(x), arch.to_inputs(x_probe)
    torch.manual_seed(0)
    model = arch.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    messages: list[str] = []
    probes = {}
    for index, kernel in enumerate((arch.data_kernel, *arch.beside)):
        config = MonitorConfig(
            loss="mse", linearized=index == 0, tolerance=TOLERANCE, patience=PATIENCE, data_kernel=kernel
        )
        host = Host(warn=lambda message, kernel=kernel: messages.append(f"({kernel}) {message}"))
        probes[kernel] = RegimeProbe.start(model, (x_probe, y_probe), optimizer, config, host=host)
    run = Run(lr, probes, warnings=messages)
    checks = set(log_steps(steps))
    start = time.perf_counter()
    settled_at = None

    def check(step: int) -> None:
        with torch.no_grad():
            row = {"step": float(step), "train_loss": float(F.mse_loss(model(x), y))}
        for index, (name, probe) in enumerate(probes.items()):
            record = probe.check(model, step, ntk=index == 0)
            row.update({(k if index == 0 else f"{name}:{k}"): v for k, v in record.items()})
        run.rows.append(row)

    check(0)
    for step in range(1, steps + 1):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        for probe in probes.values():
            probe.accumulate(x, y)
            probe.step(lr)
        optimizer.step()
        if step in checks:
            check(step)
            if run.main.verdict.state != "inside":
                settled_at = len(run.rows) if settled_at is None else settled_at
                if stop_after is not None and len(run.rows) - settled_at >= stop_after:
                    break
    run.seconds = time.perf_counter() - start
    return run


# ------------------------------------------------------------------------------------------ infinite width


def relu_ntk(x: Tensor, depth: int, beta: float) -> Tensor:
    """Infinite-width NTK of :class:`FullyConnected` (arc-cosine recursion), float64.

    ``Σ¹ = xᵀx'/d + β²``; per hidden layer ``Σ ← E[φ(u)φ(v)] + β²``, ``Θ ← Θ·E[φ'(u)φ'(v)] + Σ``.
    """
    x = x.to(torch.float64)
    sigma = x @ x.T / x.shape[1] + beta**2
    theta = sigma.clone()
    for _ in range(depth):
        scale = sigma.diagonal().sqrt()
        cos = (sigma / scale[:, None] / scale[None]).clamp(-1.0, 1.0)
        angle = torch.arccos(cos)
        sigma = scale[:, None] * scale[None] * (torch.sin(angle) + (math.pi - angle) * cos) / (2 * math.pi)
        sigma = sigma + beta**2
        theta = theta * (math.pi - angle) / (2 * math.pi) + sigma
    return theta


def kernel_descent(
    theta: Tensor, n: int, f0: Tensor, y: Tensor, lr: float, steps: list[int]
) -> dict[int, Tensor]:
    """Gradient descent on ``(1/n) Σ (f − y)²`` over the first ``n`` points with the fixed kernel
    ``theta`` (on train ∪ probe), from ``f0``; the probe's outputs at ``steps``."""
    f = f0.clone()
    out = {0: f[n:].clone()} if 0 in steps else {}
    for step in range(1, max(steps) + 1):
        f = f - (2 * lr / n) * theta[:, :n] @ (f[:n] - y)
        if step in steps:
            out[step] = f[n:].clone()
    return out


def infinite_width_replay(
    task: tuple[Tensor, ...], depth: int, f0: Tensor, steps: list[int]
) -> tuple[AffineKernel, float, dict[int, float]]:
    """Fit the infinite-width NTK on the probe, then replay kernel GD with it and with the paper's
    kernel ``a·K + b·11ᵀ`` (no ``c·I``: the paper's shadow has none) at 1/20 of its own edge.

    Returns the fit, the learning rate and ``‖f_paper − f_∞‖/‖f_∞ − f_0‖`` on the probe per step.
    """
    x, y, x_probe, _ = task
    n = len(x)
    both = torch.cat([x, x_probe])
    theta = relu_ntk(both, depth, BETA)
    fit = fit_affine_kernel(theta[n:, n:], x_probe)
    paper = fit.a * data_kernel(both) + fit.b
    lr = SMALL_FRACTION * n / float(torch.linalg.eigvalsh(theta[:n, :n])[-1])
    f0 = f0.to(torch.float64)
    target = y.to(torch.float64)
    exact = kernel_descent(theta, n, f0, target, lr, steps)
    linear = kernel_descent(paper, n, f0, target, lr, steps)
    start = f0[n:]
    rel = {}
    for step in steps:
        moved = float((exact[step] - start).norm())
        rel[step] = float((linear[step] - exact[step]).norm()) / moved if moved > 0 else 0.0
    return fit, lr, rel


def first_exit(values: dict[int, float]) -> int | None:
    """The exit rule on a sequence of checks: first of ``PATIENCE`` consecutive values above the tolerance."""
    streak: list[int] = []
    for step in sorted(values):
        if step == 0:
            continue
        streak = [*streak, step] if values[step] > TOLERANCE else []
        if len(streak) == PATIENCE:
            return streak[0]
    return None


# ------------------------------------------------------------------------------------------ printing


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "nan" if value is not None else "–"
    if abs(value) >= 1e4:
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def print_fit(run: Run, arch: Architecture, task: tuple[Tensor, ...]) -> None:
    x_probe = arch.to_inputs(task[2])
    print(f"Fit of Θ_0 on the probe ({len(x_probe)} held-out digits), `a·K + b·11ᵀ + c·I`:")
    print()
    print("| data kernel | a | b | c | fit error ‖Θ_0 − Θ_lin‖₂/‖Θ_0‖₂ | centred fit error |")
    print("|---|---|---|---|---|---|")
    for name, probe in run.probes.items():
        k = probe.kernel
        label = probe.data_kernel.name if probe.data_kernel else name
        if probe.data_kernel is not None and hasattr(probe.data_kernel.features_fn, "describe"):
            label = probe.data_kernel.features_fn.describe()
        print(
            f"| {label} | {k.a:.4f} | {k.b:.4f} | {k.c:.4f} | {k.rel_error:.4f} | {k.rel_error_centered:.4f} |"
        )
    model = _fresh(arch)  # "auto" fits every candidate that applies and keeps the lowest centred error
    auto = RegimeProbe.start(
        model,
        (x_probe, task[3]),
        torch.optim.SGD(model.parameters(), lr=run.lr),
        MonitorConfig(loss="mse", data_kernel="auto"),
        host=Host(warn=lambda message: None),
    )
    assert auto.data_kernel is not None
    print()
    print(f'data_kernel="auto" picks: {auto.data_kernel.summary()}')


def _fresh(arch: Architecture) -> nn.Module:
    torch.manual_seed(0)
    return arch.build()


def print_table(run: Run, arch: Architecture) -> None:
    beside = [name for name in run.probes if name != arch.data_kernel]
    extra = "".join(f" | rel, {name} shadow" for name in beside)
    print(
        "| step | train loss, network | probe loss: network | paper's shadow | linearised | "
        f"rel, paper's shadow ({arch.data_kernel}) | rel, linearised{extra} | ntk_drift | kernel_distance |"
    )
    print("|" + "---|" * (9 + len(beside)))
    for row in run.rows:
        cells = [
            str(int(row["step"])),
            fmt(row["train_loss"]),
            fmt(row["loss_network"]),
            fmt(row["loss_linear"]),
            fmt(row["linearized/loss_linear"]),
            fmt(row["functional_distance_rel"], 3),
            fmt(row["linearized/functional_distance_rel"], 3),
            *(fmt(row[f"{name}:functional_distance_rel"], 3) for name in beside),
            fmt(row.get("ntk_drift"), 3),
            fmt(row.get("kernel_distance"), 5),
        ]
        print("| " + " | ".join(cells) + " |")


def outcome(probe: RegimeProbe) -> str:
    """Verdict, the linearised shadow's own exit and the diagnosis, on one line."""
    linearized = probe.exit_step("linearized/")
    text = f"verdict: {probe.verdict.describe()}; linearised shadow's exit step: {linearized or 'none'}"
    if probe.diagnosis is not None:
        d = probe.diagnosis
        text += (
            f"; diagnosis (at step {d.step}): {d.title} (ntk_drift {fmt(d.ntk_drift, 3)}, "
            f"linearised distance {fmt(d.linearized_distance_rel, 3)}, centred fit {fmt(d.fit_rel_error_centered, 3)})"
        )
    return text


def figure(results: dict[str, tuple[Architecture, Run]], path: Path) -> None:
    """Per architecture: probe losses (network, paper's shadow, linearised) and the distances; log steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5.6 * len(results), 7.4), squeeze=False)
    for column, (title, (arch, run)) in enumerate(results.items()):
        rows = [r for r in run.rows if r["step"] > 0]
        steps = [r["step"] for r in rows]
        ax_loss, ax_dist = axes[0][column], axes[1][column]
        ax_loss.plot(steps, [r["train_loss"] for r in rows], color="grey", lw=1, label="network, train")
        ax_loss.plot(steps, [r["loss_network"] for r in rows], color="black", label="network, probe")
        ax_loss.plot(
            steps,
            [r["loss_linear"] for r in rows],
            "--",
            color="tab:blue",
            label=f"paper's shadow ({arch.data_kernel})",
        )
        ax_loss.plot(
            steps,
            [r["linearized/loss_linear"] for r in rows],
            ":",
            color="tab:red",
            lw=2,
            label="linearised network",
        )
        ax_dist.plot(
            steps, [r["functional_distance_rel"] for r in rows], color="tab:blue", label="paper's shadow"
        )
        ax_dist.plot(
            steps,
            [r["linearized/functional_distance_rel"] for r in rows],
            color="tab:red",
            label="linearised network",
        )
        for name in run.probes:
            if name != arch.data_kernel:
                values = [r[f"{name}:functional_distance_rel"] for r in rows]
                ax_dist.plot(steps, values, color="tab:purple", lw=1, label=f"paper's shadow ({name})")
        ax_dist.plot(steps, [r["ntk_drift"] for r in rows], "s:", ms=3, color="tab:green", label="ntk_drift")
        ax_dist.axhline(TOLERANCE, color="grey", lw=0.8, ls=":", label=f"tolerance {TOLERANCE}")
        exit_step = run.main.verdict.exit_step
        for ax in (ax_loss, ax_dist):
            ax.set_xscale("log")
            ax.set_xlabel("GD step (full batch)")
            if exit_step is not None:
                ax.axvline(exit_step, color="black", lw=1, ls="-.", label=f"exit step {exit_step}")
        verdict = {"inside": "inside", "left": f"left at step {exit_step}"}.get(
            run.main.verdict.state, "outside from the start"
        )
        ax_loss.set_title(f"{title}: MSE ({verdict})", fontsize=10)
        ax_dist.set_title("relative distance from the network on the probe")
        ax_dist.set_yscale("log")
        ax_loss.legend(fontsize=7)
        ax_dist.legend(fontsize=7)
    fig.suptitle(f"Digits {PAIR[0]} vs {PAIR[1]}, NTK parameterisation, full-batch GD at 1/20 of the edge")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1024, help="steps of the small-lr runs")
    parser.add_argument("--large-steps", type=int, default=256, help="most steps of the large-lr runs")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: predictable on a shared machine)"
    )
    parser.add_argument("--fast", action="store_true", help="tiny nets and steps (smoke run, no figure)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    width, channels = 512, 64
    if args.fast:
        width, channels, args.steps, args.large_steps = 64, 8, 32, 16
    warnings.filterwarnings("ignore", message=".*lin_probe.*")

    task = pair_task()
    print(
        f"Task: digits {PAIR[0]} (+1) vs {PAIR[1]} (−1), {len(task[0])} training / {len(task[2])} probe "
        "(held-out) digits, inputs centred and on the sphere of radius √64."
    )
    scores = {pair: linear_separability(pair_task(*pair)) for pair in itertools.combinations(range(10), 2)}
    hardest = sorted(scores, key=lambda pair: scores[pair][0])[:3]
    perfect = sum(accuracy == 1.0 for accuracy, _ in scores.values())
    print(
        "Ridge regression linear in the pixels, held-out accuracy / MSE: "
        + ", ".join(f"{a} vs {b} {scores[a, b][0]:.3f} / {scores[a, b][1]:.3f}" for a, b in hardest)
        + f" (the three hardest of 45 pairs); {perfect} pairs are separated perfectly."
    )
    archs = {
        f"4-hidden-layer ReLU MLP, width {width}": Architecture(
            "mlp", lambda: FullyConnected(64, width, 4), lambda x: x, "flat"
        ),
        f"CNN-GAP, 2 conv layers × {channels} channels": Architecture(
            "cnn", lambda: GapCNN(channels, 2), lambda x: x.reshape(-1, 1, 8, 8), "patch_mean", ("flat",)
        ),
    }
    results: dict[str, tuple[Architecture, Run]] = {}
    for title, arch in archs.items():
        edge = stability_edge(_fresh(arch), arch.to_inputs(task[0]))
        lr = SMALL_FRACTION * edge
        print(f"\n### {title}\n")
        params = sum(p.numel() for p in _fresh(arch).parameters())
        print(
            f"{params} parameters, β = {BETA}; stability edge n/λ_max(Θ_0 on the training set) = {edge:.3f}; "
            f"small lr = edge/20 = {lr:.4f}, {args.steps} full-batch GD steps."
        )
        run = train(arch, task, lr, args.steps)
        results[title] = (arch, run)
        print()
        print_fit(run, arch, task)
        for message in dict.fromkeys(run.warnings):  # the monitor's own warnings, first sentence each
            print(f"\nmonitor warning: {message.split(': ')[0].split('. ')[0]}.")
        print()
        print_table(run, arch)
        print()
        print(f"({run.seconds:.0f} s) {outcome(run.main)}")
        if run.main.diagnosis is not None:
            print(f"diagnosis: {run.main.diagnosis.title}. {run.main.diagnosis.explanation()}")
        for name, probe in run.probes.items():
            if name != arch.data_kernel:
                print(f"paper's shadow with data_kernel={name!r}: verdict: {probe.verdict.describe()}")
        if arch.name == "mlp":
            with torch.no_grad():  # the network's own initial outputs on train ∪ probe
                f0 = _fresh(arch)(torch.cat([task[0], task[2]]))
            steps = log_steps(args.steps)
            fit, lr_inf, rel = infinite_width_replay(task, 4, f0, steps)
            shown = [s for s in steps if s in (1, 4, 16, 64, 128, 256, 512) or s == args.steps]
            print()
            print(
                f"Infinite-width NTK of this MLP on the probe: a = {fit.a:.4f}, b = {fit.b:.4f}, c = {fit.c:.4f}, "
                f"fit error {fit.rel_error:.4f}, centred fit error {fit.rel_error_centered:.4f}. Kernel GD on the "
                f"training set from the network's f_0 at lr = edge/20 = {lr_inf:.4f}, ‖f_paper − f_∞‖/‖f_∞ − f_0‖ "
                "on the probe:"
            )
            print()
            print("| step | " + " | ".join(str(s) for s in shown) + " |")
            print("|---|" + "---|" * len(shown))
            print("| rel, infinite width | " + " | ".join(f"{rel[s]:.3f}" for s in shown) + " |")
            exit_inf = first_exit(rel)
            print()
            print(
                f"The exit rule on the monitor's check steps: {'no exit' if exit_inf is None else exit_inf}; "
                f"largest distance {max(rel.values()):.3f}."
            )
        print()
        print("Large learning rates (same init, same probe; stopped 3 checks after the verdict):")
        print()
        for factor in LARGE_FACTORS:
            big = train(arch, task, factor * lr, args.large_steps, stop_after=3)
            last = big.rows[-1]
            print(
                f"- lr {factor * lr:.3f} ({factor:g}× small, {factor * SMALL_FRACTION:g}× edge), "
                f"{int(last['step'])} steps: {outcome(big.main)}; probe loss at the last check "
                f"network {fmt(last['loss_network'])} / paper's shadow {fmt(last['loss_linear'])}"
            )
    if not args.fast:
        figure(results, args.figures / "paper_setting.png")
        print(f"\nfigure: {(args.figures / 'paper_setting.png').relative_to(ROOT)}")
    command = " ".join(["python", "reproduce/paper_setting.py", *sys.argv[1:]])
    print(
        f"\ncommand: {command}; wall time {time.perf_counter() - start:.0f} s ({args.threads} torch thread(s))"
    )


if __name__ == "__main__":
    main()
