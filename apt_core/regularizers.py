"""Representation Stabilization (RS) and Attention Alignment (AA) losses, as pure functions.

Reductions (project decisions, see README "APT settings"):
- RS compares per-sample, channel-wise mean and standard deviation over spatial positions and
  averages the squared differences over samples and channels (an MSE, so lambda_RS does not
  depend on the layer width), then over hooked layers.
- AA compares per-head attention probabilities over the real prompt tokens only (BOS .. EOS);
  "mse" averages the squared difference over heads, queries and valid tokens, "kl" averages
  KL(A_pre || A_ft) over heads and queries after renormalising both over the valid tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch


def channel_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise mean and std over positions. features: (B, C, H, W) or (B, N, C) -> 2 x (B, C) fp32.

    A 3-D input is taken as tokens (B, N, C), the layout of transformer hidden states.
    """
    f = features.float()
    if f.ndim == 4:
        f = f.flatten(2)  # (B, C, HW)
        dim = 2
    elif f.ndim == 3:
        dim = 1
    else:
        raise ValueError(f"expected (B, C, H, W) or (B, N, C) features, got shape {tuple(features.shape)}")
    var, mean = torch.var_mean(f, dim=dim, correction=0)
    return mean, (var + 1e-6).sqrt()


def rs_layer_loss(stats_ft: tuple[torch.Tensor, torch.Tensor],
                  stats_pre: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """L_mu + L_sigma of one layer: MSE between (B, C) means plus MSE between (B, C) stds."""
    mu_ft, sd_ft = stats_ft
    mu_pre, sd_pre = stats_pre
    return (mu_ft - mu_pre.detach()).pow(2).mean() + (sd_ft - sd_pre.detach()).pow(2).mean()


def aa_layer_loss(probs_ft: torch.Tensor, probs_pre: torch.Tensor, token_mask: torch.Tensor,
                  distance: str = "mse", head_average: bool = False) -> torch.Tensor:
    """Distance between cross-attention maps of one layer over the valid tokens.

    probs_*: (B, heads, Q, K) softmax over K; token_mask: (B, K) bool, True for real tokens.
    Returns a scalar fp32 tensor.
    """
    a_ft, a_pre = probs_ft.float(), probs_pre.detach().float()
    if head_average:
        a_ft, a_pre = a_ft.mean(1, keepdim=True), a_pre.mean(1, keepdim=True)
    mask = token_mask.to(a_ft.device)[:, None, None, :].to(a_ft.dtype)  # (B, 1, 1, K)
    b, h, q, _ = a_ft.shape
    if distance == "mse":
        valid_tokens = mask.sum(dim=-1, keepdim=True).clamp(min=1.0)  # (B, 1, 1, 1)
        per_query = ((a_ft - a_pre).pow(2) * mask).sum(-1, keepdim=True) / valid_tokens
        return per_query.mean()
    if distance == "kl":
        return _renormalised_kl(a_pre, a_ft, mask).mean()
    raise ValueError(f"unknown AA distance {distance!r}; use 'mse' or 'kl'")


def _renormalised_kl(a_pre: torch.Tensor, a_ft: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KL(p || r) per query, p and r the two maps renormalised over the valid tokens.
    a_*: (B, h, Q, K), mask: (B, 1, 1, K) float -> (B, h, Q)."""
    with torch.no_grad():
        p = a_pre * mask
        p = p / p.sum(-1, keepdim=True).clamp(min=eps)
    return _RenormalisedKL.apply(p, a_ft, mask, eps)


class _RenormalisedKL(torch.autograd.Function):
    """sum_k m_k p_k (log(p_k + eps) - log(r_k + eps)), r = a m / max(sum_k a_k m_k, eps).

    Autograd of that formula keeps three (B, h, Q, K) tensors for backward (r, r + eps, p); this
    keeps p and `a`, which the softmax that made `a` keeps anyway, and recomputes r in backward.
    At SDXL 1024 the hooked layers' maps hold ~66 M values: ~0.5 GB less at the peak.
    With s = sum_j a_j m_j and w = p m / (r + eps):
    dKL/da_k = -w_k / s + [s > eps] m_k / s^2 * sum_j w_j a_j.
    """

    @staticmethod
    def forward(ctx, p: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
        mass = (a * mask).sum(-1, keepdim=True)
        s = mass.clamp(min=eps)
        r = a * mask / s
        ctx.save_for_backward(p, a, mask, s, mass >= eps)
        ctx.eps = eps
        return (p * ((p + eps).log() - (r + eps).log()) * mask).sum(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, a, mask, s, s_active = ctx.saved_tensors
        w = p * mask / (a * mask / s + ctx.eps)
        through_s = s_active * mask / s.pow(2) * (w * a).sum(-1, keepdim=True)
        return None, grad.unsqueeze(-1) * (through_s - w / s), None, None


def mean_or_zero(terms: Sequence[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """Mean of scalar loss terms, or a zero scalar when there are none."""
    if not terms:
        return torch.zeros((), device=device)
    return torch.stack([t.float() for t in terms]).mean()
