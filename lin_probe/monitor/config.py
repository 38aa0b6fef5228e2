"""What a monitor measures and how it judges it (``MonitorConfig``), and what its owner provides (``Host``)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor, nn

from lin_probe._model_state import frozen_copy
from lin_probe._validation import check_callable
from lin_probe.kernel.data_kernels import check_data_kernel
from lin_probe.losses import AUTO, LossFn, infer_loss, is_classification, resolve_loss
from lin_probe.monitor.outputs import check_outputs
from lin_probe.monitor.regime import validate_patience, validate_tolerance
from lin_probe.plan import ComputePlan

Warn = Callable[[str], None]
ProgressFn = Callable[[int, int], None]


def _python_warning(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def _log_info(message: str) -> None:
    logging.getLogger("lin_probe").info(message)


@dataclass(frozen=True)
class MonitorConfig:
    """What to measure and how to judge it; validated here so every entry point gets the same errors.

    ``loss`` is the user's training loss (a name or a callable ``(pred, target) -> scalar``;
    ``"auto"`` until :meth:`with_inferred_loss` resolves it from the probe);
    ``tolerance``/``patience`` define the exit; ``center`` keeps ``f_0`` in the shadow;
    ``output_fn`` picks the prediction tensor from the model's output; ``features_fn`` maps inputs to
    the vectors the data kernel is built from (the same as ``data_kernel=features_fn``);
    ``memorization`` adds the shadow with the ``c·I`` term; ``plan`` bounds the cost;
    ``data_kernel`` chooses the data kernel (:mod:`lin_probe.kernel.data_kernels`: ``"auto"``,
    ``"flat"``, ``"patch_mean"`` or a callable); ``linearized`` adds the network's own first-order
    Taylor model as a shadow (:mod:`lin_probe.shadows.linearized`); ``outputs`` takes the NTK over
    every output exactly or over an unbiased sketch of them (:mod:`lin_probe.monitor.outputs`).
    """

    loss: str | LossFn = AUTO
    tolerance: float = 0.1
    patience: int = 3
    center: bool = True
    output_fn: Callable[[Any], Tensor] | None = None
    features_fn: Callable[[Tensor], Tensor] | None = None
    memorization: bool = False
    plan: ComputePlan = field(default_factory=ComputePlan)
    data_kernel: str | Callable[[Tensor], Tensor] = "auto"
    linearized: bool = False
    outputs: str = "auto"

    def __post_init__(self) -> None:
        if self.loss != AUTO:
            resolve_loss(self.loss)
        validate_tolerance(self.tolerance)
        validate_patience(self.patience)
        check_callable("output_fn", self.output_fn)
        check_callable("features_fn", self.features_fn)
        if not isinstance(self.plan, ComputePlan):
            raise TypeError(f"`plan` must be a lin_probe.plan.ComputePlan, got {type(self.plan).__name__}.")
        check_data_kernel(self.data_kernel)
        if self.features_fn is not None and self.data_kernel != "auto":
            raise ValueError(
                "Pass `features_fn` or `data_kernel`, not both: `features_fn=f` is `data_kernel=f`."
            )
        check_outputs(self.outputs)
        if not isinstance(self.linearized, bool):
            raise TypeError(f"`linearized` must be True or False, got {self.linearized!r}.")

    @property
    def data_kernel_spec(self) -> str | Callable[[Tensor], Tensor]:
        """What the data kernel is built from: ``features_fn`` when given, else ``data_kernel``."""
        return self.features_fn if self.features_fn is not None else self.data_kernel

    def with_inferred_loss(
        self, targets: Tensor | None, outputs_per_example: int
    ) -> tuple[MonitorConfig, str | None]:
        """This config with ``loss="auto"`` resolved (:func:`lin_probe.losses.infer_loss`), and the one
        line that announces the choice (``None`` when the loss was given)."""
        if self.loss != AUTO:
            return self, None
        name, why = infer_loss(targets, outputs_per_example)
        line = f'lin_probe: loss="auto" chose "{name}" ({why}); pass `loss=` to override.'
        return replace(self, loss=name), line

    @property
    def loss_fn(self) -> LossFn:
        return resolve_loss(self.loss)

    @property
    def classification(self) -> bool:
        return is_classification(self.loss)


def _no_progress(what: str) -> ProgressFn | None:
    return None


@dataclass(frozen=True)
class Host:
    """What the owner of a :class:`RegimeProbe` provides: how to copy the model into ``f_0``, where
    warnings and one-line announcements go (rank zero only, in Lightning), whether batches must
    carry example indices (under data parallelism hashed ids would differ between processes), and
    ``progress(what)``: a ``progress(done, total)`` hook for the long start-up work ``what`` (or
    ``None``), which may raise to abort it (:mod:`lin_probe.monitor.progress`)."""

    copy_model: Callable[[nn.Module], nn.Module] = frozen_copy
    warn: Warn = _python_warning
    info: Callable[[str], None] = _log_info
    require_indices: bool = False
    progress: Callable[[str], ProgressFn | None] = _no_progress


__all__ = ["Host", "MonitorConfig", "Warn"]
