"""The cost model behind ``method="auto"``: time each dense method on a few examples, extrapolate to ``n``.

Why timed and not counted: the two dense paths spend their time in very different kernels (a
batched backward over ``C`` outputs plus per-layer einsums, vs ``vmap(jacrev)`` plus one big
matmul) whose speed depends on the backend, the thread count and the layer shapes far more than on
FLOPs. So each candidate runs on ``m`` and ``2m`` of the examples (``m = clamp(n // 32, 2, 8)``)
and the two times fit

    ``t(N) = α·E(N) + β·N²``

with ``E(N)`` the examples the path records (forward + backward) for ``N`` examples under the
memory budget — ``N`` when every chunk's features or Jacobians are kept, more when the budget forces
chunk pairs to be recomputed (:attr:`~lin_probe.ntk.structured.StructuredPlan.recorded_examples`,
:attr:`~lin_probe.ntk.dense.GenericPlan.recorded_examples`): that is the part the probe, small
enough to fit, cannot show. ``β·N²`` is the Gram contraction; where the structured plan counts all
of its multiply-adds, ``β`` is capped by the Gram's share of them (two close probes leave it to
timing noise otherwise). The generic candidate is not timed when the upper triangle of its Gram
alone, at the measured matmul rate (:func:`generic_gram_floor_s`), is out of the race. A probe
``n ≤ 16`` is not timed: the whole kernel costs about what the probe would; structured timings the
caller already has (the monitor's pilot, on 4 and 8 examples) replace that path's probe.
``method="auto"`` makes the choice once per model and call signature in a process and remembers it
(:func:`remembered_choice`). Candidates: the structured rules (with the generic rest) where any
layer qualifies, and the generic Jacobian contraction. NTK-vector products are not a candidate (see
:class:`~lin_probe.ntk.dense.NTKMethod`).
"""

from __future__ import annotations

import functools
import math
import time
import weakref
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lin_probe.ntk import _plumbing as plumbing
from lin_probe.ntk import dense
from lin_probe.ntk._plumbing import OutputFn, ProgressFn
from lin_probe.ntk.dense import NTKMethod, measurement_backends
from lin_probe.ntk.structured import NotStructurable, StructuredPlan

UNTIMED_MAX_N = 16
"""Probe sets up to this size are not timed: the structured rules are used where they apply."""


@dataclass(frozen=True)
class MethodChoice:
    """The concrete method ``method="auto"`` runs, and why.

    ``estimates`` maps each candidate (:class:`NTKMethod` value) to its extrapolated seconds for
    the ``n`` examples (absent: not timed; ``inf``: it cannot run; a candidate dropped after its
    first probe gets that probe scaled to the examples it would record, a lower bound); ``reason`` is a
    short phrase.
    """

    method: NTKMethod
    n: int
    estimates: Mapping[str, float] = field(default_factory=dict)
    reason: str = ""

    def explain(self) -> str:
        """One line for a log: the method and each candidate's estimate."""
        times = ", ".join(f"{name} ~{seconds:.3g} s" for name, seconds in self.estimates.items())
        return (
            f"NTK method {self.method.value!r} for n={self.n} ({self.reason}{'; ' + times if times else ''})"
        )


def choose_method(
    model: nn.Module,
    inputs: Tensor,
    *,
    output_fn: OutputFn | None = None,
    param_weights: Mapping[str, float] | None = None,
    memory_budget: int | None = None,
    chunk_size: int | None = None,
    progress: ProgressFn | None = None,
    structured_seconds: Mapping[int, float] | None = None,
) -> MethodChoice:
    """The faster of the structured rules and the generic Jacobian contraction for this kernel.

    Same arguments as :func:`lin_probe.ntk.empirical_ntk` (the kernel is not computed): runs both
    on a few of ``inputs`` (module docstring) and leaves the model as it was; always times (the
    memory ``method="auto"`` keeps is :func:`remembered_choice`'s). Pass the result's ``method`` to
    later calls to skip the probe. ``progress`` follows
    each timed kernel's units (each run counts afresh), so a caller can abort the probe too.
    ``structured_seconds`` (``{m: seconds}``): the structured kernel already timed on ``inputs[:m]``
    for two or more ``m`` (the monitor's pilot); the two largest replace its probe.
    """
    inputs, budget, params, weights = plumbing.prepare_call(
        model, inputs, chunk_size=chunk_size, memory_budget=memory_budget, param_weights=param_weights
    )
    return choose_prepared(
        model, inputs, budget, params, weights, output_fn, chunk_size, progress, structured_seconds
    )


def choose_prepared(
    model: nn.Module,
    inputs: Tensor,
    budget: int,
    params: dict[str, Tensor],
    weights: dict[str, float],
    output_fn: OutputFn | None,
    chunk_size: int | None,
    progress: ProgressFn | None = None,
    structured_seconds: Mapping[int, float] | None = None,
) -> MethodChoice:
    """:func:`choose_method` on checked arguments (as :func:`~lin_probe.ntk.empirical_ntk` has them)."""
    n = inputs.shape[0]
    active, plan = _structured_candidate(model, inputs, budget, params, weights, output_fn, chunk_size)
    if plan is None:
        return MethodChoice(NTKMethod.GENERIC, n, reason="no layer has a structured rule")
    if n <= UNTIMED_MAX_N:
        return MethodChoice(NTKMethod.STRUCTURED, n, reason=f"n ≤ {UNTIMED_MAX_N}: structured rules, untimed")
    m = plumbing.clamp(n // 32, 2, 8)
    rest = {name: p for name, p in active.items() if name not in plan.covered}

    @functools.cache  # the same (method, count) is asked by the pruning and the extrapolation
    def examples(method: NTKMethod, count: int) -> float:
        """``E(count)``: examples the method records for ``count`` examples under this budget."""
        generic_params = active if method is NTKMethod.GENERIC else rest
        total = 0.0
        if method is NTKMethod.STRUCTURED:
            total = plan.recorded_examples if count == n else count  # the probes fit the budget
        if generic_params:
            g = dense.generic_plan(model, inputs, generic_params, output_fn, budget, chunk_size, n=count)
            total = max(total, g.recorded_examples)
        return total

    def share(method: NTKMethod, count: int) -> float | None:
        """:func:`gram_share` of the structured plan; ``None`` for the generic path or with a generic rest."""
        return None if method is not NTKMethod.STRUCTURED or rest else gram_share(plan, count)

    def run(method: NTKMethod, count: int) -> float:
        start = time.perf_counter()
        with measurement_backends(model, math_attention=False):
            dense._empirical_ntk(
                model,
                inputs[:count],
                method,
                budget,
                params,
                weights,
                output_fn,
                chunk_size,
                plumbing.Progress(progress),
                strict=True,
            )
        _synchronize(inputs.device)
        return time.perf_counter() - start

    candidates = (NTKMethod.STRUCTURED, NTKMethod.GENERIC)
    estimates: dict[str, float] = {}
    known = sorted((size, t) for size, t in (structured_seconds or {}).items() if 1 <= size <= n)[-2:]
    if len(known) == 2:  # already timed (the pilot): no structured probe
        estimates[NTKMethod.STRUCTURED.value] = _through(NTKMethod.STRUCTURED, *known, n, examples, share)
    for method in candidates:  # the structured rules first: usually the cheaper probe
        if method.value in estimates:
            continue
        best = min(estimates.values(), default=math.inf)
        if method is NTKMethod.GENERIC:
            numel = sum(p.numel() for p in active.values())
            floor = generic_gram_floor_s(n, plan.width, numel, plumbing.kernel_dtype(params), inputs.device)
            if floor > PRUNE_FACTOR * best:  # its Gram alone is out of the race: not even one example
                estimates[method.value] = floor
                continue
        estimates[method.value] = _estimate(
            method, m, n, run, examples, give_up_above=PRUNE_FACTOR * best, gram_share=share
        )
    best = min(candidates, key=lambda c: estimates[c.value])
    timed = f"structured timed before on {known[0][0]} and {known[1][0]}" if len(known) == 2 else ""
    probed = f"timed on {m} and {2 * m} examples"
    return MethodChoice(best, n, estimates, reason=f"{timed}, generic {probed}" if timed else probed)


def gram_share(plan: StructuredPlan, count: int) -> float | None:
    """The Gram products' share of ``plan``'s multiply-adds for ``count`` examples (its per-example
    and per-pair counts scaled to ``count``); ``None`` when the plan counted none."""
    if plan.macs <= 0:
        return None
    n = plan.n
    recording = (plan.macs - plan.gram_macs) / max(plan.recorded_examples, 1.0)
    gram = plan.gram_macs / (n * n) * count * count
    return gram / max(recording * count + gram, 1e-300)


def structured_gram_share(
    model: nn.Module,
    inputs: Tensor,
    *,
    output_fn: OutputFn | None = None,
    param_weights: Mapping[str, float] | None = None,
    memory_budget: int | None = None,
) -> float | None:
    """:func:`gram_share` of the structured kernel on all of ``inputs`` (one recorded example, no
    kernel); ``None`` where that kernel does not count all its work: no structured layer, or a
    generic rest. What the monitor's budget caps its NTK cost curve's ``n²`` term with."""
    inputs, budget, params, weights = plumbing.prepare_call(
        model, inputs, chunk_size=None, memory_budget=memory_budget, param_weights=param_weights
    )
    active, plan = _structured_candidate(model, inputs, budget, params, weights, output_fn, None)
    if plan is None or set(active) - plan.covered:
        return None
    return gram_share(plan, inputs.shape[0])


def _structured_candidate(
    model: nn.Module,
    inputs: Tensor,
    budget: int,
    params: dict[str, Tensor],
    weights: dict[str, float],
    output_fn: OutputFn | None,
    chunk_size: int | None,
) -> tuple[dict[str, Tensor], StructuredPlan | None]:
    """The parameters with a positive weight, and the structured plan for them (``None``: no layer
    qualifies, or the model's examples interact in a batch)."""
    active = {name: p for name, p in params.items() if weights[name] > 0.0}
    options = {"weights": weights, "memory_budget": budget, "chunk_size": chunk_size}
    with measurement_backends(model, math_attention=False):
        try:
            plan = dense._structured_plan(
                model, inputs, active, output_fn, options, plumbing.kernel_dtype(params), strict=False
            )
        except NotStructurable:
            plan = None
    return active, plan


REMEMBERED_PER_MODEL = 8
"""Call signatures per model whose ``auto`` choice is remembered (the oldest is forgotten first)."""

_REMEMBERED: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, tuple[MethodChoice, OutputFn | None]]] = (
    weakref.WeakKeyDictionary()
)
"""Per model (dropped with it): call signature → the choice and the output function it was made for
(kept alive, so its id in the signature is not reused meanwhile)."""


def remembered_choice(
    model: nn.Module,
    inputs: Tensor,
    budget: int,
    params: dict[str, Tensor],
    weights: dict[str, float],
    output_fn: OutputFn | None,
    chunk_size: int | None,
) -> MethodChoice:
    """:func:`choose_prepared`, timed once per model and call signature in this process.

    What ``method="auto"`` runs. Why remembered: the probe costs up to a few tenths of the kernel
    (the zoo Transformer at n = 64: 0.3 s for a 0.46-s kernel), and what it measures — which path is
    faster — depends on the shapes, not on the weights' values, so a caller computing the kernel of
    one model again (training, a sweep over checkpoints) would pay it every time. cuDNN's
    ``benchmark`` mode remembers its timed algorithm choice per input shape for the same reason.
    The signature: the input's shape, dtype and device, every differentiated parameter's name,
    shape, dtype and whether its weight is positive, the module classes, the budget, the chunk size,
    the output function and the thread count. A stale choice can only be slower, never wrong: both
    paths are exact. :func:`forget_choices` clears the memory; :func:`choose_method` always times.
    """
    key = (
        tuple(inputs.shape),
        inputs.dtype,
        str(inputs.device),
        tuple((name, tuple(p.shape), p.dtype, weights[name] > 0.0) for name, p in params.items()),
        tuple(type(module) for module in model.modules()),
        budget,
        chunk_size,
        id(output_fn),
        torch.get_num_threads(),
    )
    choices = _REMEMBERED.setdefault(model, {})
    if key not in choices:
        while len(choices) >= REMEMBERED_PER_MODEL:
            choices.pop(next(iter(choices)))
        choice = choose_prepared(model, inputs, budget, params, weights, output_fn, chunk_size)
        choices[key] = (choice, output_fn)
    return choices[key][0]


def forget_choices() -> None:
    """Forget every remembered ``auto`` choice (:func:`remembered_choice`): the next call times again."""
    _REMEMBERED.clear()


def generic_gram_floor_s(n: int, width: int, numel: int, dtype: torch.dtype, device: torch.device) -> float:
    """Seconds the generic path cannot beat: the upper triangle of its Gram, ``n(n+1)/2`` inner
    products of ``C·P`` numbers, at this machine's matmul rate (:func:`matmul_rate`).

    Why: the Jacobian contraction must form that Gram whatever it records, and a Gram product runs
    at about the matmul rate, so on a wide MLP (C·P = 18.6 M at n = 64: ≥ 0.8 s against the
    structured rules' 0.05 s) the generic path is out of the race before any example is timed.
    """
    return n * (n + 1) / 2 * width * numel / matmul_rate(dtype, device)


_MATMUL_SIDE = 512


@functools.cache
def matmul_rate(dtype: torch.dtype, device: torch.device) -> float:
    """Multiply-adds per second of a ``512³`` product in ``dtype`` on ``device``, the fastest of four
    calls (milliseconds, once per process): a Gram of that size or larger runs at about this rate."""
    a = torch.randn(_MATMUL_SIDE, _MATMUL_SIDE, dtype=dtype, device=device)
    best = math.inf
    for _ in range(4):  # the first call may also start the thread pool
        start = time.perf_counter()
        a @ a
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return _MATMUL_SIDE**3 / max(best, 1e-9)


PRUNE_FACTOR = 3.0
"""A candidate whose first probe, scaled linearly to ``n``, exceeds this many times the best
estimate so far is not probed further: its probe alone would cost more than the choice can save."""


def _estimate(
    method: NTKMethod,
    m: int,
    n: int,
    run: Callable[[NTKMethod, int], float],
    examples: Callable[[NTKMethod, int], float],
    *,
    give_up_above: float,
    gram_share: Callable[[NTKMethod, int], float | None] | None = None,
) -> float:
    """Seconds ``method`` needs for ``n`` examples: timed on ``m`` and ``2m``, extrapolated.

    No warm-up call for the first candidate: on small kernels the per-call overhead of a third call
    is what makes the probe expensive, and a first call's one-off costs only inflate ``t1``. A later
    candidate first runs on one example and is dropped if that alone, times the ``E(n)`` examples it
    would record, is out of the race (the MLP's Jacobians: 0.06 s instead of 0.5 s for its ``m = 8``
    probe; the zoo ResNet's at n = 256, whose chunk pairs would be recomputed: 0.09 s instead of
    another 1.9 s on 8 and 16 examples, in an ad hoc timing).
    """
    recorded = examples(method, n)
    try:
        if math.isfinite(give_up_above):  # a later candidate: one example first, to drop it cheaply
            t0 = run(method, 1)
            if t0 * recorded > give_up_above:
                return t0 * recorded  # a lower bound already out of the race: do not probe it further
        t1 = run(method, m)
        if t1 * recorded / m > give_up_above:
            return t1 * recorded / m
        t2 = run(method, 2 * m)
    except (NotStructurable, ValueError):
        return math.inf  # the structured rules refused a probe batch
    return _through(method, (m, t1), (2 * m, t2), n, examples, gram_share)


def _through(
    method: NTKMethod,
    first: tuple[int, float],
    second: tuple[int, float],
    n: int,
    examples: Callable[[NTKMethod, int], float],
    gram_share: Callable[[NTKMethod, int], float | None] | None = None,
) -> float:
    """:func:`_extrapolate` through two ``(examples, seconds)`` timings of ``method``, to ``n``."""
    (m1, t1), (m2, t2) = first, second
    share = None if gram_share is None else gram_share(method, m2)
    return _extrapolate(
        t1, t2, m1, m2, examples(method, m1), examples(method, m2), examples(method, n), n, gram_share=share
    )


def _extrapolate(
    t1: float,
    t2: float,
    m1: int,
    m2: int,
    e1: float,
    e2: float,
    e_n: float,
    n: int,
    *,
    gram_share: float | None = None,
) -> float:
    """``α·E(n) + β·n²`` through ``(E(m1), m1², t1)`` and ``(E(m2), m2², t2)``, with ``α, β ≥ 0``.

    ``gram_share``: the quadratic part's share of the multiply-adds at ``m2``, when counted. ``β``
    is then at most that share of ``t2`` (the Gram products run no slower per multiply-add than
    the recordings' backward passes). Why: a 16-example probe 10 % slower than twice the 8-example
    one puts 19 % of ``t2`` on ``n²``, and ``(n/m2)²`` amplifies it: on the zoo ResNet at n = 256,
    whose Gram is 5 % of the multiply-adds at 16 examples, that estimated 63 s for a 17-s kernel.
    """
    det = e1 * m2 * m2 - e2 * m1 * m1
    alpha = beta = -1.0
    if det > 0:
        alpha = (t1 * m2 * m2 - t2 * m1 * m1) / det
        beta = (e1 * t2 - e2 * t1) / det
    if alpha < 0 or beta < 0:  # noise: keep the linear term alone, through the larger probe
        alpha, beta = t2 / max(e2, 1.0), 0.0
    if gram_share is not None and beta * m2 * m2 > gram_share * t2:
        beta = gram_share * t2 / (m2 * m2)
        alpha = (t2 - beta * m2 * m2) / max(e2, 1.0)
    return alpha * e_n + beta * n * n


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = [
    "UNTIMED_MAX_N",
    "MethodChoice",
    "choose_method",
    "forget_choices",
    "gram_share",
    "remembered_choice",
    "structured_gram_share",
]
