"""Shadow runs: each shadow trained in lock-step with the network, with its mirror and exit tracker.

The paper's shadow ``f_0 + Bᵀψ`` is always the first run (record keys without prefix); with
``memorization=True`` a run adds per-example offsets (keys under ``memo/``); with ``linearized=True``
a run trains the network's own first-order Taylor model ``f_0 + J_0(θ' − θ_0)`` (keys under
``linearized/``). All share one frozen ``f_0``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lin_probe._model_state import cpu_state_copy
from lin_probe.data import indices_from_batch
from lin_probe.kernel import AffineKernel
from lin_probe.monitor.batch_statistics import probe_batch_statistics
from lin_probe.monitor.config import MonitorConfig
from lin_probe.monitor.probe import ProbeSet
from lin_probe.monitor.regime import RegimeTracker
from lin_probe.shadows.digests import BatchDigests
from lin_probe.shadows.initial_cache import InitialOutputCache
from lin_probe.shadows.linear import FeaturesFn, LinearShadow
from lin_probe.shadows.linearized import LinearizedMirror, LinearizedShadow
from lin_probe.shadows.mirror import OptimizerMirror
from lin_probe.shadows.offsets import ExampleIds

PAPER = ""
"""Prefix of the paper's shadow's record keys (none: ``functional_distance`` etc.)."""
MEMO = "memo/"
"""Prefix of the memorizing shadow's record keys."""
LINEARIZED = "linearized/"
"""Prefix of the linearised network's record keys."""
SIDE_SHADOW_KEYS = ("functional_distance", "functional_distance_rel", "loss_linear")
"""What is reported for the memorizing and linearised shadows (the network's own values are not repeated)."""

HASHED_EXAMPLES_LIMIT = 1 << 22
"""Distinct hashed inputs allowed when the training set's size is unknown (64 MiB of digests)."""


@dataclass
class ShadowRun:
    """One shadow in lock-step with the network: its mirror, its exit tracker and (memorizing) example ids."""

    prefix: str
    shadow: LinearShadow | LinearizedShadow
    mirror: OptimizerMirror | LinearizedMirror
    regime: RegimeTracker
    example_ids: ExampleIds | None = None
    reported: tuple[str, ...] | None = None  # None: every value compare() gives

    def ids(self, x: Tensor, batch: Any, digests: BatchDigests | None = None) -> Tensor | None:
        """Example ids of a training batch: its indices (``WithIndex``) if it has them, else row hashes
        (``digests``: ``x``'s, staged when the batch arrived)."""
        if self.example_ids is None:
            return None
        return self.example_ids(x, indices_from_batch(batch), digests)

    def probe_ids(self, inputs: Tensor) -> Tensor | None:
        """Ids of probe rows that are training examples seen so far (hash mode only), else ``None``.

        In index mode inputs are not recorded, so the probe counts as held out: exact for the default
        validation probe, and documented for a training-set probe.
        """
        if self.example_ids is None or self.example_ids.mode != "hash":
            return None
        return self.example_ids.lookup(inputs)

    def state_dict(self) -> dict[str, Any]:
        return {
            "shadow": cpu_state_copy(self.shadow.state_dict()),
            "mirror": self.mirror.state_dict(),
            "regime": self.regime.state_dict(),
            "example_ids": None if self.example_ids is None else self.example_ids.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Shadow first: the mirror's state refers to its (possibly grown) offset table."""
        self.shadow.load_state_dict(state["shadow"])
        self.mirror.load_state_dict(state["mirror"])
        self.regime.load_state_dict(state["regime"])
        if self.example_ids is not None and state.get("example_ids") is not None:
            self.example_ids.load_state_dict(state["example_ids"])


def build_runs(
    model: nn.Module,
    kernel: AffineKernel,
    probe: ProbeSet,
    optimizer: torch.optim.Optimizer,
    config: MonitorConfig,
    copy_model: Callable[[nn.Module], nn.Module],
    train_size: int | None,
    features_fn: FeaturesFn | None = None,
) -> tuple[list[ShadowRun], nn.Module | None]:
    """The paper's run (and the memorizing and linearised ones), sharing one frozen ``f_0``.

    ``features_fn`` is the chosen data kernel's feature map (``None``: the flattened inputs). Returns
    the runs and ``f_0`` (``None`` only when nothing needs it: ``center=False`` without ``linearized``).
    """
    f0 = None
    if config.center or config.linearized:
        # Calibrated once, permanently: f_0's BatchNorms keep the probe's statistics at init
        # (lin_probe.monitor.batch_statistics), so f_0 is per-example and equals the measured network.
        with probe_batch_statistics(model, probe.inputs):
            f0 = copy_model(model)
    loss_fn = config.loss_fn
    # One cache of f_0's outputs on training inputs for every shadow that shares f_0 (exact: f_0 is frozen).
    cache = InitialOutputCache() if config.center else None

    def tracker() -> RegimeTracker:
        return RegimeTracker(config.tolerance, config.patience)

    def run(
        prefix: str, capacity: int | None, ids: ExampleIds | None, reported: tuple[str, ...] | None
    ) -> ShadowRun:
        shadow = LinearShadow.from_model(
            model,
            kernel,
            probe.inputs,
            initial_model=f0 if config.center else None,
            output_fn=config.output_fn,
            features_fn=features_fn,
            offsets_capacity=capacity,
        ).to(probe.inputs.device)
        shadow.initial_cache = cache
        mirror = OptimizerMirror(shadow, optimizer, loss_fn)
        return ShadowRun(prefix, shadow, mirror, tracker(), ids, reported)

    runs = [run(PAPER, None, None, None)]
    if config.memorization:
        limit = train_size if train_size is not None else HASHED_EXAMPLES_LIMIT
        runs.append(run(MEMO, train_size or 0, ExampleIds(max_examples=limit), SIDE_SHADOW_KEYS))
    if config.linearized:
        assert f0 is not None
        # f_0's state is checkpointed by the paper's shadow when centred; otherwise by this one.
        taylor = LinearizedShadow.from_model(
            model, f0, output_fn=config.output_fn, own_initial=not config.center
        )
        mirror = LinearizedMirror(taylor, optimizer, loss_fn, model=model)
        runs.append(ShadowRun(LINEARIZED, taylor, mirror, tracker(), None, SIDE_SHADOW_KEYS))
    return runs, f0


__all__ = [
    "HASHED_EXAMPLES_LIMIT",
    "LINEARIZED",
    "MEMO",
    "PAPER",
    "SIDE_SHADOW_KEYS",
    "ShadowRun",
    "build_runs",
]
