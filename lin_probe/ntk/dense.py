"""Empirical neural tangent kernel, matrix-free NTK products and eval-mode predictions.

``Θ = (1/C) Σ_c J_c J_cᵀ`` with ``J_c = ∂f_c(X; θ)/∂θ`` over the parameters with ``requires_grad``
(DESIGN §1). Optional per-parameter weights ``w_p`` (``lr_group / lr_ref``) turn it into
``(1/C) Σ_c Σ_p w_p J_{c,p} J_{c,p}ᵀ``, the kernel that governs function-space dynamics when
parameter groups train at different rates. Every pass runs through ``torch.func.functional_call``
inside :func:`lin_probe._model_state.eval_semantics`: no dropout noise, BatchNorm on running
statistics, and the user's flags, ``.grad``s, parameters, buffers and RNG streams are left alone.

Memory strategy
---------------
One knob bounds every path: :data:`DEFAULT_MEMORY_BUDGET_BYTES` (read at call time, so assigning
``lin_probe.ntk.DEFAULT_MEMORY_BUDGET_BYTES`` changes the default; ``memory_budget=`` overrides it
for one call). Two sizes are measured up front, on one example:

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

*Matrix-free product* (:func:`ntk_matvec`). ``Θu = (1/C) Σ_c J_c (w ⊙ J_cᵀu)``: one vjp per output
(vmapped over a slice of ``k`` outputs, ``k·r ≤ budget/2`` for the accumulated ``J_cᵀu``), summed
over example chunks, then one jvp per output and chunk; only the diagonal ``c``-th output of the
``c``-th jvp is kept, so no cross-output terms appear and no Jacobian is ever built. Example chunks
satisfy ``b·k·(a + k·itemsize) ≤ budget/2``.

*Structured layers* (``method="auto"``, the default). ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``
layers get their exact Gram block from layer inputs and output cotangents
(:mod:`lin_probe.ntk_structured`, which documents its own memory estimate under the same budget);
every other differentiated parameter goes through the dense path above and the two parts add.
``method="generic"`` uses the dense path for everything.

*Predictions* (:func:`predict`). ``no_grad`` forwards over chunks with ``b·(a + C·itemsize) ≤ budget``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from lin_probe._model_state import eval_semantics, model_buffers, trainable_parameters
from lin_probe._validation import check_finite
from lin_probe.ntk.structured import NotStructurable, structured_ntk

DEFAULT_MEMORY_BUDGET_BYTES: int = 1 << 30
"""Bytes the NTK paths may spend on Jacobian blocks and activations (see the module docstring)."""

METHODS = ("auto", "generic", "structured")
"""Accepted ``method`` values of :func:`empirical_ntk`."""

OutputFn = Callable[[Any], Tensor]
Forward = Callable[[dict[str, Tensor], Tensor], Tensor]


# --------------------------------------------------------------------------------------------- public


def predict(
    model: nn.Module,
    inputs: Tensor,
    *,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """The model's eval-mode outputs ``(n, C)``, without grad, chunked over examples.

    Uses the same eval semantics and output checks as the kernel, so the predictions are the ``f``
    whose Jacobian :func:`empirical_ntk` returns. Frozen models (no trainable parameter) are fine.
    """
    inputs = _prepare_inputs(model, inputs)
    _check_chunk_size(chunk_size)
    budget = _resolve_budget(None)
    params = {name: p.detach() for name, p in model.named_parameters()}
    with eval_semantics(model), torch.no_grad():
        forward = _forward_fn(model, model_buffers(model), output_fn)
        width, act_bytes = _measure_one_example(forward, params, inputs[:1])
        itemsize = _dtype_itemsize(_kernel_dtype(params, fallback=torch.get_default_dtype()))
        b = chunk_size or _clamp(budget // max(1, act_bytes + width * itemsize), 1, inputs.shape[0])
        return torch.cat(
            [_as_output_matrix(model(inputs[s]), output_fn, _len(s)) for s in _slices(inputs.shape[0], b)]
        )


def empirical_ntk(
    model: nn.Module,
    inputs: Tensor,
    *,
    chunk_size: int | None = None,
    output_fn: OutputFn | None = None,
    param_weights: Mapping[str, float] | None = None,
    memory_budget: int | None = None,
    method: str = "auto",
) -> Tensor:
    """The trace-averaged empirical NTK ``(1/C) Σ_c J_c J_cᵀ`` (``n × n``, parameters' dtype).

    Differentiates only parameters with ``requires_grad`` (frozen ones are constants, as for the
    optimizer). ``param_weights`` maps parameter names to ``lr_group / lr_ref`` (missing → 1).
    ``method``: ``"auto"`` uses the structured per-layer Gram for Linear/Conv layers where it is
    exact and the generic torch.func path for the rest (falling back to generic entirely if a
    batch contradicts the checks); ``"generic"`` differentiates everything with torch.func;
    ``"structured"`` is ``"auto"`` that raises instead of silently going fully generic (no
    structurable parameter, one example over the budget, or a failed batch check), for callers
    that rely on the speed.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    inputs = _prepare_inputs(model, inputs)
    _check_chunk_size(chunk_size)
    budget = _resolve_budget(memory_budget)
    params = trainable_parameters(model)
    weights = _resolve_weights(model, params, param_weights)
    active = {name: p for name, p in params.items() if weights[name] > 0.0}
    options: dict[str, Any] = {"weights": weights, "memory_budget": budget, "chunk_size": chunk_size}
    dtype = _kernel_dtype(params)
    if method != "generic":
        part = _structured_part(
            model, inputs, active, output_fn, options, dtype, strict=method == "structured"
        )
        if part is not None:
            theta, covered = part
            rest = {name: p for name, p in active.items() if name not in covered}
            if not rest:
                return theta
            return theta + _generic_ntk(model, inputs, rest, output_fn=output_fn, dtype=dtype, **options)
    return _generic_ntk(model, inputs, active, output_fn=output_fn, dtype=dtype, **options)


def ntk_matvec(
    model: nn.Module,
    inputs: Tensor,
    *,
    output_fn: OutputFn | None = None,
    param_weights: Mapping[str, float] | None = None,
    chunk_size: int | None = None,
) -> Callable[[Tensor], Tensor]:
    """A matrix-free ``u ↦ Θu`` (``(n,) → (n,)``) for Lanczos on probe sets too large for ``n × n``.

    Inputs and weights are checked once here; each call re-reads the model's current parameters
    (so the product tracks ``θ_t`` if the model trains in between) under eval semantics.
    """
    inputs = _prepare_inputs(model, inputs)
    _check_chunk_size(chunk_size)
    params = trainable_parameters(model)
    weights = _resolve_weights(model, params, param_weights)
    dtype = _kernel_dtype(params)
    n = inputs.shape[0]

    def matvec(u: Tensor) -> Tensor:
        vector = _prepare_vector(u, n, dtype, inputs.device)
        current = {name: p for name, p in trainable_parameters(model).items() if weights[name] > 0.0}
        return _generic_matvec(
            model,
            inputs,
            current,
            vector,
            output_fn=output_fn,
            weights=weights,
            memory_budget=_resolve_budget(None),
            chunk_size=chunk_size,
        )

    return matvec


# -------------------------------------------------------------------------- generic torch.func paths


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
            to_matrix=lambda raw, batch: _as_output_matrix(raw, output_fn, batch),
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
            "handle exactly within the memory budget (see lin_probe.ntk_structured); use "
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
    dtype = dtype or _kernel_dtype(params, fallback=torch.get_default_dtype())
    weights = weights or {}
    budget = _resolve_budget(memory_budget)
    with eval_semantics(model), torch.no_grad():
        forward = _forward_fn(model, _constants(model, params), output_fn)
        width, act_bytes = _measure_one_example(forward, params, inputs[:1])
        theta = torch.zeros(n, n, dtype=dtype, device=inputs.device)
        if not params:
            return theta
        b, k = _plan_dense(n, width, _row_bytes(params), act_bytes, budget, chunk_size)
        for outputs in _slices(width, k):
            _accumulate_gram(theta, forward, params, inputs, outputs, b, weights)
    return (theta + theta.T) / (2 * width)


def _generic_matvec(
    model: nn.Module,
    inputs: Tensor,
    params: dict[str, Tensor],
    vector: Tensor,
    *,
    output_fn: OutputFn | None = None,
    weights: Mapping[str, float] | None = None,
    memory_budget: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``Θu`` over ``params`` only (same subset contract as :func:`_generic_ntk`), no Jacobian built."""
    n = inputs.shape[0]
    weights = weights or {}
    budget = _resolve_budget(memory_budget)
    with eval_semantics(model), torch.no_grad():
        forward = _forward_fn(model, _constants(model, params), output_fn)
        width, act_bytes = _measure_one_example(forward, params, inputs[:1])
        result = torch.zeros(n, dtype=vector.dtype, device=vector.device)
        if not params:
            return result
        b, k = _plan_matvec(
            n, width, _row_bytes(params), act_bytes, vector.element_size(), budget, chunk_size
        )
        for outputs in _slices(width, k):
            pulled = _pull_back(forward, params, inputs, vector, outputs, b)
            tangents = {name: g * float(weights.get(name, 1.0)) for name, g in pulled.items()}
            for rows in _slices(n, b):
                result[rows] += _push_forward(forward, params, inputs[rows], tangents, outputs).to(
                    result.dtype
                )
    return result / width


# ------------------------------------------------------------------------------------ dense pieces


def _accumulate_gram(
    theta: Tensor,
    forward: Forward,
    params: dict[str, Tensor],
    inputs: Tensor,
    outputs: slice,
    b: int,
    weights: Mapping[str, float],
) -> None:
    """Add ``Σ_{c ∈ outputs} Σ_p w_p J_{c,p} J_{c,p}ᵀ`` block by block, two Jacobian blocks alive at most.

    Row ``i`` keeps chunk ``i``'s Jacobian resident and streams chunks ``j > i`` in *descending*
    order; the last one streamed (``i + 1``) becomes the next resident instead of being recomputed.
    That visits every block pair with ``n_b(n_b − 1)/2 + 1`` Jacobian computations, the fewest
    possible with two blocks in memory.
    """
    chunks = list(_slices(inputs.shape[0], b))

    def jacobian(index: int) -> dict[str, Tensor]:
        return _jacobian_block(forward, params, inputs[chunks[index]], outputs)

    def add(i: int, j: int, jac_i: dict[str, Tensor], jac_j: dict[str, Tensor]) -> None:
        gram = _weighted_gram(jac_i, jac_j, weights, theta.dtype)
        theta[chunks[i], chunks[j]] += gram
        if i != j:
            theta[chunks[j], chunks[i]] += gram.T

    resident = jacobian(0)
    add(0, 0, resident, resident)
    for i in range(len(chunks) - 1):
        for j in range(len(chunks) - 1, i, -1):
            streamed = jacobian(j)
            add(i, j, resident, streamed)
            if j == i + 1:
                add(j, j, streamed, streamed)
                resident = streamed  # frees chunk i's Jacobian
            del streamed


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


# ------------------------------------------------------------------------------ matrix-free pieces


def _pull_back(
    forward: Forward, params: dict[str, Tensor], inputs: Tensor, vector: Tensor, outputs: slice, b: int
) -> dict[str, Tensor]:
    """``J_cᵀu`` for each ``c`` in ``outputs``: ``name → (k, *p.shape)``, summed over example chunks."""
    k = outputs.stop - outputs.start
    total: dict[str, Tensor] = {}
    for rows in _slices(inputs.shape[0], b):
        out, vjp_fn = vjp(lambda p, x=inputs[rows]: forward(p, x)[:, outputs], params)
        u = vector[rows].to(out.dtype)
        eye = torch.eye(k, dtype=u.dtype, device=u.device)
        cotangents = eye[:, None, :] * u[None, :, None]  # (k, b, k): u in column c of the c-th cotangent
        (grads,) = vmap(vjp_fn)(cotangents)
        for name, g in grads.items():
            total[name] = g if name not in total else total[name] + g
    return total


def _push_forward(
    forward: Forward, params: dict[str, Tensor], rows: Tensor, tangents: dict[str, Tensor], outputs: slice
) -> Tensor:
    """``Σ_{c ∈ outputs} (J_c t_c)`` on a chunk: one jvp per ``c``, keeping only output ``c`` of the ``c``-th."""
    k = outputs.stop - outputs.start

    def push(t: dict[str, Tensor]) -> Tensor:
        return jvp(lambda p: forward(p, rows)[:, outputs], (params,), (t,))[1]

    pushed = vmap(push)(tangents)  # (k, b, k)
    index = torch.arange(k, device=pushed.device)
    return pushed[index, :, index].sum(dim=0)


# ------------------------------------------------------------------------------- model plumbing


def _forward_fn(model: nn.Module, constants: dict[str, Tensor], output_fn: OutputFn | None) -> Forward:
    """``(params, x) → (b, C)``: a stateless call of ``model`` with ``params`` swapped in."""

    def forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
        raw = functional_call(model, (params, constants), (x,))
        return _as_output_matrix(raw, output_fn, x.shape[0])

    return forward


def _constants(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every parameter not differentiated, and every buffer, detached: held fixed by the transforms."""
    frozen = {name: p.detach() for name, p in model.named_parameters() if name not in params}
    return {**frozen, **model_buffers(model)}


def _as_output_matrix(raw: Any, output_fn: OutputFn | None, batch: int) -> Tensor:
    """Apply ``output_fn`` and flatten to ``(batch, C)``; refuse outputs the kernel cannot differentiate."""
    out = output_fn(raw) if output_fn is not None else raw
    if not isinstance(out, Tensor):
        where = "`output_fn` returned" if output_fn is not None else "the model returned"
        raise TypeError(
            f"{where} a {type(out).__name__}, but a Tensor with a leading batch dimension is needed. "
            "Pass `output_fn`, a function that picks the prediction tensor from the model's output "
            "(e.g. `output_fn=lambda out: out[0]` or `output_fn=lambda out: out.logits`)."
        )
    if out.dim() < 1 or out.shape[0] != batch:
        raise ValueError(
            f"The model output has shape {tuple(out.shape)}, but its leading dimension must index the "
            f"{batch} input example(s). Use `output_fn` to select or reshape the per-example outputs."
        )
    if not (out.is_floating_point() or out.is_complex()):
        raise TypeError(
            f"The model output has dtype {out.dtype}; the NTK needs real-valued outputs (logits, not "
            "class indices). Use `output_fn` to return the differentiable outputs."
        )
    flat = out.reshape(batch, -1)
    if flat.shape[1] == 0:
        raise ValueError(
            "The model output has no entries per example (C = 0); there is no kernel to compute."
        )
    return flat


def _measure_one_example(forward: Forward, params: Mapping[str, Tensor], first: Tensor) -> tuple[int, int]:
    """One tracked forward on one example: its output width ``C`` and the bytes autograd saves (``a``).

    The saved-tensor count stands in for activation memory when sizing chunks; tensors that are the
    parameters themselves are not counted (they exist once, whatever the chunk size).
    """
    param_storages = {p.untyped_storage().data_ptr() for p in params.values()}
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        if t.untyped_storage().data_ptr() not in param_storages:
            saved += t.numel() * t.element_size()
        return t

    tracked = {name: p.detach().requires_grad_(p.is_floating_point()) for name, p in params.items()}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(tracked, first)
    return out.shape[1], saved


# ------------------------------------------------------------------------------ chunk planning


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
        return b, _clamp(budget // max(1, b * unit), 1, width)
    k = _clamp(budget // max(1, unit), 1, width)
    return _clamp(budget // max(1, k * unit), 1, n), k


def _plan_matvec(
    n: int, width: int, row_bytes: int, act_bytes: int, itemsize: int, budget: int, chunk_size: int | None
) -> tuple[int, int]:
    """``(b, k)`` for the matrix-free product: ``k·r ≤ budget/2`` and ``b·k·(a + k·itemsize) ≤ budget/2``."""
    half = max(1, budget // 2)
    k = _clamp(half // max(1, row_bytes), 1, width)
    if chunk_size is not None:
        return min(chunk_size, n), k
    return _clamp(half // max(1, k * (act_bytes + k * itemsize)), 1, n), k


def _slices(total: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` covering ``range(total)``."""
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def _len(s: slice) -> int:
    return s.stop - s.start


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(int(value), high))


def _row_bytes(params: Mapping[str, Tensor]) -> int:
    """Bytes of one output's gradient for one example over ``params`` (``r``)."""
    return sum(p.numel() * p.element_size() for p in params.values())


def _dtype_itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _kernel_dtype(params: Mapping[str, Tensor], fallback: torch.dtype | None = None) -> torch.dtype:
    """The floating dtype the kernel is computed and returned in: the parameters' (promoted if mixed)."""
    dtype: torch.dtype | None = None
    for p in params.values():
        if p.is_floating_point():
            dtype = p.dtype if dtype is None else torch.promote_types(dtype, p.dtype)
    if dtype is None:
        if fallback is None:
            raise TypeError(
                "The trainable parameters have no floating-point dtype; an NTK needs real parameters."
            )
        return fallback
    return dtype


# ------------------------------------------------------------------------------------ validation


def _model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (``None`` for a stateless module)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


def _prepare_inputs(model: nn.Module, inputs: Tensor) -> Tensor:
    """Check ``inputs`` (Tensor, batch dim, finite) and move it, detached, to the model's device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"`inputs` must be a torch.Tensor with a leading batch dimension, got {type(inputs).__name__}."
        )
    if inputs.dim() < 1 or inputs.shape[0] < 1:
        raise ValueError(
            f"`inputs` must have a leading batch dimension with at least one example, got shape {tuple(inputs.shape)}."
        )
    check_finite(inputs, "inputs")
    device = _model_device(model)
    inputs = inputs.detach()
    return inputs if device is None or inputs.device == device else inputs.to(device)


def _prepare_vector(u: Tensor, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Check the Lanczos vector: a finite ``(n,)`` tensor (cast to the kernel's dtype and device)."""
    if not isinstance(u, Tensor):
        raise TypeError(f"The NTK product needs a torch.Tensor of shape ({n},), got {type(u).__name__}.")
    if tuple(u.shape) != (n,):
        raise ValueError(
            f"The NTK product needs a vector of shape ({n},) (one entry per input), got {tuple(u.shape)}."
        )
    check_finite(u, "u")
    return u.detach().to(dtype=dtype, device=device)


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"`chunk_size` must be a positive int or None, got {type(chunk_size).__name__}.")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be at least 1 (examples per chunk), got {chunk_size}.")


def _resolve_budget(memory_budget: int | None) -> int:
    """The call's budget: the argument, else the module default read now (so it can be reassigned)."""
    budget = DEFAULT_MEMORY_BUDGET_BYTES if memory_budget is None else memory_budget
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"`memory_budget` must be an int number of bytes, got {type(budget).__name__}.")
    if budget < 1:
        raise ValueError(f"`memory_budget` must be a positive number of bytes, got {budget}.")
    return budget


def _resolve_weights(
    model: nn.Module, params: Mapping[str, Tensor], param_weights: Mapping[str, float] | None
) -> dict[str, float]:
    """Weight per trainable parameter (missing → 1.0); unknown names or bad values raise.

    Names of frozen parameters are accepted (an optimizer group may hold them) and have no effect.
    """
    weights = dict.fromkeys(params, 1.0)
    if param_weights is None:
        return weights
    if not isinstance(param_weights, Mapping):
        raise TypeError(
            f"`param_weights` must map parameter names to floats, got {type(param_weights).__name__}."
        )
    known = {name for name, _ in model.named_parameters()}
    unknown = sorted(set(param_weights) - known)
    if unknown:
        raise ValueError(
            f"`param_weights` names unknown parameter(s) {unknown[:5]}; use names from "
            f"`model.named_parameters()`, e.g. {sorted(known)[:5]}."
        )
    for name, value in param_weights.items():
        w = _check_weight(name, value)
        if name in weights:
            weights[name] = w
    if all(w == 0.0 for w in weights.values()):
        raise ValueError("Every trainable parameter has weight 0 in `param_weights`, so the NTK is zero.")
    return weights


def _check_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`param_weights[{name!r}]` must be a float (lr_group / lr_ref), got {type(value).__name__}."
        )
    w = float(value)
    if not math.isfinite(w) or w < 0.0:
        raise ValueError(f"`param_weights[{name!r}]` must be a finite number ≥ 0, got {value}.")
    return w
