"""``method="auto"``'s cost model (:mod:`lin_probe.ntk.choice`) and the monitor's choose-once probe.

Kernels are checked against the float64 brute force of ``_ntk_reference``; the decision logic is
checked with candidates made slow by an injected delay (not by timing the real paths), and the
extrapolation on synthetic times with known ``α, β``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import torch
from _ntk_reference import DTYPE, assert_close, brute_force_ntk, mlp
from torch import Tensor, nn

from lin_probe.monitor.checks import NTKProbe
from lin_probe.ntk import MethodChoice, NTKMethod, choose_method, empirical_ntk, ntk_operator
from lin_probe.ntk import choice as choice_module
from lin_probe.ntk import dense as dense_module
from lin_probe.plan import ComputePlan


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(7)


class ScaledMLP(nn.Module):
    """A Linear stack plus a bare parameter no structured rule covers: structured part + generic rest."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 6)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(x)) * self.scale)


class BareParameters(nn.Module):
    """No module with a structured rule at all."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x @ self.w)


def bn_cnn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).to(DTYPE)
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model


CASES = {
    "mlp": (lambda: mlp(), (5,)),
    "structured_plus_rest": (lambda: ScaledMLP().to(DTYPE), (4,)),
    "bn_cnn": (bn_cnn, (2, 5, 5)),
    "no_rule": (lambda: BareParameters().to(DTYPE), (4,)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_auto_with_timed_choice_matches_brute_force(case: str) -> None:
    """n = 24 > 16: the probe runs (both candidates) and whichever it picks is exact."""
    build, shape = CASES[case]
    model, x = build(), torch.randn(24, *shape, dtype=DTYPE)
    choice = choose_method(model, x)
    assert choice.method in (NTKMethod.STRUCTURED, NTKMethod.GENERIC)
    expected = brute_force_ntk(model, x)
    assert_close(empirical_ntk(model, x, method="auto"), expected)
    assert_close(empirical_ntk(model, x, method=choice.method), expected)
    if case == "no_rule":
        assert choice.method is NTKMethod.GENERIC and not choice.estimates
    else:
        assert set(choice.estimates) == {"structured", "generic"}
        assert all(v >= 0 for v in choice.estimates.values())
        assert choice.estimates[choice.method.value] == min(choice.estimates.values())
    assert choice.method.value in choice.explain() and "n=24" in choice.explain()


def test_small_probe_is_not_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    """n ≤ 16: structured rules, no kernel computed to choose."""
    calls: list[int] = []
    original = dense_module._empirical_ntk

    def spy(model: nn.Module, inputs: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        calls.append(inputs.shape[0])
        return original(model, inputs, *args, **kwargs)

    monkeypatch.setattr(dense_module, "_empirical_ntk", spy)
    choice = choose_method(mlp(), torch.randn(16, 5, dtype=DTYPE))
    assert choice.method is NTKMethod.STRUCTURED and not choice.estimates
    assert calls == []
    choose_method(mlp(), torch.randn(17, 5, dtype=DTYPE))
    # m = clamp(17 // 32, 2, 8) = 2: probes of 2 and 4 examples (and 1 for the second candidate)
    assert set(calls) <= {1, 2, 4} and {2, 4} <= set(calls)


@pytest.mark.parametrize("slow", ["structured", "generic"])
def test_choice_avoids_the_slow_candidate(slow: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 20 ms delay per call of one path (vs ~ms for the tiny model): the other one is chosen."""
    original = dense_module._empirical_ntk

    def delayed(model: nn.Module, inputs: Tensor, method: NTKMethod, *args: Any, **kwargs: Any) -> Tensor:
        if method.value == slow:
            time.sleep(0.02 * inputs.shape[0])
        return original(model, inputs, method, *args, **kwargs)

    monkeypatch.setattr(dense_module, "_empirical_ntk", delayed)
    choice = choose_method(mlp(), torch.randn(64, 5, dtype=DTYPE))
    assert choice.method.value != slow
    assert choice.estimates[slow] > choice.estimates[choice.method.value]


def test_extrapolation_recovers_linear_and_quadratic_terms() -> None:
    alpha, beta, n = 0.003, 0.0002, 256
    for m1, m2 in [(4, 8), (4, 16)]:  # the probe's m, 2m, or the pilot's two sizes
        for e1, e2, e_n in [(m1, m2, n), (m1, m2, 3 * n)]:  # E(n) > n: recomputation under the budget
            t1, t2 = alpha * e1 + beta * m1 * m1, alpha * e2 + beta * m2 * m2
            got = choice_module._extrapolate(t1, t2, m1, m2, e1, e2, e_n, n)
            assert got == pytest.approx(alpha * e_n + beta * n * n, rel=1e-9)
    # noisy times implying β < 0: linear through the larger probe, never negative
    m = 4
    assert choice_module._extrapolate(1.0, 1.5, m, 2 * m, m, 2 * m, n, n) == pytest.approx(1.5 / (2 * m) * n)


@pytest.mark.parametrize("recompute", [1, 10])
def test_a_later_candidate_is_dropped_by_the_examples_it_would_record(recompute: int) -> None:
    """A candidate whose one-example time times ``n`` is in the race, but whose plan would record
    ``recompute × n`` examples (chunk pairs recomputed), is dropped after that one example."""
    n, m, per_example = 256, 8, 0.01
    ran: list[int] = []

    def run(method: NTKMethod, count: int) -> float:
        ran.append(count)
        return per_example * count

    def examples(method: NTKMethod, count: int) -> float:
        return count * (recompute if count == n else 1)  # the probes fit the budget; n does not

    best = per_example * n  # the structured estimate so far: the same per-example cost
    got = choice_module._estimate(
        NTKMethod.GENERIC, m, n, run, examples, give_up_above=choice_module.PRUNE_FACTOR * best
    )
    if recompute * 1.0 > choice_module.PRUNE_FACTOR:
        assert ran == [1] and got == pytest.approx(per_example * recompute * n)
    else:
        assert ran == [1, m, 2 * m] and got == pytest.approx(per_example * n)


def test_the_quadratic_term_is_capped_by_the_grams_share_of_the_work() -> None:
    """Probes 10 % off proportional imply a large β; the counted Gram share caps it (module docstring)."""
    t1, t2, m1, m2, n, e_n = 0.42, 0.93, 8, 16, 256, 326.0
    share = 0.05
    capped = choice_module._extrapolate(t1, t2, m1, m2, m1, m2, e_n, n, gram_share=share)
    # β·m2² = share·t2, the rest of t2 linear in the recorded examples
    assert capped == pytest.approx((1 - share) * t2 / m2 * e_n + share * t2 * (n / m2) ** 2, rel=1e-12)
    uncapped = choice_module._extrapolate(t1, t2, m1, m2, m1, m2, e_n, n)
    assert uncapped > 1.5 * capped
    # a fit already within the share is left alone
    alpha, beta = 0.05, 1e-5
    t1, t2 = alpha * m1 + beta * m1 * m1, alpha * m2 + beta * m2 * m2
    fitted = choice_module._extrapolate(t1, t2, m1, m2, m1, m2, e_n, n, gram_share=0.5)
    assert fitted == pytest.approx(alpha * e_n + beta * n * n, rel=1e-9)


@pytest.mark.parametrize(("case", "counted"), [("mlp", True), ("structured_plus_rest", False)])
def test_the_gram_share_is_passed_only_where_every_multiply_add_is_counted(
    case: str, counted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The structured plan counts its own work; a generic rest (or the generic path) is not counted."""
    shares: dict[str, float | None] = {}
    original = choice_module._through

    def spy(method: NTKMethod, *args: Any) -> float:
        gram_share = args[-1]
        shares[method.value] = None if gram_share is None else gram_share(method, 8)
        return original(method, *args)

    monkeypatch.setattr(choice_module, "_through", spy)
    build, shape = CASES[case]
    choose_method(build(), torch.randn(64, *shape, dtype=DTYPE))
    assert shares.get("generic") is None  # when probed at all (the MLP's is dropped after one example)
    structured = shares["structured"]
    assert (structured is not None and 0.0 < structured < 1.0) if counted else structured is None


def test_the_generic_floor_is_half_its_gram_at_the_matmul_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    rate = choice_module.matmul_rate(torch.float64, torch.device("cpu"))
    assert 1e6 < rate < 1e13  # multiply-adds per second of a real CPU, not seconds or flops per call
    monkeypatch.setattr(choice_module, "matmul_rate", lambda dtype, device: 2e9)
    floor = choice_module.generic_gram_floor_s(64, 10, 1000, torch.float32, torch.device("cpu"))
    assert floor == pytest.approx(64 * 65 / 2 * 10 * 1000 / 2e9, rel=1e-12)


@pytest.mark.parametrize("fast_machine", [False, True])
def test_a_generic_path_whose_gram_is_out_of_the_race_is_not_timed(
    fast_machine: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wide MLP with 80 outputs (C·P = 58 M): its Jacobian Gram at n = 64 takes ~5× the structured
    kernel's estimate, so the generic path never runs; on a machine of instant matmuls it would be timed."""
    if fast_machine:
        monkeypatch.setattr(choice_module, "matmul_rate", lambda dtype, device: 1e30)
    ran: list[str] = []
    original = dense_module._empirical_ntk

    def spy(model: nn.Module, inputs: Tensor, method: NTKMethod, *args: Any, **kwargs: Any) -> Tensor:
        ran.append(method.value)
        return original(model, inputs, method, *args, **kwargs)

    monkeypatch.setattr(dense_module, "_empirical_ntk", spy)
    model = nn.Sequential(nn.Linear(100, 4000), nn.Tanh(), nn.Linear(4000, 80)).to(DTYPE)
    choice = choose_method(model, torch.randn(64, 100, dtype=DTYPE))
    assert choice.method is NTKMethod.STRUCTURED
    assert ("generic" in ran) is fast_machine
    if not fast_machine:
        numel = sum(p.numel() for p in model.parameters())
        floor = choice_module.generic_gram_floor_s(64, 80, numel, DTYPE, torch.device("cpu"))
        assert (
            choice.estimates["generic"] == floor > choice_module.PRUNE_FACTOR * choice.estimates["structured"]
        )


def test_known_structured_seconds_replace_its_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seconds timed before (the monitor's pilot) are extrapolated as the probe's would be; only generic runs."""
    ran: list[tuple[str, int]] = []
    original = dense_module._empirical_ntk

    def spy(model: nn.Module, inputs: torch.Tensor, method: Any, *args: Any, **kwargs: Any) -> Any:
        ran.append((method.value, inputs.shape[0]))
        return original(model, inputs, method, *args, **kwargs)

    monkeypatch.setattr(dense_module, "_empirical_ntk", spy)
    alpha, beta, n = 0.01, 0.001, 64
    seconds = {m: alpha * m + beta * m * m for m in (2, 4, 8)}  # the two largest are used
    choice = choose_method(mlp(), torch.randn(n, 5, dtype=DTYPE), structured_seconds=seconds)
    assert all(method == "generic" for method, _ in ran) and ran
    assert choice.estimates["structured"] == pytest.approx(alpha * n + beta * n * n, rel=1e-9)
    assert "structured timed before on 4 and 8" in choice.reason
    # one size is not a curve: the structured path is probed as usual
    ran.clear()
    choose_method(mlp(), torch.randn(n, 5, dtype=DTYPE), structured_seconds={8: 1.0})
    assert ("structured", 2) in ran


def test_choice_leaves_the_model_untouched() -> None:
    model = bn_cnn().train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[5].bias.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    choose_method(model, torch.randn(20, 2, 5, 5, dtype=DTYPE))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert not model[5].bias.requires_grad and model[0].weight.requires_grad


def test_probe_chooses_once_and_reuses_the_method(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = choice_module.choose_method

    def spy(*args: Any, **kwargs: Any) -> MethodChoice:
        calls.append(1)
        return original(*args, **kwargs)

    import lin_probe.monitor.checks as checks_module

    monkeypatch.setattr(checks_module, "choose_method", spy)
    model, x = ScaledMLP().to(DTYPE), torch.randn(20, 4, dtype=DTYPE)
    probe = NTKProbe(x, None, {}, ComputePlan())
    assert probe.method_choice is None
    expected = brute_force_ntk(model, x)
    for _ in range(3):
        op = probe.operator(model)
        assert op.matrix is not None
        assert_close(op.matrix, expected)
    assert probe.trace(model) == pytest.approx(float(expected.trace()), rel=1e-9)
    assert calls == [1]
    assert isinstance(probe.method_choice, MethodChoice)
    assert probe.method_choice.method in (NTKMethod.STRUCTURED, NTKMethod.GENERIC)


def test_operator_passes_a_concrete_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ntk_operator(method=...)`` reaches the kernel: a concrete method never runs the probe."""
    monkeypatch.setattr(
        choice_module, "choose_prepared", lambda *a, **k: pytest.fail("the probe ran for a concrete method")
    )
    model, x = ScaledMLP().to(DTYPE), torch.randn(30, 4, dtype=DTYPE)
    expected = brute_force_ntk(model, x)
    for method in ("structured", "generic"):
        op = ntk_operator(model, x, plan=ComputePlan(), method=method)
        assert op.matrix is not None
        assert_close(op.matrix, expected)
    with pytest.raises(ValueError, match="method"):
        ntk_operator(model, x, plan=ComputePlan(), method="fastest")


def test_refused_structured_candidate_is_infinite(monkeypatch: pytest.MonkeyPatch) -> None:
    """A structured probe that raises (batch check) is priced ``inf`` and the generic path chosen."""
    original = dense_module._empirical_ntk

    def refusing(model: nn.Module, inputs: Tensor, method: NTKMethod, *args: Any, **kwargs: Any) -> Tensor:
        if method is NTKMethod.STRUCTURED:
            raise dense_module.NotStructurable("a chunk behaved differently")
        return original(model, inputs, method, *args, **kwargs)

    monkeypatch.setattr(dense_module, "_empirical_ntk", refusing)
    choice = choose_method(mlp(), torch.randn(32, 5, dtype=DTYPE))
    assert choice.method is NTKMethod.GENERIC and math.isinf(choice.estimates["structured"])


def _count_choices(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every timed choice ``method="auto"`` makes, by its ``n``."""
    made: list[int] = []
    original = choice_module.choose_prepared

    def spy(model: nn.Module, inputs: Tensor, *args: Any, **kwargs: Any) -> MethodChoice:
        made.append(inputs.shape[0])
        return original(model, inputs, *args, **kwargs)

    monkeypatch.setattr(choice_module, "choose_prepared", spy)
    return made


def test_auto_times_once_per_model_and_call_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second identical call reuses the choice; each part of the signature makes a new one."""
    made = _count_choices(monkeypatch)
    model, x = ScaledMLP().to(DTYPE), torch.randn(24, 4, dtype=DTYPE)
    expected = brute_force_ntk(model, x)
    for _ in range(2):
        assert_close(empirical_ntk(model, x), expected)
    assert made == [24]
    with torch.no_grad():
        model.inner.weight.mul_(2.0)  # new values, same shapes: the costs are the same
    assert_close(empirical_ntk(model, x), brute_force_ntk(model, x))
    assert made == [24]
    empirical_ntk(model, x[:20])  # another n
    empirical_ntk(model, x, memory_budget=2**20)  # another budget
    empirical_ntk(model, x, output_fn=lambda out: out[:, :2])  # another output selection
    model.scale.requires_grad_(False)  # another parameter set
    empirical_ntk(model, x)
    empirical_ntk(ScaledMLP().to(DTYPE), x)  # another model
    assert made == [24, 20, 24, 24, 24, 24]
    choice_module.forget_choices()
    empirical_ntk(model, x)
    assert made == [24, 20, 24, 24, 24, 24, 24]


def test_remembered_choices_are_bounded_and_dropped_with_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _count_choices(monkeypatch)
    model, x = ScaledMLP().to(DTYPE), torch.randn(40, 4, dtype=DTYPE)
    sizes = list(range(17, 18 + choice_module.REMEMBERED_PER_MODEL))  # one more than remembered
    for n in sizes:
        empirical_ntk(model, x[:n])
    assert len(choice_module._REMEMBERED[model]) == choice_module.REMEMBERED_PER_MODEL
    empirical_ntk(model, x[: sizes[-1]])  # the newest is still there
    empirical_ntk(model, x[: sizes[0]])  # the oldest was forgotten: timed again
    assert made == [*sizes, sizes[0]]
    del model
    import gc

    gc.collect()
    assert len(choice_module._REMEMBERED) == 0


def test_choose_method_itself_always_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """The public probe is explicit: it does not answer from the memory ``method="auto"`` keeps."""
    made = _count_choices(monkeypatch)
    model, x = ScaledMLP().to(DTYPE), torch.randn(24, 4, dtype=DTYPE)
    empirical_ntk(model, x)
    choose_method(model, x)
    assert made == [24, 24]
