"""An overhead budget the monitor keeps: what to measure so that the monitor costs at most a share of the run.

A monitoring callback that costs more than the training it watches gets switched off, so by default
(``max_overhead=0.05``) the monitor plans its work against the run it watches:

* the run's length in optimizer steps (Lightning's ``estimated_stepping_batches``) times the
  seconds of one training step give the run's wall time; the budget is ``max_overhead`` of it;
* the monitor's own costs are measured (:class:`Costs`): the NTK at two small probe sizes
  (extrapolated as ``α·n + β·n²``: per-example Jacobians are linear in ``n``, Gram contractions
  quadratic; :func:`ntk_cost_curve` says what it does with noisy probes), one forward over the
  probe per functional check, the shadow's work per training step (``f_0`` on the batch, cached
  per example after the first epoch: :mod:`lin_probe.shadows.initial_cache`);
* every plan is charged one more NTK, the one the verdict's diagnosis reads at the exit;
* :func:`plan_within_budget` then chooses the largest probe (256, 128, 64 or 32 examples) whose
  *core* plan fits — NTK and functional checks at the log-spaced steps 0, 1, 2, 4, … (early-time
  dynamics are log-scaled, and this is where the exit is) — and spends what is left on linear
  checks (every ``m`` steps, ``m`` a round number); when not even that fits, the NTK's log-spaced
  checks are cut from the late end; then the steps measured: checks and shadows stop after step
  ``K`` (a power of two, at least :data:`MIN_MEASURED_STEPS`), since a shadow that follows every
  step of a run that stays linear costs every step (``f_0`` alone is ~⅓ of a step until cached)
  and no probe size or schedule bounds that. The *minimal plan* (the smallest probe, the NTK at
  step 0 only, functional checks log-spaced, the run measured up to :data:`MIN_MEASURED_STEPS`)
  runs anyway with a warning that gives the numbers;
* under ``outputs="auto"`` a model with more outputs than a sketch's directions (a classifier too:
  :mod:`lin_probe.monitor.outputs`) is planned both ways: the exact kernel (``C/S`` times the
  sketch's timed cost) when it fits with as large a probe, the sketch otherwise;
* a verdict the init fit explains ("not in the linear regime from the start") ends the measuring at
  once when the usual :data:`STOP_AFTER_EXIT` checks after it (:func:`after_verdict_s`) would not
  fit in what is left of the budget (:meth:`BudgetKeeper.affords_after_verdict`).

Settings the user passed (``n_probe``, ``every_n_steps``, ``ntk_every_n_steps``) are kept, not
planned; the planner then only estimates their cost, so the caller can warn when it exceeds the
budget. The plan is made at train start from a timed forward and backward of one batch (an
underestimate of a real step: no optimizer or data loading, so the first plan spends less), and made
again once from the steps actually measured (:func:`costs_from_run`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Final

from lin_probe._validation import check_int
from lin_probe.monitor.schedule import CheckSchedule

PROBE_SIZES: Final[tuple[int, ...]] = (256, 128, 64, 32)
"""Probe sizes the plan chooses among, largest first (below 32 the affine fit has too few pairs)."""

UNKNOWN_HORIZON_STEPS: Final[int] = 10_000
"""Steps planned for when the run's length is unknown (an infinite dataloader without ``max_steps``)."""

MIN_MEASURED_STEPS: Final[int] = 256
"""The fewest steps a budgeted plan measures (checks at 0, 1, 2, …, 256) when the run is longer: the
early-time dynamics the linear model describes, and where the benchmarks' exits happen."""

FIGURE_PRIOR_S: Final[float] = 0.3
"""Seconds the plan charges per summary-figure draw (four matplotlib panels): 0.13-0.43 s warm on this
2-core CPU, ad hoc; the first draw in a process also imports matplotlib (~0.6 s). Not timed by the
pilot, which would cost a draw."""

FIGURE_DRAWS: Final[int] = 2
"""Draws every plan is charged: the first epoch end's and the last (when measuring stops, or at the end)."""

EPOCH_FIGURE_SHARE: Final[float] = 0.01
"""Epoch ends redraw the figure while drawing has taken at most this share of the time since the
monitor started (:mod:`lin_probe.lightning.publishing`): every epoch end for epochs of a minute or
more, fewer for short ones (the demo's 14-step epochs would have spent ~8 s of its 29 s drawing). A
plan of more than one epoch is charged this share of the steps it measures."""

MIN_STEP_SAMPLES: Final[int] = 4
"""Timed user steps the re-plan needs to take their median as the step time (fewer: the mean)."""

STOP_AFTER_EXIT: Final[int] = 3
"""Checks the monitor keeps measuring after the verdict in a budgeted plan (then shadows stop): the
departure's growth is visible, and the run does not pay for shadowing a network that left."""

_ROUND: Final[tuple[int, ...]] = (1, 2, 5)


class OverBudgetWarning(UserWarning):
    """The monitor's plan (its minimal one, or the user's explicit settings) exceeds ``max_overhead``.

    Its own category so a run that accepts the cost can filter exactly this warning."""


def check_max_overhead(max_overhead: float | None) -> None:
    """``max_overhead`` is a fraction in (0, 1) or ``None`` (no budget)."""
    if max_overhead is None:
        return
    if isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)):
        raise TypeError(f"`max_overhead` must be a fraction such as 0.05, or None, got {max_overhead!r}.")
    if not 0.0 < float(max_overhead) < 1.0:
        raise ValueError(
            f"`max_overhead` is the monitor's share of the run's wall time, in (0, 1) (0.05 = 5 %); got "
            f"{max_overhead!r}. Pass None to switch the budget off."
        )


@dataclass(frozen=True)
class Costs:
    """Seconds measured for one run; the NTK's as ``ntk_linear·n + ntk_quadratic·n²``.

    ``shadow_step_s``: the shadows' work per training step while ``f_0`` is computed on the batch;
    ``shadow_cached_s``: the same once ``f_0``'s outputs are cached (from ``steps_per_epoch`` on;
    ``None`` steps per epoch: no cache, every step pays ``shadow_step_s``).
    """

    step_s: float
    ntk_linear: float
    ntk_quadratic: float
    functional_per_example_s: float
    shadow_step_s: float
    shadow_cached_s: float
    steps_per_epoch: int | None = None
    exact_ntk_factor: float | None = None
    """Set when the NTK was timed over the output sketch ``outputs="auto"`` takes (``C`` outputs,
    ``S`` directions): ``C/S``, how many times the exact kernel would cost. The planner then chooses
    between the two (:func:`plan_within_budget`). An upper bound: the forward and the per-example
    work that does not grow with the outputs are counted ``C/S`` times too."""
    structured_ntk_s: tuple[tuple[int, float], ...] = ()
    """``(m, seconds)`` of the pilot's NTKs where they ran the structured path: ``method="auto"`` at
    start reuses them instead of timing that path again, when its kernel's outputs are these."""
    structured_ntk_projections: int | None = None
    """The directions of the sketch :attr:`structured_ntk_s` was timed over (``None``: every output)."""
    figure_s: float = FIGURE_PRIOR_S
    """Seconds per summary-figure draw (:data:`FIGURE_PRIOR_S` unless measured)."""

    def settled(self, *, exact: bool) -> Costs:
        """These costs with the outputs chosen: the exact kernel's (``exact``: the NTK scaled by
        :attr:`exact_ntk_factor`, when set) or as timed."""
        if exact and self.exact_ntk_factor is not None:
            factor = self.exact_ntk_factor
            return replace(
                self,
                ntk_linear=self.ntk_linear * factor,
                ntk_quadratic=self.ntk_quadratic * factor,
                exact_ntk_factor=None,
            )
        return replace(self, exact_ntk_factor=None)

    def ntk_s(self, n: int) -> float:
        return self.ntk_linear * n + self.ntk_quadratic * n * n

    def functional_s(self, n: int) -> float:
        return self.functional_per_example_s * n

    def shadow_total_s(self, horizon: int) -> float:
        first = horizon if self.steps_per_epoch is None else min(horizon, self.steps_per_epoch)
        return self.shadow_step_s * first + self.shadow_cached_s * (horizon - first)


def ntk_cost_curve(
    samples: list[tuple[int, float]], *, gram_share: float | None = None
) -> tuple[float, float]:
    """``(α, β)`` with ``t(n) ≈ α·n + β·n²`` through timed ``(n, seconds)`` samples, both ≥ 0.

    Two samples are solved exactly. Where that gives a negative coefficient the curve goes through
    the largest sample instead, linear but for ``gram_share`` of it on ``n²``: a negative ``β`` is
    what a fixed cost per call (planning, one recorded example) does to small probes, whose time
    then grows slower than ``n``, and the quadratic curve through them this used to take (the
    pessimistic one) overestimated the zoo Transformer's kernel 13-fold at 64 examples and ~30-fold
    at 256, so a long run's plan took a smaller probe than its budget affords. ``gram_share``: the
    Gram products' share of the kernel's counted multiply-adds at the largest sample
    (:func:`lin_probe.ntk.choice.structured_gram_share`); ``β`` is at most that share of its time,
    since two close small probes leave ``β`` to timing noise, which ``n²`` then amplifies (the cap
    ``method="auto"`` applies to its own probes, for the same reason). Never predicts that a larger
    probe is cheaper.
    """
    if not samples:
        raise ValueError("ntk_cost_curve needs at least one timed (n, seconds) sample.")
    n2, t2 = max(samples)
    solved: tuple[float, float] | None = None
    if len(samples) >= 2:
        n1, t1 = min(samples)
        det = n1 * n2 * n2 - n2 * n1 * n1
        if det != 0:
            alpha = (t1 * n2 * n2 - t2 * n1 * n1) / det
            beta = (n1 * t2 - n2 * t1) / det
            solved = (alpha, beta) if alpha >= 0 and beta >= 0 else None
    share = 0.0 if gram_share is None else min(max(gram_share, 0.0), 1.0)
    if solved is None:
        return (1.0 - share) * t2 / n2, share * t2 / (n2 * n2)
    alpha, beta = solved
    if gram_share is not None and beta * n2 * n2 > share * t2:
        beta = share * t2 / (n2 * n2)
        alpha = (t2 - beta * n2 * n2) / n2
    return alpha, beta


@dataclass(frozen=True)
class MonitorPlan:
    """What the monitor will do and what that is estimated to cost (seconds, over ``horizon`` steps)."""

    n_probe: int
    schedule: CheckSchedule
    horizon: int
    horizon_known: bool
    planned_s: float
    budget_s: float
    run_s: float
    stop_after_exit: int | None
    fits: bool
    minimal: bool = False
    outputs: str | None = None
    """``"exact"`` or ``"sketch"`` when the budget chose the NTK's outputs (``outputs="auto"`` on a model
    with more outputs than a sketch's directions); ``None`` when the setting decided alone."""
    measured_until: int | None = None
    """The last step measured (checks and shadows stop after its check); ``None``: the whole run."""

    @property
    def share(self) -> float:
        """The planned overhead as a share of the monitored run's wall time."""
        return self.planned_s / (self.run_s + self.planned_s) if self.run_s + self.planned_s > 0 else 0.0

    def line(self) -> str:
        """The one line said at train start."""
        every = self.schedule.every_n_steps
        functional = "0, 1, 2, 4, …" + (f" and every {every:,}" if 0 < every <= self.horizon else "")
        horizon = (
            f"{self.horizon:,} steps" if self.horizon_known else f"{self.horizon:,} steps (length unknown)"
        )
        outputs = {
            "exact": "NTK over every output (the budget affords the exact kernel)",
            "sketch": "NTK over a sketch of the outputs (the exact kernel does not fit the budget)",
            None: None,
        }[self.outputs]
        until = (
            ""
            if self.measured_until is None
            else f"; measures steps 0–{self.measured_until:,} (then checks and shadows stop: the budget)"
        )
        return (
            f"lin_probe plan: probe {self.n_probe}, NTK at steps {self.schedule.ntk_steps_text(self.horizon)}, "
            f"functional checks at {functional}{'' if outputs is None else '; ' + outputs}{until}; "
            f"planned overhead {100 * self.share:.1f} % of {horizon}"
        )

    def state_dict(self) -> dict[str, object]:
        schedule = self.schedule
        return {
            "n_probe": self.n_probe,
            "every_n_steps": schedule.every_n_steps,
            "ntk_every_n_steps": schedule.ntk_every_n_steps,
            "log_spaced": schedule.log_spaced,
            "ntk_log_until": schedule.ntk_log_until,
            "stop_after_exit": self.stop_after_exit,
            "outputs": self.outputs,
            "measured_until": self.measured_until,
        }


def plan_within_budget(
    costs: Costs,
    *,
    horizon: int | None,
    max_overhead: float,
    n_available: int,
    n_probe: int | None = None,
    schedule: CheckSchedule | None = None,
    stop_after_exit: int | None = None,
) -> MonitorPlan:
    """The plan that fits ``max_overhead`` of the run (module docstring).

    ``n_probe`` / ``schedule`` given: kept as they are (only the rest is planned). ``n_available``:
    probe examples there are (a smaller user probe caps the size). ``horizon``: optimizer steps of
    the run (``None``: unknown, :data:`UNKNOWN_HORIZON_STEPS` are planned for).

    Costs timed over an ``outputs="auto"`` sketch (:attr:`Costs.exact_ntk_factor`): the exact kernel
    when its plan fits the budget with a probe as large as the sketch's plan would get (then the
    sketch's noise would buy nothing), the sketch otherwise; :attr:`MonitorPlan.outputs` says which.
    """
    if costs.exact_ntk_factor is not None:
        options = {
            "horizon": horizon,
            "max_overhead": max_overhead,
            "n_available": n_available,
            "n_probe": n_probe,
            "schedule": schedule,
            "stop_after_exit": stop_after_exit,
        }
        sketched = plan_within_budget(costs.settled(exact=False), **options)  # type: ignore[arg-type]
        exact = plan_within_budget(costs.settled(exact=True), **options)  # type: ignore[arg-type]
        if exact.fits and exact.n_probe >= sketched.n_probe:
            return replace(exact, outputs="exact")
        return replace(sketched, outputs="sketch")
    check_max_overhead(max_overhead)
    check_int("n_available", n_available, minimum=1)
    known = horizon is not None and math.isfinite(horizon) and horizon > 0
    steps = int(horizon) if known else UNKNOWN_HORIZON_STEPS  # type: ignore[arg-type]
    run_s = steps * costs.step_s
    budget = max_overhead * run_s / (1.0 - max_overhead)  # share of the *monitored* run's time
    sizes = _sizes(n_probe, n_available)
    stop = STOP_AFTER_EXIT if stop_after_exit is None else stop_after_exit

    def make(
        n: int, chosen: CheckSchedule, *, minimal: bool = False, until: int | None = None
    ) -> MonitorPlan:
        cost = _cost(costs, n, chosen, steps if until is None else min(until, steps))
        fits = cost <= budget
        return MonitorPlan(
            n, chosen, steps, known, cost, budget, run_s, stop, fits, minimal, measured_until=until
        )

    if schedule is not None:  # the user's schedule: only the probe size is planned
        plans = [make(n, schedule) for n in sizes]
        return next((plan for plan in plans if plan.fits), plans[-1])
    for n in sizes:
        core = make(n, _log_schedule(steps))
        if core.fits:
            return make(n, _spend_rest(costs, n, steps, budget - core.planned_s))
    smallest = sizes[-1]
    powers = [1 << k for k in range(steps.bit_length()) if 1 << k <= steps]
    for until in reversed(powers):  # cut the late log-spaced NTK checks first
        plan = make(smallest, _log_schedule(steps, ntk_until=until))
        if plan.fits:
            return plan
    step_zero_ntk = _log_schedule(steps, ntk_until=0)
    for until in [power for power in reversed(powers) if MIN_MEASURED_STEPS <= power < steps]:
        plan = make(smallest, step_zero_ntk, until=until)  # then the steps measured: fewer shadow steps
        if plan.fits:
            return plan
    until = MIN_MEASURED_STEPS if steps > MIN_MEASURED_STEPS else None
    return make(smallest, step_zero_ntk, minimal=True, until=until)


def _sizes(n_probe: int | None, n_available: int) -> list[int]:
    if n_probe is not None:
        return [min(n_probe, n_available)]
    return sorted({min(n, n_available) for n in PROBE_SIZES}, reverse=True)


def _log_schedule(horizon: int, *, ntk_until: int | None = None) -> CheckSchedule:
    """Functional and NTK checks at 0, 1, 2, 4, … (NTK up to ``ntk_until``; default: the whole run)."""
    return CheckSchedule(0, 0, True, horizon if ntk_until is None else ntk_until)


def _spend_rest(costs: Costs, n: int, horizon: int, rest_s: float) -> CheckSchedule:
    """The core log-spaced plan plus linear checks paid from ``rest_s``: half on functional checks,
    half on NTK checks (an NTK interval a multiple of the functional one, so NTKs fall on checks)."""
    every = _round_up(horizon * costs.functional_s(n) / (rest_s / 2)) if rest_s > 0 else 0
    if every == 0 or every > horizon:
        return _log_schedule(horizon)
    ntk_every = _round_up(horizon * costs.ntk_s(n) / (rest_s / 2))
    ntk_every = every * math.ceil(ntk_every / every)
    return CheckSchedule(every, ntk_every if ntk_every <= horizon else 0, True, horizon)


def _round_up(value: float) -> int:
    """The smallest 1, 2 or 5 × 10^k at or above ``value`` (intervals a reader takes in at a glance)."""
    if not math.isfinite(value):
        return 0
    value = max(value, 1.0)
    exponent = 10 ** math.floor(math.log10(value))
    for factor in (*_ROUND, 10):
        if factor * exponent >= value - 1e-9:
            return int(factor * exponent)
    return int(10 * exponent)  # pragma: no cover - the loop ends at 10


def _cost(costs: Costs, n: int, schedule: CheckSchedule, horizon: int) -> float:
    """Start-up (Θ_0, reused by the step-0 check) plus the checks plus the shadows' steps, plus one
    NTK for the verdict's diagnosis (read from the kernel at the exit: taken when that check had
    none), plus the figures: :data:`FIGURE_DRAWS` draws, and over more than one epoch the redraws'
    :data:`EPOCH_FIGURE_SHARE` of the measured steps (``horizon``: the steps measured)."""
    functional, ntk = schedule.count(horizon)
    startup = costs.ntk_s(n)
    diagnosis = costs.ntk_s(n)
    figures = FIGURE_DRAWS * costs.figure_s
    if costs.steps_per_epoch is not None and horizon > costs.steps_per_epoch:
        figures += EPOCH_FIGURE_SHARE * horizon * costs.step_s
    return (
        startup
        + (ntk - 1) * costs.ntk_s(n)
        + diagnosis
        + functional * costs.functional_s(n)
        + costs.shadow_total_s(horizon)
        + figures
    )


def after_verdict_s(costs: Costs, n: int, schedule: CheckSchedule, step: int, checks: int) -> float:
    """What measuring on after a verdict at ``step`` costs: the next ``checks`` checks (NTKs where the
    schedule has them) and the shadow steps up to the last of them (the figure is drawn either way)."""
    steps, last = [], step
    for _ in range(checks):
        last = schedule.next_functional(last)
        steps.append(last)
    ntks = sum(schedule.ntk(s) for s in steps)
    shadows = costs.shadow_total_s(last) - costs.shadow_total_s(step)
    return checks * costs.functional_s(n) + ntks * costs.ntk_s(n) + shadows


def costs_from_run(
    previous: Costs,
    *,
    steps: int,
    user_s: float,
    ntk_samples: list[tuple[int, float]],
    functional_samples: list[tuple[int, float]],
    shadow_samples: list[float],
    step_samples: list[float] | None = None,
) -> Costs:
    """``previous`` with what the run measured so far: the user's seconds per step, NTK checks at the
    probe size, functional checks and shadow steps.

    The step: the median of ``step_samples`` (each step's wall time less the monitor's own) when
    there are :data:`MIN_STEP_SAMPLES`, else ``user_s / steps`` (wall time less the monitor's, since
    train start). Why the median: a process's first steps carry one-off costs (lazy optimizer state,
    first backward, the logger's first write): on the digits MLP the first step took 245 ms of
    ``user_s`` against ~1.5 ms for the next ones (ad hoc), so the mean over 8 steps planned a run 24×
    too long, and a plan that spent 24× the budget."""
    updated = previous
    if step_samples is not None and len(step_samples) >= MIN_STEP_SAMPLES:
        updated = replace(updated, step_s=statistics.median_high(step_samples))
    elif steps > 0 and user_s > 0:
        updated = replace(updated, step_s=user_s / steps)
    if ntk_samples:
        n, seconds = ntk_samples[-1]
        predicted = previous.ntk_s(n)
        scale = seconds / predicted if predicted > 0 else 1.0
        updated = replace(
            updated, ntk_linear=previous.ntk_linear * scale, ntk_quadratic=previous.ntk_quadratic * scale
        )
    if functional_samples:
        n, seconds = min(functional_samples, key=lambda sample: sample[1])
        updated = replace(updated, functional_per_example_s=seconds / n)
    if shadow_samples:
        updated = replace(updated, shadow_step_s=statistics.median_high(shadow_samples))
    return updated


__all__ = [
    "EPOCH_FIGURE_SHARE",
    "FIGURE_DRAWS",
    "FIGURE_PRIOR_S",
    "MIN_MEASURED_STEPS",
    "MIN_STEP_SAMPLES",
    "PROBE_SIZES",
    "STOP_AFTER_EXIT",
    "UNKNOWN_HORIZON_STEPS",
    "Costs",
    "MonitorPlan",
    "OverBudgetWarning",
    "after_verdict_s",
    "check_max_overhead",
    "costs_from_run",
    "ntk_cost_curve",
    "plan_within_budget",
]
