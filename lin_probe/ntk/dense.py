"""The empirical NTK as a dense ``n × n`` matrix, and the eval-mode predictions it is the Jacobian of.

``Θ = (1/C) Σ_c J_c J_cᵀ`` with ``J_c = ∂f_c(X; θ)/∂θ`` over the parameters with ``requires_grad``:
the trace-averaged kernel, whose scale does not grow with the number of outputs ``C``. Optional
per-parameter weights ``w_p`` (``lr_group / lr_ref``) turn it into
``(1/C) Σ_c Σ_p w_p J_{c,p} J_{c,p}ᵀ``, the kernel that governs function-space dynamics when
parameter groups train at different rates. Every pass runs through ``torch.func.functional_call``
inside :func:`lin_probe._model_state.eval_semantics`: no dropout noise, BatchNorm on running
statistics, and the user's flags, ``.grad``s, parameters, buffers and RNG streams are left alone.

Memory strategy
---------------
One knob bounds every path: ``memory_budget`` (bytes; ``None`` means
:data:`lin_probe.plan.DEFAULT_MEMORY_BUDGET_BYTES`, 1 GiB). Two sizes are measured up front, on one
example:

* ``r`` — bytes of one output's gradient for one example (``Σ_p numel(p) · itemsize``);
* ``a`` — bytes autograd saves during one example's forward (counted with
  ``saved_tensors_hooks``), a proxy for the activation memory of the vmapped backward.

*Dense kernel* (:func:`empirical_ntk`). Per-example Jacobians come from ``vmap(jacrev(·))``
over a chunk of ``b`` examples and a slice of ``k`` outputs, ``b·k·r`` bytes. If the whole
``n·C·(r + a)`` fits, one block and one Gram product. Otherwise the kernel is built block-pair by
block-pair: the Jacobian of chunk ``i`` is held while the chunks ``j ≥ i`` are computed one at a
time, so two blocks live at once: ``b·k·(2r + a) ≤ budget``. Outputs are sliced (``k < C``) only
when a single example's ``C·(2r + a)`` already exceeds the budget; the kernel is then summed
over output slices. Cost: ``n_b(n_b + 1)/2`` block Jacobians per output slice (``n_b`` chunks),
so a roomier budget is faster. ``chunk_size`` forces ``b``.

*Structured layers* (:attr:`NTKMethod.AUTO`, the default). ``nn.Linear`` / ``nn.Conv1d`` /
``nn.Conv2d`` layers get their exact Gram block from layer inputs and output cotangents
(:mod:`lin_probe.ntk.structured`, which documents its own memory estimate under the same budget);
every other differentiated parameter goes through the dense path above and the two parts add.

*Predictions* (:func:`predict`). ``no_grad`` forwards over chunks with ``b·(a + C·itemsize) ≤ budget``.

The matrix-free product ``u ↦ Θu`` is :mod:`lin_probe.ntk.products`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from lin_probe._model_state import eval_semantics, model_buffers
from lin_probe.ntk import _plumbing as plumbing
from lin_probe.ntk._plumbing import Forward, OutputFn
from lin_probe.ntk.structured import NotStructurable, structured_ntk


class NTKMethod(str, Enum):
    """How :func:`empirical_ntk` computes the kernel (the plain strings are accepted too).

    All three give the same kernel up to round-off; they differ in speed and in what they refuse.
    """

    AUTO = "auto"
    """Structured Gram for the ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` layers where it is exact,
    torch.func for every other parameter, the parts added. Fast for the common layers (no
    per-example Jacobian of their weights), and silently fully generic when no layer qualifies,
    one example exceeds the budget, or a batch contradicts the one-example checks. The default."""

    GENERIC = "generic"
    """torch.func ``vmap(jacrev)`` over every parameter: per-example Jacobians, chunked under the
    budget. Works for any differentiable model (parameters read outside their module's call,
    examples that interact in a batch), at the cost of materialising ``b·k·P`` Jacobian entries."""

    STRUCTURED = "structured"
    """:attr:`AUTO` that raises instead of silently going fully generic (no structurable parameter,
    one example over the budget, or a failed batch check): for callers that rely on the speed."""


METHODS: tuple[str, ...] = tuple(method.value for method in NTKMethod)
"""Accepted ``method`` values of :func:`empirical_ntk` (the :class:`NTKMethod` values)."""


# --------------------------------------------------------------------------------------------- public


def predict(
    model: nn.Module,
    inputs: Tensor,
    *,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """The model's eval-mode outputs ``(n, C)``, without grad, chunked over examples.

    Uses the same eval semantics and output checks as the kernel, so the predictions are the ``f``
    whose Jacobian :func:`empirical_ntk` returns. Frozen models (no trainable parameter) are fine.
    """
    inputs = plumbing.prepare_inputs(model, inputs)
    plumbing.check_chunk_size(chunk_size)
    budget = plumbing.resolve_budget(memory_budget)
    params = {name: p.detach() for name, p in model.named_parameters()}
    with eval_semantics(model), torch.no_grad():
        forward = plumbing.forward_fn(model, model_buffers(model), output_fn)
        width, act_bytes = plumbing.measure_one_example(forward, params, inputs[:1])
        itemsize = plumbing.dtype_itemsize(plumbing.kernel_dtype(params, fallback=torch.get_default_dtype()))
        b = chunk_size or plumbing.clamp(budget // max(1, act_bytes + width * itemsize), 1, inputs.shape[0])
        return torch.cat(
            [
                plumbing.output_matrix(model(inputs[s]), output_fn, plumbing.span(s))
                for s in plumbing.slices(inputs.shape[0], b)
            ]
        )


def empirical_ntk(
    model: nn.Module,
    inputs: Tensor,
    *,
    chunk_size: int | None = None,
    output_fn: OutputFn | None = None,
    param_weights: Mapping[str, float] | None = None,
    memory_budget: int | None = None,
    method: NTKMethod | str = NTKMethod.AUTO,
) -> Tensor:
    """The trace-averaged empirical NTK ``(1/C) Σ_c J_c J_cᵀ`` (``n × n``, parameters' dtype).

    Differentiates only parameters with ``requires_grad`` (frozen ones are constants, as for the
    optimizer). ``param_weights`` maps parameter names to ``lr_group / lr_ref`` (missing → 1).
    ``memory_budget`` bounds the working memory in bytes (``None``: 1 GiB, see the module
    docstring). ``method`` is an :class:`NTKMethod` or its string (``"auto"``, ``"generic"``,
    ``"structured"``); each member's docstring gives its trade-off.
    """
    method = _resolve_method(method)
    inputs, budget, params, weights = plumbing.prepare_call(
        model, inputs, chunk_size=chunk_size, memory_budget=memory_budget, param_weights=param_weights
    )
    active = {name: p for name, p in params.items() if weights[name] > 0.0}
    options: dict[str, Any] = {"weights": weights, "memory_budget": budget, "chunk_size": chunk_size}
    dtype = plumbing.kernel_dtype(params)
    if method is not NTKMethod.GENERIC:
        part = _structured_part(
            model, inputs, active, output_fn, options, dtype, strict=method is NTKMethod.STRUCTURED
        )
        if part is not None:
            theta, covered = part
            rest = {name: p for name, p in active.items() if name not in covered}
            if not rest:
                return theta
            return theta + _generic_ntk(model, inputs, rest, output_fn=output_fn, dtype=dtype, **options)
    return _generic_ntk(model, inputs, active, output_fn=output_fn, dtype=dtype, **options)


def _resolve_method(method: NTKMethod | str) -> NTKMethod:
    try:
        return NTKMethod(method)
    except ValueError:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.") from None


# -------------------------------------------------------------------------- generic torch.func path


def _structured_part(
    model: nn.Module,
    inputs: Tensor,
    active: dict[str, Tensor],
    output_fn: OutputFn | None,
    options: Mapping[str, Any],
    dtype: torch.dtype,
    *,
    strict: bool,
) -> tuple[Tensor, set[str]] | None:
    """The structured layers' kernel and the names they cover; ``None`` → all generic (raises if ``strict``)."""
    try:
        part = structured_ntk(
            model,
            inputs,
            active,
            to_matrix=lambda raw, batch: plumbing.output_matrix(raw, output_fn, batch),
            dtype=dtype,
            **options,
        )
    except NotStructurable:
        if strict:
            raise
        return None
    if part is None and strict:
        raise ValueError(
            'method="structured" found no trainable nn.Linear / nn.Conv1d / nn.Conv2d parameter it can '
            "handle exactly within the memory budget (see lin_probe.ntk.structured); use "
            'method="auto" or "generic".'
        )
    return part


def _generic_ntk(
    model: nn.Module,
    inputs: Tensor,
    params: dict[str, Tensor],
    *,
    output_fn: OutputFn | None = None,
    weights: Mapping[str, float] | None = None,
    memory_budget: int | None = None,
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``(1/C) Σ_c Σ_{p ∈ params} w_p J_{c,p} J_{c,p}ᵀ``, differentiating only ``params``.

    Every other parameter and buffer is read from the module as a constant, so kernels over
    disjoint parameter subsets add up to the full kernel (a per-layer fast path sums its part with
    this one). ``inputs`` must already be validated and on the model's device. Empty ``params``
    gives a zero kernel.
    """
    n = inputs.shape[0]
    dtype = dtype or plumbing.kernel_dtype(params, fallback=torch.get_default_dtype())
    weights = weights or {}
    budget = plumbing.resolve_budget(memory_budget)
    with eval_semantics(model), torch.no_grad():
        forward = plumbing.forward_fn(model, plumbing.constants(model, params), output_fn)
        width, act_bytes = plumbing.measure_one_example(forward, params, inputs[:1])
        theta = torch.zeros(n, n, dtype=dtype, device=inputs.device)
        if not params:
            return theta
        b, k = _plan_dense(n, width, plumbing.row_bytes(params), act_bytes, budget, chunk_size)
        for outputs in plumbing.slices(width, k):
            _accumulate_gram(theta, forward, params, inputs, outputs, b, weights)
    return (theta + theta.T) / (2 * width)


def _accumulate_gram(
    theta: Tensor,
    forward: Forward,
    params: dict[str, Tensor],
    inputs: Tensor,
    outputs: slice,
    b: int,
    weights: Mapping[str, float],
) -> None:
    """Add ``Σ_{c ∈ outputs} Σ_p w_p J_{c,p} J_{c,p}ᵀ`` block pair by block pair, two Jacobian blocks alive at most."""
    chunks = list(plumbing.slices(inputs.shape[0], b))

    def jacobian(index: int) -> dict[str, Tensor]:
        return _jacobian_block(forward, params, inputs[chunks[index]], outputs)

    def add(i: int, j: int, jac_i: dict[str, Tensor], jac_j: dict[str, Tensor]) -> None:
        gram = _weighted_gram(jac_i, jac_j, weights, theta.dtype)
        theta[chunks[i], chunks[j]] += gram
        if i != j:
            theta[chunks[j], chunks[i]] += gram.T

    plumbing.stream_block_pairs(len(chunks), jacobian, add)


def _jacobian_block(
    forward: Forward, params: dict[str, Tensor], rows: Tensor, outputs: slice
) -> dict[str, Tensor]:
    """Per-example Jacobians ``name → (b, k, *p.shape)`` via ``vmap(jacrev)``: one backward per example and output."""

    def one_example(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return forward(p, x.unsqueeze(0))[0, outputs]

    return vmap(jacrev(one_example), in_dims=(None, 0))(params, rows)


def _weighted_gram(
    jac_a: dict[str, Tensor], jac_b: dict[str, Tensor], weights: Mapping[str, float], dtype: torch.dtype
) -> Tensor:
    """``Σ_p w_p A_p B_pᵀ`` with each Jacobian flattened over (output, parameter entries): Σ_c is in the matmul."""
    total: Tensor | None = None
    for name, a in jac_a.items():
        a_flat = a.reshape(a.shape[0], -1).to(dtype)
        b_flat = jac_b[name].reshape(jac_b[name].shape[0], -1).to(dtype)
        gram = (a_flat @ b_flat.T) * float(weights.get(name, 1.0))
        total = gram if total is None else total + gram
    assert total is not None  # params is non-empty here
    return total


def _plan_dense(
    n: int, width: int, row_bytes: int, act_bytes: int, budget: int, chunk_size: int | None
) -> tuple[int, int]:
    """``(b, k)``: examples per chunk and outputs per slice for the dense kernel (module docstring)."""
    if chunk_size is None and n * width * (row_bytes + act_bytes) <= budget:
        return n, width
    unit = 2 * row_bytes + act_bytes
    if chunk_size is not None:
        b = min(chunk_size, n)
        unit = row_bytes + act_bytes if b == n else unit
        return b, plumbing.clamp(budget // max(1, b * unit), 1, width)
    k = plumbing.clamp(budget // max(1, unit), 1, width)
    return plumbing.clamp(budget // max(1, k * unit), 1, n), k


__all__ = ["METHODS", "NTKMethod", "empirical_ntk", "predict"]
