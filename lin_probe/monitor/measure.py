"""One check on the probe set: outputs, distances, losses, and the NTK's gap and drift.

Pure math over a model, a shadow and a probe set: nothing here knows about Lightning, so the
callback stays orchestration only and these numbers can be reproduced outside a Trainer.

Dense or matrix-free NTK checks
-------------------------------
Small probes (the default 256) build ``Θ_0`` and ``Θ_t`` as dense ``n × n`` matrices: exact
``eigvalsh`` norms and an eigenvalue histogram. Probes too large for that (:func:`ntk_mode`, per
:func:`lin_probe.spectral.dense_or_matrix_free`) never materialise ``n × n``: ``Θ_t u`` comes from
:func:`lin_probe.ntk.ntk_matvec` on the live model, ``Θ_lin u`` from ``X`` (``a·X(Xᵀu)/d + b·1(1ᵀu)
+ c·u``) and ``Θ_0 u`` from ``ntk_matvec`` on the shadow's frozen copy ``f_0`` (its parameters
marked trainable as the optimizer's were, for the duration of each product); every norm is
Lanczos at ``rtol = 1e-5`` and no eigenvalue histogram is produced. Without ``f_0``
(``center=False``) there is no ``Θ_0`` product and ``ntk_drift`` is NaN: keeping a second copy
of the trainable parameters is what ``center=False`` exists to avoid. The fit at init is
:func:`lin_probe.kernel.fit_affine_kernel_matrix_free`, with ``tr Θ_0`` exact from the diagonal
of per-block dense kernels (per-example gradients, no ``n × n``).
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
from lin_probe.linalg.spectral import dense_or_matrix_free, spectral_norm
from lin_probe.monitor.losses import LossFn
from lin_probe.monitor.metrics import FunctionalDistance, PredictionAgreement
from lin_probe.monitor.probe import ProbeSet
from lin_probe.ntk import dense as ntk_lib
from lin_probe.ntk.dense import empirical_ntk, ntk_matvec, predict
from lin_probe.shadows.linear import LinearShadow

MatVec = Callable[[Tensor], Tensor]

DENSE = "dense"
MATRIX_FREE = "matrix_free"

DENSE_KERNEL_BUDGET_BYTES: int | None = None
"""Bytes handed to :func:`dense_or_matrix_free` when choosing the NTK-check mode; ``None``: the
library default :data:`lin_probe.ntk.DEFAULT_MEMORY_BUDGET_BYTES`, read at call time (1 GiB, so
dense up to ``n = 4096``). Assign a small value to force matrix-free checks on a small probe.

It is deliberately not the callback's ``memory_budget``: that bounds the *working* memory of the
NTK computation (Jacobian blocks, chunked under it), not the ``n × n`` result, and a tiny
``memory_budget`` must still give the chunked dense kernel (docs/robustness.md, row 32)."""

_DIAGONAL_BLOCK = 64
"""Examples per dense block when computing ``diag Θ``: a ``64 × 64`` kernel per block, negligible."""

_NAN_NTK = {"ntk_gap": math.nan, "ntk_drift": math.nan}


def ntk_mode(n: int) -> str:
    """``"dense"`` or ``"matrix_free"`` NTK checks for a probe of ``n`` examples."""
    budget = (
        ntk_lib.DEFAULT_MEMORY_BUDGET_BYTES
        if DENSE_KERNEL_BUDGET_BYTES is None
        else DENSE_KERNEL_BUDGET_BYTES
    )
    return dense_or_matrix_free(n, memory_budget=budget)


@dataclass
class InitialState:
    """Everything measured once at fit start and reused at every later check.

    Dense mode holds ``ntk0`` and ``ntk_lin``; matrix-free mode holds products instead (``None``
    matrices), since the ``n × n`` would not fit.
    """

    kernel: AffineKernel
    ntk0: Tensor | None  # Θ_0 (float64, on CPU); None in matrix-free mode
    ntk_lin: Tensor | None  # a·K + b·11ᵀ + c·I (float64, on CPU); None in matrix-free mode
    ntk0_norm: float  # ‖Θ_0‖₂, the common denominator of ntk_gap and ntk_drift
    initial_outputs: Tensor  # f_0 on the probe, (n, C)
    ntk_lin_matvec: MatVec | None = None  # matrix-free: u ↦ Θ_lin u
    ntk0_matvec: MatVec | None = None  # matrix-free: u ↦ Θ_0 u; None without f_0 (drift is NaN)

    @property
    def dense(self) -> bool:
        """Whether checks compare dense matrices (else Lanczos on products)."""
        return self.ntk0 is not None

    @property
    def drift_available(self) -> bool:
        """False only in matrix-free mode without ``f_0``: ``ntk_drift`` is then NaN by design."""
        return self.dense or self.ntk0_matvec is not None


class _NonFiniteKernel(ValueError):
    """An NTK product came out NaN/inf (a diverged network): the check is NaN, not an error."""


class ProbeMeasurer:
    """Measures network vs shadow on a fixed probe set."""

    def __init__(
        self,
        probe: ProbeSet,
        loss_fn: LossFn,
        *,
        classification: bool,
        output_fn: Callable[[Any], Tensor] | None = None,
        memory_budget: int | None = None,
    ) -> None:
        self.probe = probe
        self.loss_fn = loss_fn
        self.classification = classification
        self.output_fn = output_fn
        self.memory_budget = memory_budget

    def outputs(self, model: nn.Module) -> Tensor:
        return predict(model, self.probe.inputs, output_fn=self.output_fn)

    def ntk(self, model: nn.Module, param_weights: Mapping[str, float] | None) -> Tensor:
        theta = empirical_ntk(
            model,
            self.probe.inputs,
            output_fn=self.output_fn,
            param_weights=param_weights,
            memory_budget=self.memory_budget,
        )
        return theta.detach().to("cpu", torch.float64)

    @property
    def dense(self) -> bool:
        """Whether this probe gets dense NTK checks (:func:`ntk_mode`)."""
        return ntk_mode(len(self.probe)) == DENSE

    def ntk_product(self, model: nn.Module, param_weights: Mapping[str, float] | None) -> MatVec:
        """``u ↦ Θu`` at the model's current parameters, float64 on CPU (raises on NaN/inf)."""
        return _checked_float64(
            ntk_matvec(model, self.probe.inputs, output_fn=self.output_fn, param_weights=param_weights)
        )

    def ntk_diagonal(self, model: nn.Module, param_weights: Mapping[str, float] | None) -> Tensor:
        """``diag Θ`` (float64, CPU) exactly, from small dense blocks: per-example gradients, no ``n × n``."""
        inputs = self.probe.inputs
        blocks = []
        for start in range(0, inputs.shape[0], _DIAGONAL_BLOCK):
            block = empirical_ntk(
                model,
                inputs[start : start + _DIAGONAL_BLOCK],
                output_fn=self.output_fn,
                param_weights=param_weights,
                memory_budget=self.memory_budget,
            )
            blocks.append(torch.diagonal(block).detach().to("cpu", torch.float64))
        return torch.cat(blocks)

    def fit_initial(
        self, model: nn.Module, param_weights: Mapping[str, float] | None, kernel_inputs: Tensor
    ) -> tuple[AffineKernel, Tensor | None, float]:
        """The affine fit at init, dense ``Θ_0`` (``None`` in matrix-free mode) and ``‖Θ_0‖₂``."""
        if self.dense:
            ntk0 = self.ntk(model, param_weights)
            return fit_affine_kernel(ntk0, kernel_inputs), ntk0, spectral_norm(ntk0)
        theta = self.ntk_product(model, param_weights)
        norm = spectral_norm(theta, len(self.probe))
        trace = float(self.ntk_diagonal(model, param_weights).sum())
        kernel = fit_affine_kernel_matrix_free(theta, kernel_inputs, trace=trace, ntk_norm=norm)
        return kernel, None, norm

    def initial_state(
        self,
        kernel: AffineKernel,
        ntk0: Tensor | None,
        ntk0_norm: float | None,
        initial_outputs: Tensor,
        kernel_inputs: Tensor,
        *,
        initial_model: nn.Module | None,
        param_weights: Mapping[str, float],
    ) -> InitialState:
        """What later checks compare against: dense matrices if ``ntk0`` is given, else products.

        ``initial_model`` is ``f_0`` (frozen; the shadow's copy), the source of ``Θ_0 u`` in
        matrix-free mode; ``param_weights`` names the parameters the optimizer trained at init.
        """
        if ntk0_norm is None:
            if ntk0 is None:
                raise ValueError("`ntk0_norm` is needed when there is no dense Θ_0.")
            ntk0_norm = spectral_norm(ntk0)
        if not ntk0_norm > 0:
            raise ValueError(
                "The model's NTK on the probe set is zero: nothing trainable reaches its output."
            )
        if ntk0 is not None:
            ntk_lin = kernel.matrix(kernel_inputs).to(torch.float64)
            return InitialState(kernel, ntk0, ntk_lin, ntk0_norm, initial_outputs)
        ntk0_matvec = None if initial_model is None else self._initial_product(initial_model, param_weights)
        return InitialState(
            kernel,
            None,
            None,
            ntk0_norm,
            initial_outputs,
            ntk_lin_matvec=kernel.matvec(kernel_inputs),
            ntk0_matvec=ntk0_matvec,
        )

    def ntk_record(
        self, model: nn.Module, param_weights: Mapping[str, float] | None, initial: InitialState
    ) -> tuple[dict[str, float], Tensor | None]:
        """``ntk_gap``, ``ntk_drift`` and Θ_t's eigenvalues (dense mode only); NaN if Θ_t is not finite."""
        if initial.dense:
            theta = self.ntk(model, param_weights)
            if not bool(torch.isfinite(theta).all()):
                return dict(_NAN_NTK), None
            return self.ntk_check(theta, initial), torch.linalg.eigvalsh(theta)
        return self.ntk_check_matrix_free(self.ntk_product(model, param_weights), initial), None

    def ntk_check_matrix_free(self, theta: MatVec, initial: InitialState) -> dict[str, float]:
        """:meth:`ntk_check` by Lanczos on ``u ↦ Θ_t u − Θ_lin u`` and ``u ↦ Θ_t u − Θ_0 u``."""
        assert initial.ntk_lin_matvec is not None
        n = len(self.probe)
        try:
            gap = spectral_norm(_difference(theta, initial.ntk_lin_matvec), n) / initial.ntk0_norm
            drift = (
                math.nan
                if initial.ntk0_matvec is None
                else spectral_norm(_difference(theta, initial.ntk0_matvec), n) / initial.ntk0_norm
            )
        except _NonFiniteKernel:
            return dict(_NAN_NTK)
        return {"ntk_gap": gap, "ntk_drift": drift}

    def _initial_product(self, initial_model: nn.Module, param_weights: Mapping[str, float]) -> MatVec:
        """``u ↦ Θ_0 u`` on the frozen ``f_0``, its init-time trainable parameters unfrozen per product."""
        names = frozenset(param_weights)

        def apply(u: Tensor) -> Tensor:
            with _trainable_only(initial_model, names):
                return ntk_matvec(
                    initial_model, self.probe.inputs, output_fn=self.output_fn, param_weights=param_weights
                )(u)

        return _checked_float64(apply)

    def network_outputs(self, model: nn.Module) -> Tensor:
        """``f_t`` on the probe (float64), computed once per check and compared with every shadow."""
        return self.outputs(model).to(torch.float64)

    def shadow_outputs(
        self, shadow: LinearShadow, initial_outputs: Tensor, offsets: Tensor | None = None
    ) -> Tensor:
        """``f_lin = f_0 + ψB (+ offsets)`` on the probe, with ``f_0`` cached at fit start instead of re-run."""
        with torch.no_grad():
            linear = (shadow.features(self.probe.inputs) @ shadow.B).to(torch.float64)
            if shadow.initial_model is not None:
                linear = linear + initial_outputs.to(linear.device, torch.float64)
            if offsets is not None:
                linear = linear + offsets.to(linear.device, torch.float64)
        return linear

    def compare(self, network: Tensor, linear: Tensor, initial_outputs: Tensor) -> dict[str, float]:
        """Distances, probe losses and (classification) agreement between network and one shadow."""
        linear = linear.to(network.device)
        initial = initial_outputs.to(network.device, torch.float64)
        distance = FunctionalDistance()
        distance.update(network, linear, initial)
        record = {name: float(value) for name, value in distance.compute().items()}
        if self.probe.targets is not None:
            targets = self.probe.targets.to(network.device)
            record["loss_network"] = float(self.loss_fn(network, _match_dtype(targets, network)))
            record["loss_linear"] = float(self.loss_fn(linear, _match_dtype(targets, linear)))
        if self.classification:
            agreement = PredictionAgreement()
            agreement.update(network, linear, self.probe.targets)
            record.update({name: float(value) for name, value in agreement.compute().items()})
        return record

    def ntk_check(self, theta: Tensor, initial: InitialState) -> dict[str, float]:
        """``ntk_gap = ‖Θ_t − Θ_lin‖₂/‖Θ_0‖₂`` and ``ntk_drift = ‖Θ_t − Θ_0‖₂/‖Θ_0‖₂``."""
        return {
            "ntk_gap": spectral_norm(theta - initial.ntk_lin) / initial.ntk0_norm,
            "ntk_drift": spectral_norm(theta - initial.ntk0) / initial.ntk0_norm,
        }


def _checked_float64(matvec: MatVec) -> MatVec:
    """``matvec`` returning float64 on CPU (where Lanczos runs), raising :class:`_NonFiniteKernel` on NaN/inf."""

    def apply(u: Tensor) -> Tensor:
        w = matvec(u).detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(w).all()):
            raise _NonFiniteKernel("the NTK product is not finite")
        return w

    return apply


def _difference(left: MatVec, right: MatVec) -> MatVec:
    return lambda u: left(u) - right(u)


@contextlib.contextmanager
def _trainable_only(model: nn.Module, names: frozenset[str]) -> Iterator[None]:
    """Mark exactly ``names`` as requiring grad for the duration (``ntk_matvec`` differentiates
    those), then restore every flag: ``f_0`` stays frozen outside a product."""
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
