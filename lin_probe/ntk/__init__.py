"""The empirical NTK of any model: dense kernels, structured per-layer Grams and matrix-free products.

* :func:`empirical_ntk` — the dense ``n × n`` kernel (:mod:`~lin_probe.ntk.dense`, with the exact
  per-layer shortcut of :mod:`~lin_probe.ntk.structured`; :class:`NTKMethod` says which path);
* :func:`ntk_matvec` — ``u ↦ Θu`` without any ``n × n`` or Jacobian (:mod:`~lin_probe.ntk.products`);
* :func:`predict` — the eval-mode outputs whose Jacobian the kernel is;
* :func:`ntk_operator` / :func:`ntk_diagonal` — what the monitor consumes: the kernel as a checked
  :class:`~lin_probe.linalg.SymmetricOperator` (dense or products, as a
  :class:`~lin_probe.plan.ComputePlan` decides) and its exact diagonal;
* :func:`choose_method` — the cost model behind ``method="auto"`` (:mod:`~lin_probe.ntk.choice`), for
  callers that take the kernel of the same model and inputs many times and want to choose once.

Every dense entry point takes ``progress(done, total)`` (see :func:`empirical_ntk`): called with
``done = 0`` once the work is planned, then after each unit; raising from it aborts the call.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lin_probe._validation import check_int
from lin_probe.linalg.operator import SymmetricOperator
from lin_probe.ntk._plumbing import OutputFn, Progress, ProgressFn, prepare_inputs
from lin_probe.ntk.choice import MethodChoice, choose_method
from lin_probe.ntk.dense import (
    METHODS,
    GenericLoopWarning,
    NTKMethod,
    _resolve_method,
    empirical_ntk,
    predict,
)
from lin_probe.ntk.products import ntk_matvec
from lin_probe.plan import ComputePlan


def ntk_operator(
    model: nn.Module,
    inputs: Tensor,
    *,
    plan: ComputePlan,
    output_fn: OutputFn | None = None,
    param_weights: Mapping[str, float] | None = None,
    method: NTKMethod | str = NTKMethod.AUTO,
    progress: ProgressFn | None = None,
) -> SymmetricOperator:
    """``Θ`` at the model's current parameters as a checked float64 CPU operator.

    Dense (the :func:`empirical_ntk` matrix: exact norms, eigenvalues) when ``plan.dense(n)``, else
    products from :func:`ntk_matvec` that re-read the parameters at every call. Both compute under
    ``plan.memory_budget``; NaN/inf (a diverged network) raise
    :class:`~lin_probe.linalg.NonFiniteOperator`, at once (dense) or from the product (matrix-free).
    ``method`` is the dense kernel's (pass a :func:`choose_method` result's to skip the probe);
    ``progress`` as for :func:`empirical_ntk` (matrix-free: one unit, the set-up, since the work is
    in the later products).
    """
    method = _resolve_method(method)  # checked in both modes, used by the dense one
    inputs = prepare_inputs(model, inputs)
    n = inputs.shape[0]
    options = {"output_fn": output_fn, "param_weights": param_weights, "memory_budget": plan.memory_budget}
    if plan.dense(n):
        kernel = empirical_ntk(model, inputs, method=method, progress=progress, **options)
        return SymmetricOperator.dense(kernel.detach(), "ntk")
    tracker = Progress(progress)
    tracker.start(1)
    operator = SymmetricOperator.from_products(ntk_matvec(model, inputs, **options), n, "ntk")
    tracker.step()
    return operator


def ntk_diagonal(
    model: nn.Module,
    inputs: Tensor,
    *,
    plan: ComputePlan,
    output_fn: OutputFn | None = None,
    param_weights: Mapping[str, float] | None = None,
    block: int = 64,
    method: NTKMethod | str = NTKMethod.AUTO,
    progress: ProgressFn | None = None,
) -> Tensor:
    """``diag Θ`` (float64, CPU) exactly, from dense kernels of ``block`` examples at a time.

    Per-example gradients at the cost of ``n / block`` small kernels and no ``n × n``: the exact
    ``tr Θ`` the matrix-free affine fit needs (a product cannot give it without ``n`` of them).
    ``progress`` counts blocks (``total = ⌈n / block⌉``); ``method`` applies to every block (under
    ``"auto"`` the choice is made once, on the first block, not per block).
    """
    check_int("block", block, minimum=1)
    method = _resolve_method(method)
    inputs = prepare_inputs(model, inputs)
    n = inputs.shape[0]
    options = {"output_fn": output_fn, "param_weights": param_weights, "memory_budget": plan.memory_budget}
    tracker = Progress(progress)
    tracker.start(-(-n // block))
    concrete = method
    blocks = []
    for start in range(0, n, block):
        rows = inputs[start : start + block]
        if concrete is NTKMethod.AUTO:
            concrete = choose_method(model, rows, **options).method
        kernel = empirical_ntk(model, rows, method=concrete, **options)
        blocks.append(torch.diagonal(kernel).detach().to("cpu", torch.float64))
        tracker.step()
    return torch.cat(blocks)


__all__ = [
    "METHODS",
    "GenericLoopWarning",
    "MethodChoice",
    "NTKMethod",
    "ProgressFn",
    "choose_method",
    "empirical_ntk",
    "ntk_diagonal",
    "ntk_matvec",
    "ntk_operator",
    "predict",
]
