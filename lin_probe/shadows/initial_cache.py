"""``f_0``'s outputs on training examples, cached by input bytes so later epochs skip the frozen forward.

The centred shadow ``f_0(x) + ψ(x)B`` needs ``f_0`` on every training batch: a forward of a frozen
copy of the network, about a third of a training step. ``f_0`` never changes (it is the network at
initialisation, in eval mode, with its BatchNorm statistics fixed at init), so its output is a function
of the input's bytes alone: caching it under a digest of the input row is exact, whatever the data
pipeline does. An un-augmented dataset hits the cache from the second epoch on; augmented inputs
are new bytes every time and miss, so a full table with (almost) no hits switches the cache off
rather than keep hashing. Digests are blake2b of the row's bytes and dtype (the memorizing shadow's
example identity, :mod:`lin_probe.shadows.digests`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import torch
from torch import Tensor

from lin_probe._validation import check_int
from lin_probe.shadows.digests import BatchDigests, digests_of, index_tensor

DEFAULT_CACHE_BYTES: Final[int] = 256 << 20
"""Memory for cached outputs: 256 MiB (50,000 examples × 10 float32 outputs take 2 MB)."""

MIN_HIT_RATE: Final[float] = 0.1
"""Below this share of rows found, a full cache is switched off: the inputs do not repeat (augmentation)."""


class InitialOutputCache:
    """``x ↦ f_0(x)`` rows by input digest, running ``f_0`` only on rows not seen before."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        check_int("max_bytes", max_bytes, minimum=0)
        self.max_bytes = max_bytes
        self.enabled = max_bytes > 0
        self._rows: dict[bytes, Tensor] = {}
        self._bytes = 0
        self.hits = 0
        self.lookups = 0
        self._full_since: tuple[int, int] | None = None  # (lookups, hits) when the table filled up

    def __len__(self) -> int:
        return len(self._rows)

    def outputs(
        self, x: Tensor, compute: Callable[[Tensor], Tensor], digests: BatchDigests | None = None
    ) -> Tensor:
        """``compute(x)`` (``n × C``), with cached rows taken from the cache and only the others computed.

        ``digests``: ``x``'s row digests staged when the batch arrived (``None``: hashed here, after a
        blocking copy to the host)."""
        if not self.enabled or not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] == 0:
            return compute(x)
        keys = digests_of(x, digests)
        found = [self._rows.get(key) for key in keys]
        missing = [i for i, row in enumerate(found) if row is None]
        self.lookups += len(keys)
        self.hits += len(keys) - len(missing)
        self._judge()
        if len(missing) == len(keys):
            out = compute(x)
            self._store(keys, out)
            return out
        if missing:
            index = index_tensor(missing, x.device)
            computed = compute(x.index_select(0, index))
            self._store([keys[i] for i in missing], computed)
            for slot, row in zip(missing, computed, strict=True):
                found[slot] = row
        return torch.stack(found)  # type: ignore[arg-type]

    def _store(self, keys: list[bytes], out: Tensor) -> None:
        """Keep the rows of unseen keys, in order, until the table is full; one copy for all of them
        (a copy per row was ``n`` small device copies a step on a GPU)."""
        if self._full_since is not None:
            return
        row_bytes = out[0].numel() * out.element_size() if out.shape[0] else 0
        new: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key in self._rows or key in new:
                continue
            if self._bytes + (len(new) + 1) * row_bytes > self.max_bytes:
                self._full_since = (self.lookups, self.hits)
                break
            new[key] = i
        if not new:
            return
        rows = out.detach()
        block = (
            rows.clone()
            if len(new) == rows.shape[0]
            else rows.index_select(0, index_tensor(list(new.values()), rows.device))
        )
        for key, row in zip(new, block, strict=True):
            self._rows[key] = row
        self._bytes += len(new) * row_bytes

    def _judge(self) -> None:
        """Once full, after as many lookups as rows held: keep serving if the inputs repeat, else stop
        hashing (and free the rows): augmented inputs would only ever miss."""
        if self._full_since is None:
            return
        lookups, hits = self.lookups - self._full_since[0], self.hits - self._full_since[1]
        if lookups >= max(len(self._rows), 1) and hits < MIN_HIT_RATE * lookups:
            self.enabled = False
            self._rows.clear()
            self._bytes = 0


__all__ = ["DEFAULT_CACHE_BYTES", "MIN_HIT_RATE", "InitialOutputCache"]
