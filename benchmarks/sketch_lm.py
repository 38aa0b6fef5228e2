"""The output-sketched NTK on a token-level language model: its cost at the monitor's probe sizes and its error.

Model: Lightning's demo ``Transformer`` (``pytorch_lightning.demos.transformer``: an encoder–decoder
``nn.Transformer``, ``ninp`` 200, 2 heads, feed-forward 200, 2 + 2 layers) with vocabulary 64 on
sequences of 16 random tokens, teacher-forced (the decoder reads the next tokens), in eval mode: its
outputs are the ``T·V = 1,024`` log-probabilities per sequence, the case ``outputs="auto"`` sketches.
``--ninp``/``--layers`` shrink it.

For each ``n`` the monitor's own start-up path is timed: ``choose_kernel_outputs("auto")`` picks the
projections ``S``, and ``NTKProbe.split_halves`` computes ``Θ_0`` as the kernels of the sketch's two
halves of directions (``method="auto"``, its timed choice included) and their split-half error
estimate, the figure the fit card states. On the first ``--exact-n`` examples the exact
trace-averaged kernel (every output) is computed too, and the sketch's true relative spectral error
on that block is printed beside the split-half estimate on the same block: how well the card's
figure tracks the truth. The exact kernel costs ``C`` backward passes per example, hence the
subsample.

Run: ``python benchmarks/sketch_lm.py`` (``--n 32 256``, ``--exact-n 16``, ``--threads N``). Timings
on a shared 2-core machine are noisy; say whether it was quiet.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
import warnings

import torch
from pytorch_lightning.demos.transformer import Transformer
from torch import Tensor, nn

from lin_probe.monitor.checks import NTKProbe
from lin_probe.monitor.outputs import choose_kernel_outputs
from lin_probe.ntk import empirical_ntk
from lin_probe.ntk.sketch import split_half_error
from lin_probe.plan import ComputePlan

VOCAB, LENGTH = 64, 16


class TeacherForcedLM(nn.Module):
    """``(n, 2, T)`` tokens (inputs, next tokens) → ``(n, T·V)`` log-probabilities: one tensor in, as the monitor's
    ``forward_fn`` would call Lightning's ``LightningTransformer``."""

    def __init__(self, ninp: int, layers: int) -> None:
        super().__init__()
        self.model = Transformer(vocab_size=VOCAB, ninp=ninp, nhid=ninp, nlayers=layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x[:, 0], x[:, 1]).reshape(x.shape[0], -1)


def rel_spectral(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.matrix_norm(a - b, ord=2) / torch.linalg.matrix_norm(b, ord=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", nargs="+", type=int, default=[32, 256])
    parser.add_argument("--exact-n", type=int, default=16, help="examples the exact kernel is computed on")
    parser.add_argument("--ninp", type=int, default=200)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = TeacherForcedLM(args.ninp, args.layers).eval()
    tokens = torch.randint(0, VOCAB, (max(args.n), LENGTH + 1), generator=torch.Generator().manual_seed(0))
    x = torch.stack([tokens[:, :-1], tokens[:, 1:]], dim=1)
    weights = {name: 1.0 for name, p in model.named_parameters() if p.requires_grad}
    params = sum(p.numel() for p in model.parameters())
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; demo Transformer ninp {args.ninp}, "
          f"{args.layers}+{args.layers} layers, {params:,} parameters, C = {LENGTH * VOCAB}")  # fmt: skip

    m = args.exact_n
    start = time.perf_counter()
    exact = empirical_ntk(model, x[:m]).detach()
    exact_s = time.perf_counter() - start
    print(f"exact kernel on {m} examples: {exact_s:.1f} s ({LENGTH * VOCAB} outputs)")
    print(f"{'n':>5} {'S':>4} {'sketch s':>9} {'method':>11} {'est. error':>10} | on first {m}: "
          f"{'true':>6} {'estimated':>9}")  # fmt: skip
    for n in args.n:
        rows = x[:n]
        outputs = choose_kernel_outputs("auto", model, rows, None)
        assert outputs.sketch is not None, "C = 1,024 outputs are sketched by outputs='auto'"
        halves = outputs.half_output_fns(None, model, rows)
        assert halves is not None
        probe = NTKProbe(rows, outputs.output_fn(None, model, rows), weights, ComputePlan())
        start = time.perf_counter()
        theta, (estimate, _) = probe.split_halves(model, halves)
        seconds = time.perf_counter() - start
        method = probe.method_choice.method.value if probe.method_choice else "?"
        block = theta.matrix[:m, :m]
        # The halves' blocks on the first m examples are the sketch's halves there (same directions).
        parts = [
            empirical_ntk(model, rows[:m], output_fn=half).detach() for half in halves
        ] if n > m else None  # fmt: skip
        block_estimate = estimate if parts is None else split_half_error(*parts)
        true = rel_spectral(block, exact) if n >= m else float("nan")
        print(f"{n:>5} {outputs.sketch.projections:>4} {seconds:>9.1f} {method:>11} {estimate:>10.3f} | "
              f"{'':>9}{true:>6.3f} {block_estimate:>9.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
