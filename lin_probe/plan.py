"""What the monitor may spend: the one settings object passed down to every NTK and spectral path.

Every cost knob lives here as a field with a documented default, instead of module globals that
callers (and tests) would patch: a ``ComputePlan`` is built once (by the callback, or by whoever
drives the core) and handed down, so two monitors in one process can use different budgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from lin_probe._validation import check_int

DEFAULT_MEMORY_BUDGET_BYTES: Final[int] = 1 << 30
"""Working memory of the NTK paths (Jacobian blocks, activations saved for backward): 1 GiB."""

DENSE_MAX_N: Final[int] = 4096
"""Largest probe for dense ``n × n`` kernels: above it ``eigvalsh`` (``O(n³)``) costs seconds per check."""

_DENSE_COPIES: Final[int] = 2
"""Float64 ``n × n`` buffers a dense check holds: the matrix and ``eigvalsh``'s working copy."""


@dataclass(frozen=True)
class ComputePlan:
    """Memory and size limits for one monitor.

    Attributes:
        memory_budget: bytes the NTK computation may use for its *working* memory (Jacobian blocks
            are chunked to fit); it does not bound the ``n × n`` result.
        kernel_budget: bytes the dense ``n × n`` float64 kernels of a check may take; decides dense
            vs matrix-free checks together with ``dense_max_n``. Deliberately separate from
            ``memory_budget``: a tiny working budget (to force chunking) must still give dense checks.
        dense_max_n: the largest probe that gets dense checks.
    """

    memory_budget: int = DEFAULT_MEMORY_BUDGET_BYTES
    kernel_budget: int = DEFAULT_MEMORY_BUDGET_BYTES
    dense_max_n: int = DENSE_MAX_N

    def __post_init__(self) -> None:
        check_int("memory_budget", self.memory_budget, minimum=1)
        check_int("kernel_budget", self.kernel_budget, minimum=1)
        check_int("dense_max_n", self.dense_max_n, minimum=1)

    @classmethod
    def resolve(cls, memory_budget: int | None, plan: ComputePlan | None) -> ComputePlan:
        """The plan from a ``memory_budget`` shorthand or a full ``plan`` (not both); defaults otherwise."""
        if memory_budget is None:
            return plan if plan is not None else cls()
        if plan is not None:
            raise ValueError("Pass `memory_budget` or `compute_plan`, not both.")
        return cls(memory_budget=memory_budget)

    def dense(self, n: int) -> bool:
        """Whether a probe of ``n`` examples gets dense kernels (exact ``eigvalsh``, an eigenvalue histogram).

        Dense when ``n ≤ dense_max_n`` and the float64 matrix plus ``eigvalsh``'s working copy,
        ``2·8·n²`` bytes, fits in a quarter of ``kernel_budget`` (room for the NTK computation around
        it). With the defaults both limits meet at ``n = 4096``. Otherwise checks are matrix-free
        (Lanczos on ``u ↦ Θu``).
        """
        check_int("n", n, minimum=1)
        return n <= self.dense_max_n and 4 * _DENSE_COPIES * 8 * n * n <= self.kernel_budget


__all__ = ["DEFAULT_MEMORY_BUDGET_BYTES", "DENSE_MAX_N", "ComputePlan"]
