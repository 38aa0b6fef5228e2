"""Named losses against hand-written formulas and ``torch.nn.functional``; validation; classification flag."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lin_probe.losses import infer_loss, is_classification, resolve_loss


def _data(n: int = 7, k: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, k, generator=gen)
    labels = torch.randint(0, k, (n,), generator=gen)
    probs = torch.softmax(torch.randn(n, k, generator=gen), dim=1)
    return logits, labels, probs


def test_mse_same_shape_is_mean_of_squares() -> None:
    pred, _, target = _data()
    value = resolve_loss("mse")(pred, target)
    assert torch.equal(value, F.mse_loss(pred, target))
    assert float(value) == pytest.approx(float(((pred - target) ** 2).sum()) / pred.numel(), rel=1e-6)


def test_mse_column_prediction_and_flat_target_are_paired_row_by_row() -> None:
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(6, 1, generator=gen), torch.randn(6, generator=gen)
    value = float(resolve_loss("mse")(pred, target))
    by_row = sum((float(pred[i, 0]) - float(target[i])) ** 2 for i in range(6)) / 6
    assert value == pytest.approx(by_row, rel=1e-6)
    with pytest.warns(UserWarning):  # what plain F.mse_loss does: broadcast to 6 × 6, another number
        broadcast = float(F.mse_loss(pred, target))
    assert abs(broadcast - by_row) > 1e-3


def test_mse_casts_target_to_prediction_dtype() -> None:
    pred = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    value = resolve_loss("mse")(pred, torch.tensor([0, 4]))  # integer targets, another shape
    assert value.dtype == torch.float64
    assert float(value) == pytest.approx((1.0 + 4.0) / 2)


def test_mse_refuses_different_number_of_elements() -> None:
    with pytest.raises(ValueError, match="different numbers of elements"):
        resolve_loss("mse")(torch.zeros(4, 2), torch.zeros(4))


@pytest.mark.parametrize("label_shape", ["flat", "column"])
def test_cross_entropy_with_class_indices(label_shape: str) -> None:
    logits, labels, _ = _data()
    target = labels if label_shape == "flat" else labels.reshape(-1, 1).int()
    value = resolve_loss("cross_entropy")(logits, target)
    manual = -torch.log_softmax(logits.double(), dim=1)[torch.arange(len(labels)), labels].mean()
    assert float(value) == pytest.approx(float(manual), rel=1e-6)
    assert torch.equal(value, F.cross_entropy(logits, labels))


def test_cross_entropy_with_class_probabilities() -> None:
    logits, _, probs = _data()
    value = resolve_loss("cross_entropy")(logits, probs.double())  # float64 soft targets, float32 logits
    manual = -(probs.double() * torch.log_softmax(logits.double(), dim=1)).sum(dim=1).mean()
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(manual), rel=1e-6)


def test_cross_entropy_refuses_wrong_number_of_labels() -> None:
    logits, labels, _ = _data()
    with pytest.raises(ValueError, match="one class index per example"):
        resolve_loss("cross_entropy")(logits, labels[:-1])


def test_cross_entropy_refuses_soft_targets_of_another_shape() -> None:
    logits, _, _ = _data()
    with pytest.raises(ValueError, match=r"class probabilities.*y\.long\(\)"):
        resolve_loss("cross_entropy")(logits, torch.zeros(len(logits)))


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'hinge'.*\['auto', 'cross_entropy', 'mse'\]"):
        resolve_loss("hinge")


@pytest.mark.parametrize("bad", [3, None, ["mse"]])
def test_non_callable_is_a_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="callable"):
        resolve_loss(bad)  # type: ignore[arg-type]


def test_callable_passes_through_unchanged() -> None:
    def huber(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.huber_loss(pred, target)

    module = nn.L1Loss()
    assert resolve_loss(huber) is huber
    assert resolve_loss(module) is module


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        ("cross_entropy", True),
        ("mse", False),
        (F.cross_entropy, True),
        (nn.CrossEntropyLoss(), True),
        (F.mse_loss, False),
        (nn.MSELoss(), False),
        (lambda p, t: F.cross_entropy(p, t), False),  # an arbitrary callable: unknown, not classification
    ],
    ids=["name-ce", "name-mse", "F.cross_entropy", "CrossEntropyLoss", "F.mse_loss", "MSELoss", "lambda"],
)
def test_is_classification(loss: object, expected: bool) -> None:
    assert is_classification(loss) is expected  # type: ignore[arg-type]


def test_is_classification_of_resolved_names() -> None:
    assert is_classification(resolve_loss("cross_entropy")) is True
    assert is_classification(resolve_loss("mse")) is False


def test_a_loss_class_instead_of_an_instance_is_refused_with_the_fix() -> None:
    with pytest.raises(TypeError, match=r"MSELoss\(\)"):
        resolve_loss(torch.nn.MSELoss)


# ------------------------------------------------------------------ loss="auto"


@pytest.mark.parametrize(
    ("targets", "outputs", "expected"),
    [
        (torch.tensor([0, 3, 1]), 4, "cross_entropy"),  # class ids, several logits
        (torch.tensor([[0], [3], [1]], dtype=torch.int32), 4, "cross_entropy"),  # (n, 1) int ids
        (torch.randn(3, 4), 4, "mse"),  # a float target per output
        (torch.randn(3), 1, "mse"),  # scalar regression, (n,) targets
        (torch.randn(3, 2, 5), 10, "mse"),  # multi-dimensional outputs, same count
    ],
)
def test_infer_loss_reads_the_targets_and_the_output_width(
    targets: Tensor, outputs: int, expected: str
) -> None:
    name, why = infer_loss(targets, outputs)
    assert name == expected
    assert str(outputs) in why


@pytest.mark.parametrize(
    ("targets", "outputs"),
    [
        (torch.tensor([0, 1, 1]), 1),  # integer labels, one logit: BCE-style, not ours to guess
        (torch.randn(3, 3), 4),  # floats of another size
        (torch.tensor([True, False, True]), 2),  # bool masks
    ],
)
def test_infer_loss_refuses_the_ambiguous_cases_and_names_loss(targets: Tensor, outputs: int) -> None:
    with pytest.raises(ValueError, match="`loss=`"):
        infer_loss(targets, outputs)


def test_infer_loss_without_targets_says_how_to_give_them() -> None:
    with pytest.raises(ValueError, match=r"probe=\(inputs, targets\)"):
        infer_loss(None, 3)


def test_auto_is_not_a_loss_function_until_resolved() -> None:
    with pytest.raises(ValueError, match="resolved at train start"):
        resolve_loss("auto")
