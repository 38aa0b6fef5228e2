"""The probe set: the fixed examples on which network and shadow are compared.

Held-out points are preferred (the shadow lacks the network's ``c·I`` kernel term, which acts on
training points only), so by default the probe comes from the validation dataloader and falls
back to the training dataloader. Reading a dataloader draws from the global RNG (shuffling
samplers), so it happens under ``preserved_rng_state``: training sees exactly the batches it would
have seen without the monitor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lin_probe._model_state import floating_dtype, model_device, preserved_rng_state
from lin_probe._validation import check_finite

BatchToXY = Callable[[Any], tuple[Tensor, Tensor | None]]


@dataclass
class ProbeSet:
    """Probe inputs, optional targets, and where they came from (shown in the fit card)."""

    inputs: Tensor
    targets: Tensor | None
    source: str

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def head(self, n: int) -> ProbeSet:
        """The first ``n`` examples (the budget's probe size)."""
        if n >= len(self):
            return self
        targets = None if self.targets is None else self.targets[:n]
        return ProbeSet(self.inputs[:n], targets, self.source)

    def on_model(self, model: nn.Module) -> ProbeSet:
        """On the model's device, floating inputs in its dtype (a float32 probe can measure float64)."""
        return self.to(model_device(model) or torch.device("cpu"), floating_dtype(model))

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> ProbeSet:
        """On ``device``; floating inputs also cast to ``dtype`` (the model's), so a float32 probe
        can measure a float64 model. Integer inputs (token ids) and targets keep their dtype."""
        inputs = self.inputs.to(device)
        if dtype is not None and inputs.is_floating_point():
            inputs = inputs.to(dtype)
        targets = None if self.targets is None else self.targets.to(device)
        return ProbeSet(inputs, targets, self.source)


def default_batch_to_xy(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` from a batch: first two items of a tuple/list, or keys ``"x"``/``"y"`` of a dict."""
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    elif isinstance(batch, Mapping) and "x" in batch and "y" in batch:
        x, y = batch["x"], batch["y"]
    else:
        raise TypeError(
            f"Cannot find inputs and targets in a batch of type {type(batch).__name__}. LinearRegimeMonitor "
            "understands (x, y, ...) tuples/lists and dicts with keys 'x' and 'y'; pass "
            "`batch_to_xy=lambda batch: (inputs, targets)` for any other structure."
        )
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            "The batch's inputs and targets must be tensors (got "
            f"{type(x).__name__}, {type(y).__name__}); pass `batch_to_xy` to extract them."
        )
    return x, y


def probe_from_argument(probe: Tensor | tuple[Tensor, Tensor], n_probe: int) -> ProbeSet:
    """A probe given by the user: a tensor of inputs or an ``(inputs, targets)`` pair (first ``n_probe`` rows)."""
    if isinstance(probe, Tensor):
        inputs, targets = probe, None
    elif isinstance(probe, (tuple, list)) and len(probe) == 2 and all(isinstance(t, Tensor) for t in probe):
        inputs, targets = probe
        if targets.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"`probe` inputs have {inputs.shape[0]} rows but targets have {targets.shape[0]}; they must match."
            )
    else:
        raise TypeError("`probe` must be None, a tensor of inputs, or an (inputs, targets) pair of tensors.")
    return _finish(inputs[:n_probe], None if targets is None else targets[:n_probe], "the `probe` argument")


def probe_from_dataloaders(
    val_loaders: Any, train_loaders: Any, n_probe: int, batch_to_xy: BatchToXY
) -> ProbeSet:
    """The first ``n_probe`` examples of the validation dataloader if any, else of the training one."""
    for loaders, source in ((val_loaders, "validation"), (train_loaders, "training")):
        loader = _first_loader(loaders)
        if loader is None:
            continue
        xs, ys = _take(loader, n_probe, batch_to_xy)
        if xs:
            inputs = torch.cat(xs)[:n_probe]
            targets = torch.cat(ys)[:n_probe] if all(y is not None for y in ys) else None
            return _finish(inputs, targets, f"first {inputs.shape[0]} examples of the {source} dataloader")
    raise ValueError(
        "LinearRegimeMonitor found no examples to probe: no validation or training dataloader yielded a batch. "
        "Pass `probe=` (a tensor of inputs, or an (inputs, targets) pair)."
    )


def _first_loader(loaders: Any) -> Iterable[Any] | None:
    if loaders is None:
        return None
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, Sequence) and not hasattr(loaders, "dataset"):
        return loaders[0] if len(loaders) else None
    return loaders


def _take(loader: Iterable[Any], n: int, batch_to_xy: BatchToXY) -> tuple[list[Tensor], list[Tensor | None]]:
    xs: list[Tensor] = []
    ys: list[Tensor | None] = []
    count = 0
    with preserved_rng_state():
        for batch in loader:
            x, y = batch_to_xy(batch)
            xs.append(x.detach().cpu())
            ys.append(None if y is None else y.detach().cpu())
            count += x.shape[0]
            if count >= n:
                break
    return xs, ys


def _finish(inputs: Tensor, targets: Tensor | None, source: str) -> ProbeSet:
    if inputs.shape[0] < 2:
        raise ValueError(
            f"The probe set has {inputs.shape[0]} example(s); fitting a, b, c needs at least 2 "
            "(raise `n_probe` or pass a larger `probe`)."
        )
    check_finite(inputs, "probe inputs")
    if targets is not None:
        check_finite(targets, "probe targets")
    return ProbeSet(inputs.detach().clone(), None if targets is None else targets.detach().clone(), source)
