"""Exact NTK blocks of Linear / Conv / normalisation / Embedding layers without per-example Jacobians.

Covered: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (weight and bias), the affine parameters of
``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` / ``nn.LayerNorm`` / ``nn.GroupNorm``, ``nn.Embedding``, and
``nn.MultiheadAttention``'s input and output projections (Linear layers on sequences, made visible
to the hooks by :mod:`lin_probe.ntk.attention`).
Everything else (and anything failing a guard below) goes to the generic torch.func path.

**Linear / Conv.**

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

**Normalisation affine parameters.** ``y = γ ⊙ x̂ + β`` per channel (BatchNorm, GroupNorm: dimension 1)
or per ``normalized_shape`` entry (LayerNorm), so ``∂f_k/∂γ = Σ_positions Δ_k ⊙ x̂`` and
``∂f_k/∂β = Σ_positions Δ_k``: ``C·|γ|`` numbers per example and the block is one matmul
(``n²C|γ|`` flops). ``x̂`` is recomputed from the layer's input as its eval-mode forward does
(BatchNorm: running statistics), not read off the output, where ``γ = 0`` would lose it. A BatchNorm
without running statistics normalises with batch statistics even in eval mode, so it mixes a
chunk's examples: such a model raises :class:`NotStructurable` and goes wholly generic.

**Embedding** (``max_norm`` unset, ``scale_grad_by_freq`` and ``sparse`` off; else generic). Row ``v``
gets ``∂f_k/∂W_v = Σ_{l: tok_l = v} Δ_{k,l}``; positions holding ``padding_idx`` contribute nothing, as
in torch's embedding backward. Two strategies: *dense rows* (``C·V·d`` numbers per example,
``n²C·V·d`` flops) or the *token Gram* ``Σ_{l,l'} (Δ_{i,l}·Δ_{j,l'}) [tok_{i,l} = tok_{j,l'}]``
(``n²L²(C·d + 1)`` flops, ``L(C·d + 1)`` numbers per example); the cheaper by flops, and the token
Gram whenever one example's dense rows exceed a quarter of the memory budget.

For every layer kind, ``Δ`` for every output comes from one recorded forward per example chunk and one batched backward
over the ``C`` outputs (``is_grads_batched``): a zero tensor is added to each layer's output by a
forward hook and the gradient with respect to it is ``Δ``.

Exactness guards (any failure sends the layer's parameters back to the generic torch.func path):
the module's class keeps its supported base class's ``forward`` (and ``_conv_forward`` /
``_check_input_dim``), so e.g. ``NonDynamicallyQuantizableLinear`` qualifies; it must actually be
called (``MultiheadAttention.out_proj`` is called only where :mod:`lin_probe.ntk.attention` supports
the attention module; an attention's three input projections are kept all or none); no
parametrizations; called once per forward, or (Linear, Embedding) several times alike, a weight
shared by repeated calls whose calls stack as extra positions (:func:`_repeatable`); batched
inputs whose leading dimension indexes the examples (and is not normalised over);
a tensor tied to another module (e.g. an embedding tied to the output layer) goes generic on its
own. Like :func:`lin_probe.ntk.predict`, the recorded forward is batched, so examples must not
interact in eval mode (the generic path evaluates each example alone). A parameter read outside its module's
own call (``x @ self.fc.weight`` elsewhere in a custom ``forward``) cannot be seen by hooks and is
not supported on this path: use ``method="generic"`` for such models.

Memory: with ``a`` the bytes autograd saves for one example's forward and ``isz`` the item size,
one example costs ``t = (C + 1)·a + Σ_layers (C·|y| + L·G·D)·isz`` while being recorded (graph,
batched backward, cotangents, patches) and ``r = Σ_layers rep·isz`` once reduced (weight
gradients: ``C·C_out·(D + 1)``; patch Gram: ``L·G·(C·O + D)``; bias only: ``C·C_out``; normalisation:
``C·(|γ| + |β|)`` with ``2(C + 1)|y|`` transient; embedding as above). Chunks of
``b`` examples satisfy ``b·(t + 2r) ≤ budget``; if every chunk's reduction fits next to one chunk's
recording (``n·r + b·(t + r) ≤ budget`` for ``b ≥ min(n, 4)``) or in half the budget, each chunk is
recorded once, otherwise two chunks are kept at a time and the others recomputed, as in the
generic path. Patch Gram products are sub-blocked so their two
``(sL)²`` matrices stay under a quarter of the budget.

**Output slices.** The kernel is a sum over outputs, and ``t`` and ``r`` shrink with the outputs
recorded at once. When all ``C`` outputs' features do not fit (recomputation, or not even one
example), the planner prices recording ``k = C, ⌈C/2⌉, …, 1`` outputs at a time, each with every
layer's cheapest strategy or with its leanest features, in multiply-adds: per slice, each
recording's ``1 + k`` forwards (the backward to the layer outputs is one forward per cotangent)
and feature forming, plus the Gram products; the cheapest wins. A slice repeats the forward;
recomputation repeats everything, so on a language model sketched to 16 outputs (n = 256, 1 GiB)
slices of one output record 7× fewer example-equivalents than recomputed chunk pairs of all 16.
Only when no width fits one example does the whole kernel go to the generic path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from lin_probe._model_state import eval_semantics
from lin_probe.ntk import attention
from lin_probe.ntk._plumbing import (
    Progress,
    clamp,
    dtype_itemsize,
    gram_product,
    gram_tile,
    saved_bytes,
    slices,
    span,
    stream_block_pairs,
    stream_loads,
)

ToMatrix = Callable[[Any, int], Tensor]
"""``(raw model output, batch) → (batch, C)``: the caller's output selection and checks."""

AFFINE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
STRUCTURED_TYPES: tuple[type[nn.Module], ...] = (*AFFINE_TYPES, *NORM_TYPES, nn.Embedding)
"""Module types with a structured Gram; a subclass qualifies only if it keeps the base class's ``forward``."""

_FORWARD_METHODS = ("forward", "_conv_forward", "_check_input_dim")
"""Methods a subclass must not override (the layer math below assumes the base implementation)."""


def _structured_base(module: nn.Module) -> type[nn.Module] | None:
    """The supported base class whose computation ``module`` runs unchanged, else ``None``."""
    cls = type(module)
    for base in STRUCTURED_TYPES:
        if isinstance(module, base):
            same = all(getattr(cls, m, None) is getattr(base, m, None) for m in _FORWARD_METHODS)
            return base if same else None
    return None


def _kind(module: nn.Module) -> str:
    """``"affine"`` (Linear/Conv), ``"norm"`` (normalisation affine) or ``"embedding"``."""
    if isinstance(module, AFFINE_TYPES):
        return "affine"
    return "embedding" if isinstance(module, nn.Embedding) else "norm"


def _supported_config(module: nn.Module) -> bool:
    """Configurations whose gradient the rules reproduce exactly (others go generic)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        # without running statistics eval mode normalises with batch statistics: examples interact
        return module.running_mean is not None and module.running_var is not None
    if isinstance(module, nn.Embedding):
        return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
    return True


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
    in_shape: tuple[int, ...] = ()  # per example; a layer called k > 1 times: (k, *one call's)
    out_shape: tuple[int, ...] = ()
    strategy: str = ""
    repeats: int = 1  # calls per forward

    @property
    def kind(self) -> str:
        return _kind(self.module)

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
    tokens: Tensor | None = None  # (b, L) embedding indices, token Gram strategy


@dataclass
class _Recording:
    """What the forward hooks saw in one pass: per layer, every call's input and output tap."""

    calls: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    taps: dict[str, list[Tensor]] = field(default_factory=dict)

    def uniform(self, name: str) -> bool:
        """Every call of layer ``name`` took inputs of one shape and gave outputs of one shape."""
        return all(len({tuple(t.shape) for t in tensors[name]}) == 1 for tensors in (self.inputs, self.taps))

    def stacked_input(self, name: str) -> Tensor:
        """The input of a layer called once; of one called ``k`` times, the ``k`` inputs on dimension 1,
        as ``k`` times the positions (:func:`_repeatable`)."""
        inputs = self.inputs[name]
        return inputs[0] if len(inputs) == 1 else torch.stack(inputs, dim=1)


# ------------------------------------------------------------------------------------------ public


@dataclass
class StructuredPlan:
    """What :func:`plan_structured` decided for ``n`` examples: layers, output width, chunking.

    Separate from running so the dense kernel can report the total work before any is done, and
    :func:`lin_probe.ntk.choice.choose_method` can price the recomputation of a budget too small
    to keep every chunk's features.
    """

    layers: list[_Layer]
    width: int
    n: int
    b: int
    cache: bool
    k: int = 0  # outputs per slice (0: all ``width`` at once)
    macs: float = 0.0
    """Multiply-adds the plan makes for its ``n`` examples (:func:`_option`'s price)."""
    gram_macs: float = 0.0
    """Of :attr:`macs`, the Gram products' (``∝ n²``; the rest grows with the recordings)."""

    def __post_init__(self) -> None:
        self.k = self.width if self.k <= 0 else min(self.k, self.width)

    @property
    def output_slices(self) -> list[slice]:
        """The output slices recorded one after another (one slice of all ``C`` when unsliced)."""
        return list(slices(self.width, self.k))

    @property
    def covered(self) -> set[str]:
        """Parameter names whose kernel block this path computes."""
        return {name for ly in self.layers for name in (ly.weight, ly.bias) if name is not None}

    @property
    def chunks(self) -> int:
        return -(-self.n // self.b)

    @property
    def loads(self) -> int:
        """Chunk recordings (forward + batched backward) the run makes: the progress units."""
        return len(self.output_slices) * stream_loads(self.chunks, cache=self.cache)

    @property
    def recorded_examples(self) -> float:
        """Example recordings of all ``C`` outputs, in equivalents: ``n`` when nothing is recomputed.

        A recording of ``k`` outputs costs about ``1 + k`` forwards (the batched backward to the
        layer outputs is one forward's work per cotangent), so each output slice counts its
        recordings times ``(1 + k)/(1 + C)``: slicing repeats the forward, recomputation everything.
        """
        per_slice = self.examples_per_slice
        return sum(per_slice * (1 + span(s)) / (1 + self.width) for s in self.output_slices)

    @property
    def examples_per_slice(self) -> int:
        """Examples recorded for each output slice: ``n``, more when chunk pairs are recomputed."""
        return self.n if self.cache or self.chunks <= 1 else stream_loads(self.chunks) * self.b


def plan_structured(
    model: nn.Module,
    inputs: Tensor,
    params: Mapping[str, Tensor],
    *,
    to_matrix: ToMatrix,
    weights: Mapping[str, float],
    memory_budget: int,
    chunk_size: int | None,
    dtype: torch.dtype,
    n: int | None = None,
) -> StructuredPlan | None:
    """The structured layers of ``model`` and the chunking for ``n`` examples (default: ``len(inputs)``).

    ``None`` when no parameter of ``params`` is structurable or one example does not fit
    ``memory_budget``; raises :class:`NotStructurable` for models whose examples interact.
    Only ``inputs[:1]`` is run (one recorded forward).
    """
    layers = candidate_layers(model, params, weights)
    if not layers:
        return None
    _check_examples_independent(model)
    n = inputs.shape[0] if n is None else n
    with eval_semantics(model):
        layers, width, act_bytes = _probe(model, _constants(model), layers, inputs[:1], to_matrix)
    if not layers:
        return None
    itemsize = dtype_itemsize(dtype)
    sizes = _Sizes(n, width, act_bytes, itemsize, memory_budget, chunk_size)
    option = _option(layers, sizes, width, lean=False)
    if option is None or not option.plan.cache:  # recomputation or no room: price slicing the outputs
        options = [
            _option(layers, sizes, k, lean=lean) for k in _slice_widths(width) for lean in (False, True)
        ]
        feasible = [o for o in options if o is not None]
        if not feasible:
            return None
        option = min(feasible, key=lambda o: o.cost)
    for layer, strategy in zip(layers, option.strategies, strict=True):
        layer.strategy = strategy
    return option.plan


@dataclass(frozen=True)
class _Sizes:
    """What every candidate plan of one call shares: ``n``, ``C``, saved bytes per example, budget."""

    n: int
    width: int
    act_bytes: int
    itemsize: int
    budget: int
    chunk_size: int | None


@dataclass(frozen=True)
class _Option:
    """One candidate plan (outputs per slice, chunking), the per-layer strategies it assumes, its price."""

    plan: StructuredPlan
    strategies: tuple[str, ...]

    @property
    def cost(self) -> float:
        return self.plan.macs


def _slice_widths(width: int) -> list[int]:
    """Outputs per slice worth pricing: ``C``, ``⌈C/2⌉``, ``⌈C/4⌉``, … 1."""
    widths, k = [], width
    while True:
        widths.append(k)
        if k == 1:
            return widths
        k = -(-k // 2)


def _option(layers: list[_Layer], sizes: _Sizes, k: int, *, lean: bool) -> _Option | None:
    """The plan recording ``k`` outputs at a time (``lean``: each layer's smallest features), priced.

    ``None`` when one example does not fit the budget at this width. The price is in multiply-adds:
    per output slice, every recording's ``(1 + k)`` forwards and feature forming, plus the Gram
    products (:func:`_strategy_macs`). Why counted, not timed: the alternatives differ in how often
    the same kernels run, which flops rank well, while :mod:`lin_probe.ntk.choice` times the
    structured path against the generic one.
    """
    n = sizes.n
    strategies = tuple(
        _leanest_strategy(ly, k) if lean else _default_strategy(ly, n, k, sizes.budget, sizes.itemsize)
        for ly in layers
    )
    transient = (k + 1) * sizes.act_bytes + sizes.itemsize * sum(_transient_numel(ly, k) for ly in layers)
    reduced = sizes.itemsize * sum(
        _reduced_numel(ly, k, strategy) for ly, strategy in zip(layers, strategies, strict=True)
    )
    if sizes.chunk_size is None and transient + 2 * reduced > sizes.budget:
        return None
    plan = StructuredPlan(
        layers, sizes.width, n, *_chunking(n, transient, reduced, sizes.budget, sizes.chunk_size), k=k
    )
    recorded = plan.examples_per_slice
    forward = sum(_forward_macs(ly) for ly in layers)
    for outputs in plan.output_slices:
        kk = span(outputs)
        macs = [_strategy_macs(ly, s, n, kk) for ly, s in zip(layers, strategies, strict=True)]
        plan.gram_macs += sum(gram for _, gram in macs)
        plan.macs += recorded * ((1 + kk) * forward + sum(form for form, _ in macs))
    plan.macs += plan.gram_macs
    return _Option(plan, strategies)


CACHE_MIN_CHUNK = 4
"""Smallest chunk worth keeping every chunk's features for (smaller ones pay more per-call overhead
than the recomputation they avoid). Zoo ResNet, n = 64, 1 GiB, 1 thread: chunks of 4 with every
chunk's features kept 4.1 s, chunks of 14 recomputed pairwise (154 example recordings) 7.2 s."""


def _chunking(n: int, transient: int, reduced: int, budget: int, chunk_size: int | None) -> tuple[int, bool]:
    """``(b, cache)``: examples per chunk and whether every chunk's features are kept.

    Keeping all ``n·r`` features leaves ``budget − n·r`` for recording one chunk (``b·(t + r)``):
    if that still allows ``min(n, 4)`` examples, nothing is recomputed. Otherwise two chunks are
    alive at a time, ``b·(t + 2r) ≤ budget``, and chunk pairs are recomputed (cached anyway if all
    features fit in half the budget, as before).
    """
    keep_all = (budget - n * reduced) // max(1, transient + reduced)
    if chunk_size is not None:
        b = min(chunk_size, n)
        return b, n * reduced <= budget // 2 or n * reduced + b * (transient + reduced) <= budget
    if keep_all >= min(n, CACHE_MIN_CHUNK):
        return clamp(keep_all, 1, n), True
    b = clamp(budget // max(1, transient + 2 * reduced), 1, n)
    return b, n * reduced <= budget // 2


def run_structured(
    model: nn.Module,
    inputs: Tensor,
    plan: StructuredPlan,
    *,
    to_matrix: ToMatrix,
    memory_budget: int,
    dtype: torch.dtype,
    progress: Progress | None = None,
) -> Tensor:
    """``(1/C) Σ_c Σ_{p ∈ plan.covered} w_p J_{c,p} J_{c,p}ᵀ`` as planned; one progress unit per chunk recording.

    A sliced plan records its output slices one after another: the kernel is a sum over outputs.
    """
    n, width, layers = inputs.shape[0], plan.width, plan.layers
    itemsize = dtype_itemsize(dtype)
    gram_budget = max(1, memory_budget // 4)
    tracker = progress or Progress(None)
    with eval_semantics(model):
        constants = _constants(model)

        def gram(fi: list[_Features], fj: list[_Features]) -> Tensor:
            return sum(
                (
                    _layer_gram(ly, a, c, gram_budget, itemsize)
                    for ly, a, c in zip(layers, fi, fj, strict=True)
                ),
                torch.zeros(()),
            )

        theta = torch.zeros(n, n, dtype=dtype, device=inputs.device)
        for outputs in plan.output_slices:
            sliced = to_matrix if span(outputs) == width else _output_slice(to_matrix, outputs)

            def features(
                rows: slice, into: list[_Features] | None, sliced: ToMatrix = sliced, k: int = span(outputs)
            ) -> list[_Features]:
                feats = _chunk_features(model, constants, layers, inputs[rows], sliced, k, dtype, into)
                tracker.step()
                return feats

            _pairwise(theta, list(slices(n, plan.b)), features, gram, cache=plan.cache)
    return (theta + theta.T) / (2 * width)


def _output_slice(to_matrix: ToMatrix, outputs: slice) -> ToMatrix:
    """``to_matrix`` keeping only the columns ``outputs`` (the backward then runs over those alone)."""
    return lambda raw, b: to_matrix(raw, b)[:, outputs]


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
    progress: Progress | None = None,
) -> tuple[Tensor, set[str]] | None:
    """``((1/C) Σ_c Σ_{p ∈ covered} w_p J_{c,p} J_{c,p}ᵀ, covered)`` over the structurable layers.

    ``covered`` is the set of parameter names handled here; the caller adds the generic kernel of
    the others. ``None`` when no parameter of ``params`` is structurable (or one example does not
    fit ``memory_budget``). Raises :class:`NotStructurable` if a chunk's forward contradicts the
    one-example probe (the caller then falls back).
    """
    plan = plan_structured(
        model,
        inputs,
        params,
        to_matrix=to_matrix,
        weights=weights,
        memory_budget=memory_budget,
        chunk_size=chunk_size,
        dtype=dtype,
    )
    if plan is None:
        return None
    if progress is not None:
        progress.start(plan.loads)
    theta = run_structured(
        model, inputs, plan, to_matrix=to_matrix, memory_budget=memory_budget, dtype=dtype, progress=progress
    )
    return theta, plan.covered


def _constants(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer, detached: the recorded forward differentiates only the taps."""
    constants = {name: p.detach() for name, p in model.named_parameters()}
    constants.update({name: b.detach() for name, b in model.named_buffers()})
    return constants


def _check_examples_independent(model: nn.Module) -> None:
    """Raise :class:`NotStructurable` if the batched recorded forward would mix examples.

    A BatchNorm without running statistics normalises with batch statistics even in eval mode, so
    every layer's ``Δ`` and inputs on a chunk would differ from the one-example values the NTK uses.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not _supported_config(module):
            raise NotStructurable(
                f"{name or 'model'!r} is a BatchNorm without running statistics (track_running_stats=False): "
                "it mixes the examples of a batch, so the structured path cannot record chunks; "
                'use method="generic" (method="auto" falls back on its own).'
            )


def candidate_layers(
    model: nn.Module, params: Mapping[str, Tensor], weights: Mapping[str, float]
) -> list[_Layer]:
    """Modules of a structured type (base ``forward``) with a differentiated, untied weight or bias.

    Parametrized modules and unsupported configurations (:func:`_supported_config`) are left out.
    """
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    layers = []
    for name, module in model.named_modules():
        if attention.supported(module) and not parametrize.is_parametrized(module):
            layers.extend(_in_projection_layers(name, module, params, weights, owners))
            continue
        if _structured_base(module) is None or parametrize.is_parametrized(module):
            continue
        if not _supported_config(module):
            continue
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            continue  # shapes unknown until the first call; a materialised lazy layer is its base class
        weight, bias = _differentiated(module, name, ("weight", "bias"), params, owners)
        if weight is not None or bias is not None:
            layers.append(_layer(name, module, weight, bias, weights))
    return layers


def _differentiated(
    module: nn.Module,
    name: str,
    keys: tuple[str, str],
    params: Mapping[str, Tensor],
    owners: Mapping[int, int],
) -> tuple[str | None, str | None]:
    """The full names of ``module``'s tensors ``keys`` (weight, bias) that are differentiated and untied.

    A tensor tied to another module has gradient terms from both: it is left to the generic path.
    """
    prefix = f"{name}." if name else ""
    picked = []
    for key in keys:
        tensor = getattr(module, key, None)
        untied = isinstance(tensor, Tensor) and owners.get(id(tensor)) == 1
        picked.append(prefix + key if untied and prefix + key in params else None)
    return picked[0], picked[1]


def _layer(
    name: str, module: nn.Module, weight: str | None, bias: str | None, weights: Mapping[str, float]
) -> _Layer:
    """A structured layer on the differentiated ``weight``/``bias`` names, with their learning-rate weights."""
    return _Layer(
        name=name,
        module=module,
        weight=weight,
        bias=bias,
        w_weight=float(weights.get(weight or "", 1.0)),
        w_bias=float(weights.get(bias or "", 1.0)),
    )


def _in_projection_layers(
    name: str,
    module: nn.MultiheadAttention,
    params: Mapping[str, Tensor],
    weights: Mapping[str, float],
    owners: Mapping[int, int],
) -> list[_Layer]:
    """The q, k, v projections of a supported attention module as three Linear layers sharing its packed
    ``in_proj_weight``/``in_proj_bias`` (disjoint rows: their Gram blocks add up to the parameters')."""
    weight, bias = _differentiated(module, name, ("in_proj_weight", "in_proj_bias"), params, owners)
    if weight is None and bias is None:
        return []
    prefix = f"{name}." if name else ""
    return [
        _layer(f"{prefix}in_proj[{part}]", projection, weight, bias, weights)
        for part, projection in zip(attention.PARTS, attention.in_projections(module), strict=True)
    ]


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
            first = args[0].detach() if args and isinstance(args[0], Tensor) else torch.empty(0)
            rec.inputs.setdefault(name, []).append(first)
            tap = torch.zeros_like(out, requires_grad=True)
            rec.taps.setdefault(name, []).append(tap)
            return out + tap

        return hook

    handles = [ly.module.register_forward_hook(make_hook(ly.name), prepend=True) for ly in layers]
    try:
        with torch.enable_grad(), attention.tapped(ly.module for ly in layers):
            out = to_matrix(functional_call(model, constants, (x,)), x.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return out, rec


def _probe(
    model: nn.Module, constants: dict[str, Tensor], layers: list[_Layer], first: Tensor, to_matrix: ToMatrix
) -> tuple[list[_Layer], int, int]:
    """Record one example: keep layers called on a batched input (once, or alike several times where
    :func:`_repeatable`); the width ``C`` and saved bytes ``a``.

    Saved tensors that are parameters or buffers are not counted (they exist once, whatever the chunk).
    """
    with saved_bytes(constants.values()) as saved:
        out, rec = _record(model, constants, layers, first, to_matrix)
    kept = []
    for ly in layers:
        calls = rec.calls[ly.name]
        if calls == 0 or (calls > 1 and not (_repeatable(ly) and rec.uniform(ly.name))):
            continue  # unused, or weight-shared by repeated calls the rules cannot stack: generic path
        a, y = rec.inputs[ly.name][0], rec.taps[ly.name][0]
        if not _batched_shapes(ly.module, a, y):
            continue
        ly.repeats = calls
        repeat = (calls,) if calls > 1 else ()
        ly.in_shape, ly.out_shape = (*repeat, *a.shape[1:]), (*repeat, *y.shape[1:])
        kept.append(ly)
    kept = _whole_attentions(kept)
    outside = _read_outside_own_call(model, constants, kept, first)
    return _whole_attentions([ly for ly in kept if ly.name not in outside]), out.shape[1], saved[0]


def _whole_attentions(layers: list[_Layer]) -> list[_Layer]:
    """``layers`` without the input projections of an attention module missing one of its three: they
    share ``in_proj_weight``, whose kernel block is complete only with all of them."""
    whole = attention.complete(ly.module for ly in layers)
    return [
        ly
        for ly in layers
        if not isinstance(ly.module, attention.InProjection) or id(ly.module.attention) in whole
    ]


class _ParameterReads(TorchFunctionMode):
    """Sees every torch function's arguments during one forward and notes the structured layers whose
    parameter is read while that layer's own module is not running (a tied decoder ``h @ emb.weight.T``,
    a custom ``forward`` using ``self.fc.weight``): hooks cannot see those reads, so such a layer's
    gradient would be incomplete on this path."""

    def __init__(self, owners: dict[int, set[str]]) -> None:
        super().__init__()
        self.owners = owners
        self.running: list[str] = []
        self.outside: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for value in (*args, *kwargs.values()):
            for item in value if isinstance(value, list | tuple) else (value,):
                names = self.owners.get(id(item), set()) if isinstance(item, Tensor) else set()
                if names and names.isdisjoint(self.running):  # a shared tensor: any owner's call counts
                    self.outside.update(names)
        return func(*args, **kwargs)


def _read_outside_own_call(
    model: nn.Module, constants: dict[str, Tensor], layers: list[_Layer], first: Tensor
) -> set[str]:
    """Names of ``layers`` whose parameters the one-example forward reads outside their module's call."""
    owners: dict[int, set[str]] = {}
    for ly in layers:
        for p in (ly.weight, ly.bias):
            if p is not None:
                owners.setdefault(id(constants[p]), set()).add(ly.name)
    if not owners:
        return set()
    mode = _ParameterReads(owners)

    def enter(name: str) -> Callable[..., None]:
        return lambda _module, _args: mode.running.append(name)

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
        mode.running.pop()

    handles = [h for ly in layers for h in (ly.module.register_forward_pre_hook(enter(ly.name)),
                                             ly.module.register_forward_hook(leave))]  # fmt: skip
    try:
        with torch.no_grad(), attention.tapped(ly.module for ly in layers), mode:
            functional_call(model, constants, (first,))
    finally:
        for handle in handles:
            handle.remove()
    return mode.outside


def _batched_shapes(module: nn.Module, a: Tensor, y: Tensor) -> bool:
    """The one-example call has a leading example dimension of 1 and the rank the layer math assumes."""
    if isinstance(module, nn.Embedding):
        # integer indices (b, *) → (b, *, d)
        return (
            a.dim() >= 1
            and a.shape[0] == 1
            and not a.is_floating_point()
            and y.dim() == a.dim() + 1
            and y.shape[0] == 1
        )
    if a.dim() < 2 or a.shape[0] != 1 or y.shape[0] != 1 or (a.shape != y.shape and _kind(module) == "norm"):
        return False
    if isinstance(module, nn.Conv1d):
        return a.dim() == 3
    if isinstance(module, nn.Conv2d):
        return a.dim() == 4
    if isinstance(module, nn.BatchNorm1d):
        return a.dim() in (2, 3)
    if isinstance(module, nn.BatchNorm2d):
        return a.dim() == 4
    if isinstance(module, nn.LayerNorm):
        # the example dimension must not be normalised over
        return a.dim() > len(module.normalized_shape)
    return True


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
    into: list[_Features] | None = None,
) -> list[_Features]:
    """Record a chunk, get every layer's ``Δ`` and reduce each layer to its strategy's features.

    ``into``: per layer, the chunk's rows of the gathered features; weight gradients are written
    there directly (the other, small features are copied by the caller).
    """
    out, rec = _record(model, constants, layers, x, to_matrix)
    b = x.shape[0]
    inputs = {}
    for ly in layers:
        if rec.calls[ly.name] == ly.repeats and rec.uniform(ly.name) and out.shape[1] == width:
            inputs[ly.name] = rec.stacked_input(ly.name)
            one_call = ly.out_shape[1:] if ly.repeats > 1 else ly.out_shape
            if inputs[ly.name].shape == (b, *ly.in_shape) and rec.taps[ly.name][0].shape == (b, *one_call):
                continue
        raise NotStructurable(f"layer {ly.name!r} behaved differently on a batch than on one example")
    flat = _cotangents(out, [tap for ly in layers for tap in rec.taps[ly.name]])
    feats = []
    for index, ly in enumerate(layers):
        calls, flat = flat[: ly.repeats], flat[ly.repeats :]
        delta = (calls[0] if ly.repeats == 1 else torch.stack(calls, dim=2)).to(dtype)  # (C, b, [k,] *y)
        if ly.kind == "norm":
            feats.append(_norm_features(ly, delta, inputs[ly.name].to(dtype)))
            continue
        if ly.kind == "embedding":
            feats.append(_embedding_features(ly, delta, inputs[ly.name]))
            continue
        std = _standard_delta(ly, delta)
        patches = _patches(ly, inputs[ly.name].to(dtype)) if ly.weight is not None else None
        target = into[index].grads if into is not None and ly.strategy == "grads" else None
        feats.append(_reduce(ly, std, patches, target))
    return feats


def _repeatable(ly: _Layer) -> bool:
    """Layers whose calls can be stacked as extra positions.

    A weight shared by ``k`` calls has the gradient ``Σ_calls Σ_l Δ_{call,l} ⊗ P_{call,l}`` (each
    call's ``Δ`` is the total derivative through the later calls: the chain rule for a reused
    weight), which is the one-call rule over ``k·L`` positions. The Linear and Embedding algebra
    flattens every dimension but the last into positions, so stacking the calls on dimension 1 is
    all it needs; convolutions and normalisation layers read positions off fixed dimensions and stay
    generic when reused.
    """
    return isinstance(ly.module, nn.Linear | nn.Embedding)


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
    """Layer input → patches ``(b, L, G, D)``, ordered like ``weight[o].reshape(-1)`` within each group.

    A convolution's are ``F.unfold``'s columns ``(b, G·D, L)`` seen as ``(b, L, G, D)``, not copied:
    ``bmm`` reads the transposed layout as it is (:func:`_weight_grads`). ``Tensor.unfold`` windows
    permuted into contiguous patches took ~1.2× as long on the zoo ResNet's first layer (ad hoc timing).
    """
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
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if isinstance(module, nn.Conv1d):  # F.unfold is two-dimensional: a length is a 1 × L image
        a, kernel, dilation, stride = a.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
    columns = F.unfold(a, kernel, dilation=dilation, stride=stride)  # (b, C_in·Πk, L), C_in outermost
    return columns.view(b, module.groups, -1, columns.shape[-1]).permute(0, 3, 1, 2)


def _padding(module: nn.Conv1d | nn.Conv2d) -> list[tuple[int, int]]:
    """``(before, after)`` per spatial dimension; ``"same"`` puts the odd extra on the right, as torch does."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(int(p), int(p)) for p in module.padding]


def _default_strategy(ly: _Layer, n: int, width: int, budget: int, itemsize: int) -> str:
    """:func:`_choose_strategy`, but an embedding's dense rows over a quarter of the budget take the token Gram."""
    strategy = _choose_strategy(ly, n, width)
    if ly.kind == "embedding" and _reduced_numel(ly, width, strategy) * itemsize > budget // 4:
        return "tokens"  # dense per-example rows (C·V·d) would not fit: token Gram
    return strategy


def _choose_strategy(ly: _Layer, n: int, width: int) -> str:
    """The cheaper contraction by flop count (module docstring); ``"bias"`` when only the bias trains.

    Normalisation layers always reduce to their small per-example gradients (``"norm"``).
    """
    choices = _strategies(ly)
    if len(choices) == 1:
        return choices[0]

    def total(strategy: str) -> float:
        form, gram = _strategy_macs(ly, strategy, n, width)
        return n * form + gram

    return min(choices, key=total)


def _leanest_strategy(ly: _Layer, width: int) -> str:
    """The strategy with the fewest numbers kept per example: what a tight budget can afford to keep."""
    return min(_strategies(ly), key=lambda strategy: _reduced_numel(ly, width, strategy))


def _strategies(ly: _Layer) -> tuple[str, ...]:
    """The contractions a layer has; the first wins ties (the pairwise Gram, as it always has)."""
    if ly.kind == "norm":
        return ("norm",)
    if ly.kind == "embedding":
        return ("tokens", "grads")
    return ("patch", "grads") if ly.weight is not None else ("bias",)


def _forward_macs(ly: _Layer) -> int:
    """Multiply-adds of one example's forward through the layer (its output size for non-affine ones)."""
    if ly.kind == "affine":
        return ly.positions * ly.out_channels * ly.patch_size
    return math.prod(ly.out_shape)


def _strategy_macs(ly: _Layer, strategy: str, n: int, width: int) -> tuple[int, int]:
    """``(per recorded example, Gram products for n²)`` multiply-adds of a strategy at ``width`` outputs."""
    if strategy == "norm":
        return width * math.prod(ly.out_shape), n * n * _reduced_numel(ly, width, strategy)
    if ly.kind == "embedding":
        positions, vocab, dim = _embedding_sizes(ly)
        if strategy == "grads":
            return positions * width * dim, n * n * width * vocab * dim
        return 0, n * n * positions * positions * (width * dim + 1)
    bias = width * ly.out_channels
    if strategy == "bias":
        return 0, n * n * bias
    positions, groups, d = ly.positions, ly.groups, ly.patch_size
    if strategy == "grads":
        return width * ly.out_channels * positions * d, n * n * width * ly.out_channels * d
    return 0, n * n * positions * positions * groups * (width * (ly.out_channels // groups) + d)


def _embedding_sizes(ly: _Layer) -> tuple[int, int, int]:
    """``(L, V, d)``: looked-up positions per example, vocabulary size, embedding width."""
    module = ly.module
    assert isinstance(module, nn.Embedding)
    return math.prod(ly.in_shape), module.num_embeddings, module.embedding_dim


def _transient_numel(ly: _Layer, width: int) -> int:
    """Per-example numbers alive while a chunk is recorded: cotangents and patches (or ``x̂`` and ``Δ ⊙ x̂``)."""
    if ly.kind == "norm":
        return 2 * (width + 1) * math.prod(ly.out_shape)
    if ly.kind == "embedding":
        return width * math.prod(ly.out_shape) + math.prod(ly.in_shape)
    patch = ly.positions * ly.groups * ly.patch_size if ly.weight is not None else 0
    return width * math.prod(ly.out_shape) + patch


def _reduced_numel(ly: _Layer, width: int, strategy: str | None = None) -> int:
    """Per-example numbers a layer keeps for Gram products under ``strategy`` (default: its own)."""
    strategy = strategy or ly.strategy
    if ly.kind == "norm":
        return width * sum(p.numel() for p in ly.module.parameters(recurse=False))
    if ly.kind == "embedding":
        positions, vocab, dim = _embedding_sizes(ly)
        return width * vocab * dim if strategy == "grads" else positions * (width * dim + 1)
    bias = width * ly.out_channels
    if strategy == "grads":
        return width * ly.out_channels * ly.patch_size + bias
    if strategy == "patch":
        return ly.positions * (width * ly.out_channels + ly.groups * ly.patch_size)
    return bias


def _reduce(ly: _Layer, delta: Tensor, patches: Tensor | None, into: Tensor | None = None) -> _Features:
    """A chunk's ``(b, L, G, C, O)`` cotangents and patches → the features its strategy multiplies.

    ``into`` (``(b, G·C·O·D)``, contiguous): where the weight gradients are written, so gathered
    features are not allocated twice (:func:`_gathered`).
    """
    if ly.strategy == "patch":  # its Gram carries the bias term itself (``+ w_b``): no bias sum
        assert patches is not None
        return _Features(delta=delta.flatten(3), patches=patches)
    b = delta.shape[0]
    bias = delta.sum(dim=1).reshape(b, -1) if ly.bias is not None else None
    if ly.strategy == "bias":
        return _Features(bias=bias)
    assert patches is not None
    return _Features(grads=_weight_grads(delta, patches, into), bias=bias)


def _weight_grads(delta: Tensor, patches: Tensor, into: Tensor | None) -> Tensor:
    """``Σ_l Δ_{b,l,g} ⊗ P_{b,l,g}`` as ``(b, G·C·O·D)``: one batched matmul over (example, group).

    A ``bmm`` rather than ``einsum("blgko,blgd->bgkod")``: the same product, but it can write into
    ``into`` and it was up to 2× faster on the zoo ResNet's shapes (einsum copied its operands).
    """
    b, positions, groups, width, channels = delta.shape
    d = patches.shape[-1]
    left = delta.permute(0, 2, 3, 4, 1).reshape(b * groups, width * channels, positions)
    right = patches.permute(0, 2, 1, 3).reshape(b * groups, positions, d)
    if into is None:
        return torch.bmm(left, right).reshape(b, -1)
    torch.bmm(left, right, out=into.view(b * groups, width * channels, d))
    return into


def _layer_gram(ly: _Layer, fi: _Features, fj: _Features, budget: int, itemsize: int) -> Tensor:
    """``Σ_k w_W ⟨∂_W f_k(x_i), ∂_W f_k(x_j)⟩ + w_b ⟨∂_b f_k(x_i), ∂_b f_k(x_j)⟩`` for a chunk pair."""
    if ly.strategy == "patch":
        return _patch_gram(ly, fi, fj, budget, itemsize)
    if ly.strategy == "tokens":
        return _token_gram(ly, fi, fj, budget, itemsize)
    total = torch.zeros(())
    if fi.grads is not None and fj.grads is not None:
        total = total + ly.w_weight * gram_product(fi.grads, fj.grads)
    if fi.bias is not None and fj.bias is not None:
        total = total + ly.w_bias * gram_product(fi.bias, fj.bias)
    return total


def _patch_gram(ly: _Layer, fi: _Features, fj: _Features, budget: int, itemsize: int) -> Tensor:
    """``Σ_g Σ_{l,l'} (Δ_{i,l}·Δ_{j,l'}) ⊙ (w_W P_{i,l}·P_{j,l'} + w_b)``, sub-blocked to two ``(sL)²`` products."""
    assert fi.delta is not None and fj.delta is not None and fi.patches is not None and fj.patches is not None
    positions, groups = fi.delta.shape[1:3]
    w_b = ly.w_bias if ly.bias is not None else 0.0
    out = torch.zeros(fi.delta.shape[0], fj.delta.shape[0], dtype=fi.delta.dtype, device=fi.delta.device)
    for g in range(groups):
        for ri, rj in _tile_pairs(fi, fj, positions, budget, itemsize):
            di, pi = fi.delta[ri, :, g].flatten(0, 1), fi.patches[ri, :, g].flatten(0, 1)
            dj, pj = fj.delta[rj, :, g].flatten(0, 1), fj.patches[rj, :, g].flatten(0, 1)
            prod = (di @ dj.T) * (ly.w_weight * (pi @ pj.T) + w_b)
            _add_tile(out, ri, rj, prod, positions, symmetric=fj is fi)
    return out


def _token_gram(ly: _Layer, fi: _Features, fj: _Features, budget: int, itemsize: int) -> Tensor:
    """``w Σ_{l,l'} (Δ_{i,l}·Δ_{j,l'}) [tok_{i,l} = tok_{j,l'}]``, sub-blocked to ``(sL)²`` products."""
    assert fi.delta is not None and fj.delta is not None and fi.tokens is not None and fj.tokens is not None
    positions = fi.delta.shape[1]
    out = torch.zeros(fi.delta.shape[0], fj.delta.shape[0], dtype=fi.delta.dtype, device=fi.delta.device)
    for ri, rj in _tile_pairs(fi, fj, positions, budget, itemsize):
        di, ti = fi.delta[ri].flatten(0, 1), fi.tokens[ri].reshape(-1)
        dj, tj = fj.delta[rj].flatten(0, 1), fj.tokens[rj].reshape(-1)
        prod = (di @ dj.T) * (ti[:, None] == tj[None, :])
        _add_tile(out, ri, rj, prod, positions, symmetric=fj is fi)
    return ly.w_weight * out


def _tile_pairs(
    fi: _Features, fj: _Features, positions: int, budget: int, itemsize: int
) -> list[tuple[slice, slice]]:
    """Example tiles ``(ri, rj)`` whose ``(sL)²`` position products fit ``budget``.

    A chunk against itself (``fj is fi``: every block of gathered features) is symmetric, so only
    tiles ``ri ≤ rj`` are multiplied (:func:`_add_tile` mirrors the rest), and tiles are small
    enough for that to save (:func:`~lin_probe.ntk._plumbing.gram_tile`, in rows ``s·L``).
    """
    assert fi.delta is not None and fj.delta is not None
    bi, bj = fi.delta.shape[0], fj.delta.shape[0]
    s = clamp(math.isqrt(max(1, budget // (2 * itemsize))) // max(1, positions), 1, max(bi, bj))
    if fj is not fi:
        return [(ri, rj) for ri in slices(bi, s) for rj in slices(bj, s)]
    s = min(s, max(1, gram_tile(bi * positions) // max(1, positions)))
    tiles = list(slices(bi, s))
    return [(ri, rj) for index, ri in enumerate(tiles) for rj in tiles[index:]]


def _add_tile(
    out: Tensor, ri: slice, rj: slice, products: Tensor, positions: int, *, symmetric: bool
) -> None:
    """``out[ri, rj] +=`` a tile's ``(sL)²`` position products summed per example pair; in a
    ``symmetric`` product also the mirror tile ``(rj, ri)``, which :func:`_tile_pairs` skipped."""
    block = products.reshape(span(ri), positions, span(rj), positions).sum(dim=(1, 3))
    out[ri, rj] += block
    if symmetric and ri != rj:
        out[rj, ri] += block.T


def _normalised(module: nn.Module, a: Tensor) -> Tensor:
    """``x̂``: the layer's input normalised as its eval-mode forward does, before the affine map.

    Recomputed from the input rather than read off the output, which loses ``x̂`` where ``γ = 0``.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        assert module.running_mean is not None and module.running_var is not None
        mean, var = module.running_mean.to(a.dtype), module.running_var.to(a.dtype)
        return F.batch_norm(a, mean, var, None, None, False, 0.0, module.eps)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(a, module.normalized_shape, None, None, module.eps)
    assert isinstance(module, nn.GroupNorm)
    return F.group_norm(a, module.num_groups, None, None, module.eps)


def _norm_features(ly: _Layer, delta: Tensor, a: Tensor) -> _Features:
    """``∂f_k/∂γ = Σ_positions Δ_k ⊙ x̂`` and ``∂f_k/∂β = Σ_positions Δ_k`` per example, flattened over ``k``.

    ``delta`` is ``(C, b, *y)``; the affine parameters live on dimension 1 of ``y`` (BatchNorm,
    GroupNorm) or on its trailing ``normalized_shape`` (LayerNorm).
    """
    width, b = delta.shape[:2]
    module = ly.module
    if isinstance(module, nn.LayerNorm):
        size = math.prod(module.normalized_shape)

        def per_param(t: Tensor) -> Tensor:
            return t.reshape(width, b, -1, size).sum(dim=2).transpose(0, 1).reshape(b, -1)
    else:
        channels = delta.shape[2]

        def per_param(t: Tensor) -> Tensor:
            return t.reshape(width, b, channels, -1).sum(dim=3).transpose(0, 1).reshape(b, -1)

    grads = per_param(delta * _normalised(module, a)) if ly.weight is not None else None
    bias = per_param(delta) if ly.bias is not None else None
    return _Features(grads=grads, bias=bias)


def _embedding_features(ly: _Layer, delta: Tensor, tokens: Tensor) -> _Features:
    """Cotangents ``(C, b, *idx, d)`` → dense row gradients ``Σ_{l: tok_l = v} Δ_l`` or the token Gram's inputs.

    Positions holding ``padding_idx`` get zero cotangent: torch's embedding backward never updates
    that row.
    """
    module = ly.module
    assert isinstance(module, nn.Embedding)
    width, b = delta.shape[:2]
    dim = module.embedding_dim
    tok = tokens.reshape(b, -1).long()
    d = delta.reshape(width, b, -1, dim).permute(1, 2, 0, 3).reshape(b, tok.shape[1], width * dim)
    if module.padding_idx is not None:
        d = d * (tok != module.padding_idx)[..., None].to(d.dtype)
    if ly.strategy == "tokens":
        return _Features(delta=d, tokens=tok)
    rows = torch.zeros(b, module.num_embeddings, width * dim, dtype=d.dtype, device=d.device)
    rows.scatter_add_(1, tok[..., None].expand_as(d), d)
    # (b, V, C, d) → (b, C·V·d): any fixed order works for the inner product
    return _Features(grads=rows.reshape(b, -1))


# ------------------------------------------------------------------------------------ chunk pairs


def _pairwise(
    theta: Tensor,
    chunks: list[slice],
    features: Callable[[slice, list[_Features] | None], list[_Features]],
    gram: Callable[[list[_Features], list[_Features]], Tensor],
    *,
    cache: bool,
) -> None:
    """Fill ``theta`` block pair by block pair (upper triangle mirrored).

    With ``cache`` every chunk's features are computed once into one ``(n, …)`` tensor per layer
    (:func:`_gathered`) and the kernel is one Gram product per layer; otherwise two chunks'
    features are alive at once and the others recomputed, in the generic path's order
    (:func:`lin_probe.ntk._plumbing.stream_block_pairs`).
    """

    def add(i: int, j: int, fi: list[_Features], fj: list[_Features]) -> None:
        block = gram(fi, fj).to(theta.dtype)
        theta[chunks[i], chunks[j]] += block
        if i != j:
            theta[chunks[j], chunks[i]] += block.T

    if cache:
        whole = _gathered(chunks, theta.shape[0], features)
        theta += gram(whole, whole).to(theta.dtype)
        return
    stream_block_pairs(len(chunks), lambda i: features(chunks[i], None), add)


def _gathered(
    chunks: list[slice], n: int, features: Callable[[slice, list[_Features] | None], list[_Features]]
) -> list[_Features]:
    """Every chunk's features written into one preallocated ``(n, …)`` tensor per layer and field.

    Why: a Gram product of chunk pairs reads each example's features once per pair (136 pairs for
    16 chunks of 4), so small chunks made the products memory-bound; one ``n × n`` product per
    layer reads them once. Preallocated from the first chunk's shapes, and later chunks' weight
    gradients written in place (``features(rows, into)``), so the peak stays the plan's
    ``n·r + b·(t + r)`` and the largest features are not copied.
    """
    if len(chunks) == 1:
        return features(chunks[0], None)  # already whole: a copy would only cost time
    whole: list[_Features] = []
    for rows in chunks:
        into = [_mapped(w, lambda t, rows=rows: t[rows]) for w in whole]
        part = features(rows, into or None)
        if not whole:
            whole = [_mapped(p, lambda t: t.new_empty((n, *t.shape[1:]))) for p in part]
        for i, (target, source) in enumerate(zip(whole, part, strict=True)):
            for f in fields(_Features):
                value = getattr(source, f.name)
                written = into and value is getattr(into[i], f.name)  # already in place
                if value is not None and not written:
                    getattr(target, f.name)[rows] = value
    return whole


def _mapped(features: _Features, fn: Callable[[Tensor], Tensor]) -> _Features:
    """``features`` with ``fn`` applied to every tensor it holds (absent fields stay absent)."""
    return _Features(
        **{f.name: None if (t := getattr(features, f.name)) is None else fn(t) for f in fields(_Features)}
    )
