"""``nn.MultiheadAttention``'s projections as Linear layers the structured rules can see.

The attention module never calls its projections as modules: ``F.multi_head_attention_forward``
reads ``in_proj_weight`` and ``out_proj.weight`` as tensors, so forward hooks see neither and every
Transformer's attention went to the generic (per-example Jacobian) path. Yet the projections *are*
Linear layers on sequences: ``q = x_q W_qᵀ + b_q`` (likewise ``k``, ``v``) over the token positions,
and the output projection over the attention's output. Their NTK blocks are therefore the Linear
rule's (:mod:`lin_probe.ntk.structured`), with the rows of ``in_proj_weight`` split in three: the
three row blocks are disjoint parameters, so their Gram blocks add up to the parameter's.

While the structured path records a forward, each supported attention module runs
:func:`_tapped_forward` instead of its own ``forward``: its three input projections are
:class:`InProjection` module calls and its output projection a call of ``out_proj`` (a Linear,
which the structured path already covers once it is called), and the attention in between is
torch's own ``F.multi_head_attention_forward`` with identity projections. That keeps torch's masks,
causal hint, head split and attention weights exactly (an identity matmul adds only zeros), at the
cost of four ``E × E`` products per call during the measurement, instead of a re-implementation
that would have to track torch's mask semantics. The fused fast path is turned off while recording.

Supported: packed projections (``kdim = vdim = embed_dim``), no ``bias_k``/``bias_v``, no
``add_zero_attn``, batched inputs; any other configuration keeps the module's own ``forward`` and its
parameters go generic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PARTS = ("q", "k", "v")
"""The input projections, in ``in_proj_weight``'s row order."""


class InProjection(nn.Linear):
    """One of an attention module's three input projections, called as a Linear module while recording.

    Not registered in the model (``named_modules`` is unchanged): it reads its rows of the attention
    module's *current* ``in_proj_weight`` and ``in_proj_bias`` at each call, so under
    ``functional_call`` it sees the same tensors the module would. Its own ``weight`` is a meta tensor
    that only carries the shape the Linear rule's bookkeeping reads.
    """

    def __init__(self, attention: nn.MultiheadAttention, part: int) -> None:
        width = attention.embed_dim
        super().__init__(width, width, bias=attention.in_proj_bias is not None, device="meta")
        self._attention = (attention,)  # a tuple: not registered as a submodule
        self.part = part

    @property
    def attention(self) -> nn.MultiheadAttention:
        return self._attention[0]

    def forward(self, x: Tensor) -> Tensor:
        attention = self.attention
        rows = slice(self.part * attention.embed_dim, (self.part + 1) * attention.embed_dim)
        bias = attention.in_proj_bias
        return F.linear(x, attention.in_proj_weight[rows], None if bias is None else bias[rows])


def supported(module: nn.Module) -> bool:
    """An attention module whose computation :func:`_tapped_forward` reproduces."""
    return (
        type(module).forward is nn.MultiheadAttention.forward
        and isinstance(module, nn.MultiheadAttention)
        and module._qkv_same_embed_dim
        and module.in_proj_weight is not None
        and module.bias_k is None
        and module.bias_v is None
        and not module.add_zero_attn
    )


def in_projections(attention: nn.MultiheadAttention) -> tuple[InProjection, InProjection, InProjection]:
    """The three input projections of ``attention`` (q, k, v), as modules the recorder can hook."""
    return tuple(InProjection(attention, part) for part in range(len(PARTS)))  # type: ignore[return-value]


def _tapped_forward(
    attention: nn.MultiheadAttention,
    projections: tuple[InProjection, InProjection, InProjection],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``attention(query, key, value, …)`` in eval mode, its projections as module calls (module docstring).

    Inputs are batched (``query.dim() == 3``: the recorder's probe checks that), in the module's
    layout; the projections run batch-first, so the recorded inputs and cotangents lead with the examples.
    """
    batch_first = attention.batch_first

    def leading_examples(t: Tensor) -> Tensor:
        # contiguous: matmul runs a transposed 3-D input that requires grad as a batched product with
        # the weight expanded over positions, which autograd saves (and the memory plan counts) L times
        return t if batch_first else t.transpose(0, 1).contiguous()

    q, k, v = (
        proj(leading_examples(t)).transpose(0, 1).contiguous()  # sequence-first, as F.mha takes
        for proj, t in zip(projections, (query, key, value), strict=True)
    )
    width = attention.embed_dim
    eye = torch.eye(width, dtype=q.dtype, device=q.device)
    mixed, weights = F.multi_head_attention_forward(
        q,
        k,
        v,
        width,
        attention.num_heads,
        None,
        None,
        None,
        None,
        False,
        0.0,
        eye,
        None,
        training=False,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    out = attention.out_proj(mixed.transpose(0, 1).contiguous())  # (examples, positions, E)
    return (out if batch_first else out.transpose(0, 1)), weights


@contextlib.contextmanager
def tapped(projections: Iterable[nn.Module]) -> Iterator[None]:
    """Within: every attention module owning one of ``projections`` runs :func:`_tapped_forward`.

    Its three :class:`InProjection` modules are found among ``projections`` (one missing: the
    module's own forward stays). The MHA fast path is off, as it would skip the calls. Restored on exit.
    """
    patched = []
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        for parts in _by_attention(projections).values():
            if len(parts) == len(PARTS):
                attention = parts[0].attention
                attention.forward = partial(_tapped_forward, attention, tuple(parts[i] for i in range(3)))
                patched.append(attention)
        yield
    finally:
        for attention in patched:
            del attention.forward
        torch.backends.mha.set_fastpath_enabled(fastpath)


def complete(projections: Iterable[Any]) -> set[int]:
    """``id``s of the attention modules all of whose three projections are in ``projections``."""
    return {key for key, parts in _by_attention(projections).items() if len(parts) == len(PARTS)}


def _by_attention(projections: Iterable[Any]) -> dict[int, dict[int, InProjection]]:
    """The :class:`InProjection` modules among ``projections``: attention module ``id`` → part → projection."""
    grouped: dict[int, dict[int, InProjection]] = {}
    for proj in projections:
        if isinstance(proj, InProjection):
            grouped.setdefault(id(proj.attention), {})[proj.part] = proj
    return grouped


__all__ = ["PARTS", "InProjection", "complete", "in_projections", "supported", "tapped"]
