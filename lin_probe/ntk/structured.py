"""Exact NTK blocks of ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` layers without per-example Jacobians.

A layer ``y_l = W P_l + bias`` applied at ``L`` positions ``l`` (one for a plain Linear, the tokens of
a sequence Linear, the output pixels of a convolution; ``P_l`` is the input patch) has, for model
output ``k`` and example ``i``, the gradients ``∂f_k/∂W = Σ_l Δ_{k,i,l} P_{i,l}ᵀ`` and
``∂f_k/∂bias = Σ_l Δ_{k,i,l}`` with the cotangent ``Δ_{k,i,l} = ∂f_k(x_i)/∂y_{i,l}``. Its block of
``Σ_k J_k J_kᵀ`` is therefore a contraction of the layer inputs and the output cotangents:

* *patch Gram* — ``Σ_{l,l'} (Δ_{i,l}·Δ_{j,l'}) ⊙ (w_W P_{i,l}·P_{j,l'} + w_b)``, the dot over ``Δ``
  running over (outputs ``k``, channels); ``n²L²(C·C_out + D)`` flops. For a plain Linear
  (``L = 1``) this is ``(Σ_k Δ_k Δ_kᵀ) ⊙ (w_W A Aᵀ + w_b)``.
* *weight gradients* — form ``g_{i} = Σ_l Δ_{i,l} ⊗ P_{i,l}`` (``C·C_out·D`` numbers per example,
  ``nLC·C_out·D`` flops) and take ``g gᵀ`` (``n²C·C_out·D``); wins for convolutions with many
  positions and few weights.

Each layer gets the cheaper one (grouped convolutions: per group, ``D = C_in/groups · Πkernel``).
``Δ`` for every output comes from one recorded forward per example chunk and one batched backward
over the ``C`` outputs (``is_grads_batched``): a zero tensor is added to each layer's output by a
forward hook and the gradient with respect to it is ``Δ``.

Exactness guards (any failure sends the layer's parameters back to the generic torch.func path):
exact module types only (a subclass may override ``forward``), no parametrizations, the module
called exactly once per forward (weight sharing by repeated calls), batched inputs whose leading
dimension indexes the examples; a tensor tied to another module goes generic on its own. Like
:func:`lin_probe.ntk.predict`, the recorded forward is batched, so examples must not interact in
eval mode (the generic path evaluates each example alone). A parameter read outside its module's
own call (``x @ self.fc.weight`` elsewhere in a custom ``forward``) cannot be seen by hooks and is
not supported on this path: use ``method="generic"`` for such models.

Memory: with ``a`` the bytes autograd saves for one example's forward and ``isz`` the item size,
one example costs ``t = (C + 1)·a + Σ_layers (C·|y| + L·G·D)·isz`` while being recorded (graph,
batched backward, cotangents, patches) and ``r = Σ_layers rep·isz`` once reduced (weight
gradients: ``C·C_out·(D + 1)``; patch Gram: ``L·G·(C·O + D)``; bias only: ``C·C_out``). Chunks of
``b`` examples satisfy ``b·(t + 2r) ≤ budget``; if every chunk's reduction fits in half the budget
(``n·r ≤ budget/2``) each chunk is recorded once, otherwise two chunks are kept at a time and the
others recomputed, as in the generic path. Patch Gram products are sub-blocked so their two
``(sL)²`` matrices stay under a quarter of the budget. A single example over the budget sends the
whole kernel to the generic path, which can also slice outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from lin_probe._model_state import eval_semantics
from lin_probe.ntk._plumbing import clamp, dtype_itemsize, saved_bytes, slices, span, stream_block_pairs

ToMatrix = Callable[[Any, int], Tensor]
"""``(raw model output, batch) → (batch, C)``: the caller's output selection and checks."""

STRUCTURED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""Module types with a structured Gram (exact types: a subclass may change ``forward``)."""


class NotStructurable(RuntimeError):
    """A recorded forward broke an assumption the probe pass had checked (e.g. data-dependent calls)."""


@dataclass
class _Layer:
    """One structurable module, its differentiated parameter names and weights, and per-example sizes."""

    name: str
    module: nn.Module
    weight: str | None
    bias: str | None
    w_weight: float
    w_bias: float
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    strategy: str = ""

    @property
    def groups(self) -> int:
        return self.module.groups if isinstance(self.module, nn.Conv1d | nn.Conv2d) else 1

    @property
    def positions(self) -> int:
        """``L``: positions the weight is applied at, per example."""
        if isinstance(self.module, nn.Linear):
            return math.prod(self.out_shape[:-1])
        return math.prod(self.out_shape[1:])

    @property
    def patch_size(self) -> int:
        """``D``: weight entries per output channel (``C_in/groups · Πkernel``)."""
        return self.module.weight[0].numel()

    @property
    def out_channels(self) -> int:
        return self.module.weight.shape[0]


@dataclass
class _Features:
    """A chunk's reduced per-layer quantities (see the module docstring), ready for Gram products."""

    grads: Tensor | None = None  # (b, C·G·O·D) weight gradients, flattened over outputs
    bias: Tensor | None = None  # (b, C·C_out) bias gradients
    delta: Tensor | None = None  # (b, L, G, C·O) cotangents, patch Gram strategy
    patches: Tensor | None = None  # (b, L, G, D)


@dataclass
class _Recording:
    """What the forward hooks saw in one pass."""

    calls: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, Tensor] = field(default_factory=dict)
    taps: dict[str, Tensor] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ public


def structured_ntk(
    model: nn.Module,
    inputs: Tensor,
    params: Mapping[str, Tensor],
    *,
    to_matrix: ToMatrix,
    weights: Mapping[str, float],
    memory_budget: int,
    chunk_size: int | None,
    dtype: torch.dtype,
) -> tuple[Tensor, set[str]] | None:
    """``((1/C) Σ_c Σ_{p ∈ covered} w_p J_{c,p} J_{c,p}ᵀ, covered)`` over the structurable layers.

    ``covered`` is the set of parameter names handled here; the caller adds the generic kernel of
    the others. ``None`` when no parameter of ``params`` is structurable (or one example does not
    fit ``memory_budget``). Raises :class:`NotStructurable` if a chunk's forward contradicts the
    one-example probe (the caller then falls back).
    """
    layers = candidate_layers(model, params, weights)
    if not layers:
        return None
    n = inputs.shape[0]
    with eval_semantics(model):
        constants = {name: p.detach() for name, p in model.named_parameters()}
        constants.update({name: b.detach() for name, b in model.named_buffers()})
        layers, width, act_bytes = _probe(model, constants, layers, inputs[:1], to_matrix)
        if not layers:
            return None
        itemsize = dtype_itemsize(dtype)
        for layer in layers:
            layer.strategy = _choose_strategy(layer, n, width)
        transient = (width + 1) * act_bytes + itemsize * sum(_transient_numel(ly, width) for ly in layers)
        reduced = itemsize * sum(_reduced_numel(ly, width) for ly in layers)
        if chunk_size is None and transient + 2 * reduced > memory_budget:
            return None
        b = chunk_size or clamp(memory_budget // max(1, transient + 2 * reduced), 1, n)
        gram_budget = max(1, memory_budget // 4)

        def features(rows: slice) -> list[_Features]:
            return _chunk_features(model, constants, layers, inputs[rows], to_matrix, width, dtype)

        def gram(fi: list[_Features], fj: list[_Features]) -> Tensor:
            return sum(
                (
                    _layer_gram(ly, a, c, gram_budget, itemsize)
                    for ly, a, c in zip(layers, fi, fj, strict=True)
                ),
                torch.zeros(()),
            )

        theta = torch.zeros(n, n, dtype=dtype, device=inputs.device)
        _pairwise(theta, list(slices(n, b)), features, gram, cache=n * reduced <= memory_budget // 2)
    covered = {name for ly in layers for name in (ly.weight, ly.bias) if name is not None}
    return (theta + theta.T) / (2 * width), covered


def candidate_layers(
    model: nn.Module, params: Mapping[str, Tensor], weights: Mapping[str, float]
) -> list[_Layer]:
    """Modules of an exact structured type with a differentiated, untied weight or bias; not parametrized."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    layers = []
    for name, module in model.named_modules():
        if type(module) not in STRUCTURED_TYPES or parametrize.is_parametrized(module):
            continue
        own = dict(module.named_parameters(recurse=False))
        prefix = f"{name}." if name else ""
        # a tensor tied to another module has gradient terms from both: leave it to the generic path
        picked = {
            key: prefix + key if prefix + key in params and owners[id(own[key])] == 1 else None
            for key in ("weight", "bias")
        }
        if picked["weight"] is None and picked["bias"] is None:
            continue
        layers.append(
            _Layer(
                name=name,
                module=module,
                weight=picked["weight"],
                bias=picked["bias"],
                w_weight=float(weights.get(picked["weight"] or "", 1.0)),
                w_bias=float(weights.get(picked["bias"] or "", 1.0)),
            )
        )
    return layers


# -------------------------------------------------------------------------------------- recording


def _record(
    model: nn.Module, constants: dict[str, Tensor], layers: list[_Layer], x: Tensor, to_matrix: ToMatrix
) -> tuple[Tensor, _Recording]:
    """One grad-enabled forward with a zero "tap" added to each layer's output; returns ``(b, C)`` outputs.

    Parameters and buffers are detached constants, so autograd only tracks paths into the taps.
    Hooks are prepended (so other forward hooks see the tapped output) and always removed.
    """
    rec = _Recording(calls={ly.name: 0 for ly in layers})

    def make_hook(name: str) -> Callable[..., Tensor]:
        def hook(_module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            rec.calls[name] += 1
            rec.inputs[name] = args[0].detach() if args and isinstance(args[0], Tensor) else torch.empty(0)
            tap = torch.zeros_like(out, requires_grad=True)
            rec.taps[name] = tap
            return out + tap

        return hook

    handles = [ly.module.register_forward_hook(make_hook(ly.name), prepend=True) for ly in layers]
    try:
        with torch.enable_grad():
            out = to_matrix(functional_call(model, constants, (x,)), x.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return out, rec


def _probe(
    model: nn.Module, constants: dict[str, Tensor], layers: list[_Layer], first: Tensor, to_matrix: ToMatrix
) -> tuple[list[_Layer], int, int]:
    """Record one example: keep layers called once on a batched input; the width ``C`` and saved bytes ``a``.

    Saved tensors that are parameters or buffers are not counted (they exist once, whatever the chunk).
    """
    with saved_bytes(constants.values()) as saved:
        out, rec = _record(model, constants, layers, first, to_matrix)
    kept = []
    for ly in layers:
        if rec.calls[ly.name] != 1:
            continue  # unused or weight-shared by repeated calls: generic path
        a, y = rec.inputs[ly.name], rec.taps[ly.name]
        if not _batched_shapes(ly.module, a, y):
            continue
        ly.in_shape, ly.out_shape = tuple(a.shape[1:]), tuple(y.shape[1:])
        kept.append(ly)
    return kept, out.shape[1], saved[0]


def _batched_shapes(module: nn.Module, a: Tensor, y: Tensor) -> bool:
    """The one-example call has a leading example dimension of 1 and the rank the layer math assumes."""
    rank = {nn.Conv1d: 3, nn.Conv2d: 4}.get(type(module))
    if a.dim() < 2 or a.shape[0] != 1 or y.shape[0] != 1:
        return False
    return rank is None or a.dim() == rank


def _cotangents(out: Tensor, taps: list[Tensor]) -> list[Tensor]:
    """``Δ`` per tap, ``(C, b, *y.shape[1:])``: one batched backward over the ``C`` unit cotangents."""
    b, width = out.shape
    if not out.requires_grad:
        return [torch.zeros(width, *t.shape, dtype=t.dtype, device=t.device) for t in taps]
    eye = torch.eye(width, dtype=out.dtype, device=out.device)
    units = eye[:, None, :].expand(width, b, width)
    grads = torch.autograd.grad(out, taps, units, is_grads_batched=True, allow_unused=True)
    return [
        torch.zeros(width, *t.shape, dtype=t.dtype, device=t.device) if g is None else g
        for g, t in zip(grads, taps, strict=True)
    ]


def _chunk_features(
    model: nn.Module,
    constants: dict[str, Tensor],
    layers: list[_Layer],
    x: Tensor,
    to_matrix: ToMatrix,
    width: int,
    dtype: torch.dtype,
) -> list[_Features]:
    """Record a chunk, get every layer's ``Δ`` and reduce each layer to its strategy's features."""
    out, rec = _record(model, constants, layers, x, to_matrix)
    b = x.shape[0]
    for ly in layers:
        a, y = rec.inputs.get(ly.name), rec.taps.get(ly.name)
        if (
            rec.calls[ly.name] != 1
            or a is None
            or y is None
            or tuple(a.shape) != (b, *ly.in_shape)
            or tuple(y.shape) != (b, *ly.out_shape)
            or out.shape[1] != width
        ):
            raise NotStructurable(f"layer {ly.name!r} behaved differently on a batch than on one example")
    deltas = _cotangents(out, [rec.taps[ly.name] for ly in layers])
    feats = []
    for ly, delta in zip(layers, deltas, strict=True):
        std = _standard_delta(ly, delta.to(dtype))
        patches = _patches(ly, rec.inputs[ly.name].to(dtype)) if ly.weight is not None else None
        feats.append(_reduce(ly, std, patches))
    return feats


# ---------------------------------------------------------------------------------- layer algebra


def _standard_delta(ly: _Layer, delta: Tensor) -> Tensor:
    """``(C, b, *y)`` cotangents → ``(b, L, G, C, O)`` (positions, groups, outputs, channels per group)."""
    width, b = delta.shape[:2]
    groups, channels = ly.groups, ly.out_channels
    if isinstance(ly.module, nn.Linear):
        d = delta.reshape(width, b, -1, 1, channels)  # (C, b, L, 1, O)
    else:
        d = delta.reshape(width, b, groups, channels // groups, -1).permute(0, 1, 4, 2, 3)
    return d.permute(1, 2, 3, 0, 4)


def _patches(ly: _Layer, a: Tensor) -> Tensor:
    """Layer input → patches ``(b, L, G, D)``, ordered like ``weight[o].reshape(-1)`` within each group."""
    b = a.shape[0]
    module = ly.module
    if isinstance(module, nn.Linear):
        return a.reshape(b, -1, 1, a.shape[-1])
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    pads = _padding(module)
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad lists the last dimension first
    if any(flat):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        a = F.pad(a, flat, mode=mode)
    spatial = len(module.kernel_size)
    for dim, (k, d, st) in enumerate(zip(module.kernel_size, module.dilation, module.stride, strict=True)):
        # windows of the dilated extent, every `stride`, then every `d`-th tap: (b, C_in, *L, *kernel)
        a = a.unfold(2 + dim, d * (k - 1) + 1, st)[..., ::d]
    positions = math.prod(a.shape[2 : 2 + spatial])
    order = (0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial))
    return a.permute(order).reshape(b, positions, module.groups, -1)


def _padding(module: nn.Conv1d | nn.Conv2d) -> list[tuple[int, int]]:
    """``(before, after)`` per spatial dimension; ``"same"`` puts the odd extra on the right, as torch does."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(int(p), int(p)) for p in module.padding]


def _choose_strategy(ly: _Layer, n: int, width: int) -> str:
    """The cheaper contraction by flop count (module docstring); ``"bias"`` when only the bias trains."""
    if ly.weight is None:
        return "bias"
    positions, groups, d = ly.positions, ly.groups, ly.patch_size
    per_group = ly.out_channels // groups
    grads = n * width * groups * per_group * positions * d + n * n * width * groups * per_group * d
    patch = n * n * positions * positions * groups * (width * per_group + d)
    return "grads" if grads < patch else "patch"


def _transient_numel(ly: _Layer, width: int) -> int:
    """Per-example numbers alive while a chunk is recorded: cotangents and patches."""
    patch = ly.positions * ly.groups * ly.patch_size if ly.weight is not None else 0
    return width * math.prod(ly.out_shape) + patch


def _reduced_numel(ly: _Layer, width: int) -> int:
    """Per-example numbers a layer keeps for Gram products (module docstring)."""
    bias = width * ly.out_channels
    if ly.strategy == "grads":
        return width * ly.out_channels * ly.patch_size + bias
    if ly.strategy == "patch":
        return ly.positions * (width * ly.out_channels + ly.groups * ly.patch_size)
    return bias


def _reduce(ly: _Layer, delta: Tensor, patches: Tensor | None) -> _Features:
    """A chunk's ``(b, L, G, C, O)`` cotangents and patches → the features its strategy multiplies."""
    b = delta.shape[0]
    bias = delta.sum(dim=1).reshape(b, -1) if ly.bias is not None else None
    if ly.strategy == "bias":
        return _Features(bias=bias)
    assert patches is not None
    if ly.strategy == "grads":
        grads = torch.einsum("blgko,blgd->bgkod", delta, patches).reshape(b, -1)
        return _Features(grads=grads, bias=bias)
    return _Features(delta=delta.flatten(3), patches=patches)


def _layer_gram(ly: _Layer, fi: _Features, fj: _Features, budget: int, itemsize: int) -> Tensor:
    """``Σ_k w_W ⟨∂_W f_k(x_i), ∂_W f_k(x_j)⟩ + w_b ⟨∂_b f_k(x_i), ∂_b f_k(x_j)⟩`` for a chunk pair."""
    if ly.strategy == "patch":
        return _patch_gram(ly, fi, fj, budget, itemsize)
    total = torch.zeros(())
    if fi.grads is not None and fj.grads is not None:
        total = total + ly.w_weight * (fi.grads @ fj.grads.T)
    if fi.bias is not None and fj.bias is not None:
        total = total + ly.w_bias * (fi.bias @ fj.bias.T)
    return total


def _patch_gram(ly: _Layer, fi: _Features, fj: _Features, budget: int, itemsize: int) -> Tensor:
    """``Σ_g Σ_{l,l'} (Δ_{i,l}·Δ_{j,l'}) ⊙ (w_W P_{i,l}·P_{j,l'} + w_b)``, sub-blocked to two ``(sL)²`` products."""
    assert fi.delta is not None and fj.delta is not None and fi.patches is not None and fj.patches is not None
    bi, positions, groups = fi.delta.shape[:3]
    bj = fj.delta.shape[0]
    w_b = ly.w_bias if ly.bias is not None else 0.0
    s = clamp(math.isqrt(max(1, budget // (2 * itemsize))) // positions, 1, max(bi, bj))
    out = torch.zeros(bi, bj, dtype=fi.delta.dtype, device=fi.delta.device)
    for g in range(groups):
        for ri in slices(bi, s):
            di, pi = fi.delta[ri, :, g].flatten(0, 1), fi.patches[ri, :, g].flatten(0, 1)
            for rj in slices(bj, s):
                dj, pj = fj.delta[rj, :, g].flatten(0, 1), fj.patches[rj, :, g].flatten(0, 1)
                prod = (di @ dj.T) * (ly.w_weight * (pi @ pj.T) + w_b)
                out[ri, rj] += prod.reshape(span(ri), positions, span(rj), positions).sum(dim=(1, 3))
    return out


# ------------------------------------------------------------------------------------ chunk pairs


def _pairwise(
    theta: Tensor,
    chunks: list[slice],
    features: Callable[[slice], list[_Features]],
    gram: Callable[[list[_Features], list[_Features]], Tensor],
    *,
    cache: bool,
) -> None:
    """Fill ``theta`` block pair by block pair (upper triangle mirrored).

    With ``cache`` every chunk's features are computed once and kept; otherwise two chunks'
    features are alive at once and the others recomputed, in the generic path's order
    (:func:`lin_probe.ntk._plumbing.stream_block_pairs`).
    """

    def add(i: int, j: int, fi: list[_Features], fj: list[_Features]) -> None:
        block = gram(fi, fj).to(theta.dtype)
        theta[chunks[i], chunks[j]] += block
        if i != j:
            theta[chunks[j], chunks[i]] += block.T

    if cache:
        stored = [features(c) for c in chunks]
        for i in range(len(chunks)):
            for j in range(i, len(chunks)):
                add(i, j, stored[i], stored[j])
        return
    stream_block_pairs(len(chunks), lambda i: features(chunks[i]), add)
