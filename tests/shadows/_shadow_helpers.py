"""What the shadows' tests share: independent references (``ψ`` and ``∂L/∂f`` in closed form, torch's
SGD update rule written out from its documentation — one copy, used by the readout replay in
``test_mirror.py`` and the function-space replay in ``test_offsets.py``) and small builders."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lin_probe.kernel import AffineKernel
from lin_probe.shadows.linear import LinearShadow

SGD_COMBOS = [
    dict(momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0.0, maximize=False),
    dict(momentum=0.9, nesterov=False, weight_decay=0.0, dampening=0.0, maximize=False),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2, dampening=0.0, maximize=False),
    dict(momentum=0.8, nesterov=False, weight_decay=5e-3, dampening=0.3, maximize=False),
    dict(momentum=0.8, nesterov=False, weight_decay=5e-2, dampening=0.3, maximize=False),
    dict(momentum=0.5, nesterov=False, weight_decay=1e-2, dampening=0.1, maximize=True),
]


def combo_id(hp: dict) -> str:
    """A readable pytest id for one SGD_COMBOS entry."""
    return "-".join(f"{k}={v}" for k, v in hp.items())


def mlp(d: int, c: int, seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A small tanh MLP ``d → 16 → c`` with seeded weights."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, c)).to(dtype)


def centred_shadow(model: nn.Module, kernel: AffineKernel, inputs: Any, **kwargs: Any) -> LinearShadow:
    """``LinearShadow.from_model`` with ``f_0`` a deep copy of ``model`` (what a plain-PyTorch caller passes)."""
    return LinearShadow.from_model(model, kernel, inputs, initial_model=copy.deepcopy(model), **kwargs)


def roundtrip(state: dict) -> dict:
    """``state`` through ``torch.save``/``torch.load(weights_only=True)``: what a Lightning checkpoint holds."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def psi(x: Tensor, a: float, b: float) -> Tensor:
    """ψ(x) = [√a·x/√d ; √b] (float64), so that ψψᵀ = a·XXᵀ/d + b·11ᵀ."""
    flat = x.reshape(x.shape[0], -1).double()
    d = flat.shape[1]
    return torch.cat(
        [
            math.sqrt(a) * flat / math.sqrt(d),
            torch.full((flat.shape[0], 1), math.sqrt(b), dtype=torch.float64),
        ],
        dim=1,
    )


def loss_grad_wrt_f(f: Tensor, y: Tensor, loss: str) -> Tensor:
    """∂L/∂f of a batch's mean loss in closed form: MSE 2(f−y)/(n·C); CE (softmax(f) − onehot(y))/n."""
    n, c = f.shape
    if loss == "mse":
        return 2.0 * (f - y.reshape(n, c)) / (n * c)
    return (torch.softmax(f, dim=1) - F.one_hot(y, c).double()) / n


class SgdRecurrence:
    """torch.optim.SGD's rule on a gradient ``g`` of a parameter ``θ``, written out from the torch docs.

    ``maximize``: ``g ← −g``; weight decay: ``g ← g + wd·θ``; momentum: ``buf ← g`` (cloned) at the
    first step, then ``buf ← μ·buf + (1−τ)·g``; direction ``g + μ·buf`` (Nesterov) or ``buf``.
    The rule is linear, so it applies unchanged in function space (``θ`` then is ``f − f_0``).
    """

    def __init__(self, hp: dict) -> None:
        self.hp = hp
        self.buf: Tensor | None = None

    def direction(self, grad: Tensor, theta: Tensor) -> Tensor:
        """The step direction ``d`` (the update is ``θ ← θ − lr·d``)."""
        hp = self.hp
        g = -grad if hp["maximize"] else grad
        g = g + hp["weight_decay"] * theta
        if hp["momentum"] == 0:
            return g
        if self.buf is None:
            self.buf = g.clone()
        else:
            self.buf = hp["momentum"] * self.buf + (1 - hp["dampening"]) * g
        return g + hp["momentum"] * self.buf if hp["nesterov"] else self.buf
