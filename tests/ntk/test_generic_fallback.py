"""The generic NTK path on models vmap cannot batch: RNNs, attention, autograd.Functions without vmap.

References are brute force written here with plain ``torch.autograd`` on a float64, eval-mode deep
copy: one backward per example and output, ``Θ = (1/C) Σ_c J_c J_cᵀ``. Float64 results agree to
summation order (``1e-9``); float32 kernels to float32 round-off through a few recurrent steps (``1e-4``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _ntk_reference import loop_warnings
from torch import Tensor, nn

from lin_probe.ntk import empirical_ntk, ntk_matvec
from lin_probe.ntk.dense import GenericLoopWarning


class RecurrentClassifier(nn.Module):
    """``batch_first`` RNN, last step → Linear: the usual sequence classifier."""

    def __init__(self, cell: type[nn.RNNBase], features: int = 3, hidden: int = 5, classes: int = 2) -> None:
        super().__init__()
        self.rnn = cell(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class _NoVmapSquare(torch.autograd.Function):
    """Old-style autograd.Function (no ``setup_context``): torch.func transforms refuse it."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class CustomFunctionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 6)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(_NoVmapSquare.apply(self.inner(x)) * self.scale)


def brute_force(model: nn.Module, inputs: Tensor) -> Tensor:
    """Float64 ``(1/C) Σ_c J_c J_cᵀ`` from per-example, per-output ``torch.autograd.grad``."""
    reference = copy.deepcopy(model).double().eval()
    params = [p for p in reference.parameters() if p.requires_grad]
    rows = []
    for i in range(inputs.shape[0]):
        out = reference(inputs[i : i + 1].double()).reshape(-1)
        grads = []
        for c in range(out.shape[0]):
            g = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            grads.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if d is None else d).reshape(-1)
                        for p, d in zip(params, g, strict=True)
                    ]
                )
            )
        rows.append(torch.stack(grads))
    jac = torch.stack(rows)  # (n, C, P)
    return torch.einsum("icp,jcp->ij", jac, jac) / jac.shape[1]


def snapshot(model: nn.Module) -> tuple[list[bool], dict[str, Tensor]]:
    return [m.training for m in model.modules()], {
        k: v.detach().clone() for k, v in model.state_dict().items()
    }


def assert_untouched(model: nn.Module, before: tuple[list[bool], dict[str, Tensor]]) -> None:
    flags, state = before
    assert [m.training for m in model.modules()] == flags
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert torch.backends.mkldnn.enabled and torch.backends.mha.get_fastpath_enabled()  # flags restored


def assert_close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    err = (actual.detach().double() - expected).abs().max().item()
    assert err <= rtol * expected.abs().max().item(), f"max error {err:.3e}"


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("method", ["generic", "auto"])
def test_recurrent_kernel_and_product_match_brute_force(
    cell: type[nn.RNNBase], dtype: torch.dtype, rtol: float, method: str, fresh_warning: None
) -> None:
    torch.manual_seed(0)
    model = RecurrentClassifier(cell).to(dtype).train()
    inputs = torch.randn(5, 4, 3, dtype=dtype)
    before = snapshot(model)
    expected = brute_force(model, inputs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kernel = empirical_ntk(model, inputs, method=method)
        kernel_again = empirical_ntk(model, inputs, method=method, chunk_size=2)
        u = torch.linspace(-1.0, 1.0, 5, dtype=dtype)
        product = ntk_matvec(model, inputs, chunk_size=2)(u)
    assert kernel.dtype == dtype
    assert_close(kernel, expected, rtol)
    assert_close(kernel_again, expected, rtol)
    assert_close(product, expected @ u.double(), rtol)
    assert not loop_warnings(record)  # batched-forward Jacobians: no slow per-example loop
    assert_untouched(model, before)


def test_memory_budget_chunks_the_loop(fresh_warning: None) -> None:
    """A budget of a few hundred bytes forces one example and one output per block: still exact."""
    torch.manual_seed(1)
    model = RecurrentClassifier(nn.GRU, classes=3).double()
    inputs = torch.randn(4, 3, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GenericLoopWarning)
        kernel = empirical_ntk(model, inputs, method="generic", memory_budget=256)
        u = torch.randn(4, dtype=torch.float64)
        product = ntk_matvec(model, inputs, memory_budget=256)(u)
    expected = brute_force(model, inputs)
    assert_close(kernel, expected, 1e-9)
    assert_close(product, expected @ u, 1e-9)


def test_param_weights_honoured_in_loop(fresh_warning: None) -> None:
    torch.manual_seed(2)
    model = RecurrentClassifier(nn.LSTM).double()
    inputs = torch.randn(4, 3, 3, dtype=torch.float64)
    head_only = {name: 0.0 for name, _ in model.rnn.named_parameters(prefix="rnn")}
    weights = {**head_only, "head.weight": 3.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GenericLoopWarning)
        kernel = empirical_ntk(model, inputs, method="generic", param_weights=weights)
        u = torch.randn(4, dtype=torch.float64)
        product = ntk_matvec(model, inputs, param_weights=weights)(u)
    frozen = copy.deepcopy(model)
    frozen.rnn.requires_grad_(False)
    frozen.head.bias.requires_grad_(False)
    expected = 3.0 * brute_force(frozen, inputs) + brute_force(_only_bias(model), inputs)
    assert_close(kernel, expected, 1e-9)
    assert_close(product, expected @ u, 1e-9)


def _only_bias(model: RecurrentClassifier) -> nn.Module:
    copy_ = copy.deepcopy(model)
    copy_.requires_grad_(False)
    copy_.head.bias.requires_grad_(True)
    return copy_


def test_vmap_failure_falls_back_with_the_reason(fresh_warning: None) -> None:
    """A non-RNN model vmap refuses (an autograd.Function without setup_context): loop, exact, warned once."""
    torch.manual_seed(3)
    model = CustomFunctionNet().double()
    inputs = torch.randn(6, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kernel = empirical_ntk(model, inputs, method="generic", chunk_size=4)
        u = torch.randn(6, dtype=torch.float64)
        product = ntk_matvec(model, inputs)(u)
    expected = brute_force(model, inputs)
    assert_close(kernel, expected, 1e-9)
    assert_close(product, expected @ u, 1e-9)
    messages = loop_warnings(record)
    assert len(messages) == 1 and "RuntimeError" in messages[0], messages


def test_transformer_encoder_batches_without_fallback(fresh_warning: None) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1, batch_first=True),
        nn.Flatten(),
        nn.Linear(24, 2),
    ).double()
    model.train()
    inputs = torch.randn(4, 3, 8, dtype=torch.float64)
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        generic = empirical_ntk(model, inputs, method="generic")
        auto = empirical_ntk(model, inputs)
        u = torch.randn(4, dtype=torch.float64)
        product = ntk_matvec(model, inputs)(u)
    assert not [str(w.message) for w in record if "batching rule" in str(w.message)]
    assert not loop_warnings(record)
    expected = brute_force(model, inputs)
    assert_close(generic, expected, 1e-9)
    assert_close(auto, expected, 1e-9)
    assert_close(product, expected @ u, 1e-9)
    assert_untouched(model, before)


def test_product_alone_falls_back_and_warns_once(fresh_warning: None) -> None:
    """The matrix-free path has its own loop forms (pull-back and push-forward) and tries vmap once."""
    torch.manual_seed(5)
    model = CustomFunctionNet().double()
    inputs = torch.randn(5, 4, dtype=torch.float64)
    matvec = ntk_matvec(model, inputs, chunk_size=2)
    expected = brute_force(model, inputs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for seed in range(2):
            u = torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            assert_close(matvec(u), expected @ u, 1e-9)
    assert len(loop_warnings(record)) == 1


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_product_batches_without_slow_fallback(cell: type[nn.RNNBase], fresh_warning: None) -> None:
    """With oneDNN off, the product vmaps RNNs natively: no loop warning, no missing batching rule."""
    torch.manual_seed(6)
    model = RecurrentClassifier(cell).float()
    inputs = torch.randn(4, 3, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        u = torch.randn(4)
        product = ntk_matvec(model, inputs)(u)
    assert not [str(w.message) for w in record if "batching rule" in str(w.message)]
    assert not loop_warnings(record)
    assert_close(product, brute_force(model, inputs) @ u.double(), 1e-4)
