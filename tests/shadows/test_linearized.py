"""LinearizedShadow + LinearizedMirror against independent references: a plain replay that
differentiates *through* torch.func.jvp (reverse-over-forward, where the module uses jvp + vjp), the
empirical NTK's one-step prediction, the network's own first step, weight decay on θ' (not δ),
a live model left untouched, bit-exact resumption and the refusals."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
from _shadow_helpers import loss_grad_wrt_f, roundtrip
from torch import Tensor, nn
from torch.func import functional_call, jvp

from lin_probe._model_state import frozen_copy
from lin_probe.losses import resolve_loss
from lin_probe.ntk import empirical_ntk
from lin_probe.shadows.linearized import LinearizedMirror, LinearizedShadow

# torch.func.jvp's first use loads torch's forward-AD decompositions with torch.jit.script, which
# warns about its own deprecation once per process: torch's business, not this shadow's.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------

INPUT_SHAPES = {"mlp": (5,), "cnn": (2, 6, 6)}


def build(kind: str, seed: int, *, outputs: int = 3, width: int = 16, dtype=torch.float32) -> nn.Module:
    """A tanh MLP 5→16→16→C, or a CNN with a BatchNorm whose running statistics are not 0/1."""
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(
            nn.Linear(5, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, outputs)
        )
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3),
            nn.BatchNorm2d(4),
            nn.Tanh(),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, outputs),
        )
        with torch.no_grad():  # move the running statistics away from their defaults
            for _ in range(3):
                model(2.0 * torch.randn(16, 2, 6, 6) + 0.5)
    return model.to(dtype)


def batch(kind: str, n: int, loss: str, gen: torch.Generator, c: int = 3, dtype=torch.float32):
    x = torch.randn(n, *INPUT_SHAPES[kind], generator=gen, dtype=dtype)
    y = (
        torch.randn(n, c, generator=gen, dtype=dtype)
        if loss == "mse"
        else torch.randint(0, c, (n,), generator=gen)
    )
    return x, y


def split(named: dict[str, Tensor]) -> list[list[Tensor]]:
    """Two groups: weights, and biases/BatchNorm affine parameters (1-d)."""
    return [[p for p in named.values() if p.dim() > 1], [p for p in named.values() if p.dim() <= 1]]


OPTIMIZERS: dict[str, Callable[[list[list[Tensor]]], torch.optim.Optimizer]] = {
    "sgd": lambda g: torch.optim.SGD(
        [{"params": g[0]}, {"params": g[1], "lr": 0.03, "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-2,
    ),
    "adam": lambda g: torch.optim.Adam(
        [{"params": g[0]}, {"params": g[1], "lr": 3e-3, "betas": (0.8, 0.99)}], lr=1e-2
    ),
    "adamw": lambda g: torch.optim.AdamW(
        [{"params": g[0]}, {"params": g[1], "lr": 2e-3, "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1
    ),
}
LR_SCALES = [1.0, 0.5, 1.3, 0.2, 0.8]  # group 0's lr per step, relative to its initial lr (a schedule)


def shadow_and_mirror(model: nn.Module, opt_name: str, loss: str, **kwargs) -> tuple:
    f0 = frozen_copy(model)
    user_opt = OPTIMIZERS[opt_name](split(dict(model.named_parameters())))
    shadow = LinearizedShadow.from_model(model, f0, **kwargs)
    mirror = LinearizedMirror(shadow, user_opt, resolve_loss(loss), model=model)
    return f0, user_opt, shadow, mirror


def train(mirror: LinearizedMirror, user_opt, steps: list) -> None:
    """Each step: two micro-batches of weight 1/2, then a step with group 0's scheduled lr."""
    lr0 = user_opt.param_groups[0]["lr"]
    for (x1, y1), (x2, y2), scale in steps:
        with torch.no_grad():  # accumulate must re-enable grad itself
            mirror.accumulate(x1, y1, scale=0.5)
        mirror.accumulate(x2, y2, scale=0.5)
        mirror.step(lr=lr0 * scale)


def steps_of(kind: str, loss: str, seed: int, count: int = 5, n: int = 6) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(batch(kind, n, loss, gen), batch(kind, n, loss, gen), LR_SCALES[i]) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# the independent reference: reverse-over-forward through torch.func.jvp on plain tensors
# ---------------------------------------------------------------------------------------------


def reference_replay(f0: nn.Module, opt_name: str, loss: str, steps: list) -> dict[str, Tensor]:
    """θ' after training the Taylor model written out here, with a fresh optimizer of the same class.

    The gradient is ordinary autograd through the jvp's tangent output (the module instead takes
    one vjp of f_0 with ∂L/∂f); the optimizer's groups and lrs are set by hand.
    """
    loss_fn = resolve_loss(loss)
    theta0 = {name: p.detach() for name, p in f0.named_parameters()}
    buffers = {name: b.detach() for name, b in f0.named_buffers()}
    theta = {name: p.clone().requires_grad_(True) for name, p in theta0.items()}
    opt = OPTIMIZERS[opt_name](split(theta))
    base = [group["lr"] for group in opt.param_groups]

    def taylor(x: Tensor) -> Tensor:
        delta = {name: theta[name] - theta0[name] for name in theta}
        primal, tangent = jvp(lambda p: functional_call(f0, (p, buffers), (x,)), (theta0,), (delta,))
        return primal + tangent

    for (x1, y1), (x2, y2), scale in steps:
        opt.zero_grad()
        (0.5 * loss_fn(taylor(x1), y1) + 0.5 * loss_fn(taylor(x2), y2)).backward()
        for group, lr in zip(opt.param_groups, base, strict=True):
            group["lr"] = lr * scale
        opt.step()
    return {name: t.detach() for name, t in theta.items()}


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_training_matches_reverse_over_forward_replay(kind: str, opt_name: str, loss: str) -> None:
    model = build(kind, seed=3)
    f0, user_opt, shadow, mirror = shadow_and_mirror(model, opt_name, loss)
    steps = steps_of(kind, loss, seed=5)
    train(mirror, user_opt, steps)
    expected = reference_replay(copy.deepcopy(f0), opt_name, loss, steps)

    x_test = batch(kind, 20, loss, torch.Generator().manual_seed(9))[0]
    with torch.no_grad():
        got = shadow(x_test)
        base = f0(x_test)
        primal, tangent = jvp(
            lambda p: functional_call(f0, (p, dict(f0.named_buffers())), (x_test,)),
            (dict(f0.named_parameters()),),
            ({k: expected[k] - p for k, p in f0.named_parameters()},),
        )
    moved = (primal + tangent - base).norm()
    assert moved > 1e-3 * base.norm()  # the 5 steps moved f_lin measurably
    # float32 on both sides; the forward is the same jvp, the gradients differ only by the order of
    # float32 sums (vjp vs backward through the tangent: ~1e-7 relative each, 0 for the MLP). Five
    # steps of Adam or momentum SGD keep that near 1e-7 of the change; a slip in a group's lr, its
    # weight decay, a moment's bias correction or the micro-batch scaling moves f_lin by 1e-2 of it
    # or more.
    # Measured: ≤ 2e-7 on the outputs, ≤ 1e-6 on θ' (one coordinate with a near-zero Adam
    # gradient can differ by ~1e-5 of its own tiny motion, hence no per-parameter bound).
    assert (got - (primal + tangent)).norm() <= 1e-5 * moved
    err = sum((shadow.trained_parameter(n).detach() - v).square().sum() for n, v in expected.items())
    motion = sum((v - f0.get_parameter(n)).square().sum() for n, v in expected.items())
    assert err.sqrt() <= 1e-5 * motion.sqrt()


# ---------------------------------------------------------------------------------------------
# at init, and one step against the kernel and the network
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_at_init_the_shadow_is_f0_exactly(kind: str) -> None:
    model = build(kind, seed=1)
    model.train()  # the live model in train mode: f_0 still runs its BatchNorm on running stats
    f0 = frozen_copy(model)
    shadow = LinearizedShadow.from_model(model, f0)
    x = batch(kind, 9, "mse", torch.Generator().manual_seed(2))[0]
    with torch.no_grad():
        expected = f0(x)
        assert torch.equal(shadow(x), expected)
        assert torch.equal(shadow(x, initial_outputs=expected), expected)
        wide = shadow(x, initial_outputs=expected.double(), dtype=torch.float64)
    assert wide.dtype == torch.float64 and torch.equal(wide, expected.double())


def test_one_sgd_step_moves_f_lin_by_the_initial_ntk() -> None:
    """Δf_lin(x) = −lr·Σ_g r_g·J_g(x)J_g(batch)ᵀ ∂L/∂f: empirical_ntk with param_weights r_g (C = 1, exact)."""
    gen = torch.Generator().manual_seed(4)
    model = build("mlp", seed=8, outputs=1, dtype=torch.float64)
    x, (xb, yb) = (
        torch.randn(7, 5, generator=gen, dtype=torch.float64),
        batch("mlp", 6, "mse", gen, c=1, dtype=torch.float64),
    )
    biases = [name for name, p in model.named_parameters() if p.dim() == 1]
    weights, bias_params = split(dict(model.named_parameters()))
    user_opt = torch.optim.SGD([{"params": weights}, {"params": bias_params, "lr": 0.05}], lr=0.2)
    theta = empirical_ntk(model, torch.cat([x, xb]), param_weights=dict.fromkeys(biases, 0.25))[:7, 7:]
    f0 = frozen_copy(model)
    shadow = LinearizedShadow.from_model(model, f0)
    mirror = LinearizedMirror(shadow, user_opt, resolve_loss("mse"), model=model)
    with torch.no_grad():
        g = loss_grad_wrt_f(f0(xb), yb, "mse")
        before = shadow(x)
    mirror.accumulate(xb, yb)
    mirror.step(lr=0.2)
    with torch.no_grad():
        moved = shadow(x) - before
    expected = -0.2 * theta @ g
    assert torch.allclose(moved, expected, rtol=1e-10, atol=1e-14 * expected.abs().max())


def test_tiny_step_matches_the_networks_own_first_step() -> None:
    """After one float64 SGD step of lr 1e-6, network and shadow moved alike up to O(lr)."""
    gen = torch.Generator().manual_seed(6)
    model = build("mlp", seed=2, dtype=torch.float64)
    x, (xb, yb) = (
        torch.randn(11, 5, generator=gen, dtype=torch.float64),
        batch("mlp", 8, "cross_entropy", gen, dtype=torch.float64),
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    f0 = frozen_copy(model)
    shadow = LinearizedShadow.from_model(model, f0)
    mirror = LinearizedMirror(shadow, opt, resolve_loss("cross_entropy"), model=model)
    with torch.no_grad():
        before = model(x)
    mirror.accumulate(xb, yb)
    mirror.step(lr=1e-6)
    nn.functional.cross_entropy(model(xb), yb).backward()
    opt.step()
    with torch.no_grad():
        d_net, d_lin = model(x) - before, shadow(x) - before
    # d_net = d_lin + O(lr²) curvature: the ratio is linear in lr (measured 4e-8 here, 4e-5 at lr 1e-3);
    # float64 round-off on Δf is ~1e-10 of it.
    assert (d_net - d_lin).norm() / d_net.norm() < 1e-6
    assert d_net.norm() > 0


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.5),
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5),
    ],
)
def test_weight_decay_acts_on_theta_prime_not_on_delta(make) -> None:
    """Zero loss gradient at init (targets f_0): only decay moves θ' — by lr·wd·θ_0, as it moves θ.

    Decay on δ = θ' − θ_0 (0 at init) would leave θ' at θ_0.
    """
    model = build("mlp", seed=7)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    opt = make(model.parameters())
    f0 = frozen_copy(model)
    shadow = LinearizedShadow.from_model(model, f0)
    mirror = LinearizedMirror(shadow, opt, resolve_loss("mse"), model=model)
    with torch.no_grad():
        y = f0(x)
    mirror.accumulate(x, y)
    mirror.step(lr=0.1)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()  # the network, from the same zero gradient
    for name, param in model.named_parameters():
        theta0 = f0.get_parameter(name)
        assert torch.equal(shadow.trained_parameter(name).detach(), param.detach()), name
        assert torch.allclose(param.detach(), theta0 * (1 - 0.1 * 0.5), rtol=1e-6), name
    with torch.no_grad():
        assert (shadow(x) - y).norm() > 1e-3 * y.norm()


# ---------------------------------------------------------------------------------------------
# the live model is untouched
# ---------------------------------------------------------------------------------------------


def test_live_model_is_untouched_by_building_and_training_the_shadow() -> None:
    model = build("cnn", seed=4)
    model[0].bias.requires_grad_(False)  # a frozen parameter: not linearised
    model.train()
    model[1].eval()  # a user's frozen BatchNorm inside a training model
    x, y = batch("cnn", 5, "cross_entropy", torch.Generator().manual_seed(3))
    nn.functional.cross_entropy(model(x), y).backward()  # grads the shadow must not touch
    trainable = [p for p in model.parameters() if p.requires_grad]
    user_opt = torch.optim.SGD(
        [{"params": trainable[:-1], "lr": 0.1}], lr=0.1, momentum=0.9
    )  # last: no group
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

    f0 = frozen_copy(model)
    shadow = LinearizedShadow.from_model(model, f0)
    mirror = LinearizedMirror(shadow, user_opt, resolve_loss("cross_entropy"), model=model)
    for _ in range(2):
        mirror.accumulate(x, y)
        mirror.step(lr=0.05)
    with torch.no_grad():
        shadow(x)

    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(
        (a is None and p.grad is None) or torch.equal(a, p.grad)
        for a, p in zip(grads, model.parameters(), strict=True)
    )
    assert flags == [p.requires_grad for p in model.parameters()]
    assert modes == [m.training for m in model.modules()]
    assert torch.equal(rng[0], torch.get_rng_state()) and rng[1] == random.getstate()
    assert np.array_equal(rng[2], np.random.get_state()[1])
    assert user_opt.param_groups[0]["lr"] == 0.1 and not user_opt.state
    assert "0.bias" not in shadow.parameter_names  # frozen: a constant of f_0
    last = next(name for name, p in model.named_parameters() if p is trainable[-1])
    assert torch.equal(shadow.trained_parameter(last).detach(), f0.get_parameter(last))  # in no group
    assert not torch.equal(shadow.trained_parameter("0.weight").detach(), f0.get_parameter("0.weight"))


def test_mirror_follows_group_lr_ratios_and_reduce_grad() -> None:
    model = build("mlp", seed=0)
    _f0, _user_opt, shadow, mirror = shadow_and_mirror(model, "sgd", "mse")
    assert mirror.exact and mirror.mirror_warning() is None
    x, y = batch("mlp", 4, "mse", torch.Generator().manual_seed(0))
    mirror.accumulate(x, y)
    seen = []
    mirror.step(lr=0.2, reduce_grad=lambda g: seen.append(g.shape) or 0 * g)
    assert [g["lr"] for g in mirror.optimizer.param_groups] == pytest.approx([0.2, 0.06])
    assert len(seen) == len(shadow.parameter_names)
    mirror.accumulate(x, y)
    with pytest.raises(ValueError, match="gradient's shape"):
        mirror.step(lr=0.2, reduce_grad=lambda g: g.reshape(-1)[:1])
    mirror.discard()
    with pytest.raises(RuntimeError, match="no accumulated gradient"):
        mirror.step(lr=0.2)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("own_initial", [True, False])
def test_resume_after_three_steps_is_bit_identical_to_five(own_initial: bool) -> None:
    kind, loss = "cnn", "cross_entropy"
    steps = steps_of(kind, loss, seed=2)
    x_test = batch(kind, 8, loss, torch.Generator().manual_seed(1))[0]
    model = build(kind, seed=11)
    _f0, user_opt, shadow, mirror = shadow_and_mirror(model, "adam", loss, own_initial=own_initial)
    train(mirror, user_opt, steps)
    with torch.no_grad():
        expected = shadow(x_test)

    model = build(kind, seed=11)
    _f0, user_opt, shadow, mirror = shadow_and_mirror(model, "adam", loss, own_initial=own_initial)
    train(mirror, user_opt, steps[:3])
    shadow_state, mirror_state = roundtrip(shadow.state_dict()), roundtrip(mirror.state_dict())
    assert any(k.startswith("initial_model.") for k in shadow_state) == own_initial

    if own_initial:  # f_0 comes back from the checkpoint: start from another init entirely
        fresh_model, fresh_f0 = build(kind, seed=99), frozen_copy(build(kind, seed=99))
    else:  # f_0 is restored by its owner (the paper's shadow)
        fresh_model, fresh_f0 = build(kind, seed=11), frozen_copy(build(kind, seed=11))
    fresh_opt = OPTIMIZERS["adam"](split(dict(fresh_model.named_parameters())))
    fresh = LinearizedShadow.from_model(fresh_model, fresh_f0, own_initial=own_initial)
    fresh_mirror = LinearizedMirror(fresh, fresh_opt, resolve_loss(loss), model=fresh_model)
    fresh.load_state_dict(shadow_state)
    fresh_mirror.load_state_dict(mirror_state)
    train(fresh_mirror, fresh_opt, steps[3:])
    with torch.no_grad():
        assert torch.equal(fresh(x_test), expected)


def test_state_dict_layout() -> None:
    model = build("mlp", seed=0)
    shadow = LinearizedShadow.from_model(model, frozen_copy(model))
    keys = set(shadow.state_dict())
    assert keys == {"_extra_state"} | {"theta." + n.replace(".", "__") for n, _ in model.named_parameters()}
    assert shadow.state_dict()["_extra_state"]["parameter_names"] == [n for n, _ in model.named_parameters()]
    assert not next(iter(shadow.initial_model.parameters())).requires_grad
    assert shadow.initial_model not in list(shadow.modules())


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------


def test_refuses_ids_and_bad_initial_outputs() -> None:
    model = build("mlp", seed=0)
    _f0, _user_opt, shadow, mirror = shadow_and_mirror(model, "sgd", "mse")
    x, y = batch("mlp", 4, "mse", torch.Generator().manual_seed(0))
    ids = torch.arange(4)
    with pytest.raises(ValueError, match="no per-example offsets"):
        shadow(x, ids)
    with pytest.raises(ValueError, match="without example ids"):
        mirror.accumulate(x, y, ids)
    with pytest.raises(ValueError, match="initial_outputs"):
        shadow(x, initial_outputs=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="frozen copy"):
        LinearizedShadow.from_model(model, model)


def test_refuses_a_state_of_another_architecture() -> None:
    model = build("mlp", seed=0)
    shadow = LinearizedShadow.from_model(model, frozen_copy(model))
    narrow = build("mlp", seed=0, width=8)  # same names, other shapes
    with pytest.raises(ValueError, match="other parameter shapes"):
        LinearizedShadow.from_model(narrow, frozen_copy(narrow)).load_state_dict(shadow.state_dict())
    renamed = nn.Sequential(nn.Identity(), *build("mlp", seed=0))  # other names
    with pytest.raises(ValueError, match="same model"):
        LinearizedShadow.from_model(renamed, frozen_copy(renamed)).load_state_dict(shadow.state_dict())


def test_refuses_closure_optimizers() -> None:
    model = build("mlp", seed=0)
    shadow = LinearizedShadow.from_model(model, frozen_copy(model))
    with pytest.raises(TypeError, match="closure"):
        LinearizedMirror(shadow, torch.optim.LBFGS(model.parameters()), resolve_loss("mse"), model=model)
