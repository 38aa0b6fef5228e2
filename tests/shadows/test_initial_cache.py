"""``InitialOutputCache``: f_0's outputs served by input bytes, exact, computed only for unseen rows."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lin_probe.kernel import AffineKernel
from lin_probe.shadows.initial_cache import InitialOutputCache
from lin_probe.shadows.linear import LinearShadow


class Counting:
    """``f(x) = x·W`` (a per-example map) that counts the rows it was asked for."""

    def __init__(self) -> None:
        self.weight = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
        self.rows = 0

    def __call__(self, x: Tensor) -> Tensor:
        self.rows += x.shape[0]
        return x @ self.weight


def test_cached_rows_equal_the_function_and_only_unseen_rows_are_computed() -> None:
    f, cache = Counting(), InitialOutputCache()
    data = torch.randn(20, 5)
    first = cache.outputs(data[:10], f)
    assert f.rows == 10 and len(cache) == 10
    mixed = data[5:15]  # rows 5-9 seen, 10-14 new
    out = cache.outputs(mixed, f)
    assert f.rows == 15  # only the 5 new rows were computed
    torch.testing.assert_close(out, mixed @ f.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(first, data[:10] @ f.weight, rtol=0, atol=1e-6)
    again = cache.outputs(data[:15].flip(0), f)
    assert f.rows == 15 and cache.hits == 5 + 15
    torch.testing.assert_close(again, data[:15].flip(0) @ f.weight, rtol=0, atol=1e-6)


def test_a_changed_byte_is_a_different_example() -> None:
    f, cache = Counting(), InitialOutputCache()
    x = torch.randn(4, 5)
    cache.outputs(x, f)
    nudged = x.clone()
    nudged[2, 3] = torch.nextafter(nudged[2, 3], torch.tensor(10.0))
    out = cache.outputs(nudged, f)
    assert f.rows == 5  # the nudged row only
    torch.testing.assert_close(out, nudged @ f.weight, rtol=0, atol=1e-6)
    cache.outputs(x.double(), lambda rows: rows @ f.weight.double())  # another dtype: other bytes
    assert len(cache) == 4 + 1 + 4


def test_a_full_cache_of_never_repeating_inputs_switches_itself_off() -> None:
    """Augmentation: every batch is new. Once full and a table's worth of lookups found < 10 %, the
    cache stops hashing and frees its rows; results stay exact throughout."""
    f = Counting()
    cache = InitialOutputCache(max_bytes=8 * 3 * 4)  # room for 8 rows of 3 float32
    for _ in range(6):
        x = torch.randn(4, 5)
        torch.testing.assert_close(cache.outputs(x, f), x @ f.weight, rtol=0, atol=1e-6)
    assert not cache.enabled and len(cache) == 0
    computed = f.rows
    x = torch.randn(4, 5)
    cache.outputs(x, f)
    assert f.rows == computed + 4


def test_a_full_cache_of_repeating_inputs_keeps_serving() -> None:
    f = Counting()
    cache = InitialOutputCache(max_bytes=8 * 3 * 4)
    data = torch.randn(12, 5)  # 12 examples, room for 8: rows 8-11 are always recomputed
    for _ in range(5):
        for start in (0, 4, 8):
            batch = data[start : start + 4]
            torch.testing.assert_close(cache.outputs(batch, f), batch @ f.weight, rtol=0, atol=1e-6)
    assert cache.enabled and len(cache) == 8
    assert f.rows == 12 + 4 * 4  # first epoch all; later epochs the 4 that did not fit


def test_stored_rows_are_copies_of_distinct_keys_up_to_the_budget() -> None:
    """A batch with a repeated row and more rows than fit: the first distinct rows are kept, once
    each, as copies (the computed output can be changed afterwards without touching them)."""
    f = Counting()
    cache = InitialOutputCache(max_bytes=3 * 3 * 4)  # room for 3 rows of 3 float32
    data = torch.randn(4, 5)
    batch = torch.cat([data[:1], data[:1], data[1:]])  # row 0 twice, then rows 1-3
    out = cache.outputs(batch, f)
    assert len(cache) == 3  # rows 0, 1, 2; row 3 did not fit
    out.zero_()
    again = cache.outputs(data[:3], f)
    assert f.rows == 5  # all three served from the cache
    torch.testing.assert_close(again, data[:3] @ f.weight, rtol=0, atol=1e-6)
    whole = InitialOutputCache()  # every row new and kept: the one-copy path
    whole.outputs(data, f).zero_()
    torch.testing.assert_close(whole.outputs(data, f), data @ f.weight, rtol=0, atol=1e-6)


def test_the_shadow_uses_the_cache_for_f0_and_stays_exact() -> None:
    torch.manual_seed(0)
    f0 = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    calls: list[int] = []
    f0.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    x = torch.randn(10, 6)
    reference = f0(x).detach()
    calls.clear()
    shadow = LinearShadow(AffineKernel(a=1.0, b=0.5, c=0.0), in_features=6, out_features=3, initial_model=f0)
    shadow.initial_cache = InitialOutputCache()
    torch.testing.assert_close(shadow.initial_output(x), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(shadow.initial_output(x[3:]), reference[3:], rtol=0, atol=1e-6)
    assert calls == [10]  # the second batch came from the cache
