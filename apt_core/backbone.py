"""The backbone seam: what the trainer needs from an SDXL UNet, whoever loaded it.

`DiffusersSDXLBackbone` adapts a diffusers `UNet2DConditionModel`. The ComfyUI node pack writes
its own adapter with the same methods around the host's UNet (SGM module names), so the trainer,
the probe and the LoRA export never care which host they run in.

The backbone also owns the trainable LoRA (`attach_lora`) and says where training computes
(`device`, `dtype`): a host may keep the weights elsewhere (offloaded, memory-mapped) and bring
them to its compute device per operation, so neither is read off the UNet's parameters. The
diffusers backbone injects peft layers; the ComfyUI one registers the host's own weight adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from contextlib import AbstractContextManager
from typing import Callable, Protocol

import torch
from torch import nn

from .conditioning import SDXLConditioning
from .config import LoraConfig
from .probes import AptProbe, decoder_stages, recorded_attention


class TrainableLora(Protocol):
    """The LoRA a backbone attached: the trainer's whole view of it."""

    def parameters(self) -> list[nn.Parameter]: ...

    def set_enabled(self, enabled: bool) -> None: ...

    def disabled(self) -> AbstractContextManager[None]: ...  # the prior: LoRA off, back on after

    def set_input_cast(self, enabled: bool) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...  # {"<module>.down": (r, in), "<module>.up": (out, r)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def remove(self) -> None: ...  # leaves the UNet exactly as it was found


class Backbone(Protocol):
    unet: nn.Module
    alphas_cumprod: torch.Tensor  # (T,) of the training noise schedule
    prediction_type: str  # "epsilon" | "v_prediction"
    device: torch.device  # where training computes (the host's compute device)
    dtype: torch.dtype  # the UNet weights' dtype: what x_t and the conditioning are cast to

    def attach_lora(self, cfg: LoraConfig, seed: int) -> TrainableLora: ...

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: SDXLConditioning) -> torch.Tensor: ...

    def lora_target_names(self, include_feed_forward: bool) -> list[str]: ...

    def kohya_key(self, module_name: str) -> str: ...

    def attach_probe(self, probe: AptProbe, up_block_factors: tuple[int, ...]) -> "ProbeHandle": ...

    def set_gradient_checkpointing(self, enabled: bool) -> None: ...


@dataclass
class ProbeHandle:
    """Undo list of what attach_probe installed; `remove()` restores the modules exactly."""

    undo: list[Callable[[], None]] = field(default_factory=list)
    rs_layers: list[str] = field(default_factory=list)
    aa_layers: list[str] = field(default_factory=list)

    def remove(self) -> None:
        while self.undo:
            self.undo.pop()()


ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")


def transformer_lora_targets(unet: nn.Module, include_feed_forward: bool = False) -> list[str]:
    """Names of the nn.Linear projections inside transformer blocks that get a LoRA.

    The suffixes are the same in diffusers and ComfyUI/SGM module trees.
    """
    suffixes = ATTENTION_PROJECTIONS + (FEED_FORWARD if include_feed_forward else ())
    return [name for name, module in unet.named_modules()
            if isinstance(module, nn.Linear) and ".transformer_blocks." in name and name.endswith(suffixes)]


def kohya_key(module_name: str) -> str:
    """Module path -> kohya key: `a.b.0.to_q` -> `lora_unet_a_b_0_to_q` (either naming scheme)."""
    return "lora_unet_" + module_name.replace(".", "_")


class RecordingCrossAttnProcessor:
    """attn2 processor: fused SDPA normally, explicit probabilities while the probe asks for them."""

    def __init__(self, name: str, probe: AptProbe, fused: Callable):
        self.name = name
        self.probe = probe
        self.fused = fused

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        if not self.probe.explicit_attention or encoder_hidden_states is None or hidden_states.ndim != 3:
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        query = attn.to_q(hidden_states)
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        out = recorded_attention(self.probe, self.name, query, key, value, attn.heads, attn.scale)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class DiffusersSDXLBackbone:
    """A diffusers SDXL UNet (`UNet2DConditionModel` with text_time conditioning)."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        from .models import check_sdxl_unet

        check_sdxl_unet(unet)
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod.float()
        self.prediction_type = prediction_type

    @classmethod
    def from_components(cls, components) -> "DiffusersSDXLBackbone":
        sched = components.scheduler
        return cls(components.unet, sched.alphas_cumprod, sched.config.prediction_type)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def attach_lora(self, cfg: LoraConfig, seed: int) -> TrainableLora:
        from .lora import LoraAdapter

        return LoraAdapter(self.unet, self.lora_target_names(cfg.include_feed_forward), cfg, seed=seed)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: SDXLConditioning) -> torch.Tensor:
        """x_t: (B, 4, h, w); t: (B,) -> model output (B, 4, h, w)."""
        return self.unet(x_t, t, encoder_hidden_states=cond.context,
                         added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids},
                         return_dict=False)[0]

    def lora_target_names(self, include_feed_forward: bool = False) -> list[str]:
        return transformer_lora_targets(self.unet, include_feed_forward)

    def kohya_key(self, module_name: str) -> str:
        return kohya_key(module_name)

    def attach_probe(self, probe: AptProbe, up_block_factors: tuple[int, ...]) -> ProbeHandle:
        from diffusers.models.attention_processor import AttnProcessor2_0

        handle = ProbeHandle()
        unet = self.unet
        for stage_name, stage in decoder_stages(unet.down_blocks, unet.up_blocks, "up_blocks", up_block_factors):
            if probe.rs:
                hook = stage.register_forward_hook(
                    lambda mod, inp, out, n=stage_name: probe.record_features(
                        n, out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)))
                handle.undo.append(hook.remove)
                handle.rs_layers.append(stage_name)
            if probe.aa:
                for k, tblock in enumerate(stage.transformer_blocks):
                    attn = tblock.attn2
                    name = f"{stage_name}.transformer_blocks.{k}.attn2"
                    original = attn.processor
                    attn.set_processor(RecordingCrossAttnProcessor(name, probe, AttnProcessor2_0()))
                    handle.undo.append(lambda a=attn, p=original: a.set_processor(p))
                    handle.aa_layers.append(name)
        return handle

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
