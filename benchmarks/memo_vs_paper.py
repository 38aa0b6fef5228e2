"""Paper shadow vs memorizing shadow vs exact-Θ_0 kernel model, on the setting where n is a small multiple of d.

Two-layer ReLU net ``f(x) = m^{-1/2} vᵀ relu(Wx/√d)`` (both layers trained), inputs on the sphere
``‖x‖² = d``, targets ``sign(xᵀβ/√d)``, MSE, full-batch gradient descent at half the stability
edge (``lr = n / (2 λ_max(Θ_0(X_train)))``). The affine kernel is fitted on the held-out probe set,
as the callback does. Printed at each check, on held-out probe points:

- ``paper``: ``‖f_t − f_lin‖/‖f_t − f_0‖`` for the paper's shadow ``f_0 + ψB`` (kernel ``aK + b11ᵀ``);
- ``memo``: the same for the memorizing shadow (kernel ``aK + b11ᵀ + cI`` on training points);
- ``exact``: kernel gradient descent with the network's own Θ_0 on train ∪ probe (float64): what
  is left once the affine approximation is removed, i.e. the NTK's own movement;
- ``drift``: ``‖Θ_t − Θ_0‖₂/‖Θ_0‖₂`` on train ∪ probe (closed-form two-layer NTK).

Run: ``.venv/bin/python benchmarks/memo_vs_paper.py`` (defaults: d=256, n=512, width 4096, 2000 steps;
~25 min on 2 busy cores). ``--kernels-only`` skips the network and, in seconds, splits the memo
shadow's distance into the affine approximation and the finite-width noise of Θ_0.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lin_probe._model_state import frozen_copy
from lin_probe.kernel import fit_affine_kernel
from lin_probe.losses import resolve_loss
from lin_probe.shadows.linear import LinearShadow
from lin_probe.shadows.mirror import OptimizerMirror


class TwoLayer(nn.Module):
    """``m^{-1/2} vᵀ φ(Wx/√d)`` in the NTK parametrisation (the closed forms of lin_probe.kernel.closed_form)."""

    def __init__(self, d: int, width: int, generator: torch.Generator) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(width, d, generator=generator))
        self.v = nn.Parameter(torch.randn(width, generator=generator))

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.relu(x @ self.W.T / math.sqrt(x.shape[1]))
        return (hidden @ self.v / math.sqrt(self.W.shape[0]))[:, None]


def two_layer_ntk(model: TwoLayer, x: Tensor) -> Tensor:
    """Closed-form NTK of :class:`TwoLayer` (both layers), float64: ``(ΦΦᵀ + K ⊙ D v² Dᵀ)/m``."""
    W, v = model.W.detach().double(), model.v.detach().double()
    x = x.double()
    d, m = x.shape[1], W.shape[0]
    pre = x @ W.T / math.sqrt(d)
    phi, slope = F.relu(pre), (pre > 0).double()
    return (phi @ phi.T + (x @ x.T / d) * ((slope * v**2) @ slope.T)) / m


def sphere(n: int, d: int, generator: torch.Generator) -> Tensor:
    """Gaussian rows rescaled to ``‖x‖² = d`` (the closed forms' input assumption)."""
    x = torch.randn(n, d, generator=generator)
    return x * math.sqrt(d) / x.norm(dim=1, keepdim=True)


def rel(f: Tensor, g: Tensor, f0: Tensor) -> float:
    """``‖f − g‖ / ‖f − f_0‖``."""
    return float((f.double() - g.double()).norm() / (f.double() - f0.double()).norm())


def run(d: int, n: int, width: int, n_test: int, steps: int, checks: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x_train, x_test = sphere(n, d, gen), sphere(n_test, d, gen)
    beta = torch.randn(d, generator=gen)
    y_train = torch.sign(x_train @ beta / math.sqrt(d))[:, None]
    model = TwoLayer(d, width, gen)
    x_all = torch.cat([x_train, x_test])

    theta0 = two_layer_ntk(model, x_all)
    kernel = fit_affine_kernel(theta0[n:, n:], x_test)
    lam = float(torch.linalg.eigvalsh(theta0[:n, :n])[-1])
    lr = n / (2 * lam)
    print(
        f"d={d} n={n} width={width} n_test={n_test} steps={steps} lr={lr:.4g}  "
        f"fit a={kernel.a:.4f} b={kernel.b:.4f} c={kernel.c:.4f} rel_error={kernel.rel_error:.3f}"
    )

    mse = resolve_loss("mse")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    f0 = frozen_copy(model)  # one frozen f_0, shared by both shadows
    paper = LinearShadow.from_model(model, kernel, x_train, initial_model=f0)
    paper_trainer = OptimizerMirror(paper, opt, mse)
    memo = LinearShadow.from_model(model, kernel, x_train, initial_model=f0, offsets_capacity=n)
    memo_trainer = OptimizerMirror(memo, opt, mse)
    ids = torch.arange(n)

    with torch.no_grad():
        f0_all = model(x_all).double()
    f_exact = f0_all.clone()  # kernel GD with Θ_0 on train ∪ test, float64
    y64 = y_train.double()
    theta0_cols = theta0[:, :n]

    print(f"{'step':>6} {'paper':>8} {'memo':>8} {'exact':>8} {'drift':>8} {'train_loss':>10} {'s/step':>7}")
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = mse(model(x_train), y_train)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        paper_trainer.accumulate(x_train, y_train)
        paper_trainer.step(lr)
        memo_trainer.accumulate(x_train, y_train, ids)
        memo_trainer.step(lr)
        opt.step()
        grad_f = 2.0 * (f_exact[:n] - y64) / n  # ∂(mean squared error)/∂f
        f_exact = f_exact - lr * theta0_cols @ grad_f
        if step in checks:
            with torch.no_grad():
                f_test, f0_test = model(x_test), f0_all[n:]
                drift = float(torch.linalg.matrix_norm(two_layer_ntk(model, x_all) - theta0, ord=2))
                drift /= float(torch.linalg.matrix_norm(theta0, ord=2))
                print(
                    f"{step:>6} {rel(f_test, paper(x_test), f0_test):>8.4f} "
                    f"{rel(f_test, memo(x_test), f0_test):>8.4f} {rel(f_test, f_exact[n:], f0_test):>8.4f} "
                    f"{drift:>8.4f} {float(loss):>10.4f} {(time.perf_counter() - start) / step:>7.3f}",
                    flush=True,
                )


def relu_ntk_infinite_width(x: Tensor) -> Tensor:
    """The width → ∞ NTK of :class:`TwoLayer` for ReLU on ``‖x‖² = d`` (arc-cosine kernels), float64."""
    x = x.double()
    rho = (x @ x.T / x.shape[1]).clamp(-1.0, 1.0)
    angle = torch.arccos(rho)
    slope_slope = (math.pi - angle) / (2 * math.pi)  # E[φ'(u)φ'(v)]
    value_value = (torch.sin(angle) + (math.pi - angle) * torch.cos(angle)) / (2 * math.pi)  # E[φ(u)φ(v)]
    return rho * slope_slope + value_value


def kernel_gd(
    theta: Tensor, f0: Tensor, y: Tensor, n: int, lr: float, checks: list[int]
) -> dict[int, Tensor]:
    """Full-batch kernel gradient descent on the MSE with ``theta`` over train ∪ test; held-out outputs."""
    f, out = f0.clone(), {}
    for step in range(1, max(checks) + 1):
        f = f - lr * theta[:, :n] @ (2.0 * (f[:n] - y) / n)
        if step in checks:
            out[step] = f[n:]
    return out


def kernels_only(d: int, n: int, width: int, n_test: int, checks: list[int], seed: int) -> None:
    """Where the memo shadow's residual distance comes from, in function space only (seconds).

    Compares kernel GD with the affine kernel (= the memo shadow, exactly), with the network's own
    finite-width Θ_0 (≈ the network, see the main table) and with the infinite-width NTK: memo vs
    infinite width isolates the affine approximation, infinite width vs Θ_0 the finite-width noise.
    """
    gen = torch.Generator().manual_seed(seed)  # same draws as run()
    x_train, x_test = sphere(n, d, gen), sphere(n_test, d, gen)
    beta = torch.randn(d, generator=gen)
    y = torch.sign(x_train @ beta / math.sqrt(d))[:, None].double()
    model = TwoLayer(d, width, gen)
    x_all = torch.cat([x_train, x_test])
    theta0 = two_layer_ntk(model, x_all)
    kernel = fit_affine_kernel(theta0[n:, n:], x_test)
    lr = n / (2 * float(torch.linalg.eigvalsh(theta0[:n, :n])[-1]))
    with torch.no_grad():
        f0 = model(x_all).double()
    runs = {
        "theta0": kernel_gd(theta0, f0, y, n, lr, checks),
        "inf": kernel_gd(relu_ntk_infinite_width(x_all), f0, y, n, lr, checks),
        "memo": kernel_gd(kernel.matrix(x_all), f0, y, n, lr, checks),
    }
    pairs = [("memo", "theta0"), ("inf", "theta0"), ("memo", "inf")]
    print("kernel GD only, held-out ‖f_A − f_B‖/‖f_B − f_0‖:")
    print(f"{'step':>6} " + " ".join(f"{a + ' vs ' + b:>15}" for a, b in pairs))
    for step in checks:
        values = [rel(runs[b][step], runs[a][step], f0[n:]) for a, b in pairs]
        print(f"{step:>6} " + " ".join(f"{v:>15.4f}" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--n-test", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernels-only", action="store_true", help="function-space diagnosis only (seconds)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    checks = [c for c in (1, 10, 30, 100, 300, 1000, 2000, 5000) if c <= args.steps]
    if args.kernels_only:
        kernels_only(args.d, args.n, args.width, args.n_test, checks, args.seed)
    else:
        run(args.d, args.n, args.width, args.n_test, args.steps, checks, args.seed)


if __name__ == "__main__":
    main()
