"""``forward_fn(module, x)``: monitoring a module whose ``forward`` takes more than the inputs, without a subclass."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _lightning_setups import Regressor, TwoLayerNet, loaders, make_trainer, sphere_data
from pytorch_lightning.demos import LightningTransformer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lin_probe import LinearRegimeMonitor
from lin_probe.monitor.forward import CalledWith
from lin_probe.ntk import empirical_ntk

D = 8


class Scaled(nn.Module):
    """``forward(x, scale)``: a forward that needs a second argument."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x: Tensor, scale: float) -> Tensor:
        return scale * self.net(x)


def test_the_wrapped_kernel_is_the_kernel_of_the_called_function() -> None:
    """``x ↦ 3·net(x)`` has NTK ``9·Θ_net`` (the Jacobian scales by 3): a closed form, not the wrapper."""
    torch.manual_seed(0)
    module = Scaled().double()
    x = torch.randn(6, D, dtype=torch.float64)
    wrapped = CalledWith(module, lambda m, inputs: m(inputs, 3.0))
    torch.testing.assert_close(
        empirical_ntk(wrapped, x), 9 * empirical_ntk(module.net, x), rtol=1e-12, atol=0
    )
    assert [name for name, _ in wrapped.named_parameters()] == [
        "module." + name for name, _ in module.named_parameters()
    ]


class ScaledRegressor(Regressor):
    def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:  # type: ignore[override]
        return scale * self.net(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return F.mse_loss(self(x, 0.5), y)


def _scaled_fit(tmp_path: Path, monitor: LinearRegimeMonitor) -> ScaledRegressor:
    x, y = sphere_data(96, D)
    train, val = loaders(x[:64], y[:64], x[64:], y[64:], 16)
    module = ScaledRegressor(TwoLayerNet(D, 32), 0.5)
    make_trainer(tmp_path, [monitor], max_steps=6).fit(module, train, val)
    return module


def test_forward_fn_is_what_every_measurement_calls(tmp_path: Path) -> None:
    """The shadow starts at f_0 = the *called* function: with forward_fn = the training call (scale 0.5),
    the step-0 distance is 0 and the measured outputs are 0.5 × net(x)."""
    calls: list[float] = []

    def forward_fn(module: nn.Module, x: Tensor) -> Tensor:
        calls.append(x.shape[0])
        return module(x, 0.5)

    monitor = LinearRegimeMonitor(forward_fn=forward_fn, n_probe=32, every_n_steps=2, max_overhead=None)
    module = _scaled_fit(tmp_path, monitor)
    assert calls and monitor.core is not None
    first = monitor.history[0]
    assert first["functional_distance_rel"] == 0.0 and math.isfinite(first["ntk_gap"])
    with torch.no_grad():
        expected = 0.5 * monitor.core.runs[0].shadow.initial_model.module.net(monitor.core.probe.inputs)
    torch.testing.assert_close(monitor.core.initial_outputs, expected)
    assert all(math.isfinite(r["functional_distance_rel"]) for r in monitor.history)
    assert module.global_step == 6


class NeedsScale(ScaledRegressor):
    def forward(self, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        return scale * self.net(x)


def test_a_forward_that_needs_more_arguments_is_an_error_at_setup_naming_forward_fn(tmp_path: Path) -> None:
    x, y = sphere_data(32, D)
    train, val = loaders(x, y, x, y, 16)
    started: list[int] = []
    monitor = LinearRegimeMonitor(probe=x, loss="mse")
    monitor.on_train_start = lambda *args: started.append(1)  # type: ignore[method-assign]
    trainer = make_trainer(tmp_path, [monitor], max_steps=2)
    with pytest.raises(ValueError, match=r"forward_fn=lambda module, x") as raised:
        trainer.fit(NeedsScale(TwoLayerNet(D, 32), 0.5), train, val)
    assert "one probe example of shape (8,)" in str(raised.value) and "`probe`" in str(raised.value)
    assert started == [] and trainer.global_step == 0  # raised at setup, before training started


def test_with_the_default_probe_a_forward_that_needs_more_arguments_is_an_error_before_the_first_step(
    tmp_path: Path,
) -> None:
    """No ``probe=``: the probe comes from the dataloaders, which exist only at train start, so the
    same configuration error is raised there, before any step or costly measurement, naming
    ``forward_fn``."""
    x, y = sphere_data(32, D)
    train, val = loaders(x, y, x, y, 16)
    steps: list[int] = []
    monitor = LinearRegimeMonitor(loss="mse")
    monitor.on_train_batch_start = lambda *args: steps.append(1)  # type: ignore[method-assign]
    trainer = make_trainer(tmp_path, [monitor], max_steps=2)
    with pytest.raises(ValueError, match=r"forward_fn=lambda module, x") as raised:
        trainer.fit(NeedsScale(TwoLayerNet(D, 32), 0.5), train, val)
    assert "one probe example of shape (8,)" in str(raised.value)
    assert steps == [] and trainer.global_step == 0


@pytest.mark.slow
def test_lightnings_demo_transformer_runs_under_the_monitor_with_forward_fn(tmp_path: Path) -> None:
    """``LightningTransformer.forward(inputs, target)`` (Lightning's own demo): no subclass needed.
    Tokens and their next-token targets travel as one (B, 2, T) tensor; the prediction is the
    (B, T·V) log-probabilities; the shadow's loss is the demo's own NLL."""
    vocab, length = 16, 6
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (48, length + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=8)
    torch.manual_seed(0)
    model = LightningTransformer(vocab_size=vocab)
    model.prepare_data = lambda: None  # the demo downloads WikiText-2 here; these tokens are synthetic

    def nll(pred: Tensor, y: Tensor) -> Tensor:
        return F.nll_loss(pred.reshape(-1, vocab), y.reshape(-1))

    monitor = LinearRegimeMonitor(
        batch_to_xy=lambda batch: (torch.stack(batch, dim=1), batch[1]),
        forward_fn=lambda module, x: module(x[:, 0], x[:, 1]).reshape(x.shape[0], -1),
        loss=nll,
        n_probe=8,
        every_n_steps=2,
        max_overhead=None,
        verbose=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [monitor], max_steps=4).fit(model, loader)
    assert not [w for w in caught if "could not" in str(w.message) or "switched off" in str(w.message)]
    assert monitor.core is not None and [int(r["step"]) for r in monitor.history] == [0, 1, 2, 4]
    assert all(math.isfinite(v) for r in monitor.history for k, v in r.items() if k != "ntk_drift")
