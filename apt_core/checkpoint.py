"""Training checkpoints: everything needed to continue a run exactly where it stopped.

One file per checkpoint (`step_000200.pt`) holding the LoRA weights, optimizer state (the learning
rate follows from the step), the indicator's EMAs, the sampling RNG state, the settings, a
fingerprint of the training data and the event history. Written atomically; `latest_checkpoint`
finds the newest complete one; `resume_mismatch` says why a checkpoint cannot continue a run.

Recovery (`StepRecovery`): what a failed or interrupted step leaves to resume from. The state before
the step, with the RNG rewound to its start, so a resume replays it; nothing while the optimizer was
half-way through writing the weights; and after a NaN, when the weights had already diverged before
it (finite but exploded: resuming from them hits NaN again at once), the last healthy state, a CPU
copy `HealthyState` keeps every few steps.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

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


# ---- recovery: what a failed step leaves to resume from --------------------------------------------
GROWTH = 4.0  # weight norm more than this many times the last healthy one's: diverged


def total_norm(params: Iterable[torch.Tensor]) -> float:
    """L2 norm of all the tensors together (one device sync); inf/nan when any value is."""
    norms = [p.detach().float().norm() for p in params]
    return float(torch.stack(norms).norm()) if norms else 0.0


def cpu_copy(value: Any) -> Any:
    """The same nested dict/list/tuple with every tensor cloned to the CPU."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value)
    return value


class HealthyState:
    """Every `every` steps, a CPU copy of the training state whose LoRA weights are finite and not
    GROWTH times larger than at the previous copy."""

    def __init__(self, every: int = 10):
        self.every = every
        self.step: int | None = None
        self.norm: float | None = None
        self.state: dict | None = None

    def healthy(self, params: Iterable[torch.Tensor]) -> bool:
        """Finite weights, not GROWTH times larger than at the last healthy copy."""
        n = total_norm(params)
        return math.isfinite(n) and (self.norm is None or n <= GROWTH * max(self.norm, 1e-12))

    def after_step(self, step: int, params: list[torch.Tensor], state: Callable[[], dict]) -> None:
        """Every `every` steps: keep a copy of `state()` when the weights are healthy."""
        if step % self.every == 0 and self.healthy(params):
            self.step, self.norm, self.state = step, total_norm(params), cpu_copy(state())


class StepRecovery:
    """Tracks where a training step is, so that `save_last_good` can write the state to resume from.

    The trainer calls `begin_step` with the RNG state at the start of a step, `begin_update` just
    before the optimizer writes the weights and `end_step` when the step is complete.
    """

    def __init__(self, folder: Path | None, healthy_every: int = 10):
        self.folder = folder
        self.healthy = HealthyState(healthy_every)
        self.rng_at_step_start: torch.Tensor | None = None  # None between steps
        self.updating = False
        self.kept_earlier_step: int | None = None  # set when a diverged run went back to a healthy state

    def begin_step(self, rng_state: torch.Tensor) -> None:
        self.rng_at_step_start, self.updating = rng_state, False

    def begin_update(self) -> None:
        self.updating = True

    def end_step(self, step: int, params: list[torch.Tensor], state: Callable[[], dict]) -> None:
        self.rng_at_step_start, self.updating = None, False
        self.healthy.after_step(step, params, lambda: {**state(), "history": []})

    def save_last_good(self, step: int, params: list[torch.Tensor], state: Callable[[torch.Tensor | None], dict],
                       history: list[dict], diverged: bool = False) -> Path | None:
        """The checkpoint to resume from after a step failed or was interrupted mid-way.

        state(rng): the trainer's state with that RNG state (None: the current one). Between steps
        that is the current state. After a failure inside a step: the state of the last finished
        step (the weights, optimizer and indicator are still its) with the RNG rewound to the start
        of the failed step, so resuming replays it exactly; None while the optimizer was already
        updating the weights (half-updated: nothing is saved, earlier checkpoints are kept). After a
        NaN/inf (`diverged`) when the weights had diverged before it, the last healthy state is
        written instead, later checkpoints are removed, and `kept_earlier_step` says its step.
        Returns the file, or None without a folder.
        """
        if self.folder is None:
            return None
        if diverged and self.healthy.state is not None and not self.healthy.healthy(params):
            self.kept_earlier_step = self.healthy.step
            kept = {**self.healthy.state, "history": [h for h in history if h["step"] <= self.healthy.step]}
            path = save_checkpoint(self.folder, self.healthy.step, kept, keep=0)
            for later in list_checkpoints(self.folder):  # a resume must not pick a diverged one
                if later != path and int(later.stem.split("_")[1]) > self.healthy.step:
                    later.unlink(missing_ok=True)
            return path
        if self.rng_at_step_start is None:
            return save_checkpoint(self.folder, step, state(None))
        if self.updating:
            return None
        return save_checkpoint(self.folder, step, state(self.rng_at_step_start))
