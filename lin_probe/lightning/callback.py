"""``LinearRegimeMonitor``: the Lightning callback. It translates hooks into calls on the core.

At train start it gathers the probe set and builds a :class:`lin_probe.monitor.core.RegimeProbe`
(Θ_0, the affine fit, the shadows); each micro-batch is remembered, and right before each
optimizer step the shadows take one mirrored step with the learning rate the user's optimizer is
about to use; after the step, on the check schedule, the core measures and the records are
published. Lightning's internals stay in :mod:`lin_probe.lightning._bridge`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lin_probe._model_state import eval_semantics, floating_dtype
from lin_probe._validation import check_callable, check_int
from lin_probe.kernel import AffineKernel
from lin_probe.lightning import _bridge
from lin_probe.lightning.publishing import Publisher
from lin_probe.losses import LossFn
from lin_probe.monitor.budget import PROBE_SIZES, MonitorPlan, OverBudgetWarning, check_max_overhead
from lin_probe.monitor.budget_keeper import REPLAN_AT_STEP, BudgetKeeper, planned_stop
from lin_probe.monitor.core import (
    MEMO,
    PAPER,
    STATE_VERSION,
    Host,
    MonitorConfig,
    RegimeProbe,
    learning_rate_weights,
    saved_exit_step,
)
from lin_probe.monitor.diagnosis import Diagnosis, Verdict
from lin_probe.monitor.forward import CalledWith, ForwardFn, called_with
from lin_probe.monitor.overhead import OverheadClock
from lin_probe.monitor.pilot import measure_costs
from lin_probe.monitor.probe import BatchToXY, ProbeSet, default_batch_to_xy, probe_from_argument
from lin_probe.monitor.progress import StartupProgress
from lin_probe.monitor.schedule import CheckSchedule
from lin_probe.ntk._plumbing import prepare_inputs
from lin_probe.plan import ComputePlan
from lin_probe.shadows.digests import BatchDigests

_LARGEST_GIVEN_PROBE = 1 << 62
"""``probe=`` without ``n_probe``: every example given is used (the probe is the user's explicit choice)."""

UNBUDGETED_EVERY_N_STEPS = 10
"""The check interval without a budget (``max_overhead=None``) or when ``every_n_steps`` is unset."""


class _PendingBatch(NamedTuple):
    """A micro-batch waiting for the optimizer step the shadows mirror, with its staged row digests."""

    x: Tensor
    y: Tensor
    batch: Any
    digests: BatchDigests | None


_CLIPPING_NOT_MIRRORED = (
    "Gradient clipping is not mirrored on the linear shadow: while clipping is active the shadow and the "
    "network take different steps, and their distance includes that difference."
)


class LinearRegimeMonitor(Callback):
    r"""Shadow the network with the linear model of Hu et al. (2020) and flag when it leaves that regime.

    At train start the empirical NTK Θ_0 of the model on a probe set is fitted by an affine transform
    of the data kernel, ``Θ_0 ≈ a·XXᵀ/d + b·11ᵀ + c·I``; the linear model
    ``f_lin(x) = f_0(x) + Bᵀ[√a·x/√d; √b]`` then trains on the same batches, with the same loss and
    learning rate. Its distance from the network is logged under ``lin_probe/`` (for TensorBoard, as the
    dashboard described in :mod:`lin_probe.lightning.tensorboard`).

    Args:
        probe: ``None`` (the first ``n_probe`` validation examples, else training ones), a tensor of
            inputs, or an ``(inputs, targets)`` pair.
        n_probe: how many probe examples to use (the NTK is ``n_probe × n_probe``); ``None``: all of a
            given ``probe``, else the budget's choice among 256, 128, 64 and 32 (256 without a budget).
        loss: ``"auto"`` (inferred at train start from the probe's targets and the model's output:
            integer class targets with several outputs → ``"cross_entropy"``, floating targets of the
            output's size → ``"mse"``; the choice is announced in one line), ``"mse"``,
            ``"cross_entropy"`` or a callable ``(pred, target) -> scalar``: the loss your
            ``training_step`` minimises, with mean reduction.
        batch_to_xy: ``(x, y)`` from a training batch; default: its first two items, or keys "x"/"y".
        every_n_steps: a functional check every this many optimizer steps (and at step 0; 0: only the
            log-spaced ones); ``None``: the budget's choice (10 without a budget).
        ntk_every_n_steps: an NTK check every this many steps (``None``: ``every_n_steps``, or the
            budget's choice when ``every_n_steps`` is unset too; 0: step 0 only).
        log_spaced: also check at steps 1, 2, 4, 8, … (early-time dynamics are log-scaled).
        tolerance: a check is outside the linear regime when ``functional_distance_rel > tolerance``.
        patience: consecutive outside checks that confirm the exit.
        center: include ``f_0`` in the shadow (a frozen copy of the model); ``False`` for models whose
            initial output is ~0 or that are too large to keep twice.
        stop_after_exit: stop measuring and shadowing this many checks after the exit, or after the verdict
            "not in the linear regime from the start" (``None``: the budget's choice, 3; never without a
            budget).
        output_fn: maps the model's raw output to the prediction tensor (tuple/dict outputs).
        features_fn: maps inputs to the float vectors the data kernel ``XXᵀ/d`` is built from (token
            inputs); the model still receives the raw inputs. The same as ``data_kernel=features_fn``.
        progress_bar: show ``functional_distance_rel`` in the progress bar.
        memory_budget: bytes for the NTK's working memory (default 1 GiB); shorthand for ``compute_plan``.
        verbose: print the exit step (rank zero) when it is found.
        memorization: also run the shadow with the ``c·I`` term on training points (``N_train × C``
            offsets; example identity from :class:`lin_probe.data.WithIndex` indices, else input hashes).
        compute_plan: every cost limit at once (:class:`lin_probe.plan.ComputePlan`).
        data_kernel: what the affine kernel's ``K`` is built from: ``"flat"`` (the inputs flattened),
            ``"patch_mean"`` (the mean input patch of the model's first convolution), ``"auto"``
            (every applicable one is fitted at init and the lowest centred fit error wins) or a callable.
        linearized: also train the network's own first-order Taylor model ``f_0 + J_0(θ' − θ_0)`` with the
            same optimizer (tags ``lin_probe/linearized/*``); the verdict's shadow under optimizers other
            than SGD. Costs one forward-mode and one backward pass of the network per step (a CPU
            training step measured 4–4.5× as long: benchmarks/README.md) and a copy of the parameters.

        outputs: what the NTK is taken over: ``"exact"`` (every output, ``C`` backward passes per probe
            example), ``"sketch"`` (an unbiased random projection of the outputs; the fit card gives the
            number of projections and its estimated error, from the spread between the kernels of its
            two halves of directions: no exact kernel is computed), or ``"auto"``: the exact kernel
            where the ``max_overhead`` budget affords it at the same probe size, else the sketch (2
            directions for a classifier, whose cross-output terms are small at init; 32 or more above
            64 outputs per example); without a budget exact up to 64 outputs, sketched above (the
            plan line says which).
        max_overhead: the monitor's budget, as a share of the run's wall time (default 5 %;
            ``None``: no budget, the fixed defaults above). At train start the monitor times its parts and
            plans what fits the run's length (``trainer.estimated_stepping_batches``): the probe size,
            the NTK checks (log-spaced first) and the functional ones, when to stop after the exit, and
            (when the shadows cannot follow the whole run within it) the last step measured; it says
            the plan in one line, re-plans once from the run's measured steps, logs its share so
            far as ``lin_probe/overhead``, and warns when even its minimal plan (or your explicit
            settings) exceed the budget (:mod:`lin_probe.monitor.budget`). Settings you pass are kept.
        forward_fn: how to call your module on a probe or batch input ``x``, ``forward_fn(module, x)``,
            for a ``forward`` that takes more than the inputs (e.g. ``lambda m, x: m(x, None)``); every
            measurement, ``f_0`` and the shadows use it (:class:`lin_probe.monitor.forward.CalledWith`).

    Example::

        trainer = Trainer(callbacks=[LinearRegimeMonitor()])
    """

    def __init__(
        self,
        probe: Tensor | tuple[Tensor, Tensor] | None = None,
        n_probe: int | None = None,
        loss: str | LossFn = "auto",
        batch_to_xy: BatchToXY | None = None,
        every_n_steps: int | None = None,
        ntk_every_n_steps: int | None = None,
        log_spaced: bool = True,
        tolerance: float = 0.1,
        patience: int = 3,
        center: bool = True,
        stop_after_exit: int | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        features_fn: Callable[[Tensor], Tensor] | None = None,
        progress_bar: bool = True,
        memory_budget: int | None = None,
        verbose: bool = True,
        memorization: bool = False,
        compute_plan: ComputePlan | None = None,
        data_kernel: str | Callable[[Tensor], Tensor] = "auto",
        linearized: bool = False,
        outputs: str = "auto",
        max_overhead: float | None = 0.05,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        super().__init__()
        if n_probe is not None:
            check_int("n_probe", n_probe, minimum=2)
        if stop_after_exit is not None:
            check_int("stop_after_exit", stop_after_exit, minimum=0)
        check_max_overhead(max_overhead)
        check_callable("forward_fn", forward_fn)
        self.forward_fn = forward_fn
        self._wrapper: CalledWith | None = None
        explicit = every_n_steps is not None or ntk_every_n_steps is not None or not log_spaced
        interval = UNBUDGETED_EVERY_N_STEPS if every_n_steps is None else every_n_steps
        # The user's schedule (the budget keeps it), else None: the fixed default until a plan replaces it.
        self.user_schedule = CheckSchedule(interval, ntk_every_n_steps, log_spaced) if explicit else None
        check_callable("batch_to_xy", batch_to_xy)
        plan = ComputePlan.resolve(memory_budget, compute_plan)
        # positional, in MonitorConfig's field order: loss, tolerance, patience, center, output_fn, ...
        self.config = MonitorConfig(
            loss,
            tolerance,
            patience,
            center,
            output_fn,
            features_fn,
            memorization,
            plan,
            data_kernel,
            linearized,
            outputs,
        )
        fixed_n = n_probe
        if probe is not None:  # validated now, not after setup; a given probe fixes the size (all of it)
            fixed_n = len(probe_from_argument(probe, n_probe or _LARGEST_GIVEN_PROBE))
        self.probe, self.n_probe, self.max_overhead = probe, n_probe, max_overhead
        self.fixed_n_probe = fixed_n  # what the budget must keep: n_probe, or the given probe's size
        self.batch_to_xy: BatchToXY = batch_to_xy or default_batch_to_xy
        self.user_stop_after_exit = stop_after_exit
        self.stop_after_exit, self.progress_bar, self.verbose = stop_after_exit, progress_bar, verbose
        self._pending_state: dict[str, Any] | None = None
        # Formatted once (every field is fixed here): Lightning reads state_key on every hook call
        # (its profiler's action name), ~6 times a step, and formatting it cost ~2 % of a 1-ms step.
        every = None if self.user_schedule is None else self.user_schedule.every_n_steps
        self._state_key = self._generate_state_key(
            n_probe=n_probe, every_n_steps=every, tolerance=self.config.tolerance, patience=self.config.patience,
            memorization=self.config.memorization, linearized=self.config.linearized,
        )  # fmt: skip
        self._reset()

    @property
    @override
    def state_key(self) -> str:
        """Distinct per configuration, so two monitors (e.g. different tolerances) can share a Trainer."""
        return self._state_key

    @property
    def history(self) -> list[dict[str, float]]:
        """Every check's record, in order (also in ``trainer.callback_metrics`` and the loggers)."""
        return self._history if self.core is None else self.core.history

    @property
    def exit_step(self) -> int | None:
        """The verdict's exit: the first step of the first run of ``patience`` checks above ``tolerance``;
        ``None`` until found, and for a network not in the linear regime from the start."""
        if self.core is None:
            return saved_exit_step(self._pending_state, PAPER)
        return self.core.exit_step(self.core.verdict_run.prefix)

    @property
    def verdict(self) -> Verdict | None:
        """Inside, left at a step, or not in the linear regime from the start; ``None`` before train start."""
        return None if self.core is None else self.core.verdict

    @property
    def diagnosis(self) -> Diagnosis | None:
        """The cause of the exit with its numbers (:mod:`lin_probe.monitor.diagnosis`); ``None`` until then."""
        return None if self.core is None else self.core.diagnosis

    @property
    def memo_exit_step(self) -> int | None:
        """The memorizing shadow's exit step (``memorization=True``); ``None`` until found or when off."""
        return self.core.exit_step(MEMO) if self.core else saved_exit_step(self._pending_state, MEMO)

    @property
    def kernel(self) -> AffineKernel | None:
        """The affine data kernel fitted at train start."""
        return None if self.core is None else self.core.kernel

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _bridge.require_automatic_optimization(pl_module)
        given = isinstance(self.probe, (Tensor, tuple, list))
        if given and _built(pl_module):  # a given probe is checked before anything runs
            inputs = probe_from_argument(self.probe, self._gathered_n).inputs
            _check_probe(called_with(pl_module, self.forward_fn), inputs, self.forward_fn is not None)
        self._reset()  # each fit starts clean; a checkpoint's state arrives after this, in load_state_dict
        self.publisher.start(trainer, pl_module)  # before Lightning's HParams

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.start()
        with self.clock.measuring():
            self._start(trainer, pl_module)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = _bridge.single_optimizer(trainer)
        warn = lambda message: rank_zero_warn(message, category=UserWarning)  # noqa: E731
        host = Host(
            copy_model=_bridge.initial_copy,
            warn=warn,
            info=rank_zero_info,
            require_indices=trainer.world_size > 1,
            progress=lambda what: StartupProgress(what, rank_zero_info, _bridge.sigterm_check(trainer)),
        )
        model = self._model(pl_module)  # what measurements call: pl_module, or forward_fn around it
        state, self._pending_state = self._pending_state, None
        if state is not None and self._resume(model, optimizer, state, host):
            self.publisher.config = self.core.config  # loss="auto" resolved
            return
        probe = _bridge.gather_probe(trainer, self.probe, self._gathered_n, self.batch_to_xy)
        _check_probe(model, probe.inputs, self.forward_fn is not None)
        try:
            config = self.config
            if self.budget is not None:
                probe, config = self._plan(trainer, model, probe, optimizer)
            self.core = RegimeProbe.start(
                model,
                probe,
                optimizer,
                config,
                train_size=_bridge.train_set_length(trainer),
                host=host,
                **self._pilot_structured_timings(),
            )
        except (ValueError, TypeError):
            raise  # lin_probe's configuration errors: they name the argument to change
        except Exception as err:  # a measurement that cannot be made must not take the run down
            self.core = None
            self.publisher.warnings.warn(
                f"LinearRegimeMonitor is switched off: it could not measure the model at train start "
                f"({type(err).__name__}: {err}). Training continues without it."
            )
            return
        self._active = True
        self.publisher.config = self.core.config  # loss="auto" resolved
        self.publisher.fit(trainer, self.core, pl_module)
        self._run_check(trainer, model, step=0)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        x, y = self.batch_to_xy(batch)
        if y is None:
            raise TypeError("`batch_to_xy` returned no targets; the shadow needs (x, y) to take a step.")
        # Staged now, before the step's kernels are queued: on a GPU the shadow step then waits for
        # this batch's host copy alone, not for the step's forward and backward.
        digests = self.core.stage_digests(x, batch) if self.core is not None else None
        self._pending.append(_PendingBatch(x, y, batch, digests))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._active or self.core is None:
            return
        batches, self._pending = self._pending, []
        started = time.perf_counter()
        with self.clock.measuring():
            self._shadow_step(trainer, batches, lr=float(optimizer.param_groups[0]["lr"]))
        if self.budget is not None:
            self.budget.record_shadow_step(time.perf_counter() - started)
        if trainer.gradient_clip_val:
            self.publisher.warnings.warn(_CLIPPING_NOT_MIRRORED)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        step = trainer.global_step
        if step == self._last_step:
            # No optimizer step yet (accumulating), or training_step skipped it: keep or drop batches.
            if len(self._pending) >= trainer.accumulate_grad_batches:
                self._pending = []
            return
        self._last_step = step
        self._time_user_step()
        if self.schedule.functional(step):
            with self.clock.measuring():
                self._run_check(trainer, self._model(pl_module), step)

    def _time_user_step(self) -> None:
        """The wall time since the previous optimizer step's end, less the monitor's own: one of the
        user's steps (data loading included), for the re-plan's step time (the budget keeper)."""
        now, own = time.perf_counter(), self.clock.own_s
        if self.budget is not None and self._step_mark is not None:
            self.budget.record_user_step((now - self._step_mark[0]) - (own - self._step_mark[1]))
        self._step_mark = (now, own)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.clock.started is None:
            return
        with self.clock.measuring():  # drawing is the monitor's time, not the user's steps'
            self.publisher.epoch_figure(trainer, self.core)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.core is None or self.clock.started is None:
            self.publisher.finish(trainer, self.core)
            return
        with self.clock.measuring():
            # the run's final share, logged after the last figure is drawn (and counted)
            self.publisher.finish(trainer, self.core, final_share=self.clock.share)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, err: BaseException) -> None:
        self.publisher.finish(trainer, self.core)  # what was measured stays readable after a crash or Ctrl-C

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.core is None:  # loaded but not yet resumed: keep what was loaded
            return self._pending_state or {"version": STATE_VERSION, "history": list(self.history)}
        loop = {"last_optimizer_step": self._last_step, "checks_since_exit": self._checks_since_exit}
        budget = {} if self.budget is None else {"budget": self.budget.state_dict()}
        core = self.core.state_dict()
        return {"version": STATE_VERSION, "core": core, **loop, "active": self._active, **budget}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict if "core" in state_dict else None
        saved = state_dict.get("core", state_dict)  # before the core existed: only a history
        self._history = [dict(record) for record in saved.get("history", [])]
        if "version" not in state_dict:  # the first release's layout: nothing to resume from
            self.publisher.warnings.warn(
                "lin_probe cannot resume from a checkpoint written by an older version; it re-measures at "
                "train start."
            )

    def _resume(self, model: nn.Module, optimizer: Any, state: dict[str, Any], host: Host) -> bool:
        """Rebuild the core from a checkpoint (Θ_0 is the kernel at *init*); False: start afresh."""
        try:
            self.core = RegimeProbe.from_state(
                model, optimizer, state["core"], self.publisher.config, host=host
            )
        except ValueError as err:
            self.publisher.warnings.warn(
                f"lin_probe cannot resume from this checkpoint ({err}); starting afresh."
            )
            return False
        self._last_step = int(state.get("last_optimizer_step", 0))
        self._checks_since_exit = int(state.get("checks_since_exit", 0))
        self._active = bool(state.get("active", True))
        saved = None if self.budget is None else self.budget.load_state_dict(state.get("budget") or {})
        if saved is not None:  # the plan the run started with (its probe came from the checkpoint)
            self.schedule, self.stop_after_exit, self.measured_until = saved
        return True

    def _reset(self) -> None:
        self.core: RegimeProbe | None = None
        self.publisher = Publisher(self.config, progress_bar=self.progress_bar, verbose=self.verbose)
        self._history: list[dict[str, float]] = []
        self._pending: list[_PendingBatch] = []
        self._last_step = 0
        self._checks_since_exit = 0
        self._active = False
        self.clock = OverheadClock()
        self.schedule = self.user_schedule or CheckSchedule(UNBUDGETED_EVERY_N_STEPS, None, True)
        self.stop_after_exit = self.user_stop_after_exit
        self.measured_until: int | None = None  # the plan's last measured step (None: the whole run)
        self._step_mark: tuple[float, float] | None = None  # (wall, own seconds) at the last step's end
        self.budget = (
            None
            if self.max_overhead is None
            else BudgetKeeper(
                self.max_overhead,
                n_probe=self.fixed_n_probe,
                schedule=self.user_schedule,
                stop_after_exit=self.user_stop_after_exit,
                warn=lambda message: self.publisher.warnings.warn(message, category=OverBudgetWarning),
                info=rank_zero_info,
            )
        )

    def _plan(
        self, trainer: pl.Trainer, model: nn.Module, probe: ProbeSet, optimizer: Any
    ) -> tuple[ProbeSet, MonitorConfig]:
        """Time the monitor's parts, plan within ``max_overhead`` (rank zero's plan on every rank) and
        adopt it: the probe's first ``n`` examples, the schedule, when to stop after the exit, and
        (``outputs="auto"`` on a many-output model) the exact kernel or the sketch."""
        assert self.budget is not None
        costs = measure_costs(
            model,
            probe.on_model(model).inputs,
            outputs_setting=self.config.outputs,
            output_fn=self.config.output_fn,
            param_weights=learning_rate_weights(model, optimizer),
            plan=self.config.plan,
            batch_size=_bridge.train_batch_size(trainer) or len(probe),
            steps_per_epoch=_bridge.steps_per_epoch(trainer),
            center=self.config.center,
        )
        plan = self.budget.start(costs, horizon=_bridge.horizon(trainer), n_available=len(probe))
        plan = self._adopt(trainer, plan)
        config = self.config if plan.outputs is None else replace(self.config, outputs=plan.outputs)
        return probe.head(plan.n_probe), config

    def _pilot_structured_timings(self) -> dict[str, Any]:
        """The pilot's structured NTK timings and the outputs they were taken over, for
        ``method="auto"`` at start (none without a budget): ``RegimeProbe.start``'s keywords."""
        costs = self.budget.costs if self.budget is not None else None
        if costs is None:
            return {}
        return {
            "structured_seconds": dict(costs.structured_ntk_s),
            "structured_projections": costs.structured_ntk_projections,
        }

    @property
    def _gathered_n(self) -> int:
        """Examples to gather: the fixed size, else the largest the budget may choose."""
        return self.fixed_n_probe or PROBE_SIZES[0]

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        """What every measurement calls: ``pl_module``, or one :class:`CalledWith` around it (``forward_fn``)."""
        if self.forward_fn is None:
            return pl_module
        if self._wrapper is None or self._wrapper.module is not pl_module:
            self._wrapper = CalledWith(pl_module, self.forward_fn)
        return self._wrapper

    def _adopt(self, trainer: pl.Trainer, plan: MonitorPlan) -> MonitorPlan:
        """Rank zero's ``plan`` on every rank (their timings differ, their schedules must not): the
        budget's plan in force, and the schedule and stop-after-exit the hooks read."""
        assert self.budget is not None
        plan = _bridge.from_rank_zero(trainer, plan)  # type: ignore[assignment]
        self.budget.adopt(plan)
        self.schedule = plan.schedule
        self.stop_after_exit = planned_stop(plan, self.user_stop_after_exit, self.budget.planned_anything)
        self.measured_until = plan.measured_until
        return plan

    def _replan(self, trainer: pl.Trainer, step: int) -> None:
        """Once, early: the plan again from the run's measured seconds (rank zero's, on every rank)."""
        if self.budget is None or self.budget.plan is None or self.budget.replanned or step < REPLAN_AT_STEP:
            return  # (a resumed run keeps the plan it saved: there is nothing to re-plan from)
        assert self.clock.started is not None
        user_s = max(0.0, time.perf_counter() - self.clock.started - self.clock.own_s)
        self._adopt(trainer, self.budget.replan(step, user_s) or self.budget.plan)

    def _shadow_step(self, trainer: pl.Trainer, batches: list[_PendingBatch], lr: float) -> None:
        """One mirrored step of the shadows, in lock-step across ranks: ranks first agree that every
        one of them could accumulate, so a rank that failed alone never leaves the others waiting."""
        assert self.core is not None
        scale = 1.0 / trainer.accumulate_grad_batches  # Lightning divides the loss by this; so do the shadows
        failure: str | None = None
        try:
            for pending in batches:
                self.core.accumulate(
                    pending.x, pending.y, batch=pending.batch, scale=scale, digests=pending.digests
                )
        except Exception as err:  # a monitor must never take the training run down with it
            failure = f"{type(err).__name__}: {err}"
        failure = _bridge.agreed_failure(trainer, failure)
        if failure is None:
            try:
                self.core.step(lr, reduce_grad=_bridge.mean_over_ranks(trainer))
                return
            except Exception as err:
                failure = f"{type(err).__name__}: {err}"
        self.core.discard()
        self._active, self._pending = False, []
        self._warn_stopping(f"the linear shadow could not take a step ({failure})")

    def _warn_stopping(self, reason: str) -> None:
        self.publisher.warnings.warn(f"LinearRegimeMonitor stops measuring: {reason}. Training continues.")

    def _run_check(self, trainer: pl.Trainer, model: nn.Module, step: int) -> None:
        assert self.core is not None
        measured = self.core.measure(model, step, ntk=self.schedule.ntk(step))
        if self.budget is not None:
            self.budget.record_check(len(self.core.probe), *self.core.last_check_seconds)
        # Every rank measured the same thing; rank zero's record makes the exit (and so the
        # stop_after_exit schedule that gates the shadows' collectives) identical everywhere.
        record, stop_reason = _bridge.from_rank_zero(trainer, (measured.record, measured.stop_reason))
        if stop_reason is not None:  # nothing left to compare: the checks so far are the result
            self._stop_measuring(trainer)  # no NaN record: an EarlyStopping on lin_probe/* would stop the run
            self._warn_stopping(stop_reason)
            return
        exited = self.core.observe(record)
        over_budget = self.budget is not None and self.budget.plan is not None and not self.budget.plan.fits
        self.core.conclude(model, record, kernel_when_explained=not over_budget)  # the exit's cause
        self.publisher.record(trainer, record, measured.eigenvalues, self.core)
        self.publisher.overhead(trainer, self.clock.share(), step)
        self._replan(trainer, step)
        stopping = self.stop_after_exit is not None
        self.publisher.exits(trainer, exited, record, self.core, draw=not stopping)
        if self.core.verdict.state != "inside" and stopping:
            at_verdict = self._stops_at_verdict(trainer, step)
            if at_verdict or self._checks_since_exit >= self.stop_after_exit:  # type: ignore[operator]
                self._stop_measuring(trainer)
                if at_verdict:
                    rank_zero_info(
                        "lin_probe: the affine kernel's misfit at init explains the verdict, and the checks "
                        "after it would not fit in what is left of the overhead budget: checks and shadows "
                        "stop here. Pass stop_after_exit=N (or max_overhead=None) to keep measuring after it."
                    )
            self._checks_since_exit += 1
        if self._active and self.measured_until is not None and step >= self.measured_until:
            self._stop_measuring(trainer)
            rank_zero_info(
                f"lin_probe: measured steps 0–{step:,} as the overhead budget planned; checks and shadows stop "
                f"here, and the verdict stands as of this step: {self.core.verdict.describe()}. Pass "
                "max_overhead=None (or a larger one) to measure the whole run."
            )

    def _stops_at_verdict(self, trainer: pl.Trainer, step: int) -> bool:
        """No planned checks after a verdict the init fit explains ("not in the linear regime from the
        start") when they would not fit in what is left of the budget: their distances would be from
        a shadow the fit card calls a poor proxy (as :meth:`RegimeProbe.conclude` skips that verdict's
        kernel over budget). On the zoo ResNet's 200-step run those 3 checks and their 28 shadow steps
        were a third of the monitor's work. A user's ``stop_after_exit`` is kept as it is. Rank
        zero's clock decides for every rank: each rank's seconds differ, and the shadows' collectives
        must stop on all at once (a rank stopping alone would hang the others)."""
        assert self.core is not None
        if self.core.verdict.state != "outside_from_start" or self._checks_since_exit != 0:
            return False
        if self.budget is None or self.user_stop_after_exit is not None:
            return False
        unaffordable = not self.budget.affords_after_verdict(step, self.clock.own_s)
        return bool(_bridge.from_rank_zero(trainer, unaffordable))

    def _stop_measuring(self, trainer: pl.Trainer) -> None:
        """No more checks or shadow steps in this fit; the figure with the last checks, drawn once."""
        assert self.core is not None
        self._active = False
        self._pending = []
        self.publisher.figure(trainer, self.core)


def _built(module: nn.Module) -> bool:
    """Whether the module has its parameters yet (not before ``configure_model``, nor lazy ones)."""
    params = list(module.parameters())
    return bool(params) and not any(isinstance(p, nn.parameter.UninitializedParameter) for p in params)


def _check_probe(model: nn.Module, inputs: Tensor, wrapped: bool = False) -> None:
    """The configuration check, one example's forward before any costly work: a probe the model
    rejects is a clear error naming the arguments to change, not a raw error from deep inside the
    NTK. ``output_fn`` errors keep their own message."""
    example, dtype = prepare_inputs(model, inputs[:1]), floating_dtype(model)
    if dtype is not None and example.is_floating_point():
        example = example.to(dtype)  # as the probe set is cast for the measurements
    try:
        with torch.no_grad(), eval_semantics(model):
            model(example)
    except Exception as err:
        call = "`forward_fn(pl_module, x)`" if wrapped else "`pl_module(x)`"
        hint = (
            ""
            if wrapped
            else (
                " If your module's forward takes more than the inputs, pass `forward_fn=lambda module, x: ...` "
                "to say how to call it."
            )
        )
        raise ValueError(
            f"LinearRegimeMonitor cannot run the model on one probe example of shape "
            f"{tuple(inputs.shape[1:])} ({type(err).__name__}: {err}). The probe's inputs must be what "
            f"{call} accepts: check `probe`, or `batch_to_xy` (which picks x from a batch), and "
            f"`output_fn` (which picks the prediction from the output).{hint}"
        ) from err
