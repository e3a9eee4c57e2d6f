"""Training checkpoints: everything needed to continue a run exactly where it stopped.

One file per checkpoint (`step_000200.pt`) holding the LoRA weights, optimizer state (the learning
rate follows from the step), the indicator's EMAs, the sampling RNG state, the settings, a
fingerprint of the training data and the event history. Written atomically; `latest_checkpoint`
finds the newest complete one; `resume_mismatch` says why a checkpoint cannot continue a run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import AptConfigError, AptOutputError
from .export import atomic_write

FORMAT = "apt-checkpoint-1"
_NAME = re.compile(r"^step_(\d{6,})\.pt$")


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"step_{step:06d}.pt"


def save_checkpoint(folder: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write state for `step`, then delete all but the newest `keep` checkpoints in the folder."""
    path = atomic_write(checkpoint_path(folder, step), lambda tmp: torch.save({"format": FORMAT, **state}, tmp))
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in the folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise AptOutputError(f"checkpoint {path} does not exist.") from exc
    except Exception as exc:  # a truncated or foreign file
        why = str(exc).splitlines()[0][:200] if str(exc).strip() else "empty or cut-off file"
        if os.path.exists(path) and os.path.getsize(path) == 0:
            why = "the file is empty: its save was cut off"
        raise AptOutputError(f"checkpoint {path} cannot be read ({why}); delete it to resume from an "
                             "earlier one, or turn 'resume' off to start over.") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise AptOutputError(f"{path} is not an APT training checkpoint.")
    return state


# Settings a resumed run may change: how long it runs, how often it saves and logs, how it fits in
# memory, and a lower learning rate (the way out of a NaN). Everything else changes what is trained,
# so a checkpoint made with other values is refused.
RESUMABLE_CHANGES = frozenset({("train", "steps"), ("train", "checkpoint_every"), ("train", "log_every"),
                               ("train", "gradient_checkpointing"), ("train", "mixed_precision")})


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def resume_mismatch(state: dict[str, Any], config: dict[str, Any], data: str | None) -> list[str]:
    """What differs between a checkpoint and this run ([] when it may resume): the training data
    (fingerprints compared when both exist) and every training-relevant setting, as 'part.name:
    saved -> now' lines."""
    diffs = []
    saved_data = state.get("data")
    if saved_data is not None and data is not None and saved_data != data:
        diffs.append("images or captions")
    saved = _plain(state.get("config", {}))
    for part, values in _plain(config).items():
        if not isinstance(values, dict):
            if saved.get(part) != values:
                diffs.append(f"{part}: {saved.get(part)!r} -> {values!r}")
            continue
        for name, value in values.items():
            before = saved.get(part, {}).get(name)
            lowered_rate = (part, name) == ("train", "learning_rate") and before is not None and value < before
            if (part, name) not in RESUMABLE_CHANGES and before != value and not lowered_rate:
                diffs.append(f"{part}.{name}: {before!r} -> {value!r}")
    return diffs


def check_resumable(path: str | os.PathLike, state: dict[str, Any], config: dict[str, Any], data: str | None) -> None:
    """Raise AptConfigError, saying what differs and what to do, unless `state` may continue this run."""
    diffs = resume_mismatch(state, config, data)
    if not diffs:
        return
    settings = [d for d in diffs if ":" in d]
    what = [d for d in diffs if ":" not in d] + (
        [f"settings ({'; '.join(settings[:6])}{' ...' if len(settings) > 6 else ''})"] if settings else [])
    raise AptConfigError(f"checkpoint {path} was made with other {' and '.join(what)}. To continue it, use the "
                         "same images and settings; otherwise turn 'resume' off (starts over) or use another "
                         "LoRA name.")
