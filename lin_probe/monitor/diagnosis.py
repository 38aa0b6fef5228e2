"""What the regime outcome means: the verdict (inside, left, or never inside) and, at an exit, its cause.

The verdict
-----------
The exit rule (:mod:`lin_probe.monitor.regime`) finds the first run of ``patience`` checks outside
the tolerance. When that run starts at the *first* check after init and the affine kernel already
misfits the network's centred NTK by more than the tolerance, nothing was left: the paper's shadow
was never close, whatever the learning rate (the first step's relative distance is the affine
kernel's error in the gradient's direction, independent of the step size). The verdict is then
*not in the linear regime from the start*, and the exit step is reserved for a network that was
inside and left — or that, by the confirming check, has departed from its own linearisation too
(``linearized=True``): then the network itself moved, and it is an exit like any other.
A verdict, like an exit, is final: a shadow that comes back within the tolerance later does not
undo it.

The diagnosis
-------------
At the exit the monitor names the most likely cause from what it measured, with the numbers, by
these rules (in order; thresholds below):

0. a network *not in the regime from the start* has **a kernel that was never input-linear** (the
   init fit explains it);
1. **the kernel moved** — the linearised shadow departed (``linearized/functional_distance_rel >
   tolerance``): the network is no longer its own first-order Taylor model, so it left its kernel
   regime, whatever the size of the drift; or, with the linearised shadow off, the NTK drifted
   (``ntk_drift ≥ KERNEL_MOVED_DRIFT``) or turned (``kernel_distance ≥ KERNEL_MOVED_DISTANCE``);
2. **memorisation** — the memorizing shadow (``memorization=True``), whose kernel also has the
   ``c·I`` term on training points, is still within the tolerance: the paper's shadow departs only
   because it cannot fit individual training points;
3. **the kernel was never input-linear** — the centred fit error exceeds the tolerance while the
   kernel stayed put (drift below the threshold) and the linearised shadow is still close: the network is in its kernel regime, but that kernel is
   not an affine function of the data kernel ``K``;
4. **undetermined** — none of these holds, or the evidence to tell them apart is off (e.g. the
   kernel stayed put but neither the linearised nor the memorizing shadow is on, so "never
   input-linear" and "memorisation" cannot be separated: the explanation says which to turn on).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

KERNEL_MOVED_DRIFT = 0.1
"""``‖Θ_t − Θ_0‖₂/‖Θ_0‖₂`` from which the kernel counts as moved: a tenth of its size, the same order
as the default tolerance on the functional distance (a kernel 10 % off moves the function ~10 % off)."""

KERNEL_MOVED_DISTANCE = 0.05
"""``kernel_distance`` from which the kernel counts as turned: 1 − cos θ = 0.05 is an angle of ~18°."""

Cause = Literal["kernel_moved", "memorisation", "never_input_linear", "undetermined"]
State = Literal["inside", "left", "outside_from_start"]

INDICATIVE_NOTE = "the paper's shadow is exact for SGD, pass linearized=True for this optimizer"
"""Why a verdict taken from the paper's shadow under another optimizer is only indicative."""

CAUSE_TITLES: dict[str, str] = {
    "kernel_moved": "the kernel moved",
    "memorisation": "memorisation",
    "never_input_linear": "the kernel was never input-linear",
    "undetermined": "undetermined",
}


@dataclass(frozen=True)
class Verdict:
    """The monitor's verdict so far: ``state``, the exit step (only for ``"left"``), which shadow it is
    taken from (``run``: ``""`` the paper's, ``"linearized/"``), and whether it is only indicative
    (the paper's shadow under an optimizer other than SGD, with the linearised shadow off)."""

    state: State
    exit_step: int | None = None
    run: str = ""
    indicative: bool = False

    def describe(self) -> str:
        shadow = "its linearised network" if self.run else "the paper's linear model"
        if self.state == "inside":
            text = f"in the linear regime so far ({shadow})"
        elif self.state == "left":
            text = f"left the linear regime at step {self.exit_step} ({shadow})"
        else:
            text = "not in the linear regime from the start (the affine data kernel misfits the NTK at init)"
        if self.indicative:
            text += f"; indicative only: {INDICATIVE_NOTE}"
        return text


@dataclass(frozen=True)
class Diagnosis:
    """The cause of an exit (or of a network never inside) with the numbers it was decided from.

    NaN means "not measured" (no NTK check since init, matrix-free mode); ``None`` means the shadow
    that would give it is off.
    """

    cause: Cause
    step: int
    from_start: bool
    tolerance: float
    ntk_drift: float = math.nan
    kernel_distance: float = math.nan
    fit_rel_error_centered: float = math.nan
    linearized_distance_rel: float | None = None
    memo_distance_rel: float | None = None

    @property
    def title(self) -> str:
        return CAUSE_TITLES[self.cause]

    def explanation(self) -> str:
        """One paragraph a user reads on the exit card."""
        numbers = self._numbers()
        if self.cause == "kernel_moved":
            return (
                f"The network's NTK changed while training ({numbers}): the network left its kernel "
                "(lazy) regime, so no fixed-kernel model follows it any more."
            )
        if self.cause == "memorisation":
            return (
                f"The memorizing shadow, whose kernel also has the c·I term on training points, is still "
                f"within the tolerance ({numbers}): the paper's linear model departs because it cannot fit "
                "individual training points, not because the network's kernel changed."
            )
        if self.cause == "never_input_linear":
            if self.from_start:
                how = (
                    "the paper's shadow is outside the tolerance from the first check after init on, which at "
                    "any learning rate is this init misfit, not training"
                )
            else:
                how = "the paper's shadow departs while the network still follows its own linearisation"
            hint = (
                ""
                if self.linearized_distance_rel is not None
                else ", or pass linearized=True to follow the network's own kernel regime"
            )
            return (
                f"The network's NTK is not an affine function of the data kernel K ({numbers}): {how}. Another "
                f"`data_kernel` may fit better (the fit card lists those tried){hint}."
            )
        hint = ""
        if self.linearized_distance_rel is None and self.memo_distance_rel is None:
            hint = (
                " The kernel did not move enough to explain it; pass memorization=True and/or "
                "linearized=True to separate memorisation from a kernel that is not input-linear."
            )
        return f"The measurements do not single out one cause ({numbers}).{hint}"

    def _numbers(self) -> str:
        parts = [
            f"ntk_drift {_fmt(self.ntk_drift)}",
            f"kernel_distance {_fmt(self.kernel_distance)}",
            f"centred fit error {_fmt(self.fit_rel_error_centered)}",
        ]
        if self.linearized_distance_rel is not None:
            parts.append(f"linearised shadow's distance {_fmt(self.linearized_distance_rel)}")
        if self.memo_distance_rel is not None:
            parts.append(f"memorizing shadow's distance {_fmt(self.memo_distance_rel)}")
        return ", ".join(parts) + f"; tolerance {_fmt(self.tolerance)}"

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> Diagnosis | None:
        return None if state is None else cls(**state)


def diagnose(
    evidence: Mapping[str, float],
    *,
    step: int,
    tolerance: float,
    fit_rel_error_centered: float | None,
    from_start: bool,
) -> Diagnosis:
    """Apply the module's rules to the latest measurements.

    ``evidence``: the latest finite value of each key (``ntk_drift``, ``kernel_distance``,
    ``linearized/functional_distance_rel``, ``memo/functional_distance_rel``); a missing key means
    not measured (NTK values) or the shadow is off (shadows).
    """
    drift = float(evidence.get("ntk_drift", math.nan))
    distance = float(evidence.get("kernel_distance", math.nan))
    linearized = evidence.get("linearized/functional_distance_rel")
    memo = evidence.get("memo/functional_distance_rel")
    fit = math.nan if fit_rel_error_centered is None else float(fit_rel_error_centered)
    values = {
        "step": step,
        "from_start": from_start,
        "tolerance": tolerance,
        "ntk_drift": drift,
        "kernel_distance": distance,
        "fit_rel_error_centered": fit,
        "linearized_distance_rel": None if linearized is None else float(linearized),
        "memo_distance_rel": None if memo is None else float(memo),
    }
    moved = drift >= KERNEL_MOVED_DRIFT or distance >= KERNEL_MOVED_DISTANCE  # NaN compares False
    stayed = drift < KERNEL_MOVED_DRIFT and not distance >= KERNEL_MOVED_DISTANCE
    linearized_close = linearized is not None and float(linearized) <= tolerance
    if from_start:  # the init fit explains it, whatever was measured since
        return Diagnosis("never_input_linear", **values)
    linearized_departed = linearized is not None and float(linearized) > tolerance
    if linearized_departed or (linearized is None and moved):
        return Diagnosis("kernel_moved", **values)
    if memo is not None and float(memo) <= tolerance:
        return Diagnosis("memorisation", **values)
    if fit > tolerance and stayed and linearized_close:
        return Diagnosis("never_input_linear", **values)
    return Diagnosis("undetermined", **values)


def _fmt(value: float) -> str:
    return "not measured" if value is None or not math.isfinite(value) else f"{value:.3g}"


__all__ = [
    "CAUSE_TITLES",
    "INDICATIVE_NOTE",
    "KERNEL_MOVED_DISTANCE",
    "KERNEL_MOVED_DRIFT",
    "Cause",
    "Diagnosis",
    "Verdict",
    "diagnose",
]
