"""Puts ``tests/`` on ``sys.path`` so the shared helpers (``_lightning_setups``, ``_robustness_helpers``)
import from every test folder; pytest's rootdir conftest is loaded before any test module."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest


@pytest.fixture(autouse=True)
def _no_remembered_choices() -> None:
    """``method="auto"`` remembers its timed choice per model for the process; each test starts without."""
    from lin_probe.ntk.choice import forget_choices

    forget_choices()
