"""What every NTK path shares: the stateless forward, output checks, the one-example measurement,
chunk arithmetic, dtype rules and input validation. One copy of each, used by the dense kernel, the
structured Linear/Conv Gram and the matrix-free product alike.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lin_probe._model_state import model_buffers, model_device, trainable_parameters
from lin_probe._validation import check_finite, check_int
from lin_probe.plan import DEFAULT_MEMORY_BUDGET_BYTES

OutputFn = Callable[[Any], Tensor]
Forward = Callable[[dict[str, Tensor], Tensor], Tensor]


# ------------------------------------------------------------------------------------ model calls


def forward_fn(model: nn.Module, constants: dict[str, Tensor], output_fn: OutputFn | None) -> Forward:
    """``(params, x) → (b, C)``: a stateless call of ``model`` with ``params`` swapped in."""

    def forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
        raw = functional_call(model, (params, constants), (x,))
        return output_matrix(raw, output_fn, x.shape[0])

    return forward


def constants(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every parameter not differentiated, and every buffer, detached: held fixed by the transforms."""
    frozen = {name: p.detach() for name, p in model.named_parameters() if name not in params}
    return {**frozen, **model_buffers(model)}


def output_matrix(raw: Any, output_fn: OutputFn | None, batch: int | None = None) -> Tensor:
    """Apply ``output_fn`` and flatten to ``(batch, C)``; refuse outputs the kernel cannot differentiate.

    ``batch`` is the number of examples the leading dimension must index (``None``: whatever it is).
    The NTK, the predictions and the shadows' ``f_0`` all read a model's output through here.
    """
    out = output_fn(raw) if output_fn is not None else raw
    if not isinstance(out, Tensor):
        where = "`output_fn` returned" if output_fn is not None else "the model returned"
        raise TypeError(
            f"{where} a {type(out).__name__}, but a Tensor with a leading batch dimension is needed. "
            "Pass `output_fn`, a function that picks the prediction tensor from the model's output "
            "(e.g. `output_fn=lambda out: out[0]` or `output_fn=lambda out: out.logits`)."
        )
    rows = out.shape[0] if batch is None and out.dim() >= 1 else batch
    if out.dim() < 1 or out.shape[0] != rows:
        raise ValueError(
            f"The model output has shape {tuple(out.shape)}, but its leading dimension must index the "
            f"{'' if rows is None else f'{rows} '}input example(s). Use `output_fn` to select or reshape "
            "the per-example outputs."
        )
    if not (out.is_floating_point() or out.is_complex()):
        raise TypeError(
            f"The model output has dtype {out.dtype}; the NTK needs real-valued outputs (logits, not "
            "class indices). Use `output_fn` to return the differentiable outputs."
        )
    flat = out.reshape(out.shape[0], -1)
    if flat.shape[1] == 0:
        raise ValueError(
            "The model output has no entries per example (C = 0); there is no kernel to compute."
        )
    return flat


@contextlib.contextmanager
def saved_bytes(exclude: Iterable[Tensor]) -> Iterator[list[int]]:
    """Count the bytes autograd saves for backward inside the block, as the running total ``[bytes]``.

    The count stands in for the activation memory of one example when sizing chunks. Tensors
    sharing storage with ``exclude`` (parameters, buffers) are not counted: they exist once,
    whatever the chunk size. What is counted is storage, once each: a tensor saved by several
    operations, or a stride-0 expansion (matmul saves a weight expanded over positions as a view),
    holds no more memory than its storage.
    """
    counted = {t.untyped_storage().data_ptr() for t in exclude}
    total = [0]

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in counted:
            counted.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def measure_one_example(forward: Forward, params: Mapping[str, Tensor], first: Tensor) -> tuple[int, int]:
    """One tracked forward on one example: its output width ``C`` and the bytes autograd saves (``a``)."""
    tracked = {name: p.detach().requires_grad_(p.is_floating_point()) for name, p in params.items()}
    with torch.enable_grad(), saved_bytes(params.values()) as saved:
        out = forward(tracked, first)
    return out.shape[1], saved[0]


# ------------------------------------------------------------------------------------ chunk arithmetic


def slices(total: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` covering ``range(total)``."""
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def span(s: slice) -> int:
    """Length of a slice from :func:`slices`."""
    return s.stop - s.start


def clamp(value: int, low: int, high: int) -> int:
    return max(low, min(int(value), high))


GRAM_TILE_ROWS = 128
"""Fewest rows a tile of a symmetric Gram product gets: below this a ``(rows × p) @ (p × rows)``
product runs well under the matmul's peak on CPU, so splitting it would cost more than it saves."""


def gram_tile(rows: int) -> int:
    """Rows per tile of the symmetric Gram of ``rows`` rows: about a quarter of them, never fewer than
    :data:`GRAM_TILE_ROWS`; all ``rows`` (one tile, no split) below two such tiles. Four tiles
    multiply the upper triangle's ten blocks instead of sixteen."""
    if rows < 2 * GRAM_TILE_ROWS:
        return max(1, rows)
    return max(GRAM_TILE_ROWS, -(-rows // 4))


def gram_product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ bᵀ`` of two ``(rows, p)`` matrices; when ``b`` is ``a``, only the upper triangle of
    :func:`gram_tile` blocks is multiplied and mirrored.

    Why by hand: BLAS has ``syrk`` for ``A Aᵀ``, but torch does not expose it, and a kernel's
    diagonal blocks (every block, when the features are gathered) are exactly these products. On
    1,024 rows the tiled product took about 0.6× the full one's time on a 2-core CPU (ad hoc timing).
    """
    rows = a.shape[0]
    tile = gram_tile(rows)
    if b is not a or tile >= rows:
        return a @ b.T
    out = a.new_empty(rows, rows)
    for start in range(0, rows, tile):
        stop = min(start + tile, rows)
        block = a[start:stop] @ a[start:].T  # this tile's rows against itself and every later row
        out[start:stop, start:] = block
        out[stop:, start:stop] = block[:, stop - start :].T
    return out


def stream_block_pairs(
    count: int, load: Callable[[int], Any], add: Callable[[int, int, Any, Any], None]
) -> None:
    """Visit every block pair ``i ≤ j`` of ``count`` blocks with at most two loaded at once.

    Row ``i`` keeps block ``i`` resident and streams blocks ``j > i`` in *descending* order; the last
    one streamed (``i + 1``) becomes the next resident instead of being recomputed. That is
    ``count(count − 1)/2 + 1`` loads, the fewest possible with two blocks in memory.
    """
    resident = load(0)
    add(0, 0, resident, resident)
    for i in range(count - 1):
        for j in range(count - 1, i, -1):
            streamed = load(j)
            add(i, j, resident, streamed)
            if j == i + 1:
                add(j, j, streamed, streamed)
                resident = streamed  # frees block i
            del streamed


def stream_loads(count: int, *, cache: bool = False) -> int:
    """Block loads :func:`stream_block_pairs` makes for ``count`` blocks (``count`` when every block is kept)."""
    if count <= 1 or cache:
        return count
    return count * (count - 1) // 2 + 1


ProgressFn = Callable[[int, int], None]
"""``progress(done, total)``: called once with ``done = 0`` before any work, then after each unit."""


class Progress:
    """Counts units of work (block Jacobians, feature chunks, kernel blocks) for the caller's hook.

    Why a class: the dense kernel plans all its parts first, so ``total`` is known at the first
    call; the parts then only :meth:`step`. A hook that raises aborts the call: the exception
    propagates unchanged (every path restores the model's state in ``finally`` blocks). ``None``
    as the hook makes every method a no-op.
    """

    def __init__(self, hook: ProgressFn | None) -> None:
        if hook is not None and not callable(hook):
            raise TypeError(
                f"`progress` must be a callable (done, total) -> None, got {type(hook).__name__}."
            )
        self.hook = hook
        self.done = 0
        self.total = 0
        self.started = False

    def start(self, total: int) -> None:
        """Report ``(0, total)`` (or, when already started, grow ``total``: a fallback re-plans)."""
        if self.started:
            self.total = max(self.total, self.done + total)
            return
        self.started = True
        self.total = total
        if self.hook is not None:
            self.hook(0, total)

    def step(self, units: int = 1) -> None:
        """``units`` more done; ``done`` never exceeds ``total``."""
        self.done += units
        self.total = max(self.total, self.done)
        if self.hook is not None:
            self.hook(self.done, self.total)

    def finish(self) -> None:
        """Make the last report ``(total, total)`` if units were fewer than planned."""
        if self.started and self.done < self.total:
            self.step(self.total - self.done)


def row_bytes(params: Mapping[str, Tensor]) -> int:
    """Bytes of one output's gradient for one example over ``params`` (``r``)."""
    return sum(p.numel() * p.element_size() for p in params.values())


# ------------------------------------------------------------------------------------------ dtypes


def dtype_itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kernel_dtype(params: Mapping[str, Tensor], fallback: torch.dtype | None = None) -> torch.dtype:
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


# -------------------------------------------------------------------------------------- validation


def prepare_inputs(model: nn.Module, inputs: Tensor) -> Tensor:
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
    device = model_device(model)
    inputs = inputs.detach()
    return inputs if device is None or inputs.device == device else inputs.to(device)


def prepare_vector(u: Tensor, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Check the Lanczos vector: a finite ``(n,)`` tensor (cast to the kernel's dtype and device)."""
    if not isinstance(u, Tensor):
        raise TypeError(f"The NTK product needs a torch.Tensor of shape ({n},), got {type(u).__name__}.")
    if tuple(u.shape) != (n,):
        raise ValueError(
            f"The NTK product needs a vector of shape ({n},) (one entry per input), got {tuple(u.shape)}."
        )
    check_finite(u, "u")
    return u.detach().to(dtype=dtype, device=device)


def check_chunk_size(chunk_size: int | None) -> None:
    """``None`` (plan chunks from the budget) or a positive number of examples per chunk."""
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, minimum=1)


def resolve_budget(memory_budget: int | None) -> int:
    """The call's working-memory budget in bytes: the argument, else :data:`lin_probe.plan.DEFAULT_MEMORY_BUDGET_BYTES`."""
    budget = DEFAULT_MEMORY_BUDGET_BYTES if memory_budget is None else memory_budget
    check_int("memory_budget", budget, minimum=1)
    return budget


def prepare_call(
    model: nn.Module,
    inputs: Tensor,
    *,
    chunk_size: int | None,
    memory_budget: int | None,
    param_weights: Mapping[str, float] | None,
) -> tuple[Tensor, int, dict[str, Tensor], dict[str, float]]:
    """A kernel or product call's checked arguments: inputs (on the model's device), budget, trainable
    parameters and their weights."""
    inputs = prepare_inputs(model, inputs)
    check_chunk_size(chunk_size)
    budget = resolve_budget(memory_budget)
    params = trainable_parameters(model)
    return inputs, budget, params, resolve_weights(model, params, param_weights)


def resolve_weights(
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
