"""TEST-ONLY ComfyUI custom nodes: a tiny SDXL-shaped MODEL/CLIP/VAE for the integration tests.

Loaded only by tests/test_nodes_integration.py (an extra custom_nodes path of its ComfyServer);
never shipped with the pack. ComfyUI's checkpoint detection does not recognise a tiny UNet as SDXL,
so the MODEL is built directly as `comfy.supported_models.SDXL` (via tests/comfy_host.py) with
the weights of a seeded tiny diffusers UNet; the CLIP is a real `comfy.sd.CLIP` with ComfyUI's
SDXL classes and tiny text-model configs (real CLIP tokenizer); the VAE a real `comfy.sd.VAE` with
a tiny AutoencoderKL config. Everything is random but deterministic per seed, and memoised so
every prompt gets the very same MODEL object.
"""

from __future__ import annotations

import os
import sys

import torch

# tests/ holds comfy_host.py (the diffusers -> ComfyUI UNet converter). `apt_core` is NOT put on the
# path: the APT pack (loaded first) must have imported it, as in a real ComfyUI.
_TESTS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

from comfy_api.latest import ComfyExtension, io  # noqa: E402

TEXT_L = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, projection_dim=32)
TEXT_G = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, projection_dim=48)
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
_BUILT: dict = {}


def _tiny_model_module():
    """quality/tiny_model.py, loaded from its file: the repository root stays off sys.path."""
    import importlib.util

    path = os.path.join(_TESTS, "..", "quality", "tiny_model.py")
    spec = importlib.util.spec_from_file_location("apt_test_models_tiny_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_unet_config(kind: str) -> dict:
    cfg = dict(_tiny_model_module().tiny_sdxl_unet_config())
    cfg["cross_attention_dim"] = TEXT_L["hidden_size"] + TEXT_G["hidden_size"]  # 80
    # ComfyUI's CLIP-G projection is hidden x hidden: pooled 48 + 6 size ids x 8.
    cfg["projection_class_embeddings_input_dim"] = TEXT_G["hidden_size"] + 6 * cfg["addition_time_embed_dim"]
    if kind == "sd15":
        for k in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            cfg.pop(k)
    return cfg


def _random_fill(module: torch.nn.Module, seed: int) -> None:
    """Deterministic weights for modules ComfyUI created without init (ops.disable_weight_init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), torch.no_grad():
        for name, p in sorted(module.state_dict().items()):
            if not p.is_floating_point():
                continue
            if name.endswith("bias") or p.ndim == 0:
                val = torch.zeros(p.shape)
            elif p.ndim == 1:
                val = torch.ones(p.shape)  # norm weights
            else:
                fan_in = max(1, p[0].numel())
                val = torch.randn(p.shape, generator=g) / fan_in ** 0.5
            p.copy_(val.to(p.dtype))


def build_model(seed: int, kind: str, dtype=None):
    """A ModelPatcher of the tiny UNet; dtype: ComfyUI's weight dtype for "sdxl" (default float32)."""
    import comfy.model_patcher
    import comfy.supported_models
    import comfy_host as ch
    from diffusers import UNet2DConditionModel

    cfg = tiny_unet_config(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfg).eval()
    if kind == "sdxl":
        patcher = ch.comfy_sdxl_model_from_diffusers_config(unet.config, dtype=dtype)
    else:
        cc = ch.diffusers_to_comfy_unet_config(unet.config)
        mc = comfy.supported_models.SD15(cc)
        mc.unet_config["num_heads"], mc.unet_config["num_head_channels"] = cc["num_heads"], cc["num_head_channels"]
        model = mc.get_model({}, device=torch.device("cpu"))
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                                   offload_device=torch.device("cpu"))
    ch.load_diffusers_unet_into_comfy(unet, patcher)
    return patcher


def build_clip(seed: int):
    import comfy.sd
    import comfy.supported_models_base
    from comfy.sdxl_clip import SDXLClipModel, SDXLTokenizer

    target = comfy.supported_models_base.ClipTarget(SDXLTokenizer, SDXLClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"clip_l_model_config": dict(TEXT_L),
                                                       "clip_g_model_config": dict(TEXT_G)})
    _random_fill(clip.cond_stage_model, seed + 1)
    return clip


def build_vae(seed: int):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.inference_mode(False):
        shapes = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)
        sd = {k: v.detach().clone().float() for k, v in shapes.state_dict().items()}
    holder = torch.nn.Module()
    for i, (k, v) in enumerate(sd.items()):
        holder.register_buffer(f"b{i}", v)
    _random_fill(holder, seed + 2)
    sd = {k: getattr(holder, f"b{i}") for i, k in enumerate(sd)}
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": dict(VAE_DDCONFIG), "embed_dim": 4}},
                        dtype=torch.float32)


class APTTestTinySDXL(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="APTTestTinySDXL", display_name="APT TEST tiny SDXL", category="_apt_tests",
            inputs=[io.Int.Input("seed", default=0, min=0, max=1000, tooltip="model seed"),
                    io.Combo.Input("kind", options=["sdxl", "sd15"], default="sdxl", tooltip="architecture")],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()])

    @classmethod
    def execute(cls, seed: int, kind: str):
        key = (int(seed), kind)
        if key not in _BUILT:
            _BUILT[key] = (build_model(seed, kind), build_clip(seed), build_vae(seed))
        return io.NodeOutput(*_BUILT[key])


class APTTestModelPass(io.ComfyNode):
    """Returns its MODEL unchanged; a new nonce makes everything downstream run again."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="APTTestModelPass", display_name="APT TEST model pass", category="_apt_tests",
            inputs=[io.Model.Input("model", tooltip="model"), io.Int.Input("nonce", default=0, tooltip="nonce")],
            outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, nonce: int):
        return io.NodeOutput(model)


class _Ext(ComfyExtension):
    async def get_node_list(self):
        return [APTTestTinySDXL, APTTestModelPass]


async def comfy_entrypoint():
    return _Ext()
