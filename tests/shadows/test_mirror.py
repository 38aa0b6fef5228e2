"""OptimizerMirror against independent references: hand-written SGD replays (momentum, Nesterov,
dampening, weight decay, maximize), the exact function-space equivalence of a network that is itself
linear, and exact resumption of a non-SGD mirror."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from _shadow_helpers import SGD_COMBOS, SgdRecurrence, centred_shadow, combo_id, loss_grad_wrt_f, mlp, psi
from torch import Tensor, nn

from lin_probe.kernel import AffineKernel
from lin_probe.losses import resolve_loss
from lin_probe.shadows.linear import LinearShadow
from lin_probe.shadows.mirror import OptimizerMirror

KERNEL = AffineKernel(a=0.7, b=0.3, c=0.1)


# ---------------------------------------------------------------------------------------------
# mirrored SGD vs a hand-written replay
# ---------------------------------------------------------------------------------------------


def _replay_sgd(psi_f0_y: list, lrs: list[float], hp: dict, loss: str, shape: tuple) -> list[Tensor]:
    """SGD on B with the update rule written out (two micro-batches of weight 1/2 per step)."""
    B = torch.zeros(shape, dtype=torch.float64)
    rule = SgdRecurrence(hp)
    trajectory = []
    for step, lr in enumerate(lrs):
        g = torch.zeros_like(B)
        for features, f0, y in psi_f0_y[step]:
            g += 0.5 * features.T @ loss_grad_wrt_f(f0 + features @ B, y, loss)
        B = B - lr * rule.direction(g, B)
        trajectory.append(B)
    return trajectory


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("hp", SGD_COMBOS, ids=combo_id)
def test_mirrored_sgd_matches_hand_written_replay(hp: dict, loss: str) -> None:
    d, c, n_micro = 5, 3, 6
    gen = torch.Generator().manual_seed(7)
    model = mlp(d, c, seed=11)
    kernel = AffineKernel(a=0.8, b=0.2, c=0.05)
    lrs = [0.3, 0.1, 0.5, 0.05]
    batches = []  # per step: two micro-batches (x, y)
    for _ in lrs:
        xs = [torch.randn(n_micro, d, generator=gen, dtype=torch.float64) for _ in range(2)]
        if loss == "mse":
            ys = [torch.randn(n_micro * c, generator=gen, dtype=torch.float64) for _ in range(2)]
        else:
            ys = [torch.randint(0, c, (n_micro,), generator=gen) for _ in range(2)]
        batches.append(list(zip(xs, ys, strict=True)))
    with torch.no_grad():
        replay_input = [[(psi(x, kernel.a, kernel.b), model(x), y) for x, y in step] for step in batches]
    expected = _replay_sgd(replay_input, lrs, hp, loss, (d + 1, c))

    shadow = centred_shadow(model, kernel, batches[0][0][0])
    mirror = OptimizerMirror(shadow, torch.optim.SGD(model.parameters(), lr=1.0, **hp), resolve_loss(loss))
    assert mirror.exact and mirror.mirror_warning() is None
    for step, lr in enumerate(lrs):
        before = shadow.B.detach().clone()
        (x1, y1), (x2, y2) = batches[step]
        with torch.no_grad():  # accumulate must re-enable grad itself
            mirror.accumulate(x1, y1, scale=0.5)
        mirror.accumulate(x2, y2, scale=0.5)
        assert torch.equal(shadow.B.detach(), before)  # accumulate never moves B
        mirror.step(lr=lr)
        assert shadow.B.grad is None
        # float64 on both sides: round-off is ~1e-15; any recurrence slip (dampening, Nesterov,
        # weight-decay order, lr) changes B at the 1e-3 level or more.
        err = (shadow.B.detach() - expected[step]).norm() / expected[step].norm()
        assert err < 1e-6, f"step {step}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------
# theorem: a linear network's function-space dynamics are the shadow's
# ---------------------------------------------------------------------------------------------


class _ScaledLinear(nn.Module):
    """f(x) = W x/√d + b: per output NTK ∂f_c/∂(W_c, b_c) · ∂f_c'/∂(...) = xᵀx'/d + 1 → a = 1, b = 1, c = 0."""

    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, c)
        self.d = d

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x / math.sqrt(self.d))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_linear_network_and_shadow_have_identical_function_space_dynamics(loss: str, momentum: float) -> None:
    d, c, lr = 10, 3, 0.5
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(2)
    net = _ScaledLinear(d, c)
    x_train = torch.randn(40, d, generator=gen)
    y_train = (
        torch.randn(40, c, generator=gen) if loss == "mse" else torch.randint(0, c, (40,), generator=gen)
    )
    x_test = torch.randn(16, d, generator=gen)
    kernel = AffineKernel(a=1.0, b=1.0, c=0.0)  # derived by hand in _ScaledLinear's docstring
    shadow = centred_shadow(net, kernel, x_train)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    mirror = OptimizerMirror(shadow, opt, resolve_loss(loss))
    loss_fn = resolve_loss(loss)
    with torch.no_grad():
        f_start = net(x_test).clone()
    for step in range(12):
        idx = torch.arange(step * 8, step * 8 + 8) % 40
        opt.zero_grad()
        loss_fn(net(x_train[idx]), y_train[idx]).backward()
        mirror.accumulate(x_train[idx], y_train[idx])
        mirror.step(lr=lr)
        opt.step()
        with torch.no_grad():
            # float32, outputs O(1), 12 steps: round-off stays ~1e-6, well inside 1e-5.
            torch.testing.assert_close(shadow(x_test), net(x_test), rtol=0, atol=1e-5)
    with torch.no_grad():
        moved = (net(x_test) - f_start).abs().max()
    assert moved > 0.1  # the comparison is about real training, not two frozen models


# ---------------------------------------------------------------------------------------------
# other optimizers
# ---------------------------------------------------------------------------------------------


def _adam_run(shadow: LinearShadow, mirror: OptimizerMirror, batches: list) -> list[Tensor]:
    trajectory = []
    for x, y in batches:
        mirror.accumulate(x, y)
        mirror.step(lr=2e-2)
        trajectory.append(shadow.B.detach().clone())
    return trajectory


def test_adam_is_mirrored_without_warning_and_resumes_exactly() -> None:
    d, c = 4, 2
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, d, generator=gen), torch.randn(6, c, generator=gen)) for _ in range(6)]
    model = mlp(d, c, seed=0, dtype=torch.float32)
    user_opt = torch.optim.Adam(
        model.parameters(), lr=1e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=1e-3, amsgrad=True
    )
    with warnings.catch_warnings():
        # The mirror never warns itself (under DDP every process holds one); its caller warns once.
        warnings.simplefilter("error")
        shadow = centred_shadow(model, KERNEL, batches[0][0])
        mirror = OptimizerMirror(shadow, user_opt, resolve_loss("mse"))
        full = _adam_run(shadow, mirror, batches)
    message = mirror.mirror_warning()
    assert message is not None and "Adam" in message and "gradient descent" in message
    assert "linear shadow" in message
    assert type(mirror.optimizer) is torch.optim.Adam and not mirror.exact
    group = mirror.optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"], group["amsgrad"]) == (
        (0.8, 0.95),
        1e-6,
        1e-3,
        True,
    )

    # Interrupted run: 3 steps, checkpoint through bytes, fresh objects from a *different* model.
    first = centred_shadow(model, KERNEL, batches[0][0])
    first_mirror = OptimizerMirror(first, user_opt, resolve_loss("mse"))
    head = _adam_run(first, first_mirror, batches[:3])
    buffer = io.BytesIO()
    torch.save({"shadow": first.state_dict(), "mirror": first_mirror.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    other = mlp(d, c, seed=99, dtype=torch.float32)
    resumed = centred_shadow(other, KERNEL, batches[0][0])
    resumed_mirror = OptimizerMirror(resumed, torch.optim.Adam(other.parameters()), resolve_loss("mse"))
    resumed.load_state_dict(saved["shadow"])
    resumed_mirror.load_state_dict(saved["mirror"])
    tail = _adam_run(resumed, resumed_mirror, batches[3:])
    # Without the optimizer state (moments, step count) the trajectory differs: the check bites.
    cold = centred_shadow(model, KERNEL, batches[0][0])
    cold.load_state_dict(saved["shadow"])
    cold_tail = _adam_run(cold, OptimizerMirror(cold, user_opt, resolve_loss("mse")), batches[3:])
    for got, want in zip(head + tail, full, strict=True):
        assert torch.equal(got, want)  # same ops on the same CPU: bitwise identical
    assert not torch.allclose(cold_tail[0], full[3])
    assert torch.equal(resumed.initial_output(batches[0][0]), shadow.initial_output(batches[0][0]))


class _NeedsModel(torch.optim.SGD):
    """An optimizer whose constructor needs more than its group's hyperparameters."""

    def __init__(self, params, model: nn.Module, lr: float = 0.1) -> None:
        super().__init__(params, lr=lr)
        self.model = model


def test_unmirrorable_optimizers_are_refused_with_a_pointer_to_sgd() -> None:
    model = mlp(3, 1, seed=0)
    shadow = centred_shadow(model, KERNEL, torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="SGD"):
        OptimizerMirror(shadow, torch.optim.LBFGS(model.parameters()), resolve_loss("mse"))
    with pytest.raises(TypeError, match="SGD"):
        OptimizerMirror(shadow, _NeedsModel(model.parameters(), model), resolve_loss("mse"))


class _Wrapper:
    """Stands for a framework's optimizer wrapper (e.g. Lightning's), which the caller must unwrap."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer


def test_anything_but_a_torch_optimizer_is_refused() -> None:
    model = mlp(3, 1, seed=0)
    shadow = centred_shadow(model, KERNEL, torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        OptimizerMirror(shadow, _Wrapper(torch.optim.SGD(model.parameters(), lr=0.1)), resolve_loss("mse"))
    with pytest.raises(TypeError, match="LinearShadow"):
        OptimizerMirror(model, torch.optim.SGD(model.parameters(), lr=0.1), resolve_loss("mse"))
    with pytest.raises(TypeError, match="loss_fn"):
        OptimizerMirror(shadow, torch.optim.SGD(model.parameters(), lr=0.1), "mse")


def test_step_without_accumulated_gradient_is_an_error() -> None:
    model = mlp(3, 1, seed=0)
    shadow = centred_shadow(model, KERNEL, torch.randn(2, 3, dtype=torch.float64))
    mirror = OptimizerMirror(shadow, torch.optim.SGD(model.parameters(), lr=0.1), resolve_loss("mse"))
    with pytest.raises(RuntimeError, match="accumulate"):
        mirror.step(lr=0.1)
