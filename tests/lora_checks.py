"""Shared checks that an exported kohya LoRA file loads elsewhere with the effect it had in training.

`probe` is (x, t, cond): a latent batch, timesteps and SDXLConditioning; `expected` is the trained
UNet's output on it. Both loaders start from the tiny SDXL model built with seed 0.
"""

import torch
from safetensors import safe_open

import comfy_host as ch
from quality.tiny_model import build_tiny_sdxl


def assert_loads_in_comfyui(path, probe, expected) -> None:
    """ComfyUI's LoraLoader path: every key loaded, none reported "not loaded", same output."""
    x, t, cond = probe
    base_unet = build_tiny_sdxl(seed=0).unet
    patcher = ch.comfy_sdxl_model_from_diffusers_config(base_unet.config)
    ch.load_diffusers_unet_into_comfy(base_unet, patcher)
    patched, loaded, not_loaded = ch.comfy_load_lora(patcher, path, strength=1.0)
    assert not_loaded == []
    with safe_open(str(path), "pt") as f:
        assert loaded == len(list(f.keys()))
    sizes = dict(zip(("height", "width", "crop_h", "crop_w", "target_height", "target_width"),
                     cond.time_ids[0].int().tolist()))
    with torch.no_grad(), ch.patched_diffusion_model(patched) as dm:
        y = patched.model.encode_adm(pooled_output=cond.pooled, **sizes)
        out = dm(x, timesteps=t, context=cond.context, y=y)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def assert_loads_in_diffusers(path, probe, expected) -> None:
    """diffusers' StableDiffusionXLPipeline.load_lora_weights: same output."""
    from diffusers import StableDiffusionXLPipeline

    x, t, cond = probe
    c = build_tiny_sdxl(seed=0)
    pipe = StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder_1, text_encoder_2=c.text_encoder_2,
                                     tokenizer=c.tokenizer_1, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                     scheduler=c.scheduler)
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        out = pipe.unet(x, t, encoder_hidden_states=cond.context,
                        added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids}).sample
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def train_and_export(folder, cfg, filename: str):
    """Train the tiny model (seed 0) with `cfg`, save its LoRA (fp32) into `folder`.

    Returns (trainer, path, probe, expected) where expected is the trained UNet's output on probe,
    checked to differ from the output with the LoRA off.
    """
    from apt_core.backbone import DiffusersSDXLBackbone
    from apt_core.trainer import AptTrainer
    from tiny import tiny_model_and_data

    components, dataset = tiny_model_and_data(0)
    trainer = AptTrainer(DiffusersSDXLBackbone.from_components(components), dataset, cfg)
    trainer.run()
    path = folder / filename
    trainer.save_lora(path, save_dtype="fp32")
    ex = dataset.examples[0]
    x = torch.randn(1, 4, *ex.bucket, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([321])
    with torch.no_grad():
        expected = trainer.backbone.predict(x, t, ex.cond)
        with trainer.lora.disabled():
            base = trainer.backbone.predict(x, t, ex.cond)
    assert not torch.allclose(expected, base, atol=1e-4)  # the LoRA does something
    return trainer, path, (x, t, ex.cond), expected
