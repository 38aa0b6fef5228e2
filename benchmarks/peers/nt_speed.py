"""neural-tangents (STRUCTURED_DERIVATIVES) on the configurations of ``benchmarks/ntk_speed.py``.

Runs only in ``benchmarks/peers/.venv`` (``setup_venv.sh``: jax/jaxlib 0.4.23, neural-tangents
0.6.5). Same networks (stax, biases on via ``b_std``, NHWC inputs, float32, inputs ~ N(0, 1)), the empirical NTK
``nt.empirical_ntk_fn(..., trace_axes=(-1,), implementation=STRUCTURED_DERIVATIVES)`` under
``jax.jit``; the kernel is trace-averaged over outputs by dividing by ``C`` as lin_probe does
(NT's trace over the output axis is a sum). Each cell in a fresh subprocess: a warm-up call
(which also compiles), then the median of 3 steady-state calls; peak memory as in ntk_speed.py
(peak RSS minus RSS before the warm-up, so it includes XLA's compilation). The second conv uses
padding "SAME" with stride 2 (TF semantics: same output size as torch's padding=1, same cost).
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

CONFIGS = ("mlp", "cnn8", "cnn32")
PARAMS = {"mlp": 1_863_690, "cnn8": 9_930, "cnn32": 87_018}
SHAPES = {"mlp": (784,), "cnn8": (8, 8, 1), "cnn32": (32, 32, 3)}


def network(config: str):  # -> (init_fn, apply_fn)
    from neural_tangents import stax

    if config == "mlp":
        init_fn, apply_fn, _ = stax.serial(
            stax.Dense(1024, b_std=0.05),
            stax.Relu(),
            stax.Dense(1024, b_std=0.05),
            stax.Relu(),
            stax.Dense(10, b_std=0.05),
        )
    else:
        init_fn, apply_fn, _ = stax.serial(
            stax.Conv(16, (3, 3), padding="SAME", b_std=0.05),
            stax.Relu(),
            stax.Conv(32, (3, 3), strides=(2, 2), padding="SAME", b_std=0.05),
            stax.Relu(),
            stax.Flatten(),
            stax.Dense(10, b_std=0.05),
        )
    return init_fn, apply_fn


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(config: str, n: int, repeats: int) -> dict[str, object]:
    import jax
    import neural_tangents as nt

    init_fn, apply_fn = network(config)
    key_params, key_x = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(key_x, (n, *SHAPES[config]), dtype="float32")
    _, params = init_fn(key_params, x.shape)
    count = sum(p.size for p in jax.tree_util.tree_leaves(params))
    assert count == PARAMS[config], (count, PARAMS[config])
    kernel_fn = jax.jit(
        nt.empirical_ntk_fn(
            apply_fn,
            trace_axes=(-1,),
            vmap_axes=0,
            implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES,
        )
    )

    def call() -> None:
        (kernel_fn(x, None, params) / 10).block_until_ready()

    before = rss_bytes()
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"time": statistics.median(times), "runs": len(times), "peak": max(0, peak - before)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="n = 256 only, one timed call per cell")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument(
        "--sizes", nargs="+", type=int, default=None, help="default 256 1024 (256 with --quick)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per cell (subprocess killed)")
    parser.add_argument("--threads", type=int, default=None, help="1: single-threaded XLA CPU (XLA_FLAGS)")
    parser.add_argument("--worker", nargs=3, metavar=("CONFIG", "N", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        config, n, repeats = args.worker
        print(json.dumps(worker(config, int(n), int(repeats))))
        return
    sizes = args.sizes or ([256] if args.quick else [256, 1024])
    repeats = 1 if args.quick else 3
    env = dict(os.environ)
    if args.threads == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    import jax
    import neural_tangents

    threads = "1 thread" if args.threads == 1 else "default threads"
    print(
        f"neural-tangents {neural_tangents.__version__} STRUCTURED_DERIVATIVES "
        f"(jax {jax.__version__}, {threads}, float32)"
    )
    print(
        f"{'config':<7} {'params':>9} {'n':>5} {'method':<11} {'time s':>9} {'runs':>4} {'peak GB':>8} "
        f"{'time/base':>9} {'mem/base':>9}"
    )
    for config in args.configs:
        for n in sizes:
            lead = f"{config:<7} {PARAMS[config]:>9,} {n:>5} {'nt-struct':<11}"
            cmd = [sys.executable, __file__, "--worker", config, str(n), str(repeats)]
            try:
                done = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=args.timeout, check=False, env=env
                )
            except subprocess.TimeoutExpired:
                print(f"{lead} timeout (> {args.timeout:.0f} s)", flush=True)
                continue
            if done.returncode != 0:
                print(
                    f"{lead} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}",
                    flush=True,
                )
                continue
            cell = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"{lead} {cell['time']:>9.3f} {cell['runs']:>4} {cell['peak'] / 1e9:>8.3f} {'-':>9} {'-':>9}",
                flush=True,
            )


if __name__ == "__main__":
    main()
