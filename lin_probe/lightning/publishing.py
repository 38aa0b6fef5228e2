"""Where a check's numbers go in a Lightning run: loggers, ``callback_metrics``, the progress bar, TensorBoard.

Scalars go through every configured logger with ``log_metrics(step=...)`` (so ``log_every_n_steps``
does not thin them) and into ``trainer.callback_metrics`` (so ``EarlyStopping`` and
``ModelCheckpoint`` can monitor them). The extras only a TensorBoard ``SummaryWriter`` can show
(layout, text cards, eigenvalue histogram, figure) are written on rank zero when a
``TensorBoardLogger`` is present.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import WarningCache, rank_zero_info
from torch import Tensor

from lin_probe.lightning.tensorboard import TensorBoardPanels, exit_card, fit_card, tag
from lin_probe.monitor.core import MEMO, PAPER, MonitorConfig, RegimeProbe

PROGRESS_BAR_KEY = tag("functional_distance_rel")


class Publisher:
    """Publishes one monitor's records to a trainer's loggers; warnings once per fit."""

    def __init__(self, config: MonitorConfig, *, progress_bar: bool, verbose: bool) -> None:
        self.classification = config.classification
        self.memorization = config.memorization
        self.progress_bar = progress_bar
        self.verbose = verbose
        self.warnings = WarningCache()
        self._layout_registered = False

    def record(self, trainer: pl.Trainer, record: Mapping[str, float], eigenvalues: Tensor | None) -> None:
        """One check: every value but the step, under ``lin_probe/``, at the record's step."""
        metrics = {tag(k): float(v) for k, v in record.items() if k != "step"}
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if self.progress_bar and PROGRESS_BAR_KEY in metrics:
            trainer.progress_bar_metrics[PROGRESS_BAR_KEY] = metrics[PROGRESS_BAR_KEY]
        step = int(record["step"])
        self.scalars(trainer, metrics, step)
        panels = self.panels(trainer)
        if panels is not None and eigenvalues is not None:
            panels.eigenvalue_histogram(eigenvalues, step)

    def fit(self, trainer: pl.Trainer, probe: RegimeProbe, n_parameters: int) -> None:
        """The fit at init: ``fit_*`` scalars at step 0 and the fit card."""
        kernel = probe.kernel
        fit = {"fit_a": kernel.a, "fit_b": kernel.b, "fit_c": kernel.c}
        fit["fit_rel_error"] = math.nan if kernel.rel_error is None else kernel.rel_error
        self.scalars(trainer, {tag(k): float(v) for k, v in fit.items()}, 0)
        panels = self.panels(trainer)
        if panels is not None:
            card = fit_card(
                kernel,
                n_probe=len(probe.probe),
                probe_source=probe.probe.source,
                n_parameters=n_parameters,
                center=probe.config.center,
            )
            panels.text("fit", card, 0)
            panels.flush()

    def exits(
        self, trainer: pl.Trainer, exited: list[str], record: Mapping[str, float], probe: RegimeProbe
    ) -> None:
        """Announce the exits this check confirmed: a line on rank zero and, for the paper's shadow, the card."""
        config = probe.config
        if MEMO in exited and self.verbose:
            rank_zero_info(
                f"lin_probe: the memorizing shadow (kernel aK + b11ᵀ + cI) left the linear regime at step "
                f"{int(record['memo/exit_step'])}."
            )
        if PAPER not in exited:
            return
        exit_step = int(record["exit_step"])
        if self.verbose:
            rank_zero_info(
                f"lin_probe: the network left the linear regime at step {exit_step} "
                f"(functional_distance_rel > {config.tolerance} for {config.patience} consecutive checks; "
                f"now {record['functional_distance_rel']:.3g} at step {int(record['step'])})."
            )
        panels = self.panels(trainer)
        if panels is not None:
            card = exit_card(exit_step, record, tolerance=config.tolerance, patience=config.patience)
            panels.text("exit", card, int(record["step"]))
            panels.flush()

    def figure(self, trainer: pl.Trainer, probe: RegimeProbe) -> None:
        """The run's summary figure (never fatal: a drawing failure is one warning)."""
        panels = self.panels(trainer)
        if panels is None or not probe.history:
            return
        try:
            panels.figure(
                probe.history,
                exit_step=probe.paper.regime.exit_step,
                tolerance=probe.config.tolerance,
                step=trainer.global_step,
            )
            panels.flush()
        except Exception as err:
            self.warnings.warn(f"lin_probe could not draw its summary figure: {err}")

    def scalars(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        if not trainer.loggers:
            self.warnings.warn(
                "LinearRegimeMonitor found no logger: measurements are kept in "
                "`monitor.history` only. Add a logger (e.g. TensorBoardLogger) to see them."
            )
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def panels(self, trainer: pl.Trainer) -> TensorBoardPanels | None:
        """TensorBoard extras: rank zero and a TensorBoardLogger only; the layout is registered once."""
        if not trainer.is_global_zero:
            return None
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None:
            return None
        panels = TensorBoardPanels(logger.experiment)
        if not self._layout_registered:
            panels.register_layout(classification=self.classification, memorization=self.memorization)
            self._layout_registered = True
        return panels
