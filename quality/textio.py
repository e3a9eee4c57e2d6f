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


def read_results(folder: str | Path) -> dict:
    """A report folder's results: results.json as `quality.run` writes it, or results.json.xz, the
    compressed copy the repository keeps of the reports its docs cite."""
    import json
    import lzma

    folder = Path(folder)
    plain = folder / "results.json"
    if plain.exists():
        return json.loads(plain.read_text(encoding="utf-8"))
    packed = folder / "results.json.xz"
    if packed.exists():
        with lzma.open(packed, "rt", encoding="utf-8") as f:
            return json.load(f)
    raise FileNotFoundError(f"no results.json (or results.json.xz) in {folder}")
