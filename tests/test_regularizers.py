"""RS and AA loss formulas against hand-computed values."""

import pytest
import torch

from apt_core.regularizers import aa_layer_loss, channel_stats, mean_or_zero, rs_layer_loss


def test_channel_stats_over_positions():
    f = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]], [[2.0, 2.0], [2.0, 2.0]]]])  # (1, 2, 2, 2)
    mu, sd = channel_stats(f)
    assert mu.tolist() == [[4.0, 2.0]]
    # population std of 1,3,5,7 = sqrt(5)
    assert sd[0, 0].item() == pytest.approx(5 ** 0.5, rel=1e-5)
    assert sd[0, 1].item() == pytest.approx(1e-3, rel=1e-3)  # sqrt(0 + 1e-6)
    tokens = f.flatten(2).transpose(1, 2)  # (B, N, C) layout gives the same statistics
    mu2, sd2 = channel_stats(tokens)
    assert torch.allclose(mu, mu2) and torch.allclose(sd, sd2)


def test_rs_layer_loss_is_mse_of_means_plus_mse_of_stds():
    ft = (torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]]))
    pre = (torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 1.0]]))
    # means: ((1)^2 + (2)^2)/2 = 2.5 ; stds: ((-2)^2 + 0)/2 = 2.0
    assert rs_layer_loss(ft, pre).item() == pytest.approx(4.5)


def test_aa_mse_excludes_padding_tokens():
    a_ft = torch.tensor([[[[0.5, 0.3, 0.2, 0.0]]]])  # (B=1, h=1, Q=1, K=4)
    a_pre = torch.tensor([[[[0.3, 0.3, 0.1, 0.3]]]])
    mask = torch.tensor([[True, True, True, False]])
    # (0.2^2 + 0 + 0.1^2) / 3 valid tokens = 0.05 / 3
    assert aa_layer_loss(a_ft, a_pre, mask).item() == pytest.approx(0.05 / 3)
    # with every token valid the padding difference (0.3^2) counts: (0.05 + 0.09) / 4
    assert aa_layer_loss(a_ft, a_pre, torch.ones(1, 4, dtype=torch.bool)).item() == pytest.approx(0.14 / 4)


def test_aa_head_average_and_kl():
    a_ft = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # two heads that disagree
    a_pre = torch.tensor([[[[0.5, 0.5]], [[0.5, 0.5]]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert aa_layer_loss(a_ft, a_pre, mask).item() == pytest.approx(0.25)
    assert aa_layer_loss(a_ft, a_pre, mask, head_average=True).item() == pytest.approx(0.0)
    same = aa_layer_loss(a_pre, a_pre, mask, distance="kl").item()
    assert same == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([[[[0.75, 0.25]]]])
    q = torch.tensor([[[[0.5, 0.5]]]])
    kl = 0.75 * torch.log(torch.tensor(0.75 / 0.5)) + 0.25 * torch.log(torch.tensor(0.25 / 0.5))
    assert aa_layer_loss(q, p, torch.ones(1, 2, dtype=torch.bool), distance="kl").item() == pytest.approx(kl.item(), rel=1e-4)


def test_gradients_flow_only_into_the_fine_tuned_side():
    ft = torch.rand(1, 1, 2, 3, requires_grad=True)
    pre = torch.rand(1, 1, 2, 3, requires_grad=True)
    aa_layer_loss(ft.softmax(-1), pre.softmax(-1), torch.ones(1, 3, dtype=torch.bool)).backward()
    assert ft.grad is not None and pre.grad is None


def test_mean_or_zero():
    assert mean_or_zero([]).item() == 0.0
    assert mean_or_zero([torch.tensor(1.0), torch.tensor(3.0)]).item() == 2.0


def test_aa_kl_leaves_free_tokens_out():
    """The trigger word's share is free; the other tokens keep the prior's proportions."""
    from apt_core.conditioning import SDXLConditioning
    a_ft = torch.tensor([[[[0.1, 0.6, 0.2, 0.1]]]])  # BOS, sks, dog, EOS
    a_pre = torch.tensor([[[[0.2, 0.2, 0.4, 0.2]]]])
    real = torch.ones(1, 4, dtype=torch.bool)
    cond = SDXLConditioning(torch.zeros(1, 4, 1), torch.zeros(1, 1), torch.zeros(1, 6), real,
                            free_tokens=torch.tensor([[False, True, False, False]]))
    assert cond.aligned_tokens.tolist() == [[True, False, True, True]]
    # over BOS, dog, EOS: ft (0.1, 0.2, 0.1)/0.4 = (0.25, 0.5, 0.25) = pre (0.2, 0.4, 0.2)/0.8
    assert aa_layer_loss(a_ft, a_pre, cond.aligned_tokens, distance="kl").item() == pytest.approx(0.0, abs=1e-6)
    # all tokens: KL(pre || ft) = 0.2 ln 2 + 0.2 ln(1/3) + 0.4 ln 2 + 0.2 ln 2
    full = 0.8 * torch.log(torch.tensor(2.0)) + 0.2 * torch.log(torch.tensor(1 / 3))
    assert aa_layer_loss(a_ft, a_pre, real, distance="kl").item() == pytest.approx(full.item(), rel=1e-4)
    # MSE over the 3 aligned tokens: (0.1^2 + 0.2^2 + 0.1^2) / 3
    assert aa_layer_loss(a_ft, a_pre, cond.aligned_tokens).item() == pytest.approx(0.06 / 3)
    both = SDXLConditioning.cat([cond, SDXLConditioning(*(getattr(cond, k) for k in
                                                          ("context", "pooled", "time_ids", "token_mask")))])
    assert both.aligned_tokens.tolist() == [[True, False, True, True], [True] * 4]


def test_word_token_mask_marks_every_occurrence_of_multi_token_words():
    from apt_core.conditioning import word_token_mask
    ids = torch.tensor([[49406, 5, 6, 7, 5, 6, 49407, 0], [49406, 5, 7, 6, 49407, 0, 0, 0]])
    mask = word_token_mask(ids, [[5, 6], [], [7]])
    assert mask.nonzero().tolist() == [[0, 1], [0, 2], [0, 3], [0, 4], [0, 5], [1, 2]]
    assert not word_token_mask(ids, []).any()


def _kl_direct(a_ft, a_pre, mask, eps=1e-8):
    """The KL as first written: both maps renormalised explicitly (the reference)."""
    m = mask[:, None, None, :].float()
    p = a_pre * m
    p = p / p.sum(-1, keepdim=True).clamp(min=eps)
    r = a_ft * m
    r = r / r.sum(-1, keepdim=True).clamp(min=eps)
    return (p * ((p + eps).log() - (r + eps).log()) * m).sum(-1).mean()


def _saved_bytes(fn):
    """Bytes of distinct tensors autograd keeps for backward while fn() builds its graph."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_aa_kl_matches_the_direct_formula_and_keeps_less_for_backward():
    g = torch.Generator().manual_seed(0)
    # attention-like maps (every probability far above the eps guard)
    scores = torch.randn(2, 3, 64, 12, generator=g) * 1.5
    a_pre = torch.randn(2, 3, 64, 12, generator=g).mul(1.5).softmax(-1)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 7:] = False  # padding in the first prompt
    mask[1, 2] = False  # a free token in the second
    results = []
    for loss_fn in (lambda a: aa_layer_loss(a, a_pre, mask, distance="kl"), lambda a: _kl_direct(a, a_pre, mask)):
        s = scores.clone().requires_grad_(True)
        a_ft = s.softmax(-1)
        loss, nbytes = _saved_bytes(lambda: loss_fn(a_ft))
        loss.backward()
        results.append((loss.detach(), s.grad, nbytes))
    (lean, g_lean, b_lean), (direct, g_direct, b_direct) = results
    assert lean.item() > 0.1
    assert torch.equal(lean, direct)  # the same operations forward; only backward is hand-written
    assert torch.allclose(g_lean, g_direct, rtol=1e-4, atol=1e-7)
    one_map = a_pre.numel() * 4
    # direct: r, r + eps and p; lean: p and a_ft (which the softmax that made it keeps anyway)
    # (and the (B, h, Q, 1) sums)
    assert b_direct >= 3 * one_map and b_lean <= 2.3 * one_map
    # a map with an exact zero where the prior has mass stays finite, as before
    zero = torch.tensor([[[[1.0, 0.0]]]], requires_grad=True)
    half = torch.tensor([[[[0.5, 0.5]]]])
    both = torch.ones(1, 2, dtype=torch.bool)
    loss = aa_layer_loss(zero, half, both, distance="kl")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zero.grad).all()
    assert loss.item() == pytest.approx(_kl_direct(zero.detach(), half, both).item(), rel=1e-6)
