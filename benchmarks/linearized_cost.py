"""What the linearised-network shadow costs: one training step with and without it.

A step is ``zero_grad``, forward, cross-entropy, backward and SGD (momentum 0.9) on the network;
"with shadow" adds :class:`~lin_probe.shadows.linearized.LinearizedMirror`'s ``accumulate`` (one
``torch.func.jvp`` for ``f_lin``, one ``torch.func.vjp`` for ``J_0ᵀ ∂L/∂f``) and ``step`` on the
same batch. Models (float32, CPU, batch 64, inputs ~ N(0, 1)):

* ``digits_mlp`` the ``DeepMLP`` of ``examples/digits_mlp.py``: 64 inputs, 4 hidden ReLU layers of
  width 512, 10 outputs (NTK parameterisation);
* ``cnn`` Conv(3→16, 3×3, pad 1) → ReLU → Conv(16→32, 3×3, pad 1) → ReLU → global average pool →
  Linear(32→10) on 16×16×3 inputs.

Everything runs in one process with torch's default thread count. After a warm-up (which also pays
torch's one-time forward-AD set-up), blocks of steps without and with the shadow alternate, and each
figure is the best block's time per step over the repeats: the best is the least disturbed by other
load on a shared machine, and alternating exposes both variants to the same drifts.

Run: ``python benchmarks/linearized_cost.py`` (about 20 s, at most ~45 s on a loaded machine;
``--quick``: about 6 s).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits_mlp import DeepMLP

from lin_probe._model_state import frozen_copy
from lin_probe.losses import resolve_loss
from lin_probe.shadows.linearized import LinearizedMirror, LinearizedShadow

BATCH = 64
LR = 0.1


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The network (seeded) and its input shape."""
    torch.manual_seed(0)
    if name == "digits_mlp":
        return DeepMLP(64, 512, 4, 10), (64,)
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    return cnn, (3, 16, 16)


def steppers(name: str) -> tuple[Callable[[Tensor, Tensor], None], Callable[[Tensor, Tensor], None], int]:
    """``(plain step, step with shadow, parameter count)`` of a fresh network."""
    model, _ = build(name)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    shadow = LinearizedShadow.from_model(model, frozen_copy(model), own_initial=True)
    mirror = LinearizedMirror(shadow, optimizer, resolve_loss("cross_entropy"), model=model)

    def plain(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def with_shadow(x: Tensor, y: Tensor) -> None:
        plain(x, y)
        mirror.accumulate(x, y)
        mirror.step(lr=optimizer.param_groups[0]["lr"])

    return plain, with_shadow, sum(p.numel() for p in model.parameters())


def block_time(step: Callable[[Tensor, Tensor], None], batches: list[tuple[Tensor, Tensor]]) -> float:
    """Seconds per step over one pass through ``batches``."""
    start = time.perf_counter()
    for x, y in batches:
        step(x, y)
    return (time.perf_counter() - start) / len(batches)


def measure(name: str, repeats: int, block_seconds: float, budget_seconds: float) -> dict[str, float]:
    """Best-of-``repeats`` time per step without and with the shadow, blocks alternating.

    Stops after 3 repeats once ``budget_seconds`` are spent, so a loaded machine cannot stretch the run.
    """
    started = time.perf_counter()
    plain, with_shadow, params = steppers(name)
    _, shape = build(name)
    gen = torch.Generator().manual_seed(1)
    pool = [
        (torch.randn(BATCH, *shape, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen))
        for _ in range(8)
    ]
    for step in (plain, with_shadow):  # warm-up, including torch's one-time forward-AD set-up
        block_time(step, pool[:2])
    per_step = min(block_time(with_shadow, pool[:2]) for _ in range(2))  # sizes the blocks
    count = max(3, int(block_seconds / per_step))
    batches = [pool[i % len(pool)] for i in range(count)]
    best = {"without": float("inf"), "with": float("inf")}
    done = 0
    while done < repeats and (done < 3 or time.perf_counter() - started < budget_seconds):
        best["without"] = min(best["without"], block_time(plain, batches))
        best["with"] = min(best["with"], block_time(with_shadow, batches))
        done += 1
    return {"params": params, "steps": count, "repeats": done, **best}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 short repeats (about 5 s)")
    args = parser.parse_args()
    repeats, block_seconds, budget = (3, 0.15, 2.0) if args.quick else (9, 0.5, 18.0)
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated")  # torch's forward-AD set-up
    print(
        f"# {datetime.date.today()}  torch {torch.__version__}  {platform.processor() or platform.machine()}  "
        f"threads={torch.get_num_threads()}  batch={BATCH}{'  (--quick)' if args.quick else ''}"
    )
    print(
        f"| {'model':<10} | {'params':>9} | {'without (ms)':>12} | {'with (ms)':>9} | {'ratio':>5} "
        f"| {'best of':>7} |"
    )
    print(f"|{'-' * 12}|{'-' * 10}:|{'-' * 13}:|{'-' * 10}:|{'-' * 6}:|{'-' * 8}:|")
    for name in ("digits_mlp", "cnn"):
        r = measure(name, repeats, block_seconds, budget)
        print(
            f"| {name:<10} | {r['params']:>9,} | {1e3 * r['without']:>12.2f} | {1e3 * r['with']:>9.2f} "
            f"| {r['with'] / r['without']:>5.2f} | {r['repeats']:>7} |"
        )


if __name__ == "__main__":
    main()
