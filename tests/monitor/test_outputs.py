"""The monitor's NTK over many outputs: sketched by default above 64 outputs, exact on request, the same
directions after a resume, and Θ_0 close to the exact kernel (checked here against empirical_ntk)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lin_probe.monitor import core as core_module
from lin_probe.monitor.config import MonitorConfig
from lin_probe.monitor.core import RegimeProbe
from lin_probe.monitor.outputs import NOISY_SKETCH_ERROR, SKETCH_ABOVE_OUTPUTS, check_outputs
from lin_probe.ntk import empirical_ntk
from lin_probe.ntk.sketch import split_half_error
from lin_probe.plan import ComputePlan

VOCAB, LENGTH, N = 32, 8, 24


class TokenLM(nn.Module):
    """Next-token logits at every position: C = T·V = 256 outputs per example."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.mix = nn.Linear(16, 16)
        self.out = nn.Linear(16, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens))))


def _lm_loss(pred: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(pred.reshape(-1, VOCAB), target.reshape(-1))


def _start(outputs: str, plan: ComputePlan | None = None) -> tuple[RegimeProbe, nn.Module, Tensor]:
    torch.manual_seed(0)
    model = TokenLM()
    tokens = torch.randint(0, VOCAB, (N, LENGTH), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, VOCAB, (N, LENGTH), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = MonitorConfig(loss=_lm_loss, outputs=outputs, center=False, plan=plan or ComputePlan())
    return RegimeProbe.start(model, (tokens, targets), optimizer, config), model, tokens


def test_auto_sketches_a_language_model_and_states_it() -> None:
    probe, model, tokens = _start("auto")
    outputs = probe.kernel_outputs
    assert outputs is not None and outputs.outputs == LENGTH * VOCAB > SKETCH_ABOVE_OUTPUTS
    assert outputs.sketch is not None and outputs.sketch.projections < outputs.outputs
    assert outputs.sketch.projections % 2 == 0  # two equal halves
    line = outputs.describe()
    assert f"{outputs.sketch.projections} random projections of the {LENGTH * VOCAB} outputs" in line
    # Θ_0 the monitor fitted is the sketch: close to, and not equal to, the exact kernel
    theta0 = probe.reference.theta0.matrix
    exact = empirical_ntk(model, tokens).double()
    error = float(torch.linalg.matrix_norm(theta0 - exact, ord=2) / torch.linalg.matrix_norm(exact, ord=2))
    assert 0.0 < error < 0.3
    # The stated error is the split-half estimate on the whole probe: one draw of a noise matrix's norm,
    # which scatters by up to ~2× around the true error (tests/ntk/test_sketch.py), so within 3×.
    assert outputs.error is not None and outputs.error_examples == N
    assert error / 3 <= outputs.error <= 3 * error, (outputs.error, error)
    assert f"estimated relative spectral error {outputs.error:.3g} on {N} probe examples" in line
    # Θ_0 from the two halves is the whole sketch's kernel, which the later checks compute in one pass
    whole = probe.ntk.operator(model).matrix
    torch.testing.assert_close(theta0, whole, rtol=1e-5, atol=1e-6 * float(whole.abs().max()))


def test_exact_outputs_give_the_exact_kernel() -> None:
    probe, model, tokens = _start("exact")
    assert probe.kernel_outputs is not None and probe.kernel_outputs.sketch is None
    exact = empirical_ntk(model, tokens).double()
    assert torch.allclose(
        probe.reference.theta0.matrix, exact, rtol=1e-5, atol=1e-7 * float(exact.abs().max())
    )


def test_a_resumed_monitor_sketches_with_the_same_directions() -> None:
    probe, model, _ = _start("auto")
    state = copy.deepcopy(probe.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = MonitorConfig(loss=_lm_loss, center=False)
    resumed = RegimeProbe.from_state(model, optimizer, state, config)
    assert resumed.kernel_outputs == probe.kernel_outputs
    a = probe.ntk.operator(model).matrix
    b = resumed.ntk.operator(model).matrix
    # The same directions give the same float32 kernel up to round-off (method="auto" may time its way to
    # another exact method after the resume: ~1e-6 relative); other directions would differ by the
    # sketch's own error, > 1e-2 (test_auto_sketches_a_language_model_and_states_it).
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_unknown_outputs_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="`outputs`"):
        check_outputs("all")
    with pytest.raises(ValueError, match="`outputs`"):
        MonitorConfig(outputs="some")


def test_a_noisy_sketch_is_warned_about_once_with_its_error_and_the_way_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """This LM's 32 directions leave an error of ~0.07 on 24 examples: under the 0.1 threshold, no
    warning; with the threshold at 0.01 (this model has no noisier sketch to offer) the same start warns
    once, with the measured error and the way out."""
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        probe, _, _ = _start("auto")
    assert probe.kernel_outputs is not None and probe.kernel_outputs.error is not None
    error = probe.kernel_outputs.error
    assert 0.01 < error < NOISY_SKETCH_ERROR
    assert not [w for w in quiet if "sketched over" in str(w.message)]
    monkeypatch.setattr(core_module, "NOISY_SKETCH_ERROR", 0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe, _, _ = _start("auto")
    noisy = [str(w.message) for w in caught if "sketched over" in str(w.message)]
    assert len(noisy) == 1, noisy
    assert f"estimated relative spectral error is {error:.2f} > 0.01" in noisy[0]
    assert f"{LENGTH * VOCAB} outputs" in noisy[0] and 'outputs="exact"' in noisy[0]


def test_a_matrix_free_probe_estimates_the_sketch_error_on_its_first_block() -> None:
    """A probe too large for dense kernels (here: dense only up to 8 examples) keeps Θ_0 as products;
    the halves are then taken on a dense block of the first examples, whose estimate is the same
    split-half figure a dense start on those examples states."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe, model, tokens = _start("auto", ComputePlan(dense_max_n=8))
    outputs = probe.kernel_outputs
    assert outputs is not None and outputs.sketch is not None and not probe.reference.dense
    assert outputs.error_examples == N  # the first block of 64 holds the whole probe of 24
    halves = outputs.half_output_fns(None, model, tokens)
    assert halves is not None
    a, b = (empirical_ntk(model, tokens, output_fn=half) for half in halves)
    assert outputs.error == pytest.approx(split_half_error(a, b), rel=1e-4)


def _classifier_start(outputs: str) -> tuple[RegimeProbe, nn.Module, Tensor, Tensor]:
    """A 10-class MLP, its probe and labels: ``outputs="sketch"`` takes 2 directions of its 10 outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 10))
    x = torch.randn(N, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (N,), generator=torch.Generator().manual_seed(2))
    config = MonitorConfig(loss="cross_entropy", outputs=outputs, center=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return RegimeProbe.start(model, (x, y), optimizer, config), model, x, y


def _trained_away(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Large SGD steps on the labels: the outputs align with the features, the cross terms grow."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(50):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_every_dense_ntk_check_of_a_sketch_reports_its_split_half_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The error stated at init does not hold for the run (training aligns the outputs), so each NTK
    check reports the split-half error of its own Θ_t: at step 0 the init figure (Θ_0 is reused),
    later the halves' figure recomputed here with the generic path,
    ``‖(Θ_A − Θ_B)/2‖₂ / ‖(Θ_A + Θ_B)/2‖₂``. Past the noise threshold it is said once, with the step;
    an exact kernel reports no such value."""
    probe, model, x, y = _classifier_start("sketch")
    outputs = probe.kernel_outputs
    assert outputs is not None and outputs.sketch is not None and outputs.error is not None
    assert outputs.sketch.projections == 2
    assert probe.measure(model, 0).record["ntk_sketch_error"] == outputs.error
    _trained_away(model, x, y)
    halves = [
        empirical_ntk(
            model,
            x,
            method="generic",
            output_fn=outputs.sketch.output_fn(
                None, outputs.outputs, device="cpu", dtype=torch.float32, half=k
            ),
        ).double()
        for k in (0, 1)
    ]
    spectral = lambda m: float(torch.linalg.matrix_norm(m, ord=2))  # noqa: E731
    expected = spectral((halves[0] - halves[1]) / 2) / spectral((halves[0] + halves[1]) / 2)
    assert expected > outputs.error  # the premise: training made the sketch noisier
    monkeypatch.setattr(core_module, "NOISY_SKETCH_ERROR", (outputs.error + expected) / 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = probe.measure(model, 5).record["ntk_sketch_error"]
        again = probe.measure(model, 6).record["ntk_sketch_error"]
    assert first == pytest.approx(expected, rel=1e-3) and again == pytest.approx(expected, rel=1e-3)
    said = [str(w.message) for w in caught if "reached" in str(w.message)]
    assert len(said) == 1 and f"reached {expected:.2f} at step 5" in said[0], said
    exact, exact_model, exact_x, exact_y = _classifier_start("exact")
    _trained_away(exact_model, exact_x, exact_y)
    assert "ntk_sketch_error" not in exact.measure(exact_model, 5).record
