"""Shared input checks: what they accept, what they refuse and what the message says to do."""

from __future__ import annotations

import pytest
import torch

from lin_probe._validation import as_feature_matrix, check_callable, check_finite, check_int


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 2),
        torch.arange(6),
        torch.zeros(0),
        torch.tensor([1e38, -1e38]),
        torch.randn(2, 2).to(torch.cfloat),
    ],
    ids=["float", "int", "empty", "large", "complex"],
)
def test_check_finite_accepts_finite(tensor: torch.Tensor) -> None:
    check_finite(tensor, "x")


@pytest.mark.parametrize(
    ("values", "count"),
    [([1.0, float("nan"), 2.0], 1), ([float("inf"), float("-inf"), float("nan"), 0.0], 3)],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_check_finite_counts_nan_and_inf(values: list[float], count: int, dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=rf"^`probe inputs` contains {count} NaN/inf value\(s\)"):
        check_finite(torch.tensor(values, dtype=dtype), "probe inputs")


def test_check_finite_complex_with_nan() -> None:
    with pytest.raises(ValueError, match="1 NaN/inf"):
        check_finite(torch.tensor([complex(1, float("nan")), complex(0, 0)]), "z")


@pytest.mark.parametrize("shape", [(5,), (5, 3), (5, 2, 3), (5, 1, 4, 4)])
def test_as_feature_matrix_flattens_each_example(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    out = as_feature_matrix(x)
    width = 1
    for size in shape[1:]:
        width *= size
    assert out.shape == (5, width)
    for i in range(5):
        assert torch.equal(out[i], torch.tensor(x[i].tolist()).flatten())


def test_as_feature_matrix_keeps_dtype() -> None:
    assert as_feature_matrix(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64


def test_as_feature_matrix_refuses_non_tensors() -> None:
    with pytest.raises(TypeError, match=r"`feats` must be a torch\.Tensor.*got list"):
        as_feature_matrix([[1.0, 2.0]], "feats")  # type: ignore[arg-type]


def test_as_feature_matrix_refuses_scalars() -> None:
    with pytest.raises(ValueError, match="0-d"):
        as_feature_matrix(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_as_feature_matrix_points_integer_inputs_to_features_fn(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="features_fn"):
        as_feature_matrix(torch.zeros(3, 2, dtype=dtype))


def test_as_feature_matrix_min_rows() -> None:
    as_feature_matrix(torch.zeros(2, 3), min_rows=2)
    with pytest.raises(ValueError, match=r"has 1 example.*at least 2"):
        as_feature_matrix(torch.zeros(1, 3), min_rows=2)


def test_as_feature_matrix_refuses_non_finite() -> None:
    x = torch.zeros(3, 2, 2)
    x[1, 0, 1] = float("inf")
    with pytest.raises(ValueError, match="`inputs` contains 1 NaN/inf"):
        as_feature_matrix(x)


@pytest.mark.parametrize("value", [2, 3, 10**12])
def test_check_int_accepts_ints_at_or_above_minimum(value: int) -> None:
    check_int("n_probe", value, minimum=2)


@pytest.mark.parametrize("value", [True, False, 2.0, "3", None, torch.tensor(3)])
def test_check_int_refuses_non_ints(value: object) -> None:
    with pytest.raises(TypeError, match=r"^`n_probe` must be an int >= 2"):
        check_int("n_probe", value, minimum=2)


@pytest.mark.parametrize(("value", "minimum"), [(1, 2), (-1, 0), (0, 1)])
def test_check_int_refuses_below_minimum(value: int, minimum: int) -> None:
    with pytest.raises(ValueError, match=rf"^`every_n_steps` must be >= {minimum}, got {value}\.$"):
        check_int("every_n_steps", value, minimum=minimum)


def test_check_int_minimum_zero_accepts_zero() -> None:
    check_int("ntk_every_n_steps", 0, minimum=0)


@pytest.mark.parametrize("fn", [None, len, lambda x: x, torch.nn.Identity(), dict])
def test_check_callable_accepts_none_and_callables(fn: object) -> None:
    check_callable("output_fn", fn)


@pytest.mark.parametrize("fn", [3, "fn", [len]])
def test_check_callable_refuses_the_rest(fn: object) -> None:
    with pytest.raises(
        TypeError, match=rf"^`output_fn` must be callable or None, got {type(fn).__name__}\.$"
    ):
        check_callable("output_fn", fn)
