"""Adaptive augmentation: geometry of zoom-out/rotation, fill modes, and the gamma-driven probability."""

import pytest
import torch

from apt_core.augment import AugmentDraw, adaptive_augment, draw_augmentation, zoom_rotate
from apt_core.config import AugmentConfig


def one_hot_image(h=9, w=9, row=0, col=8, channels=1):
    x = torch.zeros(1, channels, h, w)
    x[0, :, row, col] = 1.0
    return x


def test_zoom_out_by_two_moves_a_pixel_halfway_to_the_centre():
    out = zoom_rotate(one_hot_image(), torch.tensor([2.0]), torch.tensor([0.0]))
    # centre (4, 4); (row 0, col 8) -> (4 + (0-4)/2, 4 + (8-4)/2) = (2, 6)
    assert out[0, 0, 2, 6] == pytest.approx(1.0, abs=1e-5)
    assert out.sum() == pytest.approx(1.0, abs=1e-4)


def test_rotation_is_counter_clockwise_in_degrees():
    out = zoom_rotate(one_hot_image(row=4, col=8), torch.tensor([1.0]), torch.tensor([90.0]))
    # the right-middle pixel turns to the top-middle
    assert out[0, 0, 0, 4] == pytest.approx(1.0, abs=1e-4)


def test_constant_fill_uses_the_given_per_channel_value_outside_the_shrunk_image():
    x = torch.ones(1, 4, 16, 16) * 5.0
    fill = torch.tensor([0.1, -0.2, 0.3, -0.4])
    out = zoom_rotate(x, torch.tensor([3.0]), torch.tensor([10.0]), "constant", fill)
    assert torch.allclose(out[0, :, 0, 0], fill, atol=1e-5)  # corner: nothing maps there
    assert torch.allclose(out[0, :, 8, 8], torch.full((4,), 5.0), atol=1e-4)  # centre keeps the image


def test_reflect_fill_leaves_no_constant_border():
    x = torch.arange(256.0).view(1, 1, 16, 16)
    out = zoom_rotate(x, torch.tensor([2.0]), torch.tensor([0.0]), "reflect")
    assert out[0, 0, 0, 0] != 0.0 and out.min() >= x.min() - 1e-3


def test_border_fill_extends_a_plain_background_without_a_frame():
    x = torch.full((1, 3, 16, 16), 0.7)
    x[:, :, 6:10, 6:10] = 5.0  # an object on a plain background
    out = zoom_rotate(x, torch.tensor([3.0]), torch.tensor([10.0]), "border")
    assert torch.allclose(out[0, :, 0, 0], torch.full((3,), 0.7), atol=1e-5)  # corner: background, not black
    assert torch.allclose(out[0, :, 0, :], torch.full((3, 16), 0.7), atol=1e-5)  # no frame along the edge
    assert out[0, 0, 8, 8] > 2.0  # the shrunk object is still in the centre


def test_draws_follow_the_configured_ranges_and_are_seeded():
    cfg = AugmentConfig(zoom_min=1.0, zoom_max=3.0, rotation_deg=15.0)
    d1 = draw_augmentation(1000, cfg, torch.Generator().manual_seed(1))
    d2 = draw_augmentation(1000, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(d1.zoom, d2.zoom) and torch.equal(d1.angle, d2.angle)
    assert d1.zoom.min() >= 1.0 and d1.zoom.max() <= 3.0 and abs(d1.zoom.mean() - 2.0) < 0.1
    assert d1.angle.abs().max() <= 15.0 and abs(d1.angle.mean()) < 1.0


def test_probability_is_min_of_gamma_and_p_max():
    coin = torch.tensor([0.05, 0.3, 0.6, 0.95])
    draw = AugmentDraw(coin, torch.full((4,), 2.0), torch.zeros(4))
    x = torch.randn(4, 4, 8, 8)
    _, applied = adaptive_augment(x, torch.zeros(4), AugmentConfig(), draw)
    assert applied.tolist() == [False] * 4  # gamma 0: never
    _, applied = adaptive_augment(x, torch.ones(4), AugmentConfig(p_max=0.5), draw)
    assert applied.tolist() == [True, True, False, False]  # capped at p_max
    out, applied = adaptive_augment(x, torch.tensor([0.1, 0.1, 1.0, 1.0]), AugmentConfig(), draw)
    assert applied.tolist() == [True, False, True, True]
    assert torch.equal(out[1], x[1]) and not torch.equal(out[0], x[0])


def test_empirical_rate_tracks_gamma():
    cfg = AugmentConfig()
    draw = draw_augmentation(4000, cfg, torch.Generator().manual_seed(0))
    _, applied = adaptive_augment(torch.zeros(4000, 1, 4, 4), torch.full((4000,), 0.3), cfg, draw)
    assert abs(applied.float().mean().item() - 0.3) < 0.03


def test_disabled_augmentation_returns_input_untouched():
    x = torch.randn(2, 4, 8, 8)
    draw = AugmentDraw(torch.zeros(2), torch.full((2,), 2.0), torch.zeros(2))
    out, applied = adaptive_augment(x, torch.ones(2), AugmentConfig(enabled=False), draw)
    assert out is x and not applied.any()
