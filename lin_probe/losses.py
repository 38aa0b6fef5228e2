"""The loss the shadow is trained with: the user's loss, named or given as a function.

The linear shadow has to follow the same gradient flow as the network, so it must be trained on
exactly the user's loss. Two common losses can be named; anything else is passed as a callable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every element; a target with the prediction's size is reshaped to it.

    Reshaping covers the common ``(n, 1)`` prediction vs ``(n,)`` target case, which ``F.mse_loss``
    would otherwise broadcast to an ``n × n`` matrix (a silently wrong loss).
    """
    if target.shape != pred.shape:
        if target.numel() != pred.numel():
            raise ValueError(
                f"mse: prediction shape {tuple(pred.shape)} and target shape {tuple(target.shape)} have "
                "different numbers of elements; give one target value per model output."
            )
        target = target.reshape(pred.shape)
    return F.mse_loss(pred, target.to(pred.dtype))


def _cross_entropy(pred: Tensor, target: Tensor) -> Tensor:
    """``F.cross_entropy`` with integer class targets (any shape holding ``n`` ids) or class probabilities."""
    if not target.is_floating_point():
        if target.numel() != pred.shape[0]:
            raise ValueError(
                f"cross_entropy: {target.numel()} integer targets for {pred.shape[0]} predictions; "
                "give one class index per example."
            )
        return F.cross_entropy(pred, target.reshape(-1).long())
    if target.shape != pred.shape:
        raise ValueError(
            f"cross_entropy: floating targets are read as class probabilities and must have the "
            f"prediction's shape {tuple(pred.shape)}, got {tuple(target.shape)}; pass integer class "
            "indices (e.g. `y.long()`) for hard labels."
        )
    return F.cross_entropy(pred, target.to(pred.dtype))


_NAMED: dict[str, LossFn] = {"mse": _mse, "cross_entropy": _cross_entropy}


def resolve_loss(loss: str | LossFn) -> LossFn:
    """Turn a loss name (``"mse"``, ``"cross_entropy"``) or a callable ``loss(pred, target)`` into a callable."""
    if isinstance(loss, str):
        if loss not in _NAMED:
            raise ValueError(
                f"Unknown loss {loss!r}; valid names are {sorted(_NAMED)}, or pass a callable "
                "`loss(prediction, target) -> scalar tensor`."
            )
        return _NAMED[loss]
    if isinstance(loss, type):
        raise TypeError(
            f"`loss` is the class {loss.__name__}; pass an instance (e.g. `{loss.__name__}()`) or a function."
        )
    if not callable(loss):
        raise TypeError(
            f"`loss` must be one of {sorted(_NAMED)} or a callable `loss(prediction, target)`, "
            f"got {type(loss).__name__}."
        )
    return loss


def is_classification(loss: str | LossFn) -> bool:
    """Whether predictions are class logits (so class agreement and accuracy make sense)."""
    if isinstance(loss, str):
        return loss == "cross_entropy"
    return loss is _cross_entropy or loss is F.cross_entropy or isinstance(loss, nn.CrossEntropyLoss)


__all__ = ["LossFn", "is_classification", "resolve_loss"]
