"""One check on the probe set: the fit at init, then network vs shadow and the NTK's gap and drift.

Pure math over a model, a shadow's outputs and a probe set; nothing here knows about Lightning.

Dense or matrix-free NTK checks
-------------------------------
Small probes (the default 256) get dense ``n × n`` kernels: exact ``eigvalsh`` norms and an
eigenvalue histogram. Probes too large for that (:meth:`lin_probe.plan.ComputePlan.dense`) never
materialise ``n × n``: ``Θ_t u`` comes from NTK products on the live model, ``Θ_lin u`` from ``X``
and ``Θ_0 u`` from NTK products on the shadow's frozen copy ``f_0``; every norm is Lanczos at
``rtol = 1e-5`` and no eigenvalue histogram is produced. Without ``f_0`` (``center=False``) there
is no ``Θ_0`` product and ``ntk_drift`` is NaN: keeping a second copy of the trainable parameters
is what ``center=False`` exists to avoid. The fit at init is then
:func:`lin_probe.kernel.fit_affine_kernel_matrix_free`, with ``tr Θ_0`` exact from the diagonal.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lin_probe.kernel import AffineKernel, centered_norm, fit_affine_kernel, fit_affine_kernel_matrix_free
from lin_probe.kernel.data_kernels import DataKernelChoice, choose_data_kernel
from lin_probe.linalg.operator import NonFiniteOperator, SymmetricOperator
from lin_probe.losses import LossFn
from lin_probe.monitor.kernel_measures import (
    KERNEL_MEASURE_KEYS,
    kernel_alignment,
    kernel_distance,
    kernel_velocity,
    ntk_scale,
)
from lin_probe.monitor.metrics import functional_distance, prediction_agreement
from lin_probe.ntk import (
    MethodChoice,
    NTKMethod,
    ProgressFn,
    choose_method,
    empirical_ntk,
    ntk_diagonal,
    ntk_matvec,
    ntk_operator,
)
from lin_probe.ntk.sketch import split_half_error
from lin_probe.plan import ComputePlan

OutputFn = Callable[[Any], Tensor]
FeaturesFn = Callable[[Any], Tensor]

POOR_FIT_THRESHOLD = 0.3
"""A *centred* fit error (``‖H(Θ_0 − Θ_lin)H‖₂/‖HΘ_0H‖₂``) above this means the linear model is a poor
proxy for the architecture: the fit card says so and the monitor warns. Not the tolerance (0.1): the
paper's own wide two-layer ReLU net on digits (``make demo``) fits with centred error 0.13 and still
stays within the 0.1 tolerance of its shadow until step 75 (0.067 at step 1), since the spectral error
is a worst case over directions and the first steps move along the kernel's top ones."""

NTK_KEYS = ("ntk_gap", "ntk_drift")

_DIAGONAL_BLOCK = 64
"""Examples per dense block of :meth:`NTKProbe.trace` (``ntk_diagonal``'s default)."""


@dataclass
class NTKProbe:
    """How to take the NTK of a model on the probe: inputs, output selection, weights and plan.

    The monitor takes the NTK of the same model on the same probe many times, so ``method="auto"``'s
    timed choice (:func:`lin_probe.ntk.choose_method`) is made once, at the first :meth:`operator`
    (or :meth:`trace`) call, kept in :attr:`method_choice` (for the monitor to report) and its
    concrete method reused by every later call.
    """

    inputs: Tensor
    output_fn: OutputFn | None
    param_weights: Mapping[str, float]
    plan: ComputePlan
    method_choice: MethodChoice | None = field(default=None, compare=False)
    structured_seconds: Mapping[int, float] = field(default_factory=dict, compare=False)
    """The structured kernel's seconds on ``inputs[:m]``, timed before (the pilot): ``auto`` then
    does not probe it again (:func:`lin_probe.ntk.choose_method`)."""

    @property
    def _options(self) -> dict[str, Any]:
        return {"output_fn": self.output_fn, "param_weights": self.param_weights}

    def method(self, model: nn.Module, progress: ProgressFn | None = None) -> NTKMethod:
        """The concrete dense method, chosen on the first call (on the probe, or on the diagonal's
        first block of 64 when the plan is matrix-free: the only dense kernels then); ``progress``
        follows the timed probe's kernels, so it can be aborted too."""
        if self.method_choice is None:
            n = self.inputs.shape[0]
            rows = self.inputs if self.plan.dense(n) else self.inputs[:_DIAGONAL_BLOCK]
            self.method_choice = choose_method(
                model,
                rows,
                memory_budget=self.plan.memory_budget,
                progress=progress,
                structured_seconds=self.structured_seconds,
                **self._options,
            )
        return self.method_choice.method

    def operator(self, model: nn.Module, progress: ProgressFn | None = None) -> SymmetricOperator:
        """``Θ`` at the model's current parameters: dense or products, per the plan.

        ``progress(done, total)`` as for :func:`lin_probe.ntk.empirical_ntk` (raise from it to abort).
        """
        method = self.method(model, progress) if self.plan.dense(self.inputs.shape[0]) else NTKMethod.AUTO
        return ntk_operator(
            model, self.inputs, plan=self.plan, method=method, progress=progress, **self._options
        )

    def split_halves(
        self, model: nn.Module, halves: tuple[OutputFn, OutputFn], progress: ProgressFn | None = None
    ) -> tuple[SymmetricOperator, tuple[float, int]]:
        """``Θ`` of a sketched :attr:`output_fn` from its two ``halves``, and their split-half error.

        Dense: ``Θ`` is the halves' mean (exactly the whole sketch's kernel, for about its cost) and
        the error is estimated on every probe example. Matrix-free, ``Θ`` is the products and the
        halves are taken on the first :data:`_DIAGONAL_BLOCK` examples only (``n²`` is what the
        plan cannot hold).
        """
        n = self.inputs.shape[0]
        dense = self.plan.dense(n)
        rows = self.inputs if dense else self.inputs[:_DIAGONAL_BLOCK]
        method = self.method(model, progress)
        kernels = [  # dense blocks even when the plan is matrix-free: at most 64 × 64
            empirical_ntk(
                model,
                rows,
                method=method,
                progress=_part_of(progress, part, 2),
                output_fn=half,
                param_weights=self.param_weights,
                memory_budget=self.plan.memory_budget,
            ).detach()
            for part, half in enumerate(halves)
        ]
        error = (split_half_error(*kernels), rows.shape[0])
        if dense:
            return SymmetricOperator.dense((kernels[0] + kernels[1]) / 2, "ntk"), error
        return self.operator(model, progress), error

    def trace(self, model: nn.Module, progress: ProgressFn | None = None) -> float:
        """``tr Θ`` exactly, from small dense diagonal blocks (no ``n × n``); ``progress`` counts blocks."""
        diagonal = ntk_diagonal(
            model,
            self.inputs,
            plan=self.plan,
            method=self.method(model, progress),
            progress=progress,
            block=_DIAGONAL_BLOCK,
            **self._options,
        )
        return float(diagonal.sum())

    def frozen_operator(self, frozen: nn.Module) -> SymmetricOperator:
        """``u ↦ Θ_0 u`` on the frozen ``f_0``, its init-time trainable parameters unfrozen per product.

        Always products (this is the matrix-free mode's ``Θ_0``); each call builds the product inside
        the unfreezing, since which parameters are differentiated is read when it is built.
        """
        names = frozenset(self.param_weights)

        def apply(u: Tensor) -> Tensor:
            with _trainable_only(frozen, names):
                return ntk_matvec(
                    frozen, self.inputs, memory_budget=self.plan.memory_budget, **self._options
                )(u)

        return SymmetricOperator.from_products(apply, self.inputs.shape[0], name="Θ_0")


def _part_of(progress: ProgressFn | None, part: int, parts: int) -> ProgressFn | None:
    """``progress`` for the ``part``-th of ``parts`` equal computations: one count from 0 to the whole."""
    if progress is None:
        return None

    def hook(done: int, total: int) -> None:
        progress(part * total + done, parts * total)

    return hook


@dataclass
class NTKReference:
    """What later NTK checks compare against: ``Θ_0``, ``Θ_lin``, ``‖Θ_0‖₂`` and the probe's targets.

    ``theta0`` is dense, or products on ``f_0`` in matrix-free mode; ``None`` there without
    ``f_0`` (``center=False``), when ``ntk_drift`` is NaN by design. ``targets`` is ``Y`` of the
    kernel–target alignment (``None`` when the probe has no targets).
    """

    theta0: SymmetricOperator | None
    theta_lin: SymmetricOperator
    norm0: float
    targets: Tensor | None = None

    @property
    def dense(self) -> bool:
        return self.theta_lin.is_dense

    @property
    def drift_available(self) -> bool:
        return self.theta0 is not None


@dataclass(frozen=True)
class InitFit:
    """What the start measures once: ``Θ_0`` (and its norm) and the chosen data kernel with its fit."""

    theta0: SymmetricOperator
    norm0: float
    choice: DataKernelChoice
    sketch_error: tuple[float, int] | None = None  # a sketched Θ_0's estimated error and on how many examples

    @property
    def kernel(self) -> AffineKernel:
        return self.choice.kernel


def fit_at_init(
    model: nn.Module,
    ntk: NTKProbe,
    candidates: Sequence[tuple[str, FeaturesFn | None]],
    inputs: Tensor,
    progress: ProgressFn | None = None,
    halves: tuple[OutputFn, OutputFn] | None = None,
) -> InitFit:
    """``Θ_0``, computed once, and the centred affine fit of every candidate data kernel; the best is kept.

    ``halves``: the two halves of an output sketch's directions (``ntk.output_fn`` is the whole
    sketch). ``Θ_0`` is then their kernels' mean, and :attr:`InitFit.sketch_error` their
    split-half error estimate (:func:`lin_probe.ntk.sketch.split_half_error`).

    The caller runs it under :func:`lin_probe.monitor.batch_statistics.probe_batch_statistics`, so
    ``Θ_0`` is the kernel of the network train mode runs (BatchNorm on the probe's statistics); the
    step-0 check reuses this ``Θ_0`` when dense (:meth:`lin_probe.monitor.core.RegimeProbe.measure`).
    ``progress(done, total)`` follows the NTK's work (the start-up's long part; raise to abort).
    """
    sketch_error = None
    if halves is None:
        theta0 = ntk.operator(model, progress)
    else:
        theta0, sketch_error = ntk.split_halves(model, halves, progress)
    norm0 = theta0.norm()
    if not norm0 > 0:
        raise ValueError("The model's NTK on the probe set is zero: nothing trainable reaches its output.")
    # The centred fit: a, c ≥ 0 minimise ‖H(Θ_0 − aK − cI)H‖_F and b fits the constant mode. Measured
    # against the all-entries fit at init on digits: never a worse centred error (the one the verdict
    # reads), much better on CNNs (GAP + patch-mean kernel 0.33 → 0.083), the uncentred one ≤ 0.022 worse.
    # Both norms of Θ_0 once, not once per candidate data kernel (eigvalsh or Lanczos each).
    norms = {"ntk_norm": norm0, "centered_ntk_norm": centered_norm(theta0)}
    if theta0.is_dense:

        def fit(op: SymmetricOperator, rows: Tensor) -> AffineKernel:
            return fit_affine_kernel(op, rows, centered_fit=True, **norms)

    else:
        trace = ntk.trace(model, progress)

        def fit(op: SymmetricOperator, rows: Tensor) -> AffineKernel:
            return fit_affine_kernel_matrix_free(op, rows, trace=trace, centered_fit=True, **norms)

    choice = choose_data_kernel(theta0, candidates, inputs, fit=fit)
    return InitFit(theta0, norm0, choice, sketch_error)


def ntk_reference(
    kernel: AffineKernel,
    theta0: SymmetricOperator | None,
    norm0: float,
    kernel_inputs: Tensor,
    *,
    dense: bool,
    targets: Tensor | None = None,
) -> NTKReference:
    """The reference for later checks; ``theta0`` as measured (dense) or products on ``f_0`` (or ``None``)."""
    return NTKReference(theta0, kernel.operator(kernel_inputs, dense=dense), norm0, targets)


FROBENIUS_KEYS = ("kernel_distance", "kernel_velocity", "kernel_alignment")
"""The kernel measures that need Frobenius products of ``n × n`` kernels: NaN by design when matrix-free."""


def ntk_check_keys(reference: NTKReference, has_previous: bool) -> tuple[str, ...]:
    """The keys one NTK check reports: without probe targets there is no ``kernel_alignment``, and
    the first dense check has no ``kernel_velocity`` (nothing to move from; matrix-free: NaN)."""
    skip = set()
    if reference.targets is None:
        skip.add("kernel_alignment")
    if reference.dense and not has_previous:
        skip.add("kernel_velocity")
    return tuple(key for key in (*NTK_KEYS, *KERNEL_MEASURE_KEYS) if key not in skip)


def ntk_check(
    theta: SymmetricOperator,
    reference: NTKReference,
    previous: tuple[int, Tensor] | None = None,
    step: int = 0,
) -> tuple[dict[str, float], Tensor | None]:
    """One NTK check: gap and drift, the kernel measures and Θ_t's eigenvalues (dense only).

    ``ntk_gap = ‖Θ_t − Θ_lin‖₂/‖Θ_0‖₂``, ``ntk_drift = ‖Θ_t − Θ_0‖₂/‖Θ_0‖₂``; ``kernel_distance`` to
    ``Θ_0``, ``kernel_velocity`` from ``previous`` (the last check's ``(step, Θ)``), ``kernel_alignment``
    with the probe's targets and ``ntk_scale`` (:mod:`lin_probe.monitor.kernel_measures`); the keys
    are :func:`ntk_check_keys`'. The :data:`FROBENIUS_KEYS` are NaN in matrix-free mode; everything
    is NaN, not an error, when Θ_t is not finite (a diverged network).
    """
    values = dict.fromkeys(ntk_check_keys(reference, previous is not None), math.nan)
    try:
        gap = (theta - reference.theta_lin).norm() / reference.norm0
        drift = math.nan if reference.theta0 is None else (theta - reference.theta0).norm() / reference.norm0
        eigenvalues = theta.eigenvalues() if theta.is_dense else None
        norm = float(eigenvalues.abs().max()) if eigenvalues is not None else theta.norm()
    except NonFiniteOperator:
        return values, None
    values.update(ntk_gap=gap, ntk_drift=drift, ntk_scale=ntk_scale(norm, reference.norm0))
    matrix = theta.matrix
    if matrix is not None:
        if reference.theta0 is not None and reference.theta0.matrix is not None:
            values["kernel_distance"] = kernel_distance(reference.theta0.matrix, matrix)
        if previous is not None:
            values["kernel_velocity"] = kernel_velocity(previous[1], matrix, step - previous[0])
        if reference.targets is not None:
            values["kernel_alignment"] = kernel_alignment(matrix, reference.targets)
    return values, eigenvalues


def compare(
    network: Tensor,
    linear: Tensor,
    initial: Tensor,
    *,
    targets: Tensor | None,
    loss_fn: LossFn,
    classification: bool,
) -> dict[str, float]:
    """Distances, probe losses and (classification) agreement between the network and one shadow."""
    linear = linear.to(network.device, torch.float64)
    record = functional_distance(network, linear, initial)
    if targets is not None:
        targets = targets.to(network.device)
        record["loss_network"] = float(loss_fn(network, _match_dtype(targets, network)))
        record["loss_linear"] = float(loss_fn(linear, _match_dtype(targets, linear)))
    if classification:
        record.update(prediction_agreement(network, linear, targets))
    return record


@contextlib.contextmanager
def _trainable_only(model: nn.Module, names: frozenset[str]) -> Iterator[None]:
    """Mark exactly ``names`` as requiring grad for the duration (NTK products differentiate those),
    then restore every flag: ``f_0`` stays frozen outside a product."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        for name, param in model.named_parameters():
            param.requires_grad_(name in names)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _match_dtype(targets: Tensor, predictions: Tensor) -> Tensor:
    return targets.to(predictions.dtype) if targets.is_floating_point() else targets


__all__ = [
    "FROBENIUS_KEYS",
    "NTK_KEYS",
    "POOR_FIT_THRESHOLD",
    "InitFit",
    "NTKProbe",
    "NTKReference",
    "compare",
    "fit_at_init",
    "ntk_check",
    "ntk_check_keys",
    "ntk_reference",
]
