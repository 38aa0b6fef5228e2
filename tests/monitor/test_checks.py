"""One check's pieces: the fit at init (dense and matrix-free), the NTK gap/drift and the comparison.

References: a per-example autograd NTK, numpy's exact 2-norm, and torch's own loss functions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lin_probe._model_state import frozen_copy
from lin_probe.kernel import AffineKernel
from lin_probe.linalg import SymmetricOperator
from lin_probe.monitor.checks import NTKProbe, compare, fit_at_init, ntk_check, ntk_reference
from lin_probe.plan import ComputePlan

N, D = 12, 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 64), nn.Tanh(), nn.Linear(64, 2)).double()


def _brute_ntk(model: nn.Module, x: Tensor) -> Tensor:
    """``(1/C) Σ_c J_c J_cᵀ`` from one autograd.grad per example and output."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        out = model(x[i : i + 1])[0]
        grads = [torch.autograd.grad(o, params, retain_graph=True) for o in out]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in per_output]) for per_output in grads]))
    jac = torch.stack(rows)  # (n, C, P)
    return torch.einsum("icp,jcp->ij", jac, jac) / jac.shape[1]


def _probe(model: nn.Module, x: Tensor, plan: ComputePlan) -> NTKProbe:
    return NTKProbe(x, None, {name: 1.0 for name, _ in model.named_parameters()}, plan)


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "matrix-free"])
def test_fit_at_init_and_ntk_check_against_brute_force(dense: bool) -> None:
    model = _model()
    x = torch.randn(N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plan = ComputePlan() if dense else ComputePlan(kernel_budget=1)
    ntk = _probe(model, x, plan)
    init = fit_at_init(model, ntk, [("flat", None)], x)
    kernel, theta0, norm0 = init.kernel, init.theta0, init.norm0
    theta = _brute_ntk(model, x).detach()
    assert theta0.is_dense == dense
    # Lanczos norms are certified to rtol 1e-5; the dense ones are exact up to round-off
    rtol = 1e-9 if dense else 2e-5
    assert norm0 == pytest.approx(np.linalg.norm(theta.numpy(), 2), rel=rtol)
    lin = AffineKernel(kernel.a, kernel.b, kernel.c).matrix(x)
    assert kernel.rel_error == pytest.approx(
        np.linalg.norm((theta - lin).numpy(), 2) / np.linalg.norm(theta.numpy(), 2), rel=rtol
    )
    # matrix-free: Θ_0 products come from a frozen copy f_0 (the live model's products would move with it)
    initial = theta0 if dense else ntk.frozen_operator(frozen_copy(model))
    reference = ntk_reference(kernel, initial, norm0, x, dense=dense)
    with torch.no_grad():
        model[2].weight.mul_(1.5)  # the kernel moves
    values, eigenvalues = ntk_check(ntk.operator(model), reference, (0, theta) if dense else None, 4)
    moved = _brute_ntk(model, x).detach()
    assert values["ntk_scale"] == pytest.approx(np.linalg.norm(moved.numpy(), 2) / norm0, rel=rtol)
    if dense:  # kernel distance 1 − cos in Frobenius geometry, from the brute-force kernels
        cosine = float(
            (theta * moved).sum() / (np.linalg.norm(theta.numpy()) * np.linalg.norm(moved.numpy()))
        )
        assert values["kernel_distance"] == pytest.approx(1 - cosine, rel=1e-9)
        assert values["kernel_velocity"] == pytest.approx((1 - cosine) / 4, rel=1e-9)
    else:  # Frobenius products need n products: NaN in matrix-free mode
        assert math.isnan(values["kernel_distance"]) and math.isnan(values["kernel_velocity"])
    assert "kernel_alignment" not in values  # the reference has no probe targets
    assert values["ntk_gap"] == pytest.approx(np.linalg.norm((moved - lin).numpy(), 2) / norm0, rel=rtol)
    assert values["ntk_drift"] == pytest.approx(np.linalg.norm((moved - theta).numpy(), 2) / norm0, rel=rtol)
    assert values["ntk_drift"] > 0.1
    if dense:
        np.testing.assert_allclose(eigenvalues.numpy(), np.linalg.eigvalsh(moved.numpy()), atol=1e-9)
    else:
        assert eigenvalues is None


def test_ntk_check_of_a_diverged_kernel_is_nan_not_an_error() -> None:
    x = torch.randn(4, 3, dtype=torch.float64)
    reference = ntk_reference(AffineKernel(1.0, 0.5, 0.1), None, 1.0, x, dense=False)
    diverged = SymmetricOperator.from_products(lambda u: u * math.nan, 4)
    values, eigenvalues = ntk_check(diverged, reference)
    assert math.isnan(values["ntk_gap"]) and math.isnan(values["ntk_drift"]) and eigenvalues is None


def test_compare_losses_and_agreement_against_torch() -> None:
    gen = torch.Generator().manual_seed(2)
    network, linear, initial = (torch.randn(10, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    targets = torch.randint(0, 3, (10,), generator=gen)
    record = compare(network, linear, initial, targets=targets, loss_fn=F.cross_entropy, classification=True)
    assert record["loss_network"] == pytest.approx(float(F.cross_entropy(network, targets)), rel=1e-12)
    assert record["loss_linear"] == pytest.approx(float(F.cross_entropy(linear, targets)), rel=1e-12)
    same = float((network.argmax(1) == linear.argmax(1)).double().mean())
    assert record["agreement"] == pytest.approx(same)
    unlabelled = compare(network, linear, initial, targets=None, loss_fn=F.mse_loss, classification=False)
    assert set(unlabelled) == {"functional_distance", "functional_distance_rel"}


def test_kernel_alignment_of_a_check_against_the_brute_force_kernel() -> None:
    """Centred kernel–target alignment with one-hot class targets, from the per-example autograd NTK."""
    model = _model()
    x = torch.randn(N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(N) % 2
    ntk = _probe(model, x, ComputePlan())
    init = fit_at_init(model, ntk, [("flat", None)], x)
    targets = F.one_hot(labels, 2).double()
    reference = ntk_reference(init.kernel, init.theta0, init.norm0, x, dense=True, targets=targets)
    values, _ = ntk_check(ntk.operator(model), reference)
    theta = _brute_ntk(model, x).detach().numpy()
    h = np.eye(N) - 1.0 / N
    kc, yc = h @ theta @ h, h @ targets.numpy() @ targets.numpy().T @ h
    expected = float(np.sum(kc * yc) / (np.linalg.norm(kc) * np.linalg.norm(yc)))
    assert values["kernel_alignment"] == pytest.approx(expected, rel=1e-9)
    assert "kernel_velocity" not in values  # the first check has no previous kernel
