"""apt_core.models: tiny SDXL build, SDXL checks, loading, prompt and image encoding (CPU, offline)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import pytest
import torch
from diffusers import UNet2DConditionModel

from apt_core.augment import variant_grid, zoom_rotate
from apt_core.config import AugmentConfig
from apt_core.errors import AptModelError
from apt_core.models import (SD1_MESSAGE, cache_dataset, check_sdxl_unet, encode_pixels, encode_prompts,
                             load_sdxl)
from quality.tiny_model import build_tiny_sdxl, save_tiny_sdxl, tiny_sdxl_unet_config


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sdxl(seed=0)


def _unet_out(components, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cond.context.shape[0], 4, 8, 8, generator=g)
    t = torch.tensor([10, 700][: x.shape[0]])
    with torch.no_grad():
        return components.unet(x, t, encoder_hidden_states=cond.context,
                               added_cond_kwargs={"text_embeds": cond.pooled,
                                                  "time_ids": cond.time_ids}).sample


def test_tiny_build_is_fast_deterministic_and_sdxl_shaped():
    start = time.perf_counter()
    a = build_tiny_sdxl(seed=0)
    assert time.perf_counter() - start < 2.0
    rng_before = torch.random.get_rng_state()
    b, c = build_tiny_sdxl(seed=0), build_tiny_sdxl(seed=1)
    assert torch.equal(rng_before, torch.random.get_rng_state()), "build must not consume global RNG"
    for name in ("unet", "vae", "text_encoder_1", "text_encoder_2"):
        sa, sb, sc = (getattr(x, name).state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), name
    check_sdxl_unet(a.unet)
    cfg = a.unet.config
    assert cfg.addition_embed_type == "text_time" and len(cfg.block_out_channels) == 3
    assert [type(blk).__name__ for blk in a.unet.up_blocks] == [
        "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert cfg.cross_attention_dim == (a.text_encoder_1.config.hidden_size
                                       + a.text_encoder_2.config.hidden_size)
    heads = {m.heads for n, m in a.unet.named_modules() if n.endswith("attn2")}
    assert heads and min(heads) >= 2
    assert dict(tiny_sdxl_unet_config())["addition_embed_type"] == "text_time"
    s = a.scheduler.config
    assert (s.beta_schedule, s.beta_start, s.beta_end, s.num_train_timesteps, s.prediction_type) == (
        "scaled_linear", 0.00085, 0.012, 1000, "epsilon")
    assert a.vae.config.scaling_factor == pytest.approx(0.13025)


def test_sd15_shaped_unet_is_rejected():
    sd15 = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=2)
    with pytest.raises(AptModelError, match="SD 1.x/2.x model; APT LoRA Trainer needs an SDXL"):
        check_sdxl_unet(sd15)
    assert SD1_MESSAGE.startswith("this looks like an SD 1.x/2.x model")


def test_text_time_unet_with_wrong_layout_is_rejected():
    cfg = dict(tiny_sdxl_unet_config())
    cfg.update(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    with pytest.raises(AptModelError, match="not SDXL-shaped"):
        check_sdxl_unet(UNet2DConditionModel(**cfg))
    with pytest.raises(AptModelError):
        check_sdxl_unet(torch.nn.Linear(2, 2))


def test_encode_prompts_shapes_mask_and_unet_forward(tiny):
    cond = encode_prompts(tiny, ["a photo of a cat", "sks"], (64, 64), (0, 0), (64, 64))
    assert cond.context.shape == (2, 77, 32 + 48)
    assert cond.pooled.shape == (2, 40)
    assert cond.time_ids.shape == (2, 6) and cond.token_mask.dtype == torch.bool
    # <bos> a photo of a cat <eos> = 7 real tokens; <bos> sks <eos> = 3
    assert cond.token_mask.sum(1).tolist() == [7, 3]
    assert cond.token_mask[0, :7].all() and not cond.token_mask[0, 7:].any()
    ids_2 = tiny.tokenizer_2(["sks"], padding="max_length", max_length=77).input_ids[0]
    assert ids_2[3:] == [0] * 74, "tokenizer_2 pads with '!' (id 0) like OpenCLIP"
    ids_1 = tiny.tokenizer_1(["sks"], padding="max_length", max_length=77).input_ids[0]
    assert ids_1[2:] == [tiny.tokenizer_1.eos_token_id] * 75
    long = encode_prompts(tiny, ["cat " * 100], (64, 64), (0, 0), (64, 64))
    assert long.token_mask.all()
    out = _unet_out(tiny, cond)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_encode_prompts_matches_diffusers_encode_prompt(tiny):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder_1,
                                     text_encoder_2=tiny.text_encoder_2, tokenizer=tiny.tokenizer_1,
                                     tokenizer_2=tiny.tokenizer_2, unet=tiny.unet,
                                     scheduler=tiny.scheduler)
    captions = ["a photo of a sks dog", "the painting"]
    ref, _, ref_pooled, _ = pipe.encode_prompt(captions, device="cpu",
                                               do_classifier_free_guidance=False)
    cond = encode_prompts(tiny, captions, (64, 64), (0, 0), (64, 64))
    torch.testing.assert_close(cond.context, ref)
    torch.testing.assert_close(cond.pooled, ref_pooled)


def test_time_ids_order_and_per_caption_sizes(tiny):
    cond = encode_prompts(tiny, ["cat"], (100, 200), (3, 4), (64, 96))
    assert cond.time_ids.tolist() == [[100, 200, 3, 4, 64, 96]]
    cond = encode_prompts(tiny, ["cat", "dog"], [(100, 200), (300, 400)], [(1, 2), (5, 6)],
                          [(64, 64), (128, 96)])
    assert cond.time_ids.tolist() == [[100, 200, 1, 2, 64, 64], [300, 400, 5, 6, 128, 96]]


def test_save_and_load_round_trip(tiny, tmp_path):
    folder = save_tiny_sdxl(tiny, tmp_path / "tiny-sdxl")
    assert os.path.isfile(os.path.join(folder, "model_index.json"))
    loaded = load_sdxl(folder)
    assert loaded.name == "tiny-sdxl"
    cond_a = encode_prompts(tiny, ["a photo of a cat"], (64, 64), (0, 0), (64, 64))
    cond_b = encode_prompts(loaded, ["a photo of a cat"], (64, 64), (0, 0), (64, 64))
    # identical weights; loaded tensors may take another matmul kernel (~1e-7 differences)
    torch.testing.assert_close(cond_a.context, cond_b.context)
    torch.testing.assert_close(cond_a.pooled, cond_b.pooled)
    assert torch.equal(cond_a.token_mask, cond_b.token_mask)
    ua, ub = _unet_out(tiny, cond_a), _unet_out(loaded, cond_a)
    torch.testing.assert_close(ua, ub)
    assert ua.abs().mean() > 1e-3
    sa, sb = tiny.unet.state_dict(), loaded.unet.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.vae.dtype == torch.float32
    assert loaded.scheduler.config.prediction_type == "epsilon"
    # the model's own scheduler decides the prediction type; the schedule stays SDXL's
    sched = os.path.join(folder, "scheduler", "scheduler_config.json")
    with open(sched) as f:
        cfg = json.load(f)
    cfg["prediction_type"] = "v_prediction"
    with open(sched, "w") as f:
        json.dump(cfg, f)
    vpred = load_sdxl(folder, dtype=torch.bfloat16)
    assert vpred.scheduler.config.prediction_type == "v_prediction"
    assert vpred.unet.dtype == torch.bfloat16 and vpred.vae.dtype == torch.float32


def test_load_errors(tmp_path):
    with pytest.raises(AptModelError, match="not found"):
        load_sdxl(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AptModelError, match="unet"):
        load_sdxl(tmp_path / "empty")
    from safetensors.torch import save_file

    sd15 = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(sd15))
    with pytest.raises(AptModelError, match="SD 1.x/2.x"):
        load_sdxl(sd15)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1)}, str(sdxl))
    with pytest.raises(AptModelError, match="diffusers folder"):
        load_sdxl(sdxl, config=tmp_path / "no-such-config")


@dataclass
class FakeRecord:
    pixels: torch.Tensor
    caption: str
    original_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_hw: tuple[int, int]
    source: str


def test_cache_dataset(tiny):
    g = torch.Generator().manual_seed(0)
    records = [FakeRecord(torch.rand(3, 64, 64, generator=g) * 2 - 1, "a sks dog", (512, 512),
                          (0, 0), (64, 64), "a.png"),
               FakeRecord(torch.rand(3, 64, 96, generator=g) * 2 - 1, "a sks dog", (600, 900),
                          (8, 0), (64, 96), "b.png")]
    ds = cache_dataset(tiny, records, "cpu", torch.float16)
    assert len(ds) == 2
    assert [tuple(e.latent.shape) for e in ds.examples] == [(4, 8, 8), (4, 8, 12)]
    assert ds.examples[0].latent.dtype == torch.float16 and ds.examples[0].pixels is None
    assert ds.buckets() == {(8, 8): [0], (8, 12): [1]}
    assert ds.examples[1].cond.time_ids.tolist() == [[600, 900, 8, 0, 64, 96]]
    assert ds.examples[1].source == "b.png" and ds.examples[1].cond.context.shape == (1, 77, 80)
    assert torch.equal(ds.examples[0].cond.context, ds.examples[1].cond.context)
    expect = encode_pixels(tiny, records[0].pixels[None])[0]
    torch.testing.assert_close(ds.examples[0].latent, expect.half())
    black = encode_pixels(tiny, -torch.ones(1, 3, 64, 64))[0].mean(dim=(1, 2))
    assert ds.fill_latent.shape == (4,)
    torch.testing.assert_close(ds.fill_latent, black)
    kept = cache_dataset(tiny, records[:1], "cpu", torch.float32, keep_pixels=True)
    assert torch.equal(kept.examples[0].pixels, records[0].pixels)
    assert ds.examples[0].cond.free_tokens is None


def test_cache_dataset_encodes_the_augmentation_variants_with_the_vae(tiny):
    g = torch.Generator().manual_seed(3)
    records = [FakeRecord(torch.rand(3, 64, 96, generator=g) * 2 - 1, "a sks dog", (64, 96), (0, 0),
                          (64, 96), "a.png")]
    aug = AugmentConfig(variant_grid=(2, 2))
    ds = cache_dataset(tiny, records, "cpu", torch.float16, variants_for=aug)
    ex = ds.examples[0]
    assert ex.pixels is None and ex.variants.shape == (4, 4, 8, 12) and ex.variants.dtype == torch.float16
    assert torch.equal(ds.variant_params, variant_grid(aug))
    zoom, angle = ds.variant_params[3]
    want = encode_pixels(tiny, zoom_rotate(records[0].pixels[None], zoom[None], angle[None], aug.fill, -1.0))
    torch.testing.assert_close(ex.variants[3], want[0].half())
    kept = cache_dataset(tiny, records, "cpu", torch.float32, keep_pixels=True, variants_for=aug)
    assert torch.equal(kept.examples[0].pixels, records[0].pixels)
    latent = AugmentConfig(space="latent")
    none = cache_dataset(tiny, records, "cpu", torch.float32, variants_for=latent)
    assert none.examples[0].variants is None and none.variant_params is None


def test_cache_dataset_marks_the_free_words_tokens(tiny):
    rec = FakeRecord(torch.zeros(3, 64, 64), "a sks dog, sks", (64, 64), (0, 0), (64, 64), "a.png")
    ds = cache_dataset(tiny, [rec], "cpu", torch.float32, aa_free_words=["sks"])
    cond = ds.examples[0].cond
    ids = tiny.tokenizer_1("a sks dog, sks").input_ids
    sks = tiny.tokenizer_1("sks", add_special_tokens=False).input_ids
    n = len(sks)
    expect = [False] * 77
    for i in range(len(ids) - n + 1):
        if ids[i:i + n] == sks:
            expect[i:i + n] = [True] * n
    assert sum(expect) == 2 * n and cond.free_tokens.tolist() == [expect]
    assert cond.aligned_tokens.sum() == cond.token_mask.sum() - 2 * n
    plain = cache_dataset(tiny, [rec], "cpu", torch.float32).examples[0].cond
    assert torch.equal(plain.context, cond.context) and torch.equal(plain.token_mask, cond.token_mask)


def test_encode_pixels_is_scaled_posterior_mean(tiny):
    x = torch.rand(2, 3, 64, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lat = encode_pixels(tiny, x)
    assert lat.shape == (2, 4, 8, 4) and lat.dtype == torch.float32
    with torch.no_grad():
        ref = tiny.vae.encode(x).latent_dist.mean * 0.13025
    torch.testing.assert_close(lat, ref)
    assert torch.equal(lat, encode_pixels(tiny, x)), "deterministic (mean, not a sample)"
