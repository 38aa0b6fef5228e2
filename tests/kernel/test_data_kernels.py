"""Tests for ``lin_probe.kernel.data_kernels``: mean input patches, the first convolution, the choice.

References are independent of the code under test: mean patches built by explicit python loops
over output positions (padding resolved index by index, no ``unfold`` or ``F.pad``), the
convolution itself (``weight @ p̄`` is its output averaged over positions), and empirical NTKs of
wide CNNs whose first-order kernel is known (Hu et al.: affine in the data kernel; after global
average pooling the data kernel of mean patches).
"""

from __future__ import annotations

import io
import math
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lin_probe.kernel import (
    DATA_KERNELS,
    AffineKernel,
    PatchMeanFeatures,
    choose_data_kernel,
    data_kernel_candidates,
    first_convolution,
    fit_affine_kernel,
    fit_affine_kernel_matrix_free,
)
from lin_probe.kernel.data_kernels import DataKernelChoice, features_from_state
from lin_probe.linalg import SymmetricOperator
from lin_probe.ntk import empirical_ntk

# ---------------------------------------------------------------------------------------------
# PatchMeanFeatures against explicit loops
# ---------------------------------------------------------------------------------------------


def _source_index(i: int, before: int, size: int, mode: str) -> int | None:
    """Where padded coordinate ``i`` reads from in an axis of ``size`` (``None``: a zero pad)."""
    j = i - before
    if 0 <= j < size:
        return j
    if mode == "zeros":
        return None
    if mode == "circular":
        return j % size
    if mode == "replicate":
        return min(max(j, 0), size - 1)
    assert mode == "reflect"  # mirror without repeating the edge
    return -j if j < 0 else 2 * (size - 1) - j


def _padding_pairs(conv: nn.Conv1d | nn.Conv2d) -> list[tuple[int, int]]:
    if conv.padding == "same":  # torch: total d·(k − 1), the odd extra after
        totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    if conv.padding == "valid":
        return [(0, 0)] * len(conv.kernel_size)
    return [(p, p) for p in conv.padding]


def _loop_patch_mean(conv: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> np.ndarray:
    """Mean input patch by python loops over examples, output positions, channels and taps."""
    xs = x.double().numpy()
    if isinstance(conv, nn.Conv1d):
        xs = xs[:, :, None, :]
        kernel, stride, dilation = (1, *conv.kernel_size), (1, *conv.stride), (1, *conv.dilation)
        pads = [(0, 0), *_padding_pairs(conv)]
    else:
        kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
        pads = _padding_pairs(conv)
    n, c, h, w = xs.shape
    size = [h + sum(pads[0]), w + sum(pads[1])]
    out = [(size[a] - dilation[a] * (kernel[a] - 1) - 1) // stride[a] + 1 for a in range(2)]
    result = np.zeros((n, c * kernel[0] * kernel[1]))
    for e in range(n):
        for oh in range(out[0]):
            for ow in range(out[1]):
                patch = []
                for ch in range(c):
                    for ki in range(kernel[0]):
                        for kj in range(kernel[1]):
                            i = _source_index(
                                oh * stride[0] + ki * dilation[0], pads[0][0], h, conv.padding_mode
                            )
                            j = _source_index(
                                ow * stride[1] + kj * dilation[1], pads[1][0], w, conv.padding_mode
                            )
                            patch.append(0.0 if i is None or j is None else xs[e, ch, i, j])
                result[e] += np.array(patch)
        result[e] /= out[0] * out[1]
    return result


_CONVS = {
    "2d-stride2-pad1-dil2-k3x2": lambda: nn.Conv2d(3, 5, (3, 2), stride=2, padding=1, dilation=2),
    "2d-circular": lambda: nn.Conv2d(2, 4, 3, padding=(1, 2), padding_mode="circular"),
    "2d-same-even-kernel-dil2": lambda: nn.Conv2d(2, 3, (4, 3), padding="same", dilation=(1, 2)),
    "2d-reflect-same": lambda: nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"),
    "2d-valid-groups": lambda: nn.Conv2d(4, 6, 2, stride=(1, 2), padding="valid", groups=2),
    "1d-stride2-pad2": lambda: nn.Conv1d(2, 4, 3, stride=2, padding=2),
    "1d-circular-dil3": lambda: nn.Conv1d(3, 4, 2, padding=3, dilation=3, padding_mode="circular"),
    "1d-same-replicate": lambda: nn.Conv1d(2, 4, 4, padding="same", padding_mode="replicate"),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")  # torch's own conv
@pytest.mark.parametrize("name", list(_CONVS))
def test_patch_mean_matches_explicit_loops_and_the_conv(name: str) -> None:
    torch.manual_seed(0)
    conv = _CONVS[name]().double()
    shape = (3, conv.in_channels, 7) if isinstance(conv, nn.Conv1d) else (3, conv.in_channels, 7, 6)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    features = PatchMeanFeatures.from_conv(conv)
    got = features(x)
    assert got.shape == (3, features.patch_size) and got.dtype == torch.float64
    # the same numbers summed in another order: float64 round-off only
    np.testing.assert_allclose(got.numpy(), _loop_patch_mean(conv, x), rtol=1e-12, atol=1e-14)
    # the conv itself: its output averaged over positions is weight · p̄ (+ bias), per group
    with torch.no_grad():
        mean_out = conv(x).flatten(2).mean(dim=2) - conv.bias
    groups = conv.groups
    per_group = got.reshape(3, groups, -1)
    weight = conv.weight.reshape(groups, conv.out_channels // groups, -1)
    expected = torch.einsum("gof,ngf->ngo", weight, per_group).reshape(3, -1)
    np.testing.assert_allclose(expected.detach().numpy(), mean_out.numpy(), rtol=1e-10, atol=1e-12)


def test_patch_mean_keeps_float32_and_chunks_large_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(9, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    whole = PatchMeanFeatures.from_conv(conv)(x)
    monkeypatch.setattr("lin_probe.kernel.data_kernels._PATCH_CHUNK_NUMEL", 2 * 18 * 25)  # 2 per chunk
    chunked = PatchMeanFeatures.from_conv(conv)(x)
    assert whole.dtype == torch.float32
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)  # the same per-example arithmetic


def test_patch_mean_describe_pickle_and_restore() -> None:
    features = PatchMeanFeatures.from_conv(nn.Conv2d(1, 2048, 3, padding=1))
    assert features.describe() == "patch_mean (3×3, stride 1, padding 1, of Conv2d(1→2048))"
    odd = PatchMeanFeatures.from_conv(nn.Conv1d(2, 8, 4, padding="same", dilation=2, padding_mode="reflect"))
    assert odd.padding == ((3, 3),)
    assert (
        odd.describe() == "patch_mean (4, stride 1, padding 3, dilation 2, reflect padding, of Conv1d(2→8))"
    )
    assert pickle.loads(pickle.dumps(features)) == features
    as_json = {  # what a JSON round trip of dataclasses.asdict gives back: lists
        "dims": 2,
        "in_channels": 1,
        "kernel_size": [3, 3],
        "stride": [1, 1],
        "padding": [[1, 1], [1, 1]],
        "dilation": [1, 1],
        "padding_mode": "zeros",
        "out_channels": 2048,
    }
    assert PatchMeanFeatures(**as_json) == features


def test_patch_mean_bad_input() -> None:
    features = PatchMeanFeatures.from_conv(nn.Conv2d(3, 4, 3, padding=1))
    with pytest.raises(ValueError, match=r"data_kernel.*\(N, 3, H, W\).*\(2, 3, 8\)"):
        features(torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match=r"data_kernel.*\(2, 1, 8, 8\)"):
        features(torch.zeros(2, 1, 8, 8))
    with pytest.raises(TypeError, match="data_kernel"):
        features(np.zeros((2, 3, 8, 8)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no patches"):
        PatchMeanFeatures.from_conv(nn.Conv2d(3, 4, 5))(torch.zeros(2, 3, 3, 3))
    with pytest.raises(ValueError, match="dims"):
        PatchMeanFeatures(3, 1, (3,), (1,), ((0, 0),), (1,))
    with pytest.raises(ValueError, match="padding_mode"):
        PatchMeanFeatures(1, 1, (3,), (1,), ((0, 0),), (1,), padding_mode="mirror")
    with pytest.raises(ValueError, match="kernel_size"):
        PatchMeanFeatures(2, 1, (3,), (1, 1), ((0, 0), (0, 0)), (1, 1))
    with pytest.raises(TypeError, match=r"Conv1d or nn\.Conv2d"):
        PatchMeanFeatures.from_conv(nn.Linear(3, 4))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The patch-mean kernel against wide CNN NTKs
# ---------------------------------------------------------------------------------------------


class _WideCNN(nn.Module):
    """``Conv2d(3, m, 3, padding=1) → ReLU → (GAP | flatten) → Linear(·, 1)``, NTK parameterisation."""

    def __init__(self, width: int, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.pool = pool
        self.readout = nn.Linear(width if pool else width * 64, 1, bias=False)
        nn.init.normal_(self.conv.weight)  # N(0, 1) weights, 1/√fan_in in forward: the kernel converges
        nn.init.normal_(self.readout.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x) / math.sqrt(27))
        h = h.mean(dim=(2, 3)) if self.pool else h.flatten(1)
        return self.readout(h) / math.sqrt(self.readout.in_features)


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    """8×8×3 spatially correlated inputs: white noise blurred by a 5×5 binomial filter (periodic)."""
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    blur = (taps[:, None] * taps[None, :] / 256).expand(3, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="circular"), blur, groups=3)


def _cnn_ntk(pool: bool, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = _WideCNN(4096, pool)
    x = _smooth_images(24, 100 + seed)
    return model, x, empirical_ntk(model, x)


def test_patch_mean_kernel_fits_the_ntk_of_a_wide_cnn_with_global_average_pooling() -> None:
    model, x, theta = _cnn_ntk(pool=True)
    features = PatchMeanFeatures.from_conv(model.conv)
    rows = features(x)
    patch = fit_affine_kernel(theta, rows)
    flat = fit_affine_kernel(theta, x)
    assert patch.rel_error_centered is not None and flat.rel_error_centered is not None
    # Measured on 5 seeds at widths 4096 and 16384: centred error 0.06-0.12 with patch means
    # (unchanged by the 4× width, so the residual is the infinite-width kernel's non-linear part,
    # not 1/√m noise), 0.50-0.68 with flat inputs. 0.2 leaves a margin above the worst seed and
    # still far below flat.
    assert patch.rel_error_centered < 0.2
    assert flat.rel_error_centered > 3 * patch.rel_error_centered
    # the data kernel really is P̄P̄ᵀ/d_patch, d_patch = 27
    fitted = AffineKernel(patch.a, patch.b, patch.c).matrix(rows)
    p = rows.double().numpy()
    expected = patch.a * p @ p.T / 27 + patch.b + patch.c * np.eye(24)
    np.testing.assert_allclose(fitted.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("pool", "expected"), [(True, "patch_mean"), (False, "flat")])
@pytest.mark.parametrize("form", ["dense", "matrix_free"])
def test_auto_picks_the_data_kernel_the_architecture_implies(pool: bool, expected: str, form: str) -> None:
    """GAP keeps only the mean patch; flatten keeps every position (≈ the flat kernel). Measured on
    5 seeds, centred errors flat/patch-mean: GAP 0.50-0.68 / 0.06-0.12, flatten 0.12-0.17 / 0.43-0.54."""
    model, x, theta = _cnn_ntk(pool)
    candidates = data_kernel_candidates("auto", model, x)
    assert [name for name, _ in candidates] == ["flat", "patch_mean"]
    op = SymmetricOperator.dense(theta, "ntk")
    if form == "dense":
        fit = fit_affine_kernel
    else:
        products = SymmetricOperator.from_products(lambda u: op(u), 24, "ntk")

        def fit(_: SymmetricOperator, rows: torch.Tensor) -> AffineKernel:
            return fit_affine_kernel_matrix_free(products, rows, trace=float(theta.trace()))

    choice = choose_data_kernel(op, candidates, x, fit=fit)
    assert choice.name == expected
    assert set(choice.scores) == {"flat", "patch_mean"}
    other = "flat" if expected == "patch_mean" else "patch_mean"
    assert choice.scores[other][1] > 2 * choice.scores[expected][1]
    assert choice.scores[expected] == (choice.kernel.rel_error, choice.kernel.rel_error_centered)
    assert all(0.0 < value < 1.0 for score in choice.scores.values() for value in score)
    assert choice.summary() == (
        f"data kernel: {expected} (centred fit error {choice.scores[expected][1]:.2g}; "
        f"{other} {choice.scores[other][1]:.2g})"
    )
    assert isinstance(choice.features_fn, PatchMeanFeatures) == (expected == "patch_mean")


# ---------------------------------------------------------------------------------------------
# first_convolution
# ---------------------------------------------------------------------------------------------


class _OutOfOrder(nn.Module):
    """Registers ``conv_b`` before ``conv_a``; the forward pass runs ``conv_a`` first.

    The dropout in front is the identity in eval mode only: in train mode it would both draw random
    numbers and hand ``conv_a`` a transformed input.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv_b = nn.Conv2d(4, 4, 1)
        self.drop = nn.Dropout(0.5)
        self.conv_a = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_b(torch.relu(self.conv_a(self.drop(x)))).mean(dim=(2, 3))


class _Stem(nn.Module):
    def __init__(self, transform: bool) -> None:
        super().__init__()
        self.transform = transform
        self.conv = nn.Conv2d(2, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x * 2.0 if self.transform else x.clone()).flatten(1)


def test_first_convolution_is_the_first_one_executed_and_leaves_no_trace() -> None:
    model = _OutOfOrder()
    model.train()
    model.conv_b.eval()  # a per-module flag that must survive
    x = torch.randn(5, 2, 6, 6)
    model(x).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert first_convolution(model, x) is model.conv_a
    assert torch.equal(torch.get_rng_state(), state[0])
    assert random.getstate() == state[1] and np.array_equal(np.random.get_state()[1], state[2])
    assert model.training and model.drop.training and not model.conv_b.training
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name])
    assert all(not conv._forward_pre_hooks for conv in (model.conv_a, model.conv_b))  # hooks removed


def test_first_convolution_none_for_mlp_and_transformed_inputs() -> None:
    x = torch.randn(4, 2, 5, 5)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(50, 3))
    assert first_convolution(mlp, x) is None
    assert first_convolution(_Stem(transform=True), x) is None  # the conv sees 2·x
    stem = _Stem(transform=False)
    assert first_convolution(stem, x) is stem.conv  # a copy of the inputs still counts
    assert first_convolution(stem, {"image": x}) is None  # not a tensor: no patches to take
    with pytest.raises(TypeError, match=r"nn\.Module"):
        first_convolution(lambda t: t, x)  # type: ignore[arg-type]


def test_first_convolution_stops_the_forward_at_the_conv() -> None:
    calls = []
    head = nn.Linear(3 * 9, 2)
    head.register_forward_hook(lambda *_: calls.append("head"))
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), head)
    assert first_convolution(model, torch.randn(6, 1, 5, 5)) is model[0]
    assert calls == []  # the rest of the network never ran


# ---------------------------------------------------------------------------------------------
# data_kernel_candidates and choose_data_kernel
# ---------------------------------------------------------------------------------------------


def test_data_kernel_candidates() -> None:
    x = torch.randn(3, 1, 6, 6)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    assert DATA_KERNELS == ("auto", "flat", "patch_mean", "token_counts", "token_one_hot")
    assert data_kernel_candidates("flat", cnn, x) == [("flat", None)]
    assert data_kernel_candidates("patch_mean", cnn, x) == [
        ("patch_mean", PatchMeanFeatures.from_conv(cnn[0]))
    ]
    assert data_kernel_candidates("auto", cnn, x) == [
        ("flat", None),
        ("patch_mean", PatchMeanFeatures.from_conv(cnn[0])),
    ]
    assert data_kernel_candidates("auto", mlp, x) == [("flat", None)]

    def fn(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1)

    assert data_kernel_candidates(fn, mlp, x) == [("callable", fn)]
    patch = PatchMeanFeatures.from_conv(cnn[0])
    assert data_kernel_candidates(patch, mlp, x) == [("patch_mean", patch)]
    with pytest.raises(ValueError, match=r"no convolution applied to its inputs.*data_kernel='flat'"):
        data_kernel_candidates("patch_mean", mlp, x)
    with pytest.raises(ValueError, match=r"unknown data_kernel 'patches'.*'auto', 'flat', 'patch_mean'"):
        data_kernel_candidates("patches", mlp, x)
    with pytest.raises(TypeError, match=r"data_kernel.*int"):
        data_kernel_candidates(3, mlp, x)


def _scored_fit(scores: dict[int, float | None]):
    """A stand-in ``fit`` whose kernel's centred error is looked up by the feature width."""

    def fit(_: SymmetricOperator, rows: torch.Tensor) -> AffineKernel:
        score = scores[rows.shape[1]]
        if score is None:
            raise ValueError("not identifiable")
        return AffineKernel(1.0, 0.0, 0.0, rel_error=0.5, rel_error_centered=score)

    return fit


@pytest.mark.parametrize(
    ("flat", "patch", "callable_", "winner"),
    [
        (0.3, 0.3, 0.5, "flat"),  # a tie goes to flat
        (math.nan, 0.4, math.nan, "patch_mean"),  # NaN never beats a number
        (math.nan, math.nan, math.nan, "flat"),  # all NaN: flat
        (0.5, 0.2, 0.1, "callable"),
        (None, 0.7, None, "patch_mean"),  # failed fits are skipped
    ],
)
def test_choose_data_kernel_ranking(
    flat: float | None, patch: float | None, callable_: float | None, winner: str
) -> None:
    x = torch.randn(5, 2, 3)  # flat rows have width 6; the others below 4 and 2
    candidates = [
        ("patch_mean", lambda t: t[:, 0, :2].repeat(1, 2)),
        ("flat", None),
        ("callable", lambda t: t[:, 0, :2]),
    ]
    op = SymmetricOperator.dense(torch.eye(5, dtype=torch.float64))
    choice = choose_data_kernel(op, candidates, x, fit=_scored_fit({6: flat, 4: patch, 2: callable_}))
    assert choice.name == winner
    assert list(choice.scores) == ["patch_mean", "flat", "callable"]
    if flat is None:
        assert all(math.isnan(v) for v in choice.scores["flat"])


def test_choose_data_kernel_errors() -> None:
    x = torch.randn(5, 3)
    op = SymmetricOperator.dense(torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="not identifiable"):
        choose_data_kernel(op, [("flat", None)], x, fit=_scored_fit({3: None}))
    with pytest.raises(ValueError, match="empty"):
        choose_data_kernel(op, [], x, fit=_scored_fit({}))
    choice = choose_data_kernel(op, [("flat", None)], x, fit=_scored_fit({3: math.nan}))
    assert choice.summary() == "data kernel: flat (centred fit error n/a)"


def test_a_choice_survives_a_checkpoint_as_plain_values() -> None:
    """Patch geometry comes back equal (and gives the same features); a callable must be handed in again."""
    conv = torch.nn.Conv2d(3, 4, (3, 2), stride=2, padding=1, dilation=2)
    features = PatchMeanFeatures.from_conv(conv)
    kernel = AffineKernel(1.0, 0.5, 0.1)
    choice = DataKernelChoice("patch_mean", features, kernel, {"flat": (0.1, 0.5), "patch_mean": (0.05, 0.1)})
    state = torch.load(_saved(choice.state_dict()), weights_only=True)
    restored = features_from_state(state, "auto")
    assert restored == features
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(restored(x), features(x))
    assert features_from_state(DataKernelChoice.flat_state(), "auto") is None
    callable_state = DataKernelChoice("callable", torch.flatten, kernel, {}).state_dict()
    assert features_from_state(callable_state, torch.flatten) is torch.flatten
    with pytest.raises(ValueError, match="same callable"):
        features_from_state(callable_state, "auto")


def _saved(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


# ------------------------------------------------------------------------------------ token inputs


def _token_model(vocab: int = 7) -> nn.Module:
    return nn.Sequential(nn.Embedding(vocab, 4), nn.Flatten(), nn.Linear(12, 2))


def test_token_features_give_the_token_overlap_kernels() -> None:
    """⟨counts(x), counts(x')⟩ = Σ_{l,l'} [t_l = t'_l'] and ⟨one_hot(x), one_hot(x')⟩ = Σ_l [t_l = t'_l],
    counted by brute force."""
    from lin_probe.kernel.data_kernels import TokenFeatures

    tokens = torch.tensor([[1, 2, 2], [2, 5, 1], [0, 0, 6]])
    counts, one_hot = TokenFeatures(7, "counts")(tokens), TokenFeatures(7, "one_hot")(tokens)
    for i in range(3):
        for j in range(3):
            overlap = sum(int(a == b) for a in tokens[i] for b in tokens[j])
            aligned = sum(int(a == b) for a, b in zip(tokens[i], tokens[j], strict=True))
            assert float(counts[i] @ counts[j]) == overlap
            assert float(one_hot[i] @ one_hot[j]) == aligned
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        TokenFeatures(7)(torch.tensor([[7]]))


def test_auto_on_token_inputs_offers_both_token_kernels_over_the_embedding_vocabulary() -> None:
    from lin_probe.kernel.data_kernels import TokenFeatures

    tokens = torch.randint(0, 7, (5, 3))
    names = [name for name, _ in data_kernel_candidates("auto", _token_model(), tokens)]
    assert names == ["token_counts", "token_one_hot"]
    (only,) = data_kernel_candidates("token_counts", _token_model(), tokens)
    assert only[1] == TokenFeatures(7, "counts")
    with pytest.raises(TypeError, match=r"no nn\.Embedding"):
        data_kernel_candidates("auto", nn.Linear(3, 1), tokens)
