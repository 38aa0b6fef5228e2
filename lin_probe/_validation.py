"""Input checks shared by the math modules.

Every public entry point funnels user data through here so that bad input fails early with a
message that says what to do, instead of surfacing later as a silent wrong number.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_finite(tensor: Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN or inf (a probe set with them poisons every kernel)."""
    if tensor.is_floating_point() or tensor.is_complex():
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            count = int(bad.sum())
            raise ValueError(
                f"`{name}` contains {count} NaN/inf value(s); remove or impute them before probing "
                "(for example `x = torch.nan_to_num(x)` or drop those rows)."
            )


def as_feature_matrix(
    inputs: Tensor, name: str = "inputs", min_rows: int = 1, *, check_values: bool = True
) -> Tensor:
    """Flatten ``inputs`` to the ``n × d`` matrix the data kernel ``XXᵀ/d`` is built from.

    Inputs of any shape are flattened per example (the leading dimension indexes examples).
    Integer inputs (token ids, class indices) have no meaningful ``xᵀx'``: they are refused with a
    pointer to ``features_fn``. ``check_values=False`` checks the type and shape alone, not for
    NaN/inf: reading a value back waits for an accelerator's queued work, which a per-step path
    (the shadow on every training batch) must not do; its non-finite results surface at the checks.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor with a leading batch dimension, got {type(inputs).__name__}."
        )
    if inputs.dim() < 1:
        raise ValueError(f"`{name}` must have a leading batch dimension, got a 0-d tensor.")
    if not inputs.is_floating_point():
        raise TypeError(
            f"`{name}` has dtype {inputs.dtype}; the data kernel XXᵀ/d needs real-valued vectors. "
            "For integer or token inputs pass `features_fn`, a function mapping inputs to float "
            "feature vectors (e.g. an embedding lookup), and probe with its output."
        )
    if inputs.shape[0] < min_rows:
        raise ValueError(f"`{name}` has {inputs.shape[0]} example(s); at least {min_rows} are needed.")
    if check_values:
        check_finite(inputs, name)
    return inputs.reshape(inputs.shape[0], -1)


def check_int(name: str, value: object, *, minimum: int) -> None:
    """Raise unless ``value`` is an ``int`` (``bool`` excluded) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def check_callable(name: str, fn: object) -> None:
    """Raise unless ``fn`` is ``None`` or callable (optional user hooks)."""
    if fn is not None and not callable(fn):
        raise TypeError(f"`{name}` must be callable or None, got {type(fn).__name__}.")
