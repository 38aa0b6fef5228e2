"""Example identity for the memorizing shadow: a dataset wrapper that puts each example's index in its batch.

The memorizing shadow (``lin_probe.shadows.offsets``) keeps one offset per *training example*: the ``c·I`` part of
the NTK acts on an example only when that same example is in a batch. So a batch has to say which
examples it holds. ``WithIndex(dataset)`` makes each item ``(x, y, idx)``; the default
``batch_to_xy`` takes the first two items, so training steps written as ``x, y = batch[:2]`` or
``x, y, _ = batch`` keep working unchanged.

Without indices, identity falls back to a hash of each input row (``lin_probe.shadows.offsets.ExampleIds``):
exact for a fixed dataset, but randomly augmented inputs then count as new examples every time
they are drawn — wrap the dataset instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

INDEX_KEY = "index"
_INTEGER_DTYPES = frozenset({torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64})


class WithIndex(Dataset):
    """``dataset[i]`` with its index ``i`` appended: ``(x, y) -> (x, y, i)``; dict items get key ``"index"``.

    The index is the example's stable identity across epochs and shuffles, which the memorizing
    shadow needs to apply an example's own ``c·I`` kernel term. ``len`` is the wrapped dataset's.
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"`dataset` must be a map-style dataset (with __getitem__ and __len__), got "
                f"{type(dataset).__name__}; iterable datasets have no stable index — rely on input hashing."
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            if INDEX_KEY in item:
                raise ValueError(
                    f"The dataset's items already have a key {INDEX_KEY!r}; rename it before wrapping in WithIndex."
                )
            return {**item, INDEX_KEY: index}
        if isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) >= 2:
            return (*item, index)
        raise TypeError(
            f"WithIndex expects items that are (x, y, ...) tuples/lists or dicts, got {type(item).__name__}; "
            "return (inputs, targets) from the dataset."
        )


def indices_from_batch(batch: Any) -> Tensor | None:
    """The example indices a ``WithIndex`` batch carries (its last item, or key ``"index"``), else ``None``.

    A tuple/list batch counts as indexed when it has at least three items and the last one is a 1-D
    integer tensor with one entry per example. A batch of that shape whose last item is *not* an
    index would be misread as one: return such items as a dict (only key ``"index"`` is read) or put
    them before the targets.
    """
    if isinstance(batch, Mapping):
        value = batch.get(INDEX_KEY)
        return value if _is_index_vector(value, None) else None
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 3:
        first, last = batch[0], batch[-1]
        rows = first.shape[0] if isinstance(first, Tensor) and first.dim() > 0 else None
        return last if _is_index_vector(last, rows) else None
    return None


def _is_index_vector(value: Any, rows: int | None) -> bool:
    """A 1-D integer tensor (with ``rows`` entries when that is known)."""
    if not isinstance(value, Tensor) or value.dim() != 1 or value.dtype not in _INTEGER_DTYPES:
        return False
    return rows is None or value.shape[0] == rows


__all__ = ["INDEX_KEY", "WithIndex", "indices_from_batch"]
