"""Where a check's numbers go: every logger at the record's step, ``callback_metrics``, the progress bar."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from lin_probe.lightning.publishing import Publisher
from lin_probe.monitor.config import MonitorConfig


class _Logger:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append((dict(metrics), step))


def _trainer(loggers: list[object]) -> SimpleNamespace:
    return SimpleNamespace(loggers=loggers, callback_metrics={}, progress_bar_metrics={}, is_global_zero=True)


def test_a_record_reaches_every_logger_callback_metrics_and_the_progress_bar() -> None:
    first, second = _Logger(), _Logger()
    trainer = _trainer([first, second])
    record = {"step": 8, "functional_distance_rel": 0.25, "ntk_gap": 0.125}
    Publisher(MonitorConfig(), progress_bar=True, verbose=False).record(trainer, record, None)
    expected = {"lin_probe/functional_distance_rel": 0.25, "lin_probe/ntk_gap": 0.125}
    assert first.calls == second.calls == [(expected, 8)]
    assert {k: float(v) for k, v in trainer.callback_metrics.items()} == expected
    assert all(isinstance(v, torch.Tensor) for v in trainer.callback_metrics.values())
    assert trainer.progress_bar_metrics == {"lin_probe/functional_distance_rel": 0.25}


def test_no_progress_bar_entry_when_switched_off_and_one_warning_without_loggers() -> None:
    trainer = _trainer([])
    publisher = Publisher(MonitorConfig(), progress_bar=False, verbose=False)
    with pytest.warns(UserWarning, match="found no logger") as record:
        for step in (0, 1, 2):
            publisher.record(trainer, {"step": step, "functional_distance_rel": 0.1}, None)
    assert sum("found no logger" in str(w.message) for w in record) == 1
    assert trainer.progress_bar_metrics == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Publisher(MonitorConfig(), progress_bar=False, verbose=False).record(
            _trainer([_Logger()]), {"step": 0, "functional_distance_rel": 0.0}, None
        )
