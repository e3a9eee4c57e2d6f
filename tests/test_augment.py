"""Adaptive augmentation: geometry of zoom-out/rotation, fill modes, and the gamma-driven probability."""

import pytest
import torch

from apt_core.augment import (AugmentDraw, adaptive_augment, draw_augmentation, encode_variants, variant_grid,
                              variant_index, zoom_rotate)
from apt_core.conditioning import CachedDataset, CachedExample
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


# ---- pre-encoded pixel-space variants ------------------------------------------------------------

def test_variant_grid_holds_the_cell_centres_zoom_major():
    """Default 8 x 3 over zoom [1, 3] and angle [-15, 15]: cells 0.25 wide and 10 degrees wide."""
    grid = variant_grid(AugmentConfig())
    assert grid.shape == (24, 2)
    assert grid[:3].tolist() == [[1.125, -10.0], [1.125, 0.0], [1.125, 10.0]]
    assert grid[-1].tolist() == [2.875, 10.0]
    assert grid[::3, 0].tolist() == [1.125, 1.375, 1.625, 1.875, 2.125, 2.375, 2.625, 2.875]


def test_variant_grid_collapses_a_range_of_width_zero():
    no_rotation = variant_grid(AugmentConfig(rotation_deg=0.0, variant_grid=(4, 3)))
    assert no_rotation.tolist() == [[1.25, 0.0], [1.75, 0.0], [2.25, 0.0], [2.75, 0.0]]
    assert variant_grid(AugmentConfig(zoom_min=2.0, zoom_max=2.0, variant_grid=(4, 2))).tolist() == \
        [[2.0, -7.5], [2.0, 7.5]]


def test_variant_index_picks_the_cell_that_holds_the_draw():
    cfg = AugmentConfig()  # zoom cells [1, 1.25), [1.25, 1.5) ...; angle cells [-15, -5), [-5, 5), [5, 15]
    zoom = torch.tensor([1.0, 1.2499, 1.25, 2.99, 3.0, 2.0])
    angle = torch.tensor([-15.0, -5.01, -4.99, 5.01, 15.0, 0.0])
    draw = AugmentDraw(torch.zeros(6), zoom, angle)
    # zoom cells 0, 0, 1, 7, 7, 4; angle cells 0, 0, 1, 2, 2, 1; k = zoom_cell * 3 + angle_cell
    assert variant_index(draw, cfg).tolist() == [0, 0, 4, 23, 23, 13]
    grid = variant_grid(cfg)
    centres = AugmentDraw(torch.zeros(24), grid[:, 0], grid[:, 1])
    assert variant_index(centres, cfg).tolist() == list(range(24))


def test_drawn_augmentations_use_every_variant_about_equally():
    cfg = AugmentConfig()
    draw = draw_augmentation(24_000, cfg, torch.Generator().manual_seed(0))
    counts = torch.bincount(variant_index(draw, cfg), minlength=24)
    assert counts.min() > 800 and counts.max() < 1200  # 1000 expected each


def test_encode_variants_encodes_each_cell_centre_transform_once_per_image():
    cfg = AugmentConfig(variant_grid=(2, 2), fill="constant")
    g = torch.Generator().manual_seed(0)
    pixels = [torch.rand(3, 16, 16, generator=g) * 2 - 1, torch.rand(3, 16, 24, generator=g) * 2 - 1]
    calls = []

    def encode(x):  # stand-in VAE: (n, 3, H, W) -> (n, 4, H/8, W/8)
        calls.append(len(x))
        return torch.cat([x, x[:, :1]], dim=1)[:, :, ::8, ::8] * 2.0

    ds = CachedDataset([CachedExample(encode(p[None])[0].half(), None, "c", pixels=p) for p in pixels])
    calls.clear()
    encode_variants(ds, cfg, encode, batch_size=3)
    assert calls == [3, 1, 3, 1]
    grid = variant_grid(cfg)
    assert torch.equal(ds.variant_params, grid)
    for ex, p in zip(ds.examples, pixels):
        assert ex.variants.shape == (4, *ex.latent.shape) and ex.variants.dtype == torch.float16
        for k, (zoom, angle) in enumerate(grid):
            want = encode(zoom_rotate(p[None], zoom[None], angle[None], "constant", -1.0))[0].half()
            assert torch.equal(ex.variants[k], want)


def test_encode_variants_needs_the_pixels():
    ds = CachedDataset([CachedExample(torch.zeros(4, 2, 2), None, "c")])
    with pytest.raises(ValueError, match="keep_pixels"):
        encode_variants(ds, AugmentConfig(), lambda x: x)
