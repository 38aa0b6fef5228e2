"""The budget's first measurements, taken at train start before any step: what each part of the monitor costs.

A plan needs seconds, not guesses (:mod:`lin_probe.monitor.budget`): the NTK on 4 and 8 probe
examples (its cost curve, whose ``n²`` term the structured kernel's counted Gram share caps), one
forward over the probe (a functional check), and one forward and backward of a training-sized batch
(the user's step; the forward alone is what the centred shadow adds per step until ``f_0``'s
outputs are cached). Every measurement sees what the monitor's own
checks see (BatchNorm on the probe's statistics, dropout off) and leaves the model as it was:
gradients come from ``torch.autograd.grad``, never ``.grad``, and no buffer is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lin_probe._model_state import eval_semantics
from lin_probe.monitor.batch_statistics import probe_batch_statistics
from lin_probe.monitor.budget import PROBE_SIZES, Costs, ntk_cost_curve
from lin_probe.monitor.checks import NTKProbe
from lin_probe.monitor.outputs import KernelOutputs, outputs_without_error
from lin_probe.ntk import NTKMethod, predict
from lin_probe.ntk._plumbing import OutputFn, output_matrix
from lin_probe.ntk.choice import structured_gram_share
from lin_probe.ntk.sketch import output_count
from lin_probe.plan import ComputePlan
from lin_probe.shadows.digests import row_digests

PILOT_EXAMPLES = PROBE_SIZES[-1]
"""The pilot's examples: the smallest probe, which every plan measures at least."""

PILOT_SIZES = (4, 8)
"""Probe sizes the NTK is timed at, once each. Small on purpose: on a ResNet the pilot at 8 and 16
(the first twice) cost more than Θ_0 at 32 itself. The first call's one-time set-up inflates the
linear term, which only makes the plan more careful; the re-plan reads the checks' own seconds."""


def measure_costs(
    model: nn.Module,
    inputs: Tensor,
    *,
    outputs_setting: str,
    output_fn: OutputFn | None,
    param_weights: Mapping[str, float],
    plan: ComputePlan,
    batch_size: int,
    steps_per_epoch: int | None,
    center: bool,
) -> Costs:
    """Time the monitor's parts on ``model`` and the probe ``inputs`` (module docstring).

    The NTK is timed over the outputs the monitor would take at the smallest probe size (exact, or
    a sketch with the most projections: ``outputs_setting`` is ``MonitorConfig.outputs``); under
    ``"auto"`` every model with more outputs than a sketch's directions is timed sketched, a
    classifier too. That sketch is not final: the plan takes the exact kernel when the budget
    affords it (:attr:`Costs.exact_ntk_factor`), estimated, not timed (it costs ``C/S`` times the sketch).

    Every measurement runs on the first :data:`PILOT_EXAMPLES` of ``inputs`` (the candidate probe
    can be 256 examples): the BatchNorm calibration is then one forward of those, not of all
    (0.70 s of the zoo ResNet's 256 at every start, ad hoc), and the functional check's cost per
    example comes from them (a larger forward costs less per example, so the plan errs careful).
    """
    device = inputs.device
    inputs = inputs[:PILOT_EXAMPLES]
    with probe_batch_statistics(model, inputs):
        count = output_count(model, inputs[:1], output_fn)
        outputs = outputs_without_error(outputs_setting, count, PROBE_SIZES[-1], budgeted=True)
        kernel_output_fn = outputs.output_fn(output_fn, model, inputs)
        samples = []
        structured = True
        for m in PILOT_SIZES:
            m = min(m, inputs.shape[0])
            probe = NTKProbe(inputs[:m], kernel_output_fn, param_weights, plan)
            samples.append((m, _timed(lambda probe=probe: probe.operator(model), device)))
            structured = structured and _ran_structured(probe)
        share = (
            _gram_share(model, inputs[: samples[-1][0]], kernel_output_fn, param_weights, plan)
            if structured
            else None
        )
        functional = _timed(lambda: predict(model, inputs, output_fn=output_fn), device)
        batch = inputs[torch.arange(batch_size, device=device) % inputs.shape[0]]
        forward, step = _training_step_seconds(model, batch, output_fn, device)
    hashing = _timed(lambda: row_digests(batch), device) if center else 0.0
    alpha, beta = ntk_cost_curve(_distinct(samples), gram_share=share)
    return Costs(
        step_s=step,
        ntk_linear=alpha,
        ntk_quadratic=beta,
        functional_per_example_s=functional / inputs.shape[0],
        shadow_step_s=(forward if center else 0.0) + hashing,
        shadow_cached_s=hashing,
        steps_per_epoch=steps_per_epoch if center else None,
        exact_ntk_factor=_exact_factor(outputs_setting, outputs),
        structured_ntk_s=tuple(_distinct(samples)) if structured else (),
        structured_ntk_projections=outputs.projections,
    )


def _gram_share(
    model: nn.Module,
    inputs: Tensor,
    output_fn: OutputFn | None,
    param_weights: Mapping[str, float],
    plan: ComputePlan,
) -> float | None:
    """The structured kernel's Gram share of its counted work on ``inputs`` (``None``: not all
    counted); a failure to plan is no reason to stop the pilot, only to leave the curve uncapped."""
    try:
        return structured_gram_share(
            model, inputs, output_fn=output_fn, param_weights=param_weights, memory_budget=plan.memory_budget
        )
    except Exception:  # the kernel itself just ran; the count is an aid, not a requirement
        return None


def _ran_structured(probe: NTKProbe) -> bool:
    """The pilot's kernel ran the structured path: ``auto`` below its timing threshold chose it."""
    return probe.method_choice is not None and probe.method_choice.method is NTKMethod.STRUCTURED


def _exact_factor(setting: str, outputs: KernelOutputs) -> float | None:
    """``C/S`` when ``outputs="auto"`` sketched: the budget may still afford the exact kernel."""
    return outputs.exact_cost_factor if setting == "auto" else None


def _distinct(samples: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """One sample per probe size (a probe smaller than 16 repeats one)."""
    return list({m: seconds for m, seconds in samples}.items())


def _training_step_seconds(
    model: nn.Module, batch: Tensor, output_fn: OutputFn | None, device: torch.device
) -> tuple[float, float]:
    """Seconds of one forward, and of one forward and backward, of ``batch`` (best of two each).

    A lower bound on a training step (no optimizer, data loading or logging), so the first plan
    spends less than the budget allows until the run's own steps are measured.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]

    def forward() -> Tensor:
        return output_matrix(model(batch), output_fn)

    def forward_backward() -> None:
        with torch.enable_grad():
            out = forward()
            if trainable and out.requires_grad:
                torch.autograd.grad(out.float().square().mean(), trainable, allow_unused=True)

    with eval_semantics(model):
        with torch.no_grad():
            forward_s = min(_timed(forward, device) for _ in range(2))
        step_s = min(_timed(forward_backward, device) for _ in range(2))
    return forward_s, step_s


def _timed(work: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``work()``, synchronising an accelerator around it (start-up only)."""
    _synchronize(device)
    start = time.perf_counter()
    work()
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["PILOT_SIZES", "measure_costs"]
