"""The linear shadow ``f_lin(x) = f_0(x) + Bᵀψ(x)`` and the mirroring of the user's optimizer onto it.

Hu et al. (2020): early in training a network's function-space dynamics match those of this linear
model on its inputs, trained on the same batches with the same loss and learning rate. Keeping
such a shadow next to the network and comparing predictions tells whether that still holds.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lin_probe._model_state import eval_semantics
from lin_probe._validation import as_feature_matrix
from lin_probe.kernel import AffineKernel
from lin_probe.losses import LossFn

OutputFn = Callable[[Any], Tensor]
FeaturesFn = Callable[[Any], Tensor]

# Constructor flags that pick a kernel implementation, not the update rule: left at torch's defaults
# so the mirror works wherever ``B`` lives (e.g. ``fused``/``capturable`` demand particular devices).
_IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})

# Attributes through which a (Lightning) module reaches its trainer; never copied into ``f_0``.
_OWNER_ATTRIBUTES = ("_trainer", "_fabric")


# ---------------------------------------------------------------------------------------------
# helpers: moving, flattening, copying
# ---------------------------------------------------------------------------------------------


def _move(data: Any, device: torch.device) -> Any:
    """Move a tensor to ``device``; anything else (a dict batch handled by ``features_fn``) is left as is."""
    return data.to(device) if isinstance(data, Tensor) else data


def _flatten_output(raw: Any, output_fn: OutputFn | None) -> Tensor:
    """The model's output as an ``n × C`` matrix (``output_fn`` first picks the prediction tensor)."""
    out = output_fn(raw) if output_fn is not None else raw
    if not isinstance(out, Tensor) or out.dim() < 1:
        raise TypeError(
            f"The model output must be a tensor with a leading batch dimension, got {type(out).__name__}"
            f"{'' if not isinstance(out, Tensor) else ' (0-d)'}; pass `output_fn` mapping the model's "
            "output to its prediction tensor (e.g. `lambda out: out['logits']`)."
        )
    return out.reshape(out.shape[0], -1)


def _feature_rows(inputs: Any, features_fn: FeaturesFn | None) -> Tensor:
    """Inputs as the ``n × d`` float matrix the data kernel sees, after ``features_fn`` if given."""
    if features_fn is not None:
        with torch.no_grad():  # ψ is data, not trained: never build a graph through features_fn
            inputs = features_fn(inputs)
    return as_feature_matrix(inputs, "inputs")


def _model_placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the model and the shadow dtype: float64 for float64 models, float32 otherwise."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
            return tensor.device, dtype
    return torch.device("cpu"), torch.float32


def _freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients: ``f_0`` is a constant function of the inputs."""
    module.requires_grad_(False)
    module.eval()
    for param in module.parameters():
        param.grad = None
    return module


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` that shares no trainer/fabric (they map to ``None`` in the copy).

    Seeding ``deepcopy``'s memo with the owners makes every reference to them, including ones a user
    stored on the module, come out as ``None`` instead of a copied Trainer.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for attr in _OWNER_ATTRIBUTES:
            owner = vars(module).get(attr)
            if owner is not None:
                memo[id(owner)] = None
    try:
        frozen = copy.deepcopy(model, memo)
    except Exception as err:  # deepcopy raises many types (RuntimeError for non-leaf tensors, ...)
        raise TypeError(
            f"Could not deep-copy the model to keep its initial function f_0 ({type(err).__name__}: {err}). "
            "Make the model deep-copyable (no non-leaf tensors or open handles as attributes), or pass "
            "center=False to use the pure linear model without f_0."
        ) from err
    return _freeze(_without_patched_forwards(frozen))


def _without_patched_forwards(copied: nn.Module) -> nn.Module:
    """Drop instance-level ``forward`` overrides from a deep copy: they still call the *original* module.

    Compiling a LightningModule (``torch.compile(module)`` handed to a Trainer) makes Lightning set
    ``module.forward = dynamo_ctx(module.forward)`` on the instance; ``deepcopy`` keeps that function
    as is, so the copy's forward would silently run the live, training network instead of ``f_0``.
    The class's own ``forward`` computes the same function (uncompiled) on the copy's parameters.
    A compiled submodule (``torch.compile(net)``, an ``OptimizedModule``) rebinds itself on copy.
    """
    for module in copied.modules():
        if getattr(module, "_compiler_ctx", None) is None:
            continue  # not compiled through Lightning (an nn.Module compiled on its own copies fine)
        vars(module).pop("forward", None)
        module._compiler_ctx = None
    return copied


def _kernel_state(kernel: AffineKernel) -> dict[str, Any]:
    """The kernel's fields, so a checkpoint restores the ψ that ``B`` was trained against."""
    return dataclasses.asdict(kernel)


# ---------------------------------------------------------------------------------------------
# the linear model
# ---------------------------------------------------------------------------------------------


class LinearShadow(nn.Module):
    """``f_lin(x) = f_0(x) + Bᵀψ(x)`` with ``ψ(x) = [√a·x/√d ; √b]`` and ``B`` starting at zero.

    ``initial_model`` (``f_0``) is frozen in place and kept in eval mode; ``None`` gives the pure
    linear model (``center=False``). ``features_fn`` maps raw inputs to the float vectors ``ψ`` is
    built from; ``output_fn`` maps the model's raw output to its prediction tensor.
    """

    def __init__(
        self,
        kernel: AffineKernel,
        *,
        in_features: int,
        out_features: int,
        initial_model: nn.Module | None = None,
        output_fn: OutputFn | None = None,
        features_fn: FeaturesFn | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_kernel(kernel)
        _check_size(in_features, "in_features")
        _check_size(out_features, "out_features")
        _check_callable(output_fn, "output_fn")
        _check_callable(features_fn, "features_fn")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating torch.dtype (float32 or float64), got {dtype!r}.")
        if initial_model is not None and not isinstance(initial_model, nn.Module):
            raise TypeError(
                f"`initial_model` must be an nn.Module or None, got {type(initial_model).__name__}."
            )
        self.kernel = kernel
        self.in_features = in_features
        self.out_features = out_features
        self.output_fn = output_fn
        self.features_fn = features_fn
        self.B = nn.Parameter(torch.zeros(in_features + 1, out_features, dtype=dtype, device=device))
        self.register_module("initial_model", None if initial_model is None else _freeze(initial_model))

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        kernel: AffineKernel,
        example_inputs: Any,
        *,
        center: bool = True,
        output_fn: OutputFn | None = None,
        features_fn: FeaturesFn | None = None,
    ) -> LinearShadow:
        """Size a shadow from one forward pass of ``model`` (eval semantics, flags and RNG untouched)
        and keep a frozen copy of it as ``f_0`` (a Lightning module's trainer is not copied)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
        device, dtype = _model_placement(model)
        inputs = _move(example_inputs, device)
        with torch.no_grad(), eval_semantics(model):
            out_features = _flatten_output(model(inputs), output_fn).shape[1]
            in_features = _feature_rows(inputs, features_fn).shape[1]
        return cls(
            kernel,
            in_features=in_features,
            out_features=out_features,
            initial_model=_frozen_copy(model) if center else None,
            output_fn=output_fn,
            features_fn=features_fn,
            dtype=dtype,
            device=device,
        )

    @property
    def centered(self) -> bool:
        """Whether ``f_0`` is part of the prediction."""
        return self.initial_model is not None

    def features(self, x: Any) -> Tensor:
        """``ψ(x)`` (``n × (d+1)``, shadow dtype and device): ``ψψᵀ = a·XXᵀ/d + b·11ᵀ``."""
        rows = _feature_rows(_move(x, self.B.device), self.features_fn)
        if rows.shape[1] != self.in_features:
            raise ValueError(
                f"Inputs have {rows.shape[1]} features per example but the shadow was built for "
                f"{self.in_features}; probe with inputs shaped like the ones it was created from."
            )
        return self.kernel.features(rows.to(device=self.B.device, dtype=self.B.dtype))

    def initial_output(self, x: Any) -> Tensor:
        """``f_0(x)`` as ``n × C`` (no grad, eval, global RNG untouched); zeros when uncentered."""
        if self.initial_model is None:
            rows = x.shape[0] if isinstance(x, Tensor) else self.features(x).shape[0]
            return torch.zeros(rows, self.out_features, dtype=self.B.dtype, device=self.B.device)
        with torch.no_grad(), eval_semantics(self.initial_model):
            out = _flatten_output(self.initial_model(_move(x, self.B.device)), self.output_fn)
        if out.shape[1] != self.out_features:
            raise ValueError(
                f"f_0 produced {out.shape[1]} outputs per example, expected {self.out_features}."
            )
        return out.to(device=self.B.device, dtype=self.B.dtype)

    def forward(self, x: Any) -> Tensor:
        """``f_0(x) + ψ(x) B`` (``n × C``)."""
        linear = self.features(x) @ self.B
        return linear + self.initial_output(x) if self.centered else linear

    def train(self, mode: bool = True) -> LinearShadow:
        """Switch the shadow's mode but keep ``f_0`` in eval: it is the network *at initialisation*."""
        super().train(mode)
        if self.initial_model is not None:
            self.initial_model.eval()
        return self

    def get_extra_state(self) -> dict[str, Any]:
        """Checkpoint the kernel too: ``B`` only means something with the ``ψ`` it was trained on."""
        return {"kernel": _kernel_state(self.kernel)}

    def set_extra_state(self, state: Any) -> None:
        """Restore the kernel saved by :meth:`get_extra_state`."""
        if not isinstance(state, Mapping) or "kernel" not in state:
            raise ValueError(
                "LinearShadow state has no 'kernel' entry; was it saved by LinearShadow.state_dict()?"
            )
        self.kernel = AffineKernel(**state["kernel"])


# ---------------------------------------------------------------------------------------------
# optimizer mirroring
# ---------------------------------------------------------------------------------------------


def _unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer itself (Lightning hands out ``LightningOptimizer`` wrappers with ``.optimizer``)."""
    inner = getattr(optimizer, "optimizer", None)
    if not isinstance(optimizer, Optimizer) and isinstance(inner, Optimizer):
        optimizer = inner
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    return optimizer


def _reference_hyperparameters(optimizer: Optimizer) -> dict[str, Any]:
    """The reference group's (``param_groups[0]``) hyperparameters, without params and implementation flags."""
    group = optimizer.param_groups[0]
    hyper = {
        key: value for key, value in group.items() if key != "params" and key not in _IMPLEMENTATION_FLAGS
    }
    if isinstance(hyper.get("lr"), Tensor):
        hyper["lr"] = float(hyper["lr"])
    return hyper


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


def _check_lr(lr: float) -> float:
    """A finite, non-negative learning rate as a float."""
    if isinstance(lr, Tensor):
        lr = float(lr)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"`lr` must be a number, got {type(lr).__name__}.")
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"`lr` must be finite and >= 0, got {lr}.")
    return float(lr)


class ShadowTrainer:
    """Trains ``shadow.B`` with a mirror of the user's optimizer, one step per user optimizer step.

    For SGD (momentum, Nesterov, weight decay, dampening, maximize) the mirror reproduces the update
    rule exactly and the function-space dynamics match while the NTK stays affine in the data
    kernel. Other optimizers are mirrored by class and hyperparameters, with one warning, since no
    such correspondence is established for them. Subclasses train more parameters than ``B`` by
    overriding :meth:`trained_parameters`.
    """

    def __init__(self, shadow: LinearShadow, optimizer: Optimizer, loss_fn: LossFn) -> None:
        if not isinstance(shadow, LinearShadow):
            raise TypeError(f"`shadow` must be a LinearShadow, got {type(shadow).__name__}.")
        if not callable(loss_fn):
            raise TypeError(
                "`loss_fn` must be callable as loss_fn(prediction, target); see losses.resolve_loss."
            )
        self.shadow = shadow
        self.loss_fn = loss_fn
        self._optimizer = _build_mirror(_unwrap_optimizer(optimizer), self.trained_parameters())
        if not self.exact:
            warnings.warn(
                f"lin_probe: mirroring {type(self._optimizer).__name__} on the {type(shadow).__name__} with the "
                "same hyperparameters, but the linear-model correspondence (Hu et al., 2020) is established "
                "only for (momentum) gradient descent; read the distances as indicative.",
                UserWarning,
                stacklevel=2,
            )

    def trained_parameters(self) -> list[nn.Parameter]:
        """What the mirrored optimizer trains: ``[B]`` for the paper's shadow."""
        return [self.shadow.B]

    @property
    def exact(self) -> bool:
        """True when the mirrored update is plain/momentum SGD, for which the theory holds."""
        return type(self._optimizer) is torch.optim.SGD

    @property
    def optimizer(self) -> Optimizer:
        """The mirrored optimizer (read it; drive it through :meth:`step`)."""
        return self._optimizer

    def accumulate(self, x: Any, y: Tensor, scale: float = 1.0) -> Tensor:
        """Add ``∂(scale·loss(shadow(x), y))/∂B`` to ``B.grad`` (``B`` unchanged); returns the unscaled loss."""
        return self._accumulate(lambda: self.shadow(x), y, scale)

    def _accumulate(self, predict: Callable[[], Tensor], y: Tensor, scale: float) -> Tensor:
        """Add the gradient of ``scale·loss(predict(), y)`` to every trained parameter's ``.grad``."""
        params = self.trained_parameters()
        target = _move(y, params[0].device)
        if isinstance(target, Tensor) and target.is_floating_point():
            target = target.to(params[0].dtype)
        with torch.inference_mode(False), torch.enable_grad():
            loss = self.loss_fn(predict(), target)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(
                    "`loss_fn` must return a scalar tensor (reduce over the batch, e.g. a mean)."
                )
            grads = torch.autograd.grad(loss.reshape(()) * scale, params, allow_unused=True)
        for param, grad in zip(params, grads, strict=True):
            grad = torch.zeros_like(param) if grad is None else grad.detach()
            param.grad = grad if param.grad is None else param.grad.add_(grad)
        return loss.detach()

    def step(self, lr: float, reduce_grad: Callable[[Tensor], Tensor] | None = None) -> None:
        """One mirrored update with learning rate ``lr``, then clear the gradients.

        ``reduce_grad`` maps each accumulated gradient to the one applied: under data parallelism the
        network steps with the gradient averaged over processes, and so must the shadow.
        """
        lr = _check_lr(lr)
        params = self.trained_parameters()
        if params[0].grad is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() called with no accumulated gradient; call accumulate(...) "
                "for each micro-batch of the optimizer step first."
            )
        if reduce_grad is not None:
            for param in params:
                param.grad = _reduced(reduce_grad, param)
        for group in self._optimizer.param_groups:
            group["lr"] = lr
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    def discard(self) -> None:
        """Drop a partly accumulated gradient (a failed micro-batch must not leak into a later step)."""
        self._optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """The mirrored optimizer's state (momentum / moment buffers, step counts, hyperparameters)."""
        return {"optimizer": self._optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, so a resumed run continues the same trajectory."""
        if not isinstance(state, Mapping) or "optimizer" not in state:
            raise ValueError(
                f"{type(self).__name__} state must be the dict returned by {type(self).__name__}.state_dict()."
            )
        self._optimizer.load_state_dict(state["optimizer"])


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


def _check_kernel(kernel: Any) -> None:
    """The shadow's ψ comes from an AffineKernel's (a, b)."""
    if not isinstance(kernel, AffineKernel):
        raise TypeError(
            f"`kernel` must be an AffineKernel (e.g. from fit_affine_kernel), got {type(kernel).__name__}."
        )


def _check_size(value: Any, name: str) -> None:
    """A positive integer dimension."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be a positive int, got {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value}.")


def _check_callable(fn: Any, name: str) -> None:
    """Optional hooks must be callables."""
    if fn is not None and not callable(fn):
        raise TypeError(f"`{name}` must be callable or None, got {type(fn).__name__}.")


__all__ = ["LinearShadow", "ShadowTrainer"]
