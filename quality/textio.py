"""Writing the quality tools' markdown: always UTF-8 (the tables hold ±, −, x and —), whatever
the locale, so a report written on Windows reads the same everywhere."""

from __future__ import annotations

from pathlib import Path


def save_text(path: str | Path, text: str) -> None:
    Path(path).write_text(text, encoding="utf-8")


def print_and_save(text: str, out: str | Path | None) -> None:
    """Print `text` and, when `out` is given, also write it there."""
    print(text, end="")
    if out:
        save_text(out, text)
