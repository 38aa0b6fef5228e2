"""The loss the shadow is trained with: the user's loss, named or given as a function.

The linear shadow has to follow the same gradient flow as the network, so it must be trained on
exactly the user's loss. Two common losses can be named; anything else is passed as a callable.
``"auto"`` (the monitor's default) is resolved once, at train start, by :func:`infer_loss` from the
probe's targets and the model's output: the batch already says which of the two it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
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
AUTO = "auto"
"""The loss name resolved by :func:`infer_loss` before the shadows are built."""


def infer_loss(targets: Tensor | None, outputs_per_example: int) -> tuple[str, str]:
    """``(loss name, why)`` for ``loss="auto"``, from the targets and the number ``C`` of model outputs.

    Integer class targets (one per example) with ``C > 1`` outputs are cross-entropy; floating targets
    with ``C`` values per example are MSE. Anything else is ambiguous (e.g. integer labels with a
    single output, a binary-cross-entropy model) and raises, naming the argument that settles it.
    """
    if targets is None:
        raise ValueError(
            'loss="auto" infers the loss from the probe\'s targets, but the probe has none (a tensor of '
            "inputs was given as `probe`). Pass `probe=(inputs, targets)`, or name the loss: "
            '`loss="mse"`, `loss="cross_entropy"` or a callable `loss(prediction, target)`.'
        )
    n = max(1, int(targets.shape[0]) if targets.dim() else 1)
    per_example = targets.numel() // n
    if not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool:
        if outputs_per_example > 1 and per_example == 1:
            return "cross_entropy", f"integer class targets and {outputs_per_example} outputs per example"
        problem = f"integer targets ({per_example} per example) with {outputs_per_example} model output(s) per example"
    elif targets.is_floating_point() and per_example == outputs_per_example:
        return "mse", f"floating targets with the model's {outputs_per_example} output(s) per example"
    else:
        problem = (
            f"{targets.dtype} targets ({per_example} per example) with {outputs_per_example} model "
            "output(s) per example"
        )
    raise ValueError(
        f'loss="auto" cannot tell the training loss from {problem}. Pass `loss=` the loss your '
        'training_step minimises: "mse", "cross_entropy" or a callable `loss(prediction, target)` with '
        "mean reduction."
    )


def resolve_loss(loss: str | LossFn) -> LossFn:
    """Turn a loss name (``"mse"``, ``"cross_entropy"``) or a callable ``loss(pred, target)`` into a callable."""
    if isinstance(loss, str):
        if loss == AUTO:
            raise ValueError(
                'loss="auto" is resolved at train start from the probe\'s targets (lin_probe.losses.infer_loss); '
                "resolve it before asking for the loss function (MonitorConfig.with_inferred_loss)."
            )
        if loss not in _NAMED:
            raise ValueError(
                f"Unknown loss {loss!r}; valid names are {sorted([AUTO, *_NAMED])}, or pass a callable "
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


__all__ = ["AUTO", "LossFn", "infer_loss", "is_classification", "resolve_loss"]
