"""Measure the network that is being trained: BatchNorm on the probe's own batch statistics.

Why: the monitor measures in eval mode (no dropout noise, nothing written to the model), but an
eval-mode BatchNorm normalises with its *running* statistics (mean 0, variance 1 at init), so the
kernel and outputs measured would be those of a different network from the one train mode runs;
and as the running statistics converge that network changes even when the weights do not
(``ntk_drift`` of 96 after 10 steps at ``lr = 1e-8``, an "exit" at step 1).

Semantics: a measurement of the live model on the probe (``Θ_t``, the network's outputs for the
functional distance, the affine fit at init, the kernel at the exit) uses, for every
:class:`torch.nn.modules.batchnorm._BatchNorm` that is in training mode and tracks running
statistics, the probe's own per-channel batch mean and biased variance *at the current weights*,
held fixed (not differentiated). That is the function train mode computes on a batch like the
probe, it makes the measured kernel per-example (examples do not interact through the statistics,
so ``Θ`` is a kernel of single examples) and it does not depend on the running statistics'
momentum. A BatchNorm the user put in eval mode (a frozen one) keeps its running statistics, and
one without running statistics (``track_running_stats=False``) normalises per batch as always.
Dropout stays off in every measurement.

``f_0``, the frozen copy at init, is calibrated once, permanently, with the probe's statistics at
init (:func:`probe_batch_statistics` around the copy), so ``f_0`` is deterministic per example on
training batches and on the probe, and equals the measured network at init.

Implementation: :func:`probe_batch_statistics` runs one forward of the probe under ``no_grad`` in
eval mode with forward pre-hooks that write each such BatchNorm's input statistics into its
``running_mean``/``running_var`` in place just before it runs (so deeper layers see train-mode
normalisation of their inputs), then yields with the model in eval mode; on exit every buffer is
restored bit-exactly, the hooks removed and the train/eval flags and RNG streams restored, even on
an exception. A model without such BatchNorms gets no extra forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lin_probe._model_state import eval_semantics


def training_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorms whose train-mode function differs from their eval one: training, with running stats."""
    return [
        module
        for module in model.modules()
        if isinstance(module, _BatchNorm)
        and module.training
        and module.track_running_stats
        and module.running_mean is not None
        and module.running_var is not None
    ]


def _install_statistics(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook: this BatchNorm's input's per-channel mean and biased variance become its running stats."""
    x = args[0]
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(
            f"probe_batch_statistics: a BatchNorm got a {type(x).__name__} input of shape "
            f"{tuple(getattr(x, 'shape', ()))}; expected a tensor (N, C, ...)."
        )
    dims = [0, *range(2, x.dim())]
    # In the input's own precision when it is float32 or float64, as BatchNorm's train mode computes
    # them (the float64 copy of a ResNet stem's activations doubled the time; the statistics moved
    # by ~6e-8 relative, below the float32 buffers' rounding); half precisions are widened.
    wide = x.detach() if x.dtype in (torch.float32, torch.float64) else x.detach().float()
    var, mean = torch.var_mean(wide, dim=dims, unbiased=False)
    module.running_mean.copy_(mean)  # type: ignore[union-attr]
    module.running_var.copy_(var)  # type: ignore[union-attr]


@contextlib.contextmanager
def probe_batch_statistics(model: nn.Module, inputs: Tensor) -> Iterator[nn.Module]:
    """Within: ``model`` in eval mode, its training BatchNorms normalising with ``inputs``' batch statistics.

    See the module docstring for why. Nested use is a no-op (inside, no BatchNorm is in training mode).
    """
    norms = training_batchnorms(model)
    if not norms:
        with eval_semantics(model):
            yield model
        return
    saved = [
        (buffer, buffer.detach().clone())
        for module in norms
        for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
        if buffer is not None
    ]
    hooks = []
    try:
        with eval_semantics(model):
            hooks = [module.register_forward_pre_hook(_install_statistics) for module in norms]
            try:
                with torch.no_grad():
                    model(inputs)
            finally:
                for hook in hooks:
                    hook.remove()
            yield model
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


__all__ = ["probe_batch_statistics", "training_batchnorms"]
