"""probe_batch_statistics: the network train mode runs, measured without a trace; Θ_0 measured once.

References are independent: a deep copy of the model run in train mode on the probe batch (what
BatchNorm computes there), and per-example autograd Jacobians in float64 with the probe's statistics
held fixed, computed by hand.
"""

from __future__ import annotations

import contextlib
import copy
import random

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import lin_probe.monitor.core as core_module
from lin_probe.monitor.batch_statistics import probe_batch_statistics, training_batchnorms
from lin_probe.monitor.checks import NTKProbe
from lin_probe.monitor.config import Host, MonitorConfig
from lin_probe.monitor.core import RegimeProbe
from lin_probe.plan import ComputePlan


def _mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(dropout), nn.Linear(12, 12),
        nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 2),
    ).double()  # fmt: skip


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double()  # fmt: skip


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


def _bit_identical(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def _skewed(model: nn.Module) -> None:
    """Running statistics far from the data's (as at init, or mid-convergence), so eval ≠ train."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.fill_(3.0)
            module.running_var.fill_(0.1)
            module.num_batches_tracked.fill_(7)


@pytest.mark.parametrize(
    ("make", "shape"), [(_mlp, (16, 5)), (_cnn, (10, 3, 6, 6))], ids=["batchnorm1d", "batchnorm2d"]
)
def test_outputs_are_train_mode_on_the_probe_batch_and_buffers_come_back_bit_identical(make, shape) -> None:
    model = make()
    _skewed(model)
    x = torch.randn(*shape, dtype=torch.float64)
    before = _buffers(model)
    with torch.no_grad():
        reference = copy.deepcopy(model).train()(x)
        running = copy.deepcopy(model).eval()(x)
    with probe_batch_statistics(model, x), torch.no_grad():
        inside = model(x)
        assert all(not m.training for m in model.modules())  # measured in eval mode: nothing updates
    torch.testing.assert_close(inside, reference, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(inside, running, atol=1e-3)  # the test can fail: eval mode is different
    assert _bit_identical(_buffers(model), before)
    assert all(m.training for m in model.modules())  # flags restored


def test_a_batchnorm_in_eval_mode_keeps_its_running_statistics() -> None:
    model = _mlp()
    _skewed(model)
    model[5].eval()  # a frozen BatchNorm in a training model
    x = torch.randn(16, 5, dtype=torch.float64)
    with torch.no_grad():
        reference = copy.deepcopy(model)
        reference.train()
        reference[5].eval()
        expected = reference(x)
    assert training_batchnorms(model) == [model[1]]
    with probe_batch_statistics(model, x), torch.no_grad():
        inside = model(x)
    torch.testing.assert_close(inside, expected, rtol=1e-10, atol=1e-12)
    assert not model[5].training and model[1].training


def test_dropout_stays_off_and_rng_is_untouched() -> None:
    model = _mlp(dropout=0.5)
    x = torch.randn(16, 5, dtype=torch.float64)
    with torch.no_grad():
        reference = copy.deepcopy(model).train()
        reference[3].eval()  # dropout off, BatchNorm on the batch
        expected = reference(x)
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with probe_batch_statistics(model, x), torch.no_grad():
        first, second = model(x), model(x)
    torch.testing.assert_close(first, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_buffers_and_flags_restored_on_an_exception_and_hooks_removed() -> None:
    model = _cnn()
    _skewed(model)
    before = _buffers(model)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="boom"), probe_batch_statistics(model, x):
        raise RuntimeError("boom")
    assert _bit_identical(_buffers(model), before)
    assert all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError), probe_batch_statistics(model, torch.randn(4, 5, 6, 6).double()):
        pass  # the statistics forward itself fails (wrong channels): still restored
    assert _bit_identical(_buffers(model), before)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_a_model_without_training_batchnorm_gets_no_extra_forward() -> None:
    calls = []
    model = nn.Sequential(nn.Linear(3, 2))
    model.register_forward_hook(lambda *args: calls.append(1))
    with probe_batch_statistics(model, torch.randn(4, 3)):
        pass
    frozen = _mlp().eval()  # every BatchNorm in eval mode: nothing to install either
    frozen.register_forward_hook(lambda *args: calls.append(1))
    with probe_batch_statistics(frozen, torch.randn(4, 5, dtype=torch.float64)):
        pass
    assert calls == []


def _brute_force_ntk(model: nn.Module, x: Tensor) -> Tensor:
    """Per-example Jacobians in float64, every BatchNorm fixed at the batch's statistics by hand."""
    model = copy.deepcopy(model).double()
    with torch.no_grad():  # statistics of each BatchNorm's input on the whole batch, layer by layer
        h = x
        for module in model:
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.copy_(h.mean(0))
                module.running_var.copy_(h.var(0, unbiased=False))
            h = module.eval()(h) if isinstance(module, nn.BatchNorm1d) else module(h)
    model.eval()
    params = [p for p in model.parameters()]
    jacobians = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])[0]
        rows = []
        for k in range(out.shape[0]):
            grads = torch.autograd.grad(out[k], params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        jacobians.append(torch.stack(rows))
    jac = torch.stack(jacobians)  # n × outputs × parameters
    return torch.einsum("ikp,jkp->ij", jac, jac) / jac.shape[1]  # the trace-averaged NTK over outputs


def test_measured_kernel_is_per_example_with_the_probe_statistics_fixed() -> None:
    model = _mlp()
    _skewed(model)
    x = torch.randn(8, 5, dtype=torch.float64)
    weights = {name: 1.0 for name, _ in model.named_parameters()}
    ntk = NTKProbe(x, None, weights, ComputePlan())
    with probe_batch_statistics(model, x):
        theta = ntk.operator(model).matrix
    torch.testing.assert_close(theta.to(torch.float64), _brute_force_ntk(model, x), rtol=1e-8, atol=1e-10)


@pytest.mark.filterwarnings("ignore:The affine data kernel fits")
def test_f0_is_calibrated_once_and_step0_reuses_theta0(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp().float()
    _skewed(model)
    x = torch.randn(16, 5)
    y = torch.randint(0, 2, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    calls = []
    original = NTKProbe.operator

    def counted(self: NTKProbe, m: nn.Module, progress=None):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(self, m, progress)

    monkeypatch.setattr(NTKProbe, "operator", counted)
    before = _buffers(model)
    probe = RegimeProbe.start(model, (x, y), optimizer, MonitorConfig(loss="cross_entropy"))
    assert len(calls) == 1
    record = probe.check(model, step=0)
    assert len(calls) == 1  # the step-0 check reused Θ_0
    assert record["ntk_drift"] == 0.0 and record["functional_distance"] < 1e-6
    assert _bit_identical(_buffers(model), before)
    f0 = probe.paper.shadow.initial_model
    with torch.no_grad():
        expected = copy.deepcopy(model).train()(x)
        torch.testing.assert_close(f0(x), expected, rtol=1e-5, atol=1e-6)  # f_0 = measured network at init
        torch.testing.assert_close(f0(x[:3]), expected[:3], rtol=1e-5, atol=1e-6)  # per example
    fresh = RegimeProbe.start(model, (x, y), optimizer, MonitorConfig(loss="cross_entropy"))
    assert len(calls) == 2
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    record = fresh.check(model, step=0)  # parameters written since the start: measured afresh
    assert len(calls) == 3 and record["ntk_drift"] > 0


@pytest.mark.filterwarnings("ignore:The affine data kernel fits")
def test_a_failing_statistics_forward_warns_once_and_the_check_carries_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _mlp().float()
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
    warnings: list[str] = []
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    probe = RegimeProbe.start(
        model, (x, y), optimizer, MonitorConfig(loss="cross_entropy"), host=Host(warn=warnings.append)
    )

    @contextlib.contextmanager
    def broken(*args: object):
        raise RuntimeError("statistics forward failed")
        yield

    monkeypatch.setattr(core_module, "probe_batch_statistics", broken)
    first, second = probe.check(model, step=1), probe.check(model, step=2)
    assert sum("BatchNorm statistics" in w for w in warnings) == 1
    assert "ntk_drift" in first and "functional_distance" in second  # measured, not crashed
