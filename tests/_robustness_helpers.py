"""Shared pieces of the Lightning tests: the one plain-PyTorch replay, a fit helper and small odd models.

The replay trains a copy of the network with a *torch* optimizer and the linear model
``f_0 + ψB`` (``ψ = [√a·x/√d ; √b]`` from the logged ``a, b``) with the same optimizer class and
hyperparameters, on the same micro-batches: no lin_probe code, so it is an independent reference
for what the callback logs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _lightning_setups import Dashboard, Regressor, loaders, make_trainer
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]


@dataclass
class Replayed:
    """Network and linear-model outputs on the probe after each step (index 0 = init)."""

    network: list[Tensor]
    linear: list[Tensor]

    def distance(self, step: int) -> float:
        """RMS of ``f_t − f_lin,t`` over probe points and outputs (the callback's ``functional_distance``)."""
        return float((self.network[step] - self.linear[step]).pow(2).mean().sqrt())

    def distance_rel(self, step: int) -> float:
        """``‖f_t − f_lin,t‖_F / ‖f_t − f_0‖_F``."""
        moved = float((self.network[step] - self.network[0]).norm())
        return float((self.network[step] - self.linear[step]).norm()) / moved if moved else 0.0


def replay(
    initial: nn.Module,
    a: float,
    b: float,
    steps: Sequence[Sequence[Batch]],
    probe: Tensor,
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    *,
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    scheduler_every: int = 1,
    loss: Callable[[Tensor, Tensor], Tensor] = F.mse_loss,
    features: Callable[[Tensor], Tensor] = lambda x: x.reshape(x.shape[0], -1).float(),
    output: Callable[[Any], Tensor] = lambda out: out,
) -> Replayed:
    """Train a copy of ``initial`` and ``f_0 + ψB`` in lock-step; ``steps[t]`` are step t+1's micro-batches."""
    net = copy.deepcopy(initial).train()
    f0 = copy.deepcopy(initial).eval()
    d = features(probe).shape[1]

    def psi(x: Tensor) -> Tensor:
        rows = features(x).to(torch.float64)
        return torch.cat([rows * math.sqrt(a / d), torch.full((len(rows), 1), math.sqrt(b))], dim=1)

    def lin(x: Tensor, B: Tensor) -> Tensor:
        with torch.no_grad():
            base = output(f0(x)).to(torch.float64)
        return base + psi(x) @ B

    def eval_net() -> Tensor:
        net.eval()
        with torch.no_grad():
            out = output(net(probe)).to(torch.float64)
        net.train()
        return out

    out0 = eval_net()
    B = torch.zeros(d + 1, out0.shape[1], dtype=torch.float64, requires_grad=True)
    opt_net, opt_lin = make_optimizer(list(net.parameters())), make_optimizer([B])
    scheduler = None if make_scheduler is None else make_scheduler(opt_net)
    result = Replayed([out0], [lin(probe, B).detach()])
    for t, micro in enumerate(steps):
        opt_net.zero_grad()
        opt_lin.zero_grad()
        for x, y in micro:
            (loss(output(net(x)), y) / len(micro)).backward()
            (loss(lin(x, B), y.to(torch.float64)) / len(micro)).backward()
        for group in opt_lin.param_groups:
            group["lr"] = opt_net.param_groups[0]["lr"]
        opt_net.step()
        opt_lin.step()
        if scheduler is not None and (t + 1) % scheduler_every == 0:
            scheduler.step()
        result.network.append(eval_net())
        result.linear.append(lin(probe, B).detach())
    return result


def cycle_batches(
    x: Tensor, y: Tensor, batch_size: int, n_steps: int, accumulate: int = 1
) -> list[list[Batch]]:
    """Sequential (unshuffled) micro-batches, epoch after epoch, grouped per optimizer step."""
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    flat = [batches[i % len(batches)] for i in range(n_steps * accumulate)]
    return [flat[i * accumulate : (i + 1) * accumulate] for i in range(n_steps)]


def assert_matches_replay(
    trainer: pl.Trainer,
    initial: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    probe: Tensor,
    batch_size: int,
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    *,
    accumulate: int = 1,
    **replay_kwargs: Any,
) -> dict[int, float]:
    """Every logged ``functional_distance`` equals the replay's on unshuffled batches; returns the logged ones.

    Tolerance: float32 network and shadow in the callback vs a float64 replay shadow, ≤ 25 steps, agree
    to ~1e-6 relative; ``rel=2e-4`` (+1e-6 absolute) leaves room for that accumulated round-off and is
    far below what a wrong hyperparameter, f_0, feature map, output or a missed scheduler step changes
    (≥ 1 %), and below the distances themselves (> 1e-3, asserted).
    """
    dashboard = Dashboard(trainer.logger.log_dir)
    a, b = dashboard.series("fit_a")[0], dashboard.series("fit_b")[0]
    logged = dashboard.series("functional_distance")
    steps = cycle_batches(x_train, y_train, batch_size, max(logged), accumulate)
    ref = replay(initial, a, b, steps, probe, make_optimizer, **replay_kwargs)
    assert max(logged.values()) > 1e-3, "training must move the network away from the shadow"
    for step, value in logged.items():
        assert value == pytest.approx(ref.distance(step), rel=2e-4, abs=1e-6), f"step {step}"
    return logged


def fit(
    tmp_path: Path,
    module: pl.LightningModule,
    monitor: pl.Callback | None,
    *,
    x: Tensor,
    y: Tensor,
    n_train: int,
    batch_size: int,
    name: str = "run",
    shuffle: bool = False,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """Fit ``module`` on ``x[:n_train]`` (validation: the rest) with ``monitor`` as the only callback."""
    train, val = loaders(x[:n_train], y[:n_train], x[n_train:], y[n_train:], batch_size, shuffle=shuffle)
    trainer = make_trainer(tmp_path, [] if monitor is None else [monitor], name=name, **trainer_kwargs)
    trainer.fit(module, train, val)
    return trainer


def saved(state: Any, key: str) -> Any:
    """The one value stored under ``key`` anywhere in a (nested) monitor ``state_dict``.

    Reads e.g. Θ_0 (``"ntk0"``) or the shadow's ``"B"`` without depending on how the state nests
    its parts; more than one match is an error, so the value read is never ambiguous.
    """
    found: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == key:
                    found.append(v)
                else:
                    walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(state)
    assert len(found) == 1, f"{len(found)} entries named {key!r} in the monitor's state"
    return found[0]


def params_and_buffers(module: nn.Module) -> list[Tensor]:
    """Every parameter and buffer, detached copies: what "the user's run" leaves behind."""
    return [t.detach().clone() for t in [*module.parameters(), *module.buffers()]]


class BatchNormDropoutNet(nn.Module):
    """Linear → BatchNorm → ReLU → Dropout → Linear: train and eval modes give different functions."""

    def __init__(self, d: int, width: int, *, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.3), nn.Linear(width, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class DictOutputNet(nn.Module):
    """Returns ``{"pred": ..., "aux": ...}``: the prediction must be selected with ``output_fn``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        pred = self.net(x)
        return {"pred": pred, "aux": pred.detach().abs()}


class TokenNet(nn.Module):
    """Integer token ids ``(n, L)`` → embedding → mean over positions → linear head."""

    def __init__(self, vocab: int, length: int, width: int, *, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, 1)
        self.length = length

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(tokens).mean(dim=1)))


class OutputKeyRegressor(pl.LightningModule):
    """A regressor whose network returns a dict; the loss is on ``out["pred"]``."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: Tensor) -> Any:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x)["pred"], y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x)["pred"], y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class OptRegressor(Regressor):
    """A Regressor whose optimizer (and optional scheduler config) come from factories."""

    def __init__(
        self,
        net: nn.Module,
        make_opt: Callable[[Any], torch.optim.Optimizer],
        scheduler: dict | None = None,
    ) -> None:
        super().__init__(net, lr=0.0)
        self.make_opt = make_opt
        self.scheduler_config = scheduler

    def configure_optimizers(self) -> Any:
        optimizer = self.make_opt(self.parameters())
        if self.scheduler_config is None:
            return optimizer
        config = dict(self.scheduler_config)
        config["scheduler"] = config["scheduler"](optimizer)
        return {"optimizer": optimizer, "lr_scheduler": config}


VOCAB, LENGTH = 12, 6


def token_data(n: int) -> tuple[Tensor, Tensor]:
    """``n`` rows of ``LENGTH`` token ids below ``VOCAB`` and a smooth target of them."""
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=gen)
    return tokens, torch.sin(tokens.float().mean(dim=1, keepdim=True))


def one_hot_bag(tokens: Tensor) -> Tensor:
    """Token ids → bag-of-words frequencies, the vectors the data kernel sees (a ``features_fn``)."""
    return F.one_hot(tokens, VOCAB).float().mean(dim=1)
