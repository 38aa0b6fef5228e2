"""lin_probe without Lightning: the same monitor, driven from a plain PyTorch training loop.

``RegimeProbe`` is the Lightning-free core that ``LinearRegimeMonitor`` drives. A loop calls it in
three places: ``accumulate(x, y)`` with each batch and ``step(lr)`` with the learning rate the
optimizer is about to use (the linear shadow takes the same step), then ``check(model, step)``
whenever it wants a measurement. Here: the paper's two-layer ReLU net on inputs on the sphere (the
net and data of ``paper_two_layer.py``; nothing in this loop uses Lightning), full-batch gradient
descent on MSE, checks on a log-spaced schedule, and the exit step.

Run: ``python examples/plain_pytorch_loop.py`` (``--fast`` for a few-second run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from paper_two_layer import TwoLayerNet, sphere_task
from torch.utils.tensorboard import SummaryWriter

from lin_probe import RegimeProbe
from lin_probe.monitor.core import MonitorConfig
from lin_probe.monitor.schedule import CheckSchedule


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--log-dir", type=Path, default=Path("runs"), help="TensorBoard log directory")
    parser.add_argument("--fast", action="store_true", help="tiny settings (used by the tests)")
    args = parser.parse_args()
    width, steps = (1024, 64) if args.fast else (args.width, args.steps)

    torch.manual_seed(0)
    d = 32
    x, y = sphere_task(128 + 64, d, seed=0)  # the paper's net and data, as in paper_two_layer.py
    x_train, y_train, x_val, y_val = x[:128], y[:128], x[128:], y[128:]
    model = TwoLayerNet(d, width)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    probe = RegimeProbe.start(model, (x_val, y_val), optimizer, MonitorConfig(loss="mse"))
    print(f"fit at init: a={probe.kernel.a:.4f} b={probe.kernel.b:.4f} c={probe.kernel.c:.4f}")
    schedule = CheckSchedule(every_n_steps=25)
    writer = SummaryWriter(str(args.log_dir / "plain_pytorch_loop"))

    def publish(record: dict[str, float]) -> None:
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(f"lin_probe/{key}", value, global_step=int(record["step"]))

    def show(record: dict[str, float]) -> None:
        publish(record)
        print(
            f"{int(record['step']):>6}  {record['functional_distance_rel']:>12.4f}  {record['loss_network']:>9.4f}  "
            f"{record['loss_linear']:>9.4f}  {record.get('ntk_drift', float('nan')):>9.4f}"
        )

    print(f"{'step':>6}  {'rel distance':>12}  {'loss net':>9}  {'loss lin':>9}  {'ntk drift':>9}")
    show(probe.check(model, step=0))
    for step in range(1, steps + 1):
        loss = F.mse_loss(model(x_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        probe.accumulate(x_train, y_train)  # the shadow's gradient on the same batch
        probe.step(lr=optimizer.param_groups[0]["lr"])  # ... and the same step
        optimizer.step()
        if schedule.functional(step):
            show(probe.check(model, step, ntk=schedule.ntk(step)))
    writer.close()
    exit_step = probe.exit_step()
    print(f"exit step: {'none' if exit_step is None else exit_step}")
    print(f"verdict: {probe.verdict.describe()}")
    if probe.diagnosis is not None:
        print(f"diagnosis: {probe.diagnosis.title}. {probe.diagnosis.explanation()}")
    print(f"TensorBoard logs: {args.log_dir / 'plain_pytorch_loop'}")


if __name__ == "__main__":
    main()
