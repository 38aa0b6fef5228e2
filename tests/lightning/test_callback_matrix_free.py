"""The callback in matrix-free NTK mode against the same seeded run in dense mode.

The mode is forced only through the compute plan's kernel budget (``ComputePlan(kernel_budget=1)``),
so the two runs differ in nothing else; the dense run is the reference.
"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
from _lightning_setups import (
    Dashboard,
    Regressor,
    TwoLayerNet,
    loaders,
    make_trainer,
    sphere_data,
)
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor

from lin_probe import LinearRegimeMonitor
from lin_probe.monitor.budget import PROBE_SIZES
from lin_probe.plan import ComputePlan

# Lanczos certifies each norm to rtol = 1e-5; a ratio of two such norms is then good to ~2e-5.
LANCZOS_RATIO_RTOL = 2e-5


def test_default_probe_gets_dense_checks_and_memory_budget_does_not_switch_the_mode() -> None:
    # n_probe=None: the budget chooses among PROBE_SIZES (256 without a budget); all are dense
    assert inspect.signature(LinearRegimeMonitor).parameters["n_probe"].default is None
    default_n = max(PROBE_SIZES)
    assert default_n == 256 and ComputePlan().dense(default_n)
    # the callback's memory_budget bounds Jacobian blocks only; it does not switch the mode
    assert LinearRegimeMonitor(memory_budget=4096).config.plan.dense(default_n)
    with pytest.raises(ValueError, match="not both"):
        LinearRegimeMonitor(memory_budget=4096, compute_plan=ComputePlan())


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
    """A seeded tiny run; ``matrix_free`` forces the mode through the plan's kernel budget only."""
    x, y = sphere_data(N_TRAIN + N_VAL, D)
    train, val = loaders(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], 16)
    plan = ComputePlan(kernel_budget=1) if matrix_free else ComputePlan()
    monitor = LinearRegimeMonitor(
        n_probe=N_VAL, every_n_steps=4, log_spaced=False, center=center, compute_plan=plan
    )
    extra = callbacks or []
    trainer = make_trainer(
        log_dir, [monitor, *extra], name=name, max_steps=max_steps, enable_checkpointing=bool(extra)
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck|checkpoint).*")
        trainer.fit(Regressor(TwoLayerNet(D, WIDTH, seed=seed), LR), train, val, ckpt_path=ckpt_path)
    return monitor, Path(trainer.logger.log_dir)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[LinearRegimeMonitor, Path]:
    return _fit(tmp_path_factory.mktemp("dense"), "dense", matrix_free=False)


def test_matrix_free_run_matches_dense_run(
    dense_run: tuple[LinearRegimeMonitor, Path], tmp_path: Path
) -> None:
    dense, dense_dir = dense_run
    free, free_dir = _fit(tmp_path, "free", matrix_free=True)
    assert dense.core is not None and dense.core.reference.dense
    assert free.core is not None and not free.core.reference.dense
    acc_dense, acc_free = Dashboard(dense_dir), Dashboard(free_dir)
    # fit: the same normal equations from float32 products instead of a float32 matrix (~1e-7 relative)
    for key in ("fit_a", "fit_b", "fit_c"):
        got = acc_free.series(key)[0]
        assert got == pytest.approx(acc_dense.series(key)[0], rel=1e-5), key
    # Lanczos-based values: rtol 1e-5 per norm, float32 products; 1e-4 relative leaves a margin
    for key in ("fit_rel_error", "ntk_gap", "ntk_drift"):
        want, got = acc_dense.series(key), acc_free.series(key)
        assert set(got) == set(want), key
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-7), (key, step)
    assert set(acc_free.series("ntk_gap")) == {0, 4, 8}
    assert acc_free.series("ntk_drift")[8] > 1e-2, "the kernel must really move"
    # the functional side is untouched by the mode
    for r_dense, r_free in zip(dense.history, free.history, strict=True):
        assert r_free["functional_distance"] == pytest.approx(r_dense["functional_distance"], rel=1e-6)
    # no eigenvalue histogram, and no n × n Θ_0 in the checkpoint state, in matrix-free mode
    assert "lin_probe/ntk_spectrum" in acc_dense.main.Tags()["histograms"]
    assert "lin_probe/ntk_spectrum" not in acc_free.main.Tags()["histograms"]
    state = free.state_dict()["core"]
    assert state["ntk0"] is None
    assert state["ntk0_norm"] == pytest.approx(
        dense.state_dict()["core"]["ntk0_norm"], rel=LANCZOS_RATIO_RTOL
    )
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
