"""Per-example offsets (the ``c·I`` part of the NTK on training points) and example identity.

At initialisation the NTK is ``Θ_0 ≈ a·K + b·11ᵀ + c·I``. The paper's shadow ``f_0 + ψB`` has kernel
``a·K + b·11ᵀ`` only; the ``c·I`` part is what lets a network fit its own training points, and when
``n`` is a small multiple of ``d`` its absence makes that shadow depart early even though the
network's NTK has not moved. The memorizing shadow is the paper's shadow plus one offset per
training example (an :class:`ExampleOffsets` component of :class:`~lin_probe.shadows.linear.LinearShadow`),

    f_memo(x, i) = f_0(x) + ψ(x)B + √c·V[i]          (held-out points: no V term)

so that gradient descent on ``(B, V)`` is kernel gradient descent with ``a·K + b·11ᵀ + c·I`` on
training points (``∂f_i/∂V_i = √c``, so example ``i``'s own step adds ``c·∂L/∂f_i``) and with
``a·K + b·11ᵀ`` elsewhere.

Memory: ``V`` holds ``N_train × C`` floats (plus the same again per optimizer buffer: one for SGD
momentum, two for Adam), and ``ExampleIds`` in hashing mode 16 bytes (plus dict overhead) per
distinct input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lin_probe._validation import check_int
from lin_probe.shadows.digests import DIGEST_BYTES, BatchDigests, digests_of, index_tensor, row_digests

if TYPE_CHECKING:
    import numpy as np

UNKNOWN_ID = -1  # the id of a point that is not a training example (held out): no V term
_MODES = (None, "index", "hash")


# ---------------------------------------------------------------------------------------------
# the offsets table
# ---------------------------------------------------------------------------------------------


class ExampleOffsets(nn.Module):
    """``√c·V[ids]``: one trained offset row per training example, zero for held-out points.

    ``V`` (``rows × C``, zeros at start) has a row per example id; ids that are ``None``, negative
    (``UNKNOWN_ID``) or beyond the table are held-out points and get no offset. ``c`` is passed per
    call (the owning shadow's kernel holds it, so a restored kernel cannot disagree with a stored
    copy); ``c <= 0`` (a fit whose diagonal is below the affine part) gives no offset. Checkpoints
    hold ``V`` under the key ``V`` (``offsets.V`` inside a shadow); loading resizes ``V`` to the
    saved table.
    """

    def __init__(
        self,
        out_features: int,
        *,
        capacity: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_int("out_features", out_features, minimum=1)
        check_int("capacity", capacity, minimum=0)
        self.out_features = out_features
        self.V = nn.Parameter(torch.zeros(capacity, out_features, dtype=dtype, device=device))

    @property
    def rows(self) -> int:
        """Number of example offsets allocated."""
        return int(self.V.shape[0])

    @staticmethod
    def scale(c: float) -> float:
        """``√c`` (0 for ``c ≤ 0``): ``∂f_i/∂V_i``, so example ``i``'s own kernel entry gains ``c``."""
        return math.sqrt(max(c, 0.0))

    def forward(self, ids: Tensor | None, n: int, *, c: float) -> Tensor:
        """``√c·V[ids]`` (``n × C``), zero for held-out ids (``None``, negative or unallocated)."""
        V = self.V
        if ids is None or self.rows == 0:
            return torch.zeros(n, self.out_features, dtype=V.dtype, device=V.device)
        ids = _checked_ids(ids, n).to(V.device)
        known = (ids >= 0) & (ids < self.rows)
        gathered = V[ids.clamp(0, self.rows - 1)]
        return torch.where(known[:, None], gathered, torch.zeros((), dtype=V.dtype, device=V.device)) * (
            self.scale(c)
        )

    def training_ids(self, ids: Tensor, *, values_checked: bool = False) -> Tensor:
        """Ids of training examples: a 1-D integer tensor of non-negative ids, on ``V``'s device.

        ``values_checked``: the caller checked the values on the host (:class:`ExampleIds`), so they
        are not read back here (on an accelerator that read would wait for the step's kernels)."""
        if not isinstance(ids, Tensor):
            raise TypeError(
                f"`ids` must be a tensor of example ids (from ExampleIds), got {type(ids).__name__}."
            )
        ids = _checked_ids(ids, None)  # the count is checked against x in the forward
        if not values_checked and ids.numel() and int(ids.min()) < 0:
            raise ValueError(
                "Training example ids must be >= 0; held-out points (id -1) cannot be trained on."
            )
        return ids.to(self.V.device)

    def reserve(self, needed: int) -> int:
        """Make room for ids below ``needed``, at least doubling (amortised copies); returns the old count."""
        if needed <= self.rows:
            return self.rows
        return self.grow(max(needed, 2 * self.rows))

    def grow(self, rows: int) -> int:
        """Make room for ``rows`` example offsets (new rows zero, gradient padded too); returns the old count.

        ``V`` keeps its identity (its ``.data`` is replaced), so an optimizer holding it still does;
        its per-row state must be padded by the owner of that optimizer.
        """
        old = self.rows
        if rows <= old:
            return old
        V = self.V
        V.data = _pad_rows(V.data, rows)
        if V.grad is not None:
            V.grad = _pad_rows(V.grad, rows)
        return old

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Resize ``V`` to the saved table first: a checkpoint may hold more (or fewer) examples."""
        saved = state_dict.get(prefix + "V")
        if isinstance(saved, Tensor) and saved.dim() == 2 and saved.shape[0] != self.rows:
            self.V.data = torch.zeros(
                saved.shape[0], self.out_features, dtype=self.V.dtype, device=self.V.device
            )
            self.V.grad = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _pad_rows(tensor: Tensor, rows: int) -> Tensor:
    """``tensor`` with zero rows appended up to ``rows`` (the state of never-seen examples)."""
    extra = torch.zeros(rows - tensor.shape[0], *tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, extra])


def _checked_ids(ids: Tensor, n: int | None) -> Tensor:
    """Ids as a 1-D long tensor with one entry per example (``n``; ``None``: any count)."""
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(
            "`ids` must be a 1-D integer tensor of example ids (from ExampleIds), got "
            f"{type(ids).__name__}{'' if not isinstance(ids, Tensor) else f' {ids.dtype} {tuple(ids.shape)}'}."
        )
    if n is not None and ids.shape[0] != n:
        raise ValueError(f"{ids.shape[0]} ids for {n} examples; give one id per example.")
    return ids.long()


# ---------------------------------------------------------------------------------------------
# example identity
# ---------------------------------------------------------------------------------------------


class ExampleIds:
    """Maps batches to stable example ids: the batch's dataset indices when given, else input hashes.

    With ``indices`` (e.g. from ``lin_probe.data.WithIndex``) the id *is* the index. Without, each
    distinct input row gets the next free id the first time it is seen (a growing table), so an
    un-augmented dataset gets the same identities either way, up to numbering. One instance uses
    one mode: mixing would give two examples the same id. ``max_examples`` bounds the table (and
    index values), turning an unbounded growth — augmented inputs are new rows each epoch — into a
    clear error.
    """

    def __init__(self, *, max_examples: int | None = None) -> None:
        if max_examples is not None:
            check_int("max_examples", max_examples, minimum=1)
        self.max_examples = max_examples
        self.mode: str | None = None  # "index" or "hash", fixed by the first call
        self._table: dict[bytes, int] = {}
        self._keys: list[bytes] = []
        self.last_bound: int | None = None
        """Above every id of the last call, known on the host (``None``: unknown, the indices were
        checked on their device): the offsets are sized by it without reading the ids back."""

    def __len__(self) -> int:
        """Distinct examples seen in hashing mode (0 in index mode: the ids are the indices)."""
        return len(self._keys)

    def __call__(
        self, x: Tensor, indices: Tensor | None = None, digests: BatchDigests | None = None
    ) -> Tensor:
        """Ids ``(n,)`` long on ``x``'s device; unseen inputs are registered (hashing mode).

        ``digests``: ``x``'s row digests staged when the batch arrived (hashing mode uses them
        instead of copying ``x`` to the host, which would wait for the device's queued work)."""
        if indices is not None:
            self._set_mode("index")
            host = None if digests is None else digests.host_indices()
            return self._checked_indices(x, indices, host)
        self._set_mode("hash")
        ids = [self._register(key) for key in digests_of(_checked_inputs(x), digests)]
        self.last_bound = len(self._keys)
        return index_tensor(ids, x.device)

    def lookup(self, x: Tensor) -> Tensor:
        """Ids of already-seen inputs, ``UNKNOWN_ID`` (-1) for the rest; registers nothing.

        For a probe set drawn from training data in hashing mode: its rows that are training
        examples get their ``c·I`` term, the others are held out.
        """
        if self.mode == "index":
            raise RuntimeError(
                "ExampleIds is in index mode, where ids are dataset indices and inputs are not recorded; "
                "get the probe's ids from its batches' indices (lin_probe.data.indices_from_batch)."
            )
        keys = row_digests(_checked_inputs(x))
        return index_tensor([self._table.get(k, UNKNOWN_ID) for k in keys], x.device)

    def state_dict(self) -> dict[str, Any]:
        """Mode and hash table (ids in order) as tensors, so a resumed run maps rows to the same ids."""
        keys = torch.frombuffer(bytearray(b"".join(self._keys)), dtype=torch.uint8) if self._keys else None
        table = (
            keys.reshape(-1, DIGEST_BYTES).clone()
            if keys is not None
            else torch.zeros(0, DIGEST_BYTES, dtype=torch.uint8)
        )
        return {"mode": self.mode, "keys": table, "max_examples": self.max_examples}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; a missing entry keeps its fresh default.

        Defaults: no mode yet, an empty hash table, this instance's ``max_examples``.
        """
        if not isinstance(state, Mapping):
            raise ValueError("ExampleIds state must be the dict returned by ExampleIds.state_dict().")
        mode = state.get("mode")
        if mode not in _MODES:
            raise ValueError(f"ExampleIds state 'mode' must be one of {_MODES}, got {mode!r}.")
        keys = state.get("keys")
        if keys is None:
            keys = torch.zeros(0, DIGEST_BYTES, dtype=torch.uint8)
        if not isinstance(keys, Tensor) or keys.dim() != 2 or keys.shape[1] != DIGEST_BYTES:
            raise ValueError(f"ExampleIds state 'keys' must be a (N, {DIGEST_BYTES}) uint8 tensor.")
        max_examples = state.get("max_examples", self.max_examples)
        if max_examples is not None:
            check_int("max_examples", max_examples, minimum=1)
        self.mode = mode
        self.max_examples = max_examples
        self._keys = [bytes(row.tolist()) for row in keys.to(torch.uint8)]
        self._table = {key: i for i, key in enumerate(self._keys)}

    def _set_mode(self, mode: str) -> None:
        """Fix the mode on first use; refuse a switch, which would alias two examples' ids."""
        if self.mode is None:
            self.mode = mode
        elif self.mode != mode:
            raise ValueError(
                f"ExampleIds was first used in {self.mode} mode and now in {mode} mode; ids from the two "
                "would collide. Give indices for every batch (WithIndex) or for none."
            )

    def _register(self, key: bytes) -> int:
        """The id of ``key``, adding it to the table when new."""
        found = self._table.get(key)
        if found is not None:
            return found
        if self.max_examples is not None and len(self._keys) >= self.max_examples:
            raise ValueError(
                f"More than max_examples={self.max_examples} distinct inputs seen: inputs are probably "
                "augmented or noisy, so hashing counts every draw as a new example. Wrap the dataset in "
                "lin_probe.data.WithIndex so batches carry stable example indices."
            )
        self._table[key] = len(self._keys)
        self._keys.append(key)
        return self._table[key]

    def _checked_indices(self, x: Tensor, indices: Tensor, host: np.ndarray | None = None) -> Tensor:
        """Indices as a 1-D long tensor on ``x``'s device, one per example, in range. ``host``: the
        same indices staged on the host (:meth:`BatchDigests.host_indices`), where the values are
        checked; without it they are read from ``indices``' device and :attr:`last_bound` is unknown."""
        indices = torch.as_tensor(indices)
        on_host = host is not None and tuple(host.shape) == tuple(indices.shape)
        values: Any = host if on_host else indices  # reading the host copy never waits for a device
        rows = x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else None
        if indices.dim() != 1 or indices.is_floating_point() or indices.dtype == torch.bool:
            raise ValueError(
                f"`indices` must be a 1-D integer tensor (one dataset index per example), got dtype "
                f"{indices.dtype} and shape {tuple(indices.shape)}."
            )
        if rows is not None and indices.shape[0] != rows:
            raise ValueError(
                f"{indices.shape[0]} indices for a batch of {rows} examples; give one per example."
            )
        count = int(indices.shape[0])
        if count and int(values.min()) < 0:
            raise ValueError("`indices` must be >= 0 (dataset indices).")
        if self.max_examples is not None and count and int(values.max()) >= self.max_examples:
            raise ValueError(
                f"Index {int(values.max())} >= max_examples={self.max_examples}; pass the training set's length."
            )
        self.last_bound = (int(values.max()) + 1 if count else 0) if on_host else None
        device = x.device if isinstance(x, Tensor) else indices.device
        return indices.to(device=device, dtype=torch.long)


def _checked_inputs(x: Any) -> Tensor:
    """Hashing needs the input rows as a tensor with a batch dimension."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError(
            f"Example identity by hashing needs the batch inputs as a tensor with a leading batch dimension, "
            f"got {type(x).__name__}; wrap the dataset in lin_probe.data.WithIndex to give indices instead."
        )
    return x


__all__ = ["UNKNOWN_ID", "ExampleIds", "ExampleOffsets"]
