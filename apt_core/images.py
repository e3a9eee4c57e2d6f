"""Reference images + captions for SDXL training: read, fix colour modes, bucket, resize, crop.

Each image becomes RGB (3, H, W) float32 in [-1, 1] at one of SDXL's aspect-ratio buckets, plus
SDXL's size conditioning as SDXL / kohya compute it (resize to cover the bucket, centre-crop, crop
offset in the resized frame). Transparency is composited on WHITE (references with alpha are mostly
drawings / cut-outs for a light page; black would bake dark backgrounds and halos into the LoRA).
16-bit data is scaled to 8 bits, never clipped. Huge files: PIL's bomb limit is lifted only while
a header is parsed (MAX_PIXELS / MAX_DECODE_BYTES apply instead), JPEGs decode at 1/2..1/8 scale
(draft), other formats are box-reduced right after decoding.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
import unicodedata
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import AptConfigError, AptDatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAX_PIXELS = 16_384 * 16_384  # header size above which a file is refused (a 200 MP phone JPEG fits)
MAX_DECODE_BYTES = 1024**3  # decoding + RGB conversion (after JPEG draft) above this: refused
# A decode this large must come from a file at least 1/MAX_RATIO of its size (photos and drawings
# compress far less; a decompression bomb far more), so a bomb is refused from its header.
BOMB_MIN_BYTES, MAX_RATIO = 256 * 1024**2, 250  # a flat 4096^2 logo PNG (134 MB) is never suspect
# SDXL training buckets at 1024 px as (height, width) with h <= w; transposes are added.
SDXL_BUCKETS_1024 = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
    (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024))
REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")
_IGNORED_FILES = {"thumbs.db", "desktop.ini"}
_T = Image.Transpose  # EXIF orientation -> upright, the table of ImageOps.exif_transpose
_EXIF_TRANSPOSE = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM,
                   5: _T.TRANSPOSE, 6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90}
_PIL_LIMIT_LOCK = threading.Lock()


@dataclass
class ImageRecord:
    """One training image.

    pixels: (3, H, W) float32 in [-1, 1] with (H, W) == target_hw (the bucket)
    original_hw: true (height, width) after EXIF rotation, before any resize
    crop_top_left: (top, left) of the centre crop in the resized (bucket-covering) frame
    """

    source: str
    pixels: torch.Tensor
    caption: str
    original_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_hw: tuple[int, int]
    repeats: int = 1


@dataclass
class LoadReport:
    """What was loaded and what was not; len() / iteration / indexing act on `records`."""

    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    resolution: int = 1024
    defaulted: list[str] = field(default_factory=list)  # sources given the default caption
    notes: list[str] = field(default_factory=list)  # warnings about files that were used

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    @property
    def uncaptioned(self) -> list[str]:
        return [r.source for r in self.records if not r.caption]

    @property
    def upscaled(self) -> list[ImageRecord]:
        """Records whose original is smaller than their bucket on at least one side."""
        return [r for r in self.records if min(np.subtract(r.original_hw, r.target_hw)) < 0]

    def summary(self) -> str:
        """Multi-line text: counts, buckets, original sizes, warnings, skipped files and why."""
        recs, res = self.records, self.resolution
        out = [f"{len(recs)} image(s) loaded at {res} px "
               f"({sum(r.repeats for r in recs)} samples per epoch with repeats)."]
        if recs:
            out.append("Buckets (width x height): " + ", ".join(
                f"{w}x{h}: {n}" for (h, w), n in Counter(r.target_hw for r in recs).most_common()))
            sizes = [r.original_hw for r in recs]
            (lh, lw), (hh, hw) = min(sizes, key=math.prod), max(sizes, key=math.prod)
            out.append(f"Original sizes (width x height): smallest {lw}x{lh}, largest {hw}x{hh}.")
        if up := self.upscaled:
            out.append(f"Warning: {len(up)} image(s) smaller than {res} px (their bucket) were "
                       "upscaled, expect softer results: " + _names(
                           [f"{Path(r.source).name} ({r.original_hw[1]}x{r.original_hw[0]})" for r in up]))
        if bare := self.uncaptioned:
            out.append(f"Warning: captions are missing for {len(bare)} image(s) (no .txt with the "
                       "same name, no default caption); they train with an empty caption: "
                       + _names([Path(s).name for s in bare])
                       + ". Add name.txt files or set a default caption.")
        if self.defaulted:
            out.append(f"{len(self.defaulted)} image(s) without a caption use the default caption.")
        out += [f"Warning: {n}" for n in self.notes]
        if self.skipped:
            out += [f"Skipped {len(self.skipped)} file(s):"] + [f"  {n}: {why}" for n, why in self.skipped]
        return "\n".join(out)


def _names(items: list[str], limit: int = 10) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def sdxl_buckets(resolution: int = 1024, step: int = 64) -> list[tuple[int, int]]:
    """SDXL's buckets scaled to `resolution`: (height, width), sides multiples of `step` (>= step).

    Area ~ resolution**2, aspect 1:4 .. 4:1; duplicates removed, sorted by height / width.
    """
    if step < 1 or resolution < step:
        raise AptConfigError(f"resolution ({resolution}) must be >= bucket_step ({step}) >= 1; "
                             "use e.g. resolution 1024 with bucket_step 64.")
    snap = lambda x: max(step, int(math.floor(x * resolution / 1024 / step + 0.5)) * step)  # noqa: E731
    out = {(snap(h), snap(w)) for h, w in SDXL_BUCKETS_1024}
    return sorted(out | {(w, h) for h, w in out}, key=lambda hw: (hw[0] / hw[1], hw[0]))


def choose_bucket(h: int, w: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) bucket closest in aspect ratio to h / w (log distance; ties: larger)."""
    target = math.log(h / w)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def cover_geometry(h: int, w: int, bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resize (h, w) to just cover `bucket`, then centre-crop.

    Returns ((resized_h, resized_w), (crop_top, crop_left)); one resized side equals the bucket's.
    """
    bh, bw = bucket
    scale = max(bh / h, bw / w)
    rh, rw = max(bh, int(h * scale + 0.5)), max(bw, int(w * scale + 0.5))
    return (rh, rw), ((rh - bh) // 2, (rw - bw) // 2)


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16/32-bit and float are rescaled (not clipped); alpha -> white."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float32)
        top = float(a.max()) if a.size else 0.0
        if mode.startswith("I;16"):
            k = 1 / 257
        elif mode == "F" and top <= 1.0:
            k = 255.0
        else:  # "I"/"F" holding 8-bit, 16-bit or wider data (the last normalised to its maximum)
            k = 1.0 if top <= 255 else 1 / 257 if top <= 65535 else 255 / top
        im = Image.fromarray(np.clip(a * k + 0.5, 0, 255).astype(np.uint8))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image of size W x H -> (3, H, W) float32 in [-1, 1]."""
    a = torch.from_numpy(np.array(im, dtype=np.uint8))
    return (a.permute(2, 0, 1).float() / 127.5 - 1.0).contiguous()


def fit_to_bucket(im: Image.Image, original_hw: tuple[int, int], bucket: tuple[int, int]
                  ) -> tuple[Image.Image, tuple[int, int]]:
    """Upright RGB image -> (RGB image of the bucket's size, crop (top, left)).

    Geometry comes from `original_hw`, so a pre-shrunk (drafted) image crops like the full one.
    """
    (rh, rw), (top, left) = cover_geometry(*original_hw, bucket)
    if im.size != (rw, rh):
        im = im.resize((rw, rh), Image.Resampling.LANCZOS)
    return im.crop((left, top, left + bucket[1], top + bucket[0])), (top, left)


@contextmanager
def _lifted_pil_limit() -> Iterator[None]:
    """Lift PIL's global decompression-bomb limit while one header is parsed, then restore it."""
    with _PIL_LIMIT_LOCK:
        old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _shrink(im: Image.Image, need_wh: tuple[int, int]) -> Image.Image:
    """Integer box-reduce while the image is at least twice `need_wh` (W, H); else unchanged."""
    factor = min(im.width // need_wh[0], im.height // need_wh[1])
    try:
        return im.reduce(factor) if factor >= 2 else im
    except ValueError:  # modes reduce() lacks (P, 1, I;16): the caller shrinks after to_rgb8
        return im


class ImageTooLarge(ValueError):
    """An image refused from its header: decoding it would cost too much memory."""


def decode_bytes(mode: str, w: int, h: int) -> int:
    """What PIL needs to decode a (w, h) image of `mode` and convert it to 8-bit RGB (PIL keeps
    1/L/P at one byte a pixel, I;16 at two, every other mode at four), alpha compositing included."""
    px = w * h
    depth = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La", "P")
    return px * (depth + 4 + (8 if alpha else 0))


def check_header(src: Image.Image, file_size: int | None) -> None:
    """Refuse, from the header alone (nothing decoded yet), an image too large to decode safely.
    Without file_size only the pixel count is checked (before a JPEG's draft); with it (after the
    draft), the memory the decode needs, also against the file's size."""
    w, h = src.size
    if w * h > MAX_PIXELS:
        raise ImageTooLarge(f"too large: {w}x{h} px (limit {MAX_PIXELS // 10**6} megapixels); downscale "
                         "it in an image editor first")
    if file_size is None:
        return
    need = decode_bytes(src.mode, src.width, src.height)  # src.size after draft
    if need > MAX_DECODE_BYTES:
        raise ImageTooLarge(f"too large: {w}x{h} px would need {need / 2**30:.1f} GB of memory to decode; "
                         "downscale it or save it as JPEG first")
    if need > BOMB_MIN_BYTES and need > MAX_RATIO * max(1, file_size):
        raise ImageTooLarge(f"too large for its file size: {w}x{h} px from {file_size} bytes would need "
                         f"{need / 2**20:.0f} MB to decode (a decompression bomb?); re-save it from an "
                         "image editor")


def load_image_file(path: str | Path, buckets: Sequence[tuple[int, int]], repeats: int = 1,
                    caption: str = "") -> ImageRecord:
    """Decode one file into an ImageRecord (bucketed). Raises OSError/ValueError if unusable.

    The size checks run on the header before anything is decoded (a PNG's EXIF may sit after its
    pixels, so even reading the orientation can decode it); only the first frame is read."""
    path = Path(path)
    with _lifted_pil_limit():
        src = Image.open(path)
    with src:
        w, h = src.size
        check_header(src, None)
        # Draft (JPEG: decode at 1/2..1/8 scale) for the smaller of the two orientations' needs,
        # before the orientation is known; no-op for other formats.
        rough = cover_geometry(h, w, choose_bucket(h, w, buckets))[0]
        src.draft(None, (min(rough), min(rough)))
        check_header(src, path.stat().st_size)
        orientation = src.getexif().get(0x0112, 1)
        swap = orientation in (5, 6, 7, 8)
        original_hw = (w, h) if swap else (h, w)
        bucket = choose_bucket(*original_hw, buckets)
        (rh, rw), _ = cover_geometry(*original_hw, bucket)
        need_wh = (rh, rw) if swap else (rw, rh)  # in the file's (unrotated) frame
        src.load()
        im = _shrink(to_rgb8(_shrink(src, need_wh)), need_wh)
        if orientation in _EXIF_TRANSPOSE:
            im = im.transpose(_EXIF_TRANSPOSE[orientation])
        out, crop = fit_to_bucket(im, original_hw, bucket)
        return ImageRecord(str(path), pil_to_tensor(out), caption, original_hw, crop, bucket, repeats)


MAX_CAPTION_CHARS = 1000  # SDXL reads 77 tokens per chunk; ComfyUI chains chunks, so some room
_CAPTION_READ_BYTES = 64 * 1024


def clean_caption(text: str) -> tuple[str, bool]:
    """Caption text -> (one line without control characters, at most MAX_CAPTION_CHARS long cut at
    a word, whether it was cut). Control and format characters (NUL, escape codes, zero-width and
    direction marks) become spaces; whitespace runs become one space."""
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)
    text = " ".join(text.split())
    if len(text) <= MAX_CAPTION_CHARS:
        return text, False
    cut = text[:MAX_CAPTION_CHARS + 1].rsplit(" ", 1)[0] if " " in text[:MAX_CAPTION_CHARS] else text[:MAX_CAPTION_CHARS]
    return cut[:MAX_CAPTION_CHARS].rstrip(), True


def read_caption(path: str | Path) -> str:
    """Caption text of a .txt file (UTF-8, BOM allowed; only its first 64 KB are read), cleaned by
    `clean_caption`; raises ValueError for a caption that had to be cut (the loader reports it)."""
    with open(path, "rb") as f:
        raw = f.read(_CAPTION_READ_BYTES + 1)
    text, cut = clean_caption(raw[:_CAPTION_READ_BYTES].decode("utf-8-sig", errors="strict"
                                                                if len(raw) <= _CAPTION_READ_BYTES else "ignore"))
    if cut or len(raw) > _CAPTION_READ_BYTES:
        raise CaptionCut(text)
    return text


class CaptionCut(ValueError):
    """A caption longer than MAX_CAPTION_CHARS: `args[0]` is the cut text."""


def records_fingerprint(records: Sequence[ImageRecord]) -> str:
    """A short hash of what training sees of each image: its pixels as loaded, caption, repeats."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(f"{r.caption}\0{r.repeats}\0{tuple(r.pixels.shape)}\0".encode())
        digest.update(r.pixels.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _visible(d: Path) -> list[Path]:
    return sorted((p for p in d.iterdir() if not p.name.startswith(".")
                   and p.name.lower() not in _IGNORED_FILES), key=lambda p: p.name.casefold())


OUTSIDE = "a link that leads outside the allowed folder: not read"


def inside(path: Path, root: Path | None) -> bool:
    """Whether `path`, with every symlink resolved, is `root` or lies under it (True when no root)."""
    if root is None:
        return True
    real = Path(os.path.realpath(path))
    return real == root or root in real.parents


def _repeat_groups(folder: Path, report: LoadReport, root: Path | None = None) -> list[tuple[Path, int]]:
    """[(folder, 1)] + kohya `N_name` subfolders as (subfolder, N); other subfolders are reported."""
    groups = [(folder, 1)]
    for sub in (p for p in _visible(folder) if p.is_dir()):
        if not inside(sub, root):
            report.skipped.append((sub.name + "/", OUTSIDE))
            continue
        m = REPEAT_DIR.match(sub.name)
        if m and int(m.group(1)) > 0:
            groups.append((sub, int(m.group(1))))
        else:
            report.skipped.append((sub.name + "/", "subfolder ignored: name it like 10_name to "
                                   "train its images 10 times per epoch (count >= 1)"))
    return groups


def _caption(img: Path, texts: dict[str, Path], folder: Path, default: str | None, report: LoadReport) -> str:
    txt, text = texts.get(img.stem) or texts.get(img.stem.casefold()), ""
    if txt is not None:
        try:
            text = read_caption(txt)
        except CaptionCut as cut:
            text = cut.args[0]
            report.notes.append(f"the caption {txt.relative_to(folder).as_posix()} is longer than "
                                f"{MAX_CAPTION_CHARS} characters: only its first {len(text)} are used")
        except (UnicodeDecodeError, OSError) as e:
            report.skipped.append((txt.relative_to(folder).as_posix(), f"caption cannot be read "
                                   f"({type(e).__name__}); re-save it as UTF-8 text"))
    if not text and default:
        report.defaulted.append(str(img))
        return clean_caption(default)[0]
    return text


def _load_dir(d: Path, folder: Path, repeats: int, buckets: Sequence[tuple[int, int]],
              default: str | None, report: LoadReport, root: Path | None = None) -> int:
    """Load the images directly in `d` into `report`; returns how many image files it had."""
    files = []
    for p in (p for p in _visible(d) if p.is_file()):
        if inside(p, root):
            files.append(p)
        else:
            report.skipped.append((p.relative_to(folder).as_posix(), OUTSIDE))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    texts = {p.stem: p for p in files if p.suffix.lower() == ".txt"}
    texts.update({k.casefold(): v for k, v in texts.items() if k.casefold() not in texts})
    stems = {p.stem for p in images} | {p.stem.casefold() for p in images}
    accepted = " ".join(IMAGE_EXTENSIONS)
    for p in files:
        rel, ext = p.relative_to(folder).as_posix(), p.suffix.lower()
        if ext == ".txt" and p.stem not in stems and p.stem.casefold() not in stems:
            report.skipped.append((rel, f"caption without image: no {accepted} file named "
                                        f"'{p.stem}' next to it"))
        elif ext not in IMAGE_EXTENSIONS + (".txt",):
            report.skipped.append((rel, f"not a supported image type; accepted: {accepted}"))
    for p in images:
        rel = p.relative_to(folder).as_posix()
        try:
            rec = load_image_file(p, buckets, repeats)
        except MemoryError:
            report.skipped.append((rel, "not enough memory to decode it; downscale it first"))
            continue
        except ImageTooLarge as e:
            report.skipped.append((rel, str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - any decoder failure means: skip this file
            report.skipped.append((rel, f"cannot be read ({type(e).__name__}: {e}); re-save it as PNG or JPEG"))
            continue
        rec.caption = _caption(p, texts, folder, default, report)
        report.records.append(rec)
    return len(images)


def load_image_folder(folder: str | Path, resolution: int = 1024, default_caption: str | None = None,
                      bucket_step: int = 64, confine_to: str | Path | None = None) -> LoadReport:
    """Load the images of `folder` (repeats=1) and of kohya `N_name` subfolders (repeats=N).

    Raises AptDatasetError when the folder is missing or no image is usable; other bad files are
    listed in `report.skipped` with the reason. confine_to: files and subfolders whose real path
    (links resolved) leaves this folder are skipped, never opened (a server's input folder).
    """
    folder = Path(folder).expanduser()
    root = Path(os.path.realpath(confine_to)) if confine_to is not None else None
    if not folder.exists():
        raise AptDatasetError(f"Image folder not found: {folder}. Check the path; it must be a "
                              "folder on the machine that runs ComfyUI.")
    if not folder.is_dir():
        raise AptDatasetError(f"{folder} is a file, not a folder. Give the folder that contains the images.")
    buckets, report = sdxl_buckets(resolution, bucket_step), LoadReport(resolution=resolution)
    n_files = sum(_load_dir(d, folder, n, buckets, default_caption, report, root)
                  for d, n in _repeat_groups(folder, report, root))
    if n_files == 0:
        raise AptDatasetError(f"No images found in {folder}. Accepted file types: "
                              f"{' '.join(IMAGE_EXTENSIONS)} (subfolders are read only when named "
                              "like 10_name).")
    if not report.records:
        raise AptDatasetError(f"None of the {n_files} image file(s) in {folder} could be used:\n"
                              + "\n".join(f"  {n}: {why}" for n, why in report.skipped))
    return report


def _as_pil(img: Image.Image | torch.Tensor | np.ndarray) -> Image.Image:
    """PIL image as is; (H, W, C) array/tensor in [0, 1] with C in (1, 3, 4) -> 8-bit PIL image."""
    if isinstance(img, Image.Image):
        return img
    t = torch.as_tensor(img).detach().float().cpu()
    t = t[..., None] if t.ndim == 2 else t
    if t.ndim != 3 or t.shape[-1] not in (1, 3, 4):
        raise AptDatasetError(f"Expected an image of shape (H, W, 3) in [0, 1], got {tuple(t.shape)}.")
    a = (torch.nan_to_num(t).clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)


def records_from_images(images: Sequence[Image.Image | torch.Tensor] | torch.Tensor,
                        captions: str | Sequence[str] | None = None, resolution: int = 1024,
                        bucket_step: int = 64, repeats: int = 1,
                        default_caption: str | None = None) -> LoadReport:
    """In-memory images -> LoadReport (iterable as records).

    images: list of PIL images / (H, W, C) tensors in [0, 1], or a ComfyUI IMAGE batch (N, H, W, 3).
    captions: one string for all, one per image, or None (default_caption, else "").
    """
    if isinstance(images, torch.Tensor) and images.ndim == 3:  # a single (H, W, C) image
        images = images[None]
    items = list(images)
    if not items:
        raise AptDatasetError("No images were given; connect at least one image.")
    caps = [captions or ""] * len(items) if captions is None or isinstance(captions, str) else list(captions)
    if len(caps) != len(items):
        raise AptDatasetError(f"Got {len(items)} images but {len(caps)} captions; give one "
                              "caption per image or a single caption for all.")
    buckets, report = sdxl_buckets(resolution, bucket_step), LoadReport(resolution=resolution)
    for i, (img, cap) in enumerate(zip(items, caps)):
        im = to_rgb8(_as_pil(img))
        bucket = choose_bucket(im.height, im.width, buckets)
        out, crop = fit_to_bucket(im, (im.height, im.width), bucket)
        source, cap = f"image[{i}]", " ".join(str(cap).split())
        if not cap and default_caption:
            cap = " ".join(default_caption.split())
            report.defaulted.append(source)
        report.records.append(ImageRecord(source, pil_to_tensor(out), cap, (im.height, im.width),
                                          crop, bucket, repeats))
    return report
