"""apt_core.sampling: the DDIM + CFG sampler used for before/after images, and the grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apt_core.backbone import transformer_lora_targets
from apt_core.config import LoraConfig
from apt_core.lora import ADAPTER, LoraAdapter
from quality.tiny_model import build_tiny_sdxl
from apt_core.sampling import (before_after_grid, ddim_scheduler, guided_output, initial_noise,
                               prompt_conditioning, sample, unet_output)

PROMPTS = ["a photo of sks dog", "a cat painting", ""]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sdxl(seed=0)


def test_shapes_dtype_and_non_square_sizes(tiny):
    imgs, lat = sample(tiny, PROMPTS, [1, 2, 3], steps=2, size=64, return_latents=True)
    assert imgs.shape == (3, 64, 64, 3) and imgs.dtype == np.uint8
    assert lat.shape == (3, 4, 8, 8) and lat.dtype == torch.float32
    assert sample(tiny, PROMPTS[:1], [0], steps=1, size=(32, 96)).shape == (1, 32, 96, 3)
    with pytest.raises(ValueError):
        sample(tiny, PROMPTS, [1, 2], steps=1)
    with pytest.raises(ValueError):
        sample(tiny, PROMPTS[:1], [1], steps=1, size=60)


def test_deterministic_per_seed_and_independent_of_batching(tiny):
    one = sample(tiny, PROMPTS, [5, 6, 7], steps=3, batch=3)
    np.testing.assert_array_equal(one, sample(tiny, PROMPTS, [5, 6, 7], steps=3, batch=3))
    alone = sample(tiny, PROMPTS[1:2], [6], steps=3, batch=1)
    assert np.abs(one[1:2].astype(int) - alone.astype(int)).max() <= 2  # batched-matmul rounding only
    other_seed = sample(tiny, PROMPTS[1:2], [8], steps=3)
    assert np.abs(other_seed.astype(int) - alone.astype(int)).max() > 10


def test_initial_noise_is_one_generator_per_seed():
    noise = initial_noise([3, 4], (8, 12))
    assert noise.shape == (2, 4, 8, 12)
    torch.testing.assert_close(noise[1], torch.randn(4, 8, 12, generator=torch.Generator().manual_seed(4)),
                               rtol=0, atol=0)


def test_ddim_schedule_follows_the_model_and_starts_from_pure_noise(tiny):
    sched = ddim_scheduler(tiny)
    sched.set_timesteps(4)
    assert sched.timesteps.tolist()[0] == 999 and len(sched.timesteps) == 4
    assert sched.config.prediction_type == tiny.scheduler.config.prediction_type
    torch.testing.assert_close(sched.alphas_cumprod, tiny.scheduler.alphas_cumprod)
    assert ddim_scheduler(None, "v_prediction").config.prediction_type == "v_prediction"


def test_cfg_scale_one_is_the_conditional_prediction_and_zero_the_unconditional(tiny):
    x = initial_noise([0, 1], 8)
    t = torch.tensor(500)
    cond = prompt_conditioning(tiny, PROMPTS[:2], 64, 64)
    uncond = prompt_conditioning(tiny, [""] * 2, 64, 64)
    c, u = unet_output(tiny, x, t, cond), unet_output(tiny, x, t, uncond)
    torch.testing.assert_close(guided_output(tiny, x, t, cond, uncond, 1.0), c, rtol=0, atol=0)
    # the batched two-branch path agrees with the separate forwards (rounding only)
    torch.testing.assert_close(guided_output(tiny, x, t, cond, uncond, 0.0), u, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided_output(tiny, x, t, cond, uncond, 1.0 + 1e-7), c, rtol=1e-4, atol=1e-5)
    g = guided_output(tiny, x, t, cond, uncond, 5.0)
    torch.testing.assert_close(g, u + 5.0 * (c - u), rtol=1e-4, atol=1e-4)


def test_lora_on_changes_the_images_and_off_gives_the_prior_exactly():
    c = build_tiny_sdxl(seed=0)
    prior = sample(c, PROMPTS[:2], [1, 2], steps=3)
    lora = LoraAdapter(c.unet, transformer_lora_targets(c.unet), LoraConfig(rank=4, alpha=4.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora.layers.values():
            up = layer.lora_B[ADAPTER].weight
            up.copy_(torch.randn(up.shape, generator=g) * 0.5)
    with lora.disabled():
        off = sample(c, PROMPTS[:2], [1, 2], steps=3)
    on = sample(c, PROMPTS[:2], [1, 2], steps=3)
    np.testing.assert_array_equal(off, prior)
    assert np.abs(on.astype(int) - off.astype(int)).mean() > 1.0
    lora.remove()
    np.testing.assert_array_equal(sample(c, PROMPTS[:2], [1, 2], steps=3), prior)


def test_before_after_grid_layout():
    before = np.zeros((4, 16, 16, 3), np.uint8)
    after = np.full((4, 16, 16, 3), 255, np.uint8)
    grid = before_after_grid(["a long prompt " * 6, "short"], before, after, title="t", cell=64)
    assert grid.mode == "RGB" and grid.width >= 300 + 4 * 64 and grid.height >= 2 * 64
    px = np.asarray(grid)
    assert (px == 0).all(axis=-1).sum() >= 4 * 64 * 64  # the four black "before" cells, enlarged
    with pytest.raises(ValueError):
        before_after_grid(["one", "two", "three"], before, after)


def test_the_core_never_imports_the_benchmark_or_comfyui():
    from pathlib import Path

    core = Path(__file__).resolve().parents[1] / "apt_core"
    for py in core.glob("*.py"):
        text = py.read_text(encoding="utf-8")
        for bad in ("import quality", "from quality", "import comfy", "from comfy"):
            assert bad not in text, f"{py.name}: {bad}"
