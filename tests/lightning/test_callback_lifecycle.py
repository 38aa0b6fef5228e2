"""The callback across fits and checkpoints: each fit starts clean, states are versioned, warnings go to rank zero."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
import torch
from _lightning_setups import Regressor, TwoLayerNet, loaders, make_trainer, sphere_data

import lin_probe.lightning.callback as callback_module
from lin_probe import LinearRegimeMonitor
from lin_probe.lightning.tensorboard import fit_card

D, N_TRAIN, N_VAL, WIDTH = 8, 32, 16, 64


def _fit(tmp_path: Path, monitor: LinearRegimeMonitor, *, name: str, seed: int, lr: float = 2.0, **kwargs):
    x, y = sphere_data(N_TRAIN + N_VAL, D, seed=seed)
    train, val = loaders(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], 16)
    trainer = make_trainer(tmp_path, [monitor], name=name, max_steps=24, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|log_every_n_steps|poor proxy).*")
        trainer.fit(Regressor(TwoLayerNet(D, WIDTH, seed=seed), lr), train, val)
    return trainer


def _monitor() -> LinearRegimeMonitor:
    return LinearRegimeMonitor(n_probe=N_VAL, every_n_steps=4, tolerance=0.05, patience=2, verbose=False)


def test_a_monitor_reused_for_a_second_fit_starts_clean(tmp_path: Path) -> None:
    reused = _monitor()
    _fit(tmp_path, reused, name="first", seed=0)
    assert reused.verdict.state != "inside", "the first run must reach a verdict, or the test shows nothing"
    first_kernel = reused.kernel
    _fit(tmp_path, reused, name="second", seed=1)
    fresh = _monitor()
    _fit(tmp_path, fresh, name="reference", seed=1)
    # the reused monitor reports exactly what a fresh one reports for the second run
    assert [r["step"] for r in reused.history] == [r["step"] for r in fresh.history]
    assert reused.history[0]["step"] == 0 and reused.history[0]["in_linear_regime"] == 1.0
    assert reused.verdict == fresh.verdict and reused.verdict.state != "inside"
    for got, want in zip(reused.history, fresh.history, strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert reused.kernel != first_kernel


def test_warnings_are_given_again_in_the_next_fit(tmp_path: Path) -> None:
    monitor = _monitor()
    for name in ("first", "second"):
        with pytest.warns(UserWarning, match="found no logger"):
            _fit(tmp_path, monitor, name=name, seed=0, logger=False)


def test_state_is_versioned_and_an_unknown_version_restarts_instead_of_crashing(tmp_path: Path) -> None:
    monitor = _monitor()
    _fit(tmp_path, monitor, name="saved", seed=0)
    state = monitor.state_dict()
    assert state["version"] == 3 and state["core"]["version"] == 3
    future = {**state, "core": {**state["core"], "version": 99}}
    resumed = _monitor()
    resumed.load_state_dict(future)
    with pytest.warns(UserWarning, match="cannot resume from this checkpoint"):
        _fit(tmp_path, resumed, name="future", seed=0)
    assert resumed.history[0]["step"] == 0, "re-measured from init"


def test_a_state_missing_optional_keys_resumes_with_defaults(tmp_path: Path) -> None:
    monitor = _monitor()
    _fit(tmp_path, monitor, name="saved", seed=0)
    state = {key: value for key, value in monitor.state_dict().items() if key in ("version", "core")}
    resumed = _monitor()
    resumed.load_state_dict(state)  # no last_optimizer_step / checks_since_exit / active
    _fit(tmp_path, resumed, name="resumed", seed=0)
    assert [r["step"] for r in resumed.history][: len(monitor.history)] == [
        r["step"] for r in monitor.history
    ]


def test_an_unversioned_state_from_the_first_release_is_refused_with_a_warning(tmp_path: Path) -> None:
    old = {"history": [{"step": 0.0, "functional_distance_rel": 0.0}], "regime": {"exit_step": None}}
    monitor = _monitor()
    with pytest.warns(UserWarning, match="older version"):
        monitor.load_state_dict(old)
    _fit(tmp_path, monitor, name="fresh", seed=0)
    assert monitor.history[0]["step"] == 0


def test_the_non_sgd_warning_goes_through_rank_zero_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under DDP every rank builds a mirror; only rank zero may say so (the callback hands the core
    ``rank_zero_warn``). Here the rank-zero channel is replaced by a recorder."""
    heard: list[str] = []
    monkeypatch.setattr(callback_module, "rank_zero_warn", lambda message, **_: heard.append(str(message)))

    class AdamRegressor(Regressor):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    x, y = sphere_data(N_TRAIN + N_VAL, D)
    train, val = loaders(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], 16)
    trainer = make_trainer(tmp_path, [_monitor()], name="adam", max_steps=4)
    with warnings.catch_warnings(record=True) as python_warnings:
        warnings.simplefilter("always")
        trainer.fit(AdamRegressor(TwoLayerNet(D, WIDTH), 1e-3), train, val)
    assert sum("mirroring Adam" in message for message in heard) == 1
    assert not [w for w in python_warnings if "mirroring" in str(w.message)]


def test_dead_options_are_gone() -> None:
    assert "closed_form" not in inspect.signature(fit_card).parameters


def test_a_loaded_but_not_yet_resumed_monitor_saves_what_it_loaded(tmp_path: Path) -> None:
    """A checkpoint written between load_state_dict and train start must not lose the shadow state."""
    monitor = _monitor()
    _fit(tmp_path, monitor, name="saved", seed=0)
    state = monitor.state_dict()
    loaded = _monitor()
    loaded.load_state_dict(state)
    again = loaded.state_dict()
    assert again.keys() == state.keys()
    shadow, saved_shadow = again["core"]["runs"][""]["shadow"], state["core"]["runs"][""]["shadow"]
    assert all(torch.equal(shadow[key], saved_shadow[key]) for key in saved_shadow if key != "_extra_state")
