"""The ``progress(done, total)`` hook: reported, monotone, complete, and an abort that leaves no trace.

Kernels computed with a hook are checked against the float64 brute force of ``_ntk_reference``
(the hook must not change the result).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _ntk_reference import DTYPE, assert_close, brute_force_ntk, loop_warnings
from torch import Tensor, nn

from lin_probe.monitor.checks import NTKProbe
from lin_probe.ntk import empirical_ntk, ntk_diagonal, ntk_operator
from lin_probe.plan import ComputePlan


class Net(nn.Module):
    """Conv + BatchNorm + Linear (structured) and a bare parameter (generic rest)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.norm = nn.BatchNorm1d(3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))
        self.head = nn.Linear(3, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.norm(self.conv(x))).mean(dim=2) * self.scale
        return self.head(self.drop(h))


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))

    def check(self) -> None:
        """Total known at the first call (done = 0), never changed, done monotone up to it."""
        assert self.calls, "the hook was never called"
        first_done, total = self.calls[0]
        assert first_done == 0 and total >= 1
        assert all(t == total for _, t in self.calls)
        dones = [d for d, _ in self.calls]
        assert dones == sorted(dones) and dones[-1] == total
        assert len(dones) == total + 1  # one call per unit after the start


def make() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(11)
    model = Net().to(DTYPE).train()
    model.norm.running_mean.uniform_(-0.3, 0.3)
    model.norm.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(10, 2, 6, dtype=DTYPE)


@pytest.mark.parametrize("method", ["auto", "structured", "generic"])
@pytest.mark.parametrize(
    "options",
    [{}, {"chunk_size": 3}, {"memory_budget": 20_000}],
    ids=["one-block", "chunks", "tight-budget"],
)
def test_kernel_progress_is_complete_and_monotone(method: str, options: dict[str, Any]) -> None:
    model, x = make()
    hook = Recorder()
    kernel = empirical_ntk(model, x, method=method, progress=hook, **options)
    assert_close(kernel, brute_force_ntk(model, x))
    hook.check()
    if options.get("chunk_size") == 3:
        assert hook.calls[0][1] > 1  # several chunk recordings / Jacobian blocks are reported


def test_operator_diagonal_and_probe_report_progress() -> None:
    model, x = make()
    expected = brute_force_ntk(model, x)
    for plan in (ComputePlan(), ComputePlan(dense_max_n=1)):
        hook = Recorder()
        op = ntk_operator(model, x, plan=plan, progress=hook)
        hook.check()
        u = torch.randn(10, dtype=DTYPE)
        assert_close(op(u), expected @ u)
    hook = Recorder()
    diagonal = ntk_diagonal(model, x, plan=ComputePlan(), block=4, progress=hook)
    hook.check()
    assert hook.calls[0][1] == 3
    assert_close(diagonal, torch.diagonal(expected))
    probe = NTKProbe(x, None, {}, ComputePlan())
    for call in (probe.operator, probe.trace):
        hook = Recorder()
        call(model, progress=hook)
        hook.check()


class Abort(Exception):
    pass


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    }


def assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["flags"] == before["flags"] and after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    for g0, g1 in zip(before["grads"], after["grads"], strict=True):
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)
    assert torch.backends.mkldnn.enabled and torch.backends.mha.get_fastpath_enabled()


def aborting_at(unit: int, error: Exception) -> Callable[[int, int], None]:
    def hook(done: int, total: int) -> None:
        if done >= min(unit, total):
            raise error

    return hook


CALLS: dict[str, Callable[..., Any]] = {
    "auto": lambda m, x, h: empirical_ntk(m, x, progress=h, chunk_size=3),
    "structured": lambda m, x, h: empirical_ntk(m, x, method="structured", progress=h, chunk_size=3),
    "generic": lambda m, x, h: empirical_ntk(m, x, method="generic", progress=h, chunk_size=3),
    "operator": lambda m, x, h: ntk_operator(m, x, plan=ComputePlan(), progress=h),
    "diagonal": lambda m, x, h: ntk_diagonal(m, x, plan=ComputePlan(), block=4, progress=h),
    "probe": lambda m, x, h: NTKProbe(x, None, {}, ComputePlan()).operator(m, progress=h),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("unit", [0, 1, 2])
def test_raising_hook_aborts_unchanged_and_leaves_the_model_untouched(call: str, unit: int) -> None:
    model, x = make()
    model.conv.weight.grad = torch.full_like(model.conv.weight, 0.25)
    model.scale.requires_grad_(False)
    model.norm.eval()  # a submodule flag differing from the parent's
    before = snapshot(model)
    error = Abort("stop")
    with pytest.raises(Abort) as caught:
        CALLS[call](model, x, aborting_at(unit, error))
    assert caught.value is error
    assert_untouched(model, before)


def test_runtime_error_from_the_hook_is_not_taken_for_a_vmap_failure(fresh_warning: None) -> None:
    """The generic path falls back to its loop on ``RuntimeError`` from vmap, never from the hook."""
    model, x = make()
    error = RuntimeError("user abort")
    with warnings.catch_warnings(record=True) as record, pytest.raises(RuntimeError) as caught:
        warnings.simplefilter("always")
        empirical_ntk(model, x, method="generic", chunk_size=3, progress=aborting_at(1, error))
    assert caught.value is error
    assert not loop_warnings(record)


def test_non_callable_progress_is_refused() -> None:
    model, x = make()
    with pytest.raises(TypeError, match="progress"):
        empirical_ntk(model, x, progress=3)  # type: ignore[arg-type]
