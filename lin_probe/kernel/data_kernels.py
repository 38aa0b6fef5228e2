"""Which data kernel ``K = ψψᵀ/d`` the affine fit should use: one that follows the architecture.

Hu et al.'s ``K = XXᵀ/d`` is the kernel of a network whose first layer sees the whole input. A
convolution sees patches: to first order its NTK is an affine transform of the patch kernel, and
after global average pooling only the *mean patch* survives (``(1/L²) Σ_{l,l'} p_lᵀp'_{l'} =
p̄ᵀp̄'``). :class:`PatchMeanFeatures` computes that mean patch for the first convolution a model
applies to its inputs (:func:`first_convolution`); :func:`data_kernel_candidates` turns a user's
``data_kernel`` setting into feature maps, and :func:`choose_data_kernel` keeps the one whose fit
explains the centred NTK best.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lin_probe._model_state import eval_semantics
from lin_probe._validation import as_feature_matrix
from lin_probe.kernel.affine import AffineKernel
from lin_probe.linalg.operator import SymmetricOperator

FeaturesFn = Callable[[Any], Tensor]
DATA_KERNELS = ("auto", "flat", "patch_mean", "token_counts", "token_one_hot")

_PATCH_CHUNK_NUMEL = 1 << 24  # unfold at most ~16M numbers at a time (128 MiB in float64)


# ---------------------------------------------------------------------------------------------
# mean input patch of a convolution
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchMeanFeatures:
    """``x ↦ p̄(x) = (1/L) Σ_l patch_l(x)``: the mean input patch over the ``L`` output positions of a conv.

    The geometry is that of the first convolution the network applies to its inputs, so the
    patches are exactly the ones that convolution sees (padding, ``padding_mode``, stride,
    dilation included). Output: ``(N, C·k)`` for ``(N, C, L)`` inputs (``dims=1``) or
    ``(N, C·kh·kw)`` for ``(N, C, H, W)`` inputs (``dims=2``), ordered like ``weight[o].reshape(-1)``,
    so ``weight.reshape(out, -1) @ p̄`` is the conv's output averaged over positions (bias aside).
    Groups do not matter: the data kernel is ``Σ_g ⟨p̄_g, p̄'_g⟩ = ⟨p̄, p̄'⟩`` over all input
    channels. ``padding`` is ``(before, after)`` per spatial dimension, as torch resolves the
    conv's ``padding`` (``"same"`` puts the odd extra after). A frozen dataclass of ints and
    strings: it pickles with a checkpoint.
    """

    dims: int
    in_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    padding_mode: str = "zeros"
    out_channels: int | None = None

    def __post_init__(self) -> None:
        """Refuse geometry no convolution has, so a bad config fails here rather than inside unfold.

        Lists (a geometry read back from JSON) become tuples, so a restored config equals the saved one.
        """
        for name in ("kernel_size", "stride", "dilation"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.padding, list) or any(isinstance(pair, list) for pair in self.padding):
            object.__setattr__(self, "padding", tuple(tuple(pair) for pair in self.padding))
        if self.dims not in (1, 2):
            raise ValueError(f"`dims` must be 1 (Conv1d) or 2 (Conv2d), got {self.dims!r}.")
        if not (isinstance(self.in_channels, int) and self.in_channels >= 1):
            raise ValueError(f"`in_channels` must be a positive int, got {self.in_channels!r}.")
        for name in ("kernel_size", "stride", "dilation"):
            value = getattr(self, name)
            if len(value) != self.dims or not all(isinstance(v, int) and v >= 1 for v in value):
                raise ValueError(f"`{name}` must be {self.dims} positive int(s), got {value!r}.")
        if len(self.padding) != self.dims or not all(
            len(pair) == 2 and all(isinstance(p, int) and p >= 0 for p in pair) for pair in self.padding
        ):
            raise ValueError(
                f"`padding` must be {self.dims} (before, after) pair(s) of non-negative ints, got {self.padding!r}."
            )
        if self.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(
                f"`padding_mode` must be 'zeros', 'reflect', 'replicate' or 'circular', got {self.padding_mode!r}."
            )

    @classmethod
    def from_conv(cls, conv: nn.Conv1d | nn.Conv2d) -> PatchMeanFeatures:
        """The geometry of ``conv`` (string padding ``"same"``/``"valid"`` resolved as torch does)."""
        if not isinstance(conv, nn.Conv1d | nn.Conv2d):
            raise TypeError(f"`conv` must be an nn.Conv1d or nn.Conv2d, got {type(conv).__name__}.")
        dims = len(conv.kernel_size)
        return cls(
            dims=dims,
            in_channels=int(conv.in_channels),
            kernel_size=tuple(int(k) for k in conv.kernel_size),
            stride=tuple(int(s) for s in conv.stride),
            padding=_resolve_padding(conv.padding, conv.kernel_size, conv.dilation),
            dilation=tuple(int(d) for d in conv.dilation),
            padding_mode=str(conv.padding_mode),
            out_channels=int(conv.out_channels),
        )

    @property
    def patch_size(self) -> int:
        """``C·k`` (1-D) or ``C·kh·kw`` (2-D): the feature dimension ``d`` of the data kernel."""
        return self.in_channels * math.prod(self.kernel_size)

    def describe(self) -> str:
        """A short label for logs, e.g. ``patch_mean (3×3, stride 1, padding 1, of Conv2d(1→2048))``."""

        def compact(values: Sequence[object]) -> str:
            return str(values[0]) if len(set(values)) == 1 else "×".join(str(v) for v in values)

        pads = [p for pair in self.padding for p in pair]
        extras = [f"stride {compact(self.stride)}", f"padding {compact(pads)}"]
        if any(d != 1 for d in self.dilation):
            extras.append(f"dilation {compact(self.dilation)}")
        if self.padding_mode != "zeros":
            extras.append(f"{self.padding_mode} padding")
        out = "?" if self.out_channels is None else str(self.out_channels)
        conv = f"Conv{self.dims}d({self.in_channels}→{out})"
        return f"patch_mean ({'×'.join(map(str, self.kernel_size))}, {', '.join(extras)}, of {conv})"

    def __call__(self, inputs: Tensor) -> Tensor:
        """The mean input patch of every example: ``(N, patch_size)`` in the inputs' dtype."""
        if not isinstance(inputs, Tensor):
            raise TypeError(
                f"data_kernel='patch_mean' needs a torch.Tensor of shape {self._expected()}, "
                f"got {type(inputs).__name__}."
            )
        if inputs.dim() != self.dims + 2 or inputs.shape[1] != self.in_channels:
            raise ValueError(
                f"data_kernel='patch_mean' ({self.describe()}) expects inputs of shape {self._expected()}, "
                f"got {tuple(inputs.shape)}. Use data_kernel='flat' or a callable for inputs the first "
                "convolution does not see as they are."
            )
        if not inputs.is_floating_point():
            raise TypeError(f"data_kernel='patch_mean' needs floating-point inputs, got {inputs.dtype}.")
        x = inputs.detach()
        kernel, stride, dilation = self.kernel_size, self.stride, self.dilation
        pads = self.padding
        if self.dims == 1:  # (N, C, L) as (N, C, 1, L)
            x = x.unsqueeze(2)
            kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
            pads = ((0, 0), *pads)
        flat = [p for pair in reversed(pads) for p in pair]  # F.pad lists the last dimension first
        if any(flat):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, flat, mode=mode)
        per_example = self.patch_size * _positions(x.shape[2:], kernel, stride, dilation)
        if per_example == 0:
            raise ValueError(
                f"data_kernel='patch_mean': inputs of shape {tuple(inputs.shape)} are smaller than the "
                f"convolution's window ({self.describe()}); there are no patches."
            )
        chunk = max(1, _PATCH_CHUNK_NUMEL // per_example)
        means = [
            F.unfold(part, kernel, dilation=dilation, stride=stride).mean(dim=2) for part in x.split(chunk)
        ]
        return torch.cat(means)

    def _expected(self) -> str:
        """The input shape this geometry accepts, for error messages."""
        return f"(N, {self.in_channels}, L)" if self.dims == 1 else f"(N, {self.in_channels}, H, W)"


def _resolve_padding(
    padding: str | Sequence[int], kernel_size: Sequence[int], dilation: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """``(before, after)`` per dimension, as torch resolves it; ``"same"`` puts the odd extra after."""
    if padding == "valid":
        return tuple((0, 0) for _ in kernel_size)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
        return tuple((t // 2, t - t // 2) for t in totals)
    if isinstance(padding, str):
        raise ValueError(f"unknown convolution padding {padding!r}; torch accepts 'same', 'valid' or ints.")
    return tuple((int(p), int(p)) for p in padding)


def _positions(
    size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> int:
    """Number of output positions of a (padding-free) convolution on a padded input of ``size``."""
    counts = [
        max(0, (s - d * (k - 1) - 1) // st + 1)
        for s, k, st, d in zip(size, kernel, stride, dilation, strict=True)
    ]
    return math.prod(counts)


# ---------------------------------------------------------------------------------------------
# the first convolution applied to the inputs
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# token inputs
# ---------------------------------------------------------------------------------------------

_ONE_HOT_MAX_FEATURES = 1 << 16
"""Largest ``T·V`` for position-wise one-hot features (above it only the token counts are tried)."""


@dataclass(frozen=True)
class TokenFeatures:
    """Integer token inputs ``(N, T)`` as float vectors for the data kernel, over the vocabulary ``V`` of
    the model's first ``nn.Embedding``.

    ``"counts"``: the bag of tokens, ``(N, V)``: ``⟨x, x'⟩ = Σ_{l,l'} [t_l = t'_{l'}]``, the token-overlap
    kernel an embedding followed by pooling has at init. ``"one_hot"``: position-wise one-hot, ``(N, T·V)``:
    ``⟨x, x'⟩ = Σ_l [t_l = t'_l]``, the overlap an embedding plus position-dependent layers sees. Like
    the patch mean for convolutions, the data kernel follows the architecture. A frozen dataclass:
    it pickles with a checkpoint.
    """

    vocab: int
    mode: str = "counts"

    def __post_init__(self) -> None:
        if not (isinstance(self.vocab, int) and self.vocab >= 1):
            raise ValueError(f"`vocab` must be a positive int, got {self.vocab!r}.")
        if self.mode not in ("counts", "one_hot"):
            raise ValueError(f"`mode` must be 'counts' or 'one_hot', got {self.mode!r}.")

    @property
    def name(self) -> str:
        return f"token_{self.mode}"

    def __call__(self, tokens: Tensor) -> Tensor:
        if tokens.is_floating_point() or tokens.is_complex():
            raise TypeError(f"token features need integer token ids, got dtype {tokens.dtype}.")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab}) (the first nn.Embedding's vocabulary), got "
                f"[{int(tokens.min())}, {int(tokens.max())}]."
            )
        one_hot = F.one_hot(tokens.reshape(tokens.shape[0], -1).long(), self.vocab).to(
            torch.get_default_dtype()
        )
        return one_hot.sum(dim=1) if self.mode == "counts" else one_hot.flatten(1)


def first_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's first ``nn.Embedding`` (registration order): whose vocabulary token features use."""
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _token_candidates(
    model: nn.Module, example_inputs: Any, wanted: str
) -> list[tuple[str, FeaturesFn | None]]:
    embedding = first_embedding(model)
    if embedding is None:
        raise TypeError(
            f"`inputs` has dtype {example_inputs.dtype}: token ids, but the model has no nn.Embedding to take "
            "the vocabulary from. Pass `data_kernel` (or `features_fn`), a function mapping inputs to float "
            "feature vectors."
        )
    positions = max(1, example_inputs[0].numel())
    modes = ["counts"] + (
        ["one_hot"] if positions * embedding.num_embeddings <= _ONE_HOT_MAX_FEATURES else []
    )
    if wanted != "auto":
        modes = [wanted.removeprefix("token_")]
    features = [TokenFeatures(embedding.num_embeddings, mode) for mode in modes]
    return [(f.name, f) for f in features]


class _Found(Exception):
    """Raised from the pre-hook to stop the forward pass once the first convolution has run."""


def first_convolution(model: nn.Module, example_inputs: Any) -> nn.Conv1d | nn.Conv2d | None:
    """The first ``Conv1d``/``Conv2d`` that *runs* in ``model``'s forward pass, if it sees the raw inputs.

    Registration order says nothing about execution order, so this runs one forward pass on the
    first two examples with forward pre-hooks on every convolution, and stops at the first one
    called. It counts only if the tensor it receives is the model's input itself (the same object,
    or equal shape and values): after a stem that transforms the input (a linear layer, a
    normalisation, a scaling) the conv's patches are not patches of the inputs, and ``None`` is
    returned, as for a model without convolutions or inputs that are not a tensor. The pass runs
    under ``no_grad`` and :func:`~lin_probe._model_state.eval_semantics` (which also restores every
    RNG stream): the model's flags, ``.grad``s and RNG state are left as they were.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(example_inputs, Tensor) or example_inputs.dim() < 2:
        return None
    x = example_inputs.detach()[:2]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
    if not convs:
        return None
    seen: list[tuple[nn.Module, Any]] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append((module, args[0] if args else None))
        raise _Found

    handles = [conv.register_forward_pre_hook(hook) for conv in convs]
    try:
        with torch.no_grad(), eval_semantics(model):  # eval_semantics also restores every RNG stream
            try:
                model(x)
            except _Found:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        return None
    module, received = seen[0]
    if received is x or _same_tensor(received, x):
        assert isinstance(module, nn.Conv1d | nn.Conv2d)
        return module
    return None


def _same_tensor(received: Any, x: Tensor) -> bool:
    """Whether the conv's input is the model input up to a copy (same shape, same values)."""
    if not isinstance(received, Tensor) or received.shape != x.shape:
        return False
    return bool(torch.equal(received.to(device=x.device, dtype=x.dtype), x))


# ---------------------------------------------------------------------------------------------
# candidates and the choice
# ---------------------------------------------------------------------------------------------


def check_data_kernel(data_kernel: Any) -> None:
    """``data_kernel`` is one of :data:`DATA_KERNELS` or a callable mapping inputs to feature rows:
    a ``TypeError`` for anything else that is not a string, a ``ValueError`` for an unknown name."""
    if callable(data_kernel):
        return
    if not isinstance(data_kernel, str):
        raise TypeError(
            f"`data_kernel` must be one of {DATA_KERNELS} or a callable mapping inputs to feature "
            f"vectors, got {type(data_kernel).__name__}."
        )
    if data_kernel not in DATA_KERNELS:
        raise ValueError(
            f"unknown data_kernel {data_kernel!r}; choose one of {DATA_KERNELS} or pass a callable mapping "
            "inputs to feature vectors."
        )


def data_kernel_candidates(
    spec: Any, model: nn.Module, example_inputs: Any
) -> list[tuple[str, FeaturesFn | None]]:
    """The feature maps a ``data_kernel`` setting stands for, as ``(name, features_fn)`` pairs.

    ``"flat"``: the inputs flattened (``None``, as :func:`lin_probe.shadows.linear.feature_rows`
    reads it). ``"patch_mean"``: the mean patch of the first convolution applied to the inputs
    (:func:`first_convolution`), an error if there is none. A callable: itself (``"callable"``; a
    :class:`PatchMeanFeatures` is named ``"patch_mean"``). ``"auto"``: flat, plus patch_mean where
    it applies, for :func:`choose_data_kernel` to pick from; for integer (token) inputs,
    ``"token_counts"`` and ``"token_one_hot"`` (:class:`TokenFeatures` over the first embedding's
    vocabulary) instead.
    """
    check_data_kernel(spec)
    if isinstance(spec, PatchMeanFeatures):
        return [("patch_mean", spec)]
    if isinstance(spec, TokenFeatures):
        return [(spec.name, spec)]
    tokens = isinstance(example_inputs, Tensor) and not (
        example_inputs.is_floating_point() or example_inputs.is_complex()
    )
    if spec in ("token_counts", "token_one_hot") or (spec == "auto" and tokens):
        return _token_candidates(model, example_inputs, spec)
    if callable(spec):
        return [("callable", spec)]
    if spec == "flat":
        return [("flat", None)]
    if spec in ("patch_mean", "auto"):
        conv = first_convolution(model, example_inputs)
        patch = [] if conv is None else [("patch_mean", PatchMeanFeatures.from_conv(conv))]
        if spec == "auto":
            return [("flat", None), *patch]
        if not patch:
            raise ValueError(
                "data_kernel='patch_mean' needs a Conv1d/Conv2d applied to the model's inputs as they are, "
                "but the model has no convolution applied to its inputs. Use data_kernel='flat' or pass a "
                "callable that maps inputs to feature vectors."
            )
        return patch
    raise AssertionError(f"check_data_kernel let {spec!r} through")  # DATA_KERNELS are all handled above


@dataclass(frozen=True)
class DataKernelChoice:
    """The data kernel kept by :func:`choose_data_kernel`, its fit, and every candidate's scores.

    ``scores`` maps each candidate's name to ``(rel_error, rel_error_centered)`` (NaN where the
    fit did not give one, or failed).
    """

    name: str
    features_fn: FeaturesFn | None
    kernel: AffineKernel
    scores: dict[str, tuple[float, float]]

    def state_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint: the name, the patch geometry (``None`` otherwise), the scores.

        A callable cannot be saved: :func:`features_from_state` takes it from the configuration again.
        """
        features = self.features_fn
        saved = isinstance(features, PatchMeanFeatures | TokenFeatures)
        geometry = dataclasses.asdict(features) if saved else None
        return {"name": self.name, "features": geometry, "scores": dict(self.scores)}

    @staticmethod
    def flat_state() -> dict[str, Any]:
        """:meth:`state_dict` of the flat kernel when no choice was recorded."""
        return {"name": "flat", "features": None, "scores": {}}

    def summary(self) -> str:
        """One line for logs, e.g. ``data kernel: patch_mean (centred fit error 0.062; flat 0.76)``."""
        own = self.scores[self.name][1]
        others = "".join(
            f"; {name} {_fmt(score[1])}" for name, score in self.scores.items() if name != self.name
        )
        return f"data kernel: {self.name} (centred fit error {_fmt(own)}{others})"


def choose_data_kernel(
    theta0: SymmetricOperator,
    candidates: Sequence[tuple[str, FeaturesFn | None]],
    inputs: Any,
    *,
    fit: Callable[[SymmetricOperator, Tensor], AffineKernel],
) -> DataKernelChoice:
    """Fit ``Θ_0`` with every candidate's features and keep the lowest ``rel_error_centered``.

    The centred error is the criterion because it is what the verdict reads: the constant mode,
    which every data kernel fits equally (``b·11ᵀ``), is left out of it. ``fit(theta0, rows)``
    returns an :class:`AffineKernel`, so the caller decides dense or matrix-free. Ties and NaN go
    to ``"flat"`` (then to the earlier candidate); NaN never beats a number. A candidate whose fit
    raises ``ValueError`` (its features do not identify ``a, b, c``) scores NaN and is skipped; if
    every candidate fails, the first error is raised.
    """
    if not candidates:
        raise ValueError("`candidates` is empty; pass data_kernel_candidates(...)'s list.")
    fitted: list[tuple[str, FeaturesFn | None, AffineKernel]] = []
    scores: dict[str, tuple[float, float]] = {}
    errors: list[ValueError] = []
    for name, features_fn in candidates:
        try:
            kernel = fit(theta0, _feature_rows(inputs, features_fn))
        except ValueError as error:
            errors.append(error)
            scores[name] = (math.nan, math.nan)
            continue
        scores[name] = (_number(kernel.rel_error), _number(kernel.rel_error_centered))
        fitted.append((name, features_fn, kernel))
    if not fitted:
        raise errors[0]

    def rank(entry: tuple[str, FeaturesFn | None, AffineKernel]) -> tuple[bool, float, bool]:
        score = scores[entry[0]][1]
        return (math.isnan(score), 0.0 if math.isnan(score) else score, entry[0] != "flat")

    name, features_fn, kernel = min(fitted, key=rank)  # min is stable: earlier candidates win ties
    return DataKernelChoice(name=name, features_fn=features_fn, kernel=kernel, scores=scores)


def features_from_state(saved: Mapping[str, Any], spec: Any) -> FeaturesFn | None:
    """The feature map a saved :meth:`DataKernelChoice.state_dict` was built on; ``spec`` (the
    configured ``data_kernel``) supplies a callable, which a checkpoint cannot hold."""
    name = saved["name"]
    if name == "flat":
        return None
    if name == "patch_mean":
        return PatchMeanFeatures(**saved["features"])
    if name in ("token_counts", "token_one_hot"):
        return TokenFeatures(**saved["features"])
    if not callable(spec):
        raise ValueError(
            "the checkpoint's shadow was built on a callable data kernel (`data_kernel=`/`features_fn=`); "
            "pass the same callable to resume"
        )
    return spec


def _feature_rows(inputs: Any, features_fn: FeaturesFn | None) -> Tensor:
    """``lin_probe.shadows.linear.feature_rows`` without importing it (``lin_probe.shadows`` imports this package)."""
    if features_fn is not None:
        with torch.no_grad():
            inputs = features_fn(inputs)
    return as_feature_matrix(inputs, "inputs")


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2g}"


__all__ = [
    "DATA_KERNELS",
    "DataKernelChoice",
    "PatchMeanFeatures",
    "check_data_kernel",
    "choose_data_kernel",
    "data_kernel_candidates",
    "features_from_state",
    "first_convolution",
]
