"""Training checkpoints: everything needed to continue a run exactly where it stopped.

One file per checkpoint (`step_000200.pt`) holding the LoRA weights, optimizer and LR-scheduler
state, the indicator's EMAs, the sampling RNG state, the settings and the event history.
Written atomically; `latest_checkpoint` finds the newest complete one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import AptOutputError
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
        raise AptOutputError(f"checkpoint {path} cannot be read ({exc}); delete it to resume from an "
                             "earlier one.") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise AptOutputError(f"{path} is not an APT training checkpoint.")
    return state
