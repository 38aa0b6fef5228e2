"""The linear shadow ``f_lin(x) = f_0(x) + Bᵀψ(x)`` and the mirroring of the user's optimizer onto it.

Hu et al. (2020): early in training a network's function-space dynamics match those of this linear
model on its inputs, trained on the same batches with the same loss and learning rate. Keeping
such a shadow next to the network and comparing predictions tells whether that still holds.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lin_probe._model_state import eval_semantics
from lin_probe._validation import as_feature_matrix
from lin_probe.kernel import AffineKernel

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


__all__ = ["LinearShadow"]
