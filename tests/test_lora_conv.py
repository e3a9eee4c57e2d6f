"""Opt-in LoCon: LoRA on the resnets' 3x3 convolutions (LoraConfig.include_conv).

The quality benchmark needs it (its prior draws shapes at an 8x8 level with no attention, see
quality/README.md); here: the right layers are wrapped, the prior pass switches them off, remove()
restores the UNet, and the exported 4-D kohya keys load in ComfyUI's LoraLoader (every key, same
effect) and in diffusers."""

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

from apt_core.config import AptConfig, LoraConfig
from apt_core.lora import LoraAdapter, resnet_conv_targets
from quality.tiny_model import build_tiny_sdxl

from lora_checks import assert_loads_in_comfyui, assert_loads_in_diffusers, train_and_export
from tiny import config


def test_resnet_conv_targets_are_every_3x3_resnet_conv():
    unet = build_tiny_sdxl(seed=0).unet
    names = resnet_conv_targets(unet)
    n_resnets = sum(1 for n, m in unet.named_modules() if type(m).__name__ == "ResnetBlock2D")
    assert len(names) == 2 * n_resnets
    assert "down_blocks.0.resnets.0.conv1" in names and "mid_block.resnets.1.conv2" in names
    assert all(isinstance(unet.get_submodule(n), nn.Conv2d) for n in names)
    assert not any("conv_shortcut" in n or "samplers" in n or n in ("conv_in", "conv_out") for n in names)


def test_include_conv_is_off_by_default_and_round_trips():
    assert LoraConfig().include_conv is False
    cfg = AptConfig.from_dict({"lora": {"include_conv": True}})
    assert cfg.lora.include_conv and AptConfig.from_dict(cfg.to_dict()).lora.include_conv


def test_conv_lora_layers_switch_off_for_the_prior_and_remove_restores():
    unet = build_tiny_sdxl(seed=0).unet
    before = copy.deepcopy(unet.state_dict())
    lora = LoraAdapter(unet, [], LoraConfig(rank=2, alpha=2.0, include_conv=True), seed=0)
    assert len(lora.layers) == len(resnet_conv_targets(build_tiny_sdxl(seed=0).unet)) > 0
    state = lora.state_dict()
    down, up = state["down_blocks.0.resnets.0.conv1.down"], state["down_blocks.0.resnets.0.conv1.up"]
    assert down.ndim == 4 and down.shape[:1] == (2,) and down.shape[-2:] == (3, 3)
    assert up.ndim == 4 and up.shape[1:] == (2, 1, 1)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(0.05 * torch.randn_like(p))
        cond = torch.randn(1, 77, unet.config.cross_attention_dim)
        kw = dict(encoder_hidden_states=cond, return_dict=False,
                  added_cond_kwargs={"text_embeds": torch.randn(1, 40), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})
        on = unet(x, torch.tensor([500]), **kw)[0]
        with lora.disabled():
            off = unet(x, torch.tensor([500]), **kw)[0]
    lora.remove()
    with torch.no_grad():
        plain = unet(x, torch.tensor([500]), **kw)[0]
    assert not torch.allclose(on, off, atol=1e-5)
    torch.testing.assert_close(off, plain)
    after = unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture(scope="module")
def trained_conv(tmp_path_factory):
    cfg = config(3, learning_rate=2e-2)
    cfg.lora.include_conv = True
    return train_and_export(tmp_path_factory.mktemp("locon"), cfg, "apt_locon.safetensors")


def test_conv_keys_are_exported_as_4d_kohya_tensors(trained_conv):
    _, path, _, _ = trained_conv
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        down = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
        up = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight")
    assert "lora_unet_up_blocks_2_resnets_2_conv2.alpha" in keys
    assert down.shape[0] == 4 and down.shape[-2:] == (3, 3) and up.shape[1:] == (4, 1, 1)
    assert float(up.abs().max()) > 0  # trained


def test_conv_lora_loads_in_comfyui_with_every_key_and_same_effect(trained_conv):
    _, path, probe, expected = trained_conv
    assert_loads_in_comfyui(path, probe, expected)


def test_conv_lora_loads_in_diffusers_with_same_effect(trained_conv):
    _, path, probe, expected = trained_conv
    assert_loads_in_diffusers(path, probe, expected)
