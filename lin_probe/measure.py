"""One check on the probe set: outputs, distances, losses, and the NTK's gap and drift.

Pure math over a model, a shadow and a probe set: nothing here knows about Lightning, so the
callback stays orchestration only and these numbers can be reproduced outside a Trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lin_probe.kernel import AffineKernel
from lin_probe.losses import LossFn
from lin_probe.metrics import FunctionalDistance, PredictionAgreement
from lin_probe.ntk import empirical_ntk, predict
from lin_probe.probe import ProbeSet
from lin_probe.shadow import LinearShadow
from lin_probe.spectral import spectral_norm


@dataclass
class InitialState:
    """Everything measured once at fit start and reused at every later check."""

    kernel: AffineKernel
    ntk0: Tensor  # Θ_0 (float64, on CPU)
    ntk_lin: Tensor  # a·K + b·11ᵀ + c·I (float64, on CPU)
    ntk0_norm: float  # ‖Θ_0‖₂, the common denominator of ntk_gap and ntk_drift
    initial_outputs: Tensor  # f_0 on the probe, (n, C)


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

    def functional(self, model: nn.Module, shadow: LinearShadow, initial_outputs: Tensor) -> dict[str, float]:
        """Distances, losses and (for classification) agreement at the current parameters."""
        network = self.network_outputs(model)
        return self.compare(network, self.shadow_outputs(shadow, initial_outputs), initial_outputs)

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


def _match_dtype(targets: Tensor, predictions: Tensor) -> Tensor:
    return targets.to(predictions.dtype) if targets.is_floating_point() else targets
