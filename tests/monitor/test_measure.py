"""Matrix-free NTK checks: the affine fit from products only, and a callback run that never builds n × n.

References are independent of the matrix-free code: the dense fit (``fit_affine_kernel`` on the
materialised matrix), scipy's bounded least squares and numpy's exact 2-norm for the synthetic
operators, and a dense-mode run of the same seeded training for the callback.
"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from _lightning_setups import (
    Regressor,
    TwoLayerNet,
    loaders,
    make_trainer,
    read_events,
    scalar_series,
    sphere_data,
)
from pytorch_lightning.callbacks import ModelCheckpoint
from scipy import optimize
from torch import Tensor

from lin_probe.kernel import AffineKernel, fit_affine_kernel, fit_affine_kernel_matrix_free
from lin_probe.lightning.callback import LinearRegimeMonitor
from lin_probe.monitor import measure
from lin_probe.monitor.measure import ProbeMeasurer, ntk_mode
from lin_probe.monitor.probe import ProbeSet

# Lanczos certifies each norm to rtol = 1e-5; a ratio of two such norms is then good to ~2e-5.
LANCZOS_RATIO_RTOL = 2e-5

# ---------------------------------------------------------------------------------------------
# The fit, on exact float64 operators
# ---------------------------------------------------------------------------------------------


def _sym_noise(n: int, scale: float, gen: torch.Generator) -> Tensor:
    e = torch.randn(n, n, generator=gen, dtype=torch.float64) * scale
    return (e + e.T) / 2


def _psd_noise(n: int, scale: float, gen: torch.Generator) -> Tensor:
    j = torch.randn(n, 3 * n, generator=gen, dtype=torch.float64)
    return scale * j @ j.T / (3 * n)


def _design(x: Tensor) -> np.ndarray:
    """Columns vec(K), vec(11ᵀ), vec(I), in numpy."""
    xf = x.reshape(x.shape[0], -1).numpy()
    n, d = xf.shape
    return np.stack([(xf @ xf.T / d).ravel(), np.ones(n * n), np.eye(n).ravel()], axis=1)


def _case(name: str) -> tuple[Tensor, Tensor]:
    """(Θ, X): a PSD near-affine kernel; ones whose unconstrained b or a is negative; rank-deficient X."""
    gen = torch.Generator().manual_seed(11)
    n = 40
    if name == "rank-deficient":  # d > n and two all-zero features: rank(X) = n - 0 < d, SVD drops the rest
        x = torch.randn(n, 60, generator=gen, dtype=torch.float64)
        x[:, :2] = 0.0
    else:
        x = torch.randn(n, 3, 4, generator=gen, dtype=torch.float64)
    coef = {"feasible": (0.7, 0.3, 0.2), "b-clamped": (0.8, -0.4, 0.3), "a-clamped": (-0.5, 0.3, 0.6)}
    a, b, c = coef.get(name, (1.1, 0.2, 0.4))
    theta = AffineKernel(a, b, c).matrix(x)
    noise = _psd_noise(n, 0.05, gen) if name in ("feasible", "rank-deficient") else _sym_noise(n, 0.01, gen)
    return theta + noise, x


@pytest.mark.parametrize("name", ["feasible", "b-clamped", "a-clamped", "rank-deficient"])
def test_matrix_free_fit_equals_dense_fit(name: str) -> None:
    theta, x = _case(name)
    dense = fit_affine_kernel(theta, x)
    calls = 0

    def matvec(u: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return theta @ u

    free = fit_affine_kernel_matrix_free(matvec, x, trace=float(theta.trace()))
    # Same normal equations and the same active-set solve, in float64: only the summation order
    # of the inner products differs (~1e-14 relative), amplified by the mildly conditioned 3×3 Gram.
    np.testing.assert_allclose((free.a, free.b, free.c), (dense.a, dense.b, dense.c), rtol=1e-9, atol=1e-12)
    # Independent: scipy's bounded least squares over all n² entries (converges to ~1e-8).
    ref = optimize.lsq_linear(
        _design(x), theta.numpy().ravel(), bounds=([0, 0, -np.inf], [np.inf] * 3), tol=1e-14
    ).x
    np.testing.assert_allclose((free.a, free.b, free.c), ref, rtol=1e-6, atol=1e-8)
    if name.endswith("clamped"):
        assert getattr(free, name[0]) == 0.0
    # rel_error: numerator and denominator are Lanczos norms, each certified to rtol = 1e-5.
    fitted = AffineKernel(free.a, free.b, free.c).matrix(x).numpy()
    exact = np.linalg.norm(theta.numpy() - fitted, 2) / np.linalg.norm(theta.numpy(), 2)
    assert free.rel_error == pytest.approx(exact, rel=LANCZOS_RATIO_RTOL)
    assert free.rel_error > 1e-3  # the noise is really there
    rank = int(np.linalg.matrix_rank(x.reshape(len(x), -1).numpy()))
    # ⟨Θ, K⟩ needs rank(X) products and 1ᵀΘ1 one; the rest are the two Lanczos runs (≤ n each).
    assert calls <= rank + 1 + 2 * len(x)


def test_affine_matvec_equals_matrix() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 7, generator=gen, dtype=torch.float64)
    kernel = AffineKernel(0.9, 0.35, 0.15)
    u = torch.randn(30, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(kernel.matvec(x)(u), kernel.matrix(x) @ u, rtol=1e-12, atol=1e-12)


def test_matrix_free_fit_bad_input() -> None:
    x = torch.randn(10, 4, dtype=torch.float64)
    theta = AffineKernel(1.0, 0.5, 0.2).matrix(x)
    with pytest.raises(ValueError, match="identically zero"):
        fit_affine_kernel_matrix_free(lambda u: 0 * u, x, trace=0.0)
    with pytest.raises(ValueError, match="shape"):
        fit_affine_kernel_matrix_free(lambda u: u[:-1], x, trace=float(theta.trace()))
    with pytest.raises(ValueError, match="at least 2"):
        fit_affine_kernel_matrix_free(lambda u: u, x[:1], trace=1.0)


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------


def test_rule_picks_dense_for_the_default_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    default_n = inspect.signature(LinearRegimeMonitor).parameters["n_probe"].default
    assert default_n == 256 and ntk_mode(default_n) == "dense"
    assert ntk_mode(4096) == "dense" and ntk_mode(4097) == "matrix_free"  # default 1 GiB budget
    # dense needs 2 float64 n×n copies in a quarter of the budget: 64·n² bytes
    monkeypatch.setattr(measure, "DENSE_KERNEL_BUDGET_BYTES", 64 * 32**2)
    assert ntk_mode(32) == "dense" and ntk_mode(33) == "matrix_free"
    # the callback's memory_budget bounds Jacobian blocks only; it does not switch the mode
    monkeypatch.setattr(measure, "DENSE_KERNEL_BUDGET_BYTES", None)
    probe = ProbeSet(torch.randn(32, 4), None, "argument")
    assert ProbeMeasurer(probe, lambda p, t: p.sum(), classification=False, memory_budget=4096).dense


# ---------------------------------------------------------------------------------------------
# The callback in matrix-free mode vs the same run in dense mode
# ---------------------------------------------------------------------------------------------

D, N_TRAIN, N_VAL, WIDTH, LR, STEPS = 8, 32, 16, 32, 1.0, 8


def _fit(
    log_dir: Path,
    name: str,
    *,
    matrix_free: bool,
    center: bool = True,
    seed: int = 0,
    callbacks: list[pl.Callback] | None = None,
    ckpt_path: str | None = None,
    max_steps: int = STEPS,
) -> tuple[LinearRegimeMonitor, Path]:
    """A seeded tiny run; ``matrix_free`` forces the mode through the decision budget only."""
    x, y = sphere_data(N_TRAIN + N_VAL, D)
    train, val = loaders(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], 16)
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, log_spaced=False, center=center)
    extra = callbacks or []
    previous = measure.DENSE_KERNEL_BUDGET_BYTES
    measure.DENSE_KERNEL_BUDGET_BYTES = 1 if matrix_free else None
    try:
        trainer = make_trainer(
            log_dir, [monitor, *extra], name=name, max_steps=max_steps, enable_checkpointing=bool(extra)
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck|checkpoint).*")
            trainer.fit(Regressor(TwoLayerNet(D, WIDTH, seed=seed), LR), train, val, ckpt_path=ckpt_path)
    finally:
        measure.DENSE_KERNEL_BUDGET_BYTES = previous
    return monitor, Path(trainer.logger.log_dir)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[LinearRegimeMonitor, Path]:
    return _fit(tmp_path_factory.mktemp("dense"), "dense", matrix_free=False)


def test_matrix_free_run_matches_dense_run(
    dense_run: tuple[LinearRegimeMonitor, Path], tmp_path: Path
) -> None:
    dense, dense_dir = dense_run
    free, free_dir = _fit(tmp_path, "free", matrix_free=True)
    assert dense._initial is not None and dense._initial.dense
    assert free._initial is not None and not free._initial.dense
    acc_dense, acc_free = read_events(dense_dir), read_events(free_dir)
    # fit: the same normal equations from float32 products instead of a float32 matrix (~1e-7 relative)
    for key in ("fit_a", "fit_b", "fit_c"):
        got = scalar_series(acc_free, f"lin_probe/{key}")[0]
        assert got == pytest.approx(scalar_series(acc_dense, f"lin_probe/{key}")[0], rel=1e-5), key
    # Lanczos-based values: rtol 1e-5 per norm, float32 products; 1e-4 relative leaves a margin
    for key in ("fit_rel_error", "ntk_gap", "ntk_drift"):
        want, got = scalar_series(acc_dense, f"lin_probe/{key}"), scalar_series(acc_free, f"lin_probe/{key}")
        assert set(got) == set(want), key
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-7), (key, step)
    assert set(scalar_series(acc_free, "lin_probe/ntk_gap")) == {0, 4, 8}
    assert scalar_series(acc_free, "lin_probe/ntk_drift")[8] > 1e-2, "the kernel must really move"
    # the functional side is untouched by the mode
    for r_dense, r_free in zip(dense.history, free.history, strict=True):
        assert r_free["functional_distance"] == pytest.approx(r_dense["functional_distance"], rel=1e-6)
    # no eigenvalue histogram, and no n × n Θ_0 in the checkpoint state, in matrix-free mode
    assert "lin_probe/ntk_eigenvalues" in acc_dense.Tags()["histograms"]
    assert "lin_probe/ntk_eigenvalues" not in acc_free.Tags()["histograms"]
    state = free.state_dict()
    assert state["ntk0"] is None
    assert state["ntk0_norm"] == pytest.approx(dense.state_dict()["ntk0_norm"], rel=LANCZOS_RATIO_RTOL)
    assert not any(isinstance(v, Tensor) and v.shape == (N_VAL, N_VAL) for v in state.values())


def test_matrix_free_without_f0_reports_nan_drift_and_warns_once(
    dense_run: tuple[LinearRegimeMonitor, Path], tmp_path: Path
) -> None:
    dense, _ = dense_run
    with pytest.warns(UserWarning, match="ntk_drift") as record:
        free, _ = _fit(tmp_path, "nof0", matrix_free=True, center=False)
    assert sum("ntk_drift` is NaN" in str(w.message) for w in record) == 1
    ntk_records = [r for r in free.history if "ntk_gap" in r]
    assert len(ntk_records) == 3 and all(math.isnan(r["ntk_drift"]) for r in ntk_records)
    want = {r["step"]: r["ntk_gap"] for r in dense.history if "ntk_gap" in r}  # the gap does not involve f_0
    for r in ntk_records:
        assert r["ntk_gap"] == pytest.approx(want[r["step"]], rel=1e-4)


def test_matrix_free_resume_takes_theta0_from_the_restored_f0(
    dense_run: tuple[LinearRegimeMonitor, Path], tmp_path: Path
) -> None:
    dense, _ = dense_run
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    _fit(tmp_path, "first-half", matrix_free=True, callbacks=[ckpt], max_steps=4)
    path = next(p for p in (tmp_path / "ckpt").iterdir() if "step=4" in p.name)
    # a differently initialised model: Θ_0 must come from the checkpointed f_0, not from this init
    resumed, _ = _fit(tmp_path, "resumed", matrix_free=True, seed=99, ckpt_path=str(path))
    after = {r["step"]: r for r in resumed.history}
    assert 8 in after
    for r in dense.history:  # the dense run of the same seed is the reference
        if r["step"] > 4 and "ntk_drift" in r:
            assert after[r["step"]]["ntk_drift"] == pytest.approx(r["ntk_drift"], rel=1e-4)
            assert after[r["step"]]["ntk_gap"] == pytest.approx(r["ntk_gap"], rel=1e-4)
