"""``WithIndex`` puts each example's index in its item; ``indices_from_batch`` reads it back from a batch."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lin_probe.data import INDEX_KEY, WithIndex, indices_from_batch


class _Items(Dataset):
    """A map-style dataset returning the given items as they are."""

    def __init__(self, items: list[object]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> object:
        return self.items[index]


def test_tuple_items_get_their_index_appended() -> None:
    x, y = torch.randn(5, 3), torch.randn(5)
    wrapped = WithIndex(TensorDataset(x, y))
    assert len(wrapped) == 5
    for i in range(5):
        xi, yi, idx = wrapped[i]
        assert torch.equal(xi, x[i]) and torch.equal(yi, y[i]) and idx == i


def test_list_and_longer_items_keep_every_field() -> None:
    a, b, c = torch.zeros(2), torch.ones(2), "extra"
    wrapped = WithIndex(_Items([[a, b], (a, b, c)]))
    first, second = wrapped[0], wrapped[1]
    assert len(first) == 3 and first[0] is a and first[1] is b and first[2] == 0
    assert len(second) == 4 and second[0] is a and second[1] is b and second[2] == c and second[3] == 1


def test_dict_items_get_an_index_key_and_stay_unmodified() -> None:
    item = {"x": torch.zeros(2), "y": torch.ones(1)}
    out = WithIndex(_Items([item, item]))[1]
    assert INDEX_KEY == "index"
    assert set(out) == {"x", "y", "index"} and out["index"] == 1
    assert out["x"] is item["x"] and out["y"] is item["y"]
    assert "index" not in item  # the dataset's own item is not mutated


def test_dict_item_with_an_index_key_is_refused() -> None:
    with pytest.raises(ValueError, match="already have a key 'index'"):
        WithIndex(_Items([{"x": 1, "index": 3}]))[0]


@pytest.mark.parametrize(
    "item", [torch.zeros(3), (torch.zeros(3),), "ab", 7], ids=["tensor", "1-tuple", "str", "int"]
)
def test_items_without_inputs_and_targets_are_refused(item: object) -> None:
    with pytest.raises(TypeError, match=r"\(x, y, \.\.\.\)"):
        WithIndex(_Items([item]))[0]


def test_iterable_dataset_is_refused() -> None:
    with pytest.raises(TypeError, match="map-style"):
        WithIndex(iter([(1, 2)]))


def test_shuffled_loader_batches_carry_the_rows_indices() -> None:
    x, y = torch.randn(12, 2), torch.randn(12, 1)
    loader = DataLoader(
        WithIndex(TensorDataset(x, y)), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    seen = []
    for batch in loader:
        idx = indices_from_batch(batch)
        assert idx is not None and idx.dtype == torch.int64
        assert torch.equal(batch[0], x[idx]) and torch.equal(batch[1], y[idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(12)) and seen != list(range(12))


def test_dict_loader_batches_carry_the_index_key() -> None:
    items = [{"x": torch.full((2,), float(i)), "y": torch.tensor([i])} for i in range(6)]
    batch = next(iter(DataLoader(WithIndex(_Items(items)), batch_size=4)))
    assert torch.equal(indices_from_batch(batch), torch.arange(4))  # type: ignore[arg-type]


def _x(n: int = 4) -> Tensor:
    return torch.zeros(n, 3)


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        ((_x(), _x(), torch.tensor([3, 1, 0, 2])), [3, 1, 0, 2]),
        ([_x(), _x(), torch.tensor([3, 1, 0, 2], dtype=torch.int32)], [3, 1, 0, 2]),
        ((_x(), _x(), _x(), torch.tensor([0, 1, 2, 3], dtype=torch.int16)), [0, 1, 2, 3]),
        ({"x": _x(), "index": torch.tensor([5, 6, 7, 8])}, [5, 6, 7, 8]),
        ((_x(), _x()), None),  # no third item
        ((_x(), _x(), torch.tensor([0.0, 1.0, 2.0, 3.0])), None),  # floating last item
        ((_x(), _x(), torch.tensor([True, False, True, False])), None),  # bool is not an index
        ((_x(), _x(), torch.tensor([0, 1, 2])), None),  # one entry short of the batch
        ((_x(), _x(), torch.arange(4).reshape(4, 1)), None),  # 2-D
        ((_x(), _x(), 3), None),  # not a tensor
        ({"x": _x()}, None),
        ({"x": _x(), "index": [0, 1, 2, 3]}, None),  # a list, not a tensor
        ({"x": _x(), "index": torch.tensor([[0, 1]])}, None),
        (_x(), None),
        ("abc", None),
        (None, None),
    ],
    ids=[
        "tuple",
        "list-int32",
        "four-items-int16",
        "dict",
        "pair",
        "float",
        "bool",
        "short",
        "2d",
        "scalar",
        "dict-no-key",
        "dict-list",
        "dict-2d",
        "tensor",
        "string",
        "none",
    ],
)
def test_indices_from_batch(batch: object, expected: list[int] | None) -> None:
    idx = indices_from_batch(batch)
    if expected is None:
        assert idx is None
    else:
        assert idx is not None and idx.tolist() == expected
        last = batch["index"] if isinstance(batch, dict) else batch[-1]  # type: ignore[index]
        assert idx is last  # the batch's own tensor, not a copy
