"""The linearised network ``f_lin(x) = f_0(x) + J_0(x)(θ' − θ_0)``, trained by the user's own optimizer.

The paper's :class:`~lin_probe.shadows.linear.LinearShadow` asks whether the network still follows
a linear model *of the data* (its NTK affine in the data kernel). This shadow asks the narrower
question whether it still follows its own first-order Taylor model in its parameters, i.e. whether
it has left its *kernel* regime (``Θ_t ≈ Θ_0``). Because the Taylor model is a model in parameter
space, the user's optimizer — class, hyperparameters and parameter groups — applies to ``θ'``
exactly as it applies to ``θ``: Adam, momentum and weight decay (on ``θ'``, as the network decays
``θ``) need no function-space reading.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp
from torch.optim import Optimizer

from lin_probe._model_state import eval_semantics
from lin_probe._validation import check_callable
from lin_probe.losses import LossFn
from lin_probe.ntk._plumbing import Forward, OutputFn, constants, forward_fn
from lin_probe.shadows.digests import BatchDigests
from lin_probe.shadows.linear import _freeze, _move
from lin_probe.shadows.mirror import (
    _add_grads,
    _build_grouped_mirror,
    _check_lr,
    _group_hyperparameters,
    _mirrored_step,
    _scalar,
)

_KEY_SEPARATOR = "__"
"""Stands in for ``.`` in parameter names: ``nn.ParameterDict`` keys cannot contain dots."""


def _key(name: str) -> str:
    return name.replace(".", _KEY_SEPARATOR)


class LinearizedShadow(nn.Module):
    """``f_lin(x) = f_0(x) + J_0(x)(θ' − θ_0)``: the network's Taylor model in its parameters at init.

    ``θ_0`` are the trainable parameters of the frozen copy ``f_0`` (``initial_model``); ``θ'`` (one
    ``nn.Parameter`` per trainable parameter of the live model, in :attr:`theta`, keys with ``.`` →
    ``__``) starts at ``θ_0``. Frozen parameters and buffers of ``f_0`` are constants, and ``f_0`` is
    always called with eval semantics (BatchNorm on its running statistics, no dropout).

    Cost per training step, on top of the network's own: one forward-mode pass of the network at
    ``θ_0`` (``torch.func.jvp``: ``f_lin`` on the batch, primal and tangent together) and one
    backward pass (``torch.func.vjp``, with its forward: ``J_0ᵀ ∂L/∂f``) — never reverse-over-forward
    through the jvp. Memory: two parameter copies, ``θ_0`` (inside ``f_0``, shared with the paper's
    shadow) and ``θ'``, plus the mirrored optimizer's state. On CPU a step with the shadow takes
    about 4× a plain one (``benchmarks/linearized_cost.py``).

    State dict: ``theta.*`` (``θ'``), ``initial_model.*`` when ``own_initial`` and ``_extra_state``
    with the parameter names and shapes, so a state of another architecture is refused clearly.
    """

    def __init__(
        self,
        initial_model: nn.Module,
        parameter_names: Sequence[str],
        *,
        output_fn: OutputFn | None = None,
        own_initial: bool = False,
    ) -> None:
        """``parameter_names``: the live model's trainable parameters (``model.named_parameters()``).

        ``own_initial=True`` registers ``f_0`` as the submodule ``initial_model``, so its state is in
        this module's ``state_dict`` and it moves with ``.to()``: use it when no paper shadow holds
        ``f_0``. With ``False`` ``f_0`` is a plain reference, not a submodule, because the paper's
        :class:`~lin_probe.shadows.linear.LinearShadow` already owns it: registering it here as well
        would store ``f_0`` twice in every checkpoint. Its owner moves it between devices.
        """
        super().__init__()
        if not isinstance(initial_model, nn.Module):
            raise TypeError(f"`initial_model` must be an nn.Module, got {type(initial_model).__name__}.")
        check_callable("output_fn", output_fn)
        names = list(parameter_names)
        if not names:
            raise ValueError(
                "The linearised shadow needs at least one trainable parameter name; the model has none "
                "with requires_grad=True."
            )
        if len(set(names)) != len(names) or not all(isinstance(name, str) for name in names):
            raise ValueError(f"`parameter_names` must be distinct strings, got {names[:5]}...")
        f0 = _freeze(initial_model)
        initial = dict(f0.named_parameters())
        missing = [name for name in names if name not in initial]
        if missing:
            raise ValueError(
                f"`initial_model` has no parameter(s) {missing[:5]}; pass a frozen copy of the model whose "
                "parameter names these are (lin_probe._model_state.frozen_copy(model))."
            )
        keys = [_key(name) for name in names]
        if len(set(keys)) != len(keys):
            raise ValueError(
                f"Parameter names {names} collide once '.' is replaced by {_KEY_SEPARATOR!r}; rename the "
                "submodules so that they do not."
            )
        self.output_fn = output_fn
        self.own_initial = bool(own_initial)
        self._names = dict(zip(keys, names, strict=True))  # ParameterDict key → model parameter name
        self.theta = nn.ParameterDict(
            {key: nn.Parameter(initial[name].detach().clone()) for key, name in self._names.items()}
        )
        if self.own_initial:
            self.register_module("initial_model", f0)
        else:  # plain attribute: not in state_dict(), modules(), parameters() or .to()
            object.__setattr__(self, "initial_model", f0)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        initial_model: nn.Module,
        *,
        output_fn: OutputFn | None = None,
        own_initial: bool = False,
    ) -> LinearizedShadow:
        """The shadow of ``model`` around ``initial_model``, the frozen copy of it the caller made at init.

        Only reads ``model``'s parameter names, shapes and ``requires_grad`` flags: ``θ_0`` is taken
        from ``initial_model``.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
        if initial_model is model:
            raise ValueError(
                "`initial_model` is the model itself; pass a frozen copy of it at initialisation "
                "(e.g. lin_probe._model_state.frozen_copy(model)): the shadow freezes f_0 in place."
            )
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if isinstance(initial_model, nn.Module):
            initial = dict(initial_model.named_parameters())
            for name, param in trainable.items():
                if name in initial and initial[name].shape != param.shape:
                    raise ValueError(
                        f"Parameter {name!r} is {tuple(param.shape)} in the model but "
                        f"{tuple(initial[name].shape)} in `initial_model`; pass a copy of this model."
                    )
        return cls(initial_model, list(trainable), output_fn=output_fn, own_initial=own_initial)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The model's names of the parameters in :meth:`trained_parameters`, in that order."""
        return tuple(self._names.values())

    def trained_parameters(self) -> list[nn.Parameter]:
        """``θ'``, one tensor per trainable parameter of the model (``f_0`` is frozen)."""
        return [self.theta[key] for key in self._names]  # ParameterDict sorts keys: keep the model's order

    def trained_parameter(self, name: str) -> nn.Parameter:
        """``θ'`` of the model's parameter ``name``."""
        return self.theta[_key(name)]

    # ------------------------------------------------------------------ the Taylor model
    def _stateless(self) -> tuple[Forward, dict[str, Tensor]]:
        """``f_0`` as a function of its trainable parameters, and their values ``θ_0`` (read each call:
        ``f_0`` may have been moved or loaded since)."""
        f0 = self.initial_model
        wanted = set(self._names.values())
        theta0 = {name: p.detach() for name, p in f0.named_parameters() if name in wanted}
        return forward_fn(f0, constants(f0, theta0), self.output_fn), theta0

    def taylor_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(f_0(x), J_0(x)(θ' − θ_0))``, both ``n × C``, from one ``torch.func.jvp`` at ``θ_0``.

        Differentiable in ``θ'`` when grad is enabled (a reference may backpropagate through it;
        training uses :meth:`transposed_jacobian_product` instead, which is cheaper).
        """
        x = _checked_inputs(x, self._device())
        forward, theta0 = self._stateless()
        delta = {name: self.theta[key] - theta0[name] for key, name in self._names.items()}
        with eval_semantics(self.initial_model):
            return jvp(lambda params: forward(params, x), (theta0,), (delta,))

    def transposed_jacobian_product(self, x: Tensor, cotangent: Tensor) -> list[Tensor]:
        """``J_0(x)ᵀ g`` per trained parameter (the order of :meth:`trained_parameters`): one ``vjp``.

        This is the exact gradient of ``⟨g, f_lin(x)⟩`` in ``θ'``, since ``f_lin`` is affine in ``θ'``.
        """
        x = _checked_inputs(x, self._device())
        forward, theta0 = self._stateless()
        with torch.inference_mode(False), torch.enable_grad(), eval_semantics(self.initial_model):
            out, pullback = vjp(lambda params: forward(params, x), theta0)
            if cotangent.shape != out.shape:
                raise ValueError(
                    f"The cotangent has shape {tuple(cotangent.shape)}, f_0 on these inputs {tuple(out.shape)}."
                )
            (grads,) = pullback(cotangent.to(device=out.device, dtype=out.dtype))
        return [grads[name].detach() for name in self._names.values()]

    def forward(
        self,
        x: Tensor,
        ids: Tensor | None = None,
        *,
        initial_outputs: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """``f_0(x) + J_0(x)(θ' − θ_0)`` (``n × C``), the one forward of training and measurement.

        ``ids`` must be ``None`` (there are no per-example offsets). ``initial_outputs``: ``f_0(x)``
        cached by the caller, used for the ``f_0`` term (the jvp computes ``f_0(x)`` anyway; the
        cache is what the other shadows are compared with, so it is used too). ``dtype``: the dtype
        the two terms are cast to before they are summed (``None``: the shadow's).
        """
        if ids is not None:
            raise ValueError(
                "The linearised shadow has no per-example offsets, so `ids` mean nothing to it; pass ids=None."
            )
        initial, tangent = self.taylor_terms(x)
        out = tangent if dtype is None else tangent.to(dtype)
        if initial_outputs is not None:
            initial = _checked_initial(initial_outputs, out)
        return out + initial.to(device=out.device, dtype=out.dtype)

    def _device(self) -> torch.device:
        return next(iter(self.theta.values())).device

    # ------------------------------------------------------------------ module plumbing
    def train(self, mode: bool = True) -> LinearizedShadow:
        """Switch the shadow's mode but keep ``f_0`` in eval: it is the network *at initialisation*."""
        super().train(mode)
        self.initial_model.eval()
        return self

    def get_extra_state(self) -> dict[str, Any]:
        """The parameter names and shapes ``θ'`` stands for: a state only fits the same architecture."""
        return {
            "parameter_names": list(self._names.values()),
            "parameter_shapes": [list(p.shape) for p in self.trained_parameters()],
        }

    def set_extra_state(self, state: Any) -> None:
        """Refuse a state saved for another model (called before ``θ'`` is loaded)."""
        if not isinstance(state, Mapping) or "parameter_names" not in state:
            raise ValueError(
                "LinearizedShadow state has no 'parameter_names' entry; was it saved by "
                "LinearizedShadow.state_dict()?"
            )
        names, shapes = list(state["parameter_names"]), [list(s) for s in state.get("parameter_shapes", [])]
        own_shapes = [list(p.shape) for p in self.trained_parameters()]
        if names != list(self._names.values()):
            raise ValueError(
                f"This LinearizedShadow state is for a model with parameters {names[:6]}..., but this shadow "
                f"linearises {list(self._names.values())[:6]}...; load it into a shadow of the same model."
            )
        if shapes and shapes != own_shapes:
            wrong = next(n for n, a, b in zip(names, shapes, own_shapes, strict=True) if a != b)
            raise ValueError(
                f"This LinearizedShadow state has other parameter shapes (first: {wrong!r}); load it into "
                "a shadow of the same architecture."
            )


def _checked_inputs(x: Any, device: torch.device) -> Tensor:
    """The batch on the shadow's device, as a normal tensor (an inference-mode tensor cannot be saved for backward)."""
    if not isinstance(x, Tensor):
        raise TypeError(
            f"The linearised shadow calls the model on a Tensor batch, got {type(x).__name__}; pass the "
            "model's input tensor."
        )
    x = _move(x, device)
    return x.clone() if x.is_inference() else x


def _checked_initial(initial: Any, tangent: Tensor) -> Tensor:
    """A cached ``f_0(x)`` must be the ``n × C`` matrix of these inputs."""
    if not isinstance(initial, Tensor) or tuple(initial.shape) != tuple(tangent.shape):
        raise ValueError(
            f"`initial_outputs` must be f_0 on these inputs, shaped {tuple(tangent.shape)}, got "
            f"{getattr(initial, 'shape', type(initial).__name__)}."
        )
    return initial


# ---------------------------------------------------------------------------------------------
# the mirror
# ---------------------------------------------------------------------------------------------


class LinearizedMirror:
    """Trains ``θ'`` with the user's optimizer rebuilt on it — same class, hyperparameters and groups.

    Protocol of :class:`~lin_probe.shadows.mirror.OptimizerMirror`: ``accumulate(x, y, ids, scale,
    digests)`` per micro-batch, then ``step(lr)``; ``discard()`` drops a partly accumulated gradient.

    Group ``g`` of the user's optimizer becomes a mirrored group of the ``θ'`` of its parameters
    (matched by identity to ``model``'s names) with ``g``'s hyperparameters; parameters in no group,
    frozen ones and ones outside ``model`` are not trained (the network does not move them either,
    or they are not part of ``f``). ``step`` is handed the first group's lr only, as the network's
    step reports it; group ``g`` gets ``lr × lr_g / lr_0`` with the ratio read at construction (1
    when ``lr_0 = 0``) and checkpointed. A scheduler that changes the groups' ratios (e.g.
    per-group ``LambdaLR``) is therefore followed through group 0 only.
    """

    def __init__(
        self, shadow: LinearizedShadow, optimizer: Optimizer, loss_fn: LossFn, *, model: nn.Module
    ) -> None:
        if not isinstance(shadow, LinearizedShadow):
            raise TypeError(f"`shadow` must be a LinearizedShadow, got {type(shadow).__name__}.")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__} "
                "(unwrap a framework's optimizer wrapper first)."
            )
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"`model` must be the nn.Module the shadow was built from, got {type(model).__name__}."
            )
        if not callable(loss_fn):
            raise TypeError(
                "`loss_fn` must be callable as loss_fn(prediction, target); see losses.resolve_loss."
            )
        self.shadow = shadow
        self.loss_fn = loss_fn
        groups = _shadow_groups(shadow, optimizer, model)
        self._optimizer = _build_grouped_mirror(optimizer, groups)
        self._trained = [p for params in groups for p in params]
        self._ratios = _lr_ratios(optimizer, groups)

    @property
    def exact(self) -> bool:
        """Always True: ``θ'`` gets the user's own update rule, whatever the optimizer.

        The Taylor model lives in the network's parameter space, so the mirrored optimizer does to
        ``θ'`` exactly what the user's does to ``θ``; network and shadow differ only by the model
        (nonlinear vs linearised), which is what is measured.
        """
        return True

    @property
    def optimizer(self) -> Optimizer:
        """The mirrored optimizer (read it; drive it through :meth:`step`)."""
        return self._optimizer

    def mirror_warning(self) -> str | None:
        """Nothing to warn about: the mirror is exact for every optimizer (see :attr:`exact`)."""
        return None

    def accumulate(
        self,
        x: Tensor,
        y: Tensor,
        ids: Tensor | None = None,
        scale: float = 1.0,
        digests: BatchDigests | None = None,
        ids_bound: int | None = None,
    ) -> Tensor:
        """Add ``∂(scale·loss(f_lin(x), y))/∂θ' = J_0ᵀ g`` to each trained ``θ'``'s ``.grad``; returns the loss.

        ``f_lin`` comes from one jvp without a graph, ``g = ∂(scale·loss)/∂f`` from autograd on a
        detached copy of it, and ``J_0ᵀ g`` from one vjp of ``f_0``: exact (``f_lin`` is affine in
        ``θ'``) and cheaper than differentiating through the jvp. ``θ'`` does not move; the loss is
        unscaled. ``digests`` is unused (the jvp runs ``f_0`` itself, so there is no output cache).
        """
        if ids is not None:
            raise ValueError("The linearised shadow trains without example ids; pass ids=None.")
        params = self.shadow.trained_parameters()
        target = _move(y, params[0].device)
        if isinstance(target, Tensor) and target.is_floating_point():
            target = target.to(params[0].dtype)
        with torch.no_grad():
            prediction = self.shadow(x)
        with torch.inference_mode(False), torch.enable_grad():
            leaf = prediction.detach().clone().requires_grad_(True)
            loss = self.loss_fn(leaf, target)
            (g,) = torch.autograd.grad(_scalar(loss) * scale, leaf, allow_unused=True)
        g = torch.zeros_like(leaf) if g is None else g
        trained = {id(p) for p in self._trained}
        grads = self.shadow.transposed_jacobian_product(x, g)
        kept = [(param, grad) for param, grad in zip(params, grads, strict=True) if id(param) in trained]
        _add_grads([param for param, _ in kept], [grad for _, grad in kept])
        return loss.detach()

    def step(self, lr: float, reduce_grad: Callable[[Tensor], Tensor] | None = None) -> None:
        """One mirrored update with the first group's learning rate ``lr``, then clear the gradients.

        ``reduce_grad`` maps each accumulated gradient to the one applied: under data parallelism the
        network steps with the gradient averaged over processes, and so must the shadow.
        """
        lr = _check_lr(lr)
        _mirrored_step(
            self, self._optimizer, self._trained, [lr * ratio for ratio in self._ratios], reduce_grad
        )

    def discard(self) -> None:
        """Drop a partly accumulated gradient (a failed micro-batch must not leak into a later step)."""
        self._optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """The mirrored optimizer's state and the groups' lr ratios."""
        return {"optimizer": self._optimizer.state_dict(), "lr_ratios": list(self._ratios)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (load the shadow's own state first: it checks the model)."""
        if not isinstance(state, Mapping) or "optimizer" not in state:
            raise ValueError(
                f"{type(self).__name__} state must be the dict returned by {type(self).__name__}.state_dict()."
            )
        ratios = [float(r) for r in state.get("lr_ratios", self._ratios)]
        if len(ratios) != len(self._optimizer.param_groups):
            raise ValueError(
                f"The saved mirror has {len(ratios)} parameter groups, this one "
                f"{len(self._optimizer.param_groups)}; build it from the same optimizer."
            )
        self._optimizer.load_state_dict(state["optimizer"])
        self._ratios = ratios


def _shadow_groups(
    shadow: LinearizedShadow, optimizer: Optimizer, model: nn.Module
) -> list[list[nn.Parameter]]:
    """Per user group, the ``θ'`` of its trainable parameters of ``model`` (matched by identity)."""
    names = {id(p): name for name, p in model.named_parameters()}
    known = set(shadow.parameter_names)
    groups = []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            name = names.get(id(p))
            if name is None or not p.requires_grad:
                continue  # outside the model, or frozen: the network's f does not move with it
            if name not in known:
                raise ValueError(
                    f"The optimizer trains {name!r}, which the linearised shadow was not built with (was it "
                    "frozen then?); build the shadow after setting requires_grad."
                )
            params.append(shadow.trained_parameter(name))
        groups.append(params)
    return groups


def _lr_ratios(optimizer: Optimizer, groups: Sequence[Sequence[nn.Parameter]]) -> list[float]:
    """``lr_g / lr_0`` for each kept (non-empty) group, 1 when ``lr_0`` is 0."""
    lrs = [float(_group_hyperparameters(group).get("lr", 0.0)) for group in optimizer.param_groups]
    lr0 = lrs[0]
    if not math.isfinite(lr0):
        raise ValueError(f"The optimizer's first group has lr {lr0}; a finite lr is needed.")
    return [lr / lr0 if lr0 != 0 else 1.0 for lr, params in zip(lrs, groups, strict=True) if len(params)]


__all__ = ["LinearizedMirror", "LinearizedShadow"]
