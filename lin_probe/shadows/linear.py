"""The linear shadow ``f_lin(x) = f_0(x) + Bᵀψ(x)``, optionally with per-example offsets.

Hu et al. (2020): early in training a network's function-space dynamics match those of this linear
model on its inputs, trained on the same batches with the same loss and learning rate. Keeping
such a shadow next to the network and comparing predictions tells whether that still holds. With an
:class:`~lin_probe.shadows.offsets.ExampleOffsets` component it is the memorizing shadow
``f_0 + ψB + √c·V[ids]``, whose kernel also has the ``c·I`` part of the NTK on training points.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lin_probe._model_state import eval_semantics
from lin_probe._validation import as_feature_matrix, check_callable, check_int
from lin_probe.kernel import AffineKernel
from lin_probe.ntk._plumbing import OutputFn, output_matrix
from lin_probe.shadows.digests import BatchDigests
from lin_probe.shadows.initial_cache import InitialOutputCache
from lin_probe.shadows.offsets import ExampleOffsets

FeaturesFn = Callable[[Any], Tensor]


# ---------------------------------------------------------------------------------------------
# helpers: moving, feature rows, placing
# ---------------------------------------------------------------------------------------------


def _move(data: Any, device: torch.device) -> Any:
    """Move a tensor to ``device``; anything else (a dict batch handled by ``features_fn``) is left as is."""
    return data.to(device) if isinstance(data, Tensor) else data


def feature_rows(inputs: Any, features_fn: FeaturesFn | None, *, check_values: bool = True) -> Tensor:
    """Inputs as the ``n × d`` float matrix the data kernel sees, after ``features_fn`` if given
    (``check_values=False``: no NaN/inf check, :func:`~lin_probe._validation.as_feature_matrix`)."""
    if features_fn is not None:
        with torch.no_grad():  # ψ is data, not trained: never build a graph through features_fn
            inputs = features_fn(inputs)
    return as_feature_matrix(inputs, "inputs", check_values=check_values)


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


def _kernel_state(kernel: AffineKernel) -> dict[str, Any]:
    """The kernel's fields, so a checkpoint restores the ψ that ``B`` was trained against."""
    return dataclasses.asdict(kernel)


# ---------------------------------------------------------------------------------------------
# the linear model
# ---------------------------------------------------------------------------------------------


class LinearShadow(nn.Module):
    """``f_lin(x) = f_0(x) + ψ(x)B`` (``+ √c·V[ids]`` with offsets), ``ψ(x) = [√a·x/√d ; √b]``, ``B`` at zero.

    ``initial_model`` (``f_0``) is frozen in place and kept in eval mode; ``None`` gives the pure
    linear model (uncentred). Pass a frozen *copy* of the network at initialisation, never the live
    network (``lin_probe._model_state.frozen_copy`` makes one). ``features_fn`` maps raw inputs to
    the float vectors ``ψ`` is built from; ``output_fn`` maps the model's raw output to its
    prediction tensor. ``offsets`` (an :class:`ExampleOffsets`) makes it the memorizing shadow.

    State dict: ``B``; ``initial_model.*`` (``f_0``'s own state) when centred; ``offsets.V`` with
    offsets; ``_extra_state`` holding the kernel (``B`` is only meaningful with the ψ it was
    trained on).
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
        offsets: ExampleOffsets | None = None,
    ) -> None:
        super().__init__()
        _check_kernel(kernel)
        check_int("in_features", in_features, minimum=1)
        check_int("out_features", out_features, minimum=1)
        check_callable("output_fn", output_fn)
        check_callable("features_fn", features_fn)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating torch.dtype (float32 or float64), got {dtype!r}.")
        if initial_model is not None and not isinstance(initial_model, nn.Module):
            raise TypeError(
                f"`initial_model` must be an nn.Module or None, got {type(initial_model).__name__}."
            )
        if offsets is not None:
            _check_offsets(offsets, out_features)
        self.kernel = kernel
        self.in_features = in_features
        self.out_features = out_features
        self.output_fn = output_fn
        self.features_fn = features_fn
        self.B = nn.Parameter(torch.zeros(in_features + 1, out_features, dtype=dtype, device=device))
        self.register_module("initial_model", None if initial_model is None else _freeze(initial_model))
        self.register_module(
            "offsets", None if offsets is None else offsets.to(device=self.B.device, dtype=dtype)
        )
        self.initial_cache: InitialOutputCache | None = None  # f_0's outputs by input; not checkpointed

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        kernel: AffineKernel,
        example_inputs: Any,
        *,
        initial_model: nn.Module | None = None,
        output_fn: OutputFn | None = None,
        features_fn: FeaturesFn | None = None,
        offsets_capacity: int | None = None,
    ) -> LinearShadow:
        """Size a shadow from one forward pass of ``model`` (eval semantics, flags and RNG untouched).

        ``initial_model`` is the frozen copy of ``model`` the caller made for ``f_0`` (``None``:
        uncentred); it is frozen here as well. ``offsets_capacity``: ``None`` for the paper's shadow,
        an int (e.g. ``len(train_dataset)``, or 0 to grow on demand) for the memorizing shadow with
        that many offset rows preallocated.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
        if initial_model is model:
            raise ValueError(
                "`initial_model` is the model itself; pass a frozen copy of it at initialisation "
                "(e.g. lin_probe._model_state.frozen_copy(model)): the shadow freezes f_0 in place."
            )
        if offsets_capacity is not None:
            check_int("offsets_capacity", offsets_capacity, minimum=0)
        device, dtype = _model_placement(model)
        inputs = _move(example_inputs, device)
        with torch.no_grad(), eval_semantics(model):
            out_features = output_matrix(model(inputs), output_fn).shape[1]
            in_features = feature_rows(inputs, features_fn).shape[1]
        offsets = (
            None
            if offsets_capacity is None
            else ExampleOffsets(out_features, capacity=offsets_capacity, dtype=dtype, device=device)
        )
        return cls(
            kernel,
            in_features=in_features,
            out_features=out_features,
            initial_model=initial_model,
            output_fn=output_fn,
            features_fn=features_fn,
            dtype=dtype,
            device=device,
            offsets=offsets,
        )

    @property
    def centered(self) -> bool:
        """Whether ``f_0`` is part of the prediction."""
        return self.initial_model is not None

    def trained_parameters(self) -> list[nn.Parameter]:
        """What gradient descent trains: ``[B]``, or ``[B, V]`` with offsets (``f_0`` is frozen)."""
        return [self.B] if self.offsets is None else [self.B, self.offsets.V]

    def features(self, x: Any, *, check_values: bool = True) -> Tensor:
        """``ψ(x)`` (``n × (d+1)``, shadow dtype and device): ``ψψᵀ = a·XXᵀ/d + b·11ᵀ``.

        ``check_values=False`` skips the NaN/inf check of ``x``: training batches (every step) must
        not wait for the device; a non-finite batch makes the shadow's outputs non-finite, which the
        next check reports."""
        rows = feature_rows(_move(x, self.B.device), self.features_fn, check_values=check_values)
        if rows.shape[1] != self.in_features:
            raise ValueError(
                f"Inputs have {rows.shape[1]} features per example but the shadow was built for "
                f"{self.in_features}; probe with inputs shaped like the ones it was created from."
            )
        return self.kernel.features(rows.to(device=self.B.device, dtype=self.B.dtype), check_values=False)

    def initial_output(self, x: Any, digests: BatchDigests | None = None) -> Tensor:
        """``f_0(x)`` as ``n × C`` (no grad, eval, global RNG untouched); zeros when uncentred.

        With :attr:`initial_cache` set, rows seen before come from it (exact: ``f_0`` is frozen), found
        by ``digests`` (``x``'s rows, staged when its batch arrived) or by hashing ``x`` here."""
        initial_model = self.initial_model
        if initial_model is None:
            rows = x.shape[0] if isinstance(x, Tensor) else self.features(x).shape[0]
            return torch.zeros(rows, self.out_features, dtype=self.B.dtype, device=self.B.device)

        def compute(rows: Any) -> Tensor:
            # Only around the forward: a batch found whole in the cache skips the flags and RNG
            # bookkeeping too (its cost is a tenth of a small model's training step).
            with torch.no_grad(), eval_semantics(initial_model):
                return output_matrix(initial_model(rows), self.output_fn)

        x = _move(x, self.B.device)
        out = compute(x) if self.initial_cache is None else self.initial_cache.outputs(x, compute, digests)
        if out.shape[1] != self.out_features:
            raise ValueError(
                f"f_0 produced {out.shape[1]} outputs per example, expected {self.out_features}."
            )
        return out.to(device=self.B.device, dtype=self.B.dtype)

    def forward(
        self,
        x: Any,
        ids: Tensor | None = None,
        *,
        initial_outputs: Tensor | None = None,
        dtype: torch.dtype | None = None,
        digests: BatchDigests | None = None,
        check_values: bool = True,
    ) -> Tensor:
        """``f_0(x) + ψ(x)B (+ √c·V[ids])`` (``n × C``): the one forward of training and measurement.

        ``ids``: example ids (from ``ExampleIds``) for the offsets; ``None`` or held-out ids add no
        offset. ``initial_outputs``: ``f_0(x)`` cached by the caller (``n × C``), used instead of
        running ``f_0``; ignored when uncentred. ``dtype``: the dtype the terms are cast to before
        they are summed (``None``: the shadow's) — measuring in float64 adds a float32 shadow's
        terms without float32 rounding. ``digests``: ``x``'s row digests for the ``f_0`` cache
        (:meth:`initial_output`). ``check_values``: whether ``x`` is checked for NaN/inf
        (:meth:`features`; ``False`` on training batches).
        """
        out = self.features(x, check_values=check_values) @ self.B
        if dtype is not None:
            out = out.to(dtype)
        if self.initial_model is not None:
            initial = self.initial_output(x, digests) if initial_outputs is None else initial_outputs
            out = out + self._checked_initial(initial, out).to(device=out.device, dtype=out.dtype)
        if ids is not None:
            if self.offsets is None:
                raise ValueError(
                    "This shadow has no example offsets, so `ids` mean nothing to it; build it with "
                    "offsets (from_model(..., offsets_capacity=...)) or pass ids=None."
                )
            out = out + self.offsets(ids, out.shape[0], c=self.kernel.c).to(out.dtype)
        return out

    def _checked_initial(self, initial: Tensor, linear: Tensor) -> Tensor:
        """A cached ``f_0(x)`` must be the ``n × C`` matrix of these inputs."""
        if not isinstance(initial, Tensor) or tuple(initial.shape) != tuple(linear.shape):
            raise ValueError(
                f"`initial_outputs` must be f_0 on these inputs, shaped {tuple(linear.shape)}, got "
                f"{getattr(initial, 'shape', type(initial).__name__)}."
            )
        return initial

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


def _check_offsets(offsets: Any, out_features: int) -> None:
    """Offsets are an ExampleOffsets with one column per output."""
    if not isinstance(offsets, ExampleOffsets):
        raise TypeError(f"`offsets` must be an ExampleOffsets or None, got {type(offsets).__name__}.")
    if offsets.out_features != out_features:
        raise ValueError(
            f"`offsets` has {offsets.out_features} outputs per example, the shadow {out_features}."
        )


__all__ = ["LinearShadow", "feature_rows"]
