"""The networks people train, each under the monitor in a Trainer: exact NTK, finite values, untouched training.

For every model: (1) ``empirical_ntk`` (default method) equals a brute-force kernel built here from
per-example, per-output ``torch.autograd.grad`` rows in float64 (no lin_probe code), to 1e-6
relative; (2) a short fit with ``LinearRegimeMonitor`` logs only finite values, with no warning that
a measurement failed; (3) the user's training (parameters and buffers) is bit-identical to the same
fit without the monitor. The models are :mod:`benchmarks.zoo`'s (the overhead benchmark's) plus a GRU,
a GroupNorm CNN, a frozen backbone with a trainable head and a model with tied weights.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lin_probe import LinearRegimeMonitor
from lin_probe.ntk import empirical_ntk

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import zoo  # the benchmark's models: one definition for both

pytestmark = pytest.mark.slow


class TokenGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(zoo.VOCAB, 16)
        self.gru = nn.GRU(16, 24, batch_first=True)
        self.head = nn.Linear(24, zoo.CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.gru(self.embed(tokens))
        return self.head(out[:, -1])


class GroupNormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(16, zoo.CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


class FrozenBackbone(nn.Module):
    """A feature extractor with requires_grad=False and a trained head: Θ is the head's kernel only."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.backbone.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, zoo.CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class TiedWeights(nn.Module):
    """An autoencoder-style classifier whose decoder reuses the encoder's weight (``W`` and ``Wᵀ``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(64, 32)
        self.decoder_bias = nn.Parameter(torch.zeros(64))
        self.head = nn.Linear(64, zoo.CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.encoder(x))
        return self.head(torch.tanh(F.linear(h, self.encoder.weight.T, self.decoder_bias)))


def _small_images(n: int) -> tuple[Tensor, Tensor]:
    x, y = zoo.images(n)
    return x[:, :, :16, :16].contiguous(), y


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple[Tensor, Tensor]]]] = {
    "resnet_bn": (lambda: zoo.ResNetBN((8, 16, 16)), _small_images),
    "transformer": (zoo.TokenTransformer, zoo.tokens),
    "lstm": (zoo.TokenLSTM, zoo.tokens),
    "digits_mlp": zoo.MODELS["digits_mlp"],
    "gru": (TokenGRU, zoo.tokens),
    "groupnorm_cnn": (GroupNormCNN, _small_images),
    "frozen_backbone": (FrozenBackbone, zoo.digits),
    "tied_weights": (TiedWeights, zoo.digits),
}


def _brute_force_ntk(model: nn.Module, x: Tensor) -> Tensor:
    """``(1/C) Σ_c J_c J_cᵀ`` in float64 from one autograd row per (example, output), eval mode."""
    model = copy.deepcopy(model).double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    x = x.double() if x.is_floating_point() else x
    rows = []
    with torch.backends.mkldnn.flags(enabled=False):  # oneDNN RNN kernels have no eval-mode backward
        for i in range(x.shape[0]):
            out = model(x[i : i + 1]).reshape(-1)
            grads = [
                torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
                for c in range(out.numel())
            ]
            rows.append(
                torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                        for g, p in zip(gs, params, strict=True)]) for gs in grads])
            )  # fmt: skip
    jac = torch.stack(rows)  # (n, C, P)
    return torch.einsum("icp,jcp->ij", jac, jac) / jac.shape[1]


@pytest.mark.parametrize("name", list(MODELS))
def test_ntk_is_exact(name: str) -> None:
    factory, data = MODELS[name]
    torch.manual_seed(0)
    model = factory().double()
    x, _ = data(6)
    x = x.double() if x.is_floating_point() else x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a generic-loop fallback says so once: not what is tested here
        theta = empirical_ntk(model, x)
    reference = _brute_force_ntk(model, x)
    assert torch.allclose(theta.double(), reference, rtol=1e-6, atol=1e-9 * reference.abs().max())


def _fit(name: str, tmp_path: Path, monitor: LinearRegimeMonitor | None) -> zoo.Classifier:
    factory, data = MODELS[name]
    torch.manual_seed(0)
    module = zoo.Classifier(factory())
    x, y = data(48)
    train = DataLoader(TensorDataset(x[16:], y[16:]), batch_size=8)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=4, logger=False, callbacks=[monitor] if monitor else [],
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    trainer.fit(module, train)
    return module


@pytest.mark.parametrize("name", list(MODELS))
def test_monitored_fit_is_finite_and_leaves_training_untouched(name: str, tmp_path: Path) -> None:
    _, data = MODELS[name]
    x, y = data(48)
    monitor = LinearRegimeMonitor(probe=(x[:16], y[:16]), n_probe=16, every_n_steps=2, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitored = _fit(name, tmp_path, monitor)
    failures = [
        str(w.message) for w in caught if "could not" in str(w.message) or "switched off" in str(w.message)
    ]
    assert not failures
    assert [int(r["step"]) for r in monitor.history] == [0, 1, 2, 4]
    for record in monitor.history:
        bad = {k: v for k, v in record.items() if not math.isfinite(v)}
        assert not bad, (record["step"], bad)
    # the NTK checks (steps 0, 2, 4) measured the drift, and the velocity from the check before
    assert [int(r["step"]) for r in monitor.history if "ntk_drift" in r] == [0, 2, 4]
    assert [int(r["step"]) for r in monitor.history if "kernel_velocity" in r] == [2, 4]
    plain = _fit(name, tmp_path / "plain", None)
    for (key, a), (_, b) in zip(monitored.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
