"""Long start-up work shows progress and stops on SIGTERM (Lightning's flag) or Ctrl-C (SIGINT), with nothing trained."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
from _lightning_setups import Regressor, loaders, make_trainer, sphere_data
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

import lin_probe.monitor.progress as progress_module
from lin_probe import LinearRegimeMonitor

D = 8


class CountingNet(nn.Module):
    """A small net that counts its forwards and, at the ``trigger``-th, calls ``on_trigger``."""

    def __init__(self, trigger: int, on_trigger) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, 3))
        self.calls, self.trigger, self.on_trigger = 0, trigger, on_trigger

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.trigger:
            self.on_trigger()
        return self.body(x).sum(dim=1, keepdim=True)


def test_sigterm_during_the_start_up_ntk_stops_the_fit_before_any_step(tmp_path: Path) -> None:
    """Lightning's SIGTERM handler only sets ``trainer.received_sigterm``; the start-up's progress hook
    reads it at every unit of work and raises Lightning's own SIGTERMException, as its loops do."""
    x, y = sphere_data(96, D)
    train, val = loaders(x[:64], y[:64], x[64:], y[64:], 16)
    holder: dict[str, pl.Trainer] = {}

    def sigterm() -> None:
        holder["trainer"]._signal_connector.received_sigterm = True  # what the handler does

    net = CountingNet(trigger=3, on_trigger=sigterm)  # the 3rd forward is inside the start-up's work
    monitor = LinearRegimeMonitor(n_probe=32, every_n_steps=2, max_overhead=None)
    trainer = holder["trainer"] = make_trainer(tmp_path, [monitor], max_steps=5, limit_val_batches=0)
    with pytest.raises(SIGTERMException):
        trainer.fit(Regressor(net, 0.1), train, val)
    assert trainer.global_step == 0
    assert net.calls < 3 + 64  # stopped within a unit of work, not after the whole NTK (≥ 32 × C forwards)


def test_long_start_up_work_prints_progress_with_an_estimate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the quiet period at 0 (a test cannot wait 5 s), every unit of the start-up's NTK reports."""
    monkeypatch.setattr(progress_module, "QUIET_FOR_S", 0.0)
    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)
    x, y = sphere_data(96, D)
    train, val = loaders(x[:64], y[:64], x[64:], y[64:], 16)
    # a small memory budget: the NTK in several blocks, each a unit of progress
    monitor = LinearRegimeMonitor(n_probe=32, every_n_steps=2, max_overhead=None, memory_budget=1 << 14)
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [monitor], max_steps=2).fit(
            Regressor(CountingNet(10**9, lambda: None), 0.1), train, val
        )
    lines = [r.getMessage() for r in caplog.records if "left (Ctrl-C or SIGTERM stops it)" in r.getMessage()]
    assert lines and all(line.startswith("lin_probe: NTK at init on 32 probe examples: ") for line in lines)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(
    ("sent_signal", "said"), [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "KeyboardInterrupt")]
)
def test_a_real_signal_during_a_long_start_up_ends_the_process(
    tmp_path: Path, sent_signal: signal.Signals, said: str
) -> None:
    """The scheduler's ``timeout`` (SIGTERM) or Ctrl-C (SIGINT) while the NTK at init runs (here made
    long with a per-example loop model) ends the process within seconds, before any training step:
    the monitor catches neither. The child restores Python's own SIGINT handler, which a process
    started in the background inherits as ignored."""
    script = tmp_path / "fit.py"
    script.write_text(
        textwrap.dedent(f"""
        import signal, sys, time, torch, pytorch_lightning as pl
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from _lightning_setups import Regressor, loaders, make_trainer, sphere_data
        from torch import nn
        from lin_probe import LinearRegimeMonitor

        class Slow(nn.Module):  # 0.1 s a forward and a tiny memory budget: a start-up of many blocks
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4))
            def forward(self, x):
                time.sleep(0.1)
                return self.body(x)

        x, y = sphere_data(512, 32, outputs=4)
        train, val = loaders(x[:256], y[:256], x[256:], y[256:], 16)
        monitor = LinearRegimeMonitor(n_probe=256, every_n_steps=1000, max_overhead=None, memory_budget=1 << 16)
        print("fit starts", flush=True)
        make_trainer({str(tmp_path)!r}, [monitor], max_steps=3).fit(Regressor(Slow(), 0.1), train, val)
        print("fit returned", flush=True)
    """)
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "fit starts"
    time.sleep(4.0)  # imports done, inside the start-up's NTK
    assert proc.poll() is None, "the start-up finished before the signal: make the model slower"
    sent = time.perf_counter()
    os.kill(proc.pid, sent_signal)
    output, _ = proc.communicate(timeout=60)
    stopped_after = time.perf_counter() - sent
    # Lightning's SIGTERMException is a SystemExit, and on KeyboardInterrupt Lightning shuts down and
    # exits 1: the process ends as Lightning's loops end it
    assert "fit returned" not in output and said in output, output[-2000:]
    if sent_signal == signal.SIGINT:
        assert proc.returncode == 1  # Lightning's sys.exit(1) after its graceful shutdown
    assert stopped_after < 15.0, output[-2000:]
