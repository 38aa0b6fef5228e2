"""``RegimeProbe``: the Lightning-free monitor that the callback (or a plain training loop) drives.

It owns everything measured once at the start — the probe set, ``f_0`` on it, the affine fit of
``Θ_0`` and the reference kernels — and a list of :class:`ShadowRun`\\ s, each a shadow trained in
lock-step with the network by a mirror of the user's optimizer, with its own exit tracker. The
owner calls, per optimizer step, :meth:`accumulate` for each micro-batch and then :meth:`step`
with the learning rate the network is about to use; at a check, :meth:`measure` and
:meth:`observe` (or :meth:`check`, both at once). Nothing here imports Lightning: collectives,
ranks and loggers are the owner's business, handed in as plain callables where needed.

Plain PyTorch::

    probe = RegimeProbe.start(model, (x_val, y_val), optimizer, MonitorConfig(loss="mse"))
    probe.check(model, step=0)
    for step, (x, y) in enumerate(loader, start=1):
        lr = optimizer.param_groups[0]["lr"]
        loss = F.mse_loss(model(x), y); optimizer.zero_grad(); loss.backward()
        probe.accumulate(x, y); probe.step(lr); optimizer.step()
        probe.check(model, step)
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lin_probe.data import indices_from_batch
from lin_probe.kernel import AffineKernel
from lin_probe.kernel.data_kernels import DataKernelChoice, data_kernel_candidates, features_from_state
from lin_probe.linalg.operator import NonFiniteOperator, SymmetricOperator
from lin_probe.losses import AUTO
from lin_probe.monitor.batch_statistics import probe_batch_statistics
from lin_probe.monitor.checks import (
    FROBENIUS_KEYS,
    POOR_FIT_THRESHOLD,
    NTKProbe,
    NTKReference,
    compare,
    fit_at_init,
    ntk_check,
    ntk_check_keys,
    ntk_reference,
)
from lin_probe.monitor.config import Host, MonitorConfig
from lin_probe.monitor.diagnosis import Diagnosis, Verdict, diagnose
from lin_probe.monitor.kernel_measures import target_matrix
from lin_probe.monitor.outputs import NOISY_SKETCH_ERROR, KernelOutputs, choose_kernel_outputs
from lin_probe.monitor.probe import ProbeSet, probe_from_argument
from lin_probe.monitor.runs import LINEARIZED, MEMO, PAPER, ShadowRun, build_runs
from lin_probe.ntk import predict
from lin_probe.shadows.digests import BatchDigests
from lin_probe.shadows.linear import feature_rows

SKETCH_ERROR_KEY = "ntk_sketch_error"
"""A sketched NTK's split-half error at each dense NTK check (its relative spectral error, estimated)."""

STATE_VERSION = 3
"""Version of :meth:`RegimeProbe.state_dict`'s layout (1 was the unversioned first release; 3 added
the data kernel, the linearised shadow, the kernel measures' previous NTK and the diagnosis)."""

_LINEARIZED_HINT = (
    " For an exact verdict under this optimizer pass linearized=True: the network's own Taylor model "
    "trained by the same optimizer, which any optimizer applies exactly."
)


@dataclass
class Measurement:
    """One check's values (``step`` included) and, for dense NTK checks, Θ_t's eigenvalues.

    ``stop_reason``: why measuring must stop (the network and its shadow could not be compared, so no
    check can say anything), for the host to act on; ``None`` when the check went through.
    """

    record: dict[str, float]
    eigenvalues: Tensor | None = None
    stop_reason: str | None = None


class RegimeProbe:
    """Probe set, init state and shadow runs of one training run; see the module docstring."""

    def __init__(
        self,
        config: MonitorConfig,
        probe: ProbeSet,
        kernel: AffineKernel,
        ntk: NTKProbe,
        reference: NTKReference,
        initial_outputs: Tensor,
        runs: list[ShadowRun],
        host: Host | None = None,
        data_kernel: DataKernelChoice | None = None,
    ) -> None:
        self.config = config
        self.probe = probe
        self.kernel = kernel
        self.ntk = ntk
        self.reference = reference
        self.initial_outputs = initial_outputs
        self.runs = runs
        self.data_kernel = data_kernel
        self.kernel_outputs: KernelOutputs | None = None  # exact or sketched: set by start / from_state
        self.history: list[dict[str, float]] = []
        self.host = host or Host()
        self.outside_from_start = False
        self.diagnosis: Diagnosis | None = None
        self._diagnosis_due = False
        self._previous_ntk: tuple[int, Tensor] | None = None
        self.ntk_off = False
        """An NTK check failed: no more NTK checks in this fit (the functional ones carry on)."""
        self._theta0_at: tuple[SymmetricOperator, dict[str, int]] | None = None
        self._warned: set[str] = set()
        self.last_check_seconds: tuple[float, float | None] = (0.0, None)  # functional, NTK (None: none)
        for run in runs:
            message = run.mirror.mirror_warning()
            if message is not None:
                self.warn_once("mirror", message + ("" if self.run(LINEARIZED) else _LINEARIZED_HINT))

    # ------------------------------------------------------------------ building
    @classmethod
    def start(
        cls,
        model: nn.Module,
        probe: ProbeSet | Tensor | tuple[Tensor, Tensor],
        optimizer: torch.optim.Optimizer,
        config: MonitorConfig | None = None,
        *,
        train_size: int | None = None,
        host: Host | None = None,
        structured_seconds: Mapping[int, float] | None = None,
        structured_projections: int | None = None,
    ) -> RegimeProbe:
        """Measure ``Θ_0`` on the probe, fit the affine kernel and build the shadows, before any step.

        ``probe``: a :class:`ProbeSet`, a tensor of inputs or an ``(inputs, targets)`` pair.
        ``train_size`` (the training set's length, when known) sizes the memorizing shadow's table
        and bounds its example identities. ``structured_seconds``: the structured NTK's seconds on
        the probe's first ``m`` examples, already timed (the budget's pilot) over every output or
        (``structured_projections``) a sketch of that many directions, so ``method="auto"`` does not
        time that path again; ignored when the kernel's outputs here are other ones.
        """
        config = config or MonitorConfig()
        if not isinstance(probe, ProbeSet):
            probe = probe_from_argument(probe, n_probe=_rows(probe))
        probe = probe.on_model(model)
        host = host or Host()
        config = _with_loss(config, model, probe, announce=host.info)
        candidates = data_kernel_candidates(config.data_kernel_spec, model, probe.inputs)
        # Everything measured at init sees the network train mode runs (BatchNorm on the probe's
        # statistics): lin_probe.monitor.batch_statistics.
        with probe_batch_statistics(model, probe.inputs):
            outputs = choose_kernel_outputs(config.outputs, model, probe.inputs, config.output_fn)
            kernel_output_fn = outputs.output_fn(config.output_fn, model, probe.inputs)
            timed_alike = structured_projections == outputs.projections
            ntk = NTKProbe(
                probe.inputs,
                kernel_output_fn,
                learning_rate_weights(model, optimizer),
                config.plan,
                structured_seconds=dict(structured_seconds or {}) if timed_alike else {},
            )
            progress = host.progress(f"NTK at init on {len(probe)} probe examples")
            halves = outputs.half_output_fns(config.output_fn, model, probe.inputs)
            init = fit_at_init(model, ntk, candidates, probe.inputs, progress, halves)
            if init.sketch_error is not None:
                outputs = outputs.with_error(*init.sketch_error)
            if ntk.method_choice is not None and ntk.method_choice.estimates:
                host.info(f"lin_probe: {ntk.method_choice.explain()}.")  # what auto timed and chose
            kernel, theta0, features_fn = init.kernel, init.theta0, init.choice.features_fn
            initial_outputs = predict(
                model, probe.inputs, output_fn=config.output_fn, memory_budget=config.plan.memory_budget
            ).detach()
            runs, f0 = build_runs(
                model, kernel, probe, optimizer, config, host.copy_model, train_size, features_fn
            )
        kernel_inputs = _kernel_inputs(probe.inputs, features_fn)
        dense = theta0.is_dense
        reference = ntk_reference(
            kernel,
            theta0 if dense else _frozen_products(ntk, f0),
            init.norm0,
            kernel_inputs,
            dense=dense,
            targets=_alignment_targets(probe, initial_outputs),
        )
        monitor = cls(config, probe, kernel, ntk, reference, initial_outputs, runs, host, init.choice)
        monitor.kernel_outputs = outputs
        if dense:  # the step-0 check reuses Θ_0 while no parameter has been written since
            monitor._theta0_at = (theta0, _parameter_versions(model))
        monitor._warn_about_fit()
        return monitor

    @classmethod
    def from_state(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: Mapping[str, Any],
        config: MonitorConfig | None = None,
        *,
        host: Host | None = None,
    ) -> RegimeProbe:
        """Rebuild from :meth:`state_dict` instead of re-measuring: ``Θ_0`` is the kernel at *initialisation*.

        Raises ``ValueError`` for a state of another layout version (the owner then starts afresh).
        """
        config = config or MonitorConfig()
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(
                f"lin_probe state has layout version {version!r}, this lin_probe reads {STATE_VERSION}."
            )
        probe = ProbeSet(
            state["probe_inputs"], state.get("probe_targets"), state.get("probe_source", "checkpoint")
        )
        probe = probe.on_model(model)
        config = _with_loss(config, model, probe)  # announced when the run first started
        width = int(state["initial_outputs"].reshape(state["initial_outputs"].shape[0], -1).shape[1])
        outputs = KernelOutputs.from_state(state.get("kernel_outputs"), width)
        kernel_output_fn = outputs.output_fn(config.output_fn, model, probe.inputs)
        ntk = NTKProbe(probe.inputs, kernel_output_fn, dict(state["param_weights"]), config.plan)
        kernel = AffineKernel(**state["kernel"])
        saved_kernel = state["data_kernel"]
        features_fn = features_from_state(saved_kernel, config.data_kernel_spec)
        choice = DataKernelChoice(
            saved_kernel["name"], features_fn, kernel, dict(saved_kernel.get("scores", {}))
        )
        # train_size=None: the memorizing shadow's table takes its saved size from the state.
        host = host or Host()
        runs, f0 = build_runs(model, kernel, probe, optimizer, config, host.copy_model, None, features_fn)
        saved_runs = state.get("runs", {})
        for run in runs:
            if run.prefix in saved_runs:
                run.load_state_dict(saved_runs[run.prefix])
        kernel_inputs = _kernel_inputs(probe.inputs, features_fn)
        dense = state.get("ntk0") is not None
        theta0 = SymmetricOperator.dense(state["ntk0"], name="Θ_0") if dense else _frozen_products(ntk, f0)
        initial_outputs = state["initial_outputs"].to(probe.inputs.device)
        reference = ntk_reference(
            kernel,
            theta0,
            float(state["ntk0_norm"]),
            kernel_inputs,
            dense=dense,
            targets=_alignment_targets(probe, initial_outputs),
        )
        monitor = cls(config, probe, kernel, ntk, reference, initial_outputs, runs, host, choice)
        monitor.kernel_outputs = outputs
        monitor.history = [dict(record) for record in state.get("history", [])]
        monitor.outside_from_start = bool(state.get("outside_from_start", False))
        monitor.diagnosis = Diagnosis.from_state(state.get("diagnosis"))
        previous = state.get("previous_ntk")
        if previous is not None:
            monitor._previous_ntk = (int(previous["step"]), previous["matrix"])
        return monitor

    # ------------------------------------------------------------------ training
    def stage_digests(self, x: Tensor, batch: Any = None) -> BatchDigests | None:
        """``x``'s row digests, their host copy started now (the batch has just arrived), when a shadow
        will know its examples by their bytes (the ``f_0`` cache, hashed example ids) or by the
        batch's indices (the memorizing shadow checks those on the host). ``None`` when none will,
        or ``x`` is not one tensor of rows (whoever needs them then says why)."""
        if not isinstance(x, Tensor) or x.dim() == 0 or not self._stages_batches():
            return None
        memorizing = any(run.example_ids is not None for run in self.runs)
        try:
            return BatchDigests(x, indices_from_batch(batch) if memorizing else None)
        except Exception:  # an aid only: the shadow step hashes x itself, and reports a failure there
            return None

    def _stages_batches(self) -> bool:
        for run in self.runs:
            cache = getattr(run.shadow, "initial_cache", None)
            if cache is not None and cache.enabled:
                return True
            if run.example_ids is not None:  # hashed ids, or indices checked on the host
                return True
        return False

    def accumulate(
        self,
        x: Tensor,
        y: Tensor,
        *,
        batch: Any = None,
        scale: float = 1.0,
        digests: BatchDigests | None = None,
    ) -> None:
        """Add one micro-batch's shadow gradients (``scale``: the loss factor, e.g. 1/accumulation).

        ``batch`` (the raw batch) carries example indices for the memorizing shadow; a memorizing
        run whose example identity fails is switched off with a warning, the others go on.
        ``digests`` (:meth:`stage_digests`, made when the batch arrived) serve every shadow's hashing.
        """
        for run in list(self.runs):
            ids = None
            if run.example_ids is not None:
                try:
                    ids = run.ids(x, batch, digests)
                except Exception as err:
                    self.drop_run(run.prefix, f"example identity failed ({type(err).__name__}: {err})")
                    continue
                if self.host.require_indices and run.example_ids.mode != "index":
                    # Hashed ids are numbered per process, so ranks would average unrelated offsets.
                    self.drop_run(
                        run.prefix,
                        "under DDP it needs batch indices: wrap the training dataset in lin_probe.data.WithIndex",
                    )
                    continue
            bound = None if run.example_ids is None else run.example_ids.last_bound
            run.mirror.accumulate(x, y, ids, scale=scale, digests=digests, ids_bound=bound)

    def step(self, lr: float, reduce_grad: Callable[[Tensor], Tensor] | None = None) -> None:
        """One mirrored step of every shadow with the network's learning rate ``lr``.

        ``reduce_grad`` maps each accumulated gradient to the one applied (under data parallelism,
        the mean over processes, as the network gets).
        """
        for run in self.runs:
            run.mirror.step(lr=lr, reduce_grad=reduce_grad)

    def discard(self) -> None:
        """Drop partly accumulated gradients (a failed micro-batch must not leak into a later step)."""
        for run in self.runs:
            run.mirror.discard()

    def drop_run(self, prefix: str, reason: str) -> None:
        """Switch one shadow off (with one warning); the paper's shadow is never dropped this way."""
        self.runs = [run for run in self.runs if run.prefix != prefix]
        self.warn_once(
            f"drop:{prefix}",
            f"The memorizing shadow is switched off: {reason}. The paper's shadow carries on.",
        )

    # ------------------------------------------------------------------ measuring
    def measure(self, model: nn.Module, step: int, *, ntk: bool = True) -> Measurement:
        """One check's values; a part that fails is NaN, never an exception.

        A failed functional comparison sets :attr:`Measurement.stop_reason` (the host stops
        measuring and says so); a failed NTK warns once and switches the NTK checks off for the rest
        of the fit (:attr:`ntk_off`): an NTK that cannot be computed once will not be computed at the
        next check either, and trying again costs its seconds each time for NaN.

        Measured on the network train mode runs: training BatchNorms on the probe's own statistics
        at the current weights (:mod:`lin_probe.monitor.batch_statistics`), dropout off. A dense
        step-0 check reuses ``Θ_0`` from the start while no parameter has been written since.
        """
        record: dict[str, float] = {"step": step}
        with self._measured(model, step):
            return self._measure(model, step, record, ntk=ntk)

    def _measure(self, model: nn.Module, step: int, record: dict[str, float], *, ntk: bool) -> Measurement:
        started = time.perf_counter()
        try:
            record.update(self._functional(model))
        except Exception as err:  # never crash the user's run over a measurement
            record.update(functional_distance=math.nan, functional_distance_rel=math.nan)
            self.last_check_seconds = (time.perf_counter() - started, None)
            reason = f"it could not compare network and shadow at step {step} ({type(err).__name__}: {err})"
            return Measurement(record, stop_reason=reason)
        functional_s = time.perf_counter() - started
        self.last_check_seconds = (functional_s, None)
        if not ntk or self.ntk_off:
            return Measurement(record)
        values, eigenvalues = self._ntk_values(model, step)
        self.last_check_seconds = (functional_s, time.perf_counter() - started - functional_s)
        record.update(values)
        return Measurement(record, eigenvalues)

    def _ntk_values(self, model: nn.Module, step: int) -> tuple[dict[str, float], Tensor | None]:
        """The NTK check's values at ``step`` (NaN with one warning when it cannot be computed)."""
        failed = dict.fromkeys(ntk_check_keys(self.reference, self._previous_ntk is not None), math.nan)
        try:
            theta, sketch_error = self._theta(model, step)
            values, eigenvalues = ntk_check(theta, self.reference, self._previous_ntk, step)
        except NonFiniteOperator:
            return failed, None
        except Exception as err:
            self.ntk_off = True
            self.warn_once(
                "ntk",
                f"lin_probe could not compute the NTK at step {step} ({type(err).__name__}: {err}): NTK "
                "checks stop for the rest of this fit (logged as NaN here), the functional checks carry on.",
            )
            return failed, None
        if sketch_error is not None:
            values[SKETCH_ERROR_KEY] = sketch_error
            self._warn_if_noisy_later(sketch_error, step)
        if theta.matrix is not None:
            self._previous_ntk = (step, theta.matrix)
        else:
            self.warn_once(
                "matrix_free_measures",
                "The probe is too large for dense NTKs: kernel_distance, kernel_velocity and "
                "kernel_alignment need Frobenius products of n×n kernels and are logged as NaN; "
                "ntk_scale, ntk_gap and ntk_drift are exact (Lanczos). Use a smaller n_probe for them.",
            )
        return values, eigenvalues

    def observe(self, record: dict[str, float]) -> list[str]:
        """Feed one check to the exit trackers and keep it in :attr:`history`; returns the prefixes
        of the runs whose exit this check confirms (adds ``in_linear_regime`` and ``*exit_step``)."""
        step = int(record["step"])
        expected_nan = () if self.reference.drift_available else ("ntk_drift",)
        if not self.reference.dense:  # Frobenius measures are NaN by design (said once in measure)
            expected_nan += FROBENIUS_KEYS
        if not all(math.isfinite(v) for k, v in record.items() if k not in expected_nan):
            self.warn_once(
                "nonfinite",
                f"Non-finite values measured at step {step} (NaN/inf in the network or shadow output, or in "
                "the NTK); they are logged as NaN/inf and training continues.",
            )
        exited = []
        for run in self.runs:
            value = record.get(run.prefix + "functional_distance_rel", math.nan)
            if run.regime.update(step, value):
                exited.append(run.prefix)
                if run.prefix == PAPER and self._explained_by_init_fit(run, record):
                    self.outside_from_start = True  # nothing was left: no exit step (module docstring)
                    record["outside_from_start"] = 1.0
                else:
                    record[run.prefix + "exit_step"] = float(run.regime.exit_step)  # type: ignore[arg-type]
        verdict_run = self.verdict_run
        record["in_linear_regime"] = 0.0 if verdict_run.regime.exited else 1.0
        for key in ("exit_step", "outside_from_start"):  # keep the record's order: the flag first
            if key in record:
                record[key] = record.pop(key)
        self.history.append(record)
        self._diagnosis_due = verdict_run.prefix in exited
        return exited

    def conclude(
        self, model: nn.Module, record: dict[str, float], *, kernel_when_explained: bool = True
    ) -> Diagnosis | None:
        """After :meth:`observe`, at the check that confirmed the verdict: the diagnosis.

        The cause is read from the kernel *at the exit*, so when this check had no NTK measurement
        one is taken now (once per run) and its values join the record. A verdict the init fit
        explains ("outside from the start") has its cause whatever the kernel did since; there that
        NTK only fills the dashboard's drift, and ``kernel_when_explained=False`` (a monitor over its
        budget) skips it: it costs as much as ``Θ_0`` (6.7 s of an 18-s overhead on Lightning's demo
        Transformer). Returns the new diagnosis, ``None`` at every other check.
        """
        if not self._diagnosis_due:
            return None
        self._diagnosis_due = False
        step = int(record["step"])
        from_start = self.outside_from_start and self.verdict_run.prefix == PAPER
        if "ntk_drift" not in record and not self.ntk_off and (kernel_when_explained or not from_start):
            with self._measured(model, step):
                record.update(self._ntk_values(model, step)[0])
        self.diagnosis = diagnose(
            self._evidence(),
            step=step,
            tolerance=self.config.tolerance,
            fit_rel_error_centered=self.kernel.rel_error_centered,
            from_start=from_start,
        )
        return self.diagnosis

    def check(self, model: nn.Module, step: int, *, ntk: bool = True) -> dict[str, float]:
        """:meth:`measure`, :meth:`observe` and :meth:`conclude`, for a loop that needs no collective in between."""
        record = self.measure(model, step, ntk=ntk).record
        self.observe(record)
        self.conclude(model, record)
        return record

    @property
    def paper(self) -> ShadowRun:
        """The paper's shadow ``f_0 + Bᵀψ``: always the first run."""
        return self.runs[0]

    def run(self, prefix: str) -> ShadowRun | None:
        return next((run for run in self.runs if run.prefix == prefix), None)

    @property
    def verdict_run(self) -> ShadowRun:
        """The shadow the verdict is taken from: the paper's under SGD (its mirror is exact), the
        linearised network's under any other optimizer when it is on (it is exact for any)."""
        linearized = self.run(LINEARIZED)
        if linearized is not None and not self.paper.mirror.exact:
            return linearized
        return self.paper

    @property
    def verdict(self) -> Verdict:
        """Inside, left at a step, or not in the linear regime from the start (see :mod:`~lin_probe.monitor.diagnosis`)."""
        run = self.verdict_run
        indicative = run.prefix == PAPER and not run.mirror.exact
        if run.prefix == PAPER and self.outside_from_start:
            return Verdict("outside_from_start", None, run.prefix, indicative)
        if run.regime.exit_step is not None:
            return Verdict("left", run.regime.exit_step, run.prefix, indicative)
        return Verdict("inside", None, run.prefix, indicative)

    def exit_step(self, prefix: str = PAPER) -> int | None:
        """A run's exit step; ``None`` until found, when that run is off, or (paper's shadow) when it
        was never inside: not in the linear regime from the start is not an exit."""
        run = self.run(prefix)
        if run is None or (prefix == PAPER and self.outside_from_start):
            return None
        return run.regime.exit_step

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: probe, init measurements, each run's shadow/mirror/tracker."""
        ntk0 = self.reference.theta0.matrix if self.reference.dense and self.reference.theta0 else None
        return {
            "version": STATE_VERSION,
            "history": [dict(record) for record in self.history],
            "kernel": {
                "a": self.kernel.a,
                "b": self.kernel.b,
                "c": self.kernel.c,
                "rel_error": self.kernel.rel_error,
                "rel_error_centered": self.kernel.rel_error_centered,
            },
            "ntk0": None if ntk0 is None else ntk0.clone(),  # None: matrix-free mode
            "ntk0_norm": self.reference.norm0,
            "initial_outputs": self.initial_outputs.detach().cpu().clone(),
            "probe_inputs": self.probe.inputs.detach().cpu().clone(),
            "probe_targets": None
            if self.probe.targets is None
            else self.probe.targets.detach().cpu().clone(),
            "probe_source": self.probe.source,
            "param_weights": dict(self.ntk.param_weights),
            "runs": {run.prefix: run.state_dict() for run in self.runs},
            "data_kernel": DataKernelChoice.flat_state()
            if self.data_kernel is None
            else self.data_kernel.state_dict(),
            "kernel_outputs": None if self.kernel_outputs is None else self.kernel_outputs.state_dict(),
            "outside_from_start": self.outside_from_start,
            "diagnosis": None if self.diagnosis is None else self.diagnosis.state_dict(),
            "previous_ntk": None
            if self._previous_ntk is None
            else {"step": self._previous_ntk[0], "matrix": self._previous_ntk[1].detach().cpu().clone()},
        }

    # ------------------------------------------------------------------ internals
    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.host.warn(message)

    @contextlib.contextmanager
    def _measured(self, model: nn.Module, step: int) -> Iterator[None]:
        """Measure the network train mode runs (BatchNorm on the probe's statistics); if the statistics
        forward fails, warn once and measure without them (each part then fails to NaN on its own)."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(probe_batch_statistics(model, self.probe.inputs))
            except Exception as err:  # never crash the user's run over a measurement
                self.warn_once(
                    "batch_statistics",
                    f"lin_probe could not take the probe's BatchNorm statistics at step {step} "
                    f"({type(err).__name__}: {err}); measuring with the running statistics.",
                )
            yield

    def _theta(self, model: nn.Module, step: int) -> tuple[SymmetricOperator, float | None]:
        """``Θ_t`` and, for a dense sketch, its split-half error at this check (the two halves cost
        about what the whole sketch does). The error at init does not hold for the run: training
        aligns the outputs, so the cross-output terms a sketch carries grow (the zoo Transformer's
        2-direction sketch: 0.4 % after 4 steps, 17.5 % after 200, against the exact kernel, ad hoc)."""
        outputs = self.kernel_outputs
        reused = self._reused_theta0(model, step)
        if reused is not None:
            return reused, None if outputs is None else outputs.error
        halves = (
            outputs.half_output_fns(self.config.output_fn, model, self.probe.inputs)
            if outputs is not None
            else None
        )
        if halves is None or not self.reference.dense:
            return self.ntk.operator(model), None
        theta, (error, _) = self.ntk.split_halves(model, halves)
        return theta, error

    def _warn_if_noisy_later(self, error: float, step: int) -> None:
        """Once, when a check's sketch error passes :data:`NOISY_SKETCH_ERROR` after an init below it."""
        outputs = self.kernel_outputs
        if step == 0 or outputs is None or outputs.sketch is None or error <= NOISY_SKETCH_ERROR:
            return
        if outputs.error is not None and outputs.error > NOISY_SKETCH_ERROR:
            return  # said at the start
        self.warn_once(
            "noisy_sketch_later",
            f"The sketched NTK's estimated relative spectral error reached {error:.2f} at step {step} "
            f"(> {NOISY_SKETCH_ERROR}; {outputs.error if outputs.error is not None else math.nan:.3g} at "
            "init): training aligns the outputs, so the cross-output terms the sketch carries grow. "
            "ntk_gap and ntk_drift carry noise of about that size from here (lin_probe/ntk_sketch_error "
            'charts it); outputs="exact" takes the exact kernel, at about '
            f"{outputs.exact_cost_factor:.0f}× the NTK's cost.",
        )

    def _reused_theta0(self, model: nn.Module, step: int) -> SymmetricOperator | None:
        """Θ_0 from the start for the step-0 check, when dense and no parameter has been written since
        (it is then the same kernel: computing it again would double the start-up's cost)."""
        saved, self._theta0_at = self._theta0_at, None  # once: any later check measures afresh
        if step != 0 or saved is None or self._previous_ntk is not None:
            return None
        theta0, versions = saved
        return theta0 if _parameter_versions(model) == versions else None

    def _functional(self, model: nn.Module) -> dict[str, float]:
        """Network vs every shadow on the probe; ``f_t`` computed once, ``f_0`` from the cache."""
        inputs = self.probe.inputs
        network = predict(
            model, inputs, output_fn=self.config.output_fn, memory_budget=self.config.plan.memory_budget
        ).to(torch.float64)
        initial = self.initial_outputs.to(network.device, torch.float64)
        record: dict[str, float] = {}
        for run in self.runs:
            with torch.no_grad():
                linear = run.shadow(
                    inputs, run.probe_ids(inputs), initial_outputs=initial, dtype=torch.float64
                )
            compared = compare(
                network,
                linear,
                initial,
                targets=self.probe.targets,
                loss_fn=self.config.loss_fn,
                classification=self.config.classification,
            )
            keys = run.reported or tuple(compared)
            record.update({run.prefix + key: compared[key] for key in keys if key in compared})
        return record

    def _explained_by_init_fit(self, run: ShadowRun, record: Mapping[str, float]) -> bool:
        """The paper's shadow was outside from the first check on, and the centred misfit at init is
        larger than the tolerance: that misfit, not training, put it there. Unless the linearised
        shadow (when on) has departed too by the confirming check: then the network itself moved out
        of its kernel regime (e.g. at a learning rate near divergence), an exit like any other."""
        error = self.kernel.rel_error_centered
        linearized = record.get(LINEARIZED + "functional_distance_rel", math.nan)
        departed = self.run(LINEARIZED) is not None and linearized > self.config.tolerance
        return (
            run.regime.outside_from_first_check
            and error is not None
            and error > self.config.tolerance
            and not departed
        )

    def _evidence(self) -> dict[str, float]:
        """The latest finite value of each quantity the diagnosis reads (shadows: this check's)."""
        evidence: dict[str, float] = {}
        for record in self.history:
            for key in ("ntk_drift", "kernel_distance"):
                value = record.get(key, math.nan)
                if record["step"] > 0 and math.isfinite(value):
                    evidence[key] = value
        last = self.history[-1]
        for prefix in (LINEARIZED, MEMO):
            key = prefix + "functional_distance_rel"
            if self.run(prefix) is not None and key in last:
                evidence[key] = last[key]
        return evidence

    def _warn_about_fit(self) -> None:
        error = self.kernel.rel_error_centered
        if error is not None and error > POOR_FIT_THRESHOLD:
            self.warn_once(
                "poor_fit",
                f"The affine data kernel fits this model's centred NTK at init with relative spectral error "
                f"{error:.2f} > {POOR_FIT_THRESHOLD}: the linear model is a poor proxy for this "
                "architecture (expect 'not in the linear regime from the start'), so distances from it say "
                "little about the network's own kernel regime; watch `lin_probe/ntk_drift` and "
                "`lin_probe/kernel_distance`, or pass linearized=True.",
            )
        outputs = self.kernel_outputs
        if outputs is not None and outputs.error is not None and outputs.error > NOISY_SKETCH_ERROR:
            assert outputs.sketch is not None
            self.warn_once(
                "noisy_sketch",
                f"The NTK is sketched over {outputs.sketch.projections} random projections of the model's "
                f"{outputs.outputs} outputs, and its estimated relative spectral error is {outputs.error:.2f} "
                f"> {NOISY_SKETCH_ERROR}: kernel values (ntk_gap, ntk_drift, the affine fit) carry noise of "
                'about that size. outputs="exact" takes the exact kernel, at about '
                f"{outputs.exact_cost_factor:.0f}× the NTK's cost.",
            )
        if not self.reference.drift_available:
            self.warn_once(
                "drift",
                f"The probe ({len(self.probe)} examples) is too large for a dense NTK, and with center=False "
                "there is no copy of the model at init to take Θ_0 products from: `lin_probe/ntk_drift` is "
                "NaN. Use center=True to measure it.",
            )


def saved_exit_step(state: Mapping[str, Any] | None, prefix: str = PAPER) -> int | None:
    """A run's exit step as saved in a (callback) state holding ``"core"``, read without rebuilding."""
    run = ((state or {}).get("core") or {}).get("runs", {}).get(prefix) or {}
    return run.get("regime", {}).get("exit_step")


def learning_rate_weights(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Per-parameter NTK weights ``lr_group / lr_ref`` (``lr_ref``: the first group's).

    With parameter groups at different rates the function-space dynamics follow the kernel
    ``Σ_p (lr_p / lr_ref) J_p J_pᵀ``; parameters no group trains get weight 0.
    """
    lr_ref = float(optimizer.param_groups[0]["lr"])
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    weights: dict[str, float] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = group_of.get(id(param))
        if group is None:
            weights[name] = 0.0
        elif lr_ref > 0:
            weights[name] = float(group["lr"]) / lr_ref
        else:
            weights[name] = 1.0
    return weights


def _parameter_versions(model: nn.Module) -> dict[str, int]:
    """Each parameter's in-place write counter: equal counters mean no optimizer step (or copy) since."""
    return {name: param._version for name, param in model.named_parameters()}


def _alignment_targets(probe: ProbeSet, initial_outputs: Tensor) -> Tensor | None:
    """``Y`` of the kernel–target alignment (CPU float64), or ``None`` without probe targets."""
    if probe.targets is None:
        return None
    return target_matrix(probe.targets.cpu(), int(initial_outputs.shape[1]))


def _frozen_products(ntk: NTKProbe, f0: nn.Module | None) -> SymmetricOperator | None:
    """Matrix-free ``Θ_0`` from the frozen ``f_0`` (``None`` without one: drift is then NaN)."""
    return None if f0 is None else ntk.frozen_operator(f0)


def _kernel_inputs(inputs: Tensor, features_fn: Callable[[Tensor], Tensor] | None) -> Tensor:
    """The ``n × d`` rows the data kernel is built from, on CPU (where the fit runs)."""
    return feature_rows(inputs, features_fn).cpu()


def _with_loss(
    config: MonitorConfig, model: nn.Module, probe: ProbeSet, *, announce: Callable[[str], None] | None = None
) -> MonitorConfig:
    """``loss="auto"`` resolved from the probe's targets and one example's output width; the choice's
    one line goes to ``announce``."""
    if config.loss != AUTO:
        return config
    width = predict(model, probe.inputs[:1], output_fn=config.output_fn).shape[1]
    config, line = config.with_inferred_loss(probe.targets, width)
    if announce is not None and line is not None:
        announce(line)
    return config


def _rows(probe: Tensor | tuple[Tensor, Tensor]) -> int:
    first = probe if isinstance(probe, Tensor) else probe[0] if isinstance(probe, (tuple, list)) else None
    return int(first.shape[0]) if isinstance(first, Tensor) and first.dim() > 0 else 0


__all__ = [
    "LINEARIZED",
    "MEMO",
    "PAPER",
    "SKETCH_ERROR_KEY",
    "STATE_VERSION",
    "Host",
    "Measurement",
    "MonitorConfig",
    "RegimeProbe",
    "ShadowRun",
    "learning_rate_weights",
    "saved_exit_step",
]
