"""The empirical NTK of any model: dense kernels, structured per-layer Grams and matrix-free products.

* :func:`empirical_ntk` — the dense ``n × n`` kernel (:mod:`~lin_probe.ntk.dense`, with the exact
  per-layer shortcut of :mod:`~lin_probe.ntk.structured`; :class:`NTKMethod` says which path);
* :func:`ntk_matvec` — ``u ↦ Θu`` without any ``n × n`` or Jacobian (:mod:`~lin_probe.ntk.products`);
* :func:`predict` — the eval-mode outputs whose Jacobian the kernel is;
* :func:`ntk_operator` / :func:`ntk_diagonal` — what the monitor consumes: the kernel as a checked
  :class:`~lin_probe.linalg.SymmetricOperator` (dense or products, as a
  :class:`~lin_probe.plan.ComputePlan` decides) and its exact diagonal.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lin_probe._validation import check_int
from lin_probe.linalg.operator import SymmetricOperator
from lin_probe.ntk._plumbing import OutputFn, prepare_inputs
from lin_probe.ntk.dense import METHODS, GenericLoopWarning, NTKMethod, empirical_ntk, predict
from lin_probe.ntk.products import ntk_matvec
from lin_probe.plan import ComputePlan


def ntk_operator(
    model: nn.Module,
    inputs: Tensor,
    *,
    plan: ComputePlan,
    output_fn: OutputFn | None = None,
    param_weights: Mapping[str, float] | None = None,
) -> SymmetricOperator:
    """``Θ`` at the model's current parameters as a checked float64 CPU operator.

    Dense (the :func:`empirical_ntk` matrix: exact norms, eigenvalues) when ``plan.dense(n)``, else
    products from :func:`ntk_matvec` that re-read the parameters at every call. Both compute under
    ``plan.memory_budget``; NaN/inf (a diverged network) raise
    :class:`~lin_probe.linalg.NonFiniteOperator`, at once (dense) or from the product (matrix-free).
    """
    inputs = prepare_inputs(model, inputs)
    n = inputs.shape[0]
    options = {"output_fn": output_fn, "param_weights": param_weights, "memory_budget": plan.memory_budget}
    if plan.dense(n):
        return SymmetricOperator.dense(empirical_ntk(model, inputs, **options).detach(), "ntk")
    return SymmetricOperator.from_products(ntk_matvec(model, inputs, **options), n, "ntk")


def ntk_diagonal(
    model: nn.Module,
    inputs: Tensor,
    *,
    plan: ComputePlan,
    output_fn: OutputFn | None = None,
    param_weights: Mapping[str, float] | None = None,
    block: int = 64,
) -> Tensor:
    """``diag Θ`` (float64, CPU) exactly, from dense kernels of ``block`` examples at a time.

    Per-example gradients at the cost of ``n / block`` small kernels and no ``n × n``: the exact
    ``tr Θ`` the matrix-free affine fit needs (a product cannot give it without ``n`` of them).
    """
    check_int("block", block, minimum=1)
    inputs = prepare_inputs(model, inputs)
    blocks = []
    for start in range(0, inputs.shape[0], block):
        kernel = empirical_ntk(
            model,
            inputs[start : start + block],
            output_fn=output_fn,
            param_weights=param_weights,
            memory_budget=plan.memory_budget,
        )
        blocks.append(torch.diagonal(kernel).detach().to("cpu", torch.float64))
    return torch.cat(blocks)


__all__ = [
    "METHODS",
    "GenericLoopWarning",
    "NTKMethod",
    "empirical_ntk",
    "ntk_diagonal",
    "ntk_matvec",
    "ntk_operator",
    "predict",
]
