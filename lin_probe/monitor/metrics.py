"""Probe-set measurements as torchmetrics ``Metric``s.

A ``Metric`` accumulates over probe chunks (so a probe set larger than memory is measured piece by
piece) and knows how to sync its sums across DDP ranks. lin_probe measures the *same* probe set
on every rank, so by default no sync is needed and none is done (``sync_on_compute=False``):
every rank gets identical values without a collective that a rank could miss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class FunctionalDistance(Metric):
    """RMS and relative distance between the network ``f_t`` and the linear shadow ``f_lin``.

    ``rms = sqrt(mean((f_t − f_lin)²))`` over probe points and outputs;
    ``rel = ‖f_t − f_lin‖_F / ‖f_t − f_0‖_F``: the shadow's error as a fraction of how far the
    network has moved; 0 while the network has not moved at all (before any step).
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("sync_on_compute", False)
        super().__init__(**kwargs)
        self.add_state("sq_gap", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sq_moved", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, network: Tensor, linear: Tensor, initial: Tensor) -> None:
        net = network.detach().to(torch.float64)
        self.sq_gap += (net - linear.detach().to(torch.float64)).pow(2).sum()
        self.sq_moved += (net - initial.detach().to(torch.float64)).pow(2).sum()
        self.count += net.numel()

    def compute(self) -> dict[str, Tensor]:
        rms = torch.sqrt(self.sq_gap / self.count.clamp_min(1))
        gap, moved = torch.sqrt(self.sq_gap), torch.sqrt(self.sq_moved)
        # Before the network has moved (step 0) the ratio is 0 by definition (DESIGN §1), also for an
        # uncentered shadow, whose gap at init is just f_0; the absolute distance still reports that gap.
        rel = gap / moved if moved > 0 else torch.zeros((), dtype=torch.float64)
        return {"functional_distance": rms, "functional_distance_rel": rel}


class PredictionAgreement(Metric):
    """Classification view: how often network and shadow pick the same class, and each one's accuracy."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("sync_on_compute", False)
        super().__init__(**kwargs)
        self.add_state("same", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("net_correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("lin_correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("labelled", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, network: Tensor, linear: Tensor, target: Tensor | None = None) -> None:
        net_class, lin_class = network.argmax(dim=-1), linear.argmax(dim=-1)
        self.same += (net_class == lin_class).sum()
        self.total += net_class.numel()
        if target is not None and target.dim() == 1 and not target.is_floating_point():
            target = target.to(net_class.device)
            self.net_correct += (net_class == target).sum()
            self.lin_correct += (lin_class == target).sum()
            self.labelled += target.numel()

    def compute(self) -> dict[str, Tensor]:
        out = {"agreement": self.same.double() / self.total.clamp_min(1)}
        if self.labelled > 0:
            out["accuracy_network"] = self.net_correct.double() / self.labelled
            out["accuracy_linear"] = self.lin_correct.double() / self.labelled
        return out
