"""The trainable LoRA on a ComfyUI MODEL, through the host's own weight adapters.

Each target projection gets a `comfy.weight_adapter` LoRA (`LoraDiff`, what ComfyUI's own trainer
trains), registered with `ModelPatcher.add_weight_wrapper`. When the patcher loads the model, the
host puts it in that module's `weight_function` list, and its ops apply it to the weight they cast
for each operation: W + alpha / r * up @ down, on the patcher's load device. Nothing in the UNet is
renamed, replaced or re-parameterised, so module names (and the kohya keys made from them) are the
host's, and removing our entries from those lists restores every module exactly.

Frozen weights that autograd cannot save (ComfyUI loads models under `torch.inference_mode()`) get
an identity wrapper: the host's cast then hands each operation a fresh copy, which is what ComfyUI's
own trainer gets from putting an adapter on every layer. A model loaded outside inference mode (the
non-dynamic delegate of a dynamic-VRAM patcher, see comfy_backbone.training_patcher) needs none.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from apt_core.config import LoraConfig
from apt_core.lora import SwitchableLora, resnet_conv_targets

PREFIX = "diffusion_model."  # module names in the patcher's keys are relative to the BaseModel


def autograd_unsafe(t: torch.Tensor | None) -> bool:
    """True for a tensor autograd refuses to save for backward: an inference tensor, or a parameter
    whose data was swapped (moved, cast) outside inference mode and lost its version counter."""
    if t is None:
        return False
    if t.is_inference():
        return True
    try:
        t._version  # noqa: B018 - raises for the swapped kind
    except RuntimeError:
        return True
    return False


def fresh_weight(w: torch.Tensor) -> torch.Tensor:
    """Identity weight wrapper: its presence makes the host's cast copy the weight for each op."""
    return w


_DIFF_CLASS = None


def _lora_diff_class():
    """comfy.weight_adapter.lora.LoraDiff with an on/off switch for the prior pass."""
    global _DIFF_CLASS
    if _DIFF_CLASS is None:
        from comfy.weight_adapter.lora import LoraDiff

        class AptLoraDiff(LoraDiff):
            enabled = True

            def __call__(self, w):
                return super().__call__(w) if self.enabled else w

        _DIFF_CLASS = AptLoraDiff
    return _DIFF_CLASS


class ComfyLora(SwitchableLora):
    """`apt_core.backbone.TrainableLora` on a ModelPatcher: one host LoRA adapter per target module.

    The adapters are registered on `patcher`; they act once the patcher is loaded (the backbone does
    that). The down weights are drawn like peft's default init (kaiming-uniform, up zero) from a
    generator of `seed`, so a seed fixes the run on either backbone.
    """

    def __init__(self, patcher, target_names: list[str], cfg: LoraConfig, seed: int, device: torch.device):
        cfg.validate()
        unet = patcher.model.diffusion_model
        if getattr(cfg, "include_conv", False):
            target_names = list(dict.fromkeys(list(target_names) + resnet_conv_targets(unet)))
        if not target_names:
            raise ValueError("no LoRA target modules found in the UNet")
        self.patcher, self.unet, self.config = patcher, unet, cfg
        # Only the adapters train. ComfyUI 0.3.75 leaves the UNet's weights requiring grad (v0.33
        # freezes them): autograd would fill a UNet-sized gradient buffer every step. Restored by remove().
        self._requires_grad = {name: p.requires_grad for name, p in unet.named_parameters()}
        unet.requires_grad_(False)
        self.layers: dict[str, nn.Module] = {}
        self._shapes: dict[str, torch.Size] = {}
        self.fresh: list[str] = []  # "<module>.weight" / "<module>.bias" given a fresh copy per op
        try:
            self._register(target_names, cfg, seed, device)
        except BaseException:
            self.remove()  # nothing half-registered stays on the patcher or the shared UNet
            raise

    def _register(self, target_names: list[str], cfg: LoraConfig, seed: int, device: torch.device) -> None:
        unet, patcher = self.unet, self.patcher
        diff_class = _lora_diff_class()
        generator = torch.Generator().manual_seed(seed)
        for name in target_names:
            module = unet.get_submodule(name)
            shape = module.weight.shape
            down = torch.empty(int(cfg.rank), shape[1:].numel(), dtype=torch.float32)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
            up = torch.zeros(shape[0], int(cfg.rank), dtype=torch.float32)
            diff = diff_class((up, down, float(cfg.alpha), None, None, None)).to(device).requires_grad_(True)
            diff.alpha.requires_grad_(False)
            self.layers[name] = diff
            self._shapes[name] = shape
            patcher.add_weight_wrapper(f"{PREFIX}{name}.weight", diff)
        for name, module in unet.named_modules():
            if not hasattr(module, "weight_function"):
                continue
            for kind in ("weight", "bias"):  # norms save both for backward
                if (kind == "bias" or name not in self.layers) and autograd_unsafe(getattr(module, kind, None)):
                    patcher.add_weight_wrapper(f"{PREFIX}{name}.{kind}", fresh_weight)
                    self.fresh.append(f"{name}.{kind}")

    def installed(self) -> bool:
        """Whether the host put every adapter into its module (the patcher is loaded)."""
        return all(any(f is diff for f in getattr(self.unet.get_submodule(n), "weight_function", []))
                   for n, diff in self.layers.items())

    def parameters(self) -> list[nn.Parameter]:
        params = []
        for diff in self.layers.values():
            params += [diff.lora_down.weight, diff.lora_up.weight]
        return params

    def set_input_cast(self, enabled: bool) -> None:
        """Nothing to do: the adapter changes the weight, not the activation."""

    def set_enabled(self, enabled: bool) -> None:
        for diff in self.layers.values():
            diff.enabled = enabled

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"<module>.down": (r, in), "<module>.up": (out, r)} detached fp32 CPU copies
        (convolutions: (r, in, k, k) and (out, r, 1, 1), as peft's LoCon layers)."""
        out = {}
        for name, diff in self.layers.items():
            shape = self._shapes[name]
            down, up = diff.lora_down.weight.detach().float().cpu(), diff.lora_up.weight.detach().float().cpu()
            if len(shape) > 2:
                down = down.reshape(down.shape[0], *shape[1:])
                up = up.reshape(*up.shape, *([1] * (len(shape) - 2)))
            out[f"{name}.down"], out[f"{name}.up"] = down.clone(), up.clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.check_state(state)
        with torch.no_grad():
            for name, diff in self.layers.items():
                diff.lora_down.weight.copy_(state[f"{name}.down"].reshape(diff.lora_down.weight.shape))
                diff.lora_up.weight.copy_(state[f"{name}.up"].reshape(diff.lora_up.weight.shape))

    def remove(self) -> None:
        """Take every wrapper of ours out of the patcher and out of the modules' weight_function."""
        ours = {f"{PREFIX}{n}.weight" for n in self.layers} | {PREFIX + n for n in self.fresh}
        mine = set(map(id, self.layers.values())) | {id(fresh_weight)}
        wrappers = self.patcher.weight_wrapper_patches
        for key in ours:
            kept = [f for f in wrappers.get(key, []) if id(f) not in mine]
            if kept:
                wrappers[key] = kept
            else:
                wrappers.pop(key, None)
        for name, kind in [(n, "weight") for n in self.layers] + [tuple(n.rsplit(".", 1)) for n in self.fresh]:
            functions = vars(self.unet.get_submodule(name)).get(f"{kind}_function")  # the host's per-module list
            if functions is not None:
                functions[:] = [f for f in functions if id(f) not in mine]
        for diff in self.layers.values():
            diff.requires_grad_(False)
        for name, p in self.unet.named_parameters():
            flag = self._requires_grad.get(name, p.requires_grad)
            if p.requires_grad != flag:  # an inference tensor's flag can be set back only in inference mode
                with torch.inference_mode(p.is_inference()):
                    p.requires_grad_(flag)
        self.layers, self.fresh = {}, []
