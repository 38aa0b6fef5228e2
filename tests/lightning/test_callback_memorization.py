"""``LinearRegimeMonitor(memorization=True)``: the shadow with the ``c·I`` term, in real Trainer fits.

The math of the memorizing shadow is checked against kernel-gradient-descent replays in
``test_memo.py``; here: it is driven correctly by the callback (logged, resumed, identity modes
agree) and it shows the effect it exists for (n = 2d, wide net: it stays closer than the paper's).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _lightning_setups import Dashboard, Regressor, TwoLayerNet, make_trainer, sphere_data
from torch.utils.data import DataLoader, TensorDataset

from lin_probe.data import WithIndex
from lin_probe.lightning.callback import LinearRegimeMonitor

D, N_TRAIN, N_VAL = 32, 64, 64  # n = 2d: the regime where the missing c·I term matters


def _fit(
    tmp_path: Path,
    monitor: LinearRegimeMonitor,
    *,
    with_index: bool,
    name: str,
    steps: int = 60,
    width: int = 4096,
    lr: float = 1.0,
    batch_size: int = N_TRAIN,
):
    x, y = sphere_data(N_TRAIN + N_VAL, D, seed=3)
    y = torch.sign(x[:, :1] + 0.5 * x[:, 1:2])  # a target a linear model on inputs cannot fit exactly
    train_set = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    if with_index:
        train_set = WithIndex(train_set)
    train = DataLoader(train_set, batch_size=batch_size)
    val = DataLoader(TensorDataset(x[N_TRAIN:], y[N_TRAIN:]), batch_size=N_VAL)
    trainer = make_trainer(tmp_path, [monitor], name=name, max_steps=steps)
    trainer.fit(Regressor(TwoLayerNet(D, width, seed=1), lr), train, val)
    return trainer


@pytest.mark.slow
def test_memo_shadow_stays_closer_than_the_papers_on_held_out_points(tmp_path: Path) -> None:
    monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=10, memorization=True, tolerance=0.1)
    # width 16384: at 4096 the finite-width noise of Θ_0 alone puts both shadows near 0.1 by step 16
    trainer = _fit(tmp_path, monitor, with_index=True, name="memo", steps=150, width=16384)
    dashboard = Dashboard(trainer.logger.log_dir)
    paper = dashboard.series("functional_distance_rel")
    memo = dashboard.series("memo/functional_distance_rel")
    assert set(paper) == set(memo)
    late = [s for s in paper if s > 10]
    assert late
    for step in late:
        assert memo[step] < paper[step], f"step {step}: memo {memo[step]:.4f} vs paper {paper[step]:.4f}"
    # the effect is not marginal: by the end the paper's shadow is clearly further away
    assert memo[max(late)] < 0.8 * paper[max(late)]
    assert monitor.exit_step is not None, "the paper's shadow departs (n = 2d: its missing c·I term matters)"
    assert monitor.memo_exit_step is None or monitor.memo_exit_step > monitor.exit_step
    assert dashboard.has("memo/functional_distance") and dashboard.has("memo/loss_linear")
    logged = {int(r["step"]): r["memo/functional_distance_rel"] for r in monitor.history}
    assert memo == {step: pytest.approx(value, rel=1e-6) for step, value in logged.items()}


def test_index_and_hash_identity_agree(tmp_path: Path) -> None:
    histories = []
    for with_index in (True, False):
        monitor = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, memorization=True)
        _fit(
            tmp_path,
            monitor,
            with_index=with_index,
            name=f"id{with_index}",
            steps=12,
            width=256,
            batch_size=16,
        )
        histories.append(monitor.history)
    with_index, hashed = histories
    assert [r["step"] for r in with_index] == [r["step"] for r in hashed]
    for a, b in zip(with_index, hashed, strict=True):
        # same batches, same offsets, only the numbering of examples differs: equal up to float round-off
        assert a["memo/functional_distance"] == pytest.approx(
            b["memo/functional_distance"], rel=1e-5, abs=1e-8
        )
    assert any(r["memo/functional_distance"] > 0 for r in with_index)


def test_memo_off_by_default_and_paper_shadow_unchanged(tmp_path: Path) -> None:
    plain = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4)
    _fit(tmp_path, plain, with_index=False, name="plain", steps=8, width=256)
    memo = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, memorization=True)
    _fit(tmp_path, memo, with_index=False, name="memo", steps=8, width=256)
    assert not any(k.startswith("memo/") for r in plain.history for k in r)
    for a, b in zip(plain.history, memo.history, strict=True):
        assert a["functional_distance"] == b["functional_distance"]  # the paper's shadow is untouched


def test_memo_state_survives_resume(tmp_path: Path) -> None:
    full = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, memorization=True)
    _fit(tmp_path, full, with_index=True, name="full", steps=12, width=256, batch_size=16)
    half = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, memorization=True)
    # 8 steps = 2 whole epochs: Lightning resumes at an epoch boundary with the same batches to come
    trainer = _fit(tmp_path, half, with_index=True, name="half", steps=8, width=256, batch_size=16)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, memorization=True)
    x, y = sphere_data(N_TRAIN + N_VAL, D, seed=3)
    y = torch.sign(x[:, :1] + 0.5 * x[:, 1:2])
    train = DataLoader(WithIndex(TensorDataset(x[:N_TRAIN], y[:N_TRAIN])), batch_size=16)
    val = DataLoader(TensorDataset(x[N_TRAIN:], y[N_TRAIN:]), batch_size=N_VAL)
    make_trainer(tmp_path, [resumed], name="resumed", max_steps=12).fit(
        Regressor(TwoLayerNet(D, 256, seed=42), 1.0), train, val, ckpt_path=str(ckpt)
    )
    assert [r["step"] for r in resumed.history] == [r["step"] for r in full.history]
    for a, b in zip(full.history, resumed.history, strict=True):
        assert math.isclose(
            a["memo/functional_distance"], b["memo/functional_distance"], rel_tol=1e-5, abs_tol=1e-8
        )
