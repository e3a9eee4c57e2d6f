"""A random-weight SDXL single-file checkpoint with the real layout, written tensor by tensor.

No real SDXL can be shipped with the tests, and the tiny test model is too small for ComfyUI's model
detection. This module asks the ComfyUI host itself for the layout: its SDXL model class
(``comfy.supported_models.SDXL`` -> ``comfy.model_base.SDXL``), its SDXL text encoders
(``comfy.sdxl_clip.SDXLClipModel``) and its KL VAE (``comfy.ldm.models.autoencoder.AutoencoderKL``)
are built on the ``meta`` device (shapes only, no memory), and the host's own saving logic
(``BaseModel.state_dict_for_saving``, as ``comfy.sd.save_checkpoint`` uses it) names every tensor
the way a single-file checkpoint does: ``model.diffusion_model.*``, ``conditioner.embedders.*``,
``first_stage_model.*``. Before anything is written, the host's model detection must recognise the
layout as SDXL again (``comfy.model_detection``).

The file is written in the safetensors format by hand (8-byte little-endian header size, JSON
header with dtype/shape/data_offsets, then the raw bytes), one tensor at a time: the ~7 GB of fp16
data are never in memory at once. Values: normal * ``std`` (0.02), drawn from a generator seeded
per tensor name (the file is reproducible and independent of the order), normalisation weights 1
and biases 0, so activations stay finite; the CLIP position_ids are 0..76 (int64) as in a real file.

Command line (uses $APT_COMFYUI_DIR or .cache/comfyui, like tests/comfy_host.py):

    python tests/sdxl_checkpoint.py OUT.safetensors [--seed 0] [--std 0.02]
    python tests/sdxl_checkpoint.py --layout          # print the layout summary only
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

# The SGM UNet config ComfyUI's model detection produces for SDXL base 1.0 (comfy/model_detection.py
# detect_unet_config). It is checked against the host: the meta model's state dict must be detected
# again as exactly this config and as comfy.supported_models.SDXL (sdxl_layout, check_detection).
SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# The KL-f8 VAE of SD/SDXL (comfy/sd.py VAE: "default SD1.x/SD2.x VAE parameters"), embed_dim 4.
SDXL_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                     "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                     "dropout": 0.0}
UNET_PREFIX = "model.diffusion_model."
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
_TRANSFORMER_BLOCK = re.compile(r"^(.*\.transformer_blocks\.\d+)$")


@dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype           # what is written (float tensors: the requested float dtype)
    init: str                    # "normal" | "ones" | "zeros" | "copy" (a real value, e.g. position_ids)
    value: torch.Tensor | None = None  # for "copy"

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class SDXLLayout:
    specs: list[TensorSpec]
    unet: torch.nn.Module                 # the meta SGM UNet (comfy ...openaimodel.UNetModel)
    model_config: object                  # comfy.supported_models.SDXL

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def keys(self) -> list[str]:
        return [s.key for s in self.specs]


# --------------------------------------------------------------------------------------------------
# The host
# --------------------------------------------------------------------------------------------------

def import_host():
    """ComfyUI's ``comfy`` package from the host tree (tests/comfy_host.py; CPU, no CUDA touched)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import comfy_host

    if not comfy_host.comfyui_available():
        raise RuntimeError(f"no ComfyUI tree at {comfy_host.comfyui_dir()} (set APT_COMFYUI_DIR)")
    comfy = comfy_host.import_comfy(cpu=True)
    import importlib

    for name in ("comfy.sdxl_clip", "comfy.ldm.models.autoencoder", "comfy.model_detection",
                 "comfy.supported_models", "comfy.lora"):
        importlib.import_module(name)
    return comfy


def _norm_param_names(module: torch.nn.Module) -> set[str]:
    """State-dict names of the weights/biases of every normalisation layer (GroupNorm, LayerNorm,
    and the host's ops subclasses of them)."""
    out = set()
    for name, mod in module.named_modules():
        if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or "Norm" in type(mod).__name__:
            for pname, _ in mod.named_parameters(recurse=False):
                out.add(f"{name}.{pname}" if name else pname)
    return out


def _state_dict_for_saving(base_model, unet_sd: dict, clip_sd: dict | None, vae_sd: dict | None) -> dict:
    """``BaseModel.state_dict_for_saving`` of either host version (v0.33 takes the UNet's state dict
    as its first argument, 0.3.75 reads ``self.diffusion_model.state_dict()`` itself)."""
    params = inspect.signature(base_model.state_dict_for_saving).parameters
    # The host's converters rename in place: hand them copies.
    kw = {"clip_state_dict": dict(clip_sd) if clip_sd is not None else None,
          "vae_state_dict": dict(vae_sd) if vae_sd is not None else None}
    if "unet_state_dict" in params:
        kw["unet_state_dict"] = dict(unet_sd)
    return base_model.state_dict_for_saving(**kw)


def sdxl_layout(comfy=None, dtype: torch.dtype = torch.float16) -> SDXLLayout:
    """Every tensor of an SDXL single-file checkpoint, from the host's own classes on ``meta``."""
    comfy = comfy or import_host()
    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.sdxl_clip
    import comfy.supported_models

    unet_config = dict(SDXL_UNET_CONFIG, dtype=dtype)
    model_config = comfy.supported_models.SDXL(unet_config)
    meta = torch.device("meta")
    with meta:
        base = model_config.get_model({}, device=meta)
        clip = comfy.sdxl_clip.SDXLClipModel(device=meta, dtype=dtype)
        vae = autoencoder.AutoencoderKL(ddconfig=dict(SDXL_VAE_DDCONFIG), embed_dim=4)
    unet = base.diffusion_model
    unet_sd, clip_sd, vae_sd = unet.state_dict(), clip.state_dict(), vae.state_dict()
    full = _state_dict_for_saving(base, unet_sd, clip_sd, vae_sd)

    # Names of the normalisation parameters after the same renaming (the CLIP-G conversion to the
    # open_clip names renames them 1:1; only q/k/v are concatenated).
    norm_unet = {k: unet_sd[k] for k in _norm_param_names(unet)}
    norm_clip = {k: clip_sd[k] for k in _norm_param_names(clip)}
    norm_vae = {k: vae_sd[k] for k in _norm_param_names(vae)}
    # The UNet is saved under a plain prefix; 0.3.75 saves its whole UNet whatever it is given, so the
    # CLIP/VAE renaming is asked with an empty UNet and UNet keys are dropped from its answer.
    norms = {k for k in _state_dict_for_saving(base, {}, norm_clip, norm_vae) if not k.startswith(UNET_PREFIX)}
    norms |= {UNET_PREFIX + k for k in norm_unet}
    if not norms <= set(full):
        raise RuntimeError(f"normalisation names not in the checkpoint: {sorted(norms - set(full))[:5]}")
    if not norms:
        raise RuntimeError("found no normalisation layers in the SDXL layout")

    specs = []
    for key, t in full.items():
        if not t.is_floating_point():
            if t.device.type == "meta":
                raise RuntimeError(f"{key}: a non-float tensor without a value ({t.dtype})")
            specs.append(TensorSpec(key, tuple(t.shape), t.dtype, "copy", t.detach().cpu().contiguous()))
        elif key in norms:
            specs.append(TensorSpec(key, tuple(t.shape), dtype, "ones" if key.endswith("weight") else "zeros"))
        else:
            specs.append(TensorSpec(key, tuple(t.shape), dtype, "normal"))
    layout = SDXLLayout(specs=specs, unet=unet, model_config=model_config)
    check_detection(layout, comfy)
    return layout


def check_detection(layout: SDXLLayout, comfy=None) -> None:
    """The host must detect the layout as SDXL (the UNet config above, comfy.supported_models.SDXL)."""
    comfy = comfy or import_host()
    import comfy.model_detection
    import comfy.supported_models

    sd = {s.key: torch.empty(s.shape, dtype=s.dtype, device="meta") for s in layout.specs}
    detected = comfy.model_detection.detect_unet_config(sd, UNET_PREFIX)
    want = {k: v for k, v in SDXL_UNET_CONFIG.items() if k in detected}
    got = {k: detected[k] for k in want}
    if got != want:
        raise RuntimeError(f"the host detects another UNet config: {got} != {want}")
    cfg = comfy.model_detection.model_config_from_unet(sd, UNET_PREFIX)
    if type(cfg) is not comfy.supported_models.SDXL:
        raise RuntimeError(f"the host detects the layout as {type(cfg).__name__}, not SDXL")
    for prefix in ("conditioner.embedders.0.", "conditioner.embedders.1.", "first_stage_model."):
        if not any(k.startswith(prefix) for k in sd):
            raise RuntimeError(f"no {prefix}* tensors in the layout")


def transformer_block_names(unet: torch.nn.Module) -> list[str]:
    """Module names of every BasicTransformerBlock of the SGM UNet ('input_blocks.4.1.transformer_blocks.0',
    ...), from the model's own module list (SDXL: 70)."""
    return [name for name, mod in unet.named_modules()
            if _TRANSFORMER_BLOCK.match(name) and type(mod).__name__ == "BasicTransformerBlock"]


def kohya_block_prefix(module_name: str) -> str:
    """'input_blocks.4.1.transformer_blocks.0' -> 'lora_unet_input_blocks_4_1_transformer_blocks_0_'."""
    return "lora_unet_" + module_name.replace(".", "_") + "_"


def lora_block_prefixes(keys: Iterable[str]) -> set[str]:
    """The distinct 'lora_unet_..._transformer_blocks_N_' prefixes among a LoRA file's keys."""
    out = set()
    for k in keys:
        m = re.match(r"^(lora_unet_.+?_transformer_blocks_\d+_)", k)
        if m:
            out.add(m.group(1))
    return out


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

def _tensor_seed(seed: int, key: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63)


def _values(spec: TensorSpec, seed: int, std: float) -> torch.Tensor:
    if spec.init == "copy":
        return spec.value.to(spec.dtype).contiguous()
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=spec.dtype)
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=spec.dtype)
    g = torch.Generator().manual_seed(_tensor_seed(seed, spec.key))
    t = torch.randn(spec.shape, generator=g, dtype=torch.float32)
    t.mul_(std)
    return t.to(spec.dtype)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous().reshape(-1)  # 1-D: scalars (logit_scale) too
    if t.numel() == 0:
        return memoryview(b"")
    # A byte view of the storage (little-endian on every machine torch supports here).
    return memoryview(t.view(torch.uint8).numpy())


def write_safetensors(path: str | os.PathLike, specs: list[TensorSpec],
                      make: Callable[[TensorSpec], torch.Tensor], metadata: dict | None = None,
                      progress: Callable[[int, int], None] | None = None) -> int:
    """Write ``specs`` as a safetensors file, asking ``make(spec)`` for one tensor at a time.
    Larger element types first (aligned offsets), then by name. Returns the file size."""
    order = sorted(specs, key=lambda s: (-torch.empty((), dtype=s.dtype).element_size(), s.key))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    if len({s.key for s in order}) != len(order):
        raise ValueError("duplicate tensor names")
    offset = 0
    for s in order:
        if s.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{s.key}: dtype {s.dtype} not supported")
        header[s.key] = {"dtype": SAFETENSORS_DTYPES[s.dtype], "shape": list(s.shape),
                         "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for i, s in enumerate(order):
                t = make(s)
                if tuple(t.shape) != tuple(s.shape) or t.dtype != s.dtype:
                    raise RuntimeError(f"{s.key}: made {tuple(t.shape)} {t.dtype}, expected {s.shape} {s.dtype}")
                f.write(_tensor_bytes(t))
                del t
                if progress is not None:
                    progress(i + 1, len(order))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size = tmp.stat().st_size
    if size != 8 + len(raw) + offset:
        raise RuntimeError(f"{tmp}: wrote {size} bytes, expected {8 + len(raw) + offset}")
    tmp.replace(path)
    return size


def write_random_sdxl_checkpoint(path: str | os.PathLike, *, seed: int = 0, std: float = 0.02,
                                 dtype: torch.dtype = torch.float16, comfy=None,
                                 layout: SDXLLayout | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Write the random SDXL checkpoint to ``path``; returns {"path", "tensors", "bytes", "seconds"}."""
    t0 = time.monotonic()
    layout = layout or sdxl_layout(comfy, dtype=dtype)
    last = [t0]

    def progress(i: int, n: int) -> None:
        if log is not None and (time.monotonic() - last[0] > 15 or i == n):
            last[0] = time.monotonic()
            log(f"[sdxl_checkpoint] {i}/{n} tensors, {time.monotonic() - t0:.0f} s")

    meta = {"format": "pt", "apt_test": "random-weight SDXL (tests/sdxl_checkpoint.py)", "seed": seed, "std": std,
            "modelspec.architecture": "stable-diffusion-xl-v1-base"}
    size = write_safetensors(path, layout.specs, lambda s: _values(s, seed, std), metadata=meta, progress=progress)
    return {"path": str(path), "tensors": len(layout.specs), "bytes": size, "seconds": time.monotonic() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="output .safetensors path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--layout", action="store_true", help="only print the layout summary (nothing written)")
    args = ap.parse_args(argv)
    comfy = import_host()
    t0 = time.monotonic()
    layout = sdxl_layout(comfy)
    blocks = transformer_block_names(layout.unet)
    groups: dict[str, int] = {}
    for s in layout.specs:
        top = ".".join(s.key.split(".")[:3]) if s.key.startswith("conditioner.") else s.key.split(".")[0]
        groups[top] = groups.get(top, 0) + s.nbytes
    print(f"[sdxl_checkpoint] layout: {len(layout.specs)} tensors, {layout.nbytes / 2**30:.2f} GiB, "
          f"{len(blocks)} transformer blocks, detected as SDXL ({time.monotonic() - t0:.1f} s); "
          + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in sorted(groups.items())), flush=True)
    if args.layout:
        return 0
    if not args.out:
        ap.error("give an output path (or --layout)")
    info = write_random_sdxl_checkpoint(args.out, seed=args.seed, std=args.std, layout=layout,
                                        log=lambda m: print(m, flush=True))
    print(f"[sdxl_checkpoint] wrote {info['path']}: {info['tensors']} tensors, {info['bytes'] / 2**30:.2f} GiB "
          f"in {info['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
