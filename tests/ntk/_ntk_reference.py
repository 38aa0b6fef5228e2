"""Independent references for the NTK tests: a brute-force kernel and an entrywise comparison.

The brute force takes one ``torch.autograd.grad`` per example and output over the ``requires_grad``
parameters of an eval-mode deep copy and forms ``(1/C) Σ_c Σ_p w_p g_{i,c,p}·g_{j,c,p}`` — no
``torch.func``, no chunking, nothing shared with the code under test.

Tolerance: float64 throughout unless a test is about dtypes. The two computations differ only in
summation order over at most a few thousand terms, so their relative difference is
``O(P · eps) ≈ 1e-13``; ``RTOL = 1e-9`` leaves four orders of margin, while every bug these
tests target (a parameter too many or missing, cross-output terms, a wrong ``1/C``, train-mode
statistics, a weight applied twice) changes entries by ``O(1)`` relative amounts.

:func:`spy_generic` is not a reference but a probe of the code under test: it records which
parameters reach the generic torch.func path, so a test can prove a structured rule ran;
:func:`structured_plan` reads the structured path's plan, so a test can pick a budget by regime.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import lin_probe.ntk.dense as ntk_module
from lin_probe.ntk.dense import GenericLoopWarning
from lin_probe.ntk.structured import plan_structured

RTOL = 1e-9
DTYPE = torch.float64


def brute_force_ntk(
    model: nn.Module,
    inputs: Tensor,
    *,
    weights: Mapping[str, float] | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
) -> Tensor:
    """``(1/C) Σ_c Σ_p w_p g_{i,c,p}·g_{j,c,p}`` from per-example, per-output autograd gradients."""
    reference = copy.deepcopy(model).eval()
    named = [(name, p) for name, p in reference.named_parameters() if p.requires_grad]
    weights = weights or {}
    rows = []
    for i in range(inputs.shape[0]):
        raw = reference(inputs[i : i + 1])
        out = (output_fn(raw) if output_fn else raw).reshape(-1)
        per_output = []
        for c in range(out.shape[0]):
            grads = torch.autograd.grad(out[c], [p for _, p in named], retain_graph=True, allow_unused=True)
            flat = [
                math.sqrt(weights.get(name, 1.0)) * (torch.zeros_like(p) if g is None else g).reshape(-1)
                for (name, p), g in zip(named, grads, strict=True)
            ]
            per_output.append(torch.cat(flat))
        rows.append(torch.stack(per_output))
    jac = torch.stack(rows)  # (n, C, P)
    return torch.einsum("icp,jcp->ij", jac, jac) / jac.shape[1]


def assert_close(actual: Tensor, expected: Tensor, rtol: float = RTOL) -> None:
    """Entrywise match relative to the kernel's scale (diagonal entries are O(scale))."""
    scale = expected.abs().max().item()
    assert scale > 0, "a zero reference kernel would make any actual kernel pass"
    assert actual.shape == expected.shape
    err = (actual.detach() - expected.detach()).abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3e} exceeds {rtol:.0e} × scale {scale:.3e}"


def mlp(d_in: int = 5, hidden: int = 7, c: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, c)).to(DTYPE)


def spy_generic(monkeypatch: pytest.MonkeyPatch) -> list[set[str]]:
    """Record the parameter names each ``_generic_ntk`` call differentiates."""
    calls: list[set[str]] = []
    original = ntk_module._generic_ntk

    def spy(model: nn.Module, inputs: Tensor, params: dict[str, Tensor], **kwargs: Any) -> Tensor:
        calls.append(set(params))
        return original(model, inputs, params, **kwargs)

    monkeypatch.setattr(ntk_module, "_generic_ntk", spy)
    return calls


def structured_plan(model: nn.Module, inputs: Tensor, budget: int) -> Any:
    """The structured path's plan for ``model`` on ``inputs`` under ``budget`` bytes (no kernel is
    computed): every trainable parameter, unit weights, no forced chunk size, :data:`DTYPE`."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return plan_structured(
        model,
        inputs,
        params,
        to_matrix=ntk_module._to_matrix(None),
        weights=dict.fromkeys(params, 1.0),
        memory_budget=budget,
        chunk_size=None,
        dtype=DTYPE,
    )


def loop_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    """The messages of the generic path's per-example-loop warnings among ``record``."""
    return [str(w.message) for w in record if issubclass(w.category, GenericLoopWarning)]
