"""Measure a model without leaving a trace on it.

A monitor runs extra forward passes on the user's model. Those passes must use eval semantics
(no dropout noise, BatchNorm on running statistics — which the monitor first sets to the probe's own
batch statistics, :mod:`lin_probe.monitor.batch_statistics`) and must leave train/eval flags, ``.grad``s,
buffers and every global RNG stream exactly as they were, so that a run with the monitor is
bit-identical to one without.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Restore the python, numpy, torch CPU (and CUDA, if initialised) RNG states on exit."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else [], enabled=True):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def eval_semantics(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the duration, then restore each one's own flag.

    Restoring per submodule (not a blanket ``model.train(mode)``) keeps user setups such as a
    frozen BatchNorm inside a training model intact.
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with preserved_rng_state():
            yield model
    finally:
        for module, flag in flags:
            module.training = flag


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Named parameters with ``requires_grad`` (the ones an optimizer trains), detached."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            "The model has no trainable parameters (none with requires_grad=True), so its NTK is zero. "
            "Unfreeze the parameters you train, or probe the submodule that is trained."
        )
    return params


def model_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Named buffers, detached (BatchNorm running stats are read, never written, in eval mode)."""
    return {name: b.detach() for name, b in model.named_buffers()}


def cpu_state_copy(state: Mapping[str, Any]) -> dict[str, Any]:
    """A detached CPU copy of a state dict (tensors cloned, other entries deep-copied) for checkpoints."""
    return {
        k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
        for k, v in state.items()
    }


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (``None`` for a stateless module)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


def floating_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating parameter (probe inputs are cast to it); ``None`` if none."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def frozen_copy(model: nn.Module, *, exclude: Iterable[object] = ()) -> nn.Module:
    """A deep copy of ``model`` in eval mode with no gradients: the network's function at this moment.

    Every object in ``exclude`` (e.g. a training loop that a module keeps a reference to) comes out
    as ``None`` in the copy instead of being copied with it: seeding ``deepcopy``'s memo with them
    covers every reference, including ones a user stored on a submodule.
    """
    memo: dict[int, Any] = {id(obj): None for obj in exclude}
    try:
        copied = copy.deepcopy(model, memo)
    except Exception as err:  # deepcopy raises many types (RuntimeError for non-leaf tensors, ...)
        raise TypeError(
            f"Could not deep-copy the model to keep its initial function f_0 ({type(err).__name__}: {err}). "
            "Make the model deep-copyable (no non-leaf tensors or open handles as attributes), or pass "
            "center=False to use the pure linear model without f_0."
        ) from err
    copied.requires_grad_(False)
    copied.eval()
    for param in copied.parameters():
        param.grad = None
    return copied
