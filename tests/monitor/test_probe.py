"""The probe set: from the ``probe`` argument or from dataloaders, without touching the global RNG."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lin_probe.monitor.probe import (
    ProbeSet,
    default_batch_to_xy,
    probe_from_argument,
    probe_from_dataloaders,
)


def _rows(n: int, d: int = 3, *, offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """Row i of x is (offset + i, offset + i + 0.1, ...): each row says which example it is."""
    x = offset + torch.arange(n, dtype=torch.float32)[:, None] + 0.1 * torch.arange(d, dtype=torch.float32)
    return x, offset + torch.arange(n, dtype=torch.float32)[:, None]


def _loader(n: int, batch_size: int, *, offset: float = 0.0, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(*_rows(n, offset=offset)), batch_size=batch_size, shuffle=shuffle)


# ------------------------------------------------------------------------------------------ argument


def test_tensor_argument_is_truncated_and_has_no_targets() -> None:
    x, _ = _rows(10)
    probe = probe_from_argument(x, n_probe=4)
    assert torch.equal(probe.inputs, x[:4])
    assert probe.targets is None
    assert len(probe) == 4


@pytest.mark.parametrize("container", [tuple, list])
def test_pair_argument_truncates_inputs_and_targets_alike(container: type) -> None:
    x, y = _rows(10)
    probe = probe_from_argument(container([x, y]), n_probe=6)
    assert torch.equal(probe.inputs, x[:6])
    assert probe.targets is not None and torch.equal(probe.targets, y[:6])


def test_n_probe_above_the_rows_keeps_them_all() -> None:
    x, y = _rows(5)
    probe = probe_from_argument((x, y), n_probe=100)
    assert torch.equal(probe.inputs, x) and len(probe) == 5


def test_argument_is_copied() -> None:
    x, y = _rows(5)
    probe = probe_from_argument((x, y), n_probe=5)
    x.add_(100.0)
    y.add_(100.0)
    assert torch.equal(probe.inputs, _rows(5)[0])
    assert probe.targets is not None and torch.equal(probe.targets, _rows(5)[1])


def test_pair_with_mismatched_rows_is_refused() -> None:
    x, y = _rows(5)
    with pytest.raises(ValueError, match="5 rows but targets have 4"):
        probe_from_argument((x, y[:4]), n_probe=5)


@pytest.mark.parametrize(
    "bad",
    [
        None,
        3.0,
        [torch.zeros(3, 2)],
        (torch.zeros(3, 2), torch.zeros(3), torch.zeros(3)),
        (torch.zeros(3, 2), [1]),
    ],
    ids=["none", "float", "one-item", "three-items", "non-tensor-target"],
)
def test_argument_of_another_type_is_refused(bad: object) -> None:
    with pytest.raises(TypeError, match="`probe` must be"):
        probe_from_argument(bad, n_probe=4)  # type: ignore[arg-type]


@pytest.mark.parametrize(("rows", "n_probe"), [(1, 8), (8, 1)])
def test_fewer_than_two_examples_are_refused(rows: int, n_probe: int) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        probe_from_argument(_rows(rows)[0], n_probe=n_probe)


@pytest.mark.parametrize("where", ["inputs", "targets"])
def test_non_finite_probe_is_refused(where: str) -> None:
    x, y = _rows(4)
    (x if where == "inputs" else y)[2, 0] = float("inf")
    with pytest.raises(ValueError, match=f"probe {where}.*NaN/inf"):
        probe_from_argument((x, y), n_probe=4)


def test_non_finite_row_beyond_n_probe_is_ignored() -> None:
    x, _ = _rows(6)
    x[5, 0] = float("nan")
    assert torch.equal(probe_from_argument(x, n_probe=5).inputs, _rows(6)[0][:5])


# ------------------------------------------------------------------------------------------ dataloaders


def test_validation_loader_is_preferred() -> None:
    probe = probe_from_dataloaders(
        _loader(8, 4, offset=1000.0), _loader(8, 4), n_probe=6, batch_to_xy=default_batch_to_xy
    )
    x_val, y_val = _rows(8, offset=1000.0)
    assert torch.equal(probe.inputs, x_val[:6])
    assert probe.targets is not None and torch.equal(probe.targets, y_val[:6])
    assert "validation" in probe.source


@pytest.mark.parametrize(
    "val",
    [None, [], {}, _loader(0, 4, offset=1000.0)],
    ids=["none", "empty-list", "empty-dict", "no-batches"],
)
def test_training_loader_when_validation_yields_nothing(val: object) -> None:
    probe = probe_from_dataloaders(val, _loader(8, 3), n_probe=5, batch_to_xy=default_batch_to_xy)
    assert torch.equal(probe.inputs, _rows(8)[0][:5])  # 3 + 3 rows read, first 5 kept
    assert "training" in probe.source


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_first_of_several_loaders(kind: str) -> None:
    first, second = _loader(6, 4, offset=1000.0), _loader(6, 4, offset=2000.0)
    val = [first, second] if kind == "list" else {"a": first, "b": second}
    probe = probe_from_dataloaders(val, None, n_probe=6, batch_to_xy=default_batch_to_xy)
    assert torch.equal(probe.inputs, _rows(6, offset=1000.0)[0])


def test_fewer_examples_than_n_probe_takes_them_all() -> None:
    probe = probe_from_dataloaders(_loader(5, 2), None, n_probe=64, batch_to_xy=default_batch_to_xy)
    assert torch.equal(probe.inputs, _rows(5)[0])


def test_targets_none_when_batch_to_xy_gives_none() -> None:
    probe = probe_from_dataloaders(_loader(6, 4), None, n_probe=6, batch_to_xy=lambda b: (b[0], None))
    assert probe.targets is None and torch.equal(probe.inputs, _rows(6)[0])


def test_no_loader_yields_a_batch() -> None:
    with pytest.raises(ValueError, match="probe="):
        probe_from_dataloaders(None, [], n_probe=4, batch_to_xy=default_batch_to_xy)


def test_non_finite_dataloader_probe_is_refused() -> None:
    x, y = _rows(6)
    x[1, 1] = float("nan")
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    with pytest.raises(ValueError, match="NaN/inf"):
        probe_from_dataloaders(loader, None, n_probe=6, batch_to_xy=default_batch_to_xy)


def _draws() -> tuple[float, float, Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(4)


def test_reading_a_shuffling_loader_leaves_every_rng_as_it_was() -> None:
    """A shuffling loader (global torch RNG) and a batch_to_xy drawing from python and numpy."""

    def noisy_batch_to_xy(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        random.random()
        np.random.rand(3)
        torch.rand(2)
        return batch[0], batch[1]

    def seed() -> None:
        random.seed(5)
        np.random.seed(5)
        torch.manual_seed(5)

    seed()
    untouched = _draws()

    seed()
    loader = _loader(20, 4, shuffle=True)
    probe = probe_from_dataloaders(loader, None, n_probe=8, batch_to_xy=noisy_batch_to_xy)
    after = _draws()
    assert after[:2] == untouched[:2]
    assert torch.equal(after[2], untouched[2])

    # the same reads outside the guard do move all three generators (so the check above can fail)
    seed()
    for batch in loader:
        noisy_batch_to_xy(batch)
        break
    moved = _draws()
    assert moved[0] != untouched[0] and moved[1] != untouched[1] and not torch.equal(moved[2], untouched[2])

    # the probe is a shuffled draw of real rows: each row appears in the dataset, no repeats
    x, _ = _rows(20)
    matches = (probe.inputs[:, None, :] == x[None, :, :]).all(dim=2)
    assert matches.sum(dim=1).tolist() == [1] * 8
    assert len(set(matches.float().argmax(dim=1).tolist())) == 8


# ------------------------------------------------------------------------------------------ ProbeSet.to


def test_to_casts_floating_inputs_only() -> None:
    x, y = _rows(4)
    moved = ProbeSet(x, y, "src").to(torch.device("cpu"), torch.float64)
    assert moved.inputs.dtype == torch.float64 and torch.equal(moved.inputs, x.double())
    assert moved.targets is not None and moved.targets.dtype == torch.float32  # targets keep their dtype
    assert torch.equal(moved.targets, y)
    assert moved.source == "src"

    tokens = torch.arange(12).reshape(4, 3)
    kept = ProbeSet(tokens, None, "tok").to(torch.device("cpu"), torch.float64)
    assert kept.inputs.dtype == torch.int64 and torch.equal(kept.inputs, tokens)
    assert kept.targets is None


def test_to_without_dtype_keeps_dtypes() -> None:
    x, y = _rows(3)
    moved = ProbeSet(x.double(), y.long(), "src").to(torch.device("cpu"))
    assert (moved.inputs.dtype, moved.targets.dtype) == (torch.float64, torch.int64)  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------ default_batch_to_xy


@pytest.mark.parametrize(
    "make",
    [
        lambda x, y: (x, y),
        lambda x, y: [x, y],
        lambda x, y: (x, y, torch.arange(len(x))),
        lambda x, y: {"x": x, "y": y, "other": 1},
    ],
    ids=["tuple", "list", "tuple-with-index", "dict"],
)
def test_default_batch_to_xy_finds_inputs_and_targets(make) -> None:
    x, y = _rows(3)
    got_x, got_y = default_batch_to_xy(make(x, y))
    assert got_x is x and got_y is y


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({"inputs": torch.zeros(2), "targets": torch.zeros(2)}, "batch_to_xy"),
        (torch.zeros(4, 2), "batch_to_xy"),
        ((torch.zeros(2),), "batch_to_xy"),
        ("xy", "batch_to_xy"),
        (([1.0, 2.0], torch.zeros(2)), "must be tensors"),
    ],
    ids=["dict-other-keys", "bare-tensor", "one-item", "string", "list-inputs"],
)
def test_default_batch_to_xy_names_the_fix(batch: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        default_batch_to_xy(batch)
