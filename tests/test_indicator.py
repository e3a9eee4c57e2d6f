"""Overfitting indicator against hand-computed sequences (values worked out on paper)."""

import pytest
import torch

from apt_core.config import IndicatorConfig
from apt_core.indicator import OverfittingIndicator, gamma_from_gap, timestep_bins


def test_bins_split_1000_timesteps_into_10_equal_bins():
    t = torch.tensor([0, 99, 100, 499, 500, 998, 999])
    assert timestep_bins(t, 10, 1000).tolist() == [0, 0, 1, 4, 5, 9, 9]
    assert timestep_bins(torch.tensor([0, 249, 250, 999]), 4, 1000).tolist() == [0, 0, 1, 3]


def test_unseen_bins_have_gamma_zero():
    ind = OverfittingIndicator()
    assert ind.gammas() == [0.0] * 10
    ind.update([3], [0.5], [0.1])
    g = ind.gammas()
    assert g[3] == pytest.approx(1.0)  # gap 0.4 * S=1000 -> 1 - e^-400
    assert [x for i, x in enumerate(g) if i != 3] == [0.0] * 9


def test_ema_sequence_matches_hand_computation():
    ind = OverfittingIndicator(IndicatorConfig(num_bins=10, ema_alpha=0.1, scale=1000.0))
    # first value initialises the EMA: pre = ft = 0.010 -> gap 0 -> gamma 0
    ind.update([0], [0.010], [0.010])
    assert ind.gamma(0) == 0.0
    # EMA_pre = 0.9*0.010 + 0.1*0.012 = 0.0102 ; EMA_ft = 0.9*0.010 + 0.1*0.008 = 0.0098
    ind.update([0], [0.012], [0.008])
    assert ind.ema_pre[0] == pytest.approx(0.0102)
    assert ind.ema_ft[0] == pytest.approx(0.0098)
    assert ind.gamma(0) == pytest.approx(0.3296799539643607)  # 1 - e^-0.4
    # EMA_pre = 0.9*0.0102 + 0.1*0.02 = 0.01118 ; EMA_ft = 0.9*0.0098 + 0 = 0.00882 ; gap 0.00236
    ind.update([0], [0.02], [0.0])
    assert ind.gamma(0) == pytest.approx(0.9055797768036976)  # 1 - e^-2.36
    assert ind.counts[0] == 3


def test_indicator_scale_is_a_setting():
    ind = OverfittingIndicator(IndicatorConfig(scale=100.0))
    ind.update([5], [0.010], [0.010])
    ind.update([5], [0.012], [0.008])  # EMA_pre 0.0102, EMA_ft 0.0098
    assert ind.gamma(5) == pytest.approx(0.03921056084767682)  # 1 - e^-(100 * 0.0004)


def test_a_batch_moves_each_bins_ema_once_per_step_with_its_mean_losses():
    """The paper's EMA is per step: a batch of 4 samples in one bin moves the EMA by alpha = 0.1
    towards their mean (sample by sample it would move by 1 - 0.9^4 = 0.344)."""
    ind = OverfittingIndicator()  # alpha 0.1
    ind.update([3], [1.0], [1.0])
    ind.update([3, 3, 3, 3, 7], [2.0, 2.0, 3.0, 1.0, 5.0], [0.0, 0.0, 0.0, 0.0, 4.0])
    assert ind.ema_pre[3] == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)  # mean of 2, 2, 3, 1 is 2
    assert ind.ema_ft[3] == pytest.approx(0.9 * 1.0 + 0.1 * 0.0)
    assert (ind.ema_pre[7], ind.ema_ft[7]) == (5.0, 4.0)  # first value seen in a bin
    assert ind.counts[3] == 5 and ind.counts[7] == 1


def test_gamma_is_clamped_to_unit_interval_and_never_overflows():
    assert gamma_from_gap(-0.5, 1000.0) == 0.0  # prior fits better: clamp at 0, no exp overflow
    assert gamma_from_gap(0.0, 1000.0) == 0.0
    assert gamma_from_gap(10.0, 1000.0) == 1.0
    assert 0.0 < gamma_from_gap(1e-4, 1000.0) < 1.0


def test_gamma_for_returns_each_samples_bin_without_grad():
    ind = OverfittingIndicator()
    ind.update([0, 9], [0.012, 0.5], [0.0114, 0.5])
    g = ind.gamma_for(torch.tensor([0, 9, 4]))
    assert g.dtype == torch.float32 and not g.requires_grad
    assert g.tolist() == pytest.approx([1 - 2.718281828459045 ** -0.6, 0.0, 0.0], abs=1e-6)


def test_state_round_trip():
    ind = OverfittingIndicator()
    ind.update([1, 2, 1], [0.3, 0.2, 0.25], [0.1, 0.2, 0.2])
    other = OverfittingIndicator()
    other.load_state_dict(ind.state_dict())
    assert other.gammas() == ind.gammas() and other.counts == ind.counts
    with pytest.raises(ValueError):
        OverfittingIndicator(IndicatorConfig(num_bins=4)).load_state_dict(ind.state_dict())
