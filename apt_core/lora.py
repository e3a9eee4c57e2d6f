"""LoRA layers on the UNet's attention projections, via peft, with a switch for the prior pass.

With `LoraConfig.include_conv` the 3x3 convolutions of every resnet get a LoRA too (LoCon:
down = Conv2d(in, r, 3x3), up = Conv2d(r, out, 1x1), exported as 4-D kohya tensors).

The pretrained prior is the same UNet with every LoRA layer switched off; no second copy of the
weights exists. `remove()` puts the original nn.Linear modules back, so a host-owned UNet is left
exactly as it was found.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Iterator

import peft
import torch
from peft.helpers import disable_input_dtype_casting
from peft.tuners.lora import LoraLayer
from torch import nn

from .config import LoraConfig

ADAPTER = "apt"

# The two 3x3 convolutions of a resnet block: diffusers (ResnetBlock2D) and ComfyUI/SGM (ResBlock).
RESNET_CONV_SUFFIXES = (".conv1", ".conv2", ".in_layers.2", ".out_layers.3")


def resnet_conv_targets(model: nn.Module) -> list[str]:
    """Names of the 3x3 nn.Conv2d layers inside the UNet's resnet blocks (either naming scheme)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and not isinstance(m, LoraLayer) and name.endswith(RESNET_CONV_SUFFIXES)
            and (".resnets." in name or ".in_layers." in name or ".out_layers." in name)
            and tuple(m.kernel_size) == (3, 3)]


class SwitchableLora:
    """What every backbone's LoRA shares: `layers` by module name, the prior switch, the state check."""

    layers: dict

    def set_enabled(self, enabled: bool) -> None:
        raise NotImplementedError

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The pretrained prior: every LoRA layer switched off for the duration."""
        self.set_enabled(False)
        try:
            yield
        finally:
            self.set_enabled(True)

    def check_state(self, state: dict[str, torch.Tensor]) -> None:
        """Raise unless `state` holds exactly this LoRA's '<module>.down' / '<module>.up' tensors."""
        expected = {f"{n}.{part}" for n in self.layers for part in ("down", "up")}
        if set(state) != expected:
            raise ValueError("the checkpoint's LoRA layers do not match this model/rank settings")


class LoraAdapter(SwitchableLora):
    """Injects trainable LoRA layers into `model` at the named nn.Linear modules (plus the resnet
    convolutions when `cfg.include_conv`)."""

    def __init__(self, model: nn.Module, target_names: list[str], cfg: LoraConfig, seed: int = 0):
        cfg.validate()
        if getattr(cfg, "include_conv", False):
            target_names = list(dict.fromkeys(list(target_names) + resnet_conv_targets(model)))
        if not target_names:
            raise ValueError("no LoRA target modules found in the UNet")
        self.model = model
        self.config = cfg
        self._no_input_cast = ExitStack()
        self._frozen = {id(p): p.requires_grad for p in model.parameters()}
        self._had_peft_config = hasattr(model, "peft_config")
        for p in model.parameters():
            p.requires_grad_(False)
        peft_cfg = peft.LoraConfig(r=int(cfg.rank), lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                   target_modules=list(target_names), init_lora_weights=True)
        peft.inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
        self.layers: dict[str, LoraLayer] = {
            name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        missing = set(target_names) - set(self.layers)
        if missing:
            raise ValueError(f"LoRA could not wrap {len(missing)} modules, e.g. {sorted(missing)[:3]}")
        generator = torch.Generator().manual_seed(seed)
        for layer in self.layers.values():
            down, up = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
            down.float(), up.float()  # trainable weights stay fp32 under bf16 autocast
            # peft's default init (kaiming-uniform down, zero up) drawn from our own generator,
            # so a seed fixes the run whatever the global RNG did before.
            weight = torch.empty(down.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            with torch.no_grad():
                down.weight.copy_(weight)
                up.weight.zero_()
            down.weight.requires_grad_(True)
            up.weight.requires_grad_(True)

    @property
    def scale(self) -> float:
        return self.config.alpha / self.config.rank

    def parameters(self) -> list[nn.Parameter]:
        params = []
        for layer in self.layers.values():
            params += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
        return params

    def set_input_cast(self, enabled: bool) -> None:
        """peft casts each LoRA layer's input to the fp32 LoRA weights' dtype. Under autocast the
        matmuls run in the autocast dtype whatever the input's dtype, so that cast is a copy of the
        activation (and one more op in backward) that changes nothing: switch it off there (peft's
        `disable_input_dtype_casting`, held open until switched back on or `remove()`)."""
        self._no_input_cast.close()
        if not enabled:
            self._no_input_cast.enter_context(disable_input_dtype_casting(self.model))

    def set_enabled(self, enabled: bool) -> None:
        # peft's public switch; switching off also clears requires_grad on the LoRA weights and
        # switching on sets it again, so the prior pass cannot train them.
        for layer in self.layers.values():
            layer.enable_adapters(enabled)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"<module>.down": (r, in), "<module>.up": (out, r)} detached fp32 copies
        (convolutions: (r, in, k, k) and (out, r, 1, 1))."""
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.down"] = layer.lora_A[ADAPTER].weight.detach().float().cpu().clone()
            out[f"{name}.up"] = layer.lora_B[ADAPTER].weight.detach().float().cpu().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.check_state(state)
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.lora_A[ADAPTER].weight.copy_(state[f"{name}.down"])
                layer.lora_B[ADAPTER].weight.copy_(state[f"{name}.up"])

    def remove(self) -> None:
        """Replace every LoRA layer by its original module and restore requires_grad flags."""
        self._no_input_cast.close()
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, layer.get_base_layer())
        self.layers = {}
        if not self._had_peft_config and hasattr(self.model, "peft_config"):
            del self.model.peft_config  # peft records its config on the model it injects into
        for p in self.model.parameters():
            p.requires_grad_(self._frozen.get(id(p), p.requires_grad))
