"""Overfitting indicator of Adaptive Training Adjustment (ATA).

For each of B equal timestep bins keep exponential moving averages of the pretrained model's
denoising loss (EMA_pre) and the fine-tuned model's (EMA_ft), each initialised with the first
value seen in its bin, and report

    gamma_b = clamp(1 - exp(-S * (EMA_pre,b - EMA_ft,b)), 0, 1)       (0 for an unseen bin)

gamma near 1 means the fine-tuned model fits the references much better than the prior does,
i.e. it memorises them at that noise level.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .config import IndicatorConfig


def timestep_bins(timesteps: torch.Tensor, num_bins: int, num_train_timesteps: int) -> torch.Tensor:
    """Bin index of each timestep. timesteps: (B,) ints in [0, T) -> (B,) long in [0, num_bins)."""
    bins = torch.div(timesteps.long() * num_bins, num_train_timesteps, rounding_mode="floor")
    return bins.clamp_(0, num_bins - 1)


def gamma_from_gap(gap: float, scale: float) -> float:
    """gamma = clamp(1 - exp(-S * gap), 0, 1) for gap = EMA_pre - EMA_ft."""
    exponent = -scale * gap
    if exponent >= 0.0:  # the prior fits at least as well: no memorisation (and no overflow)
        return 0.0
    return 1.0 - math.exp(exponent)


class OverfittingIndicator:
    """Per-bin EMA state; plain Python floats so it is cheap, exact and trivially serialisable."""

    def __init__(self, config: IndicatorConfig | None = None):
        self.config = config or IndicatorConfig()
        n = self.config.num_bins
        self.ema_pre: list[float | None] = [None] * n
        self.ema_ft: list[float | None] = [None] * n
        self.counts: list[int] = [0] * n

    def bin_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_bins(timesteps, self.config.num_bins, self.config.num_train_timesteps)

    def gamma(self, b: int) -> float:
        pre, ft = self.ema_pre[b], self.ema_ft[b]
        if pre is None or ft is None:
            return 0.0
        return gamma_from_gap(pre - ft, self.config.scale)

    def gammas(self) -> list[float]:
        return [self.gamma(b) for b in range(self.config.num_bins)]

    def gamma_for(self, bins: torch.Tensor) -> torch.Tensor:
        """gamma of each sample's bin, as a (B,) float32 tensor (a constant: no gradient)."""
        table = torch.tensor(self.gammas(), dtype=torch.float32)
        return table[bins.cpu()]

    def update(self, bins: Sequence[int], loss_pre: Sequence[float], loss_ft: Sequence[float]) -> None:
        """One EMA update per bin per step, with the mean losses of that step's samples in the bin
        (the paper's EMA is per step: 4 samples of one bin in one step move it by alpha, not by
        1 - (1 - alpha)^4). bins, loss_pre, loss_ft: one entry per sample."""
        a = self.config.ema_alpha
        per_bin: dict[int, list[tuple[float, float]]] = {}
        for b, lp, lf in zip(bins, loss_pre, loss_ft):
            per_bin.setdefault(int(b), []).append((float(lp), float(lf)))
        for b, pairs in per_bin.items():
            lp = sum(p for p, _ in pairs) / len(pairs)
            lf = sum(f for _, f in pairs) / len(pairs)
            if self.ema_pre[b] is None:
                self.ema_pre[b], self.ema_ft[b] = lp, lf
            else:
                self.ema_pre[b] = (1.0 - a) * self.ema_pre[b] + a * lp
                self.ema_ft[b] = (1.0 - a) * self.ema_ft[b] + a * lf
            self.counts[b] += len(pairs)

    def state_dict(self) -> dict[str, Any]:
        return {"ema_pre": list(self.ema_pre), "ema_ft": list(self.ema_ft), "counts": list(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = self.config.num_bins
        if len(state["ema_pre"]) != n:
            raise ValueError(f"indicator state has {len(state['ema_pre'])} bins, settings say {n}.")
        self.ema_pre = [None if v is None else float(v) for v in state["ema_pre"]]
        self.ema_ft = [None if v is None else float(v) for v in state["ema_ft"]]
        self.counts = [int(c) for c in state["counts"]]
