"""An unbiased output-sketched NTK for models with many outputs (language models: ``C = T·V``).

The exact trace-averaged kernel ``Θ = (1/C) Σ_c J_c J_cᵀ`` costs ``C`` backward passes per example.
With ``V = [v_1 … v_S]`` (``C × S``, entries i.i.d. Rademacher ±1 or standard Gaussian, so
``E[v vᵀ] = I``) the model whose output is ``g(x) = f(x) V / √C`` has ``S`` outputs, and the dense
path's own trace average over them is

    ``Θ_S = (1/S) Σ_s (1/C) (J v_s)(J v_s)ᵀ``,   ``E[Θ_S]_ij = (1/C) tr(J_i J_jᵀ) = Θ_ij``

(``J_i`` is example ``i``'s ``C × P`` Jacobian). The dense kernel already divides by its output count
``S``, so the only scale the sketch adds is ``1/√C`` on the outputs. It is exactly unbiased, costs
``S`` instead of ``C`` backward passes per example, and works through every path
(:func:`~lin_probe.ntk.empirical_ntk`, :func:`~lin_probe.ntk.ntk_matvec`, the structured Gram)
because it is only an ``output_fn``.

Its error needs no exact kernel: split the ``S`` directions into two halves ``A`` and ``B`` of
``S/2``. Then ``Θ_S = (Θ_A + Θ_B)/2`` exactly, and ``(Θ_A − Θ_B)/2`` has the same covariance as
``Θ_S − Θ`` (the halves' errors are independent and identically distributed), so its spectral norm
estimates the sketch's error at no extra backward passes (:func:`split_half_error`). Against the
exact kernel (:func:`sketch_error`) the error costs ``C`` backward passes per example: on Lightning's
demo Transformer as a token LM (``C = 1,024``) the exact kernel took 42 s on 16 examples, the
sketch (``S = 32``) 4.0 s on 32 and 111 s on 256 (``benchmarks/sketch_lm.py``, figures in
``benchmarks/README.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lin_probe._model_state import floating_dtype
from lin_probe._validation import check_int
from lin_probe.ntk._plumbing import OutputFn, output_matrix
from lin_probe.ntk.dense import empirical_ntk, predict

SketchKind = Literal["rademacher", "gaussian"]
KINDS: tuple[str, ...] = ("rademacher", "gaussian")


@dataclass(frozen=True)
class OutputSketch:
    """``S = projections`` random output directions drawn from ``seed`` (reproducible, own generator).

    ``projections >= C`` means no sketch: :meth:`output_fn` then returns the exact outputs (an
    ``S ≥ C`` sketch would cost as much as the exact kernel and still be noisy).
    """

    projections: int
    seed: int = 0
    kind: SketchKind = "rademacher"
    _cache: dict[tuple[int, str, torch.dtype], Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        check_int("projections", self.projections, minimum=1)
        check_int("seed", self.seed, minimum=0)
        if self.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {self.kind!r}.")

    def matrix(self, c: int, *, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        """``V / √C`` (``C × S``): drawn once on the CPU from ``torch.Generator(seed)``, cached per (C, device, dtype).

        Drawing on the CPU in float64 makes the same seed give the same directions on every device.
        """
        check_int("C", c, minimum=1)
        key = (c, str(torch.device(device)), dtype)
        if key not in self._cache:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            shape = (c, self.projections)
            if self.kind == "rademacher":
                v = torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2.0 - 1.0
            else:
                v = torch.randn(shape, generator=gen, dtype=torch.float64)
            self._cache[key] = (v / math.sqrt(c)).to(device=device, dtype=dtype)
        return self._cache[key]

    def output_fn(
        self,
        base: OutputFn | None,
        c: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        half: int | None = None,
    ) -> OutputFn:
        """``raw ↦ base(raw) V / √C``: ``empirical_ntk`` with it is the unbiased sketch of the kernel with ``base``.

        ``c`` is ``base``'s number of outputs per example (checked at every call: a different
        ``C`` would silently mean a different kernel). ``half`` (0 or 1) keeps the first or second
        half of the directions (:meth:`halves`).
        """
        check_int("C", c, minimum=1)
        if self.projections >= c:
            if half is not None:
                raise ValueError("An exact sketch (projections >= C) has no halves.")
            return lambda raw: output_matrix(raw, base)
        v = self.matrix(c, device=device, dtype=dtype)
        if half is not None:
            if half not in (0, 1):
                raise ValueError(f"`half` must be 0 or 1 (or None for every direction), got {half!r}.")
            first, second = self.halves()
            v = v[:, :first] if half == 0 else v[:, first : first + second]

        def sketched(raw: Any) -> Tensor:
            out = output_matrix(raw, base)
            if out.shape[1] != c:
                raise ValueError(
                    f"The sketch was built for C = {c} outputs per example, but the model gives "
                    f"{out.shape[1]}; build it again with the model's output count."
                )
            return out @ v.to(out.dtype)

        return sketched

    def halves(self) -> tuple[int, int]:
        """How many directions each half holds: equal halves, so their kernels' mean is ``Θ_S`` exactly.

        Raises ``ValueError`` for an odd or single projection (no split-half error estimate).
        """
        if self.projections < 2 or self.projections % 2:
            raise ValueError(
                f"A split-half error estimate needs an even number of projections >= 2, got {self.projections}."
            )
        return self.projections // 2, self.projections // 2


def split_half_error(first: Tensor, second: Tensor) -> float:
    """Estimated ``‖Θ_S − Θ‖₂ / ‖Θ‖₂`` from the kernels of the sketch's two halves (module docstring).

    ``Θ_S = (first + second)/2``; its error and ``(first − second)/2`` have the same mean (zero) and
    covariance, so the two spectral norms agree in distribution up to the third moments the
    central limit theorem removes (pinned against the exact kernel in the tests). ``0.0`` when both
    vanish, ``inf`` when only ``Θ_S`` does.
    """
    if first.shape != second.shape or first.ndim != 2:
        raise ValueError(
            f"Two kernels of one shape expected, got {tuple(first.shape)} and {tuple(second.shape)}."
        )
    a, b = first.detach().to(torch.float64), second.detach().to(torch.float64)
    diff = float(torch.linalg.matrix_norm((a - b) / 2, ord=2))
    scale = float(torch.linalg.matrix_norm((a + b) / 2, ord=2))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def sketched_ntk_with_error(
    model: nn.Module,
    inputs: Tensor,
    sketch: OutputSketch,
    *,
    output_fn: OutputFn | None = None,
    **ntk_options: Any,
) -> tuple[Tensor, float]:
    """``Θ_S`` and its :func:`split_half_error`, from the two halves' kernels (about the cost of ``Θ_S``)."""
    first, second = (
        empirical_ntk(model, inputs, output_fn=fn, **ntk_options)
        for fn in _sketched_output_fns(model, inputs, sketch, output_fn, halves=(0, 1))
    )
    return (first + second) / 2, split_half_error(first, second)


def output_count(model: nn.Module, inputs: Tensor, output_fn: OutputFn | None = None) -> int:
    """``C``: the outputs per example of ``output_fn(model(x))``, from one eval-mode forward."""
    return int(predict(model, inputs[:1], output_fn=output_fn).shape[1])


def sketched_ntk(
    model: nn.Module,
    inputs: Tensor,
    sketch: OutputSketch,
    *,
    output_fn: OutputFn | None = None,
    **ntk_options: Any,
) -> Tensor:
    """``Θ_S``: :func:`~lin_probe.ntk.empirical_ntk` of the sketched outputs (``C`` read from the model)."""
    (fn,) = _sketched_output_fns(model, inputs, sketch, output_fn, halves=(None,))
    return empirical_ntk(model, inputs, output_fn=fn, **ntk_options)


def _sketched_output_fns(
    model: nn.Module,
    inputs: Tensor,
    sketch: OutputSketch,
    output_fn: OutputFn | None,
    *,
    halves: tuple[int | None, ...],
) -> list[OutputFn]:
    """The sketch's ``output_fn`` for each of ``halves`` (``None``: every direction), ``C`` read once."""
    c = output_count(model, inputs, output_fn)
    dtype = floating_dtype(model) or torch.get_default_dtype()
    return [sketch.output_fn(output_fn, c, device=inputs.device, dtype=dtype, half=half) for half in halves]


def sketch_error(
    model: nn.Module,
    inputs: Tensor,
    sketch: OutputSketch,
    *,
    output_fn: OutputFn | None = None,
    subsample: int = 16,
    **ntk_options: Any,
) -> float:
    """``‖Θ_S − Θ‖₂ / ‖Θ‖₂`` on the first ``subsample`` inputs, against the exact kernel.

    It costs the exact kernel (``C`` backward passes per example); :func:`sketched_ntk_with_error`
    estimates the same error from the sketch alone, which is what the monitor does.

    An *estimate* of the sketch's error at the full ``n``: it is measured on a subsample (where the
    exact kernel is affordable) with the same directions ``V``. The relative spectral error of a
    kernel with a dominant mode changes little with ``n``, but it is a subsample measurement, which
    is how the fit card should state it. ``0.0`` when both kernels vanish, ``inf`` when only ``Θ`` does.
    """
    check_int("subsample", subsample, minimum=1)
    x = inputs[:subsample]
    exact = empirical_ntk(model, x, output_fn=output_fn, **ntk_options).detach().to(torch.float64)
    approx = sketched_ntk(model, x, sketch, output_fn=output_fn, **ntk_options).detach().to(torch.float64)
    diff = float(torch.linalg.matrix_norm(approx - exact, ord=2))
    scale = float(torch.linalg.matrix_norm(exact, ord=2))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def projections_for(c: int, n: int, target_error: float = 0.05) -> int:
    """Projections ``S`` whose relative spectral error should be about ``target_error``, in ``[1, C]``.

    From the estimator's variance: for one direction, ``Var(vᵀ K v) ≤ 2 ‖K‖_F²`` (Gaussian;
    Rademacher is smaller), so every entry of ``Θ_S`` has relative standard error at most
    ``√(2/S)`` (the worst case, a rank-one output Gram ``K_ij = J_i J_jᵀ``). The spectral error is
    smaller than the entrywise one by the kernel's dominant mode: ``‖Θ‖₂`` grows like ``n`` times the
    mean entry while the noise's spectral norm grows like ``√n`` times the entrywise error when the
    per-pair noise is not all aligned, so the assumption is ``rel. spectral error ≈ √(2/(S·n))`` ⇒
    ``S = ⌈2 / (n ε²)⌉``. ``n`` is floored at 1; ``S ≥ C`` returns ``C`` (use the exact kernel).
    Check the assumption with :func:`sketch_error` (the fit card states the measured value).
    """
    check_int("C", c, minimum=1)
    check_int("n", n, minimum=1)
    if isinstance(target_error, bool) or not isinstance(target_error, (int, float)):
        raise TypeError(f"`target_error` must be a float in (0, 1], got {target_error!r}.")
    if not (0.0 < float(target_error) <= 1.0):
        raise ValueError(f"`target_error` must be in (0, 1], got {target_error}.")
    s = math.ceil(2.0 / (n * float(target_error) ** 2))
    return max(1, min(c, s))


__all__ = [
    "KINDS",
    "OutputSketch",
    "SketchKind",
    "output_count",
    "projections_for",
    "sketch_error",
    "sketched_ntk",
    "sketched_ntk_with_error",
    "split_half_error",
]
