"""The diagnosis rules on hand-made evidence (each cause, and the evidence that must be present)."""

from __future__ import annotations

import math

import pytest

from lin_probe.monitor.diagnosis import (
    KERNEL_MOVED_DISTANCE,
    KERNEL_MOVED_DRIFT,
    Diagnosis,
    Verdict,
    diagnose,
)

TOL = 0.1


def _diagnose(evidence: dict[str, float], fit: float = 0.05, from_start: bool = False) -> Diagnosis:
    return diagnose(evidence, step=40, tolerance=TOL, fit_rel_error_centered=fit, from_start=from_start)


def test_a_drifted_kernel_with_a_departed_linearised_shadow_moved() -> None:
    diagnosis = _diagnose(
        {"ntk_drift": 0.4, "kernel_distance": 0.01, "linearized/functional_distance_rel": 0.3}
    )
    assert diagnosis.cause == "kernel_moved"
    assert "ntk_drift 0.4" in diagnosis.explanation()


def test_a_departed_linearised_shadow_means_the_kernel_moved_even_at_small_drift() -> None:
    evidence = {"ntk_drift": 0.04, "kernel_distance": 0.002, "linearized/functional_distance_rel": 0.14}
    assert _diagnose(evidence, fit=0.11).cause == "kernel_moved"


def test_a_turned_kernel_moved_even_at_small_drift() -> None:
    diagnosis = _diagnose({"ntk_drift": 0.01, "kernel_distance": KERNEL_MOVED_DISTANCE + 0.01})
    assert diagnosis.cause == "kernel_moved"


def test_drift_alone_is_not_enough_when_the_linearised_shadow_is_still_close() -> None:
    evidence = {"ntk_drift": KERNEL_MOVED_DRIFT * 2, "linearized/functional_distance_rel": 0.02}
    assert _diagnose(evidence, fit=0.05).cause == "undetermined"


def test_a_close_memorizing_shadow_means_memorisation() -> None:
    diagnosis = _diagnose({"ntk_drift": 0.01, "memo/functional_distance_rel": 0.05}, fit=0.2)
    assert diagnosis.cause == "memorisation"
    assert "memorizing shadow's distance 0.05" in diagnosis.explanation()


def test_a_misfit_kernel_that_stayed_put_under_a_close_linearised_shadow_was_never_input_linear() -> None:
    evidence = {"ntk_drift": 0.01, "kernel_distance": 0.001, "linearized/functional_distance_rel": 0.03}
    diagnosis = _diagnose(evidence, fit=0.35)
    assert diagnosis.cause == "never_input_linear"
    assert "centred fit error 0.35" in diagnosis.explanation()


def test_outside_from_the_start_is_never_input_linear_whatever_else_was_measured() -> None:
    diagnosis = _diagnose({"ntk_drift": 0.5}, fit=0.34, from_start=True)
    assert diagnosis.cause == "never_input_linear"
    assert "from the first check after init" in diagnosis.explanation()


def test_without_the_side_shadows_a_kernel_that_stayed_put_is_undetermined_and_says_what_to_turn_on() -> None:
    diagnosis = _diagnose({"ntk_drift": 0.003, "kernel_distance": 1e-4}, fit=0.13)
    assert diagnosis.cause == "undetermined"
    assert "memorization=True" in diagnosis.explanation() and "linearized=True" in diagnosis.explanation()


def test_unmeasured_drift_is_not_evidence_of_anything() -> None:
    diagnosis = _diagnose({}, fit=0.5)
    assert diagnosis.cause == "undetermined"
    assert math.isnan(diagnosis.ntk_drift)
    assert "not measured" in diagnosis.explanation()


def test_diagnosis_round_trips_through_its_state() -> None:
    diagnosis = _diagnose({"ntk_drift": 0.4, "memo/functional_distance_rel": 0.5})
    assert Diagnosis.from_state(diagnosis.state_dict()) == diagnosis
    assert Diagnosis.from_state(None) is None


@pytest.mark.parametrize(
    ("verdict", "words"),
    [
        (Verdict("inside"), "in the linear regime so far"),
        (Verdict("left", 12), "left the linear regime at step 12"),
        (Verdict("outside_from_start"), "not in the linear regime from the start"),
        (Verdict("left", 3, "linearized/"), "linearised network"),
        (Verdict("left", 3, "", indicative=True), "pass linearized=True"),
    ],
)
def test_verdicts_read_as_sentences(verdict: Verdict, words: str) -> None:
    assert words in verdict.describe()
