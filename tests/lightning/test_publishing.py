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


class _Panels:
    """Stands in for the TensorBoard panels: records at which step images were written."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def images(self, images: dict, step: int) -> None:
        self.steps.append(step)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize(("epoch_s", "expected"), [(120.0, list(range(1, 11))), (10.0, [1, 5, 10])])
def test_epoch_end_figures_keep_drawing_within_one_percent(
    monkeypatch: pytest.MonkeyPatch, epoch_s: float, expected: list[int]
) -> None:
    """A draw takes 0.5 s. Epochs of 120 s: every epoch end draws (0.5 s per 120 s, under 1 %).
    Epochs of 10 s: an epoch end draws only while drawing so far is ≤ 1 % of the elapsed time t:
    epoch 1 (nothing drawn yet), then 0.5 s ≤ 0.01·t from t ≈ 50 s (epoch 5), then 1.0 s ≤ 0.01·t
    from t ≈ 100 s (epoch 10)."""
    import lin_probe.lightning.figure as figure_module
    import lin_probe.lightning.publishing as publishing

    clock = [0.0]
    monkeypatch.setattr(publishing.time, "monotonic", lambda: clock[0])

    def drawing(*args: object, **kwargs: object) -> dict:
        clock[0] += 0.5
        return {"2_distance": None}

    monkeypatch.setattr(figure_module, "summary_images", drawing)
    publisher = Publisher(MonitorConfig(), progress_bar=False, verbose=False)
    panels = _Panels()
    monkeypatch.setattr(publisher, "panels", lambda trainer: panels)
    regime = SimpleNamespace(exit_step=None)
    probe = SimpleNamespace(history=[], verdict_run=SimpleNamespace(regime=regime), config=MonitorConfig())
    for epoch in range(1, 11):
        clock[0] = epoch * epoch_s + 0.5 * len(panels.steps)  # training time plus drawing so far
        probe.history.append({"step": epoch})
        publisher.epoch_figure(SimpleNamespace(global_step=epoch), probe)
    assert panels.steps == expected
    publisher.epoch_figure(SimpleNamespace(global_step=10), probe)  # nothing new since: no redraw
    assert panels.steps == expected
