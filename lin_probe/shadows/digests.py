"""Example identity by input bytes, without stalling an accelerator: one digest per row of a batch.

Two per-step parts of the monitor know a training example by the bytes of its input row: the cache
of ``f_0``'s outputs (:mod:`lin_probe.shadows.initial_cache`) and the memorizing shadow's ids in
hashing mode (:class:`lin_probe.shadows.offsets.ExampleIds`). Hashing needs the rows on the host.
On a GPU a plain ``.cpu()`` in the shadow's step waits for every kernel queued before it — the
step's whole forward and backward — so the host can no longer run ahead of the device, and the
user's training pays for it. :class:`BatchDigests` starts the device-to-host copy when the batch
arrives (``on_train_batch_start``, before the step's kernels are queued) into pinned memory, without
blocking, and waits for that copy alone when the digests are first needed. It hashes once per batch,
however many shadows ask. On the CPU the rows are already on the host: nothing is copied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

DIGEST_BYTES = 16
"""blake2b-128: collision odds ~N²/2¹²⁹, negligible for any dataset."""


def row_digests(x: Tensor) -> list[bytes]:
    """One blake2b digest per example of the bytes of its (flattened) input row, dtype included.

    Hashing the raw bytes makes identity exact for an un-augmented dataset; any change of the
    input (augmentation, noise, another dtype) is a different example. Copies ``x`` to the host
    first, blocking: per-step callers stage the copy with :class:`BatchDigests` instead.
    """
    return _hash_rows(_rows(x).cpu())


class BatchDigests:
    """:func:`row_digests` of one batch: its host copy started at construction, hashed once, on first use
    (and, when given, the batch's example indices, copied with it: :meth:`host_indices`).

    From a CUDA tensor the copy is asynchronous into pinned memory, and an event recorded behind it
    on the current stream is what :meth:`get` waits for, not the kernels queued after it. Other
    accelerators copy blocking (their non-blocking device-to-host semantics differ). The rows are
    the batch's bytes when the object was made: an in-place change to the batch afterwards is not
    seen, so make it when the batch arrives.
    """

    def __init__(self, x: Tensor, indices: Tensor | None = None) -> None:
        rows = _rows(x)
        self.n = rows.shape[0]
        self._event: torch.Event | None = None
        self._indices: Tensor | None = None
        if rows.device.type == "cuda":
            self._host: Tensor | None = rows.to("cpu", non_blocking=True)
            if indices is not None:
                self._indices = indices.detach().to("cpu", non_blocking=True)
            self._event = torch.Event(device=rows.device)
            self._event.record()
        else:
            self._host = rows.cpu()  # the CPU: the batch itself; another accelerator: a blocking copy
            self._indices = None if indices is None else indices.detach().cpu()
        self._digests: list[bytes] | None = None

    def host_indices(self) -> np.ndarray | None:
        """The batch's example indices (``WithIndex``) on the host, copied with the rows, as an
        array (reading it is not a tensor read); ``None`` when none were staged. What the memorizing
        shadow checks and sizes its offsets by, so that it reads no index value from the device."""
        if self._indices is None:
            return None
        if self._event is not None:
            self._event.synchronize()
        return self._indices.numpy()

    def get(self) -> list[bytes]:
        """The digests, one per row (the first call waits for the copy, if any, and hashes)."""
        if self._digests is None:
            if self._event is not None:
                self._event.synchronize()
            assert self._host is not None
            self._digests, self._host = _hash_rows(self._host), None
        return self._digests

    def of(self, x: Tensor) -> list[bytes]:
        """The digests, checked to have one per row of ``x`` (the batch they were staged for)."""
        if x.shape[0] != self.n:
            raise ValueError(
                f"Digests staged for {self.n} rows were given for a batch of {x.shape[0]}: stage them "
                "from the batch they are used for."
            )
        return self.get()


def digests_of(x: Tensor, staged: BatchDigests | None) -> list[bytes]:
    """``staged``'s digests of ``x`` when given, else :func:`row_digests` (a blocking copy)."""
    return row_digests(x) if staged is None else staged.of(x)


def index_tensor(values: Sequence[int], device: torch.device) -> Tensor:
    """A host list of indices as a long tensor on ``device``, without a host sync on CUDA.

    ``torch.tensor(values, device="cuda")`` copies from pageable memory and waits for the stream's
    queued kernels; staging the list in pinned memory and copying it non-blocking does not.
    """
    host = torch.tensor(list(values), dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _rows(x: Tensor) -> Tensor:
    return x.detach().reshape(x.shape[0], -1).contiguous()


def _hash_rows(rows: Tensor) -> list[bytes]:
    """blake2b of each row's dtype name and bytes. The rows are read in place as one host array and
    the dtype prefix hashed once (a copy of the seeded hasher per row): per-row tensor views and
    byte copies had cost as much as the hashing (~2 µs a row)."""
    raw = rows.view(torch.uint8) if rows.shape[1] > 0 else rows.to(torch.uint8)
    seeded = hashlib.blake2b(str(rows.dtype).encode(), digest_size=DIGEST_BYTES)
    digests = []
    for row in raw.numpy():
        hasher = seeded.copy()
        hasher.update(row)
        digests.append(hasher.digest())
    return digests


__all__ = ["DIGEST_BYTES", "BatchDigests", "digests_of", "index_tensor", "row_digests"]
