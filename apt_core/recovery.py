"""A state a diverging run can go back to.

When the loss turns NaN, the weights of the step before are usually already exploded (finite but
huge): resuming from them, even at a lower learning rate, hits NaN again at once. `HealthyState`
keeps, every few steps, a CPU copy of the training state whose LoRA weights are finite and not far
larger than at the previous copy; on a failure the trainer keeps the current state only if its
weights pass the same test, and this copy otherwise.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

GROWTH = 4.0  # weight norm more than this many times the last healthy one's: diverged


def total_norm(params: Iterable[torch.Tensor]) -> float:
    """L2 norm of all the tensors together (one device sync); inf/nan when any value is."""
    norms = [p.detach().float().norm() for p in params]
    return float(torch.stack(norms).norm()) if norms else 0.0


def cpu_copy(value: Any) -> Any:
    """The same nested dict/list/tuple with every tensor cloned to the CPU."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value)
    return value


class HealthyState:
    def __init__(self, every: int = 10):
        self.every = every
        self.step: int | None = None
        self.norm: float | None = None
        self.state: dict | None = None

    def healthy(self, params: Iterable[torch.Tensor]) -> bool:
        """Finite weights, not GROWTH times larger than at the last healthy copy."""
        n = total_norm(params)
        return math.isfinite(n) and (self.norm is None or n <= GROWTH * max(self.norm, 1e-12))

    def after_step(self, step: int, params: list[torch.Tensor], state: Callable[[], dict]) -> None:
        """Every `every` steps: keep a copy of `state()` when the weights are healthy."""
        if step % self.every == 0 and self.healthy(params):
            self.step, self.norm, self.state = step, total_norm(params), cpu_copy(state())
