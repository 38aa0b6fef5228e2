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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lin_probe.kernel import AffineKernel, fit_affine_kernel, fit_affine_kernel_matrix_free
from lin_probe.linalg.operator import NonFiniteOperator, SymmetricOperator
from lin_probe.losses import LossFn
from lin_probe.monitor.metrics import functional_distance, prediction_agreement
from lin_probe.ntk import ntk_diagonal, ntk_matvec, ntk_operator
from lin_probe.plan import ComputePlan

OutputFn = Callable[[Any], Tensor]

POOR_FIT_THRESHOLD = 0.3
"""A fit error above this at init means the linear model is a poor proxy for the architecture."""

NTK_KEYS = ("ntk_gap", "ntk_drift")


@dataclass
class NTKProbe:
    """How to take the NTK of a model on the probe: inputs, output selection, weights and plan."""

    inputs: Tensor
    output_fn: OutputFn | None
    param_weights: Mapping[str, float]
    plan: ComputePlan

    @property
    def _options(self) -> dict[str, Any]:
        return {"output_fn": self.output_fn, "param_weights": self.param_weights}

    def operator(self, model: nn.Module) -> SymmetricOperator:
        """``Θ`` at the model's current parameters: dense or products, per the plan."""
        return ntk_operator(model, self.inputs, plan=self.plan, **self._options)

    def trace(self, model: nn.Module) -> float:
        """``tr Θ`` exactly, from small dense diagonal blocks (no ``n × n``)."""
        diagonal = ntk_diagonal(model, self.inputs, plan=self.plan, **self._options)
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


@dataclass
class NTKReference:
    """What later NTK checks compare against: ``Θ_0``, ``Θ_lin`` and ``‖Θ_0‖₂``.

    ``theta0`` is dense, or products on ``f_0`` in matrix-free mode; ``None`` there without
    ``f_0`` (``center=False``), when ``ntk_drift`` is NaN by design.
    """

    theta0: SymmetricOperator | None
    theta_lin: SymmetricOperator
    norm0: float

    @property
    def dense(self) -> bool:
        return self.theta_lin.is_dense

    @property
    def drift_available(self) -> bool:
        return self.theta0 is not None


def fit_at_init(
    model: nn.Module, ntk: NTKProbe, kernel_inputs: Tensor
) -> tuple[AffineKernel, SymmetricOperator, float]:
    """The affine fit of ``Θ_0``, the operator ``Θ_0`` itself and its norm ``‖Θ_0‖₂``."""
    theta0 = ntk.operator(model)
    norm0 = theta0.norm()
    if not norm0 > 0:
        raise ValueError("The model's NTK on the probe set is zero: nothing trainable reaches its output.")
    if theta0.is_dense:
        return fit_affine_kernel(theta0, kernel_inputs), theta0, norm0
    kernel = fit_affine_kernel_matrix_free(theta0, kernel_inputs, trace=ntk.trace(model), ntk_norm=norm0)
    return kernel, theta0, norm0


def ntk_reference(
    kernel: AffineKernel,
    theta0: SymmetricOperator | None,
    norm0: float,
    kernel_inputs: Tensor,
    *,
    dense: bool,
) -> NTKReference:
    """The reference for later checks; ``theta0`` as measured (dense) or products on ``f_0`` (or ``None``)."""
    return NTKReference(theta0, kernel.operator(kernel_inputs, dense=dense), norm0)


def ntk_check(theta: SymmetricOperator, reference: NTKReference) -> tuple[dict[str, float], Tensor | None]:
    """``ntk_gap = ‖Θ_t − Θ_lin‖₂/‖Θ_0‖₂``, ``ntk_drift = ‖Θ_t − Θ_0‖₂/‖Θ_0‖₂`` and Θ_t's eigenvalues
    (dense only); NaN, not an error, when Θ_t is not finite (a diverged network)."""
    try:
        gap = (theta - reference.theta_lin).norm() / reference.norm0
        drift = math.nan if reference.theta0 is None else (theta - reference.theta0).norm() / reference.norm0
    except NonFiniteOperator:
        return dict.fromkeys(NTK_KEYS, math.nan), None
    eigenvalues = theta.eigenvalues() if theta.is_dense else None
    return {"ntk_gap": gap, "ntk_drift": drift}, eigenvalues


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
    "NTK_KEYS",
    "POOR_FIT_THRESHOLD",
    "NTKProbe",
    "NTKReference",
    "compare",
    "fit_at_init",
    "ntk_check",
    "ntk_reference",
]
