"""Everything that knows Lightning's internals, in one place, so the core never has to.

A Trainer hands the callback wrapped optimizers, modules that point back at it, compiled forwards
and a strategy for collectives; these helpers turn them into the plain PyTorch objects the
Lightning-free core takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.logger import _convert_params, _flatten_dict
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lin_probe._model_state import frozen_copy
from lin_probe.monitor.probe import BatchToXY, ProbeSet, probe_from_argument, probe_from_dataloaders

_OWNER_ATTRIBUTES = ("_trainer", "_fabric")
"""Attributes through which a LightningModule reaches its trainer; never copied into ``f_0``."""


def single_optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer:
    """The run's one torch optimizer (a ``LightningOptimizer`` is unwrapped); several are refused."""
    if len(trainer.optimizers) != 1:
        raise ValueError(
            f"LinearRegimeMonitor mirrors exactly one optimizer; this run has {len(trainer.optimizers)}. "
            "Use a single optimizer (parameter groups are fine)."
        )
    return unwrap_optimizer(trainer.optimizers[0])


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimizer behind Lightning's ``LightningOptimizer`` wrapper (or the optimizer itself).

    The wrapper passes ``isinstance(wrapper, torch.optim.SGD)`` (it rebinds its own class to a
    subclass of the wrapped one), so the wrapped optimizer is read from ``.optimizer`` first.
    """
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"Expected a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    return optimizer


def initial_copy(pl_module: nn.Module) -> nn.Module:
    """A frozen copy of the module at init (``f_0``) with no trainer inside and no compiled forward.

    Compiling a LightningModule (``torch.compile(module)`` handed to a Trainer) makes Lightning set
    ``module.forward = dynamo_ctx(module.forward)`` on the instance and mark it with
    ``_compiler_ctx``; ``deepcopy`` keeps that bound function, so the copy's forward would silently
    run the live, training network. Dropping the instance override leaves the class's ``forward``,
    the same function (uncompiled) on the copy's parameters. A compiled submodule
    (``torch.compile(net)``, an ``OptimizedModule``) rebinds itself on copy and needs nothing.
    """
    owners = [
        owner
        for module in pl_module.modules()
        for attr in _OWNER_ATTRIBUTES
        if (owner := vars(module).get(attr)) is not None
    ]
    copied = frozen_copy(pl_module, exclude=owners)
    for module in copied.modules():
        if getattr(module, "_compiler_ctx", None) is not None:
            vars(module).pop("forward", None)
            module._compiler_ctx = None
    return copied


def train_set_length(trainer: pl.Trainer) -> int | None:
    """Length of the training dataset, when the training dataloader exposes a sized one."""
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None  # type: ignore[arg-type]
    except TypeError:  # an IterableDataset without __len__
        return None


def horizon(trainer: pl.Trainer) -> int | None:
    """The run's optimizer steps (``estimated_stepping_batches``), ``None`` when unknown or infinite."""
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # a dataloader Lightning cannot size
        return None
    return int(steps) if isinstance(steps, (int, float)) and math.isfinite(steps) and steps > 0 else None


def steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps per epoch (training batches over accumulation), ``None`` when unknown."""
    batches = trainer.num_training_batches
    if not isinstance(batches, (int, float)) or not math.isfinite(batches) or batches <= 0:
        return None
    return max(1, int(batches) // max(1, trainer.accumulate_grad_batches))


def train_batch_size(trainer: pl.Trainer) -> int | None:
    """The training dataloader's batch size, when it has one (a ``DataLoader`` with ``batch_size``)."""
    size = getattr(trainer.train_dataloader, "batch_size", None)
    return size if isinstance(size, int) and size > 0 else None


def sigterm_check(trainer: pl.Trainer) -> Callable[[], None]:
    """Raises Lightning's ``SIGTERMException`` once its handler has seen SIGTERM, as its loops do between
    batches: long start-up work calls this between units, so a scheduler's signal stops it."""

    def check() -> None:
        if getattr(trainer, "received_sigterm", False):
            raise SIGTERMException

    return check


def mean_over_ranks(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
    """Average a gradient over DDP ranks (as DDP does for the network); ``None`` in a single process."""
    if trainer.world_size <= 1:
        return None
    world_size = trainer.world_size

    def mean(grad: Tensor) -> Tensor:
        # An explicit sum then divide: gloo has no AVG, and every rank gets bit-identical results.
        return trainer.strategy.reduce(grad.clone(), reduce_op="sum") / world_size

    return mean


def require_automatic_optimization(pl_module: pl.LightningModule) -> None:
    """The shadow mirrors Lightning's automatic optimization; manual optimization is refused up front."""
    if not pl_module.automatic_optimization:
        raise ValueError(
            "LinearRegimeMonitor mirrors Lightning's automatic optimization (one optimizer, loss from "
            "training_step). This LightningModule uses manual optimization, where the loss and step "
            "structure are unknown to the callback; remove the callback or switch to automatic optimization."
        )


def agreed_failure(trainer: pl.Trainer, failure: str | None) -> str | None:
    """This rank's failure, or a note that another rank failed, or ``None`` when all ranks succeeded.

    A collective every rank must call: a rank that failed alone must not leave the others waiting
    in the next gradient reduction.
    """
    if trainer.world_size <= 1:
        return failure
    if trainer.strategy.reduce_boolean_decision(failure is not None, all=False):
        return failure or "another rank failed to accumulate the shadow's gradient"
    return None


def from_rank_zero(trainer: pl.Trainer, obj: object) -> object:
    """Rank zero's ``obj`` on every rank, so all ranks make the same decisions from it."""
    return trainer.strategy.broadcast(obj, src=0) if trainer.world_size > 1 else obj


_NO_VALIDATION_PROBE = (
    "lin_probe: no validation dataloader was loaded before training, so the probe is the {source}. The "
    "linear shadow lacks the network's c·I kernel term, which acts on training points: held-out points "
    "(a validation loader, or `probe=`) judge the regime better."
)


def gather_probe(
    trainer: pl.Trainer, probe: Tensor | tuple[Tensor, Tensor] | None, n_probe: int, batch_to_xy: BatchToXY
) -> ProbeSet:
    """The probe set, identical on every rank: the ``probe`` argument, else the first ``n_probe``
    examples of the validation (else training) dataloader. Under DDP each rank's dataloader yields a
    different shard (DistributedSampler), so rank zero's probe is broadcast to all."""
    if probe is not None:
        return probe_from_argument(probe, n_probe)
    gathered = probe_from_dataloaders(trainer.val_dataloaders, trainer.train_dataloader, n_probe, batch_to_xy)
    if trainer.val_dataloaders is None:
        rank_zero_info(_NO_VALIDATION_PROBE.format(source=gathered.source))
    return from_rank_zero(trainer, gathered)  # type: ignore[return-value]


def tensorboard_logger(trainer: pl.Trainer) -> TensorBoardLogger | None:
    """The run's first ``TensorBoardLogger``, if any."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def writes_default_hparams(logger: TensorBoardLogger) -> bool:
    """Whether Lightning itself will write this run's HParams session (``default_hp_metric=True``)."""
    return bool(getattr(logger, "_default_hp_metric", False))


def logged_hparams(
    trainer: pl.Trainer, pl_module: pl.LightningModule, logger: TensorBoardLogger
) -> dict[str, Any]:
    """The hyperparameters Lightning logs at train start (module's and datamodule's), flattened and
    sanitised the way ``TensorBoardLogger.log_hyperparams`` does, so a session written before
    Lightning's holds the same values."""
    params: dict[str, Any] = {}
    if getattr(pl_module, "_log_hyperparams", True):
        params.update(pl_module.hparams_initial)
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and getattr(datamodule, "_log_hyperparams", False):
        params.update(datamodule.hparams_initial)
    params.pop("_class_path", None)  # LightningCLI's own key, which Lightning does not log either
    return logger._sanitize_params(_flatten_dict(_convert_params(params)))
