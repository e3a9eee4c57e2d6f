"""What APT observes inside the UNet during one step, independent of the host's module layout.

A backbone adapter (diffusers or ComfyUI) calls `record_features` from forward hooks on the
up-block attention stages and `record_attention` from the few cross-attention layers that
compute explicit probabilities. The prior pass stores detached statistics and probabilities.
The fine-tuned pass only keeps references to its tensors and `losses()` computes the terms after
the forward: no extra op runs inside the host's forward, so a gradient-checkpointed block
recomputes exactly what it computed the first time.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from .regularizers import aa_layer_loss, channel_stats, mean_or_zero, rs_layer_loss


class AptProbe:
    def __init__(self, rs: bool, aa: bool, aa_distance: str = "kl", aa_head_average: bool = False):
        self.rs = rs
        self.aa = aa
        self.aa_distance = aa_distance
        self.aa_head_average = aa_head_average
        # Hooked attention layers compute explicit probabilities while this is set. It stays set
        # through backward so gradient-checkpoint recomputation follows the same kernels.
        self.explicit_attention = False
        self.phase: str | None = None  # "prior" | "ft" while a forward pass is being recorded
        self.token_mask: torch.Tensor | None = None
        self._prior_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prior_probs: dict[str, torch.Tensor] = {}
        self._ft_features: list[tuple[str, torch.Tensor]] = []
        self._ft_probs: list[tuple[str, torch.Tensor]] = []

    @property
    def active(self) -> bool:
        return self.rs or self.aa

    def begin_step(self, token_mask: torch.Tensor) -> None:
        """token_mask: (B, K) bool, True for real prompt tokens."""
        self._clear()
        self.token_mask = token_mask
        self.explicit_attention = self.aa

    def end_step(self) -> None:
        self.explicit_attention = False
        self.phase = None
        self._clear()

    def _clear(self) -> None:
        self._prior_stats.clear()
        self._prior_probs.clear()
        self._ft_features, self._ft_probs = [], []

    @contextmanager
    def recording(self, phase: str) -> Iterator[None]:
        assert phase in ("prior", "ft")
        self.phase = phase
        try:
            yield
        finally:
            self.phase = None

    def record_features(self, name: str, features: torch.Tensor) -> None:
        """features: (B, C, H, W) or (B, N, C) output of an up-block attention stage."""
        if not self.rs or self.phase is None:
            return
        if self.phase == "prior":
            mean, std = channel_stats(features)
            self._prior_stats[name] = (mean.detach(), std.detach())
        else:
            self._ft_features.append((name, features))

    def record_attention(self, name: str, probs: torch.Tensor) -> None:
        """probs: (B, heads, Q, K) cross-attention probabilities of a hooked layer."""
        if not self.aa or self.phase is None:
            return
        if self.phase == "prior":
            self._prior_probs[name] = probs.detach()
        else:
            self._ft_probs.append((name, probs))

    def prior_stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The prior pass's detached (B, C) channel means and stds per hooked stage, this step."""
        return dict(self._prior_stats)

    def rs_layer_terms(self) -> list[tuple[str, torch.Tensor]]:
        """(layer name, L_mu + L_sigma) for each up-block stage hooked in the fine-tuned pass."""
        return [(n, rs_layer_loss(channel_stats(f), self._prior_stats[n])) for n, f in self._ft_features]

    def losses(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_mu + L_sigma, L_AA) averaged over hooked layers, before the lambda weights.

        Layers seen in the fine-tuned pass but not in the prior pass are an adapter bug.
        """
        rs_terms = [term for _, term in self.rs_layer_terms()]
        assert self.token_mask is not None or not self._ft_probs, "begin_step(token_mask) first"
        aa_terms = [aa_layer_loss(p, self._prior_probs[n], self.token_mask, self.aa_distance,
                                  self.aa_head_average) for n, p in self._ft_probs]
        # The loss graph keeps what backward needs of the prior's maps; the raw maps can go now
        # rather than at end_step (at SDXL 1024 they are ~0.26 GB held through backward).
        self._prior_probs.clear()
        return mean_or_zero(rs_terms, device), mean_or_zero(aa_terms, device)


def explicit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T * scale) V with the probabilities returned.

    query: (B, h, Q, d); key, value: (B, h, K, d) -> (out (B, h, Q, d), probs (B, h, Q, K)).
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    probs = scores.float().softmax(dim=-1)
    out = torch.matmul(probs.to(value.dtype), value)
    return out, probs


def recorded_attention(probe: AptProbe, name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       heads: int, scale: float) -> torch.Tensor:
    """Cross-attention with its probabilities recorded under `name`: what both backbones' attn2
    hooks run while the probe asks for explicit attention.

    query: (B, Q, heads * d); key, value: (B, K, heads * d), already projected -> (B, Q, heads * d).
    """
    b, dim_head = query.shape[0], query.shape[-1] // heads
    q, k, v = (x.view(b, -1, heads, dim_head).transpose(1, 2) for x in (query, key, value))
    out, probs = explicit_attention(q, k, v, scale)
    probe.record_attention(name, probs)
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head).to(q.dtype)


# Class names in diffusers' UNet2DConditionModel and ComfyUI's UNetModel.
_STAGES = ("Transformer2DModel", "SpatialTransformer", "SpatialVideoTransformer")
_DOWNSAMPLERS = ("Downsample2D", "Downsample")
_UPSAMPLERS = ("Upsample2D", "Upsample")


def decoder_stages(encoder: Iterable[nn.Module], decoder: Iterable[nn.Module], prefix: str,
                   factors: tuple[int, ...]) -> list[tuple[str, nn.Module]]:
    """(name, transformer stage) of each decoder stage whose latent downsampling factor is in
    `factors`, for either host's UNet: its encoder and decoder blocks in forward order.

    The factor starts at 2 ** (downsamplers in the encoder) and halves after each decoder block
    that upsamples. SDXL: 4 (32x32 at 1024 px) for the first decoder level, then 2, then 1.
    Names: f"{prefix}.{block index}.{path in the block}", e.g. up_blocks.0.attentions.1 or
    output_blocks.1.1.
    """
    def has(module: nn.Module, classes: tuple[str, ...]) -> bool:
        return any(type(m).__name__ in classes for m in module.modules())

    factor = 2 ** sum(has(block, _DOWNSAMPLERS) for block in encoder)
    picked = []
    for i, block in enumerate(decoder):
        if factor in factors:
            picked += [(f"{prefix}.{i}.{name}", m) for name, m in block.named_modules()
                       if type(m).__name__ in _STAGES]
        if has(block, _UPSAMPLERS):
            factor //= 2
    return picked
