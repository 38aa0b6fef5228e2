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

*Structured layers* (:attr:`NTKMethod.STRUCTURED`, and :attr:`NTKMethod.AUTO` where it is faster).
``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` layers, the affine parameters of BatchNorm1d/2d
(running statistics), LayerNorm and GroupNorm, ``nn.Embedding`` and ``nn.MultiheadAttention``'s
projections (:mod:`lin_probe.ntk.attention`) get their exact Gram block from layer inputs and output
cotangents (:mod:`lin_probe.ntk.structured`, which documents its own memory
estimate under the same budget); every other differentiated parameter goes through the dense path
above and the two parts add.

*Models vmap cannot batch* (RNNs, some custom ops). ``vmap`` over examples cannot run the fused
``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` kernels (they write an unbatched buffer in place), so for models
containing an ``nn.RNNBase`` each Jacobian block is ``jacrev`` of the model's own batched forward on
4 examples at a time (:class:`BatchedForwardJacobian`; exact when examples do not interact, which the
first block checks against one-example forwards). For every model, the first ``RuntimeError`` /
``NotImplementedError`` raised by the batched form switches the rest of the call to an exact
per-example loop (one forward per example, one ``autograd.grad`` per output, same blocks, same
budget, same weights and dtype), with a :class:`GenericLoopWarning` issued once per process naming
the reason: the kernel is exact, only slower. Backend settings (:func:`measurement_backends`,
restored on exit) make the measurement differentiable and batchable: oneDNN and cuDNN are disabled
for models containing an ``nn.RNNBase`` only (their RNN kernels have no backward in eval mode;
other models keep them for convolutions), and inside the torch.func paths
``scaled_dot_product_attention`` runs on the math backend (the fused kernels have no batching rule;
math decomposes into batchable ops) with the fused ``nn.TransformerEncoderLayer`` fast path off (it
has no forward AD). The matrix-free product vmaps RNNs over cotangents too (with oneDNN off it
batches them) and has its own loop forms.

*Choosing* (:attr:`NTKMethod.AUTO`): :mod:`lin_probe.ntk.choice` times both paths on a few examples.
*Progress*: every path reports units of work (chunk recordings, Jacobian blocks) to an optional
``progress(done, total)`` hook, outside any ``try`` that could mistake its exception for a
vmap failure.

*Predictions* (:func:`predict`). ``no_grad`` forwards over chunks with ``b·(a + C·itemsize) ≤ budget``.

The matrix-free product ``u ↦ Θu`` is :mod:`lin_probe.ntk.products`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from lin_probe._model_state import eval_semantics, model_buffers
from lin_probe.ntk import _plumbing as plumbing
from lin_probe.ntk._plumbing import Forward, OutputFn, ProgressFn
from lin_probe.ntk.structured import NotStructurable, StructuredPlan, plan_structured, run_structured


class NTKMethod(str, Enum):
    """How :func:`empirical_ntk` computes the kernel (the plain strings are accepted too).

    All give the same kernel up to round-off; they differ in speed, memory and in what they refuse.
    As for neural-tangents' ``NtkImplementation``, no one method is fastest everywhere: the
    structured rules avoid per-example Jacobians of Linear / Conv / normalisation / Embedding
    weights (a big win for MLPs and token models) but pay one batched backward over the ``C``
    outputs per chunk, per-layer features of ``C·|W|`` numbers per example (BatchNorm/pooled CNNs:
    about the Jacobian's size, so nothing is saved) and, when those features exceed the budget,
    either output slices (one forward per slice) or their recomputation per chunk pair, whichever
    its planner prices cheaper; the Jacobian contraction pays ``n·C·P`` Jacobian
    entries (and the same recomputation when they exceed the budget) and one ``n²·C·P`` matmul.
    :attr:`AUTO` times both on a few examples and picks (:func:`lin_probe.ntk.choice.choose_method`).
    NTK-vector products (``vjp`` then ``jvp`` per output and example pair, neural-tangents'
    ``NTK_VECTOR_PRODUCTS``) are not a dense method here: they need forward AD (absent for the fused
    attention and RNN kernels) and ``n²`` forward passes; :func:`lin_probe.ntk.ntk_matvec` is the
    matrix-free form, used where ``n × n`` does not fit.
    """

    AUTO = "auto"
    """The default: a cost model picks :attr:`STRUCTURED` (structured rules plus generic rest,
    silently all generic where no layer qualifies) or :attr:`GENERIC` per call
    (:func:`lin_probe.ntk.choice.choose_method`: a timed probe of both on ``m`` and ``2m`` of the
    examples, extrapolated with ``t(n) = α·E(n) + β·n²``, ``E`` the examples each path will record
    under the budget, recomputation included; the structured path's ``β`` capped by the Gram's share
    of its counted multiply-adds). The generic path is not timed at all when the upper triangle of
    its Jacobian Gram, at the measured matmul rate, is already out of the race (wide MLPs), and is
    dropped after one example when that example times ``E(n)`` is. Probes of ``n ≤ 16`` skip the
    timing (the choice cannot matter there) and use the structured rules. The probe costs ``3m``
    examples per candidate
    (``m = clamp(n // 32, 2, 8)``), so the choice is made once per model and call signature in the
    process and remembered, as cuDNN's ``benchmark`` mode does
    (:func:`lin_probe.ntk.choice.remembered_choice`); the monitor's
    :class:`~lin_probe.monitor.checks.NTKProbe` calls ``choose_method`` itself, with the structured
    timings its budget's pilot already took, so only the generic path is probed."""

    GENERIC = "generic"
    """torch.func ``vmap(jacrev)`` over every parameter: per-example Jacobians, chunked under the
    budget. Works for any differentiable model (parameters read outside their module's call,
    examples that interact in a batch), at the cost of materialising ``b·k·P`` Jacobian entries.
    Models with an ``nn.RNNBase`` (which ``vmap`` over examples cannot run) take Jacobians of the
    batched forward of 4 examples at a time instead, after checking once that the batched outputs
    equal the one-example outputs; where neither batches (ops without a batching rule, examples
    that interact) the same blocks come from an exact per-example autograd loop, with one
    :class:`GenericLoopWarning`."""

    STRUCTURED = "structured"
    """Structured Gram for the ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` layers, the affine
    parameters of BatchNorm1d/2d (running statistics), LayerNorm and GroupNorm, and ``nn.Embedding``,
    where exact; torch.func for every other parameter, the parts added. Raises instead of silently
    going fully generic (no structurable parameter, one example over the budget, or a failed batch
    check): for callers that rely on the rules (under :attr:`AUTO` the same path falls back)."""


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
    progress: ProgressFn | None = None,
) -> Tensor:
    """The trace-averaged empirical NTK ``(1/C) Σ_c J_c J_cᵀ`` (``n × n``, parameters' dtype).

    Differentiates only parameters with ``requires_grad`` (frozen ones are constants, as for the
    optimizer). ``param_weights`` maps parameter names to ``lr_group / lr_ref`` (missing → 1).
    ``memory_budget`` bounds the working memory in bytes (``None``: 1 GiB, see the module
    docstring). ``method`` is an :class:`NTKMethod` or its string (``"auto"``, ``"generic"``,
    ``"structured"``); each member's docstring gives its trade-off. ``progress(done, total)`` is
    called once with ``done = 0`` (``total`` known: chunk recordings plus Jacobian blocks) and after
    each unit; an exception it raises propagates unchanged and leaves the model as it was (the
    way to abort a long kernel). ``total`` only grows if a batch check fails mid-call and the rest
    is re-planned generic.
    """
    method = _resolve_method(method)
    inputs, budget, params, weights = plumbing.prepare_call(
        model, inputs, chunk_size=chunk_size, memory_budget=memory_budget, param_weights=param_weights
    )
    tracker = plumbing.Progress(progress)
    strict = method is NTKMethod.STRUCTURED
    if method is NTKMethod.AUTO:
        from lin_probe.ntk.choice import remembered_choice  # the cost model runs this module's paths

        method = remembered_choice(model, inputs, budget, params, weights, output_fn, chunk_size).method
    with measurement_backends(model, math_attention=False):
        return _empirical_ntk(
            model, inputs, method, budget, params, weights, output_fn, chunk_size, tracker, strict=strict
        )


def _empirical_ntk(
    model: nn.Module,
    inputs: Tensor,
    method: NTKMethod,
    budget: int,
    params: dict[str, Tensor],
    weights: dict[str, float],
    output_fn: OutputFn | None,
    chunk_size: int | None,
    progress: plumbing.Progress | None = None,
    *,
    strict: bool | None = None,
) -> Tensor:
    """:func:`empirical_ntk` on checked arguments: structured part (unless generic) plus generic rest.

    ``strict`` (default: ``method is STRUCTURED``) raises where the structured path cannot run
    instead of going generic.
    """
    active = {name: p for name, p in params.items() if weights[name] > 0.0}
    options: dict[str, Any] = {"weights": weights, "memory_budget": budget, "chunk_size": chunk_size}
    dtype = plumbing.kernel_dtype(params)
    tracker = progress or plumbing.Progress(None)
    strict = method is NTKMethod.STRUCTURED if strict is None else strict
    if method is not NTKMethod.GENERIC:
        plan = _structured_plan(model, inputs, active, output_fn, options, dtype, strict=strict)
        if plan is not None:
            rest = {name: p for name, p in active.items() if name not in plan.covered}
            rest_loads = _generic_loads(model, inputs, rest, output_fn, budget, chunk_size) if rest else 0
            tracker.start(plan.loads + rest_loads)
            try:
                theta = run_structured(
                    model, inputs, plan, to_matrix=_to_matrix(output_fn), memory_budget=budget,
                    dtype=dtype, progress=tracker,
                )  # fmt: skip
            except NotStructurable:
                if strict:
                    raise
            else:
                if rest:
                    theta = theta + _generic_ntk(
                        model, inputs, rest, output_fn=output_fn, dtype=dtype, progress=tracker, **options
                    )
                tracker.finish()
                return theta
    theta = _generic_ntk(model, inputs, active, output_fn=output_fn, dtype=dtype, progress=tracker, **options)
    tracker.finish()
    return theta


def _to_matrix(output_fn: OutputFn | None) -> Callable[[Any, int], Tensor]:
    return lambda raw, batch: plumbing.output_matrix(raw, output_fn, batch)


def _resolve_method(method: NTKMethod | str) -> NTKMethod:
    try:
        return NTKMethod(method)
    except ValueError:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.") from None


# -------------------------------------------------------------------------- generic torch.func path


def _structured_plan(
    model: nn.Module,
    inputs: Tensor,
    active: dict[str, Tensor],
    output_fn: OutputFn | None,
    options: Mapping[str, Any],
    dtype: torch.dtype,
    *,
    strict: bool,
) -> StructuredPlan | None:
    """The structured layers' plan; ``None`` → all generic (raises if ``strict``)."""
    try:
        plan = plan_structured(model, inputs, active, to_matrix=_to_matrix(output_fn), dtype=dtype, **options)
    except NotStructurable:
        if strict:
            raise
        return None
    if plan is None and strict:
        raise ValueError(
            'method="structured" found no trainable Linear / Conv / BatchNorm / LayerNorm / GroupNorm / '
            "Embedding parameter it can handle exactly within the memory budget (see lin_probe.ntk.structured); use "
            'method="auto" or "generic".'
        )
    return plan


@dataclass(frozen=True)
class GenericPlan:
    """The generic path's chunking for ``n`` examples: ``b`` per chunk, ``k`` outputs per slice."""

    n: int
    width: int
    b: int
    k: int

    @property
    def slices(self) -> int:
        return -(-self.width // self.k)

    @property
    def loads(self) -> int:
        """Jacobian blocks computed (the progress units): per output slice, :func:`~lin_probe.ntk._plumbing.stream_loads`."""
        return self.slices * plumbing.stream_loads(-(-self.n // self.b))

    @property
    def recorded_examples(self) -> float:
        """Example-Jacobians of all ``C`` outputs computed in all (``n`` when nothing is recomputed)."""
        chunks = -(-self.n // self.b)
        per_slice = self.n if chunks <= 1 else plumbing.stream_loads(chunks) * self.b
        return per_slice * self.slices * self.k / self.width


def _generic_plan(
    forward: Forward,
    params: dict[str, Tensor],
    inputs: Tensor,
    budget: int,
    chunk_size: int | None,
    n: int | None = None,
) -> GenericPlan:
    """Measure one example and plan ``(b, k)`` for ``n`` examples (default ``len(inputs)``)."""
    n = inputs.shape[0] if n is None else n
    width, act_bytes = plumbing.measure_one_example(forward, params, inputs[:1])
    b, k = _plan_dense(n, width, plumbing.row_bytes(params), act_bytes, budget, chunk_size)
    return GenericPlan(n, width, b, k)


def generic_plan(
    model: nn.Module,
    inputs: Tensor,
    params: dict[str, Tensor],
    output_fn: OutputFn | None,
    budget: int,
    chunk_size: int | None,
    n: int | None = None,
) -> GenericPlan:
    """:func:`_generic_plan` under the generic path's backends and eval semantics (one example run)."""
    with measurement_backends(model, math_attention=True), eval_semantics(model), torch.no_grad():
        forward = plumbing.forward_fn(model, plumbing.constants(model, params), output_fn)
        return _generic_plan(forward, params, inputs, budget, chunk_size, n)


def _generic_loads(
    model: nn.Module,
    inputs: Tensor,
    params: dict[str, Tensor],
    output_fn: OutputFn | None,
    budget: int,
    chunk_size: int | None,
) -> int:
    return generic_plan(model, inputs, params, output_fn, budget, chunk_size).loads


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
    progress: plumbing.Progress | None = None,
) -> Tensor:
    """``(1/C) Σ_c Σ_{p ∈ params} w_p J_{c,p} J_{c,p}ᵀ``, differentiating only ``params``.

    Every other parameter and buffer is read from the module as a constant, so kernels over
    disjoint parameter subsets add up to the full kernel (a per-layer fast path sums its part with
    this one). ``inputs`` must already be validated and on the model's device. Empty ``params``
    gives a zero kernel. One ``progress`` unit per Jacobian block.
    """
    n = inputs.shape[0]
    dtype = dtype or plumbing.kernel_dtype(params, fallback=torch.get_default_dtype())
    weights = weights or {}
    budget = plumbing.resolve_budget(memory_budget)
    tracker = progress or plumbing.Progress(None)
    with measurement_backends(model, math_attention=True), eval_semantics(model), torch.no_grad():
        forward = plumbing.forward_fn(model, plumbing.constants(model, params), output_fn)
        plan = _generic_plan(forward, params, inputs, budget, chunk_size)
        theta = torch.zeros(n, n, dtype=dtype, device=inputs.device)
        if not params:
            return theta
        tracker.start(plan.loads)
        strategy = VmapOrLoop(model, skip_rnn=False)
        block: Callable[..., dict[str, Tensor]] = (
            BatchedForwardJacobian() if _has_rnn(model) else _jacobian_block
        )
        for outputs in plumbing.slices(plan.width, plan.k):
            _accumulate_gram(
                theta, forward, params, inputs, outputs, plan.b, weights, strategy, block, tracker
            )
    return (theta + theta.T) / (2 * plan.width)


def _accumulate_gram(
    theta: Tensor,
    forward: Forward,
    params: dict[str, Tensor],
    inputs: Tensor,
    outputs: slice,
    b: int,
    weights: Mapping[str, float],
    strategy: VmapOrLoop,
    block: Callable[..., dict[str, Tensor]] | None = None,
    progress: plumbing.Progress | None = None,
) -> None:
    """Add ``Σ_{c ∈ outputs} Σ_p w_p J_{c,p} J_{c,p}ᵀ`` block pair by block pair, two Jacobian blocks alive at most."""
    chunks = list(plumbing.slices(inputs.shape[0], b))
    block = block or _jacobian_block

    def jacobian(index: int) -> dict[str, Tensor]:
        rows = inputs[chunks[index]]
        jac = strategy(block, _loop_jacobian_block, forward, params, rows, outputs)
        if progress is not None:
            progress.step()  # outside `strategy`: an exception from the hook is not a vmap failure
        return jac

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


RNN_SUBCHUNK = 4
"""Examples per batched forward in :class:`BatchedForwardJacobian`: its ``s·k`` vmapped backwards each
run the whole sub-chunk, so the cost grows like ``s²``; 4 was fastest on the zoo LSTM (2 and 8: ~1.2×
slower, 16: 2.5×)."""


class BatchedForwardJacobian:
    """Per-example Jacobians of models ``vmap`` over examples cannot run (``nn.LSTM`` / ``GRU`` / ``RNN``).

    Why: the fused RNN kernels write an unbatched buffer in place, so ``vmap(jacrev)`` fails over
    examples (float64, or oneDNN off) or falls back to a slow per-example loop (float32, oneDNN
    on), while ``jacrev`` of an ordinary *batched* forward of ``s`` examples vmaps its ``s·k``
    cotangents fine (oneDNN off, as :func:`measurement_backends` sets). Row ``i`` of that Jacobian is
    example ``i``'s exactly when examples do not interact, which the first call checks by comparing
    the batched outputs with one-example forwards; a mismatch raises ``RuntimeError`` so the caller
    falls back to the exact loop.
    """

    def __init__(self, subchunk: int = RNN_SUBCHUNK) -> None:
        self.subchunk = subchunk
        self.checked = False

    def __call__(
        self, forward: Forward, params: dict[str, Tensor], rows: Tensor, outputs: slice
    ) -> dict[str, Tensor]:
        parts: list[dict[str, Tensor]] = []
        for s in plumbing.slices(rows.shape[0], self.subchunk):
            x = rows[s]

            def batched(p: dict[str, Tensor], x: Tensor = x) -> tuple[Tensor, Tensor]:
                out = forward(p, x)[:, outputs]
                return out, out

            jac, out = jacrev(batched, has_aux=True)(params)
            if not self.checked:
                self._check_independent(forward, params, x, outputs, out)
            parts.append(jac)
        return {name: torch.cat([part[name] for part in parts]) for name in params}

    def _check_independent(
        self, forward: Forward, params: dict[str, Tensor], x: Tensor, outputs: slice, out: Tensor
    ) -> None:
        alone = torch.cat([forward(params, x[i : i + 1])[:, outputs] for i in range(x.shape[0])])
        eps = torch.finfo(out.dtype).eps if out.is_floating_point() else 0.0
        scale = float(alone.abs().max()) if alone.numel() else 0.0
        if not torch.allclose(out, alone, rtol=1e3 * eps, atol=1e3 * eps * max(scale, 1.0)):
            raise RuntimeError(
                "the batched forward mixes examples (its outputs differ from one-example runs)"
            )
        self.checked = True


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
        b_flat = a_flat if jac_b is jac_a else jac_b[name].reshape(jac_b[name].shape[0], -1).to(dtype)
        gram = plumbing.gram_product(a_flat, b_flat) * float(weights.get(name, 1.0))  # tiled when b is a
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
