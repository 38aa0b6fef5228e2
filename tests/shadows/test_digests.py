"""Row digests staged when a batch arrives (``lin_probe.shadows.digests``): the same bytes-identity as
hashing in place, computed once per batch however many shadows ask, and on CUDA without a host sync."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from _lightning_setups import Regressor, TwoLayerNet, make_trainer, sphere_data
from torch.utils.data import DataLoader, TensorDataset

from lin_probe.lightning.callback import LinearRegimeMonitor
from lin_probe.shadows import digests as digests_module
from lin_probe.shadows.digests import BatchDigests, index_tensor, row_digests
from lin_probe.shadows.initial_cache import InitialOutputCache


def _blake2b_rows(x: torch.Tensor) -> list[bytes]:
    """The reference: hashlib on each row's bytes, prefixed by the dtype's name."""
    flat = x.reshape(x.shape[0], -1).contiguous()
    return [
        hashlib.blake2b(str(flat.dtype).encode() + row.numpy().tobytes(), digest_size=16).digest()
        for row in flat
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_digests_are_blake2b_of_each_rows_bytes_staged_or_not(dtype: torch.dtype) -> None:
    x = (torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0)) * 10).to(dtype)
    expected = _blake2b_rows(x)
    assert row_digests(x) == expected
    assert BatchDigests(x).get() == expected
    assert len(set(expected)) == 5  # distinct rows, distinct digests


@pytest.fixture
def hashed_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The row count of every batch hashed while the test runs."""
    calls: list[int] = []
    original = digests_module._hash_rows

    def counting(rows: torch.Tensor) -> list[bytes]:
        calls.append(rows.shape[0])
        return original(rows)

    monkeypatch.setattr(digests_module, "_hash_rows", counting)
    return calls


def test_a_staged_batch_is_hashed_once_and_refuses_another_batch(hashed_rows: list[int]) -> None:
    x = torch.randn(4, 6)
    staged = BatchDigests(x)
    first, second = staged.of(x), staged.get()
    assert first == second == _blake2b_rows(x)
    assert hashed_rows == [4]
    with pytest.raises(ValueError, match="stage them from the batch"):
        staged.of(torch.randn(3, 6))


def test_index_tensor_is_a_long_tensor_of_the_values() -> None:
    index = index_tensor([3, 0, 2], torch.device("cpu"))
    assert index.dtype == torch.long
    assert index.tolist() == [3, 0, 2]


def test_the_cache_with_staged_digests_gives_the_same_rows_as_hashing_itself() -> None:
    f = torch.nn.Linear(6, 2)
    x = torch.randn(8, 6)
    computed: list[int] = []

    def compute(rows: torch.Tensor) -> torch.Tensor:
        computed.append(rows.shape[0])
        return f(rows).detach()

    staged_cache, plain_cache = InitialOutputCache(), InitialOutputCache()
    staged_cache.outputs(x[:5], compute, BatchDigests(x[:5]))
    plain_cache.outputs(x[:5], compute)
    mixed = x[2:8]  # rows 2-4 seen, 5-7 new
    staged = staged_cache.outputs(mixed, compute, BatchDigests(mixed))
    plain = plain_cache.outputs(mixed, compute)
    torch.testing.assert_close(staged, f(mixed).detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(staged, plain, rtol=0, atol=0)
    assert computed == [5, 5, 3, 3]  # both caches computed only the three unseen rows


def test_one_hash_per_training_batch_with_three_users_of_the_digests(
    tmp_path: Path, hashed_rows: list[int]
) -> None:
    """Memorizing and centred: the paper's shadow and the memorizing one each look ``f_0`` up in the
    shared cache, and the memorizing one numbers the examples by hash. All three read one staged
    digest per batch: three hashes of every batch before."""
    d, n_train, n_val, batch = 8, 24, 16, 6
    x, y = sphere_data(n_train + n_val, d, seed=2)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch)
    val = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=n_val)
    monitor = LinearRegimeMonitor(n_probe=n_val, every_n_steps=100, memorization=True, max_overhead=None)
    trainer = make_trainer(tmp_path, [monitor], name="digests", max_steps=8)
    trainer.fit(Regressor(TwoLayerNet(d, 64, seed=1), 0.1), train, val)
    assert monitor.core is not None and len(monitor.core.runs) == 2
    assert hashed_rows.count(batch) == 8  # one per optimizer step
    assert set(hashed_rows) <= {batch, n_val}  # the rest: the probe's lookups at checks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host sync this avoids exists only on CUDA")
def test_on_cuda_staging_and_the_cached_lookup_never_sync_the_host() -> None:
    """Runs only on a CUDA machine: ``set_sync_debug_mode("error")`` raises on any synchronising call."""
    device = torch.device("cuda")
    f = torch.nn.Linear(6, 2).to(device)
    x = torch.randn(8, 6, device=device)
    cache = InitialOutputCache()
    first = BatchDigests(x[:5])
    first.get()
    cache.outputs(x[:5], lambda rows: f(rows).detach(), first)
    mixed = x[2:8]
    torch.cuda.set_sync_debug_mode("error")
    try:
        staged = BatchDigests(mixed)  # the copy is queued, not waited for
        index = index_tensor([0, 2], device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    staged.get()  # waits for that copy alone
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = cache.outputs(mixed, lambda rows: f(rows).detach(), staged)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out, f(mixed).detach())
    assert index.device.type == "cuda" and index.tolist() == [0, 2]
    assert staged.get() == row_digests(mixed)
