"""Over which outputs the monitor's NTK runs: all ``C`` exactly, or an unbiased sketch of them.

The exact trace-averaged kernel costs ``C`` backward passes per probe example: affordable for a
small classifier, not for a language model (``C = T·V`` ≈ 1,000), and on a ResNet classifier
(``C = 10``) 2.5 s of its 32-example start-up. With ``outputs="auto"`` (the default) models with
more than :data:`SKETCH_ABOVE_OUTPUTS` outputs per example get the output sketch of
:mod:`lin_probe.ntk.sketch` (``S`` random directions, exactly unbiased) and models with fewer get
the exact kernel, unless the overhead budget decides otherwise: it plans both ways and takes the
exact kernel where that fits with as large a probe, the sketch (:data:`FEW_OUTPUT_PROJECTIONS`
directions for a classifier) where it does not (:func:`lin_probe.monitor.budget.plan_within_budget`
decides, and the callback then passes ``"exact"`` or ``"sketch"``); ``"exact"`` and ``"sketch"``
force either.

Why a classifier needs so few directions: a sketch's error is the outputs' cross terms
``Σ_{c≠c'} v_c v_c' J_c J_c'ᵀ`` (Rademacher ``v_c² = 1``, so the diagonal terms are exact). At
init, behind a wide final Linear layer, those are small next to the diagonal ones (they vanish as
``1/√width``: Mohamadi et al., ICML 2023, the "pNTK", which is the one-direction all-ones case). A
language model's log-probabilities share one softmax, so its cross terms are not small and it needs
:data:`MIN_PROJECTIONS` or more. Either way the error is measured, not assumed. One set of
directions serves the whole run, so ``Θ_t − Θ_0`` compares kernels sketched alike, and the fit card
states ``S`` and the relative spectral error of ``Θ_0``, estimated from ``Θ_0`` itself: its two
halves of directions are computed apart and their difference gives the error
(:func:`lin_probe.ntk.sketch.split_half_error`), at no extra backward passes. (The exact kernel
this used to be checked against costs ``C`` passes per example: 42 s on 16 examples of Lightning's
demo Transformer as a token LM, ``benchmarks/sketch_lm.py``.) Only the kernel is sketched:
predictions, ``f_0`` and the shadows use every output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import torch
from torch import Tensor, nn

from lin_probe._model_state import floating_dtype
from lin_probe.ntk._plumbing import OutputFn
from lin_probe.ntk.sketch import OutputSketch, output_count, projections_for

OUTPUTS: Final[tuple[str, ...]] = ("auto", "exact", "sketch")
NOISY_SKETCH_ERROR: Final[float] = 0.1
"""A sketch whose estimated error is above this gets a warning: the diagnosis reads a kernel drift of
0.1 (``KERNEL_MOVED_DRIFT``) as "moved", so noise of that size can decide it."""
SKETCH_ABOVE_OUTPUTS: Final[int] = 64
"""``outputs="auto"`` sketches models with more outputs per example than this."""
MIN_PROJECTIONS: Final[int] = 32
"""Fewest directions a many-output sketch uses: the variance rule of ``projections_for`` assumes a
dominant kernel mode; a floor keeps kernels without one usable (the fit card shows the measured error)."""
FEW_OUTPUT_PROJECTIONS: Final[int] = 2
"""Directions of a sketch of at most :data:`SKETCH_ABOVE_OUTPUTS` outputs: the fewest with a
split-half error estimate. On the zoo classifiers at init (10 outputs, 32 examples, 4 seeds) its
relative spectral error was 0.5–6.4 %, at 1/6 of the ResNet's exact cost (module docstring)."""


def check_outputs(outputs: Any) -> None:
    if outputs not in OUTPUTS:
        raise ValueError(f"`outputs` must be one of {OUTPUTS}, got {outputs!r}.")


@dataclass(frozen=True)
class KernelOutputs:
    """The outputs the NTK is taken over: ``sketch`` (``None``: exact) for a model with ``outputs`` per example.

    ``error`` is the sketch's estimated relative spectral error on ``error_examples`` probe
    examples (``None`` until ``Θ_0`` is measured, and always for the exact kernel).
    """

    outputs: int
    sketch: OutputSketch | None = None
    error: float | None = None
    error_examples: int | None = None

    def output_fn(
        self, base: OutputFn | None, model: nn.Module, inputs: Tensor, *, half: int | None = None
    ) -> OutputFn | None:
        """The ``output_fn`` the NTK paths get: ``base`` itself when exact (``half``: one half of a sketch)."""
        if self.sketch is None:
            return base
        dtype = floating_dtype(model) or torch.get_default_dtype()
        return self.sketch.output_fn(base, self.outputs, device=inputs.device, dtype=dtype, half=half)

    def half_output_fns(
        self, base: OutputFn | None, model: nn.Module, inputs: Tensor
    ) -> tuple[OutputFn, OutputFn] | None:
        """The two halves of the sketch's directions (their kernels' mean is the sketch's); ``None`` when exact."""
        if self.sketch is None:
            return None
        first, second = (self.output_fn(base, model, inputs, half=half) for half in (0, 1))
        assert first is not None and second is not None
        return first, second

    @property
    def projections(self) -> int | None:
        """The sketch's directions; ``None`` for the exact kernel (the pilot's timings are keyed by it)."""
        return None if self.sketch is None else self.sketch.projections

    @property
    def exact_cost_factor(self) -> float | None:
        """``C/S``: how many times a sketched NTK the exact one costs; ``None`` when exact already."""
        return None if self.sketch is None else self.outputs / self.sketch.projections

    def with_error(self, error: float, examples: int) -> KernelOutputs:
        return replace(self, error=float(error), error_examples=int(examples))

    def describe(self) -> str:
        """The fit card's line."""
        if self.sketch is None:
            return f"NTK over all {self.outputs} outputs per example (exact trace)."
        error = (
            ""
            if self.error is None
            else f"; estimated relative spectral error {self.error:.3g} on {self.error_examples} probe "
            "examples, from the spread between its two halves of directions"
        )
        return (
            f"NTK over outputs sketched: {self.sketch.projections} random projections of the {self.outputs} "
            f'outputs per example (unbiased{error}; `outputs="exact"` for the full trace).'
        )

    def state_dict(self) -> dict[str, Any]:
        sketch = self.sketch
        saved = (
            None
            if sketch is None
            else {"projections": sketch.projections, "seed": sketch.seed, "kind": sketch.kind}
        )
        return {
            "outputs": self.outputs,
            "sketch": saved,
            "error": self.error,
            "error_examples": self.error_examples,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None, outputs: int) -> KernelOutputs:
        if state is None:  # a checkpoint from before sketches: exact
            return cls(outputs)
        sketch = None if state["sketch"] is None else OutputSketch(**state["sketch"])
        return cls(int(state["outputs"]), sketch, state.get("error"), state.get("error_examples"))


def choose_kernel_outputs(
    setting: str, model: nn.Module, inputs: Tensor, base: OutputFn | None
) -> KernelOutputs:
    """Exact or sketched, per ``setting`` and the model's output count (one forward of one example).

    The sketch's error is not measured here: the fit at init measures it on ``Θ_0``
    (:meth:`KernelOutputs.half_output_fns`, :meth:`KernelOutputs.with_error`).
    """
    check_outputs(setting)
    return outputs_without_error(setting, output_count(model, inputs, base), int(inputs.shape[0]))


def outputs_without_error(setting: str, c: int, n: int, *, budgeted: bool = False) -> KernelOutputs:
    """The exact or sketched outputs ``setting`` gives ``c`` outputs on ``n`` examples, the sketch's error
    not yet measured. ``budgeted``: the overhead budget will choose between this and the exact
    kernel, so ``"auto"`` offers the sketch whenever it is cheaper (a classifier's too)."""
    check_outputs(setting)
    offered = budgeted or c > SKETCH_ABOVE_OUTPUTS
    wanted = setting == "sketch" or (setting == "auto" and offered)
    projections = sketch_projections(c, n)
    if not wanted or projections >= c:
        return KernelOutputs(c)
    return KernelOutputs(c, OutputSketch(projections))


def sketch_projections(c: int, n: int) -> int:
    """Directions of a sketch of ``c`` outputs on ``n`` examples (``>= c``: no sketch is cheaper),
    even for the split-half error: few for a classifier, ``projections_for``'s rule above a floor for
    many outputs (module docstring)."""
    wanted = (
        FEW_OUTPUT_PROJECTIONS if c <= SKETCH_ABOVE_OUTPUTS else max(MIN_PROJECTIONS, projections_for(c, n))
    )
    projections = min(c, wanted)
    return projections + projections % 2


__all__ = [
    "FEW_OUTPUT_PROJECTIONS",
    "NOISY_SKETCH_ERROR",
    "OUTPUTS",
    "SKETCH_ABOVE_OUTPUTS",
    "KernelOutputs",
    "check_outputs",
    "choose_kernel_outputs",
    "outputs_without_error",
    "sketch_projections",
]
