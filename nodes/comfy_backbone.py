"""The ComfyUI side of the backbone seam: `apt_core.backbone.Backbone` around a host MODEL.

ComfyUI's MODEL is a `comfy.model_patcher.ModelPatcher` whose `.model` is a `comfy.model_base.SDXL`
holding the SGM `UNetModel` as `.diffusion_model`. This adapter lets `apt_core.AptTrainer` train
that UNet in place:

- `predict` calls `diffusion_model(x, timesteps, context, y=adm)`. The cached conditioning stores
  ComfyUI's full `y` vector (pooled CLIP-G output + the embedded size/crop ids, built once by the
  model's own `encode_adm`) in `SDXLConditioning.pooled`, so no size embedding runs per step.
- RS: forward hooks on the `SpatialTransformer` of every decoder (`output_blocks`) stage at the
  hooked resolutions (diffusers `up_blocks.i.attentions.j` <-> SGM `output_blocks.3i+j.1`).
- AA: those stages' `attn2` modules get an instance-level `forward` that computes explicit
  probabilities while the probe asks for them and otherwise calls ComfyUI's own (optimized) forward.
- Gradient checkpointing wraps the `forward` of each ResBlock / SpatialTransformer (ComfyUI calls
  the layers of a `TimestepEmbedSequential` one by one, so wrapping the sequential would do nothing).

Everything installed is undone by `ProbeHandle.remove()` / `set_gradient_checkpointing(False)`, and
the peft LoRA layers by `AptTrainer.close()`: the shared MODEL is left as it was found.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from apt_core.backbone import ProbeHandle, kohya_key, transformer_lora_targets
from apt_core.conditioning import SDXLConditioning
from apt_core.errors import AptModelError
from apt_core.probes import AptProbe, explicit_attention

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


def make_plain_parameters(module: nn.Module) -> int:
    """Replace parameters/buffers that are inference tensors by equal normal tensors, in place.

    ComfyUI creates and loads models inside `torch.inference_mode()`; autograd refuses to save such
    tensors for backward, and a frozen weight downstream of a LoRA layer is saved. The values stay
    bit-identical (so sampling with the model is unchanged); returns how many tensors were replaced.

    Memory: tensors are swapped one at a time and the module held the only reference to the old
    one, so it is freed right away (the CUDA caching allocator reuses it for the next copy). No
    second copy of the UNet is kept; the peak extra is the largest single tensor. Measured on the
    tiny test UNet: 618 tensors (12.4 MB) replaced, none of the originals alive afterwards (see
    tests/test_nodes_job.py). Computed for SDXL (not measured on a GPU): 2,567,463,684 UNet
    parameters = 5.13 GB in fp16 would be the cost of keeping a full copy; the actual transient
    peak is its largest tensor, output_blocks.0.0.in_layers.2.weight (1280 x 2560 x 3 x 3) =
    59 MB in fp16. Copying only the LoRA-targeted modules would not be enough: autograd saves every
    frozen weight that acts on an activation needing a gradient, i.e. nearly all layers after
    the first LoRA layer.
    """
    replaced = 0
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                    replaced += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    replaced += 1
    return replaced


class ComfySDXLBackbone:
    """`apt_core.backbone.Backbone` for a ComfyUI SDXL MODEL (ModelPatcher)."""

    def __init__(self, patcher):
        import comfy.model_base

        check_comfy_sdxl(patcher)
        self.patcher = patcher
        self.base_model = patcher.model
        self.unet: nn.Module = self.base_model.diffusion_model
        sigmas = self.base_model.model_sampling.sigmas.detach().float().cpu()
        # ComfyUI stores the discrete schedule as sigmas; alpha_bar = 1 / (1 + sigma^2).
        self.alphas_cumprod = 1.0 / (1.0 + sigmas.pow(2))
        self.prediction_type = ("v_prediction" if self.base_model.model_type
                                == comfy.model_base.ModelType.V_PREDICTION else "epsilon")
        self._checkpointed: list[nn.Module] = []

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

    # ---- Backbone protocol -------------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: SDXLConditioning) -> torch.Tensor:
        """x_t: (B, 4, h, w) noisy latents (already scaled like ComfyUI's calculate_input);
        t: (B,) integer timesteps; cond.pooled holds ComfyUI's adm vector y (B, adm_channels)."""
        dtype = self.compute_dtype
        return self.unet(x_t.to(dtype), timesteps=t.float(), context=cond.context.to(dtype),
                         y=cond.pooled.to(dtype), transformer_options={})

    def lora_target_names(self, include_feed_forward: bool = False) -> list[str]:
        return transformer_lora_targets(self.unet, include_feed_forward)

    def kohya_key(self, module_name: str) -> str:
        """SGM module path -> kohya key, e.g. lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q."""
        return kohya_key(module_name)

    def decoder_stages(self, factors: tuple[int, ...]) -> list[tuple[str, nn.Module]]:
        """(name, SpatialTransformer) of each decoder stage whose latent downsampling factor is in
        `factors` (SDXL: output_blocks 0-2 at 4 = 32x32 for 1024 px, 3-5 at 2 = 64x64)."""
        factor = 1
        for block in self.unet.input_blocks:
            if any(_class_name(layer) == "Downsample" for layer in block):
                factor *= 2
        picked = []
        for k, block in enumerate(self.unet.output_blocks):
            for j, layer in enumerate(block):
                if _class_name(layer) in ("SpatialTransformer", "SpatialVideoTransformer") and factor in factors:
                    picked.append((f"output_blocks.{k}.{j}", layer))
            if any(_class_name(layer) == "Upsample" for layer in block):
                factor //= 2
        return picked

    def attach_probe(self, probe: AptProbe, up_block_factors: tuple[int, ...]) -> ProbeHandle:
        handle = ProbeHandle()
        for stage_name, stage in self.decoder_stages(tuple(up_block_factors)):
            if probe.rs:
                hook = stage.register_forward_hook(
                    lambda mod, inp, out, n=stage_name: probe.record_features(n, out))
                handle.undo.append(hook.remove)
                handle.rs_layers.append(stage_name)
            if probe.aa:
                for m, tblock in enumerate(stage.transformer_blocks):
                    attn = getattr(tblock, "attn2", None)
                    if attn is None:
                        continue
                    name = f"{stage_name}.transformer_blocks.{m}.attn2"
                    handle.undo.append(_replace_forward(attn, _recording_attn2_forward(attn, name, probe)))
                    handle.aa_layers.append(name)
        return handle

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


def _replace_forward(module: nn.Module, forward: Callable) -> Callable[[], None]:
    """Install `forward` as an instance attribute; returns the undo function."""
    had = "forward" in vars(module)
    previous = vars(module).get("forward")
    module.forward = forward

    def undo() -> None:
        if had:
            module.forward = previous
        else:
            vars(module).pop("forward", None)

    return undo


def _recording_attn2_forward(attn: nn.Module, name: str, probe: AptProbe) -> Callable:
    """ComfyUI CrossAttention.forward with explicit softmax probabilities while the probe wants them."""
    fused = attn.forward  # the class's forward, bound: ComfyUI's optimized attention

    def forward(x, context=None, value=None, mask=None, transformer_options={}):
        if not probe.explicit_attention or context is None or mask is not None:
            return fused(x, context=context, value=value, mask=mask, transformer_options=transformer_options)
        heads, dim_head = attn.heads, attn.dim_head
        b = x.shape[0]
        q = attn.to_q(x)
        k = attn.to_k(context)
        v = attn.to_v(value if value is not None else context)
        q = q.view(b, -1, heads, dim_head).transpose(1, 2)
        k = k.view(b, -1, heads, dim_head).transpose(1, 2)
        v = v.view(b, -1, heads, dim_head).transpose(1, 2)
        out, probs = explicit_attention(q, k, v, dim_head ** -0.5)
        probe.record_attention(name, probs)
        out = out.transpose(1, 2).reshape(b, -1, heads * dim_head).to(q.dtype)
        return attn.to_out(out)

    return forward
