"""``RegimeProbe`` driven from a plain PyTorch loop, with no Lightning object anywhere.

The reference for the distances is the tests' one plain-PyTorch replay (``_robustness_helpers.replay``:
torch SGD on a copy of the network and on ``f_0 + ψB`` with the fitted ``a, b``), not lin_probe code.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _lightning_setups import TwoLayerNet, sphere_data
from _robustness_helpers import replay
from torch import Tensor

import lin_probe
from lin_probe import RegimeProbe
from lin_probe.monitor.core import MEMO, STATE_VERSION, Host, MonitorConfig

D, N_TRAIN, N_VAL, WIDTH, LR, STEPS = 8, 32, 16, 256, 0.5, 12


def _data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, y = sphere_data(N_TRAIN + N_VAL, D)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def _train(probe: RegimeProbe, model: torch.nn.Module, optimizer, x: Tensor, y: Tensor, steps: range) -> None:
    """Full-batch GD with the probe in lock-step, checking after every step."""
    for step in steps:
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        probe.accumulate(x, y)
        probe.step(optimizer.param_groups[0]["lr"])
        optimizer.step()
        probe.check(model, step)


def test_plain_loop_matches_an_independent_replay() -> None:
    x, y, x_val, y_val = _data()
    model = TwoLayerNet(D, WIDTH)
    initial = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    probe = RegimeProbe.start(model, (x_val, y_val), optimizer, MonitorConfig(loss="mse"))
    probe.check(model, 0)
    _train(probe, model, optimizer, x, y, range(1, STEPS + 1))
    ref = replay(
        initial,
        probe.kernel.a,
        probe.kernel.b,
        [[(x, y)]] * STEPS,
        x_val,
        lambda p: torch.optim.SGD(p, lr=LR),
    )
    assert [int(r["step"]) for r in probe.history] == list(range(STEPS + 1))
    for record in probe.history:
        step = int(record["step"])
        # float32 network vs float64 replay of the same GD: 2e-4 relative, as in the callback tests
        assert record["functional_distance"] == pytest.approx(ref.distance(step), rel=2e-4, abs=1e-7)
        assert record["functional_distance_rel"] == pytest.approx(ref.distance_rel(step), rel=2e-4, abs=1e-7)
    assert probe.history[0]["in_linear_regime"] == 1.0 and probe.history[0]["functional_distance_rel"] == 0.0


def test_the_core_and_the_math_never_import_lightning() -> None:
    code = (
        "import sys, lin_probe.monitor.core, lin_probe.ntk, lin_probe.kernel, lin_probe.shadows.mirror; "
        "from lin_probe import RegimeProbe, empirical_ntk; "
        "assert not any(m.split('.')[0] in ('pytorch_lightning', 'lightning') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    package = Path(lin_probe.__file__).parent
    for source in package.rglob("*.py"):
        if source.relative_to(package).parts[0] == "lightning" or source == package / "__init__.py":
            continue
        text = source.read_text()
        for word in ("pytorch_lightning", "lightning_utilities", "_trainer", "_fabric", "_compiler_ctx"):
            assert word not in text, f"{source.relative_to(package)} mentions {word}"


def test_state_round_trip_continues_the_same_run() -> None:
    x, y, x_val, y_val = _data()

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = TwoLayerNet(D, WIDTH)
        return model, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    # linearized=True: the Taylor model's θ' and its optimizer state must resume too, around the saved f_0
    config = MonitorConfig(loss="mse", tolerance=0.02, patience=2, linearized=True)
    model, optimizer = fresh()
    whole = RegimeProbe.start(model, (x_val, y_val), optimizer, config)
    whole.check(model, 0)
    _train(whole, model, optimizer, x, y, range(1, STEPS + 1))

    model, optimizer = fresh()
    first = RegimeProbe.start(model, (x_val, y_val), optimizer, config)
    first.check(model, 0)
    _train(first, model, optimizer, x, y, range(1, 5))
    state = first.state_dict()
    assert state["version"] == STATE_VERSION
    # resume into a *differently initialised* copy: f_0 and Θ_0 must come from the state
    resumed_model = TwoLayerNet(D, WIDTH, seed=99)
    resumed_model.load_state_dict(model.state_dict())
    resumed_optimizer = torch.optim.SGD(resumed_model.parameters(), lr=LR, momentum=0.9)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed = RegimeProbe.from_state(resumed_model, resumed_optimizer, state, config)
    _train(resumed, resumed_model, resumed_optimizer, x, y, range(5, STEPS + 1))
    assert len(resumed.history) == len(whole.history)
    for got, want in zip(resumed.history, whole.history, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-8), (int(want["step"]), key)
    assert whole.paper.regime.exit_step is not None, "the tolerance is tight enough to see an exit"
    assert resumed.paper.regime.exit_step == whole.paper.regime.exit_step
    assert resumed.verdict == whole.verdict and resumed.diagnosis == whole.diagnosis
    assert any("linearized/functional_distance_rel" in record for record in whole.history)


def test_a_state_of_another_layout_version_is_refused_with_a_clear_error() -> None:
    _, _, x_val, y_val = _data()
    model = TwoLayerNet(D, WIDTH)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    state = RegimeProbe.start(model, (x_val, y_val), optimizer).state_dict()
    for version in (None, STATE_VERSION + 1):
        with pytest.raises(ValueError, match="layout version"):
            RegimeProbe.from_state(model, optimizer, {**state, "version": version})


def test_non_sgd_mirror_warns_once_through_the_owners_emitter_only() -> None:
    """The owner decides where warnings go (rank zero in Lightning): nothing through ``warnings``."""
    _, _, x_val, y_val = _data()
    model = TwoLayerNet(D, WIDTH)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    heard: list[str] = []
    with warnings.catch_warnings(record=True) as python_warnings:
        warnings.simplefilter("always")
        RegimeProbe.start(
            model,
            (x_val, y_val),
            optimizer,
            MonitorConfig(memorization=True),
            host=Host(warn=heard.append),
            train_size=64,
        )
    assert sum("mirroring Adam" in message for message in heard) == 1
    assert not [w for w in python_warnings if "mirroring" in str(w.message)]


def test_hashed_example_ids_are_bounded_by_the_training_set_size() -> None:
    """Augmented inputs are new rows every draw: the hash table must not grow without bound."""
    x, y, x_val, y_val = _data()
    model = TwoLayerNet(D, WIDTH)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    heard: list[str] = []
    probe = RegimeProbe.start(
        model,
        (x_val, y_val),
        optimizer,
        MonitorConfig(memorization=True),
        train_size=N_TRAIN,
        host=Host(warn=heard.append),
    )
    probe.accumulate(x, y)  # N_TRAIN distinct rows: fine
    probe.discard()
    assert probe.run(MEMO) is not None
    probe.accumulate(x + 0.01 * torch.randn_like(x), y)  # "augmented": N_TRAIN more distinct rows
    assert probe.run(MEMO) is None, "the memorizing shadow is switched off, not left growing"
    assert any("max_examples" in message and "WithIndex" in message for message in heard)
    probe.discard()
    probe.accumulate(x, y)
    probe.step(LR)  # the paper's shadow carries on


def test_a_failed_measurement_is_nan_with_one_warning() -> None:
    _, _, x_val, y_val = _data()
    model = TwoLayerNet(D, WIDTH)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    heard: list[str] = []
    probe = RegimeProbe.start(model, (x_val, y_val), optimizer, host=Host(warn=heard.append))
    with torch.no_grad():
        model.v.fill_(math.nan)
    for step in (1, 2):
        record = probe.check(model, step)
        assert math.isnan(record["ntk_gap"]) and math.isnan(record["functional_distance_rel"])
    assert sum("Non-finite" in message for message in heard) == 1
    assert probe.paper.regime.exit_step is None, "NaN checks carry no evidence of an exit"


def test_a_patch_mean_data_kernel_resumes_with_its_geometry() -> None:
    """The shadow's ψ after resume is built from the same first-conv patches as before (not re-chosen)."""
    torch.manual_seed(0)

    def cnn() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Conv2d(2, 64, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(64, 1),
        )

    x = torch.randn(12, 2, 6, 6)
    y = torch.randn(12, 1)
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = RegimeProbe.start(model, (x, y), optimizer, MonitorConfig(data_kernel="patch_mean"))
    probe.check(model, 0)
    _train(probe, model, optimizer, x, y, range(1, 3))
    resumed = RegimeProbe.from_state(
        model, optimizer, probe.state_dict(), MonitorConfig(data_kernel="patch_mean")
    )
    assert resumed.data_kernel.name == "patch_mean"
    assert resumed.paper.shadow.features_fn == probe.paper.shadow.features_fn
    assert torch.equal(resumed.paper.shadow(x), probe.paper.shadow(x))
