"""Tiny Lightning setups shared by the callback tests, and readers for what they log."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

#: The scalars a run logs under ``lin_probe/`` (``exit_step`` once the exit is found).
SCALAR_TAGS = (
    "functional_distance",
    "functional_distance_rel",
    "ntk_gap",
    "ntk_drift",
    "loss_network",
    "loss_linear",
    "in_linear_regime",
    "exit_step",
    "fit_a",
    "fit_b",
    "fit_c",
    "fit_rel_error",
    "fit_rel_error_centered",
    "kernel_distance",
    "kernel_velocity",
    "kernel_alignment",
    "ntk_scale",
)
#: Logged too when the loss is a classification loss.
CLASSIFICATION_TAGS = ("agreement", "accuracy_network", "accuracy_linear")
#: Logged too with ``memorization=True`` (the memorizing shadow).
MEMO_TAGS = (
    "memo/functional_distance",
    "memo/functional_distance_rel",
    "memo/loss_linear",
    "memo/exit_step",
)


class TwoLayerNet(nn.Module):
    """The paper's net ``f(x) = m^{-1/2} Σ_r v_r φ(w_rᵀx/√d)`` (NTK parameterisation)."""

    def __init__(self, d: int, width: int, outputs: int = 1, *, seed: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(width, d, generator=gen))
        self.v = nn.Parameter(torch.randn(outputs, width, generator=gen))
        self.dropout = nn.Dropout(dropout)
        self.d, self.width = d, width

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.relu(x @ self.w.T / math.sqrt(self.d))
        return self.dropout(hidden) @ self.v.T / math.sqrt(self.width)


class Regressor(pl.LightningModule):
    """An ordinary LightningModule: MSE, SGD, an optional scheduler."""

    def __init__(
        self,
        net: nn.Module,
        lr: float,
        *,
        momentum: float = 0.0,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        loss: str = "mse",
    ) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.momentum = momentum
        self.scheduler = scheduler
        self.loss_name = loss

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _loss(self, pred: Tensor, y: Tensor) -> Tensor:
        if self.loss_name == "cross_entropy":
            return F.cross_entropy(pred, y)
        return F.mse_loss(pred, y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        return self._loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        self.log("val_loss", self._loss(self(x), y))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if self.scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": "step"},
        }


def sphere_data(n: int, d: int, outputs: int = 1, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Inputs on the sphere of radius √d and a smooth nonlinear target (so training moves)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(d)
    teacher = torch.randn(d, outputs, generator=gen) / math.sqrt(d)
    y = torch.tanh(2 * x @ teacher) + 0.5 * (x[:, :outputs] ** 2 - 1)
    return x, y


def loaders(
    x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor, batch_size: int, *, shuffle: bool = False
) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(123)
    train = DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen if shuffle else None
    )
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=len(x_val))
    return train, val


def make_trainer(
    tmp_path: Path, callbacks: list[pl.Callback], *, name: str = "run", **kwargs: Any
) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": TensorBoardLogger(str(tmp_path), name=name, version=0),
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 1.0,
        "deterministic": True,
    }
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def read_events(log_dir: str | Path) -> EventAccumulator:
    acc = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0, "images": 0}
    )
    acc.Reload()
    return acc


def scalar_series(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in acc.Scalars(tag)}


#: Where a TensorBoardLogger run holds each flat record key: (series run under ``lin_probe/``, chart
#: tag), ``""`` being the main run. Written out here, not imported, so the tests also pin the layout.
DASHBOARD = {
    "loss_network": ("network", "lin_probe/loss"),
    "loss_linear": ("linear", "lin_probe/loss"),
    "memo/loss_linear": ("memorizing", "lin_probe/loss"),
    "accuracy_network": ("network", "lin_probe/accuracy"),
    "accuracy_linear": ("linear", "lin_probe/accuracy"),
    "agreement": ("linear", "lin_probe/agreement"),
    "functional_distance": ("linear", "lin_probe/functional_distance"),
    "memo/functional_distance": ("memorizing", "lin_probe/functional_distance"),
    "functional_distance_rel": ("linear", "lin_probe/functional_distance_rel"),
    "memo/functional_distance_rel": ("memorizing", "lin_probe/functional_distance_rel"),
    "ntk_gap": ("ntk_gap", "lin_probe/ntk"),
    "ntk_drift": ("ntk_drift", "lin_probe/ntk"),
    "fit_a": ("", "lin_probe_summary/fit_a"),
    "fit_b": ("", "lin_probe_summary/fit_b"),
    "fit_c": ("", "lin_probe_summary/fit_c"),
    "fit_rel_error": ("", "lin_probe_summary/fit_rel_error"),
    "fit_rel_error_centered": ("", "lin_probe_summary/fit_rel_error_centered"),
    "exit_step": ("", "lin_probe_summary/exit_step"),
    "outside_from_start": ("", "lin_probe_summary/outside_from_start"),
    "linearized/exit_step": ("", "lin_probe_summary/linearized_exit_step"),
    "linearized/loss_linear": ("linearized", "lin_probe/loss"),
    "linearized/functional_distance": ("linearized", "lin_probe/functional_distance"),
    "linearized/functional_distance_rel": ("linearized", "lin_probe/functional_distance_rel"),
    "kernel_distance": ("network", "lin_probe/kernel_distance"),
    "kernel_velocity": ("network", "lin_probe/kernel_velocity"),
    "kernel_alignment": ("network", "lin_probe/kernel_alignment"),
    "ntk_scale": ("network", "lin_probe/ntk_scale"),
    "memo/exit_step": ("", "lin_probe_summary/memo_exit_step"),
}


class Dashboard:
    """A TensorBoardLogger run's lin_probe values read back from its event files, by flat record key.

    ``in_linear_regime`` is the union of the ``linear`` run's 1s (inside) and the ``since_exit`` run's 0s.
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.main = read_events(self.log_dir)
        self._runs: dict[str, EventAccumulator | None] = {}

    def run(self, name: str) -> EventAccumulator | None:
        if name == "":
            return self.main
        if name not in self._runs:
            path = self.log_dir / "lin_probe" / name
            self._runs[name] = read_events(path) if path.is_dir() else None
        return self._runs[name]

    def has(self, key: str) -> bool:
        if key == "in_linear_regime":
            return self.has_in("linear", "lin_probe/in_linear_regime") or self.has_in(
                "since_exit", "lin_probe/in_linear_regime"
            )
        run, tag = DASHBOARD[key]
        return self.has_in(run, tag)

    def has_in(self, run: str, tag: str) -> bool:
        acc = self.run(run)
        return acc is not None and tag in acc.Tags()["scalars"]

    def series(self, key: str) -> dict[int, float]:
        """``{step: value}``; empty when never written."""
        if key == "in_linear_regime":
            pairs = [("linear", "lin_probe/in_linear_regime"), ("since_exit", "lin_probe/in_linear_regime")]
        else:
            pairs = [DASHBOARD[key]]
        values: dict[int, float] = {}
        for run, tag in pairs:
            if self.has_in(run, tag):
                values.update(scalar_series(self.run(run), tag))  # type: ignore[arg-type]
        return dict(sorted(values.items()))
