"""``BudgetKeeper``: the plan at start, its warnings, the one re-plan from measured seconds, resume."""

from __future__ import annotations

from lin_probe.monitor.budget import Costs
from lin_probe.monitor.budget_keeper import REPLAN_AT_STEP, BudgetKeeper, planned_stop
from lin_probe.monitor.schedule import CheckSchedule


def cheap(**overrides: float) -> Costs:
    values = dict(
        step_s=0.1,
        ntk_linear=1e-4,
        ntk_quadratic=1e-6,
        functional_per_example_s=1e-5,
        shadow_step_s=1e-4,
        shadow_cached_s=1e-5,
    )
    values.update(overrides)
    return Costs(**values)  # type: ignore[arg-type]


def keeper(**kwargs: object) -> tuple[BudgetKeeper, list[str], list[str]]:
    warnings: list[str] = []
    infos: list[str] = []
    options = {"n_probe": None, "schedule": None, "stop_after_exit": None}
    options.update(kwargs)
    made = BudgetKeeper(0.05, warn=warnings.append, info=infos.append, **options)  # type: ignore[arg-type]
    return made, warnings, infos


def test_a_plan_that_fits_is_said_in_one_line_and_warns_nothing() -> None:
    budget, warnings, infos = keeper()
    plan = budget.start(cheap(), horizon=2000, n_available=256)
    assert plan.fits and warnings == []
    assert infos == [plan.line()] and infos[0].startswith(
        "lin_probe plan: probe 256, NTK at steps 0, 1, 2, 4"
    )


def test_even_the_minimal_plan_over_budget_warns_once_with_the_numbers() -> None:
    budget, warnings, _ = keeper()
    plan = budget.start(cheap(shadow_step_s=0.04), horizon=1000, n_available=256)
    assert plan.minimal and len(warnings) == 1
    message = warnings[0]
    assert "minimal plan" in message and "probe 32" in message
    assert "100.00 ms" in message and "40.00 ms" in message and "(40 %)" in message
    assert "max_overhead=0.05" in message and "max_overhead=None" in message
    assert plan.measured_until == 256 and "measuring steps 0–256" in message


def test_explicit_settings_over_budget_warn_naming_them_and_are_kept() -> None:
    schedule = CheckSchedule(1, None, True)
    budget, warnings, _ = keeper(n_probe=256, schedule=schedule)
    plan = budget.start(cheap(ntk_quadratic=1e-3), horizon=100, n_available=256)
    assert plan.schedule == schedule and plan.n_probe == 256
    assert (
        len(warnings) == 1 and "settings (probe 256" in warnings[0] and "n_probe/every_n_steps" in warnings[0]
    )
    assert planned_stop(plan, None, budget.planned_anything) is None  # all set by hand: measure on


def test_a_run_over_budget_at_start_and_at_the_replan_is_warned_once() -> None:
    """An explicit ``n_probe=256`` too dear for the run: the start warns; the re-plan from the run's
    own faster steps is still the minimal plan, over the budget again, and says nothing more."""
    budget, warnings, _ = keeper(n_probe=256)
    first = budget.start(cheap(step_s=0.1, ntk_quadratic=1e-3), horizon=5000, n_available=256)
    assert not first.fits and len(warnings) == 1
    for _step in (1, 2, 4):
        budget.record_check(first.n_probe, 0.001, 5.0)
        budget.record_shadow_step(1e-4)
    assert budget.replan(REPLAN_AT_STEP, user_s=REPLAN_AT_STEP * 0.01) is None
    assert not budget.plan.fits  # type: ignore[union-attr]
    assert len(warnings) == 1


def test_a_replan_over_a_budget_the_start_plan_fitted_warns_then() -> None:
    """The pilot's step time misled the start plan (it fitted); the run's own steps are 10× faster and
    its NTKs 20× dearer, so the re-plan cannot fit: that is the run's first and only warning."""
    budget, warnings, _ = keeper(n_probe=256)
    first = budget.start(cheap(step_s=0.1, ntk_quadratic=1e-4), horizon=5000, n_available=256)
    assert first.fits and not warnings
    for _step in (1, 2, 4):
        budget.record_check(first.n_probe, 0.001, 5.0)
        budget.record_shadow_step(1e-4)
    plan = budget.replan(REPLAN_AT_STEP, user_s=REPLAN_AT_STEP * 0.01)
    assert plan is not None and not plan.fits
    assert len(warnings) == 1 and "settings (probe 256" in warnings[0]


def test_a_slower_measured_step_replans_once_with_more_checks() -> None:
    """The pilot's step (forward + backward) was 10× faster than the run's real step: the budget grows
    tenfold, so the re-plan at step 8 checks more often; it happens once."""
    budget, _, infos = keeper()
    first = budget.start(cheap(step_s=0.01, ntk_quadratic=1e-5), horizon=5000, n_available=256)
    for _step in (1, 2, 4):
        budget.record_check(first.n_probe, 0.001, 0.01)
        budget.record_shadow_step(1e-4)
    assert budget.replan(REPLAN_AT_STEP - 1, user_s=0.7) is None  # too early
    plan = budget.replan(REPLAN_AT_STEP, user_s=REPLAN_AT_STEP * 0.1)
    assert plan is not None and plan.n_probe == first.n_probe  # the probe never changes
    first_f, first_ntk = first.schedule.count(5000)
    new_f, new_ntk = plan.schedule.count(5000)
    assert new_f + new_ntk > first_f + first_ntk
    assert infos[-1].startswith(
        f"lin_probe plan (re-planned at step {REPLAN_AT_STEP}): probe {first.n_probe}"
    )
    assert budget.replan(16, user_s=1.6) is None


def test_a_resumed_run_keeps_its_saved_plan_and_does_not_replan() -> None:
    budget, _, _ = keeper()
    plan = budget.start(cheap(), horizon=2000, n_available=256)
    state = budget.state_dict()
    resumed, _, _ = keeper()
    schedule, stop, until = resumed.load_state_dict(state)  # type: ignore[misc]
    assert schedule == plan.schedule and stop == plan.stop_after_exit and until is None
    assert resumed.replanned and resumed.state_dict()["plan"] == state["plan"]
    assert keeper()[0].load_state_dict({}) is None


def test_a_resumed_run_keeps_the_last_step_its_plan_measures() -> None:
    """A run that stays linear at a shadow costlier than the budget affords measures steps 0-512 of
    5,000 (``tests/monitor/test_budget.py``); a resumed run stops there too, and a checkpoint from
    before the field existed measures the whole run, as it did."""
    budget, _, _ = keeper()
    plan = budget.start(cheap(shadow_step_s=0.03, shadow_cached_s=0.001), horizon=5000, n_available=256)
    assert plan.measured_until == 512
    state = budget.state_dict()
    assert keeper()[0].load_state_dict(state).measured_until == 512  # type: ignore[union-attr]
    old = {"plan": {k: v for k, v in state["plan"].items() if k != "measured_until"}}
    assert keeper()[0].load_state_dict(old).measured_until is None  # type: ignore[union-attr]


def test_the_replan_reads_the_costs_of_the_outputs_chosen_at_start() -> None:
    """Exact chosen (C/S = 4 fits): the kept costs are the exact kernel's, and the choice is settled
    (the re-plan cannot switch to the sketch: Θ_t − Θ_0 needs one set of outputs for the run)."""
    budget, _, _ = keeper()
    plan = budget.start(cheap(exact_ntk_factor=4.0), horizon=2000, n_available=256)
    assert plan.outputs == "exact"
    assert budget.costs is not None and budget.costs.exact_ntk_factor is None
    assert budget.costs.ntk_linear == 4e-4 and budget.costs.ntk_quadratic == 4e-6
