"""Mirroring the user's optimizer onto a shadow: same update rule, same hyperparameters, same lr.

The correspondence of Hu et al. (2020) is between the network and its linear model trained by the
*same* gradient descent; for SGD (momentum, Nesterov, weight decay, dampening) the mirror
reproduces the update rule exactly. Other optimizers are rebuilt by class and hyperparameters.
One mirror serves both shadows: it trains whatever ``shadow.trained_parameters()`` returns
(``[B]``, or ``[B, V]`` for the memorizing shadow, whose offset table it grows on demand).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lin_probe.losses import LossFn
from lin_probe.shadows.digests import BatchDigests
from lin_probe.shadows.linear import LinearShadow, _move
from lin_probe.shadows.offsets import _pad_rows

# Constructor flags that pick a kernel implementation, not the update rule: left at torch's defaults
# so the mirror works wherever ``B`` lives (e.g. ``fused``/``capturable`` demand particular devices).
_IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})


def _reference_hyperparameters(optimizer: Optimizer) -> dict[str, Any]:
    """The reference group's (``param_groups[0]``) hyperparameters, without params and implementation flags."""
    return _group_hyperparameters(optimizer.param_groups[0])


def _check_closure_free(cls: type[Optimizer]) -> None:
    """Refuse optimizers whose ``step`` needs a closure (LBFGS): the shadow has no closure to re-evaluate."""
    closure = inspect.signature(cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(
            f"{cls.__name__}.step needs a closure, which the linear shadow cannot mirror; "
            "train with torch.optim.SGD (exact correspondence) or torch.optim.Adam."
        )


def _constructor_arguments(cls: type[Optimizer], hyper: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters ``cls.__init__`` accepts by name (group extras like ``initial_lr`` are not)."""
    names = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    return {key: value for key, value in hyper.items() if key in names}


def _build_mirror(optimizer: Optimizer, params: Sequence[nn.Parameter]) -> Optimizer:
    """Same class, same reference-group hyperparameters, on ``params`` only (one group)."""
    cls = type(optimizer)
    _check_closure_free(cls)
    hyper = _reference_hyperparameters(optimizer)
    try:
        mirror = cls(list(params), **_constructor_arguments(cls, hyper))
    except Exception as err:  # a constructor needing more than its group's hyperparameters
        raise TypeError(
            f"Cannot rebuild {cls.__name__} for the linear shadow from its hyperparameters "
            f"({type(err).__name__}: {err}); train with torch.optim.SGD (exact correspondence) or "
            "torch.optim.Adam."
        ) from err
    mirror.param_groups[0].update(hyper)  # extras (e.g. a scheduler's initial_lr) mirrored verbatim
    return mirror


def _group_hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """One parameter group's hyperparameters, without params and implementation flags (lr as a float)."""
    hyper = {
        key: value for key, value in group.items() if key != "params" and key not in _IMPLEMENTATION_FLAGS
    }
    if isinstance(hyper.get("lr"), Tensor):
        hyper["lr"] = float(hyper["lr"])
    return hyper


def _build_grouped_mirror(optimizer: Optimizer, groups: Sequence[Sequence[nn.Parameter]]) -> Optimizer:
    """Same class, one mirrored group per non-empty ``groups[i]``, with user group ``i``'s hyperparameters.

    ``groups`` is aligned with ``optimizer.param_groups``: entry ``i`` holds the stand-ins for that
    group's parameters (empty: the group trains nothing mirrored and is left out). A model in
    parameter space (the linearised network) needs every group's own weight decay, betas, lr...;
    the one-group :func:`_build_mirror` serves shadows whose parameters do not correspond to the
    network's.
    """
    cls = type(optimizer)
    _check_closure_free(cls)
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"{len(groups)} parameter lists for the {len(optimizer.param_groups)} groups of "
            f"{cls.__name__}; give one (possibly empty) list per optimizer group."
        )
    hypers = [_group_hyperparameters(group) for group in optimizer.param_groups]
    kept = [(list(params), hyper) for params, hyper in zip(groups, hypers, strict=True) if len(params)]
    if not kept:
        raise ValueError(
            f"None of the {len(groups)} parameter group(s) of {cls.__name__} holds a parameter to mirror; "
            "build the shadow from the model this optimizer trains."
        )
    try:
        mirror = cls(
            [{"params": params, **_constructor_arguments(cls, hyper)} for params, hyper in kept],
            **_constructor_arguments(cls, hypers[0]),
        )
    except Exception as err:  # a constructor needing more than its groups' hyperparameters
        raise TypeError(
            f"Cannot rebuild {cls.__name__} with its parameter groups from their hyperparameters "
            f"({type(err).__name__}: {err}); train with a torch.optim optimizer such as SGD or Adam."
        ) from err
    for group, (_, hyper) in zip(mirror.param_groups, kept, strict=True):
        group.update(hyper)  # extras (e.g. a scheduler's initial_lr) mirrored verbatim
    return mirror


def _check_lr(lr: float) -> float:
    """A finite, non-negative learning rate as a float."""
    if isinstance(lr, Tensor):
        lr = float(lr)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"`lr` must be a number, got {type(lr).__name__}.")
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"`lr` must be finite and >= 0, got {lr}.")
    return float(lr)


class OptimizerMirror:
    """Trains ``shadow.trained_parameters()`` with a mirror of the user's optimizer, one step per user step.

    Protocol: ``accumulate(x, y, ids, scale, digests)`` per micro-batch, then ``step(lr)``; ``discard()``
    drops a partly accumulated gradient. For SGD (momentum, Nesterov, weight decay, dampening, maximize) the
    mirror reproduces the update rule exactly and the function-space dynamics match while the NTK
    stays affine in the data kernel. Other optimizers are mirrored by class and hyperparameters
    (:attr:`exact` is then ``False``; :meth:`mirror_warning` says so for the caller to emit once —
    the mirror does not warn itself, since under data parallelism every process holds one).

    With example offsets, new ids grow ``V`` (by doubling) and zero-pad its optimizer state, which
    is exactly what a preallocated table would hold for optimizers whose per-element state starts at
    zero. Adam then normalises each example's offset per coordinate, which has no kernel reading.
    Under data parallelism ``V``'s rows must mean the same examples on every process, with the
    same row count: use dataset indices (``WithIndex``) and a capacity of ``len(train_dataset)``,
    not hashing.
    """

    def __init__(self, shadow: LinearShadow, optimizer: Optimizer, loss_fn: LossFn) -> None:
        if not isinstance(shadow, LinearShadow):
            raise TypeError(f"`shadow` must be a LinearShadow, got {type(shadow).__name__}.")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__} "
                "(unwrap a framework's optimizer wrapper first)."
            )
        if not callable(loss_fn):
            raise TypeError(
                "`loss_fn` must be callable as loss_fn(prediction, target); see losses.resolve_loss."
            )
        self.shadow = shadow
        self.loss_fn = loss_fn
        self._optimizer = _build_mirror(optimizer, shadow.trained_parameters())

    @property
    def exact(self) -> bool:
        """True when the mirrored update is plain/momentum SGD, for which the theory holds."""
        return type(self._optimizer) is torch.optim.SGD

    @property
    def optimizer(self) -> Optimizer:
        """The mirrored optimizer (read it; drive it through :meth:`step`)."""
        return self._optimizer

    def mirror_warning(self) -> str | None:
        """The message to show once when the mirror is not exact (``None`` for SGD)."""
        if self.exact:
            return None
        kind = "linear" if self.shadow.offsets is None else "memorizing"
        return (
            f"lin_probe: mirroring {type(self._optimizer).__name__} on the {kind} shadow with the same "
            "hyperparameters, but the linear-model correspondence (Hu et al., 2020) is established only "
            "for (momentum) gradient descent; read the distances as indicative."
        )

    def accumulate(
        self,
        x: Any,
        y: Tensor,
        ids: Tensor | None = None,
        scale: float = 1.0,
        digests: BatchDigests | None = None,
        ids_bound: int | None = None,
    ) -> Tensor:
        """Add ``∂(scale·loss(shadow(x, ids), y))/∂θ`` to each trained parameter's ``.grad``.

        The parameters themselves do not move; returns the unscaled loss. ``ids`` (training example
        ids, one per row of ``x``) are required with offsets and refused without. ``digests``: ``x``'s
        row digests, staged when the batch arrived, for the ``f_0`` cache. ``ids_bound``: above every
        id, known on the host (:attr:`ExampleIds.last_bound`, which checked them): the offsets are
        sized by it and the ids not read back (``None``: they are).
        """
        ids = self._training_ids(ids, ids_bound)
        params = self.shadow.trained_parameters()
        target = _move(y, params[0].device)
        if isinstance(target, Tensor) and target.is_floating_point():
            target = target.to(params[0].dtype)
        with torch.inference_mode(False), torch.enable_grad():
            # No NaN/inf check of the batch: it would wait for the device every step (checks report it).
            loss = self.loss_fn(self.shadow(x, ids, digests=digests, check_values=False), target)
            grads = torch.autograd.grad(_scalar(loss) * scale, params, allow_unused=True)
        _add_grads(params, grads)
        return loss.detach()

    def step(self, lr: float, reduce_grad: Callable[[Tensor], Tensor] | None = None) -> None:
        """One mirrored update with learning rate ``lr``, then clear the gradients.

        ``reduce_grad`` maps each accumulated gradient to the one applied: under data parallelism the
        network steps with the gradient averaged over processes, and so must the shadow.
        """
        lr = _check_lr(lr)
        group_lrs = [lr] * len(self._optimizer.param_groups)
        _mirrored_step(self, self._optimizer, self.shadow.trained_parameters(), group_lrs, reduce_grad)

    def discard(self) -> None:
        """Drop a partly accumulated gradient (a failed micro-batch must not leak into a later step)."""
        self._optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """The mirrored optimizer's state (momentum / moment buffers, step counts, hyperparameters)."""
        return {"optimizer": self._optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, so a resumed run continues the same trajectory.

        Load the shadow's own state first: it resizes the offset table this state refers to.
        """
        if not isinstance(state, Mapping) or "optimizer" not in state:
            raise ValueError(
                f"{type(self).__name__} state must be the dict returned by {type(self).__name__}.state_dict()."
            )
        self._optimizer.load_state_dict(state["optimizer"])
        offsets = self.shadow.offsets
        if offsets is None:
            return
        V = offsets.V
        for value in self._optimizer.state.get(V, {}).values():
            if isinstance(value, Tensor) and value.dim() >= 1 and value.shape != V.shape:
                raise ValueError(
                    f"Optimizer state for V has shape {tuple(value.shape)} but V is {tuple(V.shape)}; "
                    "load the shadow's state_dict (which resizes V) before the mirror's."
                )

    def _training_ids(self, ids: Tensor | None, bound: int | None = None) -> Tensor | None:
        """Checked training ids with room for them in ``V`` (grown, optimizer state padded); ``None`` without offsets."""
        offsets = self.shadow.offsets
        if offsets is None:
            if ids is not None:
                raise ValueError(
                    "This shadow has no example offsets, so it trains without `ids`; pass ids=None."
                )
            return None
        if ids is None:
            raise ValueError(
                "A shadow with example offsets trains on example ids (from ExampleIds), one per example; "
                "without them its offsets would never be trained."
            )
        ids = offsets.training_ids(ids, values_checked=bound is not None)
        needed = bound if bound is not None else (int(ids.max()) + 1 if ids.numel() else 0)
        old = offsets.reserve(needed)
        if old != offsets.rows:
            _pad_optimizer_state(self._optimizer, offsets.V, old)
        return ids


def _scalar(loss: Any) -> Tensor:
    """The loss as a 0-d tensor, or a ValueError that says to reduce it."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("`loss_fn` must return a scalar tensor (reduce over the batch, e.g. a mean).")
    return loss.reshape(())


def _add_grads(params: Sequence[nn.Parameter], grads: Sequence[Tensor | None]) -> None:
    """Accumulate ``grads`` into each parameter's ``.grad`` (``None``: a zero gradient, so every trained
    parameter has one once a micro-batch was accumulated)."""
    for param, grad in zip(params, grads, strict=True):
        grad = torch.zeros_like(param) if grad is None else grad.detach()
        param.grad = grad if param.grad is None else param.grad.add_(grad)


def _mirrored_step(
    owner: object,
    optimizer: Optimizer,
    params: Sequence[nn.Parameter],
    group_lrs: Sequence[float],
    reduce_grad: Callable[[Tensor], Tensor] | None,
) -> None:
    """Reduce the accumulated gradients, set each group's lr, step and clear: the tail of every mirror's step."""
    if all(param.grad is None for param in params):
        raise RuntimeError(
            f"{type(owner).__name__}.step() called with no accumulated gradient; call accumulate(...) "
            "for each micro-batch of the optimizer step first."
        )
    if reduce_grad is not None:
        for param in params:
            param.grad = _reduced(reduce_grad, param)
    for group, lr in zip(optimizer.param_groups, group_lrs, strict=True):
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _pad_optimizer_state(optimizer: Optimizer, param: nn.Parameter, old_rows: int) -> None:
    """Zero-pad the per-row state of ``param`` (momentum, moments) after it grew from ``old_rows``.

    Exact wherever the optimizer starts per-element state at zero (SGD momentum, Adam/AdamW moments,
    RMSprop): a preallocated row that never had a gradient holds exactly zero state.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    for key, value in state.items():
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == old_rows:
            if value.shape[1:] == param.shape[1:]:
                state[key] = _pad_rows(value, param.shape[0])


def _reduced(reduce_grad: Callable[[Tensor], Tensor], param: nn.Parameter) -> Tensor:
    """``reduce_grad(param.grad)``, checked to keep the parameter's shape, dtype and device."""
    grad = param.grad if param.grad is not None else torch.zeros_like(param)
    reduced = reduce_grad(grad)
    if not isinstance(reduced, Tensor) or reduced.shape != param.shape:
        raise ValueError(
            f"`reduce_grad` must return a tensor of the gradient's shape {tuple(param.shape)}, got "
            f"{getattr(reduced, 'shape', type(reduced).__name__)}; under data parallelism every process "
            "must hold the same shapes (for the memorizing shadow: capacity=len(train_dataset))."
        )
    return reduced.to(dtype=param.dtype, device=param.device)


__all__ = ["OptimizerMirror"]
