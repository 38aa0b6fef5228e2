"""Structured NTK of ``nn.MultiheadAttention``'s projections (``lin_probe.ntk.attention``).

Kernels are compared with the float64 brute force of ``_ntk_reference`` (one ``autograd.grad`` per
example and output of an eval-mode deep copy running torch's own attention; nothing from
``lin_probe``), at its ``RTOL = 1e-9``: the two differ in summation order only, while the bugs
targeted here (a q/k/v row block on the wrong input, a missing position sum, sequence-first inputs
read as batch-first, masks dropped, ``in_proj_weight`` counted from one block only) change entries
by O(1). A spy on the generic path proves the rule ran; the decomposition itself is compared with
the module's own forward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from _ntk_reference import assert_close, brute_force_ntk, spy_generic
from torch import Tensor, nn

from lin_probe.ntk import attention, empirical_ntk

DTYPE = torch.float64
VOCAB, LENGTH, WIDTH = 11, 5, 8


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(4321)


def _randomise_biases(module: nn.Module) -> None:
    """Non-zero projection biases (torch initialises them to 0, which would hide a bias block on the
    wrong rows)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.normal_()


class SelfAttention(nn.Module):
    """Tokens → embedding → one attention (masks as asked) → pooled head."""

    def __init__(self, *, batch_first: bool = True, need_weights: bool = False, masks: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=batch_first)
        self.head = nn.Linear(WIDTH, 3)
        self.batch_first, self.need_weights, self.masks = batch_first, need_weights, masks
        _randomise_biases(self)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)  # (n, L, E)
        if not self.batch_first:
            h = h.transpose(0, 1)
        kwargs = {}
        if self.masks:
            length = tokens.shape[1]
            kwargs["attn_mask"] = torch.triu(torch.full((length, length), float("-inf")), 1).to(h.dtype)
            kwargs["key_padding_mask"] = tokens == 0  # token 0 pads; position 0 never does below
        out, weights = self.attn(h, h, h, need_weights=self.need_weights, **kwargs)
        if not self.batch_first:
            out = out.transpose(0, 1)
        pooled = out.mean(dim=1)
        if self.need_weights:  # the attention weights feed the output too
            pooled = pooled + weights.mean(dim=(1, 2))[:, None]
        return self.head(pooled)


class EncoderDecoder(nn.Module):
    """``nn.Transformer`` on tokens: encoder self-attention, causal decoder self-attention, cross-attention."""

    def __init__(self, norm_first: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.transformer = nn.Transformer(
            WIDTH, 2, 1, 1, 16, dropout=0.1, batch_first=True, norm_first=norm_first
        )
        self.head = nn.Linear(WIDTH, 4)
        _randomise_biases(self)

    def forward(self, x: Tensor) -> Tensor:
        src, tgt = self.embed(x[:, 0]), self.embed(x[:, 1])
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[2], dtype=src.dtype)
        return self.head(self.transformer(src, tgt, tgt_mask=mask, tgt_is_causal=True).mean(dim=1))


def tokens(n: int = 4) -> Tensor:
    x = torch.randint(1, VOCAB, (n, LENGTH))
    x[1, 3:] = 0  # one padded sequence
    return x


def check_structured(model: nn.Module, x: Tensor, monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> None:
    """``structured`` and ``auto`` equal the float64 brute force without touching the generic path."""
    model = model.to(DTYPE)
    calls = spy_generic(monkeypatch)
    expected = brute_force_ntk(copy.deepcopy(model), x, weights=kwargs.get("param_weights"))  # type: ignore[arg-type]
    assert_close(empirical_ntk(model, x, method="structured", **kwargs), expected)
    assert_close(empirical_ntk(model, x, method="auto", **kwargs), expected)
    assert calls == []


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_self_attention_is_structured(
    batch_first: bool, need_weights: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = SelfAttention(batch_first=batch_first, need_weights=need_weights)
    check_structured(model, tokens(), monkeypatch)


@pytest.mark.parametrize("batch_first", [True, False])
def test_masks_are_kept(batch_first: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    check_structured(
        SelfAttention(batch_first=batch_first, masks=True, need_weights=True), tokens(), monkeypatch
    )


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_decoder_with_cross_attention_and_causal_mask(
    norm_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randint(0, VOCAB, (3, 2, LENGTH))
    check_structured(EncoderDecoder(norm_first), x, monkeypatch)


def test_learning_rate_weights_on_the_packed_projection(monkeypatch: pytest.MonkeyPatch) -> None:
    weights = {"attn.in_proj_weight": 0.25, "attn.in_proj_bias": 3.0, "attn.out_proj.weight": 0.5}
    check_structured(SelfAttention(), tokens(), monkeypatch, param_weights=weights)


def test_only_the_projection_bias_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    model = SelfAttention()
    for name, p in model.named_parameters():
        p.requires_grad_(name == "attn.in_proj_bias")
    check_structured(model, tokens(), monkeypatch)


def _generic_names(model: nn.Module, x: Tensor, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    model = model.to(DTYPE)
    calls = spy_generic(monkeypatch)
    assert_close(empirical_ntk(model, x), brute_force_ntk(copy.deepcopy(model), x))
    return set().union(*calls)


@pytest.mark.parametrize(
    "configure",
    [
        lambda m: setattr(m.attn, "add_zero_attn", True),
        lambda m: setattr(m.attn, "bias_k", nn.Parameter(torch.randn(1, 1, WIDTH))),
    ],
    ids=["add_zero_attn", "bias_k"],
)
def test_unsupported_configurations_go_generic(
    configure: Callable[[nn.Module], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = SelfAttention()
    configure(model)
    if model.attn.bias_k is not None:
        model.attn.bias_v = nn.Parameter(torch.randn(1, 1, WIDTH))
    names = _generic_names(model, tokens(), monkeypatch)
    assert {"attn.in_proj_weight", "attn.out_proj.weight"} <= names  # and the kernel is still right


def test_an_attention_called_twice_is_structured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weight sharing across depth (one attention applied twice): each projection's calls stack."""

    class Twice(SelfAttention):
        def forward(self, tokens: Tensor) -> Tensor:
            h = self.embed(tokens)
            h = self.attn(h, h, h, need_weights=False)[0]
            return self.head(self.attn(h, h, h, need_weights=False)[0].mean(dim=1))

    check_structured(Twice(), tokens(), monkeypatch)


def test_an_in_projection_read_outside_the_attention_goes_generic(monkeypatch: pytest.MonkeyPatch) -> None:
    class Reads(SelfAttention):
        def forward(self, tokens: Tensor) -> Tensor:
            extra = self.attn.in_proj_weight.sum() * 0.1  # a read the hooks cannot see
            return super().forward(tokens) + extra

    assert {"attn.in_proj_weight"} <= _generic_names(Reads(), tokens(), monkeypatch)


@pytest.mark.parametrize("batch_first", [True, False])
def test_the_tapped_forward_is_the_module_forward(batch_first: bool) -> None:
    """The decomposition against torch's own forward: outputs and attention weights, masks, cross-attention."""
    module = nn.MultiheadAttention(WIDTH, 2, batch_first=batch_first).to(DTYPE).eval()
    _randomise_biases(module)
    layout = (3, LENGTH, WIDTH) if batch_first else (LENGTH, 3, WIDTH)
    query, memory = torch.randn(layout, dtype=DTYPE), torch.randn(layout, dtype=DTYPE)
    mask = torch.triu(torch.ones(LENGTH, LENGTH, dtype=torch.bool), 1)
    padding = torch.zeros(3, LENGTH, dtype=torch.bool)
    padding[0, -2:] = True
    cases = [
        ((query, query, query), {}),
        ((query, memory, memory), {"key_padding_mask": padding}),
        ((query, query, query), {"attn_mask": mask, "average_attn_weights": False}),
        (
            (query, query, query),
            {"attn_mask": mask.to(DTYPE) * -1e9, "need_weights": False, "is_causal": True},
        ),
    ]
    projections = attention.in_projections(module)
    for args, kwargs in cases:
        expected_out, expected_weights = module(*args, **kwargs)
        with attention.tapped(projections):
            out, weights = module(*args, **kwargs)
        assert torch.allclose(out, expected_out, rtol=1e-12, atol=1e-12)
        if expected_weights is None:
            assert weights is None
        else:
            assert torch.allclose(weights, expected_weights, rtol=1e-12, atol=1e-12)


def test_measuring_restores_the_module_and_the_fast_path() -> None:
    model = SelfAttention()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    empirical_ntk(model, tokens(), method="structured")
    assert "forward" not in vars(model.attn)
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    with pytest.raises(RuntimeError, match="boom"), attention.tapped(attention.in_projections(model.attn)):
        assert "forward" in vars(model.attn)
        raise RuntimeError("boom")
    assert "forward" not in vars(model.attn)
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
