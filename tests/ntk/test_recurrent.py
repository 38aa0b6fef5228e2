"""Exact NTKs of RNN models through batched-forward Jacobians, and the per-example loop fallback.

Reference: the float64 brute force of ``_ntk_reference`` (one ``autograd.grad`` per example and
output on an eval-mode deep copy, each example run alone).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _ntk_reference import DTYPE, assert_close, brute_force_ntk, loop_warnings
from torch import Tensor, nn

from lin_probe.ntk import empirical_ntk
from lin_probe.ntk.dense import BatchedForwardJacobian


class Recurrent(nn.Module):
    """Examples on dim 0 for the NTK; the RNN sees ``(T, B, F)`` when not ``batch_first``."""

    def __init__(
        self,
        cell: type[nn.RNNBase],
        *,
        batch_first: bool,
        layers: int,
        bidirectional: bool,
        mix: bool = False,
    ) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.mix = mix
        self.rnn = cell(3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        self.head = nn.Linear(4 * (2 if bidirectional else 1), 2)

    def forward(self, x: Tensor) -> Tensor:
        seq = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
        last = seq[:, -1] if self.batch_first else seq[-1]
        if self.mix:  # examples interact: a batched forward is not the per-example function
            last = last - last.mean(dim=0, keepdim=True) * (last.shape[0] > 1)
        return self.head(last)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(("layers", "bidirectional"), [(1, False), (2, True)])
def test_rnn_kernels_match_brute_force_without_the_loop(
    cell: type[nn.RNNBase], batch_first: bool, layers: int, bidirectional: bool, fresh_warning: None
) -> None:
    torch.manual_seed(3)
    model = Recurrent(cell, batch_first=batch_first, layers=layers, bidirectional=bidirectional).to(DTYPE)
    x = torch.randn(9, 5, 3, dtype=DTYPE)  # 9 examples: sub-chunks of 4, 4 and 1
    expected = brute_force_ntk(model, x)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for kwargs in ({"method": "generic"}, {"method": "auto"}, {"method": "generic", "chunk_size": 2}):
            assert_close(empirical_ntk(model, x, **kwargs), expected)
    assert not loop_warnings(record)
    assert torch.backends.mkldnn.enabled  # oneDNN restored after the measurement


def test_failed_batched_jacobian_falls_back_to_the_exact_loop(
    monkeypatch: pytest.MonkeyPatch, fresh_warning: None
) -> None:
    def broken(self: BatchedForwardJacobian, *args: object) -> None:
        raise RuntimeError("no batching rule for this op")

    monkeypatch.setattr(BatchedForwardJacobian, "__call__", broken)
    torch.manual_seed(4)
    model = Recurrent(nn.LSTM, batch_first=True, layers=2, bidirectional=True).to(DTYPE)
    x = torch.randn(6, 4, 3, dtype=DTYPE)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kernel = empirical_ntk(model, x, method="generic", chunk_size=4)
    assert_close(kernel, brute_force_ntk(model, x))
    messages = loop_warnings(record)
    assert len(messages) == 1 and "no batching rule" in messages[0]


def test_examples_that_interact_are_detected_and_looped(fresh_warning: None) -> None:
    """A batch-mean inside the model: batched-forward Jacobians would be wrong, the check catches it."""
    torch.manual_seed(5)
    model = Recurrent(nn.GRU, batch_first=True, layers=1, bidirectional=False, mix=True).to(DTYPE)
    x = torch.randn(5, 4, 3, dtype=DTYPE)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kernel = empirical_ntk(model, x, method="generic")
    assert_close(kernel, brute_force_ntk(model, x))
    messages = loop_warnings(record)
    assert len(messages) == 1 and "mixes examples" in messages[0]
