"""A real 'disk full' for tests: a 1 MB tmpfs mounted on a folder and filled to the brim.

Mounting needs root (CI runs as root); elsewhere the calling test is skipped."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


def fill(folder: Path) -> Path:
    """Mount the tmpfs on `folder` (created if missing) and fill it; returns the filler file, whose
    deletion frees the space. Call `unmount(folder)` when done."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], check=False)  # lazy: a failed writer may still hold a file
