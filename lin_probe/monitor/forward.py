"""``CalledWith``: a module called the way its owner calls it, for a ``forward`` that takes more than the inputs.

Every measurement calls ``model(x)`` with the probe's inputs alone. A module whose ``forward`` needs
more (Lightning's demo ``LightningTransformer.forward(inputs, target)``, a mask, a flag) is wrapped:
``CalledWith(module, forward_fn)`` is a module whose ``forward(x)`` is ``forward_fn(module, x)``, with
``module`` registered as its one child. Its parameters *are* the module's (named ``module.*``), so
NTKs, the frozen copy ``f_0``, per-layer hooks and BatchNorm statistics all see the user's model, and
nothing about that model is changed: no subclass, no patched ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lin_probe._validation import check_callable

ForwardFn = Callable[[nn.Module, Any], Any]


class CalledWith(nn.Module):
    """``module`` as the function ``x ↦ forward_fn(module, x)`` (module docstring)."""

    def __init__(self, module: nn.Module, forward_fn: ForwardFn) -> None:
        super().__init__()
        check_callable("forward_fn", forward_fn)
        self.module = module
        self.forward_fn = forward_fn

    def forward(self, x: Any) -> Any:
        return self.forward_fn(self.module, x)


def called_with(module: nn.Module, forward_fn: ForwardFn | None) -> nn.Module:
    """``module`` itself without a ``forward_fn``, else a new :class:`CalledWith` around it."""
    if forward_fn is None:
        return module
    return CalledWith(module, forward_fn)


__all__ = ["CalledWith", "ForwardFn", "called_with"]
