"""LoRA files in the kohya format that ComfyUI's LoraLoader, A1111/Forge and diffusers all read.

Keys: `lora_unet_<module path with _>.lora_down.weight` (r, in), `.lora_up.weight` (out, r) and a
scalar `.alpha`; the effective update is up @ down * alpha / r. Metadata follows kohya's `ss_*`
names, plus `apt_*` entries with the APT settings and the final gamma per timestep bin.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import save_file

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


TEMP_SUFFIX = ".apt-tmp"
_TEMP_NAME = re.compile(r"^\.(.+)\.[^.]+" + re.escape(TEMP_SUFFIX) + "$")  # .<target>.<random>.apt-tmp


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _out_of_space(exc: BaseException, folder: Path) -> bool:
    """Disk full, whichever writer hit it: OSError 28, safetensors' 'os error 28', or torch.save's
    C++ writer ('[enforce fail at inline_container.cc...]', no errno) on a folder with next to no
    room left."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    if "os error 28" in str(exc) or "No space left" in str(exc):
        return True
    try:
        return shutil.disk_usage(folder).free < 64 * 1024**2
    except OSError:
        return False


def save_error(target: Path, exc: BaseException) -> AptOutputError:
    """A failed save as a message that names the folder and what to do."""
    folder = target.parent
    if _out_of_space(exc, folder):
        try:
            free = f" ({shutil.disk_usage(folder).free / 2**20:.0f} MB free)"
        except OSError:
            free = ""
        return AptOutputError(f"could not save {target.name}: the disk holding {folder} is full{free}. Free "
                              "some space there (old LoRAs, or old runs in output/apt_lora_trainer) and queue "
                              "again.")
    if isinstance(exc, PermissionError):
        return AptOutputError(f"could not save {target.name}: no permission to write in {folder}. Let the "
                              "user running ComfyUI write there, or choose another folder.")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:200]
    return AptOutputError(f"could not save {target}: {reason}.")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) in the target folder, then rename over `path` (never half a file).

    The file gets the mode a plain `open()` would give it (0666 less the umask; the temp file is
    created 0600), so a ComfyUI running as another user can read it. Any failure (disk full,
    permissions, the writer's own errors) leaves no temp file and raises AptOutputError naming the
    folder; an existing `path` is never touched by a failed write."""
    target = Path(path)
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=folder)
        os.close(fd)
    except OSError as exc:
        raise save_error(target, exc) from exc
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    except Exception as exc:  # noqa: BLE001 - safetensors / torch.save report disk full without OSError
        raise save_error(target, exc) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def remove_stale_temps(folder: str | os.PathLike, names: Callable[[str], bool] | None = None,
                       min_age_s: float = 60.0) -> list[Path]:
    """Delete temp files an interrupted `atomic_write` left in `folder`: those of targets for which
    `names(target_name)` is true (all when None), older than `min_age_s` (so a save in progress in
    another ComfyUI sharing the folder is left alone); returns what was removed."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.iterdir():
        m = _TEMP_NAME.match(p.name)
        if not m or (names is not None and not names(m.group(1))):
            continue
        try:
            if p.is_file() and now - p.stat().st_mtime >= min_age_s:
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed


def save_kohya_lora(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, str]) -> Path:
    """Atomically write a kohya LoRA safetensors file."""
    return atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata=dict(metadata)))
