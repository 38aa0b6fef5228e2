"""The networks people train, small enough for a 2-core CPU: the overhead benchmark's (and model-zoo tests') models.

Each entry builds, seeded, a plain ``nn.Module`` classifier and a synthetic data set of the shape it
takes (no download: random images and tokens, scikit-learn's bundled digits):

* ``resnet_bn`` — ResNet-style CNN on 32×32×3: a BatchNorm stem, three stages of one residual block
  each (32, 64, 128 channels, stride 2 between stages, BatchNorm after every convolution), global
  average pooling, Linear(128→10); 10 classes (~0.3 M parameters).
* ``transformer`` — token classifier: Embedding(100, 64) plus a learned position table, two
  ``nn.TransformerEncoderLayer`` (4 heads, feed-forward 128, batch_first, dropout 0.1), mean pooling,
  Linear(64→10); sequences of 16 tokens.
* ``lstm`` — token classifier: Embedding(100, 32) → one-layer ``nn.LSTM``(32→64), last hidden state →
  Linear(64→10); sequences of 16 tokens.
* ``digits_mlp`` — scikit-learn's 8×8 digits (1,797 images, standardised): the ``DeepMLP`` of
  ``examples/digits_mlp.py`` with 2 hidden layers of width 256.

Labels of the synthetic sets come from a fixed random teacher of the inputs, so training has
something to learn (the monitor's checks see a moving network). :class:`Classifier` is the
``LightningModule`` all of them train in: cross-entropy, SGD (lr 0.05, momentum 0.9).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits_mlp import DeepMLP

VOCAB, LENGTH, CLASSES = 100, 16, 10
LR, MOMENTUM = 0.05, 0.9


class Classifier(pl.LightningModule):
    """Cross-entropy on class ids, SGD with momentum: what a user writes."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (strided 1×1 conv-BN) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNetBN(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks.append(ResidualBlock(cin, cout, 1 if i == 0 else 2))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class TokenTransformer(nn.Module):
    def __init__(
        self, vocab: int = VOCAB, length: int = LENGTH, width: int = 64, classes: int = CLASSES
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.encoder(self.embed(tokens) + self.position[: tokens.shape[1]])
        return self.head(h.mean(dim=1))


class TokenLSTM(nn.Module):
    def __init__(self, vocab: int = VOCAB, width: int = 32, hidden: int = 64, classes: int = CLASSES) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


def _teacher_labels(features: Tensor, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(features.shape[1], CLASSES, generator=gen)
    return (features @ teacher).argmax(dim=1)


def images(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    return x, _teacher_labels(x.flatten(1) / math.sqrt(x[0].numel()), seed + 1)


def tokens(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=gen)
    counts = torch.zeros(n, VOCAB).scatter_add_(1, x, torch.ones(n, LENGTH))
    return x, _teacher_labels(counts, seed + 1)


def digits(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The first ``n`` of the digits, repeated when ``n`` exceeds the set's 1,797 images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target)
    reps = -(-n // len(x))
    return x.repeat(reps, 1)[:n], y.repeat(reps)[:n]


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple[Tensor, Tensor]]]] = {
    "resnet_bn": (ResNetBN, images),
    "transformer": (TokenTransformer, tokens),
    "lstm": (TokenLSTM, tokens),
    "digits_mlp": (lambda: DeepMLP(64, 256, 2, CLASSES), digits),
}
"""name → (network factory, data factory ``n → (inputs, integer labels)``)."""


def build(name: str, n: int, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """The seeded network and ``n`` examples of its data."""
    factory, data = MODELS[name]
    torch.manual_seed(seed)
    model = factory()
    x, y = data(n)
    return model, x, y
