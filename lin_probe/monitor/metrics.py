"""Network-vs-shadow comparisons on the probe set, as pure functions.

Pure functions rather than torchmetrics ``Metric`` objects: the whole probe set is measured in one
piece at each check (its outputs are ``n × C``, small next to the NTK), and every DDP rank measures
the *same* probe, so there is nothing to accumulate over batches and nothing to sync — the
``Metric`` machinery (states, reset, sync) would do no work. Everything is computed in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def functional_distance(network: Tensor, linear: Tensor, initial: Tensor) -> dict[str, float]:
    """RMS and relative distance between the network ``f_t`` and a shadow ``f_lin``.

    ``functional_distance = sqrt(mean((f_t − f_lin)²))`` over probe points and outputs;
    ``functional_distance_rel = ‖f_t − f_lin‖_F / ‖f_t − f_0‖_F``: the shadow's error as a fraction
    of how far the network has moved; 0 while the network has not moved at all (before any step),
    also for an uncentred shadow, whose gap at init is just ``f_0`` (the RMS still reports it);
    NaN when either output is not finite.
    """
    net = network.detach().to(torch.float64)
    sq_gap = (net - linear.detach().to(net.device, torch.float64)).pow(2).sum()
    sq_moved = (net - initial.detach().to(net.device, torch.float64)).pow(2).sum()
    rms = torch.sqrt(sq_gap / max(net.numel(), 1))
    if not bool(torch.isfinite(sq_gap) & torch.isfinite(sq_moved)):
        rel = torch.full((), math.nan, dtype=torch.float64)  # a diverged network is not "in the regime"
    elif sq_moved > 0:
        rel = torch.sqrt(sq_gap) / torch.sqrt(sq_moved)
    else:
        rel = torch.zeros((), dtype=torch.float64)
    return {"functional_distance": float(rms), "functional_distance_rel": float(rel)}


def prediction_agreement(network: Tensor, linear: Tensor, targets: Tensor | None = None) -> dict[str, float]:
    """Classification view: how often network and shadow pick the same class, and each one's accuracy.

    Accuracies are reported only for 1-D integer class targets (soft or multi-label targets have no
    single right class).
    """
    net_class, lin_class = network.argmax(dim=-1), linear.argmax(dim=-1)
    record = {"agreement": float((net_class == lin_class).double().mean())}
    if targets is not None and targets.dim() == 1 and not targets.is_floating_point() and targets.numel():
        targets = targets.to(net_class.device)
        record["accuracy_network"] = float((net_class == targets).double().mean())
        record["accuracy_linear"] = float((lin_class == targets).double().mean())
    return record


__all__ = ["functional_distance", "prediction_agreement"]
