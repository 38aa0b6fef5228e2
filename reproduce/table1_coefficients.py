"""Table 1: closed-form vs fitted ``(a, b, c)`` of the two-layer NTK, per activation and trained layer.

The net is the paper's ``m^{-1/2} Σ_r v_r φ(w_rᵀx/√d)`` (``examples/paper_two_layer.py``'s
``TwoLayerNet``) at width 8192, on n = 256 isotropic inputs on the sphere of radius √d, d = 128
(so ``s = tr(Σ²)/d² = 1/d``). Its empirical NTK at init is computed per layer with
``empirical_ntk(..., param_weights=...)`` (weight 0 drops a layer: the kernel of training only the
other one) and fitted with ``fit_affine_kernel``; the closed form is ``two_layer_coefficients``.
Prints a markdown table.

Run: ``python reproduce/table1_coefficients.py`` (``--fast``: width 1024, d = 32, n = 64).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the examples' models
from paper_two_layer import TwoLayerNet, sphere_task

from lin_probe import empirical_ntk, fit_affine_kernel, two_layer_coefficients

ACTIVATIONS = ("relu", "tanh", "gelu", "erf")
LAYERS = {"first": {"readout.weight": 0.0}, "second": {"hidden.weight": 0.0}}


def table(d: int, width: int, n: int, seed: int) -> tuple[list[dict[str, float | str]], float]:
    """One row per (activation, layer): closed and fitted a, b, c, and the fit's relative spectral error.

    Also returns the sample mean of ``v_r²`` (every activation uses the same seed, hence the same
    ``v``): the first-layer block is ``(1/m) Σ_r v_r² …``, so it scales with that mean.
    """
    x, _ = sphere_task(n, d, seed=seed)
    rows: list[dict[str, float | str]] = []
    v_sq = float("nan")
    for activation in ACTIVATIONS:
        torch.manual_seed(seed)
        net = TwoLayerNet(d, width, 1, activation)
        v_sq = float(net.readout.weight.detach().pow(2).mean())
        blocks = {layer: empirical_ntk(net, x, param_weights=w) for layer, w in LAYERS.items()}
        blocks["both"] = blocks["first"] + blocks["second"]
        for layer, theta in blocks.items():
            closed = two_layer_coefficients(activation, layer=layer, s=1.0 / d)
            fitted = fit_affine_kernel(theta, x)
            rows.append(
                {
                    "activation": activation,
                    "layer": layer,
                    **{f"{k}_closed": getattr(closed, k) for k in "abc"},
                    **{f"{k}_fitted": getattr(fitted, k) for k in "abc"},
                    "rel_error": float(fitted.rel_error or 0.0),
                }
            )
    return rows, v_sq


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: predictable on a shared machine)"
    )
    parser.add_argument("--fast", action="store_true", help="tiny settings (smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.fast:
        args.d, args.width, args.n = 32, 1024, 64
    start = time.perf_counter()
    rows, v_sq = table(args.d, args.width, args.n, args.seed)
    print(
        f"### Table 1 — two-layer NTK at init: closed form vs fit (d={args.d}, width={args.width}, n={args.n})"
    )
    print()
    print(
        "| φ | trained layer | a closed | a fitted | b closed | b fitted | c closed | c fitted | fit error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[f'{k}_{w}']:.4f}" for k in "abc" for w in ("closed", "fitted")]
        print(f"| {r['activation']} | {r['layer']} | " + " | ".join(cells) + f" | {r['rel_error']:.4f} |")
    print()
    for k in "abc":
        gaps = [
            abs(float(r[f"{k}_fitted"]) - float(r[f"{k}_closed"])) / float(r[f"{k}_closed"])
            for r in rows
            if float(r[f"{k}_closed"]) >= 0.01
        ]
        print(
            f"largest relative gap |fitted − closed| / closed in {k} (cells with closed ≥ 0.01): {max(gaps):.3f}"
        )
    print(f"sample mean of v_r² at this seed (scales every first-layer block): {v_sq:.4f}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
