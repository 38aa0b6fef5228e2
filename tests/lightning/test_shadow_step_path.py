"""The shadows' step on every training batch stays cheap: it reads no tensor value back to the host,
and a batch found whole in the ``f_0`` cache runs no forward and no eval-mode bookkeeping.

On an accelerator a value read (``bool(t)``, ``t.item()``, ``float(t)``, …) waits for the step's
queued kernels, so the host can no longer run ahead of the device. CUDA's own detector
(``torch.cuda.set_sync_debug_mode``) needs a GPU (``tests/shadows/test_digests.py``); this test runs
on the CPU by spying on the Python-level reads, which is how such reads enter lin_probe's code.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _lightning_setups import Regressor, TwoLayerNet, make_trainer, sphere_data
from torch.utils.data import DataLoader, TensorDataset

from lin_probe.data import WithIndex
from lin_probe.lightning.callback import LinearRegimeMonitor
from lin_probe.shadows import linear as linear_module

_READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")


class _Spy:
    """Counts value reads and ``eval_semantics`` entries while :attr:`on` is set."""

    def __init__(self) -> None:
        self.on = False
        self.reads: list[str] = []
        self.eval_entries = 0


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Spy]:
    watch = _Spy()
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def reading(self: torch.Tensor, *args: Any, _original: Any = original, _name: str = name) -> Any:
            if watch.on:
                watch.reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, reading)
    original_eval = linear_module.eval_semantics

    def counted_eval(model: torch.nn.Module) -> Any:
        if watch.on:
            watch.eval_entries += 1
        return original_eval(model)

    monkeypatch.setattr(linear_module, "eval_semantics", counted_eval)
    yield watch


@pytest.mark.parametrize("memorization", [None, "hashed", "indexed"])
def test_the_shadow_step_reads_no_value_back_and_skips_f0_on_cached_batches(
    tmp_path: Path, spy: _Spy, memorization: str | None
) -> None:
    """Also with the memorizing shadow: its ids (hashed rows, or ``WithIndex`` batch indices) are
    checked and its offsets sized on the host, from the copy staged when the batch arrived."""
    d, n_train, n_val, batch, epochs = 8, 24, 16, 6, 2
    x, y = sphere_data(n_train + n_val, d, seed=3)
    dataset = TensorDataset(x[:n_train], y[:n_train])
    train = DataLoader(WithIndex(dataset) if memorization == "indexed" else dataset, batch_size=batch)
    val = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=n_val)
    monitor = LinearRegimeMonitor(
        n_probe=n_val, every_n_steps=100, max_overhead=None, stop_after_exit=100,
        memorization=memorization is not None,
    )  # fmt: skip
    steps: list[tuple[int, int]] = []  # (eval entries, reads) per shadow step
    shadow_step = monitor._shadow_step

    def watched(*args: Any, **kwargs: Any) -> None:
        before = (spy.eval_entries, len(spy.reads))
        spy.on = True
        try:
            shadow_step(*args, **kwargs)
        finally:
            spy.on = False
        steps.append((spy.eval_entries - before[0], len(spy.reads) - before[1]))

    monitor._shadow_step = watched  # type: ignore[method-assign]
    trainer = make_trainer(tmp_path, [monitor], name="per_step", max_epochs=epochs)
    trainer.fit(Regressor(TwoLayerNet(d, 32, seed=1), 0.1), train, val)
    per_epoch = n_train // batch
    assert len(steps) == epochs * per_epoch  # the shadows followed every step
    assert monitor.core is not None and len(monitor.core.runs) == (2 if memorization else 1)
    assert spy.reads == []  # e.g. a NaN check of each batch is a bool() of a device tensor
    # f_0 ran (under eval semantics) on each first-epoch batch, never on the cached second epoch;
    # the memorizing shadow shares the paper's cache, so it adds no forward
    assert [entries for entries, _ in steps] == [1] * per_epoch + [0] * per_epoch
