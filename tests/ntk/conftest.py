"""Fixtures shared by the NTK tests."""

from __future__ import annotations

import pytest

from lin_probe.ntk import dense as dense_module


@pytest.fixture
def fresh_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop warning is once per process; each test starts as a fresh process would."""
    monkeypatch.setattr(dense_module, "_LOOP_WARNED", False)
