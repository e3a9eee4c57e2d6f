"""The ComfyUI backbone adapter (nodes/comfy_backbone.py) against ComfyUI's real SGM UNet, in process.

The tiny diffusers SDXL UNet of apt_core.models is copied into a ComfyUI `supported_models.SDXL`
model (tests/comfy_host.py); both compute the same function (norm_num_groups=32), so the adapter
must reproduce the diffusers backbone: same predictions, same RS/AA terms, same training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import comfy_host as ch

sys.path.insert(0, str(Path(__file__).resolve().parent / "pack_fixtures"))


@pytest.fixture(scope="module")
def cb():
    """The pack's nodes/comfy_backbone module, loaded like ComfyUI loads the pack."""
    ch.import_comfy()  # skips without the host tree; puts ComfyUI on sys.path
    from apt_test_models.inproc import pack_module

    return pack_module("comfy_backbone")


@pytest.fixture(scope="module")
def fixture_pack(cb):
    import apt_test_models

    return apt_test_models


def _comfy_from_diffusers(unet):
    patcher = ch.comfy_sdxl_model_from_diffusers_config(unet.config)
    ch.load_diffusers_unet_into_comfy(unet, patcher)
    return patcher


def _to_comfy_dataset(dataset, base_model):
    """Same cached examples with `pooled` replaced by ComfyUI's adm vector y."""
    from apt_core.conditioning import CachedDataset, CachedExample, SDXLConditioning

    out = []
    for ex in dataset.examples:
        oh, ow, top, left, th, tw = (int(v) for v in ex.cond.time_ids[0])
        y = base_model.encode_adm(pooled_output=ex.cond.pooled, width=ow, height=oh, crop_w=left, crop_h=top,
                                  target_width=tw, target_height=th)
        cond = SDXLConditioning(ex.cond.context, y.float(), ex.cond.time_ids, ex.cond.token_mask)
        out.append(CachedExample(ex.latent, cond, ex.caption, ex.source, ex.pixels, ex.repeats,
                                 variants=ex.variants))
    return CachedDataset(out, dataset.fill_latent, dataset.variant_params)


@pytest.fixture()
def pair(cb):
    """(diffusers components, cached dataset, comfy patcher, comfy-form dataset)."""
    from tiny import tiny_model_and_data

    components, dataset = tiny_model_and_data(0)
    patcher = _comfy_from_diffusers(components.unet)
    return components, dataset, patcher, _to_comfy_dataset(dataset, patcher.model)


def _backbones(cb, components, patcher):
    from apt_core.backbone import DiffusersSDXLBackbone

    return DiffusersSDXLBackbone.from_components(components), cb.ComfySDXLBackbone(patcher)


def test_schedule_prediction_type_and_predictions_match_diffusers(cb, pair):
    components, dataset, patcher, cdataset = pair
    dif, com = _backbones(cb, components, patcher)
    torch.testing.assert_close(com.alphas_cumprod, components.scheduler.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)
    assert com.prediction_type == "epsilon"
    ex, cex = dataset.examples[1], cdataset.examples[1]
    x = torch.randn(1, 4, *ex.bucket, generator=torch.Generator().manual_seed(3))
    for t in (3, 500, 999):
        with torch.no_grad():
            a = dif.predict(x, torch.tensor([t]), ex.cond)
            b = com.predict(x, torch.tensor([t]), cex.cond)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_lora_targets_hooked_layers_and_kohya_keys(cb, pair):
    components, _, patcher, _ = pair
    dif, com = _backbones(cb, components, patcher)
    dnames, cnames = dif.lora_target_names(), com.lora_target_names()
    assert len(cnames) == len(dnames) > 0
    key_map = ch.diffusers_to_comfy_key_map(patcher)  # ComfyUI's own diffusers -> SGM mapping
    assert sorted(key_map[n + ".weight"][: -len(".weight")] for n in dnames) == sorted(cnames)
    assert com.kohya_key("input_blocks.4.1.transformer_blocks.0.attn1.to_q") == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert len(com.lora_target_names(include_feed_forward=True)) == len(dif.lora_target_names(True))
    # RS/AA stages: SGM output_blocks 0-2 (factor 4) and 3-5 (factor 2), like diffusers up_blocks 0/1.
    assert [n for n, _ in com.decoder_stages((4, 2))] == [f"output_blocks.{k}.1" for k in range(6)]
    assert [n for n, _ in com.decoder_stages((2,))] == [f"output_blocks.{k}.1" for k in (3, 4, 5)]
    from apt_core.probes import decoder_stages  # the same discovery on diffusers' layout
    unet = components.unet
    assert [n for n, _ in decoder_stages(unet.down_blocks, unet.up_blocks, "up_blocks", (2,))] == \
        [f"up_blocks.1.attentions.{j}" for j in range(3)]


def _map_lora_state(state, key_map):
    """diffusers module names -> SGM module names in a LoraAdapter state dict."""
    out = {}
    for k, v in state.items():
        module, _, part = k.rpartition(".")
        out[key_map[module + ".weight"][: -len(".weight")] + "." + part] = v
    return out


@pytest.mark.parametrize("checkpointing,wide", [(False, False), (True, False), (False, True)])
def test_training_matches_the_diffusers_backbone(cb, pair, checkpointing, wide):
    """peft on diffusers and the host's weight adapters on ComfyUI train the same LoRA (wide: also
    the feed-forward layers and the resnet convolutions, LoCon)."""
    from apt_core.trainer import AptTrainer
    from tiny import config

    components, dataset, patcher, cdataset = pair
    dif, com = _backbones(cb, components, patcher)
    cfg_d = config(3, learning_rate=1e-2, gradient_checkpointing=checkpointing)
    cfg_c = config(3, learning_rate=1e-2, gradient_checkpointing=checkpointing)
    for cfg in (cfg_d, cfg_c):
        cfg.lora.include_feed_forward = cfg.lora.include_conv = wide
    td = AptTrainer(dif, dataset, cfg_d)
    tc = AptTrainer(com, cdataset, cfg_c)
    key_map = ch.diffusers_to_comfy_key_map(patcher)
    init = _map_lora_state(td.lora.state_dict(), key_map)
    tc.lora.load_state_dict(init)  # same initial LoRA
    assert len(tc._probe_handle.aa_layers) == len(td._probe_handle.aa_layers) == 9
    assert len(tc._probe_handle.rs_layers) == len(td._probe_handle.rs_layers) == 6
    rd, rc = td.run(), tc.run()
    for hd, hc in zip(rd.history, rc.history):
        for key in ("loss", "loss_denoise", "loss_rs", "loss_aa"):
            assert hc[key] == pytest.approx(hd[key], rel=2e-3, abs=1e-7), key
    assert rc.history[-1]["loss_rs"] > 0 and rc.history[-1]["loss_aa"] > 0
    want = _map_lora_state(td.lora.state_dict(), key_map)
    got = tc.lora.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        # Adam normalises updates, so a near-zero gradient that rounds differently (a merged weight
        # vs peft's separate matmuls) can move one element by most of a step (1e-2); the update as a
        # whole must agree (one flipped element of the 1024 of a ff down weight: 2.7 % of its norm).
        update, diff = want[k] - init[k], got[k] - want[k]
        assert float(diff.norm()) <= 0.05 * float(update.norm()) + 1e-6, k
        assert float((diff.abs() > 3e-4).float().mean()) <= 0.005, k
    td.close()
    tc.close()


def test_close_leaves_the_comfy_model_exactly_as_it_was(cb, pair):
    from apt_core.trainer import AptTrainer
    from tiny import config

    components, _, patcher, cdataset = pair
    unet = patcher.model.diffusion_model
    ex = cdataset.examples[0]
    x = torch.randn(1, 4, *ex.bucket, generator=torch.Generator().manual_seed(1))

    def out():
        with torch.no_grad():
            return unet(x, timesteps=torch.tensor([321.0]), context=ex.cond.context, y=ex.cond.pooled)

    before = out()
    keys = list(unet.state_dict())
    types = {n: type(m) for n, m in unet.named_modules()}
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    com = cb.ComfySDXLBackbone(patcher)
    trainer = AptTrainer(com, cdataset, config(3, learning_rate=1e-2, gradient_checkpointing=True))
    assert any("forward" in vars(m) for m in unet.modules())  # checkpointing installed
    assert sum(len(vars(m).get("weight_function", [])) for m in unet.modules()) >= len(trainer.lora.parameters()) // 2
    assert list(unet.state_dict()) == keys  # the host's adapters rename nothing
    trainer.run()
    trainer.close()
    assert torch.equal(out(), before)
    assert list(unet.state_dict()) == keys
    assert {n: type(m) for n, m in unet.named_modules()} == types
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    assert not any("forward" in vars(m) for m in unet.modules())
    assert not any(m._forward_hooks for m in unet.modules())
    assert not any(vars(m).get("weight_function") or vars(m).get("bias_function") for m in unet.modules())
    assert not patcher.weight_wrapper_patches
    assert not patcher.model_options["transformer_options"].get("patches_replace", {}).get("attn2")


def test_inference_mode_weights_train_without_touching_the_parameters(cb, pair):
    """ComfyUI creates models under inference mode; autograd cannot save those weights. Training must
    work anyway, through the host's cast (fresh copies per op), leaving every parameter as it was."""
    from apt_core.trainer import AptTrainer
    from tiny import config

    components, _, _, _ = pair
    with torch.inference_mode():  # how ComfyUI creates every model (nodes run in inference mode)
        patcher = _comfy_from_diffusers(components.unet)
        patcher.model.diffusion_model.requires_grad_(True)  # as ComfyUI 0.3.75's loader leaves them
    cdataset = _to_comfy_dataset(pair[1], patcher.model)
    unet = patcher.model.diffusion_model
    params = dict(unet.named_parameters())
    assert all(p.is_inference() and p.requires_grad for p in params.values())
    trainer = AptTrainer(cb.ComfySDXLBackbone(patcher), cdataset, config(2, learning_rate=1e-2))
    trainer.run()
    assert any(p.abs().sum() > 0 for n, p in trainer.lora.state_dict().items() if n.endswith(".up"))
    trainer.close()
    after = dict(unet.named_parameters())
    assert after.keys() == params.keys() and all(after[n] is p for n, p in params.items())
    assert all(p.is_inference() and p.requires_grad for p in after.values())
    assert not any(vars(m).get("weight_function") or vars(m).get("bias_function") for m in unet.modules())


def test_training_replaces_a_forward_only_attention_kernel_by_the_hosts_sdpa(cb, pair, monkeypatch):
    """With sage/flash attention chosen on ComfyUI's command line (no backward), training must go
    through the host's PyTorch attention via `optimized_attention_override`; sampling is unaffected."""
    from comfy.ldm.modules import attention

    from apt_core.trainer import AptTrainer
    from tiny import config

    calls = []

    def attention_sage(q, k, v, heads, **kwargs):  # a stand-in with the real kernel's name
        calls.append(heads)
        raise RuntimeError("sage attention has no backward")

    monkeypatch.setattr(attention, "optimized_attention", attention.wrap_attn(attention_sage))
    _, _, patcher, cdataset = pair
    trainer = AptTrainer(cb.ComfySDXLBackbone(patcher), cdataset, config(2, learning_rate=1e-2))
    trainer.run()
    trainer.close()
    assert calls == []
    assert "optimized_attention_override" not in patcher.model_options["transformer_options"]


def test_non_sdxl_models_are_rejected_with_a_clear_message(cb, fixture_pack):
    from apt_core.errors import AptModelError

    sd15 = fixture_pack.build_model(0, "sd15")
    with pytest.raises(AptModelError, match="not SDXL"):
        cb.check_comfy_sdxl(sd15)
    with pytest.raises(AptModelError, match="expected a ComfyUI MODEL"):
        cb.check_comfy_sdxl(torch.nn.Linear(2, 2))


def test_only_the_adapters_get_gradients_and_the_unet_flags_are_restored(cb, pair):
    """ComfyUI 0.3.75 leaves a model's weights requiring grad: training must not fill UNet-sized
    gradient buffers (on a smaller SDXL-shaped UNet on CPU: +2.8 GB in backward, a step ~9x slower)."""
    from apt_core.trainer import AptTrainer
    from tiny import config

    _, _, patcher, cdataset = pair
    unet = patcher.model.diffusion_model
    unet.requires_grad_(True)  # as 0.3.75 hands it out
    trainer = AptTrainer(cb.ComfySDXLBackbone(patcher), cdataset, config(2, learning_rate=1e-2))
    trainer.run()
    assert all(p.grad is None for p in unet.parameters())
    trainer.close()
    assert all(p.requires_grad for p in unet.parameters())


def test_sampling_time_patches_stay_out_of_training_but_a_schedule_patch_counts(cb, pair):
    """A FreeU-like block patch (needs a sampler's state) is not run while training; a
    ModelSamplingDiscrete-like object patch (another noise schedule) is what training uses."""
    import comfy.model_sampling

    from apt_core.trainer import AptTrainer
    from tiny import config

    _, _, patcher, cdataset = pair
    clone = patcher.clone()

    def freeu(h, hsp, transformer_options):
        raise KeyError("sigmas")  # what a sampling-time patch does without a sampler

    clone.set_model_output_block_patch(freeu)
    sampling = type("ZSNR", (comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION), {})(
        clone.model.model_config)
    clone.add_object_patch("model_sampling", sampling)
    backbone = cb.ComfySDXLBackbone(clone)
    assert backbone.prediction_type == "v_prediction"
    torch.testing.assert_close(backbone.alphas_cumprod, 1.0 / (1.0 + sampling.sigmas.float() ** 2))
    trainer = AptTrainer(backbone, cdataset, config(2, learning_rate=1e-2))
    trainer.run()
    trainer.close()


def test_a_failure_while_attaching_leaves_the_shared_unet_clean(cb, pair, monkeypatch):
    from apt_core.trainer import AptTrainer
    from tiny import config

    _, _, patcher, cdataset = pair
    unet = patcher.model.diffusion_model
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}

    def out_of_memory(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(cb.ComfySDXLBackbone, "load", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        AptTrainer(cb.ComfySDXLBackbone(patcher), cdataset, config(2))
    assert not patcher.weight_wrapper_patches
    assert not any(vars(m).get("weight_function") or vars(m).get("bias_function") for m in unet.modules())
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
