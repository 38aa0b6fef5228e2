"""Speed and peak memory of the empirical NTK: torch.func baseline vs lin_probe's paths.

Configurations (float32, inputs ~ N(0, 1)):

* ``mlp``   784→1024→1024→10, ReLU, biases (1,863,690 parameters);
* ``cnn8``  8×8×1 input: Conv(16, 3×3, same) → ReLU → Conv(32, 3×3, stride 2, pad 1) → ReLU →
  Flatten → Linear(10) (9,930 parameters);
* ``cnn32`` the same CNN on 32×32×3 inputs (87,018 parameters);
* ``resnet_bn``, ``transformer``, ``lstm``, ``digits_mlp``: the networks of ``benchmarks/zoo.py`` (a
  BatchNorm ResNet with global average pooling on 32×32×3, a token Transformer encoder, a token LSTM
  classifier and the digits MLP, 10 outputs each), on their own inputs (synthetic, or scikit-learn's
  digits), in eval mode (as the monitor measures).

(torch refuses ``padding="same"`` with stride 2; ``padding=1`` gives TF's "SAME" output size and
the same cost, shifted by one pixel.)

Methods: ``baseline`` the torch.func Jacobian contraction (``vmap(jacrev)`` over all examples, then
``einsum`` of the full Jacobians, as in the torch.func NTK tutorial); ``ntvp`` the tutorial's other
method, NTK-vector products (``vjp`` then ``jvp`` per output basis vector, vmapped over pairs of
examples); ``auto``, ``generic`` and ``structured``: ``empirical_ntk(method=...)`` (``auto`` rows say
which method its cost model chose, ``chose structured`` / ``chose generic``); ``auto`` makes its
timed choice in the warm-up call and remembers it, so its timed calls are what every later call of
a process costs, while ``auto_first`` forgets the choice (and the matmul rate) before each call:
what the first call costs, its timed probe included; ``spectral``: the matrix-free ``spectral_norm(ntk_matvec(...), n)`` (Lanczos, no kernel
formed).

Each cell runs in a fresh subprocess: one warm-up call, then the median of 3 timed calls (1 if the
warm-up took longer than ``--slow-after`` seconds). With ``--interleaved ROUNDS`` every method of
one configuration and size runs in one subprocess instead, in turn, after a warm-up call each, and
the median of ``ROUNDS`` rounds is reported: the machine's drift then hits every method alike, so
the ratios hold better (peak memory is not measured there). *Peak memory* is the child's peak resident set
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) minus its resident set right before the warm-up
(torch imported, model and inputs built): the extra memory the computation needed at its worst,
as the OS saw it; with ``--device cuda`` it is the device's peak allocated memory above what was
allocated before the warm-up (``torch.cuda.max_memory_allocated``), and every timed call ends with a
synchronisation. A baseline whose full Jacobian (``n·C·P·4`` bytes) exceeds ``--max-baseline-gb``
is not run. Timings on a shared 2-core machine are noisy; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo

ZOO = ("resnet_bn", "transformer", "lstm", "digits_mlp")
CONFIGS = ("mlp", "cnn8", "cnn32", *ZOO)
METHODS = ("baseline", "ntvp", "auto", "auto_first", "generic", "structured", "spectral")
AUTO_METHODS = ("auto", "auto_first")
"""Methods whose cells say which concrete method ``method="auto"`` picked."""
INPUT_SHAPES = {"mlp": (784,), "cnn8": (1, 8, 8), "cnn32": (3, 32, 32)}


def inputs(config: str, n: int) -> Tensor:
    """``n`` seeded inputs of the config (token ids for the sequence models)."""
    if config in ZOO:
        return zoo.MODELS[config][1](n)[0]
    return torch.randn(n, *INPUT_SHAPES[config], generator=torch.Generator().manual_seed(1))


def build(config: str) -> nn.Module:
    """The benchmark network (seeded locally, float32)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    if config in ZOO:
        model: nn.Module = zoo.MODELS[config][0]().eval()
    elif config == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )
    else:
        channels, side = INPUT_SHAPES[config][0], INPUT_SHAPES[config][1]
        model = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding="same"),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * (side // 2) ** 2, 10),
        )
    torch.random.set_rng_state(generator_state)
    return model


def baseline_ntk(model: nn.Module, x: Tensor) -> Tensor:
    """torch.func tutorial NTK: full per-example Jacobians, then a contraction, trace-averaged."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), (None, 0))(params, x)
    flat = [j.flatten(2) for j in jac.values()]
    theta = sum(torch.einsum("iap,jap->ij", a, a) for a in flat)
    return theta / flat[0].shape[1]


def ntvp_ntk(model: nn.Module, x: Tensor) -> Tensor:
    """torch.func tutorial NTK by NTK-vector products: for each pair, ``J_j (J_iᵀ e_c)`` for every output ``c``."""
    from torch.func import functional_call, jvp, vjp, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    def pair(x1: Tensor, x2: Tensor) -> Tensor:
        out, pull = vjp(lambda p: f(p, x1), params)
        basis = torch.eye(out.numel(), dtype=out.dtype, device=out.device)
        trace = vmap(lambda v: jvp(lambda p: f(p, x2), (params,), pull(v))[1])(basis).diagonal().sum()
        return trace / out.numel()

    return vmap(vmap(pair, (None, 0)), (0, None))(x, x)


def runner(method: str, model: nn.Module, x: Tensor) -> Callable[[], object]:
    from lin_probe.linalg.spectral import spectral_norm
    from lin_probe.ntk import empirical_ntk, ntk_matvec

    if method == "baseline":
        return lambda: baseline_ntk(model, x)
    if method == "ntvp":
        return lambda: ntvp_ntk(model, x)
    if method in ("auto", "generic", "structured"):
        return lambda: empirical_ntk(model, x, method=method)
    if method == "auto_first":
        from lin_probe.ntk import choice

        def first_call() -> object:  # as a process's first call: nothing remembered or cached
            choice.forget_choices()
            choice.matmul_rate.cache_clear()
            return empirical_ntk(model, x, method="auto")

        return first_call
    return lambda: spectral_norm(ntk_matvec(model, x), x.shape[0], op_dtype=torch.float32)


def record_choices() -> list[str]:
    """The concrete method each ``method="auto"`` call of this process picks (the cost model's choice)."""
    from lin_probe.ntk import choice

    chosen: list[str] = []
    original = choice.choose_prepared

    def spy(*args: object, **kwargs: object) -> choice.MethodChoice:
        result = original(*args, **kwargs)  # type: ignore[arg-type]
        chosen.append(result.method.value)
        return result

    choice.choose_prepared = spy  # type: ignore[assignment]
    return chosen


def chose(chosen: list[str]) -> str:
    """The ``chose …`` label of a cell: every concrete method its ``auto`` calls picked."""
    return "/".join(sorted(set(chosen)))


def rss_bytes() -> int:
    """Current resident set of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def synchronized(call: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``call``, returning only once the device has finished its work (so a timing covers it)."""
    if device.type != "cuda":
        return call

    def run() -> object:
        result = call()
        torch.cuda.synchronize(device)
        return result

    return run


def memory_bytes(device: torch.device) -> int:
    """What the peak is measured above: the resident set, or the device's allocated bytes (peak reset)."""
    if device.type != "cuda":
        return rss_bytes()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return torch.cuda.max_memory_allocated(device)


def worker(
    config: str, n: int, method: str, slow_after: float, threads: int | None, device: torch.device
) -> dict[str, object]:
    """One cell, in this (fresh) process: warm-up, timed calls, peak memory above the pre-run baseline."""
    if threads:
        torch.set_num_threads(threads)
    model = build(config).to(device)
    x = inputs(config, n).to(device)
    call = synchronized(runner(method, model, x), device)
    chosen = record_choices() if method in AUTO_METHODS else []
    before = memory_bytes(device)
    start = time.perf_counter()
    call()
    warm = time.perf_counter() - start
    times = []
    for _ in range(1 if warm > slow_after else 3):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    peak = peak_bytes(device)
    cell: dict[str, object] = {
        "time": statistics.median(times),
        "runs": len(times),
        "peak": max(0, peak - before),
    }
    if chosen:
        cell["chose"] = chose(chosen)
    return cell


def interleaved_worker(
    config: str, n: int, methods: list[str], rounds: int, threads: int | None, device: torch.device
) -> dict[str, dict[str, object]]:
    """All ``methods`` of one cell in this process, in turn: a warm-up each, then ``rounds`` rounds
    of one call each; per method the median. Drift of the machine's speed hits every method alike."""
    if threads:
        torch.set_num_threads(threads)
    model = build(config).to(device)
    x = inputs(config, n).to(device)
    chosen = record_choices() if set(AUTO_METHODS) & set(methods) else []
    calls = {method: synchronized(runner(method, model, x), device) for method in methods}
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {method: [] for method in methods}
    for _ in range(rounds):
        for method, call in calls.items():
            start = time.perf_counter()
            call()
            times[method].append(time.perf_counter() - start)
    cells: dict[str, dict[str, object]] = {}
    for method in methods:
        cells[method] = {"time": statistics.median(times[method]), "runs": rounds}
        if method in AUTO_METHODS and chosen:
            cells[method]["chose"] = chose(chosen)
    return cells


def baseline_bytes(config: str, n: int) -> int:
    """The full Jacobian the baseline holds: ``n·C·P`` float32 numbers."""
    params = sum(p.numel() for p in build(config).parameters())
    return n * 10 * params * 4


def too_big(config: str, n: int, method: str, args: argparse.Namespace) -> str | None:
    """The note for a baseline whose full Jacobian exceeds ``--max-baseline-gb`` (it is not run)."""
    if method == "baseline" and baseline_bytes(config, n) > args.max_baseline_gb * 1e9:
        return f"out of memory (needs {baseline_bytes(config, n) / 1e9:.1f} GB)"
    return None


def run_child(cmd: list[str], args: argparse.Namespace) -> tuple[object, str | None]:
    """``cmd`` (a worker of this script) in a subprocess: its last printed JSON line, or ``None`` and a
    note on its timeout or crash (reported, not raised)."""
    if args.threads:
        cmd = [*cmd, "--threads", str(args.threads)]
    cmd = [*cmd, "--device", args.device]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"timeout (> {args.timeout:.0f} s)"
    if done.returncode != 0:
        return None, f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
    return json.loads(done.stdout.strip().splitlines()[-1]), None


def measure(config: str, n: int, method: str, args: argparse.Namespace) -> dict[str, object]:
    """Run one cell in a subprocess; a timeout or crash is reported, not raised."""
    note = too_big(config, n, method, args)
    if note is not None:
        return {"note": note}
    cmd = [sys.executable, __file__, "--worker", config, str(n), method, "--slow-after", str(args.slow_after)]
    cell, note = run_child(cmd, args)
    return {"note": note} if note is not None else cell  # type: ignore[return-value]


def measure_interleaved(config: str, n: int, args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """:func:`interleaved_worker` in a subprocess (a baseline too big for ``--max-baseline-gb`` left
    out, as :func:`measure` leaves it); a timeout or crash is reported for every method it ran."""
    cells: dict[str, dict[str, object]] = {}
    for method in args.methods:
        note = too_big(config, n, method, args)
        if note is not None:
            cells[method] = {"note": note}
    methods = [method for method in args.methods if method not in cells]
    if methods:
        cmd = [sys.executable, __file__, "--interleaved-worker", config, str(n), ",".join(methods)]
        timed, note = run_child([*cmd, "--interleaved", str(args.interleaved)], args)
        cells.update({m: {"note": note} for m in methods} if note is not None else timed)  # type: ignore[arg-type]
    return cells


def params_of(config: str) -> int:
    return sum(p.numel() for p in build(config).parameters())


HEADER = (
    f"{'config':<7} {'params':>9} {'n':>5} {'method':<11} {'time s':>9} {'runs':>4} {'peak GB':>8} "
    f"{'time/base':>9} {'mem/base':>9}"
)


def format_row(config: str, n: int, method: str, cell: dict[str, object], base: dict[str, object]) -> str:
    """One table line; ratios are to the baseline cell of the same config and n (``-`` if it did not run)."""
    lead = f"{config:<7} {params_of(config):>9,} {n:>5} {method:<11}"
    if "time" not in cell:
        return f"{lead} {cell['note']}"
    t_ratio = f"{cell['time'] / base['time']:.4f}" if "time" in base else "-"
    m_ratio = f"{cell['peak'] / max(1, base['peak']):.4f}" if "peak" in base and "peak" in cell else "-"
    peak = f"{cell['peak'] / 1e9:>8.3f}" if "peak" in cell else f"{'-':>8}"
    chose = f"  chose {cell['chose']}" if "chose" in cell else ""
    return f"{lead} {cell['time']:>9.3f} {cell['runs']:>4} {peak} {t_ratio:>9} {m_ratio:>9}{chose}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="n = 256 only, one timed call per cell")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--sizes", nargs="+", type=int, default=None, help="default 256 1024 (256 with --quick)"
    )
    parser.add_argument("--max-baseline-gb", type=float, default=8.0, help="skip larger baseline Jacobians")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per cell (subprocess killed)")
    parser.add_argument("--slow-after", type=float, default=15.0, help="warm-up seconds above which 1 run")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each cell")
    parser.add_argument("--device", default="cpu", help="where the model and inputs live (cpu, cuda)")
    parser.add_argument(
        "--interleaved",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="time every method of a cell in one process, in turn, ROUNDS rounds (medians; no peak memory)",
    )
    parser.add_argument("--worker", nargs=3, metavar=("CONFIG", "N", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--interleaved-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        config, n, method = args.worker
        print(
            json.dumps(
                worker(config, int(n), method, args.slow_after, args.threads, torch.device(args.device))
            )
        )
        return
    if args.interleaved_worker:
        config, n, methods = args.interleaved_worker
        cells = interleaved_worker(
            config, int(n), methods.split(","), args.interleaved, args.threads, torch.device(args.device)
        )
        print(json.dumps(cells))
        return
    if args.quick:
        args.slow_after = 0.0  # one timed call after the warm-up
    sizes = args.sizes or ([256] if args.quick else [256, 1024])
    threads = args.threads or torch.get_num_threads()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{threads} CPU threads"
    print(f"lin_probe NTK benchmark (torch {torch.__version__}, {device}, float32)")
    print(HEADER, flush=True)
    for config in args.configs:
        for n in sizes:
            if args.interleaved:
                cells = measure_interleaved(config, n, args)
                for method in args.methods:
                    print(format_row(config, n, method, cells[method], cells.get("baseline", {})), flush=True)
                continue
            base: dict[str, object] = {}
            for method in args.methods:
                cell = measure(config, n, method, args)
                base = cell if method == "baseline" else base
                print(format_row(config, n, method, cell, base), flush=True)


if __name__ == "__main__":
    main()
