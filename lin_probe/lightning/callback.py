"""``LinearRegimeMonitor``: the Lightning callback. Orchestration only — the math lives elsewhere.

Data flow (DESIGN §3): at train start the probe set is gathered, Θ_0 computed, the affine data
kernel fitted and the linear shadow built; each micro-batch is remembered, and right before each
optimizer step the shadow takes one mirrored step on those batches with the learning rate the
user's optimizer is about to use; after the step, on the check schedule, network and shadow are
compared on the probe set and the regime tracker is updated.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lin_probe._model_state import cpu_state_copy
from lin_probe.kernel import AffineKernel
from lin_probe.lightning.tensorboard import TensorBoardPanels, exit_card, fit_card, tag
from lin_probe.monitor.losses import LossFn, is_classification, resolve_loss
from lin_probe.monitor.measure import InitialState, ProbeMeasurer
from lin_probe.monitor.memo_tracking import MemoTracker
from lin_probe.monitor.probe import (
    BatchToXY,
    ProbeSet,
    default_batch_to_xy,
    probe_from_argument,
    probe_from_dataloaders,
)
from lin_probe.monitor.regime import RegimeTracker, validate_patience, validate_tolerance
from lin_probe.monitor.schedule import is_check_step, is_ntk_step
from lin_probe.shadows.linear import LinearShadow
from lin_probe.shadows.mirror import ShadowTrainer

#: At fit start, a relative spectral error above this means the linear model is a poor proxy.
POOR_FIT_THRESHOLD = 0.3


class LinearRegimeMonitor(Callback):
    r"""Shadow the network with the linear model of Hu et al. (2020) and flag when it leaves that regime.

    At train start the empirical NTK Θ_0 of the model on a probe set is fitted by an affine transform
    of the data kernel, ``Θ_0 ≈ a·XXᵀ/d + b·11ᵀ + c·I``; the linear model
    ``f_lin(x) = f_0(x) + Bᵀ[√a·x/√d; √b]`` then trains on the same batches, with the same loss and
    learning rate. Its distance from the network is logged under ``lin_probe/``.

    Args:
        probe: ``None`` (the first ``n_probe`` validation examples, else training examples), a tensor
            of inputs, or an ``(inputs, targets)`` pair.
        n_probe: how many probe examples to use (the NTK is ``n_probe × n_probe``).
        loss: ``"mse"``, ``"cross_entropy"`` or a callable ``(pred, target) -> scalar`` — the loss your
            ``training_step`` minimises, with mean reduction.
        batch_to_xy: how to get ``(x, y)`` out of a training batch; default: first two items of a
            tuple/list, or keys ``"x"``/``"y"`` of a dict.
        every_n_steps: a functional check every this many optimizer steps (and at step 0).
        ntk_every_n_steps: an NTK check (``ntk_gap``, ``ntk_drift``) every this many steps; ``None``
            means ``every_n_steps``; 0 means only at step 0.
        log_spaced: also check at steps 1, 2, 4, 8, … (early-time dynamics are log-scaled).
        tolerance: a check is outside the linear regime when ``functional_distance_rel > tolerance``.
        patience: consecutive outside checks that confirm the exit.
        center: include ``f_0`` in the shadow (keeps a frozen copy of the model); ``False`` for
            models whose initial output is ~0 or that are too large to keep twice.
        stop_after_exit: stop measuring and shadowing this many checks after the exit (``None``: never).
        output_fn: maps the model's raw output to the prediction tensor (for tuple/dict outputs).
        features_fn: maps inputs to the float vectors the data kernel ``XXᵀ/d`` is built from (for
            token/integer inputs); the model still receives the raw inputs.
        progress_bar: show ``functional_distance_rel`` in the progress bar.
        memory_budget: bytes the NTK computation may use (``None``: the library default).
        verbose: print the exit step (rank zero) when it is found.
        memorization: also run the *memorizing* shadow, whose kernel includes the ``c·I`` term on
            training points (per-example offsets, ``N_train × C`` floats), and report it under
            ``lin_probe/memo/``. Example identity comes from batch indices
            (:class:`lin_probe.data.WithIndex`) or else from a hash of each input row (augmented
            inputs then count as new examples). Off by default: the paper's model stays the default.

    Example::

        trainer = Trainer(callbacks=[LinearRegimeMonitor()])
    """

    def __init__(
        self,
        probe: Tensor | tuple[Tensor, Tensor] | None = None,
        n_probe: int = 256,
        loss: str | LossFn = "mse",
        batch_to_xy: BatchToXY | None = None,
        every_n_steps: int = 10,
        ntk_every_n_steps: int | None = None,
        log_spaced: bool = True,
        tolerance: float = 0.1,
        patience: int = 3,
        center: bool = True,
        stop_after_exit: int | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        features_fn: Callable[[Tensor], Tensor] | None = None,
        progress_bar: bool = True,
        memory_budget: int | None = None,
        verbose: bool = True,
        memorization: bool = False,
    ) -> None:
        super().__init__()
        _check_int("n_probe", n_probe, minimum=2)
        _check_int("every_n_steps", every_n_steps, minimum=1)
        if ntk_every_n_steps is not None:
            _check_int("ntk_every_n_steps", ntk_every_n_steps, minimum=0)
        if stop_after_exit is not None:
            _check_int("stop_after_exit", stop_after_exit, minimum=0)
        if memory_budget is not None:
            _check_int("memory_budget", memory_budget, minimum=1)
        validate_tolerance(tolerance)
        validate_patience(patience)
        for name, fn in (
            ("batch_to_xy", batch_to_xy),
            ("output_fn", output_fn),
            ("features_fn", features_fn),
        ):
            if fn is not None and not callable(fn):
                raise TypeError(f"`{name}` must be callable or None, got {type(fn).__name__}.")
        if probe is not None:
            probe_from_argument(probe, n_probe)  # validate now, not after the first epoch's setup
        self.loss_fn = resolve_loss(loss)
        self.loss = loss
        self.probe = probe
        self.n_probe = n_probe
        self.batch_to_xy: BatchToXY = batch_to_xy or default_batch_to_xy
        self.every_n_steps = every_n_steps
        self.ntk_every_n_steps = every_n_steps if ntk_every_n_steps is None else ntk_every_n_steps
        self.log_spaced = log_spaced
        self.tolerance = float(tolerance)
        self.patience = patience
        self.center = center
        self.stop_after_exit = stop_after_exit
        self.output_fn = output_fn
        self.features_fn = features_fn
        self.progress_bar = progress_bar
        self.memory_budget = memory_budget
        self.verbose = verbose
        self.memorization = memorization

        self.history: list[dict[str, float]] = []
        self.regime = RegimeTracker(self.tolerance, self.patience)
        self._reset_run_state()
        self._pending_state: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        """Distinct per configuration, so two monitors (e.g. different tolerances) can share a Trainer."""
        return self._generate_state_key(
            n_probe=self.n_probe,
            every_n_steps=self.every_n_steps,
            tolerance=self.tolerance,
            patience=self.patience,
            memorization=self.memorization,
        )

    # ------------------------------------------------------------------ public read-outs
    @property
    def exit_step(self) -> int | None:
        """First step of the first run of ``patience`` checks above ``tolerance``; ``None`` until found."""
        return self.regime.exit_step

    @property
    def memo_exit_step(self) -> int | None:
        """The memorizing shadow's exit step (``memorization=True``); ``None`` until found or when off."""
        return None if self._memo is None else self._memo.regime.exit_step

    @property
    def kernel(self) -> AffineKernel | None:
        """The affine data kernel fitted at train start."""
        return None if self._initial is None else self._initial.kernel

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "LinearRegimeMonitor mirrors Lightning's automatic optimization (one optimizer, loss from "
                "training_step). This LightningModule uses manual optimization, where the loss and step "
                "structure are unknown to the callback; remove the callback or switch to automatic optimization."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = self._single_optimizer(trainer)
        if self._pending_state is not None:
            self._restore(pl_module, optimizer, self._pending_state)
            self._pending_state = None
            return
        self._initialise(trainer, pl_module, optimizer)
        self._check(trainer, pl_module, step=0)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        x, y = self.batch_to_xy(batch)
        if y is None:
            raise TypeError("`batch_to_xy` returned no targets; the shadow needs (x, y) to take a step.")
        self._pending_batches.append((x, y, self._memo_ids(trainer, batch, x)))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._active or self._stepper is None:
            return
        batches, self._pending_batches = self._pending_batches, []
        self._shadow_step(trainer, batches, lr=float(optimizer.param_groups[0]["lr"]))
        if trainer.gradient_clip_val:
            self._warn_once(
                "clip",
                "Gradient clipping is not mirrored on the linear shadow: while clipping is active the shadow "
                "and the network take different steps, and their distance includes that difference.",
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        step = trainer.global_step
        if step == self._last_optimizer_step:
            # No optimizer step yet (accumulating), or training_step skipped it: keep or drop batches.
            if len(self._pending_batches) >= trainer.accumulate_grad_batches:
                self._pending_batches = []
            return
        self._last_optimizer_step = step
        if is_check_step(step, self.every_n_steps, self.log_spaced):
            self._check(trainer, pl_module, step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        panels = self._panels(trainer)
        if panels is not None and self.history:
            try:
                panels.figure(
                    self.history, exit_step=self.exit_step, tolerance=self.tolerance, step=trainer.global_step
                )
                panels.flush()
            except Exception as err:
                self._warn_once("figure", f"lin_probe could not draw its summary figure: {err}")

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._initial is None or self._shadow is None or self._stepper is None or self._probe is None:
            return {"history": list(self.history), "regime": self.regime.state_dict()}
        initial = self._initial
        return {
            "history": [dict(record) for record in self.history],
            "regime": self.regime.state_dict(),
            "kernel": {
                "a": initial.kernel.a,
                "b": initial.kernel.b,
                "c": initial.kernel.c,
                "rel_error": initial.kernel.rel_error,
            },
            "ntk0": None if initial.ntk0 is None else initial.ntk0.clone(),  # None: matrix-free mode
            "ntk0_norm": initial.ntk0_norm,
            "initial_outputs": initial.initial_outputs.detach().cpu().clone(),
            "probe_inputs": self._probe.inputs.detach().cpu().clone(),
            "probe_targets": None
            if self._probe.targets is None
            else self._probe.targets.detach().cpu().clone(),
            "probe_source": self._probe.source,
            "param_weights": dict(self._param_weights or {}),
            "shadow": cpu_state_copy(self._shadow.state_dict()),
            "shadow_optimizer": copy.deepcopy(self._stepper.state_dict()),
            "last_optimizer_step": self._last_optimizer_step,
            "checks_since_exit": self._checks_since_exit,
            "active": self._active,
            "memo": None if self._memo is None else self._memo.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(record) for record in state_dict["history"]]
        self.regime.load_state_dict(state_dict["regime"])
        self._pending_state = state_dict if "shadow" in state_dict else None

    # ------------------------------------------------------------------ internals
    def _reset_run_state(self) -> None:
        self._initial: InitialState | None = None
        self._probe: ProbeSet | None = None
        self._shadow: LinearShadow | None = None
        self._stepper: ShadowTrainer | None = None
        self._measurer: ProbeMeasurer | None = None
        self._param_weights: dict[str, float] | None = None
        self._pending_batches: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self._memo: MemoTracker | None = None
        self._last_optimizer_step = 0
        self._checks_since_exit = 0
        self._active = False
        self._warned: set[str] = set()
        self._layout_registered = False

    def _single_optimizer(self, trainer: pl.Trainer) -> torch.optim.Optimizer:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"LinearRegimeMonitor mirrors exactly one optimizer; this run has {len(trainer.optimizers)}. "
                "Use a single optimizer (parameter groups are fine)."
            )
        return trainer.optimizers[0]

    def _initialise(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Probe, Θ_0, the affine fit and the shadow — once, before the first optimizer step."""
        self._probe = self._gather_probe(trainer).to(pl_module.device, _floating_dtype(pl_module))
        self._param_weights = _param_weights(pl_module, optimizer)
        self._measurer = self._make_measurer()
        kernel, ntk0, ntk0_norm = self._measurer.fit_initial(
            pl_module, self._param_weights, self._kernel_inputs(self._probe.inputs).cpu()
        )
        self._build(
            pl_module,
            optimizer,
            kernel,
            ntk0,
            ntk0_norm,
            self._measurer.outputs(pl_module).detach(),
            _train_set_length(trainer),
        )
        self._log_fit(trainer, pl_module)
        if kernel.rel_error is not None and kernel.rel_error > POOR_FIT_THRESHOLD:
            self._warn_once(
                "poor_fit",
                f"The affine data kernel fits this model's NTK at init with relative spectral error "
                f"{kernel.rel_error:.2f} > {POOR_FIT_THRESHOLD}: the linear model is a poor proxy for this "
                "architecture, so distances from it say little about the network's own kernel regime "
                "(watch `lin_probe/ntk_drift` instead).",
            )

    def _gather_probe(self, trainer: pl.Trainer) -> ProbeSet:
        """The probe set, identical on every rank: under DDP each rank's dataloader yields a different
        shard (DistributedSampler), so rank zero's probe is broadcast to all."""
        if self.probe is not None:
            probe = probe_from_argument(self.probe, self.n_probe)
        else:
            probe = probe_from_dataloaders(
                trainer.val_dataloaders, trainer.train_dataloader, self.n_probe, self.batch_to_xy
            )
            if trainer.val_dataloaders is None:
                rank_zero_info(
                    "lin_probe: no validation dataloader was loaded before training, so the probe is "
                    f"the {probe.source}. The linear shadow lacks the network's c·I kernel term, which "
                    "acts on training points: held-out points (a validation loader, or `probe=`) judge the "
                    "regime better."
                )
        return trainer.strategy.broadcast(probe, src=0) if trainer.world_size > 1 else probe

    def _build(
        self,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        kernel: AffineKernel,
        ntk0: Tensor | None,
        ntk0_norm: float | None,
        initial_outputs: Tensor,
        capacity: int | None,
    ) -> None:
        """``ntk0`` is ``None`` in matrix-free mode (then Θ_0 products come from the shadow's f_0)."""
        assert self._probe is not None and self._measurer is not None and self._param_weights is not None
        self._shadow = LinearShadow.from_model(
            pl_module,
            kernel,
            self._probe.inputs,
            center=self.center,
            output_fn=self.output_fn,
            features_fn=self.features_fn,
        ).to(pl_module.device)
        self._initial = self._measurer.initial_state(
            kernel,
            ntk0,
            ntk0_norm,
            initial_outputs,
            self._kernel_inputs(self._probe.inputs).cpu(),
            initial_model=self._shadow.initial_model,
            param_weights=self._param_weights,
        )
        if not self._initial.drift_available:
            self._warn_once(
                "drift",
                f"The probe ({len(self._probe)} examples) is too large for a dense NTK, and with center=False "
                "there is no copy of the model at init to take Θ_0 products from: `lin_probe/ntk_drift` is "
                "NaN. Use center=True to measure it.",
            )
        self._stepper = ShadowTrainer(self._shadow, optimizer, self.loss_fn)
        if self.memorization:
            self._memo = MemoTracker.build(
                pl_module,
                kernel,
                self._probe.inputs,
                optimizer,
                self.loss_fn,
                center=self.center,
                output_fn=self.output_fn,
                features_fn=self.features_fn,
                capacity=capacity,
                tolerance=self.tolerance,
                patience=self.patience,
            )
        self._active = True

    def _restore(
        self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Rebuild from a checkpoint instead of re-measuring: Θ_0 is the kernel at *initialisation*."""
        targets = state["probe_targets"]
        self._probe = ProbeSet(state["probe_inputs"], targets, state["probe_source"]).to(
            pl_module.device, _floating_dtype(pl_module)
        )
        self._param_weights = dict(state["param_weights"])
        self._measurer = self._make_measurer()
        kernel = AffineKernel(**state["kernel"])
        # capacity=None: the memorizing shadow's offset table takes its saved size from the state.
        self._build(
            pl_module,
            optimizer,
            kernel,
            state["ntk0"],
            state.get("ntk0_norm"),
            state["initial_outputs"],
            None,
        )
        assert self._shadow is not None and self._stepper is not None
        self._shadow.load_state_dict(state["shadow"])
        self._stepper.load_state_dict(state["shadow_optimizer"])
        self._last_optimizer_step = int(state["last_optimizer_step"])
        self._checks_since_exit = int(state["checks_since_exit"])
        self._active = bool(state["active"])
        if self._memo is not None and state.get("memo") is not None:
            self._memo.load_state_dict(state["memo"])

    def _shadow_step(
        self, trainer: pl.Trainer, batches: list[tuple[Tensor, Tensor, Tensor | None]], lr: float
    ) -> None:
        """One mirrored shadow step on this optimizer step's micro-batches, in lock-step across ranks.

        Under DDP the network steps with the gradient averaged over ranks, so the shadow's gradient
        is averaged too. Ranks first agree on whether every one of them could accumulate: a rank
        that failed alone must not leave the others waiting in the collective (all stop together).
        """
        assert self._stepper is not None
        failure: str | None = None
        scale = 1.0 / trainer.accumulate_grad_batches  # Lightning divides the loss by this; so do the shadows
        try:
            for x, y, ids in batches:
                self._stepper.accumulate(x, y, scale=scale)
                if self._memo is not None and ids is not None:
                    self._memo.accumulate(x, y, ids, scale)
        except Exception as err:  # a monitor must never take the training run down with it
            failure = f"{type(err).__name__}: {err}"
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(
            failure is not None, all=False
        ):
            failure = failure or "another rank failed to accumulate the shadow's gradient"
        if failure is not None:
            self._stepper.discard()
            if self._memo is not None:
                self._memo.discard()
            self._disable(f"the linear shadow could not take a step ({failure})")
            return
        try:
            self._stepper.step(lr=lr, reduce_grad=_mean_over_ranks(trainer))
            if self._memo is not None:
                self._memo.step(lr, _mean_over_ranks(trainer))
        except Exception as err:
            self._disable(f"the linear shadow could not take a step ({type(err).__name__}: {err})")

    def _memo_ids(self, trainer: pl.Trainer, batch: Any, x: Tensor) -> Tensor | None:
        """Example ids for the memorizing shadow; switches it off (with a warning) where identity is unsafe."""
        if self._memo is None:
            return None
        try:
            ids = self._memo.batch_ids(batch, x)
        except Exception as err:
            self._stop_memo(f"example identity failed ({type(err).__name__}: {err})")
            return None
        if trainer.world_size > 1 and self._memo.example_ids.mode != "index":
            # Hashed ids are numbered per process, so ranks would average unrelated offsets.
            self._stop_memo(
                "under DDP it needs batch indices: wrap the training dataset in lin_probe.data.WithIndex"
            )
            return None
        return ids

    def _stop_memo(self, reason: str) -> None:
        self._memo = None
        self._warn_once(
            "memo", f"The memorizing shadow is switched off: {reason}. The paper's shadow carries on."
        )

    def _make_measurer(self) -> ProbeMeasurer:
        assert self._probe is not None
        return ProbeMeasurer(
            self._probe,
            self.loss_fn,
            classification=is_classification(self.loss),
            output_fn=self.output_fn,
            memory_budget=self.memory_budget,
        )

    def _kernel_inputs(self, inputs: Tensor) -> Tensor:
        if self.features_fn is None:
            return inputs
        with torch.no_grad():
            return self.features_fn(inputs)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        record, eigenvalues = self._measure(pl_module, step)
        if trainer.world_size > 1:
            # Every rank measured the same thing; rank zero's record makes the exit (and so the
            # stop_after_exit schedule that gates the shadow's collectives) identical everywhere.
            record = trainer.strategy.broadcast(record, src=0)
        expected_nan = () if self._initial is None or self._initial.drift_available else ("ntk_drift",)
        if not all(math.isfinite(v) for k, v in record.items() if k not in expected_nan):
            self._warn_once(
                "nonfinite",
                f"Non-finite values measured at step {step} (NaN/inf in the network or shadow output, or in "
                "the NTK); they are logged as NaN/inf and training continues.",
            )
        newly_exited = self.regime.update(step, record["functional_distance_rel"])
        record["in_linear_regime"] = 0.0 if self.regime.exited else 1.0
        if newly_exited:
            record["exit_step"] = float(self.regime.exit_step)  # type: ignore[arg-type]
        self.history.append(record)
        self._publish(trainer, record, eigenvalues)
        if newly_exited:
            self._announce_exit(trainer, record)
        if "memo/exit_step" in record and self.verbose:
            rank_zero_info(
                f"lin_probe: the memorizing shadow (kernel aK + b11ᵀ + cI) left the linear regime at step "
                f"{int(record['memo/exit_step'])}."
            )
        if self.regime.exited and self.stop_after_exit is not None:
            if self._checks_since_exit >= self.stop_after_exit:
                self._active = False
                self._pending_batches = []
            self._checks_since_exit += 1

    def _measure(self, pl_module: pl.LightningModule, step: int) -> tuple[dict[str, float], Tensor | None]:
        """One check's record and Θ_t's eigenvalues; a part that fails is NaN, never an exception."""
        assert self._measurer is not None and self._shadow is not None and self._initial is not None
        record: dict[str, float] = {"step": step}
        initial_outputs = self._initial.initial_outputs
        try:
            network = self._measurer.network_outputs(pl_module)
            linear = self._measurer.shadow_outputs(self._shadow, initial_outputs)
            record.update(self._measurer.compare(network, linear, initial_outputs))
            if self._memo is not None:
                record.update(self._memo.measure(self._measurer, network, initial_outputs, step))
        except Exception as err:  # never crash the user's run over a measurement
            self._warn_once(
                "functional",
                f"lin_probe could not compare network and shadow at step {step} "
                f"({type(err).__name__}: {err}); logging NaN and carrying on.",
            )
            record.update(functional_distance=math.nan, functional_distance_rel=math.nan)
        if not is_ntk_step(step, self.ntk_every_n_steps):
            return record, None
        try:
            ntk_values, eigenvalues = self._measurer.ntk_record(pl_module, self._param_weights, self._initial)
        except Exception as err:
            self._warn_once(
                "ntk",
                f"lin_probe could not compute the NTK at step {step} "
                f"({type(err).__name__}: {err}); logging NaN and carrying on.",
            )
            ntk_values, eigenvalues = {"ntk_gap": math.nan, "ntk_drift": math.nan}, None
        record.update(ntk_values)
        return record, eigenvalues

    def _publish(self, trainer: pl.Trainer, record: Mapping[str, float], eigenvalues: Tensor | None) -> None:
        step = int(record["step"])
        metrics = {tag(k): float(v) for k, v in record.items() if k != "step"}
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if self.progress_bar and tag("functional_distance_rel") in metrics:
            trainer.progress_bar_metrics[tag("functional_distance_rel")] = metrics[
                tag("functional_distance_rel")
            ]
        self._log_scalars(trainer, metrics, step)
        panels = self._panels(trainer)
        if panels is not None and eigenvalues is not None:
            panels.eigenvalue_histogram(eigenvalues, step)

    def _log_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._initial is not None and self._probe is not None
        kernel = self._initial.kernel
        fit = {
            "fit_a": kernel.a,
            "fit_b": kernel.b,
            "fit_c": kernel.c,
            "fit_rel_error": math.nan if kernel.rel_error is None else kernel.rel_error,
        }
        self._log_scalars(trainer, {tag(k): float(v) for k, v in fit.items()}, 0)
        panels = self._panels(trainer)
        if panels is not None:
            n_parameters = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            card = fit_card(
                kernel,
                n_probe=len(self._probe),
                probe_source=self._probe.source,
                n_parameters=n_parameters,
                center=self.center,
            )
            panels.text("fit", card, 0)
            panels.flush()

    def _announce_exit(self, trainer: pl.Trainer, record: Mapping[str, float]) -> None:
        exit_step = self.regime.exit_step
        assert exit_step is not None
        message = (
            f"lin_probe: the network left the linear regime at step {exit_step} "
            f"(functional_distance_rel > {self.tolerance} for {self.patience} consecutive checks; "
            f"now {record['functional_distance_rel']:.3g} at step {int(record['step'])})."
        )
        if self.verbose:
            rank_zero_info(message)
        panels = self._panels(trainer)
        if panels is not None:
            panels.text(
                "exit",
                exit_card(exit_step, record, tolerance=self.tolerance, patience=self.patience),
                int(record["step"]),
            )
            panels.flush()

    def _log_scalars(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        if not trainer.loggers:
            self._warn_once(
                "no_logger",
                "LinearRegimeMonitor found no logger: measurements are kept in "
                "`monitor.history` only. Add a logger (e.g. TensorBoardLogger) to see them.",
            )
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _panels(self, trainer: pl.Trainer) -> TensorBoardPanels | None:
        """TensorBoard extras (layout, text, histogram, figure): rank zero and a TensorBoardLogger only."""
        if not trainer.is_global_zero:
            return None
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None:
            return None
        panels = TensorBoardPanels(logger.experiment)
        if not self._layout_registered:
            panels.register_layout(
                classification=is_classification(self.loss), memorization=self.memorization
            )
            self._layout_registered = True
        return panels

    def _disable(self, reason: str) -> None:
        self._active = False
        self._pending_batches = []
        self._warn_once("disabled", f"LinearRegimeMonitor stops measuring: {reason}. Training continues.")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)


def _param_weights(pl_module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Per-parameter NTK weights ``lr_group / lr_ref`` (DESIGN §1); 0 for parameters no group trains."""
    lr_ref = float(optimizer.param_groups[0]["lr"])
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    weights: dict[str, float] = {}
    for name, param in pl_module.named_parameters():
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


def _train_set_length(trainer: pl.Trainer) -> int | None:
    """Length of the training dataset, when the training dataloader exposes a sized one."""
    loader = trainer.train_dataloader
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None  # type: ignore[arg-type]
    except TypeError:  # an IterableDataset without __len__
        return None


def _floating_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating parameter (probe inputs are cast to it); ``None`` if none."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def _mean_over_ranks(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
    """Average a gradient over DDP ranks (as DDP does for the network); ``None`` in a single process."""
    if trainer.world_size <= 1:
        return None
    world_size = trainer.world_size

    def mean(grad: Tensor) -> Tensor:
        # An explicit sum then divide: gloo has no AVG, and every rank gets bit-identical results.
        return trainer.strategy.reduce(grad.clone(), reduce_op="sum") / world_size

    return mean


def _check_int(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
