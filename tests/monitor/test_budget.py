"""The overhead budget's planner: plans that fit, the largest probe that does, the minimal plan when none does.

Every plan's cost is recounted here by walking the run step by step through the schedule's own
``functional``/``ntk`` predicates (not ``CheckSchedule.count``, which the planner uses), and
compared with the budget ``max_overhead/(1 − max_overhead) × run``.
"""

from __future__ import annotations

import math

import pytest

from lin_probe.monitor.budget import (
    MIN_MEASURED_STEPS,
    MIN_STEP_SAMPLES,
    PROBE_SIZES,
    STOP_AFTER_EXIT,
    UNKNOWN_HORIZON_STEPS,
    Costs,
    MonitorPlan,
    after_verdict_s,
    check_max_overhead,
    costs_from_run,
    ntk_cost_curve,
    plan_within_budget,
)
from lin_probe.monitor.schedule import CheckSchedule


def costs(**overrides: float) -> Costs:
    values = {
        "step_s": 0.1,
        "ntk_linear": 1e-3,
        "ntk_quadratic": 1e-5,
        "functional_per_example_s": 1e-5,
        "shadow_step_s": 1e-4,
        "shadow_cached_s": 1e-5,
        "steps_per_epoch": None,
    }
    values.update(overrides)
    return Costs(**values)  # type: ignore[arg-type]


def walked_cost(c: Costs, n: int, schedule: CheckSchedule, horizon: int) -> float:
    """Start-up Θ_0 (reused at step 0), every later NTK, the diagnosis's NTK at the verdict, every
    functional check, every shadow step, two figures (first epoch end, last) and, over several
    epochs, the epoch ends' redraws at their 1-% share of the steps measured."""
    total = 2 * c.ntk_s(n) + 2 * c.figure_s
    if c.steps_per_epoch is not None and horizon > c.steps_per_epoch:
        total += 0.01 * horizon * c.step_s
    for step in range(horizon + 1):
        if schedule.functional(step):
            total += c.functional_s(n)
            if step > 0 and schedule.ntk(step):
                total += c.ntk_s(n)
    epoch = horizon if c.steps_per_epoch is None else c.steps_per_epoch
    return total + sum(c.shadow_step_s if s < epoch else c.shadow_cached_s for s in range(horizon))


def budget_of(c: Costs, horizon: int, share: float) -> float:
    return share / (1 - share) * horizon * c.step_s


def test_cost_curve_recovers_a_linear_plus_quadratic_law() -> None:
    alpha, beta = 2e-3, 3e-5
    samples = [(n, alpha * n + beta * n * n) for n in (8, 16)]
    fitted = ntk_cost_curve(samples)
    assert fitted == pytest.approx((alpha, beta), rel=1e-9)


def test_cost_curve_from_noisy_samples_never_predicts_a_cheaper_larger_probe() -> None:
    """16 examples timed *faster* than 8 (noise): the solved β would be negative; the curve stays ≥ 0
    and non-decreasing, and is at least the pure-linear extrapolation of the slower sample."""
    alpha, beta = ntk_cost_curve([(8, 0.010), (16, 0.012)])
    assert alpha >= 0 and beta >= 0
    predicted = [alpha * n + beta * n * n for n in (16, 32, 64, 256)]
    assert predicted == sorted(predicted)
    assert alpha * 256 + beta * 256**2 >= 0.012 * 256 / 16 * 0.5


def test_a_fixed_cost_per_call_gives_the_linear_curve_through_the_larger_sample() -> None:
    """``t(n) = 0.05 + 0.005·n`` (a per-call cost, as planning and one recorded example are): the
    solved β is negative, and the curve is the line through ``(8, 0.09)``; the quadratic through it
    the planner used to take predicted 5.8 s at 64 examples, where this law gives 0.37 s."""
    samples = [(n, 0.05 + 0.005 * n) for n in (4, 8)]
    alpha, beta = ntk_cost_curve(samples)
    assert (alpha, beta) == pytest.approx((0.09 / 8, 0.0), rel=1e-12)
    assert 0.37 <= alpha * 64 + beta * 64**2 <= 2 * 0.37  # pessimistic, by the fixed cost's share only


def test_the_grams_share_goes_on_the_quadratic_term_when_the_solve_fails() -> None:
    alpha, beta = ntk_cost_curve([(4, 0.07), (8, 0.09)], gram_share=0.25)
    assert (alpha, beta) == pytest.approx((0.75 * 0.09 / 8, 0.25 * 0.09 / 64), rel=1e-12)
    assert alpha * 8 + beta * 64 == pytest.approx(0.09, rel=1e-12)  # still through the larger sample


def test_the_quadratic_term_is_capped_by_the_grams_share() -> None:
    """Samples of ``α = 1e-3, β = 1e-3``: at 8 examples β·n² is 0.064 s of 0.072 s (89 %); a counted
    share of 10 % caps it at 0.0072 s, the rest going to α, and a share above 89 % leaves the solve."""
    samples = [(n, 1e-3 * n + 1e-3 * n * n) for n in (4, 8)]
    t2 = samples[-1][1]
    alpha, beta = ntk_cost_curve(samples, gram_share=0.1)
    assert beta == pytest.approx(0.1 * t2 / 64, rel=1e-12)
    assert alpha == pytest.approx(0.9 * t2 / 8, rel=1e-12)
    assert ntk_cost_curve(samples, gram_share=0.95) == pytest.approx((1e-3, 1e-3), rel=1e-9)


def test_a_cheap_monitor_gets_the_largest_probe_and_linear_checks_within_budget() -> None:
    c, horizon = costs(ntk_linear=1e-4, ntk_quadratic=1e-6), 2000  # NTK at 256 examples: 0.09 s
    plan = plan_within_budget(c, horizon=horizon, max_overhead=0.05, n_available=256)
    assert plan.n_probe == 256 and plan.fits and not plan.minimal
    assert 0 < plan.schedule.every_n_steps <= horizon
    assert walked_cost(c, 256, plan.schedule, horizon) <= budget_of(c, horizon, 0.05) * (1 + 1e-9)
    assert plan.planned_s == pytest.approx(walked_cost(c, 256, plan.schedule, horizon), rel=1e-9)
    assert plan.stop_after_exit == STOP_AFTER_EXIT
    for interval in (plan.schedule.every_n_steps, plan.schedule.ntk_every_n_steps):
        if interval:
            mantissa = interval / 10 ** math.floor(math.log10(interval))
            assert mantissa in (1, 2, 5) or interval % plan.schedule.every_n_steps == 0


@pytest.mark.parametrize("quadratic", [1e-5, 1e-4, 1e-3, 2e-3])
def test_the_probe_is_the_largest_whose_log_spaced_plan_fits(quadratic: float) -> None:
    c, horizon = costs(ntk_quadratic=quadratic), 1000
    plan = plan_within_budget(c, horizon=horizon, max_overhead=0.05, n_available=256)
    budget = budget_of(c, horizon, 0.05)
    log_only = CheckSchedule(0, 0, True, horizon)
    assert walked_cost(c, plan.n_probe, plan.schedule, horizon) <= budget * (1 + 1e-9)
    larger = [n for n in PROBE_SIZES if n > plan.n_probe]
    if larger:  # the next size up does not fit even with log-spaced checks only
        assert walked_cost(c, min(larger), log_only, horizon) > budget


def test_when_no_probe_fits_late_ntk_checks_are_cut_first() -> None:
    # Budget 0.05/0.95 × 4096 × 0.1 s = 21.6 s; an NTK at 32 examples costs 2 s, 14 log-spaced ones 28 s.
    c, horizon = costs(ntk_linear=0.0, ntk_quadratic=2.0 / 32**2), 4096
    plan = plan_within_budget(c, horizon=horizon, max_overhead=0.05, n_available=256)
    assert plan.n_probe == 32 and plan.fits
    until = plan.schedule.ntk_log_until
    assert until is not None and 0 < until < horizon
    assert walked_cost(c, 32, plan.schedule, horizon) <= budget_of(c, horizon, 0.05) * (1 + 1e-9)
    one_more = CheckSchedule(0, 0, True, until * 2)
    assert walked_cost(c, 32, one_more, horizon) > budget_of(c, horizon, 0.05)


def test_a_shadow_costlier_than_the_budget_gives_the_minimal_plan_flagged() -> None:
    c = costs(shadow_step_s=0.05)  # half a training step on every step
    plan = plan_within_budget(c, horizon=500, max_overhead=0.05, n_available=256)
    assert plan.minimal and not plan.fits
    assert plan.n_probe == min(PROBE_SIZES)
    assert [s for s in range(501) if plan.schedule.ntk(s)] == [0]
    assert [s for s in range(501) if plan.schedule.functional(s)] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert plan.measured_until == MIN_MEASURED_STEPS == 256  # and no shadow steps after it
    assert plan.planned_s == pytest.approx(walked_cost(c, plan.n_probe, plan.schedule, 256), rel=1e-9)
    assert plan.share > 0.05


def test_cached_f0_outputs_after_the_first_epoch_make_a_long_run_fit() -> None:
    """The same shadow costs 30 % per step uncached; cached after one 100-step epoch of 5,000 steps.
    Uncached, the whole run does not fit: only its first 512 steps are measured (next test)."""
    uncached = costs(shadow_step_s=0.03, shadow_cached_s=0.001)
    cached = costs(shadow_step_s=0.03, shadow_cached_s=0.001, steps_per_epoch=100)
    assert (
        plan_within_budget(uncached, horizon=5000, max_overhead=0.05, n_available=256).measured_until == 512
    )
    plan = plan_within_budget(cached, horizon=5000, max_overhead=0.05, n_available=256)
    assert plan.fits and plan.measured_until is None
    assert walked_cost(cached, plan.n_probe, plan.schedule, 5000) <= budget_of(cached, 5000, 0.05) * (
        1 + 1e-9
    )


def test_a_shadow_that_busts_the_budget_over_the_whole_run_is_followed_for_the_longest_run_that_fits() -> (
    None
):
    """A run that stays linear pays the shadow every step. 30 ms a 100-ms step over 5,000 steps: the
    budget (5 %: 26.3 s) affords ~870 shadow steps after the two NTKs and the checks, so the plan
    measures steps 0-512, the largest power of two under that (1,024 would cost 30.7 s + checks)."""
    c = costs(shadow_step_s=0.03, shadow_cached_s=0.001)
    plan = plan_within_budget(c, horizon=5000, max_overhead=0.05, n_available=256)
    budget = budget_of(c, 5000, 0.05)
    assert plan.fits and not plan.minimal and plan.measured_until == 512
    assert plan.planned_s == pytest.approx(walked_cost(c, plan.n_probe, plan.schedule, 512), rel=1e-9)
    assert plan.planned_s <= budget < walked_cost(c, plan.n_probe, plan.schedule, 1024)
    assert "measures steps 0–512" in plan.line()
    # the probe and the NTK schedule were cut first: the smallest probe, the NTK at step 0 only
    assert plan.n_probe == min(PROBE_SIZES) and [s for s in range(513) if plan.schedule.ntk(s)] == [0]


def test_every_plan_is_charged_its_figures() -> None:
    """Two draws (the first epoch end's, the last) in one epoch; over several epochs, also the epoch
    ends' redraws at 1 % of the steps measured. A 100-ms step, 2,000 steps: 2 × 0.3 s, + 2 s."""
    schedule = CheckSchedule(100, 0, True)
    one_epoch = plan_within_budget(
        costs(), horizon=2000, max_overhead=0.05, n_available=64, schedule=schedule
    )
    free = plan_within_budget(
        costs(figure_s=0.0), horizon=2000, max_overhead=0.05, n_available=64, schedule=schedule
    )
    assert one_epoch.planned_s - free.planned_s == pytest.approx(2 * 0.3)
    # several epochs (cached shadow steps made as dear as uncached, so only the figures differ)
    same = {"shadow_cached_s": 1e-4, "figure_s": 0.0}
    options = {"horizon": 2000, "max_overhead": 0.05, "n_available": 64, "schedule": schedule}
    epochs = plan_within_budget(costs(steps_per_epoch=500, **same), **options)
    single = plan_within_budget(costs(**same), **options)
    assert epochs.planned_s - single.planned_s == pytest.approx(0.01 * 2000 * 0.1)


def test_runs_measured_whole_when_short_or_when_the_user_set_the_schedule() -> None:
    c = costs(shadow_step_s=0.05)
    short = plan_within_budget(c, horizon=MIN_MEASURED_STEPS, max_overhead=0.05, n_available=256)
    assert short.minimal and short.measured_until is None
    schedule = CheckSchedule(10, 0, True)
    kept = plan_within_budget(c, horizon=5000, max_overhead=0.05, n_available=256, schedule=schedule)
    assert kept.measured_until is None and not kept.fits  # explicit settings win; the caller warns


def test_explicit_settings_are_kept_and_only_estimated() -> None:
    c = costs(ntk_quadratic=1e-3)
    schedule = CheckSchedule(1, None, True)
    plan = plan_within_budget(
        c, horizon=300, max_overhead=0.05, n_available=256, n_probe=128, schedule=schedule
    )
    assert plan.n_probe == 128 and plan.schedule == schedule and not plan.fits
    assert plan.planned_s == pytest.approx(walked_cost(c, 128, schedule, 300), rel=1e-9)
    only_schedule = plan_within_budget(c, horizon=300, max_overhead=0.05, n_available=40, schedule=schedule)
    assert only_schedule.schedule == schedule and only_schedule.n_probe <= 40


def test_a_small_user_probe_caps_the_size() -> None:
    plan = plan_within_budget(costs(), horizon=100, max_overhead=0.05, n_available=20)
    assert plan.n_probe == 20


def test_an_unknown_horizon_plans_for_a_fixed_length_and_says_so() -> None:
    plan = plan_within_budget(costs(), horizon=None, max_overhead=0.05, n_available=256)
    assert plan.horizon == UNKNOWN_HORIZON_STEPS and not plan.horizon_known
    assert "length unknown" in plan.line()


def test_the_plan_line_names_probe_ntk_steps_and_overhead() -> None:
    plan = MonitorPlan(
        n_probe=128,
        schedule=CheckSchedule(0, 0, True, 512),
        horizon=2000,
        horizon_known=True,
        planned_s=4.0,
        budget_s=5.0,
        run_s=96.0,
        stop_after_exit=3,
        fits=True,
    )
    assert plan.line() == (
        "lin_probe plan: probe 128, NTK at steps 0, 1, 2, 4, …, 512, functional checks at 0, 1, 2, 4, …; "
        "planned overhead 4.0 % of 2,000 steps"
    )


def test_costs_from_run_take_the_measured_step_and_rescale_the_ntk_curve() -> None:
    start = costs(ntk_linear=1e-3, ntk_quadratic=1e-5)
    measured = costs_from_run(
        start,
        steps=10,
        user_s=3.0,
        ntk_samples=[(64, 2 * start.ntk_s(64))],
        functional_samples=[(64, 0.064), (64, 0.032)],
        shadow_samples=[0.01, 0.02, 0.03],
    )
    assert measured.step_s == pytest.approx(0.3)
    assert measured.ntk_s(64) == pytest.approx(2 * start.ntk_s(64))
    assert measured.ntk_s(128) == pytest.approx(2 * start.ntk_s(128))
    assert measured.functional_per_example_s == pytest.approx(0.032 / 64)
    assert measured.shadow_step_s == pytest.approx(0.02)


def test_the_step_time_is_the_median_of_the_timed_steps_not_a_warm_up_inflated_mean() -> None:
    """A first fit's first steps carry one-off costs: one 245-ms step among 1.5-ms ones made the
    mean 32 ms, a run planned 21× too long. The median of the timed steps is the steady step; with
    fewer than MIN_STEP_SAMPLES of them the mean over the run so far stands."""
    steps = [0.245] + [0.0015] * 7
    common = {"ntk_samples": [], "functional_samples": [], "shadow_samples": []}
    measured = costs_from_run(costs(), steps=8, user_s=sum(steps), step_samples=steps, **common)
    assert measured.step_s == pytest.approx(0.0015)
    few = steps[: MIN_STEP_SAMPLES - 1]
    fallback = costs_from_run(costs(), steps=8, user_s=sum(steps), step_samples=few, **common)
    assert fallback.step_s == pytest.approx(sum(steps) / 8)


@pytest.mark.parametrize(
    ("value", "error"), [(0.0, ValueError), (1.0, ValueError), (True, TypeError), ("x", TypeError)]
)
def test_max_overhead_is_validated(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_overhead"):
        check_max_overhead(value)  # type: ignore[arg-type]
    check_max_overhead(None)
    check_max_overhead(0.05)


# ------------------------------------------------------------------ exact kernel or sketch, by budget


def test_an_affordable_exact_kernel_is_taken_over_the_sketch_and_charged_as_exact() -> None:
    """NTK timed over an auto sketch with C/S = 4: the exact kernel costs 4× (0.36 s at 256 examples),
    which still fits the 10.5 s budget with the largest probe, so the plan takes it, charged as exact."""
    sketched, horizon = costs(ntk_linear=1e-4, ntk_quadratic=1e-6, exact_ntk_factor=4.0), 2000
    exact = costs(ntk_linear=4e-4, ntk_quadratic=4e-6)
    plan = plan_within_budget(sketched, horizon=horizon, max_overhead=0.05, n_available=256)
    assert plan.outputs == "exact" and plan.n_probe == 256 and plan.fits
    assert plan.planned_s == pytest.approx(walked_cost(exact, 256, plan.schedule, horizon), rel=1e-9)
    assert "NTK over every output (the budget affords the exact kernel)" in plan.line()
    assert plan.state_dict()["outputs"] == "exact"


def test_an_exact_kernel_that_would_shrink_the_probe_leaves_the_sketch() -> None:
    """C/S = 100: exact at 256 examples is 9 s per NTK, over budget, so exact would need a smaller
    probe than the sketch gets; the plan keeps the sketch at 256, charged as timed."""
    sketched, horizon = costs(ntk_linear=1e-4, ntk_quadratic=1e-6, exact_ntk_factor=100.0), 2000
    plan = plan_within_budget(sketched, horizon=horizon, max_overhead=0.05, n_available=256)
    exact_plan = plan_within_budget(
        costs(ntk_linear=1e-2, ntk_quadratic=1e-4), horizon=horizon, max_overhead=0.05, n_available=256
    )
    assert exact_plan.n_probe < 256  # the premise: exact does not fit at 256
    assert plan.outputs == "sketch" and plan.n_probe == 256
    plain = costs(ntk_linear=1e-4, ntk_quadratic=1e-6)
    assert plan.planned_s == pytest.approx(walked_cost(plain, 256, plan.schedule, horizon), rel=1e-9)
    assert "the exact kernel does not fit the budget" in plan.line()


def test_without_an_auto_sketch_the_plan_does_not_choose_outputs() -> None:
    plan = plan_within_budget(costs(), horizon=1000, max_overhead=0.05, n_available=256)
    assert plan.outputs is None and "NTK over" not in plan.line()


def test_after_verdict_counts_the_next_checks_and_the_shadow_steps_up_to_the_last() -> None:
    """At step 4 of a log-spaced plan the next 3 checks are at 8, 16 and 32: 3 forwards over the probe,
    an NTK only where the schedule has one (every 16 here), and 28 shadow steps, the first epoch's
    at full price and the cached ones after it."""
    c = costs(steps_per_epoch=20, functional_per_example_s=1e-3, shadow_step_s=1e-2, shadow_cached_s=1e-4)
    schedule = CheckSchedule(0, 16, True, 0)
    expected = 3 * 32 * 1e-3 + 2 * c.ntk_s(32) + (20 - 4) * 1e-2 + (32 - 20) * 1e-4  # NTKs at 16 and 32
    assert after_verdict_s(c, 32, schedule, 4, 3) == pytest.approx(expected, rel=1e-12)
    assert after_verdict_s(c, 32, schedule, 4, 0) == 0.0
