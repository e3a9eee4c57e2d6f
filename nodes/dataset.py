"""The APT_DATASET value passed between nodes, and the caption template logic (no ComfyUI imports)."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from apt_core.errors import AptDatasetError

DEFAULT_TEMPLATE = "a photo of {trigger} {class}, {context}"
CAPTION_MODES = ("fill missing captions", "replace all captions", "add trigger to existing captions")
CAPTION_ADVICE = ("Tip (APT paper): describe the background and context in each caption and keep the "
                  "subject itself simple (trigger + class word), e.g. 'a photo of sks backpack on green "
                  "grass next to a road'.")


@dataclass(frozen=True)
class AptDataset:
    """Reference images ready for encoding. Never mutated: nodes return modified copies.

    records: `apt_core.images.ImageRecord`s (pixels (3, H, W) in [-1, 1], caption, SDXL sizes)
    given_captions: sources whose caption came from a .txt file or the captions input (not the
        default caption), i.e. what "fill missing captions" keeps.
    """

    records: tuple
    resolution: int
    given_captions: frozenset = field(default_factory=frozenset)
    report: str = ""
    subject: str = ""  # "<trigger> <class>" once APT Caption has run: what previews put in new contexts

    def __len__(self) -> int:
        return len(self.records)

    def with_captions(self, captions: Sequence[str]) -> "AptDataset":
        recs = tuple(dataclasses.replace(r, caption=c) for r, c in zip(self.records, captions, strict=True))
        return dataclasses.replace(self, records=recs,
                                   given_captions=frozenset(r.source for r in recs if r.caption))


def resolve_folder(folder: str, input_dir: str) -> Path:
    """User text -> the real path of a folder inside ComfyUI's input folder (quotes stripped,
    relative to the input folder, links resolved). Anything that leads outside it is refused: on a
    shared server the folder input is a client's text, like ComfyUI's own image loaders'."""
    text = folder.strip().strip('"').strip("'").strip()
    if not text:
        raise AptDatasetError("No image folder given. Type the name of a folder inside ComfyUI's input "
                              "folder, or connect images.")
    if "\0" in text:
        raise AptDatasetError("The folder name contains a NUL character; type the folder's name as it is.")
    root = Path(os.path.realpath(input_dir))
    path = Path(os.path.realpath(root / text))  # an absolute `text` replaces root here; checked below
    if path != root and root not in path.parents:
        raise AptDatasetError(f"The image folder must be inside ComfyUI's input folder ({root}); '{text}' "
                              "leads outside it. Put the photos in a folder there (e.g. input/my_subject) "
                              "and type its name (my_subject).")
    return path


def split_caption_lines(text: str | None, n_images: int) -> list[str] | str | None:
    """The captions input for an IMAGE batch: one line per image, or one line for all."""
    if text is None or not text.strip():
        return None
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if len(lines) == 1:
        return lines[0]
    if len(lines) != n_images:
        raise AptDatasetError(f"Got {n_images} images but {len(lines)} caption lines; write one line per "
                              "image (in order) or a single line for all images.")
    return lines


def load_dataset(folder: str, images, captions: str | None, resolution: int, default_caption: str,
                 input_dir: str) -> AptDataset:
    """Folder and/or IMAGE batch -> AptDataset with a readable report."""
    from apt_core.images import load_image_folder, records_from_images

    from apt_core.images import clean_caption

    default = clean_caption(default_caption or "")[0] or None
    records, given, parts = [], set(), []
    if folder and folder.strip():
        path = resolve_folder(folder, input_dir)
        rep = load_image_folder(path, resolution=resolution, default_caption=default, confine_to=input_dir)
        defaulted = set(rep.defaulted)
        records += rep.records
        given |= {r.source for r in rep.records if r.caption and r.source not in defaulted}
        parts.append(f"Folder {path}:\n{rep.summary()}")
    if images is not None:
        n = int(images.shape[0]) if hasattr(images, "shape") and images.ndim == 4 else len(images)
        caps = split_caption_lines(captions, n)
        caps = [clean_caption(c)[0] for c in caps] if isinstance(caps, list) else \
            clean_caption(caps)[0] if caps is not None else None
        rep = records_from_images(images, caps, resolution=resolution, default_caption=default)
        defaulted = set(rep.defaulted)
        records += rep.records
        given |= {r.source for r in rep.records if r.caption and r.source not in defaulted}
        parts.append(f"Connected images:\n{rep.summary()}")
    if not parts:
        raise AptDatasetError("No images: type a folder path or connect an IMAGE batch.")
    if not records:
        raise AptDatasetError("The dataset is empty: add 3-10 images of the subject.")
    if len(records) < 3:
        parts.append(f"Note: only {len(records)} image(s); APT is made for 3-10 reference images.")
    report = "\n\n".join(parts)
    return AptDataset(tuple(records), resolution, frozenset(given), report)


# ---- captions ----------------------------------------------------------------------------------

def render_caption(template: str, trigger: str, class_word: str, context: str) -> str:
    """Fill the template and tidy the result (no empty ', ,' pieces, single spaces)."""
    try:
        text = template.format(trigger=trigger.strip(), context=context.strip(), **{"class": class_word.strip()})
    except (KeyError, IndexError, ValueError) as exc:
        raise AptDatasetError(f"The caption template {template!r} is not valid ({exc}); use the "
                              "placeholders {trigger}, {class} and {context}.") from None
    text = " ".join(text.split())
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip(" ,")


def contains_word(text: str, word: str) -> bool:
    """Whether `word` occurs in `text` as a whole word (punctuation around it allowed)."""
    word = word.strip()
    return bool(word) and re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def context_for_images(sources: Sequence[str], text: str | Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Per-image context from lines: 'name.png: context' lines go to that file (name or stem);
    the other lines are handed out in order to the remaining images. A list (a captioner's one text
    per image) is taken one entry per image, in order, empty entries included. Returns (contexts,
    warnings)."""
    n = len(sources)
    if isinstance(text, (list, tuple)):
        texts = [" ".join(str(t).split()) for t in text]
        warnings = [f"{len(texts) - n} caption text(s) more than images were ignored."] if len(texts) > n else []
        if len(texts) < n:
            warnings.append(f"{n - len(texts)} image(s) got no caption text: {len(texts)} text(s) for {n} images.")
        return (texts + [""] * n)[:n], warnings
    contexts: list[str | None] = [None] * n
    warnings: list[str] = []
    names = {}
    for i, s in enumerate(sources):
        p = Path(s)
        names.setdefault(p.name.casefold(), i)
        names.setdefault(p.stem.casefold(), i)
    ordered = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        head, sep, rest = line.partition(":")
        idx = names.get(head.strip().casefold()) if sep else None
        if idx is not None:
            contexts[idx] = rest.strip()
        else:
            ordered.append(line)
    free = [i for i in range(n) if contexts[i] is None]
    for i, line in zip(free, ordered):
        contexts[i] = line
    if len(ordered) > len(free):
        warnings.append(f"{len(ordered) - len(free)} context line(s) more than images were ignored.")
    return [c or "" for c in contexts], warnings


def caption_dataset(ds: AptDataset, trigger: str, class_word: str, contexts_text: str | Sequence[str],
                    template: str, mode: str) -> tuple[AptDataset, str]:
    """Apply the caption node's settings; returns (new dataset, text listing the final captions)."""
    if mode not in CAPTION_MODES:
        raise AptDatasetError(f"unknown caption mode {mode!r}; choose one of {CAPTION_MODES}.")
    if not trigger.strip():
        raise AptDatasetError("The trigger word is empty. Use a rare token such as 'sks' or 'ohwx' and "
                              "write it in your prompts to call the trained subject.")
    sources = [r.source for r in ds.records]
    contexts, warnings = context_for_images(sources, contexts_text)
    final = []
    for r, ctx in zip(ds.records, contexts):
        has = bool(r.caption) and r.source in ds.given_captions
        if mode == "replace all captions" or not has:
            final.append(render_caption(template, trigger, class_word, ctx))
        elif mode == "add trigger to existing captions" and not contains_word(r.caption, trigger):
            final.append(render_caption("{trigger} {class}, {context}", trigger, class_word, r.caption))
        else:
            final.append(r.caption)
    from apt_core.images import MAX_CAPTION_CHARS, clean_caption

    cleaned = [clean_caption(c) for c in final]
    if any(cut for _, cut in cleaned):
        warnings.append(f"captions longer than {MAX_CAPTION_CHARS} characters were cut: "
                        + ", ".join(Path(s).name for s, (_, cut) in zip(sources, cleaned) if cut))
    final = [c for c, _ in cleaned]
    out = dataclasses.replace(ds.with_captions(final), subject=f"{trigger.strip()} {class_word.strip()}".strip())
    lines = [CAPTION_ADVICE, ""] + [f"{i + 1}. {Path(s).name}: {c}" for i, (s, c) in enumerate(zip(sources, final))]
    missing = [Path(s).name for s, c in zip(sources, final) if not contains_word(c, trigger)]
    if missing:
        warnings.append(f"These captions do not contain the trigger word '{trigger.strip()}': "
                        + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    if warnings:
        lines += [""] + [f"Warning: {w}" for w in warnings]
    return out, "\n".join(lines)
