"""LoRA files in the kohya format that ComfyUI's LoraLoader, A1111/Forge and diffusers all read.

Keys: `lora_unet_<module path with _>.lora_down.weight` (r, in), `.lora_up.weight` (out, r) and a
scalar `.alpha`; the effective update is up @ down * alpha / r. Metadata follows kohya's `ss_*`
names, plus `apt_*` entries with the APT settings and the final gamma per timestep bin.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from .errors import AptOutputError

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def kohya_tensors(lora_state: Mapping[str, torch.Tensor], alpha: float,
                  key_of: Callable[[str], str], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Map {"<module>.down": (r, in), "<module>.up": (out, r)} to kohya keys via key_of(module)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in lora_state.items():
        module, _, part = name.rpartition(".")
        key = key_of(module)
        out[f"{key}.lora_{part}.weight"] = tensor.detach().to("cpu", dtype).contiguous()
        out.setdefault(f"{key}.alpha", torch.tensor(float(alpha), dtype=dtype))
    return out


def tag_frequency(captions: list[str]) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: how many captions contain each comma-separated tag.

    LoRA browsers (and ComfyUI LoRA managers) show these as the LoRA's "trained words", which is
    how an artist finds the trigger word again months later. Tags are stripped and lower-cased;
    a tag counts once per caption. Returns {"apt": {tag: count}} (kohya keys by folder name).
    """
    counts: dict[str, int] = {}
    for cap in captions:
        for tag in dict.fromkeys(t.strip().lower() for t in cap.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return {"apt": counts}


def kohya_metadata(rank: int, alpha: float, *, steps: int, learning_rate: float, num_images: int,
                   output_name: str, apt_settings: dict, gammas: list[float], captions: list[str] = (),
                   base_model: str = "sdxl_base_v1-0", extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """String metadata in kohya's `ss_*` vocabulary plus the APT settings and final gammas."""
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": base_model,
        "ss_sd_model_name": base_model,
        "ss_v2": "False",
        "ss_output_name": output_name,
        "ss_max_train_steps": str(int(steps)),
        "ss_steps": str(int(steps)),
        "ss_learning_rate": str(learning_rate),
        "ss_unet_lr": str(learning_rate),
        "ss_text_encoder_lr": "0",
        "ss_network_train_unet_only": "True",
        "ss_num_train_images": str(int(num_images)),
        "ss_training_comment": "APT (Adaptive Personalized Training) LoRA, apt-lora-trainer",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": output_name,
        "apt_settings": json.dumps(apt_settings, sort_keys=True),
        "apt_final_gamma": json.dumps([round(float(g), 6) for g in gammas]),
        "ss_tag_frequency": json.dumps(tag_frequency(list(captions))),
    }
    meta.update(extra or {})
    return meta


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) in the target folder, then rename over `path` (never half a file)."""
    target = Path(path)
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError as exc:
        raise AptOutputError(f"cannot write to {folder}: {exc.strerror or exc}. "
                             "Choose a folder you can write to.") from exc
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        hint = " The disk is full: free some space and save again." if exc.errno == 28 else ""
        raise AptOutputError(f"could not save {target}: {exc.strerror or exc}.{hint}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def save_kohya_lora(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, str]) -> Path:
    """Atomically write a kohya LoRA safetensors file."""
    return atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata=dict(metadata)))


def read_kohya_lora(path: str | os.PathLike, key_to_module: Mapping[str, str]) -> tuple[dict[str, torch.Tensor], float]:
    """Inverse of kohya_tensors for files this pack wrote: -> ({"<module>.down"/".up": fp32}, alpha)."""
    tensors = load_file(str(path))
    state, alpha = {}, None
    for key, tensor in tensors.items():
        base, _, part = key.partition(".")
        if base not in key_to_module:
            raise ValueError(f"{path}: key {key!r} does not belong to this model")
        module = key_to_module[base]
        if part == "alpha":
            alpha = float(tensor)
        elif part in ("lora_down.weight", "lora_up.weight"):
            state[f"{module}.{part.split('_')[1].split('.')[0]}"] = tensor.float()
        else:
            raise ValueError(f"{path}: unexpected key {key!r}")
    if alpha is None:
        raise ValueError(f"{path}: no alpha found")
    return state, alpha
