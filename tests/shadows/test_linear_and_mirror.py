"""LinearShadow and ShadowTrainer against independent references: closed-form features, hand-written
SGD replays, and the exact function-space equivalence of a network that is itself linear."""

from __future__ import annotations

import gc
import io
import math
import random
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lin_probe.kernel import AffineKernel
from lin_probe.monitor.losses import is_classification, resolve_loss
from lin_probe.shadows.linear import LinearShadow
from lin_probe.shadows.mirror import ShadowTrainer

KERNEL = AffineKernel(a=0.7, b=0.3, c=0.1)


def _mlp(d: int, c: int, seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, c)).to(dtype)


def _psi(x: Tensor, a: float, b: float) -> Tensor:
    """ψ(x) = [√a·x/√d ; √b], written out from DESIGN §1."""
    flat = x.reshape(x.shape[0], -1).double()
    d = flat.shape[1]
    return torch.cat(
        [
            math.sqrt(a) * flat / math.sqrt(d),
            torch.full((flat.shape[0], 1), math.sqrt(b), dtype=torch.float64),
        ],
        dim=1,
    )


# ---------------------------------------------------------------------------------------------
# forward pass
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("center", [True, False])
def test_forward_is_initial_output_plus_features_times_B(center: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 2, 3, generator=gen, dtype=torch.float64)  # flattened to d = 6
    model = nn.Sequential(nn.Flatten(), _mlp(6, 3, seed=1))
    with torch.no_grad():
        f0 = model(x)
    shadow = LinearShadow.from_model(model, KERNEL, x, center=center)
    b_value = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        shadow.B.copy_(b_value)
    psi = _psi(x, KERNEL.a, KERNEL.b)
    expected = (f0 if center else 0.0) + psi @ b_value
    # float64 throughout: only round-off (~1e-16 relative) separates the two computations.
    torch.testing.assert_close(shadow(x), expected, rtol=1e-12, atol=1e-12)
    # ψψᵀ = a·XXᵀ/d + b·11ᵀ, from the raw inputs.
    flat = x.reshape(12, -1)
    gram = KERNEL.a * flat @ flat.T / 6 + KERNEL.b
    feats = shadow.features(x)
    torch.testing.assert_close(feats @ feats.T, gram, rtol=1e-12, atol=1e-12)
    assert shadow.B.shape == (7, 3) and shadow.B.dtype == torch.float64


def test_shadow_dtype_follows_model_and_B_starts_at_zero() -> None:
    x = torch.randn(5, 4)
    shadow32 = LinearShadow.from_model(_mlp(4, 2, seed=0, dtype=torch.float32), KERNEL, x)
    shadow64 = LinearShadow.from_model(_mlp(4, 2, seed=0), KERNEL, x.double())
    assert shadow32.B.dtype == torch.float32 and shadow64.B.dtype == torch.float64
    assert torch.count_nonzero(shadow32.B) == 0 and shadow32.B.shape == (5, 2)


def test_initial_model_is_a_frozen_copy() -> None:
    x = torch.randn(8, 4, dtype=torch.float64)
    model = _mlp(4, 2, seed=3)
    with torch.no_grad():
        f0 = model(x).clone()
    shadow = LinearShadow.from_model(model, KERNEL, x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training the user's model must not move f_0
    shadow.train()
    assert not shadow.initial_model.training
    assert all(not p.requires_grad for p in shadow.initial_model.parameters())
    assert torch.equal(shadow.initial_output(x), f0)
    assert not torch.allclose(model(x), f0)  # the edit did change the original


class _NoisyInEval(nn.Module):
    """Draws from the global RNG in every forward, even in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) + 0.0 * torch.rand(x.shape[0], 2)


def test_running_f0_leaves_global_rng_untouched() -> None:
    x = torch.randn(4, 3)
    shadow = LinearShadow.from_model(_NoisyInEval(), KERNEL, x)
    before = torch.get_rng_state()
    shadow(x)
    assert torch.equal(torch.get_rng_state(), before)


def test_inputs_with_wrong_width_are_refused() -> None:
    shadow = LinearShadow.from_model(_mlp(4, 2, seed=0), KERNEL, torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="4"):
        shadow.features(torch.randn(3, 5))


# ---------------------------------------------------------------------------------------------
# mirrored SGD vs a hand-written replay
# ---------------------------------------------------------------------------------------------


def _loss_grad_wrt_f(f: Tensor, y: Tensor, loss: str) -> Tensor:
    """∂L/∂f in closed form: MSE 2(f−y)/(n·C); CE (softmax(f) − onehot(y))/n."""
    n, c = f.shape
    if loss == "mse":
        return 2.0 * (f - y.reshape(n, c)) / (n * c)
    expf = torch.exp(f - f.max(dim=1, keepdim=True).values)
    return (expf / expf.sum(dim=1, keepdim=True) - F.one_hot(y, c).double()) / n


def _replay_sgd(psi_f0_y: list, lrs: list[float], hp: dict, loss: str, shape: tuple) -> list[Tensor]:
    """SGD on B with the update rule written out (torch docs; maximize = descent on −L)."""
    B = torch.zeros(shape, dtype=torch.float64)
    buf: Tensor | None = None
    trajectory = []
    for step, lr in enumerate(lrs):
        g = torch.zeros_like(B)
        for psi, f0, y in psi_f0_y[step]:
            g += 0.5 * psi.T @ _loss_grad_wrt_f(f0 + psi @ B, y, loss)
        if hp["maximize"]:
            g = -g
        g = g + hp["weight_decay"] * B
        if hp["momentum"] != 0:
            buf = g.clone() if buf is None else hp["momentum"] * buf + (1 - hp["dampening"]) * g
            g = g + hp["momentum"] * buf if hp["nesterov"] else buf
        B = B - lr * g
        trajectory.append(B)
    return trajectory


SGD_COMBOS = [
    dict(momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0.0, maximize=False),
    dict(momentum=0.9, nesterov=False, weight_decay=0.0, dampening=0.0, maximize=False),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2, dampening=0.0, maximize=False),
    dict(momentum=0.8, nesterov=False, weight_decay=5e-3, dampening=0.3, maximize=False),
    dict(momentum=0.5, nesterov=False, weight_decay=1e-2, dampening=0.1, maximize=True),
]


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("hp", SGD_COMBOS, ids=lambda hp: "-".join(f"{k}={v}" for k, v in hp.items()))
def test_mirrored_sgd_matches_hand_written_replay(hp: dict, loss: str) -> None:
    d, c, n_micro = 5, 3, 6
    gen = torch.Generator().manual_seed(7)
    model = _mlp(d, c, seed=11)
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
        replay_input = [[(_psi(x, kernel.a, kernel.b), model(x), y) for x, y in step] for step in batches]
    expected = _replay_sgd(replay_input, lrs, hp, loss, (d + 1, c))

    shadow = LinearShadow.from_model(model, kernel, batches[0][0][0])
    stepper = ShadowTrainer(shadow, torch.optim.SGD(model.parameters(), lr=1.0, **hp), resolve_loss(loss))
    assert stepper.exact
    for step, lr in enumerate(lrs):
        before = shadow.B.detach().clone()
        (x1, y1), (x2, y2) = batches[step]
        with torch.no_grad():  # accumulate must re-enable grad itself
            stepper.accumulate(x1, y1, scale=0.5)
        stepper.accumulate(x2, y2, scale=0.5)
        assert torch.equal(shadow.B.detach(), before)  # accumulate never moves B
        stepper.step(lr=lr)
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
    shadow = LinearShadow.from_model(net, kernel, x_train)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    stepper = ShadowTrainer(shadow, opt, resolve_loss(loss))
    loss_fn = resolve_loss(loss)
    with torch.no_grad():
        f_start = net(x_test).clone()
    for step in range(12):
        idx = torch.arange(step * 8, step * 8 + 8) % 40
        opt.zero_grad()
        loss_fn(net(x_train[idx]), y_train[idx]).backward()
        stepper.accumulate(x_train[idx], y_train[idx])
        stepper.step(lr=lr)
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


def _adam_run(shadow: LinearShadow, stepper: ShadowTrainer, batches: list) -> list[Tensor]:
    trajectory = []
    for x, y in batches:
        stepper.accumulate(x, y)
        stepper.step(lr=2e-2)
        trajectory.append(shadow.B.detach().clone())
    return trajectory


def test_adam_is_mirrored_with_one_warning_and_resumes_exactly() -> None:
    d, c = 4, 2
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, d, generator=gen), torch.randn(6, c, generator=gen)) for _ in range(6)]
    model = _mlp(d, c, seed=0, dtype=torch.float32)
    user_opt = torch.optim.Adam(
        model.parameters(), lr=1e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=1e-3, amsgrad=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shadow = LinearShadow.from_model(model, KERNEL, batches[0][0])
        stepper = ShadowTrainer(shadow, user_opt, resolve_loss("mse"))
        full = _adam_run(shadow, stepper, batches)
    user_warnings = [w for w in caught if issubclass(w.category, UserWarning)]
    assert len(user_warnings) == 1 and "gradient descent" in str(user_warnings[0].message)
    assert type(stepper.optimizer) is torch.optim.Adam and not stepper.exact
    group = stepper.optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"], group["amsgrad"]) == (
        (0.8, 0.95),
        1e-6,
        1e-3,
        True,
    )

    # Interrupted run: 3 steps, checkpoint through bytes, fresh objects from a *different* model.
    first = LinearShadow.from_model(model, KERNEL, batches[0][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first_stepper = ShadowTrainer(first, user_opt, resolve_loss("mse"))
        head = _adam_run(first, first_stepper, batches[:3])
        buffer = io.BytesIO()
        torch.save({"shadow": first.state_dict(), "stepper": first_stepper.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=False)
        other = _mlp(d, c, seed=99, dtype=torch.float32)
        resumed = LinearShadow.from_model(other, KERNEL, batches[0][0])
        resumed_stepper = ShadowTrainer(resumed, torch.optim.Adam(other.parameters()), resolve_loss("mse"))
        resumed.load_state_dict(saved["shadow"])
        resumed_stepper.load_state_dict(saved["stepper"])
        tail = _adam_run(resumed, resumed_stepper, batches[3:])
        # Without the optimizer state (moments, step count) the trajectory differs: the check bites.
        cold = LinearShadow.from_model(model, KERNEL, batches[0][0])
        cold.load_state_dict(saved["shadow"])
        cold_tail = _adam_run(cold, ShadowTrainer(cold, user_opt, resolve_loss("mse")), batches[3:])
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
    model = _mlp(3, 1, seed=0)
    shadow = LinearShadow.from_model(model, KERNEL, torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="SGD"):
        ShadowTrainer(shadow, torch.optim.LBFGS(model.parameters()), resolve_loss("mse"))
    with pytest.raises(TypeError, match="SGD"):
        ShadowTrainer(shadow, _NeedsModel(model.parameters(), model), resolve_loss("mse"))


def test_step_without_accumulated_gradient_is_an_error() -> None:
    model = _mlp(3, 1, seed=0)
    shadow = LinearShadow.from_model(model, KERNEL, torch.randn(2, 3, dtype=torch.float64))
    stepper = ShadowTrainer(shadow, torch.optim.SGD(model.parameters(), lr=0.1), resolve_loss("mse"))
    with pytest.raises(RuntimeError, match="accumulate"):
        stepper.step(lr=0.1)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------


def test_resolve_loss() -> None:
    pred = torch.tensor([[1.0], [2.0], [4.0]])
    target = torch.tensor([0.0, 2.0, 1.0])
    # (1² + 0² + 3²)/3 by hand; without reshaping, broadcasting (3,1) vs (3,) would give a 3×3 mean.
    assert resolve_loss("mse")(pred, target).item() == pytest.approx(10.0 / 3.0)
    with pytest.raises(ValueError, match="elements"):
        resolve_loss("mse")(pred, torch.zeros(4))

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 2])
    log_z = torch.logsumexp(logits, dim=1)
    hand = -((logits[0, 0] - log_z[0]) + (logits[1, 2] - log_z[1])) / 2
    ce = resolve_loss("cross_entropy")
    assert ce(logits, labels).item() == pytest.approx(hand.item(), rel=1e-6)
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.25, 0.75]])
    hand_soft = -(probs * (logits - log_z[:, None])).sum() / 2
    assert ce(logits, probs).item() == pytest.approx(hand_soft.item(), rel=1e-6)

    def custom(p: Tensor, t: Tensor) -> Tensor:
        return (p - t).abs().mean()

    assert resolve_loss(custom) is custom
    with pytest.raises(ValueError, match="cross_entropy"):
        resolve_loss("hinge")
    with pytest.raises(TypeError):
        resolve_loss(42)  # type: ignore[arg-type]
    assert is_classification("cross_entropy") and not is_classification("mse")
    assert is_classification(ce) and not is_classification(custom)


# ---------------------------------------------------------------------------------------------
# Lightning modules attached to a Trainer
# ---------------------------------------------------------------------------------------------


class _TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 2)
        self.trainer_ref: object | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(torch.tanh(self.body(x))))

    def on_train_start(self) -> None:
        self.trainer_ref = self.trainer  # a user-held reference, beyond Lightning's own _trainer

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer_count() -> int:
    gc.collect()
    return sum(type(obj) is pl.Trainer for obj in gc.get_objects())  # type(): no proxy __class__ calls


def test_from_model_copies_a_lightning_module_without_its_trainer() -> None:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 2))
    module = _TinyModule()
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert module.trainer is trainer and module.trainer_ref is trainer

    x = torch.randn(5, 4)
    module.train()
    module.head.eval()  # a per-submodule flag that must survive
    flags = [m.training for m in module.modules()]
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    count = _trainer_count()

    shadow = LinearShadow.from_model(module, KERNEL, x)

    assert _trainer_count() == count
    assert shadow.initial_model._trainer is None and shadow.initial_model.trainer_ref is None
    assert module.trainer is trainer and module.trainer_ref is trainer
    assert [m.training for m in module.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    assert shadow.out_features == 2 and shadow.in_features == 4
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(shadow.initial_output(x), module(x), rtol=0, atol=0)
