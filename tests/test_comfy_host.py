"""The ComfyUI test host itself: diffusers UNet <-> ComfyUI SDXL model mapping, LoRA loading the
way LoraLoader does it, and the real server (integration). Needs the ComfyUI tree from
scripts/fetch_comfyui.sh; skipped without it unless APT_REQUIRE_HOST or CI is set (then it fails)."""

from __future__ import annotations

import pytest
import torch

import comfy_host as ch

# A tiny diffusers SDXL-shaped UNet (SDXL base layout). norm_num_groups=32 because ComfyUI hard-codes
# GroupNorm(32, ...): with any other group count the weights still map 1:1 but the outputs differ.
TINY_SDXL = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64], "layers_per_block": 2, "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 4], "cross_attention_dim": 64, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80,
    "use_linear_projection": True, "norm_num_groups": 32,
}
# Constant head *count* instead of head size, a conv projection and uneven depths: exercises the
# other branches of the converter.
TINY_VARIANT = dict(TINY_SDXL, attention_head_dim=4, use_linear_projection=False,
                    transformer_layers_per_block=[1, 2, 3], layers_per_block=1,
                    block_out_channels=[32, 64, 96], cross_attention_dim=48,
                    addition_time_embed_dim=16, projection_class_embeddings_input_dim=24 + 6 * 16)


def _project_tiny_config():
    try:
        from quality.tiny_model import tiny_sdxl_unet_config
    except Exception:  # the project's tiny model is optional for this file
        return None
    return tiny_sdxl_unet_config()


CONFIGS = {"tiny_sdxl": TINY_SDXL, "variant": TINY_VARIANT}
if _project_tiny_config() is not None:
    CONFIGS["apt_core_tiny"] = _project_tiny_config()


@pytest.fixture(scope="module")
def comfy():
    return ch.import_comfy()


def _diffusers_unet(cfg, seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():  # no zero / identical init may hide a swapped or missing mapping
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def _inputs(unet, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    pooled_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    x = torch.randn(batch, c.in_channels, 16, 16, generator=g)
    t = torch.tensor([999.0, 17.0][:batch])
    ctx = torch.randn(batch, 7, c.cross_attention_dim, generator=g)
    pooled = torch.randn(batch, pooled_dim, generator=g)
    # diffusers time_ids = original (h, w) + crop (top, left) + target (h, w), one row per sample;
    # ComfyUI's SDXL.encode_adm takes the same six numbers as height/width/crop_h/crop_w/target_*.
    sizes = dict(height=128, width=96, crop_h=8, crop_w=4, target_height=128, target_width=128)
    time_ids = torch.tensor([[128.0, 96.0, 8.0, 4.0, 128.0, 128.0]] * batch)
    return x, t, ctx, pooled, sizes, time_ids


def _diffusers_out(unet, x, t, ctx, pooled, time_ids):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def _comfy_out(diffusion_model, model, x, t, ctx, pooled, sizes):
    with torch.no_grad():
        y = model.encode_adm(pooled_output=pooled, **sizes)
        return diffusion_model(x, timesteps=t, context=ctx, y=y)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_unet_maps_onto_comfy_sdxl_and_matches(comfy, name):
    cfg = CONFIGS[name]
    unet = _diffusers_unet(cfg)
    patcher = ch.comfy_sdxl_model_from_diffusers_config(unet.config)
    model = patcher.model
    assert isinstance(model, comfy.model_base.SDXL)
    assert isinstance(patcher, comfy.model_patcher.ModelPatcher)

    # ComfyUI's own diffusers<->SGM mapping covers every weight of both models, shapes equal.
    report = ch.diffusers_comfy_weight_report(unet, patcher)
    assert report == {"unmapped": [], "missing": [], "dangling": [], "shape_mismatch": []}, report
    assert len(unet.state_dict()) == len(model.diffusion_model.state_dict())

    ch.load_diffusers_unet_into_comfy(unet, patcher)
    x, t, ctx, pooled, sizes, time_ids = _inputs(unet)
    y = model.encode_adm(pooled_output=pooled, **sizes)
    assert y.shape == (x.shape[0], unet.config.projection_class_embeddings_input_dim)
    # encode_adm's size part is exactly diffusers' add_time_proj(time_ids) after the pooled embeds.
    time_embeds = unet.add_time_proj(time_ids.flatten()).reshape(x.shape[0], -1)
    torch.testing.assert_close(y, torch.cat([pooled, time_embeds], dim=-1))

    ref = _diffusers_out(unet, x, t, ctx, pooled, time_ids)
    out = _comfy_out(model.diffusion_model, model, x, t, ctx, pooled, sizes)
    assert out.shape == ref.shape
    problems = ch.comfy_parity_problems(unet.config)
    if not problems:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    else:  # e.g. norm_num_groups != 32: the layout maps, but ComfyUI computes something else
        assert not torch.allclose(out, ref, rtol=1e-4, atol=1e-4), problems


def test_converter_produces_comfy_detection_keys_for_real_sdxl():
    """The full-size SDXL base config converts to exactly what comfy.model_detection reports."""
    sdxl_base = {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True,
    }
    got = ch.diffusers_to_comfy_unet_config(sdxl_base)
    expected = {  # comfy/model_detection.py: unet_config_from_diffusers_unet, SDXL
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
        "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "transformer_depth_middle": 10, "context_dim": 2048, "num_head_channels": 64,
        "adm_in_channels": 2816, "use_linear_in_transformer": True, "num_classes": "sequential",
    }
    assert {k: got[k] for k in expected} == expected
    assert ch.comfy_parity_problems(sdxl_base) == []
    with pytest.raises(ValueError, match="layers_per_block"):
        ch.diffusers_to_comfy_unet_config(dict(sdxl_base, layers_per_block=[1, 2, 1]))
    with pytest.raises(ValueError, match="head"):
        ch.diffusers_to_comfy_unet_config(dict(sdxl_base, attention_head_dim=[5, 10, 30]))


def test_lora_load_report_like_loraloader(comfy, tmp_path):
    from safetensors.torch import save_file

    unet = _diffusers_unet(TINY_SDXL)
    patcher = ch.comfy_sdxl_model_from_diffusers_config(unet.config)
    ch.load_diffusers_unet_into_comfy(unet, patcher)

    target = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    w = unet.get_submodule(target).weight
    g = torch.Generator().manual_seed(3)
    rank, alpha = 2, 1.0
    down = torch.randn(rank, w.shape[1], generator=g) * 0.5
    up = torch.randn(w.shape[0], rank, generator=g) * 0.5
    kohya = "lora_unet_" + target.replace(".", "_")
    peft = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    lora = {
        f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up, f"{kohya}.alpha": torch.tensor(alpha),
        # modern PEFT naming for attention projections is NOT mapped by ComfyUI (silently ignored)
        f"{peft}.lora_A.weight": torch.zeros(rank, w.shape[1]), f"{peft}.lora_B.weight": torch.zeros(w.shape[0], rank),
        "lora_unet_no_such_layer.lora_down.weight": torch.zeros(1, 1),
    }
    path = tmp_path / "tiny_lora.safetensors"
    save_file(lora, str(path))

    loaded, not_loaded = ch.comfy_lora_load_report(patcher, path)
    assert loaded == 3
    assert sorted(not_loaded) == sorted(f"lora key not loaded: {k}" for k in
                                        [f"{peft}.lora_A.weight", f"{peft}.lora_B.weight",
                                         "lora_unet_no_such_layer.lora_down.weight"])

    # The patched ComfyUI model equals diffusers with W += alpha/rank * up @ down merged in.
    patched, _, _ = ch.comfy_load_lora(patcher, path, strength=1.0)
    x, t, ctx, pooled, sizes, time_ids = _inputs(unet)
    base = _comfy_out(patcher.model.diffusion_model, patcher.model, x, t, ctx, pooled, sizes)
    with ch.patched_diffusion_model(patched) as dm:
        with_lora = _comfy_out(dm, patched.model, x, t, ctx, pooled, sizes)
    after = _comfy_out(patcher.model.diffusion_model, patcher.model, x, t, ctx, pooled, sizes)
    torch.testing.assert_close(after, base)  # unpatched again
    with torch.no_grad():
        w.add_(alpha / rank * up @ down)
    ref = _diffusers_out(unet, x, t, ctx, pooled, time_ids)
    assert not torch.allclose(with_lora, base, atol=1e-3)
    torch.testing.assert_close(with_lora, ref, rtol=1e-4, atol=1e-4)


comfy_server = ch.comfy_server_fixture(scope="module", link_pack=False)


@pytest.mark.integration
def test_real_server_starts_and_lists_core_nodes(comfy_server):
    info = comfy_server.object_info()
    assert "LoraLoader" in info and "KSampler" in info
    assert "lora_name" in info["LoraLoader"]["input"]["required"]
    assert comfy_server.startup_seconds is not None and comfy_server.startup_seconds < 120
    assert "Starting server" in comfy_server.log_text() or "To see the GUI" in comfy_server.log_text()
    assert comfy_server.queue() == {"queue_running": [], "queue_pending": []}
    assert comfy_server.import_failed_lines() == []


@pytest.mark.integration
def test_real_server_runs_a_prompt_and_reports_errors(comfy_server):
    # A prompt that needs no model weights, with an output node.
    prompt = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "2": {"class_type": "LatentUpscaleBy",
                    "inputs": {"samples": ["1", 0], "upscale_method": "nearest-exact", "scale_by": 0.5}},
              "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "apt_test"}}}
    pid = comfy_server.post_prompt(prompt)
    entry = comfy_server.wait_for(pid, timeout=60)
    assert ch.history_status(entry) == "success", entry["status"]
    assert list(comfy_server.output_dir.rglob("apt_test*.latent"))

    # a rejected prompt raises with the server's validation error
    with pytest.raises(ch.ComfyServerError, match="required_input_missing"):
        comfy_server.post_prompt({"1": {"class_type": "SaveLatent", "inputs": {"filename_prefix": "x"}}})
    comfy_server.interrupt()  # nothing running: must be harmless
