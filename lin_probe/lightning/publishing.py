"""Where a check's numbers go in a Lightning run: loggers, ``callback_metrics``, the progress bar, TensorBoard.

Every check's values go into ``trainer.callback_metrics`` under flat names (``lin_probe/loss_network``,
``lin_probe/functional_distance_rel``, …, so ``EarlyStopping`` and ``ModelCheckpoint`` can monitor
them) and to every logger that is not TensorBoard with ``log_metrics(step=...)`` (so
``log_every_n_steps`` does not thin them). A ``TensorBoardLogger`` gets the dashboard of
:mod:`lin_probe.lightning.tensorboard` instead, on rank zero: the same values, one run per series so
TensorBoard colours them apart, plus cards, spectrum, figures and an HParams session.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import WarningCache, rank_zero_info
from torch import Tensor

from lin_probe.lightning import _bridge
from lin_probe.lightning.series import LINEARIZED as LINEARIZED_SERIES
from lin_probe.lightning.series import MEMORIZING, SERIES_ORDER, RegimeTimeline, check_points
from lin_probe.lightning.tensorboard import (
    EXIT_CARD,
    FIT_CARD,
    SUMMARY_METRICS,
    TensorBoardPanels,
    exit_card,
    fit_card,
    summary_tag,
    tag,
)
from lin_probe.monitor.budget import EPOCH_FIGURE_SHARE
from lin_probe.monitor.core import LINEARIZED, MEMO, MonitorConfig, RegimeProbe

PROGRESS_BAR_KEY = tag("functional_distance_rel")

# The shadows besides the verdict's: (prefix, name in messages, summary value of their exit step).
_SIDE_SHADOWS = (
    (MEMO, "the memorizing shadow (kernel aK + b11ᵀ + cI)", "memo_exit_step"),
    ("", "the paper's linear model", "paper_exit_step"),
    (LINEARIZED, "the linearised network", "linearized_exit_step"),
)

_NO_MATPLOTLIB = (
    "lin_probe draws its summary figure with matplotlib, which is not installed: the Images tab stays "
    "empty. `pip install matplotlib` to get it; every other panel is written."
)


class Publisher:
    """Publishes one monitor's records to a trainer's loggers; warnings once per fit."""

    def __init__(self, config: MonitorConfig, *, progress_bar: bool, verbose: bool) -> None:
        self.config = config
        self.progress_bar = progress_bar
        self.verbose = verbose
        self.warnings = WarningCache()
        self.timeline = RegimeTimeline()
        self.spectra: dict[str, np.ndarray] = {}
        self._panels: TensorBoardPanels | None = None
        self._started = time.monotonic()
        self._drawn_checks = 0  # checks in the last figure
        self._drawing_s = 0.0  # time spent drawing so far

    # ------------------------------------------------------------------ the run's frame
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At setup, before Lightning logs the model's hyperparameters: the run's HParams session.

        TensorBoard keeps the first session of a run, so lin_probe writes it first, with the model's
        hyperparameters (those Lightning would write) and lin_probe's settings; its summary
        values arrive later as scalars. Only where Lightning would write a session itself
        (``default_hp_metric=True``): a user who logs their own HParams metrics keeps their session.
        """
        panels = self.panels(trainer)
        logger = _bridge.tensorboard_logger(trainer)
        if panels is None or logger is None or not _bridge.writes_default_hparams(logger):
            return
        config = self.config
        # Two settings only: TensorBoard ticks the first five hparams by name, and "lin_probe/…" sorts
        # before most of the user's own, which a sweep compares.
        spec = config.data_kernel_spec
        settings = {
            "lin_probe/data_kernel": spec if isinstance(spec, str) else "callable",
            "lin_probe/tolerance": config.tolerance,
        }
        params = {**_bridge.logged_hparams(trainer, pl_module, logger), **settings}
        # Metrics in reading order (TensorBoard ticks the first five); Lightning's hp_metric last.
        panels.hparams(params, [*map(summary_tag, SUMMARY_METRICS), "hp_metric"])

    def fit(self, trainer: pl.Trainer, probe: RegimeProbe, pl_module: pl.LightningModule) -> None:
        """The fit at init: ``fit_*`` values at step 0 and the fit card."""
        n_parameters = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        kernel = probe.kernel
        fit = {"fit_a": kernel.a, "fit_b": kernel.b, "fit_c": kernel.c}
        for name, value in (
            ("fit_rel_error", kernel.rel_error),
            ("fit_rel_error_centered", kernel.rel_error_centered),
        ):
            fit[name] = math.nan if value is None else value
        self.scalars(trainer, {tag(k): float(v) for k, v in fit.items()}, 0)
        choice = probe.data_kernel
        if self.verbose and choice is not None and len(choice.scores) > 1:
            rank_zero_info(f"lin_probe: {choice.summary()}.")
        sketched = probe.kernel_outputs is not None and probe.kernel_outputs.sketch is not None
        if self.verbose and sketched:
            rank_zero_info(f"lin_probe: {probe.kernel_outputs.describe()}")
        panels = self.panels(trainer)
        if panels is not None:
            panels.summary(fit, 0)
            card = fit_card(
                kernel,
                n_probe=len(probe.probe),
                probe_source=probe.probe.source,
                n_parameters=n_parameters,
                center=probe.config.center,
                data_kernel=choice,
                outputs_line=None if probe.kernel_outputs is None else probe.kernel_outputs.describe(),
            )
            panels.text(FIT_CARD, card, 0)
            panels.flush()

    def finish(
        self, trainer: pl.Trainer, probe: RegimeProbe | None, final_share: Callable[[], float] | None = None
    ) -> None:
        """At train end (or a crash): the regime of checks still undecided, the final flag and figure,
        then ``final_share()`` as the last ``lin_probe/overhead`` (the figure's time included); close
        the runs. Only panels already open: a fit that failed before they were is left alone."""
        panels = self._panels
        if probe is not None and probe.history and panels is not None:
            self._regime(panels, probe, final=True)
            final = 0.0 if probe.verdict_run.regime.exited else 1.0
            panels.summary({"final_in_linear_regime": final}, int(probe.history[-1]["step"]))
            if self._drawn_checks != len(probe.history):  # drawn already when measuring stopped
                self.figure(trainer, probe)
        if final_share is not None:
            self.overhead(trainer, final_share(), trainer.global_step)
        panels = self._panels  # logging the share may have opened them
        if panels is None:
            return
        panels.flush()
        panels.close()
        self._panels = None

    # ------------------------------------------------------------------ each check
    def overhead(self, trainer: pl.Trainer, share: float, step: int) -> None:
        """``lin_probe/overhead``: the monitor's measured share of the run's wall time so far
        (:mod:`lin_probe.monitor.overhead`), so the user sees what the monitor costs."""
        key = tag("overhead")
        trainer.callback_metrics[key] = torch.tensor(share)
        self.scalars(trainer, {key: share}, step)
        panels = self.panels(trainer)
        if panels is not None:
            panels.scalar("overhead", share, step)

    def record(
        self,
        trainer: pl.Trainer,
        record: Mapping[str, float],
        eigenvalues: Tensor | None,
        probe: RegimeProbe | None = None,
    ) -> None:
        """One check: every value but the step, under ``lin_probe/``, at the record's step."""
        metrics = {tag(k): float(v) for k, v in record.items() if k != "step"}
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if self.progress_bar and PROGRESS_BAR_KEY in metrics:
            trainer.progress_bar_metrics[PROGRESS_BAR_KEY] = metrics[PROGRESS_BAR_KEY]
        step = int(record["step"])
        self.scalars(trainer, metrics, step)
        panels = self.panels(trainer)
        if panels is None:
            return
        panels.series.write(check_points(record, self.config.tolerance), tag)
        if probe is not None:
            self._regime(panels, probe)
        if eigenvalues is not None:
            panels.spectrum(eigenvalues, step)
            values = eigenvalues.detach().to("cpu", torch.float64).numpy()
            initial = list(self.spectra.items())[:1] if step > 0 else []
            self.spectra = dict(initial) | {f"init (step {step})" if not initial else f"step {step}": values}
        panels.flush()

    def exits(
        self,
        trainer: pl.Trainer,
        exited: list[str],
        record: Mapping[str, float],
        probe: RegimeProbe,
        *,
        draw: bool = True,
    ) -> None:
        """Announce the exits this check confirmed: a line on rank zero and, for the paper's shadow, the
        card and (``draw``) the figure; ``draw=False`` when measuring stops a few checks later, which
        draws it then, once (a figure costs ~0.5 s: more than a small model's whole short run)."""
        config = probe.config
        panels = self.panels(trainer)
        step = int(record["step"])
        for prefix, shadow, summary in _SIDE_SHADOWS:
            if (
                prefix not in exited
                or prefix == probe.verdict_run.prefix
                or prefix + "exit_step" not in record
            ):
                continue  # the verdict's shadow is announced below; "outside from the start" is no exit
            side_exit = int(record[prefix + "exit_step"])
            if self.verbose:
                rank_zero_info(f"lin_probe: {shadow} left the linear regime at step {side_exit}.")
            if panels is not None:
                panels.summary({summary: side_exit}, step)
        verdict_run = probe.verdict_run
        if verdict_run.prefix not in exited:
            return
        verdict = probe.verdict
        if self.verbose:
            rel = record[verdict_run.prefix + "functional_distance_rel"]
            diagnosis = "" if probe.diagnosis is None else f" Diagnosis: {probe.diagnosis.title}."
            verb = "was" if verdict.state == "outside_from_start" else "has"
            rank_zero_info(
                f"lin_probe: the network {verb} {verdict.describe()}; functional_distance_rel > "
                f"{config.tolerance} for {config.patience} consecutive checks, now {rel:.3g} at step {step}."
                f"{diagnosis}"
            )
        if panels is not None:
            if verdict.state == "outside_from_start":
                panels.summary({"outside_from_start": 1.0}, step)
            else:
                panels.summary({"exit_step": verdict.exit_step}, step)
                if verdict_run.prefix == LINEARIZED:
                    panels.summary({"linearized_exit_step": verdict.exit_step}, step)
            card = exit_card(
                verdict,
                record,
                tolerance=config.tolerance,
                patience=config.patience,
                diagnosis=probe.diagnosis,
            )
            panels.text(EXIT_CARD, card, step)
            if draw:
                self.figure(trainer, probe)
            panels.flush()

    def epoch_figure(self, trainer: pl.Trainer, probe: RegimeProbe | None) -> None:
        """The figure at an epoch end, when there is something new and drawing has taken at most
        :data:`~lin_probe.monitor.budget.EPOCH_FIGURE_SHARE` of the time since the monitor started
        (the budget charges that share): before anything was drawn it always draws. The exit, the
        end of training and a crash draw elsewhere, whatever the share."""
        if probe is None or self._drawn_checks == len(probe.history):
            return
        if self._drawing_s > EPOCH_FIGURE_SHARE * (time.monotonic() - self._started):
            return
        self.figure(trainer, probe)

    def figure(self, trainer: pl.Trainer, probe: RegimeProbe) -> None:
        """The run's summary figure, one image per panel (never fatal: a drawing failure is one warning)."""
        panels = self.panels(trainer)
        if panels is None or not probe.history:
            return
        self._drawn_checks, began = len(probe.history), time.monotonic()
        try:
            from lin_probe.lightning.figure import summary_images

            images = summary_images(
                probe.history,
                exit_step=probe.verdict_run.regime.exit_step,
                tolerance=probe.config.tolerance,
                spectra=self.spectra or None,
            )
        except ImportError:
            self.warnings.warn(_NO_MATPLOTLIB)
            return
        except Exception as err:
            self.warnings.warn(f"lin_probe could not draw its summary figure: {err}")
            return
        finally:
            self._drawing_s += time.monotonic() - began
        panels.images(images, trainer.global_step)
        panels.flush()

    # ------------------------------------------------------------------ plumbing
    def scalars(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        """Flat values to every logger but TensorBoard's (which gets the per-series dashboard)."""
        if not trainer.loggers:
            self.warnings.warn(
                "LinearRegimeMonitor found no logger: measurements are kept in "
                "`monitor.history` only. Add a logger (e.g. TensorBoardLogger) to see them."
            )
            return
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                logger.log_metrics(metrics, step=step)

    def panels(self, trainer: pl.Trainer) -> TensorBoardPanels | None:
        """TensorBoard extras: rank zero and a TensorBoardLogger only; the layout is registered once."""
        if not trainer.is_global_zero:
            return None
        if self._panels is None:
            logger = _bridge.tensorboard_logger(trainer)
            if logger is None:
                return None
            self._panels = TensorBoardPanels(logger.experiment, logger.log_dir)
            self._panels.register_layout(classification=self.config.classification)
            off = {MEMORIZING} if not self.config.memorization else set()
            off |= {LINEARIZED_SERIES} if not self.config.linearized else set()
            self._panels.series.open(run for run in SERIES_ORDER if run not in off)
        return self._panels

    def _regime(self, panels: TensorBoardPanels, probe: RegimeProbe, *, final: bool = False) -> None:
        """The regime flag of every check the exit rule has decided by now."""
        regime = probe.verdict_run.regime
        points = self.timeline.decided(
            probe.history,
            exit_step=regime.exit_step,
            undecided_from=regime.streak_start if regime.streak else None,
            final=final,
        )
        panels.series.write(points, tag)
