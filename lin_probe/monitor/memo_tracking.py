"""The memorizing shadow's bookkeeping during a run: ids per batch, mirrored steps, its own exit.

The paper's shadow has kernel ``aK + b11ᵀ``; the network's NTK at init also has ``c·I``, which
lets it fit its own training points. ``MemoTracker`` keeps the shadow that has that term
(:mod:`lin_probe.memo`) in lock-step beside the paper's one, so a departure of the paper's shadow
can be told apart from a change of the network's kernel. Like :mod:`lin_probe.measure`, nothing
here knows about Lightning: the callback passes in what it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lin_probe._model_state import cpu_state_copy
from lin_probe.data import indices_from_batch
from lin_probe.kernel import AffineKernel
from lin_probe.monitor.losses import LossFn
from lin_probe.monitor.measure import ProbeMeasurer
from lin_probe.monitor.regime import RegimeTracker
from lin_probe.shadows.offsets import UNKNOWN_ID, ExampleIds, MemorizingShadow, MemorizingShadowTrainer

#: Prefix of the memorizing shadow's tags (``lin_probe/memo/...``).
MEMO = "memo/"
#: What is reported for the memorizing shadow (the network's own values are not repeated).
MEMO_KEYS = ("functional_distance", "functional_distance_rel", "loss_linear")


class MemoTracker:
    """The memorizing shadow, its mirrored optimizer, example identities and exit tracker."""

    def __init__(
        self,
        shadow: MemorizingShadow,
        stepper: MemorizingShadowTrainer,
        example_ids: ExampleIds,
        regime: RegimeTracker,
    ) -> None:
        self.shadow = shadow
        self.stepper = stepper
        self.example_ids = example_ids
        self.regime = regime

    @classmethod
    def build(
        cls,
        model: nn.Module,
        kernel: AffineKernel,
        probe_inputs: Tensor,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        *,
        center: bool,
        output_fn: Callable[[Any], Tensor] | None,
        features_fn: Callable[[Tensor], Tensor] | None,
        capacity: int | None,
        tolerance: float,
        patience: int,
    ) -> MemoTracker:
        """``capacity`` (the training set's length, when known) preallocates the ``N_train × C`` offsets."""
        shadow = MemorizingShadow.from_model(
            model,
            kernel,
            probe_inputs,
            center=center,
            output_fn=output_fn,
            features_fn=features_fn,
            capacity=capacity,
        ).to(probe_inputs.device)
        stepper = MemorizingShadowTrainer(shadow, optimizer, loss_fn)
        return cls(shadow, stepper, ExampleIds(), RegimeTracker(tolerance, patience))

    def batch_ids(self, batch: Any, x: Tensor) -> Tensor:
        """Example ids of a training batch: its indices (``WithIndex``) if it has them, else row hashes."""
        return self.example_ids(x, indices_from_batch(batch))

    def accumulate(self, x: Tensor, y: Tensor, ids: Tensor, scale: float) -> None:
        self.stepper.accumulate(x, y, ids, scale=scale)

    def step(self, lr: float, reduce_grad: Callable[[Tensor], Tensor] | None) -> None:
        self.stepper.step(lr=lr, reduce_grad=reduce_grad)

    def discard(self) -> None:
        self.stepper.discard()

    def probe_offsets(self, probe_inputs: Tensor) -> Tensor | None:
        """``√c·u_i`` for probe rows that are training examples seen so far (hash mode), else ``None``.

        In index mode inputs are not recorded, so the probe counts as held out: exact for the default
        validation probe, and documented for a training-set probe.
        """
        if self.example_ids.mode != "hash":
            return None
        ids = self.example_ids.lookup(probe_inputs)
        if bool((ids == UNKNOWN_ID).all()):
            return None
        return self.shadow.memo(ids, probe_inputs.shape[0])

    def measure(
        self, measurer: ProbeMeasurer, network: Tensor, initial_outputs: Tensor, step: int
    ) -> dict[str, float]:
        """``memo/`` entries of one check, plus ``memo/exit_step`` at the check that confirms its exit."""
        linear = measurer.shadow_outputs(
            self.shadow, initial_outputs, self.probe_offsets(measurer.probe.inputs)
        )
        compared = measurer.compare(network, linear, initial_outputs)
        record = {MEMO + key: compared[key] for key in MEMO_KEYS if key in compared}
        if self.regime.update(step, record[MEMO + "functional_distance_rel"]):
            record[MEMO + "exit_step"] = float(self.regime.exit_step)  # type: ignore[arg-type]
        return record

    def state_dict(self) -> dict[str, Any]:
        return {
            "shadow": cpu_state_copy(self.shadow.state_dict()),
            "optimizer": self.stepper.state_dict(),
            "example_ids": self.example_ids.state_dict(),
            "regime": self.regime.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Shadow first: the optimizer state refers to its (possibly grown) offset table."""
        self.shadow.load_state_dict(state["shadow"])
        self.stepper.load_state_dict(state["optimizer"])
        self.example_ids.load_state_dict(state["example_ids"])
        self.regime.load_state_dict(state["regime"])
