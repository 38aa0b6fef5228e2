"""``BudgetKeeper``: holds a run to its overhead budget — plans at the start, re-plans once from the run.

The planning itself is pure (:func:`lin_probe.monitor.budget.plan_within_budget`); this object keeps
what a run needs around it: the user's explicit settings (kept, never planned), the plan in force,
the seconds its checks and shadow steps actually took, the one re-plan once :data:`REPLAN_AT_STEP`
steps have been timed, the warnings (settings over the budget; even the minimal plan over it) and a
flat ``state_dict`` so a resumed run keeps its schedule. Lightning-free: the callback reads the
horizon and batch size from the Trainer and hands them in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Final, NamedTuple

from lin_probe.monitor.budget import (
    Costs,
    MonitorPlan,
    after_verdict_s,
    check_max_overhead,
    costs_from_run,
    plan_within_budget,
)
from lin_probe.monitor.schedule import CheckSchedule

REPLAN_AT_STEP: Final[int] = 8
"""The re-plan happens at the first check after this many steps: the user's real step time (data
loading, optimizer, logging included) and the checks' own are known by then, and the log-spaced
checks that matter most (0, 1, 2, 4, 8) are identical in every plan."""


class SavedPlan(NamedTuple):
    """What a resumed run keeps of the plan it started with."""

    schedule: CheckSchedule
    stop_after_exit: int | None
    measured_until: int | None


class BudgetKeeper:
    """The plan of one run under ``max_overhead`` (module docstring).

    ``n_probe`` / ``schedule``: the user's explicit settings (``None``: planned). ``warn`` takes each
    warning once; ``info`` the plan's line.
    """

    def __init__(
        self,
        max_overhead: float,
        *,
        n_probe: int | None,
        schedule: CheckSchedule | None,
        stop_after_exit: int | None,
        warn: Callable[[str], None],
        info: Callable[[str], None],
    ) -> None:
        check_max_overhead(max_overhead)
        self.max_overhead = max_overhead
        self.n_probe, self.user_schedule, self.user_stop = n_probe, schedule, stop_after_exit
        self.warn, self.info = warn, info
        self.plan: MonitorPlan | None = None
        self.costs: Costs | None = None
        self.horizon: int | None = None
        self.n_available = 1
        self.replanned = False
        self._saved_plan: dict[str, Any] | None = None
        self.shadow_seconds: list[float] = []
        self.user_step_seconds: list[float] = []
        self.ntk_seconds: list[tuple[int, float]] = []
        self.functional_seconds: list[tuple[int, float]] = []

    @property
    def planned_anything(self) -> bool:
        return self.n_probe is None or self.user_schedule is None

    def start(self, costs: Costs, *, horizon: int | None, n_available: int) -> MonitorPlan:
        """The plan at train start, said in one line; warns when it does not fit (module docstring)."""
        self.horizon, self.n_available = horizon, n_available
        self.plan = self._plan(costs, self.n_probe)
        # The outputs are settled for the run (Θ_t − Θ_0 compares kernels over the same outputs): the
        # re-plan reads the costs of the ones chosen.
        costs = costs.settled(exact=self.plan.outputs == "exact")
        self.costs = costs
        self.info(self.plan.line())
        self._warn_if_over(self.plan, costs)
        return self.plan

    def adopt(self, plan: MonitorPlan) -> None:
        """The plan in force from now on (in DDP, rank zero's: the caller broadcasts it)."""
        self.plan = plan

    def record_check(self, n: int, functional_s: float, ntk_s: float | None) -> None:
        self.functional_seconds.append((n, functional_s))
        if ntk_s is not None:
            self.ntk_seconds.append((n, ntk_s))

    def record_shadow_step(self, seconds: float) -> None:
        if len(self.shadow_seconds) < 64:  # the first epoch's cost is what the plan charges per step
            self.shadow_seconds.append(seconds)

    def record_user_step(self, seconds: float) -> None:
        """One of the user's optimizer steps (wall time between two step ends, less the monitor's)."""
        if len(self.user_step_seconds) < 64:
            self.user_step_seconds.append(seconds)

    def affords_after_verdict(self, step: int, spent_s: float) -> bool:
        """Whether the plan's checks after a verdict at ``step`` fit in its budget, ``spent_s`` (the
        monitor's seconds so far) already spent; always, without a plan or a stop after the exit."""
        plan, costs = self.plan, self.costs
        if plan is None or costs is None or plan.stop_after_exit is None:
            return True
        more = after_verdict_s(costs, plan.n_probe, plan.schedule, step, plan.stop_after_exit)
        return spent_s + more <= plan.budget_s

    def replan(self, step: int, user_s: float) -> MonitorPlan | None:
        """Once, at the first check after :data:`REPLAN_AT_STEP` steps: the plan from the run's own
        seconds (``user_s``: the wall time since train start minus the monitor's). The probe stays;
        the schedule is planned again unless the user set it. Returns the new plan when it changed."""
        if self.replanned or self.plan is None or self.costs is None or step < REPLAN_AT_STEP:
            return None
        self.replanned = True
        measured = costs_from_run(
            self.costs,
            steps=step,
            user_s=user_s,
            ntk_samples=[s for s in self.ntk_seconds if s[0] == self.plan.n_probe][1:],  # not Θ_0's reuse
            functional_samples=self.functional_seconds,
            shadow_samples=self.shadow_seconds,
            step_samples=self.user_step_seconds,
        )
        self.costs = measured
        plan = replace(self._plan(measured, self.plan.n_probe), outputs=self.plan.outputs)  # settled at start
        changed = (plan.schedule, plan.measured_until) != (self.plan.schedule, self.plan.measured_until)
        self.plan = plan
        if not changed:
            return None
        self.info(plan.line().replace("lin_probe plan:", f"lin_probe plan (re-planned at step {step}):"))
        self._warn_if_over(plan, measured)
        return plan

    def state_dict(self) -> dict[str, Any]:
        plan = self._saved_plan if self.plan is None else self.plan.state_dict()
        return {"plan": plan, "replanned": self.replanned}

    def load_state_dict(self, state: Mapping[str, Any]) -> SavedPlan | None:
        """The saved schedule, stop-after-exit and last measured step (``None`` when no plan was
        saved). A resumed run keeps them: its timings were the first run's, and there is nothing left
        to re-plan from."""
        self.replanned = True
        saved = state.get("plan")
        self._saved_plan = None if saved is None else dict(saved)
        if saved is None:
            return None
        schedule = CheckSchedule(
            int(saved["every_n_steps"]),
            None if saved["ntk_every_n_steps"] is None else int(saved["ntk_every_n_steps"]),
            bool(saved["log_spaced"]),
            None if saved["ntk_log_until"] is None else int(saved["ntk_log_until"]),
        )
        stop = saved.get("stop_after_exit")
        until = saved.get("measured_until")  # absent from checkpoints before it existed: the whole run
        measured_until = None if until is None else int(until)
        if self.user_stop is not None or not self.planned_anything or stop is None:
            return SavedPlan(schedule, self.user_stop, measured_until)
        return SavedPlan(schedule, int(stop), measured_until)

    def _plan(self, costs: Costs, n_probe: int | None) -> MonitorPlan:
        return plan_within_budget(
            costs,
            horizon=self.horizon,
            max_overhead=self.max_overhead,
            n_available=self.n_available,
            n_probe=n_probe,
            schedule=self.user_schedule,
            stop_after_exit=self.user_stop,
        )

    def _warn_if_over(self, plan: MonitorPlan, costs: Costs) -> None:
        if plan.fits:
            return
        budget = f"max_overhead={self.max_overhead:g}"
        share = f"{100 * plan.share:.0f} %"
        if self.n_probe is not None or self.user_schedule is not None:  # a setting of the user's is in it
            self.warn(
                f"LinearRegimeMonitor's settings ({self._settings(plan)}) are estimated to cost {share} of "
                f"this run's wall time, over the budget {budget}. Leave n_probe/every_n_steps unset to let "
                "the budget choose, or pass max_overhead=None to keep these settings without this warning."
            )
            return
        per_step = costs.shadow_step_s / costs.step_s if costs.step_s > 0 else float("inf")
        self.warn(
            f"Even the monitor's minimal plan ({self._settings(plan)}) is estimated to cost {share} of "
            f"this run's wall time, over the budget {budget}: a training step takes {1e3 * costs.step_s:.2f} "
            f"ms and the shadow adds {1e3 * costs.shadow_step_s:.2f} ms to each ({100 * per_step:.0f} %) "
            f"until f_0's outputs are cached, and one NTK on the probe takes {costs.ntk_s(plan.n_probe):.2f} "
            "s. Running the minimal plan; pass max_overhead=None to silence this, or a larger max_overhead."
        )

    def _settings(self, plan: MonitorPlan) -> str:
        schedule = plan.schedule
        until = "" if plan.measured_until is None else f", measuring steps 0–{plan.measured_until:,}"
        return (
            f"probe {plan.n_probe}, NTK at steps {schedule.ntk_steps_text(plan.horizon)}, functional checks "
            f"every {schedule.every_n_steps or 'log-spaced step'}{until}"
        )


def planned_stop(plan: MonitorPlan | None, user_stop: int | None, planned_anything: bool) -> int | None:
    """Checks to keep measuring after the verdict: the user's, else the plan's when it planned anything
    (a user who set the probe and the schedule keeps measuring, as without a budget)."""
    if user_stop is not None or plan is None or not planned_anything:
        return user_stop
    return plan.stop_after_exit


__all__ = ["REPLAN_AT_STEP", "BudgetKeeper", "SavedPlan", "planned_stop"]
