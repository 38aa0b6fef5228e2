"""Tests for ``lin_probe.ntk.sketch``: unbiasedness, accuracy on a token LM, reproducibility, errors.

References are independent of the code under test: the brute-force per-example autograd kernel
(``_ntk_reference``, float64) for the MLP and a closed form for the embedding → linear "LM".
"""

from __future__ import annotations

import math

import pytest
import torch
from _ntk_reference import DTYPE, assert_close, brute_force_ntk
from torch import Tensor, nn

from lin_probe.monitor.outputs import FEW_OUTPUT_PROJECTIONS
from lin_probe.ntk import empirical_ntk
from lin_probe.ntk.sketch import (
    OutputSketch,
    output_count,
    projections_for,
    sketch_error,
    sketched_ntk,
    sketched_ntk_with_error,
    split_half_error,
)


def _mlp(c: int = 50) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, c)).to(DTYPE)


def _rel_spectral(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b, ord=2) / torch.linalg.matrix_norm(b, ord=2))


class TokenLM(nn.Module):
    """``Embedding(64, 32) → Linear(32, 64)`` per position: ``C = T·64`` logits per sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 64)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embed(tokens))


def _lm_closed_form(model: TokenLM, tokens: Tensor) -> Tensor:
    """``Θ_ij = (1/TV)[TV + V Σ_t e_it·e_jt + ‖W‖_F² Σ_t δ(x_it, x_jt)]`` (bias, head weight, embedding)."""
    t, v = tokens.shape[1], model.head.out_features
    e = model.embed.weight.detach()[tokens]  # (n, T, d)
    same = (tokens[:, None, :] == tokens[None, :, :]).to(DTYPE).sum(-1)
    w2 = model.head.weight.detach().pow(2).sum()
    return (t * v + v * torch.einsum("itd,jtd->ij", e, e) + w2 * same) / (t * v)


@pytest.fixture(scope="module")
def lm() -> tuple[TokenLM, Tensor]:
    torch.manual_seed(3)
    return TokenLM().to(DTYPE), torch.randint(0, 64, (32, 16))


# ------------------------------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_average_of_sketches_converges_to_exact_kernel(kind: str) -> None:
    model, x = _mlp(), torch.randn(6, 5, dtype=DTYPE)
    exact = brute_force_ntk(model, x)
    draws = torch.stack([sketched_ntk(model, x, OutputSketch(4, seed=s, kind=kind)) for s in range(200)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    z = ((mean - exact).abs() / se).max().item()
    assert z < 5.0, f"max |mean - exact| is {z:.2f} standard errors"
    # A wrong scale (e.g. 1/S instead of 1/C) is off by a constant factor: far more than 5 SE.
    assert (se < 0.2 * exact.abs().max()).all()


def test_error_shrinks_like_one_over_sqrt_projections() -> None:
    model, x = _mlp(), torch.randn(6, 5, dtype=DTYPE)

    def mean_error(s: int) -> float:
        return sum(sketch_error(model, x, OutputSketch(s, seed=k), subsample=6) for k in range(40)) / 40

    ratio = mean_error(8) / mean_error(32)
    assert 1.4 <= ratio <= 2.8, ratio


def test_a_classifiers_two_direction_sketch_is_accurate_behind_a_wide_final_layer() -> None:
    """Why a classifier's budget sketch needs only ``FEW_OUTPUT_PROJECTIONS`` directions: with
    Rademacher directions the diagonal terms are exact and the error is the outputs' cross terms,
    which at init vanish at least like ``1/√width`` behind a final Linear layer (the pNTK argument,
    Mohamadi et al., ICML 2023; the last layer's own cross terms are exactly zero). Against the
    brute force, over 8 draws: the error at width 1024 is under 1 %, and from width 64 to 1024 it
    shrinks at least by the predicted √16 = 4 (it does by ~25 here)."""
    x = torch.randn(24, 20, dtype=DTYPE, generator=torch.Generator().manual_seed(0))

    def mean_error(width: int) -> float:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(20, width), nn.Tanh(), nn.Linear(width, 10)).to(DTYPE)
        exact = brute_force_ntk(model, x)
        draws = [sketched_ntk(model, x, OutputSketch(FEW_OUTPUT_PROJECTIONS, seed=s)) for s in range(8)]
        return sum(_rel_spectral(k, exact) for k in draws) / len(draws)

    narrow, wide = mean_error(64), mean_error(1024)
    assert wide < 0.01, wide
    assert narrow / wide >= 4.0, (narrow, wide)


def test_sketch_through_generic_and_structured_paths_agrees() -> None:
    model, x = _mlp(), torch.randn(5, 5, dtype=DTYPE)
    sketch = OutputSketch(7, seed=2)
    assert_close(
        sketched_ntk(model, x, sketch, method="structured"), sketched_ntk(model, x, sketch, method="generic")
    )


def test_projections_at_least_outputs_is_exact() -> None:
    model, x = _mlp(c=6), torch.randn(4, 5, dtype=DTYPE)
    assert_close(sketched_ntk(model, x, OutputSketch(6)), brute_force_ntk(model, x))


def test_base_output_fn_is_composed() -> None:
    model, x = _mlp(c=50), torch.randn(4, 5, dtype=DTYPE)
    pick = lambda out: out[:, :30]  # noqa: E731
    assert output_count(model, x, pick) == 30
    assert_close(
        sketched_ntk(model, x, OutputSketch(30), output_fn=pick), brute_force_ntk(model, x, output_fn=pick)
    )
    sketched = sketched_ntk(model, x, OutputSketch(3), output_fn=pick)
    assert sketched.shape == (4, 4) and not torch.allclose(
        sketched, brute_force_ntk(model, x, output_fn=pick)
    )


# ----------------------------------------------------------------------------------------- token LM


def test_closed_form_matches_exact_kernel(lm: tuple[TokenLM, Tensor]) -> None:
    model, x = lm
    assert_close(empirical_ntk(model, x[:4]), _lm_closed_form(model, x[:4]))


def test_lm_sketch_meets_target_and_sketch_error_is_consistent(lm: tuple[TokenLM, Tensor]) -> None:
    model, x = lm
    c, n = output_count(model, x), x.shape[0]
    assert c == 1024
    sketch = OutputSketch(projections_for(c, n, 0.05), seed=0)
    assert sketch.projections < c // 10  # the sketch is actually cheaper
    exact = _lm_closed_form(model, x)
    assert _rel_spectral(sketched_ntk(model, x, sketch), exact) <= 0.05
    true_sub = _rel_spectral(sketched_ntk(model, x[:16], sketch), _lm_closed_form(model, x[:16]))
    reported = sketch_error(model, x, sketch, subsample=16)
    assert true_sub / 2 <= reported <= 2 * true_sub, (reported, true_sub)


# ---------------------------------------------------------------------------------- reproducibility


def test_seed_reproducible_and_global_rng_untouched() -> None:
    model, x = _mlp(), torch.randn(4, 5, dtype=DTYPE)
    state = torch.get_rng_state()
    a = sketched_ntk(model, x, OutputSketch(5, seed=11))
    b = sketched_ntk(model, x, OutputSketch(5, seed=11))
    c = sketched_ntk(model, x, OutputSketch(5, seed=12))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_directions_cached_and_dtype_independent() -> None:
    sketch = OutputSketch(3, seed=4, kind="gaussian")
    v64 = sketch.matrix(10, device="cpu", dtype=torch.float64)
    assert sketch.matrix(10, device="cpu", dtype=torch.float64) is v64
    assert torch.equal(sketch.matrix(10, device="cpu", dtype=torch.float32), v64.float())
    assert v64.shape == (10, 3)
    rad = OutputSketch(3, seed=4).matrix(10, device="cpu", dtype=torch.float64)
    assert torch.equal(rad.abs(), torch.full_like(rad, 1 / math.sqrt(10)))


# ------------------------------------------------------------------------------------ bad arguments


def test_bad_arguments_raise_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="projections"):
        OutputSketch(0)
    with pytest.raises(TypeError, match="projections"):
        OutputSketch(2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        OutputSketch(2, kind="sparse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        OutputSketch(2, seed=-1)
    with pytest.raises(ValueError, match="`C`"):
        projections_for(0, 4)
    with pytest.raises(ValueError, match="`n`"):
        projections_for(4, 0)
    with pytest.raises(ValueError, match="target_error"):
        projections_for(4, 4, 0.0)
    model, x = _mlp(), torch.randn(3, 5, dtype=DTYPE)
    with pytest.raises(ValueError, match="subsample"):
        sketch_error(model, x, OutputSketch(2), subsample=0)
    wrong = OutputSketch(2).output_fn(None, 40, device="cpu", dtype=DTYPE)
    with pytest.raises(ValueError, match="C = 40"):
        empirical_ntk(model, x, output_fn=wrong)


def test_projections_for_clamps_and_shrinks_with_target() -> None:
    assert projections_for(10, 1, 0.05) == 10
    assert projections_for(10**6, 10**6, 0.5) == 1
    assert projections_for(1024, 32, 0.05) == 25
    assert projections_for(1024, 32, 0.025) > projections_for(1024, 32, 0.05)


# ------------------------------------------------------------------------------ split-half estimate


def test_the_two_halves_average_to_the_whole_sketch() -> None:
    model, x = _mlp(), torch.randn(7, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    sketch = OutputSketch(6, seed=2)
    whole, _ = sketched_ntk_with_error(model, x, sketch)
    assert_close(whole, sketched_ntk(model, x, sketch))  # the same kernel, from two passes of 3 directions


def test_split_half_error_tracks_the_true_error_over_seeds() -> None:
    """``(Θ_A − Θ_B)/2`` and ``Θ_S − Θ`` have equal second moments, so over 40 independent sketches the
    mean squared Frobenius errors agree; each seed's error has a relative spread of ~0.5, so the mean
    of 40 is good to ~8 % (1σ) and [0.7, 1.4] is ≳ 4σ. The spectral norms agree only as the CLT makes
    the errors Gaussian: their means within [0.6, 1.6] (measured 0.97–1.2 at S = 4, 8)."""
    model = _mlp()
    x = torch.randn(12, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    exact, c = brute_force_ntk(model, x), output_count(model, x)
    for s in (4, 8):
        estimated, true, estimated_f, true_f = [], [], [], []
        for seed in range(40):
            sketch = OutputSketch(s, seed=seed)
            theta, error = sketched_ntk_with_error(model, x, sketch)
            a, b = (
                empirical_ntk(
                    model, x, output_fn=sketch.output_fn(None, c, device="cpu", dtype=DTYPE, half=h)
                )
                for h in (0, 1)
            )
            estimated.append(error)
            true.append(_rel_spectral(theta, exact))
            estimated_f.append(float(((a - b) / 2).pow(2).sum()))
            true_f.append(float((theta - exact).pow(2).sum()))
        assert 0.7 <= sum(estimated_f) / sum(true_f) <= 1.4, (s, sum(estimated_f) / sum(true_f))
        assert 0.6 <= sum(estimated) / sum(true) <= 1.6, (s, sum(estimated) / sum(true))


def test_split_half_error_on_a_token_lm_against_its_closed_form(lm: tuple[TokenLM, Tensor]) -> None:
    """At the monitor's floor of 32 projections on the whole probe; single draws scatter by ~2× (a
    spectral norm of one noise matrix), so the mean over 4 seeds is compared, within [0.6, 1.6]."""
    model, x = lm
    exact = _lm_closed_form(model, x)
    estimated, true = [], []
    for seed in range(4):
        theta, error = sketched_ntk_with_error(model, x, OutputSketch(32, seed=seed))
        estimated.append(error)
        true.append(_rel_spectral(theta, exact))
    assert 0.6 <= sum(estimated) / sum(true) <= 1.6, (estimated, true)


def test_split_half_needs_two_equal_halves() -> None:
    model, x = _mlp(), torch.randn(3, 5, dtype=DTYPE)
    with pytest.raises(ValueError, match="even number of projections"):
        sketched_ntk_with_error(model, x, OutputSketch(5))
    with pytest.raises(ValueError, match="`half` must be 0 or 1"):
        OutputSketch(4).output_fn(None, 50, device="cpu", dtype=DTYPE, half=2)
    with pytest.raises(ValueError, match="no halves"):
        OutputSketch(60).output_fn(None, 50, device="cpu", dtype=DTYPE, half=0)
    with pytest.raises(ValueError, match="one shape"):
        split_half_error(torch.eye(3), torch.eye(4))
    assert split_half_error(torch.zeros(2, 2), torch.zeros(2, 2)) == 0.0
