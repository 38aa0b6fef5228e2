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
``nn.Conv2d`` layers, the affine parameters of BatchNorm1d/2d (running statistics), LayerNorm and
GroupNorm, and ``nn.Embedding`` get their exact Gram block from layer inputs and output cotangents
(:mod:`lin_probe.ntk.structured`, which documents its own memory estimate under the same budget);
every other differentiated parameter goes through the dense path above and the two parts add.

*Models vmap cannot batch* (RNNs, some custom ops). ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` fail under
``vmap``, so models containing an ``nn.RNNBase`` skip it; for any other model the first
``RuntimeError`` / ``NotImplementedError`` raised by the vmapped path switches the rest of the call
to an exact per-example loop (one forward per example, one ``autograd.grad`` per output, same
blocks, same budget, same weights and dtype). Either way a :class:`GenericLoopWarning` is issued
once per process, naming the reason: the kernel is exact, only slower. Backend settings
(:func:`measurement_backends`, restored on exit) make the measurement differentiable and
batchable: oneDNN and cuDNN are disabled for models containing an ``nn.RNNBase`` only (their RNN
kernels have no backward in eval mode; other models keep them for convolutions), and inside the
torch.func paths ``scaled_dot_product_attention`` runs on the math backend (the fused kernels have
no batching rule; math decomposes into batchable ops) with the fused ``nn.TransformerEncoderLayer``
fast path off (it has no forward AD). The matrix-free product tries vmap on RNNs too (with oneDNN
off it batches them) and has its own loop forms.

*Predictions* (:func:`predict`). ``no_grad`` forwards over chunks with ``b·(a + C·itemsize) ≤ budget``.

The matrix-free product ``u ↦ Θu`` is :mod:`lin_probe.ntk.products`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from lin_probe._model_state import eval_semantics, model_buffers
from lin_probe.ntk import _plumbing as plumbing
from lin_probe.ntk._plumbing import Forward, OutputFn
from lin_probe.ntk.structured import NotStructurable, structured_ntk


class NTKMethod(str, Enum):
    """How :func:`empirical_ntk` computes the kernel (the plain strings are accepted too).

    All three give the same kernel up to round-off; they differ in speed and in what they refuse.
    """

    AUTO = "auto"
    """Structured Gram for the ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` layers, the affine parameters
    of BatchNorm1d/2d (running statistics), LayerNorm and GroupNorm, and ``nn.Embedding``, where exact;
    torch.func for every other parameter, the parts added. Fast for the common layers (no
    per-example Jacobian of their weights), and silently fully generic when no layer qualifies,
    one example exceeds the budget, or a batch contradicts the one-example checks. The default."""

    GENERIC = "generic"
    """torch.func ``vmap(jacrev)`` over every parameter: per-example Jacobians, chunked under the
    budget. Works for any differentiable model (parameters read outside their module's call,
    examples that interact in a batch), at the cost of materialising ``b·k·P`` Jacobian entries.
    Where vmap cannot batch the model (RNNs, ops without a batching rule) the same blocks come
    from an exact per-example autograd loop instead, with one :class:`GenericLoopWarning`."""

    STRUCTURED = "structured"
    """:attr:`AUTO` that raises instead of silently going fully generic (no structurable parameter,
    one example over the budget, or a failed batch check): for callers that rely on the speed."""


METHODS: tuple[str, ...] = tuple(method.value for method in NTKMethod)
"""Accepted ``method`` values of :func:`empirical_ntk` (the :class:`NTKMethod` values)."""


class GenericLoopWarning(UserWarning):
    """The torch.func path could not vmap the model and used the exact (slower) per-example loop."""


_T = TypeVar("_T")
_LOOP_WARNED = False
_VMAP_FAILURES = (RuntimeError, NotImplementedError)


def _warn_loop(reason: str) -> None:
    """Warn once per process: a monitor that repeats the warning every epoch would only add noise."""
    global _LOOP_WARNED
    if _LOOP_WARNED:
        return
    _LOOP_WARNED = True
    warnings.warn(
        GenericLoopWarning(
            f"lin_probe: torch.func.vmap cannot batch this model ({reason}); the NTK is computed with an "
            "exact per-example autograd loop instead (same result, slower)."
        ),
        stacklevel=4,
    )


def _has_rnn(model: nn.Module) -> bool:
    return any(isinstance(module, nn.RNNBase) for module in model.modules())


class VmapOrLoop:
    """Run the vmapped form of a computation until it first fails, then its exact loop form.

    One instance per measurement (or per product closure), so a model vmap cannot batch pays for
    the failed attempt once, not once per block. With ``skip_rnn``, models containing an
    ``nn.RNNBase`` (``vmap(jacrev)`` fails on them) go straight to the loop.
    """

    def __init__(self, model: nn.Module, *, skip_rnn: bool = True) -> None:
        self.batched = not (skip_rnn and _has_rnn(model))
        if not self.batched:
            _warn_loop("it contains an nn.LSTM / nn.GRU / nn.RNN, which vmap does not support")

    def __call__(self, batched: Callable[..., _T], looped: Callable[..., _T], *args: Any) -> _T:
        """``batched(*args)`` while vmap works, else ``looped(*args)`` (same arguments, same result)."""
        if self.batched:
            try:
                return batched(*args)
            except _VMAP_FAILURES as error:
                self.batched = False
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                _warn_loop(f"{type(error).__name__}: {first}")
        return looped(*args)


@contextlib.contextmanager
def measurement_backends(model: nn.Module, *, math_attention: bool) -> Iterator[None]:
    """Backend settings under which the model is differentiable (and batchable) in eval mode.

    oneDNN (and cuDNN) off only for models with an ``nn.RNNBase``: their RNN kernels have no
    eval-mode backward, and disabling them for every model would slow convolutions.
    ``math_attention`` puts ``scaled_dot_product_attention`` on the math backend, which decomposes
    into ops vmap batches (the fused kernels have no batching rule and fall back to a slow loop),
    and turns off the fused ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` fast path
    (no forward AD, used under ``no_grad``). Flags are restored on exit.
    """
    with contextlib.ExitStack() as stack:
        if _has_rnn(model):
            previous = torch.backends.mkldnn.set_flags(False, None, None, None)[0]
            stack.callback(torch.backends.mkldnn.set_flags, previous, None, None, None)
            if torch.backends.cudnn.is_available():  # cuDNN RNN backward refuses eval mode too
                previous_cudnn = torch.backends.cudnn.set_flags(False, _fp32_precision=None)[0]
                stack.callback(torch.backends.cudnn.set_flags, previous_cudnn, _fp32_precision=None)
        if math_attention:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)  # fused encoder kernels have no forward AD
            stack.callback(torch.backends.mha.set_fastpath_enabled, fastpath)
        yield


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
    with measurement_backends(model, math_attention=False):
        return _empirical_ntk(model, inputs, method, budget, params, weights, output_fn, chunk_size)


def _empirical_ntk(
    model: nn.Module,
    inputs: Tensor,
    method: NTKMethod,
    budget: int,
    params: dict[str, Tensor],
    weights: dict[str, float],
    output_fn: OutputFn | None,
    chunk_size: int | None,
) -> Tensor:
    """:func:`empirical_ntk` on checked arguments: structured part (unless generic) plus generic rest."""
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
            'method="structured" found no trainable Linear / Conv / BatchNorm / LayerNorm / GroupNorm / '
            "Embedding parameter it can handle exactly within the memory budget (see lin_probe.ntk.structured); use "
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
    with measurement_backends(model, math_attention=True), eval_semantics(model), torch.no_grad():
        forward = plumbing.forward_fn(model, plumbing.constants(model, params), output_fn)
        width, act_bytes = plumbing.measure_one_example(forward, params, inputs[:1])
        theta = torch.zeros(n, n, dtype=dtype, device=inputs.device)
        if not params:
            return theta
        b, k = _plan_dense(n, width, plumbing.row_bytes(params), act_bytes, budget, chunk_size)
        strategy = VmapOrLoop(model)
        for outputs in plumbing.slices(width, k):
            _accumulate_gram(theta, forward, params, inputs, outputs, b, weights, strategy)
    return (theta + theta.T) / (2 * width)


def _accumulate_gram(
    theta: Tensor,
    forward: Forward,
    params: dict[str, Tensor],
    inputs: Tensor,
    outputs: slice,
    b: int,
    weights: Mapping[str, float],
    strategy: VmapOrLoop,
) -> None:
    """Add ``Σ_{c ∈ outputs} Σ_p w_p J_{c,p} J_{c,p}ᵀ`` block pair by block pair, two Jacobian blocks alive at most."""
    chunks = list(plumbing.slices(inputs.shape[0], b))

    def jacobian(index: int) -> dict[str, Tensor]:
        rows = inputs[chunks[index]]
        return strategy(_jacobian_block, _loop_jacobian_block, forward, params, rows, outputs)

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


def _loop_jacobian_block(
    forward: Forward, params: dict[str, Tensor], rows: Tensor, outputs: slice
) -> dict[str, Tensor]:
    """:func:`_jacobian_block` without vmap: per example one forward, one ``autograd.grad`` per output.

    Exact and batch-free (each example runs alone, as under vmap), for models vmap cannot batch.
    """
    k = plumbing.span(outputs)
    names = list(params)
    jac = {
        name: torch.zeros((rows.shape[0], k, *p.shape), dtype=p.dtype, device=p.device)
        for name, p in params.items()
    }
    for i in range(rows.shape[0]):
        tracked = [params[name].detach().requires_grad_(True) for name in names]
        with torch.enable_grad():
            out = forward(dict(zip(names, tracked, strict=True)), rows[i : i + 1])[0, outputs]
            if not out.requires_grad:
                continue  # outputs constant in these parameters: zero Jacobian
            for c in range(k):
                grads = torch.autograd.grad(out[c], tracked, retain_graph=c < k - 1, allow_unused=True)
                for name, g in zip(names, grads, strict=True):
                    if g is not None:
                        jac[name][i, c] = g
    return jac


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


__all__ = ["METHODS", "GenericLoopWarning", "NTKMethod", "empirical_ntk", "predict"]
