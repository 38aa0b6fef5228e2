"""The user's run is untouched: parameters and buffers bit for bit the same with and without the monitor.

Each case trains twice from the same seed, once with ``LinearRegimeMonitor`` and once without, and
compares every parameter and buffer of the user's module by bit pattern (so NaN, in the diverging
case, compares equal to the same NaN and ``-0.0`` differs from ``0.0``). The cases cover what could
leak from the monitor into training: global RNG draws (shuffling samplers, dropout), train/eval
flags and BatchNorm statistics, optimizer state (momentum, Adam moments, parameter groups),
schedulers, accumulation and clipping, validation loops, precisions, odd outputs and inputs,
compiled modules and a diverging network. The DDP version (two processes) is
``test_robustness_ddp.py::test_ddp_user_parameters_identical_with_and_without_monitor``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from _lightning_setups import Regressor, TwoLayerNet, sphere_data
from _robustness_helpers import (
    LENGTH,
    VOCAB,
    BatchNormDropoutNet,
    DictOutputNet,
    OptRegressor,
    OutputKeyRegressor,
    TokenNet,
    fit,
    one_hot_bag,
    params_and_buffers,
    token_data,
)
from torch import Tensor

from lin_probe import LinearRegimeMonitor

D, N_TRAIN, N_VAL, BATCH, LR = 16, 64, 32, 16, 0.5
X, Y = sphere_data(N_TRAIN + N_VAL, D)


@dataclass(frozen=True)
class Case:
    """One user setup: the module, its data, Trainer and monitor arguments, and the checks expected."""

    module: Callable[[], pl.LightningModule]
    data: Callable[[], tuple[Tensor, Tensor]] = lambda: (X, Y)
    trainer: dict[str, Any] = field(default_factory=dict)
    monitor: dict[str, Any] = field(default_factory=dict)
    seed: int = 11
    shuffle: bool = False
    max_steps: int = 8
    every_n_steps: int = 2
    checks: tuple[int, ...] = (0, 1, 2, 4, 6, 8)  # step 0, multiples of every_n_steps, powers of two


def _adam_param_groups() -> pl.LightningModule:
    net = TwoLayerNet(D, 16)
    return OptRegressor(
        net, lambda p: torch.optim.Adam([{"params": [net.w], "lr": 0.02}, {"params": [net.v]}], lr=0.01)
    )


CASES: dict[str, Case] = {
    # shuffled loader (global RNG) + dropout (global RNG) + SGD momentum
    "shuffle-dropout-momentum": Case(
        lambda: Regressor(TwoLayerNet(D, 32, dropout=0.2), 0.3, momentum=0.9),
        seed=7,
        shuffle=True,
        max_steps=12,
        every_n_steps=3,
        checks=(0, 1, 2, 3, 4, 6, 8, 9, 12),
    ),
    # optimizers, schedulers and loops
    "adam-param-groups": Case(_adam_param_groups, seed=3),
    "accumulate-clip-step-scheduler": Case(
        lambda: Regressor(
            TwoLayerNet(D, 16),
            LR,
            momentum=0.9,
            scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7),
        ),
        trainer={"accumulate_grad_batches": 2, "gradient_clip_val": 0.5},
        seed=3,
    ),
    "epoch-scheduler-val-every-step": Case(
        lambda: OptRegressor(
            TwoLayerNet(D, 16, dropout=0.3),
            lambda p: torch.optim.SGD(p, lr=0.3, nesterov=True, momentum=0.5),
            {"scheduler": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9), "interval": "epoch"},
        ),
        trainer={"val_check_interval": 1},
        seed=3,
    ),
    # models, precisions, inputs and outputs
    "batchnorm-dropout": Case(lambda: Regressor(BatchNormDropoutNet(D, 16), LR, momentum=0.9)),
    "bf16-mixed": Case(lambda: Regressor(TwoLayerNet(D, 16), LR), trainer={"precision": "bf16-mixed"}),
    "float64": Case(
        lambda: Regressor(TwoLayerNet(D, 16).double(), LR), data=lambda: (X.double(), Y.double())
    ),
    "dict-output": Case(
        lambda: OutputKeyRegressor(DictOutputNet(TwoLayerNet(D, 16)), LR),
        monitor={"output_fn": lambda out: out["pred"]},
    ),
    "tokens": Case(
        lambda: Regressor(TokenNet(VOCAB, LENGTH, 16), LR),
        data=lambda: token_data(N_TRAIN + N_VAL),
        monitor={"features_fn": one_hot_bag},
    ),
    "compiled": Case(lambda: torch.compile(Regressor(TwoLayerNet(D, 16), LR), backend="eager")),
    "nonfinite-network": Case(lambda: Regressor(TwoLayerNet(D, 8), 500.0)),
}


def _bits(tensor: Tensor) -> Tensor:
    """The tensor's bit pattern as integers (floating dtypes reinterpreted, others as they are)."""
    if not tensor.is_floating_point():
        return tensor
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


@pytest.mark.parametrize("name", list(CASES))
def test_user_parameters_bit_identical_with_and_without_monitor(tmp_path: Path, name: str) -> None:
    case = CASES[name]

    def run(with_monitor: bool) -> list[Tensor]:
        pl.seed_everything(case.seed, verbose=False)
        module = case.module()
        x, y = case.data()
        monitor = (
            LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=case.every_n_steps, **case.monitor)
            if with_monitor
            else None
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit(
                tmp_path,
                module,
                monitor,
                x=x,
                y=y,
                n_train=N_TRAIN,
                batch_size=BATCH,
                name=f"{name}-{with_monitor}",
                shuffle=case.shuffle,
                max_steps=case.max_steps,
                **case.trainer,
            )
        if monitor is not None:
            assert [int(r["step"]) for r in monitor.history] == list(case.checks), (
                "the monitor must have measured"
            )
        return params_and_buffers(getattr(module, "_orig_mod", module))

    without, with_monitor = run(False), run(True)
    assert len(without) == len(with_monitor) > 0
    for i, (p, q) in enumerate(zip(without, with_monitor, strict=True)):
        assert (p.dtype, p.shape) == (q.dtype, q.shape), i
        assert torch.equal(_bits(p), _bits(q)), f"tensor {i} differs"
