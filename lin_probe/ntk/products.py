"""Matrix-free NTK products ``u ↦ Θu``, for probe sets too large for the ``n × n`` kernel.

``Θu = (1/C) Σ_c J_c (w ⊙ J_cᵀu)``: one vjp per output (vmapped over a slice of ``k`` outputs,
``k·r ≤ budget/2`` for the accumulated ``J_cᵀu``), summed over example chunks, then one jvp per
output and chunk; only the diagonal ``c``-th output of the ``c``-th jvp is kept, so no
cross-output terms appear and no Jacobian is ever built. Example chunks satisfy
``b·k·(a + k·itemsize) ≤ budget/2``, with ``r`` and ``a`` measured on one example as for the dense
kernel (:mod:`lin_probe.ntk.dense` defines them).

Models vmap cannot batch (``nn.RNNBase``, ops without a batching rule) get the same products from
plain loops over the ``k`` cotangents and tangents, with the dense path's single
:class:`~lin_probe.ntk.dense.GenericLoopWarning` and the same backend settings (oneDNN off for
RNNs, math attention).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from lin_probe._model_state import eval_semantics, trainable_parameters
from lin_probe.ntk import _plumbing as plumbing
from lin_probe.ntk._plumbing import Forward, OutputFn
from lin_probe.ntk.dense import VmapOrLoop, measurement_backends


def ntk_matvec(
    model: nn.Module,
    inputs: Tensor,
    *,
    output_fn: OutputFn | None = None,
    param_weights: Mapping[str, float] | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> Callable[[Tensor], Tensor]:
    """A matrix-free ``u ↦ Θu`` (``(n,) → (n,)``) for Lanczos on probe sets too large for ``n × n``.

    Inputs, weights and ``memory_budget`` (bytes of working memory per product; ``None``:
    :data:`lin_probe.plan.DEFAULT_MEMORY_BUDGET_BYTES`) are checked once here; each call re-reads
    the model's current parameters (so the product tracks ``θ_t`` if the model trains in between)
    under eval semantics.
    """
    inputs, budget, params, weights = plumbing.prepare_call(
        model, inputs, chunk_size=chunk_size, memory_budget=memory_budget, param_weights=param_weights
    )
    dtype = plumbing.kernel_dtype(params)
    n = inputs.shape[0]
    strategy: list[VmapOrLoop] = []  # made at the first product, kept: vmap is retried at most once

    def matvec(u: Tensor) -> Tensor:
        vector = plumbing.prepare_vector(u, n, dtype, inputs.device)
        current = {name: p for name, p in trainable_parameters(model).items() if weights[name] > 0.0}
        if not strategy:
            strategy.append(VmapOrLoop(model, skip_rnn=False))
        return _generic_matvec(
            model,
            inputs,
            current,
            vector,
            output_fn=output_fn,
            weights=weights,
            memory_budget=budget,
            chunk_size=chunk_size,
            strategy=strategy[0],
        )

    return matvec


def _generic_matvec(
    model: nn.Module,
    inputs: Tensor,
    params: dict[str, Tensor],
    vector: Tensor,
    *,
    output_fn: OutputFn | None,
    weights: Mapping[str, float],
    memory_budget: int,
    chunk_size: int | None,
    strategy: VmapOrLoop | None = None,
) -> Tensor:
    """``Θu`` over ``params`` only (every other parameter and buffer a constant), no Jacobian built."""
    n = inputs.shape[0]
    with measurement_backends(model, math_attention=True), eval_semantics(model), torch.no_grad():
        strategy = strategy or VmapOrLoop(model, skip_rnn=False)
        forward = plumbing.forward_fn(model, plumbing.constants(model, params), output_fn)
        width, act_bytes = plumbing.measure_one_example(forward, params, inputs[:1])
        result = torch.zeros(n, dtype=vector.dtype, device=vector.device)
        if not params:
            return result
        b, k = _plan_matvec(
            n, width, plumbing.row_bytes(params), act_bytes, vector.element_size(), memory_budget, chunk_size
        )
        for outputs in plumbing.slices(width, k):
            pulled = _pull_back(forward, params, inputs, vector, outputs, b, strategy)
            tangents = {name: g * float(weights.get(name, 1.0)) for name, g in pulled.items()}
            for rows in plumbing.slices(n, b):
                pushed = strategy(
                    _push_forward, _push_forward_loop, forward, params, inputs[rows], tangents, outputs
                )
                result[rows] += pushed.to(result.dtype)
    return result / width


def _pull_back(
    forward: Forward,
    params: dict[str, Tensor],
    inputs: Tensor,
    vector: Tensor,
    outputs: slice,
    b: int,
    strategy: VmapOrLoop,
) -> dict[str, Tensor]:
    """``J_cᵀu`` for each ``c`` in ``outputs``: ``name → (k, *p.shape)``, summed over example chunks."""
    total: dict[str, Tensor] = {}
    for rows in plumbing.slices(inputs.shape[0], b):
        x, u = inputs[rows], vector[rows]
        grads = strategy(_pull_back_vmap, _pull_back_loop, forward, params, x, u, outputs)
        for name, g in grads.items():
            total[name] = g if name not in total else total[name] + g
    return total


def _pull_back_vmap(
    forward: Forward, params: dict[str, Tensor], x: Tensor, u: Tensor, outputs: slice
) -> dict[str, Tensor]:
    """One chunk's ``J_cᵀu`` for every ``c``: one vjp, vmapped over the ``k`` cotangents."""
    k = plumbing.span(outputs)
    out, vjp_fn = vjp(lambda p: forward(p, x)[:, outputs], params)
    u = u.to(out.dtype)
    eye = torch.eye(k, dtype=u.dtype, device=u.device)
    cotangents = eye[:, None, :] * u[None, :, None]  # (k, b, k): u in column c of the c-th cotangent
    (grads,) = vmap(vjp_fn)(cotangents)
    return grads


def _pull_back_loop(
    forward: Forward, params: dict[str, Tensor], x: Tensor, u: Tensor, outputs: slice
) -> dict[str, Tensor]:
    """:func:`_pull_back_vmap` in plain autograd: one forward, one backward per output ``c``."""
    names, tracked = _track(params)
    with torch.enable_grad():
        out = forward(dict(zip(names, tracked, strict=True)), x)[:, outputs]
        u = u.to(out.dtype)
        per_output = [_grads(out[:, c], tracked, u, retain=c < out.shape[1] - 1) for c in range(out.shape[1])]
    return {name: torch.stack([g[i] for g in per_output]) for i, name in enumerate(names)}


def _push_forward(
    forward: Forward, params: dict[str, Tensor], rows: Tensor, tangents: dict[str, Tensor], outputs: slice
) -> Tensor:
    """``Σ_{c ∈ outputs} (J_c t_c)`` on a chunk, ``(b,)``: one jvp per ``c`` (vmapped over the ``k``
    tangents), keeping only output ``c`` of the ``c``-th, so no cross-output terms."""
    k = plumbing.span(outputs)

    def push(t: dict[str, Tensor]) -> Tensor:
        return jvp(lambda p: forward(p, rows)[:, outputs], (params,), (t,))[1]

    pushed = vmap(push)(tangents)  # (k, b, k)
    index = torch.arange(k, device=pushed.device)
    return pushed[index, :, index].sum(dim=0)


def _push_forward_loop(
    forward: Forward, params: dict[str, Tensor], rows: Tensor, tangents: dict[str, Tensor], outputs: slice
) -> Tensor:
    """:func:`_push_forward` in reverse-mode autograd only (no forward AD, no double backward).

    Per example one forward and one backward per output: ``(J_c t_c)_i = ⟨∇_θ f_{i,c}, t_c⟩``.
    Reverse mode alone is what every trainable model supports.
    """
    names, tracked = _track(params)
    result = torch.zeros(rows.shape[0], dtype=next(iter(tangents.values())).dtype, device=rows.device)
    for i in range(rows.shape[0]):
        with torch.enable_grad():
            out = forward(dict(zip(names, tracked, strict=True)), rows[i : i + 1])[0, outputs]
            for c in range(out.shape[0]):
                grads = _grads(out[c], tracked, None, retain=c < out.shape[0] - 1)
                for name, g in zip(names, grads, strict=True):
                    result[i] += torch.vdot(g.reshape(-1), tangents[name][c].reshape(-1).to(g.dtype)).to(
                        result.dtype
                    )
    return result


def _track(params: dict[str, Tensor]) -> tuple[list[str], list[Tensor]]:
    """Names and fresh ``requires_grad`` leaves of ``params`` for plain autograd."""
    names = list(params)
    return names, [params[name].detach().requires_grad_(True) for name in names]


def _grads(out: Tensor, tracked: list[Tensor], cotangent: Tensor | None, *, retain: bool) -> list[Tensor]:
    """``∂⟨out, cotangent⟩/∂tracked`` with zeros for parameters ``out`` does not depend on."""
    if not out.requires_grad:
        return [torch.zeros_like(p) for p in tracked]
    grads = torch.autograd.grad(out, tracked, cotangent, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(tracked, grads, strict=True)]


def _plan_matvec(
    n: int, width: int, row_bytes: int, act_bytes: int, itemsize: int, budget: int, chunk_size: int | None
) -> tuple[int, int]:
    """``(b, k)`` for the product: ``k·r ≤ budget/2`` and ``b·k·(a + k·itemsize) ≤ budget/2``."""
    half = max(1, budget // 2)
    k = plumbing.clamp(half // max(1, row_bytes), 1, width)
    if chunk_size is not None:
        return min(chunk_size, n), k
    return plumbing.clamp(half // max(1, k * (act_bytes + k * itemsize)), 1, n), k
