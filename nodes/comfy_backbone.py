"""The ComfyUI side of the backbone seam: `apt_core.backbone.Backbone` around a host MODEL.

ComfyUI's MODEL is a `comfy.model_patcher.ModelPatcher` whose `.model` is a `comfy.model_base.SDXL`
holding the SGM `UNetModel` as `.diffusion_model`. This adapter trains it the host's way, on a
clone of the MODEL (`training_patcher`):

- Device: the patcher's `load_device`, never a parameter's (a host may keep weights offloaded).
  A dynamic-VRAM patcher (ComfyUI v0.33+ on NVIDIA: weights stay on the offload device and are
  streamed per operation) is swapped for the host's non-dynamic delegate, loaded fresh outside
  inference mode, so training holds its weights like any fully loaded model.
- LoRA: the host's own weight adapters (nodes/comfy_lora.py), registered on the patcher and put in
  place when `load()` loads it; the prior pass is the same model with the adapters switched off.
- `predict` calls `diffusion_model(x, timesteps, context, y=adm, transformer_options=...)` with
  APT's own attention patches only (`transformer_options`: no sampling-time patches of the MODEL).
  The cached conditioning stores ComfyUI's full `y` vector (pooled CLIP-G output + the embedded
  size/crop ids, built once by the model's own `encode_adm`) in `SDXLConditioning.pooled`.
- RS: forward hooks on the `SpatialTransformer` of every decoder (`output_blocks`) stage at the
  hooked resolutions (diffusers `up_blocks.i.attentions.j` <-> SGM `output_blocks.3i+j.1`).
- AA: those stages' cross-attention goes through ComfyUI's attn2 replace patches
  (`transformer_options["patches_replace"]["attn2"]`, keyed by block): explicit probabilities
  while the probe asks for them, the host's optimized attention otherwise.
- Gradient checkpointing wraps the `forward` of each ResBlock / SpatialTransformer (ComfyUI calls
  the layers of a `TimestepEmbedSequential` one by one, so wrapping the sequential would do nothing).

Everything installed is undone by `ProbeHandle.remove()`, `set_gradient_checkpointing(False)` and
the LoRA's `remove()` (`AptTrainer.close()`): the shared MODEL is left as it was found.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from apt_core.backbone import ProbeHandle, kohya_key, transformer_lora_targets
from apt_core.conditioning import SDXLConditioning
from apt_core.config import LoraConfig
from apt_core.errors import AptModelError
from apt_core.probes import AptProbe, decoder_stages, recorded_attention

from .comfy_lora import ComfyLora

NOT_SDXL = ("APT LoRA Trainer needs an SDXL model (SDXL base 1.0 or an SDXL fine-tune such as "
            "Juggernaut XL, RealVisXL, Pony or Illustrious), loaded with the standard 'Load Checkpoint' "
            "node.")


def _class_name(module: nn.Module) -> str:
    return type(module).__name__


def check_comfy_sdxl(model) -> None:
    """Raise AptModelError unless `model` (ModelPatcher or BaseModel) is a ComfyUI SDXL UNet model."""
    import comfy.model_base

    base = getattr(model, "model", model)
    if not isinstance(base, comfy.model_base.BaseModel):
        raise AptModelError(f"expected a ComfyUI MODEL, got {type(model).__name__}. {NOT_SDXL}")
    if isinstance(base, comfy.model_base.SDXLRefiner):
        raise AptModelError(f"This is the SDXL *refiner*; LoRAs are trained on the base model. {NOT_SDXL}")
    if not isinstance(base, comfy.model_base.SDXL):
        raise AptModelError(f"The connected model is {type(base).__name__}, not SDXL. {NOT_SDXL}")
    unet = getattr(base, "diffusion_model", None)
    if unet is None or not hasattr(unet, "output_blocks") or not hasattr(unet, "input_blocks"):
        raise AptModelError(f"The connected SDXL model has no SGM UNet (diffusion_model). {NOT_SDXL}")
    if base.model_type not in (comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION):
        raise AptModelError(f"Model type {base.model_type.name} (e.g. Playground v2.5 / EDM) is not "
                            "supported yet; use an epsilon- or v-prediction SDXL checkpoint.")


def training_patcher(model):
    """The patcher to train on: a clone of `model` (shares its modules; our adapters and patches go
    on the clone only), or, for a dynamic-VRAM patcher, the host's non-dynamic delegate.

    Call it outside inference mode: the delegate is loaded fresh, and weights created there are
    ordinary tensors that autograd can save."""
    if getattr(model, "is_dynamic", lambda: False)():
        return model.clone(disable_dynamic=True)
    return model.clone()


def release_patcher(patcher) -> None:
    """Unload exactly this patcher (a delegate) from ComfyUI's loaded models. Not the host's
    unload_model_and_clones: the delegate shares its clone id with the user's MODEL, which would go too."""
    import comfy.model_management as mm

    for i in reversed(range(len(mm.current_loaded_models))):
        loaded = mm.current_loaded_models[i]
        if loaded.model is patcher:
            loaded.model_unload()
            mm.current_loaded_models.pop(i)


class ComfySDXLBackbone:
    """`apt_core.backbone.Backbone` for a ComfyUI SDXL MODEL (ModelPatcher)."""

    def __init__(self, patcher, also_load: tuple = ()):
        """patcher: the one to train on (`training_patcher`); also_load: patchers to keep loaded
        beside it (the VAE when pixel-space augmentation encodes during training)."""
        import comfy.model_sampling

        check_comfy_sdxl(patcher)
        self.patcher = patcher
        self.also_load = tuple(also_load)
        self.base_model = patcher.model
        self.unet: nn.Module = self.base_model.diffusion_model
        # The schedule as the MODEL has it, a ModelSamplingDiscrete node's object patch included
        # (it only reaches the module when the patcher loads; a delegate never has it there).
        sampling = patcher.get_model_object("model_sampling")
        sigmas = sampling.sigmas.detach().float().cpu()
        # ComfyUI stores the discrete schedule as sigmas; alpha_bar = 1 / (1 + sigma^2).
        self.alphas_cumprod = 1.0 / (1.0 + sigmas.pow(2))
        self.prediction_type = "v_prediction" if isinstance(sampling, comfy.model_sampling.V_PREDICTION) else "epsilon"
        self._checkpointed: list[nn.Module] = []
        self._attn2: dict[tuple[str, int, int], Callable] = {}  # APT's attn2 replace patches, by block

    # ---- shapes the cache must match ---------------------------------------------------------
    @property
    def context_dim(self) -> int:
        return int(self.base_model.model_config.unet_config["context_dim"])

    @property
    def adm_channels(self) -> int:
        return int(self.base_model.adm_channels)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.base_model.manual_cast_dtype or self.base_model.get_dtype()

    @property
    def device(self) -> torch.device:
        return torch.device(self.patcher.load_device)

    @property
    def dtype(self) -> torch.dtype:
        """What x_t and the conditioning are cast to: the compute dtype (never an fp8 storage dtype)."""
        return self.compute_dtype

    def load(self) -> None:
        """Load the patcher (and `also_load`) fully on the load device, the host's way: this is
        when ComfyUI puts the registered weight adapters into the modules."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher, *self.also_load], memory_required=1e20, force_full_load=True)

    def attach_lora(self, cfg: LoraConfig, seed: int) -> ComfyLora:
        lora = ComfyLora(self.patcher, self.lora_target_names(cfg.include_feed_forward), cfg, seed, self.device)
        try:
            self.load()
            if not lora.installed():  # loaded before the adapters existed: the host re-patches on a fresh load
                self.patcher.unpatch_model()
                self.load()
            if not lora.installed():
                raise AptModelError("ComfyUI did not apply the LoRA adapters to the model; "
                                    "please report this with your ComfyUI version.")
        except BaseException:
            lora.remove()  # out of memory, Cancel, ...: leave the shared modules as they were
            raise
        return lora

    def transformer_options(self) -> dict:
        """What the UNet gets while training: APT's attn2 replace patches, and the host's PyTorch
        SDPA attention when ComfyUI runs a kernel without a backward pass (sage, flash: chosen on its
        command line). Sampling-time patches and wrappers on the MODEL (FreeU, Deep Shrink, caches,
        attention overrides) need a sampler's state and would become part of what the LoRA learns:
        they are left out. A fresh dict per call: the UNet writes into it."""
        options: dict = {"patches_replace": {"attn2": dict(self._attn2)}}
        if _forward_only_attention():
            options["optimized_attention_override"] = _sdpa_attention
        return options

    # ---- Backbone protocol -------------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: SDXLConditioning) -> torch.Tensor:
        """x_t: (B, 4, h, w) noisy latents (already scaled like ComfyUI's calculate_input);
        t: (B,) integer timesteps; cond.pooled holds ComfyUI's adm vector y (B, adm_channels)."""
        dtype = self.compute_dtype
        return self.unet(x_t.to(dtype), timesteps=t.float(), context=cond.context.to(dtype),
                         y=cond.pooled.to(dtype), transformer_options=self.transformer_options())

    def lora_target_names(self, include_feed_forward: bool = False) -> list[str]:
        return transformer_lora_targets(self.unet, include_feed_forward)

    def kohya_key(self, module_name: str) -> str:
        """SGM module path -> kohya key, e.g. lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q."""
        return kohya_key(module_name)

    def decoder_stages(self, factors: tuple[int, ...]) -> list[tuple[str, nn.Module]]:
        """(name, SpatialTransformer) of each decoder stage whose latent downsampling factor is in
        `factors` (SDXL: output_blocks 0-2 at 4 = 32x32 for 1024 px, 3-5 at 2 = 64x64)."""
        return decoder_stages(self.unet.input_blocks, self.unet.output_blocks, "output_blocks", factors)

    def attach_probe(self, probe: AptProbe, up_block_factors: tuple[int, ...]) -> ProbeHandle:
        handle = ProbeHandle()
        for stage_name, stage in self.decoder_stages(tuple(up_block_factors)):
            if probe.rs:
                hook = stage.register_forward_hook(
                    lambda mod, inp, out, n=stage_name: probe.record_features(n, out))
                handle.undo.append(hook.remove)
                handle.rs_layers.append(stage_name)
            if probe.aa:
                k = int(stage_name.split(".")[1])
                for m, tblock in enumerate(stage.transformer_blocks):
                    if getattr(tblock, "attn2", None) is None:
                        continue
                    name = f"{stage_name}.transformer_blocks.{m}.attn2"
                    handle.undo.append(self._replace_attn2(("output", k, m), _recording_attn2(name, probe)))
                    handle.aa_layers.append(name)
        return handle

    def _replace_attn2(self, key: tuple[str, int, int], patch: Callable) -> Callable[[], None]:
        """Use `patch` for the attn2 of block `key` while training; returns its undo."""
        self._attn2[key] = patch
        return lambda: self._attn2.pop(key, None)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled and not self._checkpointed:
            for block in [*self.unet.input_blocks, self.unet.middle_block, *self.unet.output_blocks]:
                if block is None:
                    continue
                for layer in block:
                    if _class_name(layer) in ("ResBlock", "SpatialTransformer") and "forward" not in vars(layer):
                        original = layer.forward

                        def wrapped(*args, _f=original, **kwargs):
                            if not torch.is_grad_enabled():
                                return _f(*args, **kwargs)
                            # The UNet keeps writing its position ("block", "block_index") into the
                            # transformer options as it goes: recompute with the values of this call,
                            # or the attn2 patches would be looked up under the last block's key.
                            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
                            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
                            return checkpoint(_f, *args, use_reentrant=False, **kwargs)

                        layer.forward = wrapped
                        self._checkpointed.append(layer)
        elif not enabled:
            while self._checkpointed:
                layer = self._checkpointed.pop()
                vars(layer).pop("forward", None)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self._checkpointed)


# ComfyUI attention kernels without a backward pass (sage, flash, the quantized int8 kernel).
FORWARD_ONLY_ATTENTION = ("attention_sage", "attention3_sage", "attention_flash", "attention_comfy_kitchen_int8")


def _forward_only_attention() -> bool:
    """Whether ComfyUI's selected attention kernel is one that cannot be trained through."""
    from comfy.ldm.modules import attention

    return getattr(attention.optimized_attention, "__name__", "") in FORWARD_ONLY_ATTENTION


def _sdpa_attention(func, *args, **kwargs):
    """`optimized_attention_override`: the host's PyTorch SDPA attention in place of `func`."""
    from comfy.ldm.modules import attention

    return attention.attention_pytorch(*args, **kwargs)


def _recording_attn2(name: str, probe: AptProbe) -> Callable:
    """attn2 replace patch: explicit softmax probabilities while the probe wants them, ComfyUI's
    optimized attention otherwise. q, k, v: (B, N, heads * dim_head), already projected."""

    def attn2(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        if not probe.explicit_attention:
            from comfy.ldm.modules import attention

            return attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                                 transformer_options=extra_options)
        return recorded_attention(probe, name, q, k, v, heads, extra_options["dim_head"] ** -0.5)

    return attn2
