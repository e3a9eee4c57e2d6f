"""apt_core.images: reading, colour modes, buckets, crops, captions, kohya folders, bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from apt_core import images as I
from apt_core.errors import AptDatasetError
from apt_core.images import (ImageRecord, LoadReport, choose_bucket, cover_geometry, load_image_folder,
                             records_from_images, sdxl_buckets, to_rgb8)


def _rgb(w, h, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


def _by_name(report):
    return {Path(r.source).name: r for r in report.records}


def _mean_rgb(rec):
    """Mean 0..255 colour of a record's (3, H, W) [-1, 1] pixels."""
    return ((rec.pixels + 1) * 127.5).mean(dim=(1, 2)).tolist()


# ---------------------------------------------------------------- buckets and geometry

def test_sdxl_buckets_at_1024_are_the_sdxl_list():
    b = sdxl_buckets(1024, 64)
    for hw in [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344),
               (1344, 768), (640, 1536), (1536, 640), (512, 2048), (2048, 512)]:
        assert hw in b
    assert len(b) == 41 and len(set(b)) == 41
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in b)
    assert all(0.9 * 1024**2 <= h * w <= 1024**2 for h, w in b)
    assert all(0.25 <= h / w <= 4 for h, w in b)


@pytest.mark.parametrize("res,step", [(64, 8), (32, 8), (512, 64), (768, 64)])
def test_sdxl_buckets_scale_to_small_resolutions(res, step):
    b = sdxl_buckets(res, step)
    assert (res, res) in b
    assert all(h % step == 0 and w % step == 0 and h >= step and w >= step for h, w in b)
    assert all(abs(h * w / res**2 - 1) < 0.3 for h, w in b)
    assert min(h / w for h, w in b) == pytest.approx(0.25) and max(h / w for h, w in b) == pytest.approx(4)


def test_sdxl_buckets_tiny_values_hand_computed():
    # 64/1024 = 1/16: (832, 1216) -> (52, 76) -> nearest multiple of 8 -> (56, 80)
    assert (56, 80) in sdxl_buckets(64, 8) and (80, 56) in sdxl_buckets(64, 8)
    assert (16, 64) in sdxl_buckets(32, 8)  # 512x2048 / 32


def test_choose_bucket_and_cover_geometry_hand_computed():
    b = sdxl_buckets(1024, 64)
    # 3000 wide x 2000 tall: h/w = .667, closest is 832/1216 = .684 (next 768/1280 = .6)
    assert choose_bucket(2000, 3000, b) == (832, 1216)
    # scale = max(832/2000, 1216/3000) = .416 -> 832 x 1248, crop (1248 - 1216) / 2 = 16 from the left
    assert cover_geometry(2000, 3000, (832, 1216)) == ((832, 1248), (0, 16))
    assert choose_bucket(500, 500, b) == (1024, 1024)
    assert choose_bucket(4000, 1000, b) == (2048, 512)  # tall 1:4
    assert choose_bucket(100, 1000, b) == (512, 2048)  # 1:10 clamps to the widest
    # portrait 900 x 1600 (h/w 1.778) -> 1344/768 = 1.75; scale = max(1344/1600, 768/900) = .8533
    assert choose_bucket(1600, 900, b) == (1344, 768)
    assert cover_geometry(1600, 900, (1344, 768)) == ((1365, 768), (10, 0))


# ---------------------------------------------------------------- end to end on files

def test_basic_folder_rgb_png_jpg_captions(tmp_path):
    _rgb(80, 80, (255, 0, 0)).save(tmp_path / "a.png")
    _rgb(96, 64, (0, 0, 255)).save(tmp_path / "b.JPG", quality=95)
    (tmp_path / "a.txt").write_text("  a red\nsquare \n\n", encoding="utf-8")
    rep = load_image_folder(tmp_path, resolution=64, bucket_step=8)
    recs = _by_name(rep)
    assert set(recs) == {"a.png", "b.JPG"} and len(rep) == 2
    a, b = recs["a.png"], recs["b.JPG"]
    assert a.caption == "a red square" and b.caption == ""
    assert a.pixels.shape == (3, 64, 64) and a.pixels.dtype == torch.float32
    assert a.pixels.min() >= -1 and a.pixels.max() <= 1
    assert _mean_rgb(a) == pytest.approx([255, 0, 0], abs=1)
    assert a.original_hw == (80, 80) and a.target_hw == (64, 64) and a.crop_top_left == (0, 0)
    # 96 wide x 64 tall: h/w = .667 -> (56, 80) (= .7) ; scale max(56/64, 80/96) = .875 -> 56 x 84
    assert b.target_hw == (56, 80) and b.pixels.shape == (3, 56, 80)
    assert b.crop_top_left == (0, 2) and b.original_hw == (64, 96)
    assert _mean_rgb(b)[2] > 240
    s = rep.summary()
    assert "2 image(s)" in s and "captions are missing" in s and "b.JPG" in s


def test_default_caption_used_when_txt_missing(tmp_path):
    _rgb(64, 64).save(tmp_path / "x.png")
    rep = load_image_folder(tmp_path, resolution=64, bucket_step=8, default_caption="an ink drawing")
    assert rep[0].caption == "an ink drawing" and rep.uncaptioned == []
    assert "captions are missing" not in rep.summary()


def test_odd_aspect_crop_offsets(tmp_path):
    # 200 wide x 30 tall (h/w .15) -> widest bucket at 64/8 is (32, 128);
    # scale = max(32/30, 128/200) = 1.0667 -> 32 x 213, left = (213 - 128) // 2 = 42
    a = np.zeros((30, 200, 3), np.uint8)
    a[:, :100] = 255  # left half white, right half black
    Image.fromarray(a).save(tmp_path / "wide.png")
    # 30 wide x 70 tall (h/w 2.333): see below
    Image.fromarray(np.full((70, 30, 3), 128, np.uint8)).save(tmp_path / "tall.png")
    recs = _by_name(load_image_folder(tmp_path, resolution=64, bucket_step=8))
    w = recs["wide.png"]
    assert w.target_hw == (32, 128) and w.crop_top_left == (0, 42) and w.original_hw == (30, 200)
    # the crop starts at x=42 of 213 and the white/black edge sits at ~106.5 -> column 64.5 of the crop
    col = (w.pixels[0, 16] + 1) * 127.5
    assert col[:60].min() > 200 and col[70:].max() < 50
    t = recs["tall.png"]
    # nearest buckets (96, 40) = 2.4 and (96, 48) = 2.0: |log(2.333/2.4)| = .028 wins
    assert t.target_hw == (96, 40)
    # scale = max(96/70, 40/30) = 1.3714 -> 96 x 41, left = (41 - 40) // 2 = 0
    assert t.crop_top_left == (0, 0) and t.original_hw == (70, 30)


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((64, 64, 4), np.uint8)
    a[..., 0] = 255
    a[:, 32:, 3] = 255  # left half fully transparent, right half opaque red
    Image.fromarray(a).save(tmp_path / "t.png")
    p = Image.new("P", (64, 64), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.save(tmp_path / "p.png", transparency=1)  # fully transparent palette image
    la = Image.new("LA", (64, 64), (0, 0))
    la.save(tmp_path / "la.png")
    recs = _by_name(load_image_folder(tmp_path, resolution=64, bucket_step=8))
    px = (recs["t.png"].pixels + 1) * 127.5
    assert px[:, :, :28].min() > 250  # transparent -> white, not black
    assert px[0, :, 36:].min() > 250 and px[1:, :, 36:].max() < 5  # opaque red stays red
    assert min(_mean_rgb(recs["p.png"])) > 250 and min(_mean_rgb(recs["la.png"])) > 250


def test_16bit_png_scaled_not_clipped(tmp_path):
    grad = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)
    im = Image.fromarray(grad)
    assert im.mode == "I;16"
    im.save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rec = load_image_folder(tmp_path, resolution=64, bucket_step=8)[0]
    mean = _mean_rgb(rec)
    assert mean == pytest.approx([127.5] * 3, abs=3)  # a clipped image would be ~255
    row = (rec.pixels[0, 10] + 1) * 127.5
    assert row[0] < 10 and row[-1] > 245 and bool((row[1:] >= row[:-1] - 1).all())


def test_to_rgb8_mode_I_and_F():
    i32 = Image.fromarray(np.full((4, 4), 32768, np.int32))
    assert i32.mode == "I"
    assert np.asarray(to_rgb8(i32))[0, 0].tolist() == [128, 128, 128]
    i8 = Image.fromarray(np.full((4, 4), 100, np.int32))
    assert np.asarray(to_rgb8(i8))[0, 0].tolist() == [100] * 3  # 8-bit data in mode I kept
    f = Image.fromarray(np.full((4, 4), 0.5, np.float32))
    assert np.asarray(to_rgb8(f))[0, 0].tolist() == [128] * 3


def test_cmyk_and_grayscale_jpg(tmp_path):
    _rgb(64, 64, (255, 0, 0)).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    Image.new("L", (64, 64), 90).save(tmp_path / "g.jpg")
    Image.new("1", (64, 64), 1).save(tmp_path / "bw.bmp")
    recs = _by_name(load_image_folder(tmp_path, resolution=64, bucket_step=8))
    r, g, b = _mean_rgb(recs["c.jpg"])
    assert r > 220 and g < 40 and b < 40
    assert _mean_rgb(recs["g.jpg"]) == pytest.approx([90] * 3, abs=2)
    assert _mean_rgb(recs["bw.bmp"]) == pytest.approx([255] * 3, abs=1)
    assert all(r.pixels.shape[0] == 3 for r in recs.values())


def test_exif_rotation_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide x 20 tall: left red, right blue
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored left edge becomes the top
    Image.fromarray(a).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    rec = load_image_folder(tmp_path, resolution=32, bucket_step=8)[0]
    assert rec.original_hw == (40, 20)  # upright: 20 wide x 40 tall
    assert rec.target_hw == (48, 24)  # h/w 2 at 32/8 -> (48, 24)
    top, bottom = rec.pixels[:, :10].mean(dim=(1, 2)), rec.pixels[:, -10:].mean(dim=(1, 2))
    assert top[0] > 0.8 and top[2] < -0.8 and bottom[2] > 0.8 and bottom[0] < -0.8


def test_bad_files_skipped_with_reasons(tmp_path):
    _rgb(64, 64).save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"this is not a png")
    _rgb(64, 64).save(tmp_path / "full.jpg")
    (tmp_path / "trunc.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    (tmp_path / "full.jpg").unlink()
    (tmp_path / "orphan.txt").write_text("no image", encoding="utf-8")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    rep = load_image_folder(tmp_path, resolution=64, bucket_step=8)
    assert [Path(r.source).name for r in rep] == ["good.png"]
    skipped = dict(rep.skipped)
    assert set(skipped) == {"corrupt.png", "trunc.jpg", "orphan.txt", "anim.gif"}
    assert "cannot be read" in skipped["corrupt.png"] and "cannot be read" in skipped["trunc.jpg"]
    assert "caption without image" in skipped["orphan.txt"]
    assert "accepted" in skipped["anim.gif"] and ".png" in skipped["anim.gif"]
    s = rep.summary()
    assert "Skipped 4 file(s)" in s and "orphan.txt" in s and "corrupt.png" in s


def test_kohya_repeat_folders(tmp_path):
    _rgb(64, 64).save(tmp_path / "top.png")
    (tmp_path / "3_dog").mkdir()
    _rgb(64, 64).save(tmp_path / "3_dog" / "d1.png")
    _rgb(64, 64).save(tmp_path / "3_dog" / "d2.webp")
    (tmp_path / "3_dog" / "d1.txt").write_text("a dog", encoding="utf-8")
    (tmp_path / "notes").mkdir()
    _rgb(64, 64).save(tmp_path / "notes" / "ignored.png")
    rep = load_image_folder(tmp_path, resolution=64, bucket_step=8)
    recs = _by_name(rep)
    assert set(recs) == {"top.png", "d1.png", "d2.webp"}
    assert recs["top.png"].repeats == 1 and recs["d1.png"].repeats == 3 and recs["d2.webp"].repeats == 3
    assert recs["d1.png"].caption == "a dog"
    assert "notes/" in dict(rep.skipped)
    assert "7 samples per epoch" in rep.summary()


def test_missing_empty_file_and_all_bad_folders(tmp_path):
    with pytest.raises(AptDatasetError, match="not found"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(AptDatasetError, match="not a folder"):
        load_image_folder(tmp_path / "f.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("hi")
    with pytest.raises(AptDatasetError, match=r"No images found.*\.png.*\.jpg.*\.webp"):
        load_image_folder(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"broken")
    with pytest.raises(AptDatasetError, match=r"(?s)None of the 1 image.*x\.jpg: cannot be read"):
        load_image_folder(bad)


def test_small_image_warns_upscale(tmp_path):
    _rgb(20, 20).save(tmp_path / "small.png")
    _rgb(70, 70).save(tmp_path / "big.png")
    rep = load_image_folder(tmp_path, resolution=64, bucket_step=8, default_caption="c")
    assert [Path(r.source).name for r in rep.upscaled] == ["small.png"]
    s = rep.summary()
    assert "smaller than 64 px" in s and "softer" in s and "small.png (20x20)" in s
    assert "big.png" not in s.split("softer")[1]


def test_large_jpeg_uses_draft(tmp_path, monkeypatch):
    a = np.zeros((4000, 6000, 3), np.uint8)
    a[:, :3000] = 255
    Image.fromarray(a).save(tmp_path / "large.jpg", quality=80)
    sizes = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = real_draft(self, mode, size)
        sizes.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    rec = load_image_folder(tmp_path, resolution=64, bucket_step=8)[0]
    assert sizes == [(750, 500)]  # decoded at 1/8 scale, never 6000 x 4000
    assert rec.original_hw == (4000, 6000)
    # h/w .667 -> (56, 80); scale max(56/4000, 80/6000) = .014 -> 56 x 84, left 2
    assert rec.target_hw == (56, 80) and rec.crop_top_left == (0, 2)
    assert rec.pixels[0, :, :38].min() > 0.9 and rec.pixels[0, :, 44:].max() < -0.9


def test_pil_bomb_limit_lifted_only_inside_loader(tmp_path, monkeypatch):
    _rgb(600, 400).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # PIL alone would raise a bomb error
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big.png")
    rec = load_image_folder(tmp_path, resolution=64, bucket_step=8)[0]
    assert rec.original_hw == (400, 600)
    assert Image.MAX_IMAGE_PIXELS == 10_000  # restored
    monkeypatch.setattr(I, "MAX_PIXELS", 100_000)  # the loader's own limit refuses it with a reason
    _rgb(64, 64).save(tmp_path / "ok.png")
    rep = load_image_folder(tmp_path, resolution=64, bucket_step=8)
    assert "too large" in dict(rep.skipped)["big.png"] and len(rep) == 1
    monkeypatch.setattr(I, "MAX_PIXELS", 10**9)
    monkeypatch.setattr(I, "MAX_DECODE_BYTES", 100_000)
    assert "memory" in dict(load_image_folder(tmp_path, resolution=64, bucket_step=8).skipped)["big.png"]


# ---------------------------------------------------------------- in-memory images

def test_records_from_images_comfy_batch():
    batch = torch.zeros(2, 48, 96, 3)
    batch[0, ..., 1] = 1.0  # green
    batch[1] = 0.5
    rep = records_from_images(batch, ["green", "grey"], resolution=64, bucket_step=8)
    assert isinstance(rep, LoadReport) and len(rep) == 2 and isinstance(rep[0], ImageRecord)
    r0, r1 = list(rep)
    # 96 wide x 48 tall, h/w .5 -> (48, 96) exists at 64/8 (704x1472 / 16 = 44x92 -> 48x96): no crop
    assert r0.target_hw == (48, 96) and r0.crop_top_left == (0, 0) and r0.original_hw == (48, 96)
    assert r0.pixels.shape == (3, 48, 96) and r0.caption == "green" and r1.caption == "grey"
    assert _mean_rgb(r0) == pytest.approx([0, 255, 0], abs=1)
    assert _mean_rgb(r1) == pytest.approx([128] * 3, abs=1)


def test_records_from_images_list_mixed_and_caption_errors():
    imgs = [_rgb(64, 64), torch.ones(32, 32, 3), torch.rand(40, 40, 4)]
    rep = records_from_images(imgs, "one caption", resolution=32, bucket_step=8)
    assert [r.caption for r in rep] == ["one caption"] * 3
    assert all(r.pixels.shape == (3, 32, 32) for r in rep)
    assert rep[1].pixels.min() == 1.0
    assert records_from_images(imgs[:1], None, 32, 8, default_caption="d")[0].caption == "d"
    with pytest.raises(AptDatasetError, match="2 captions"):
        records_from_images(imgs, ["a", "b"], resolution=32, bucket_step=8)
    with pytest.raises(AptDatasetError, match="No images"):
        records_from_images([], None)
    with pytest.raises(AptDatasetError, match="shape"):
        records_from_images([torch.zeros(3, 8, 8, 2)], None, 32, 8)


def _png(path, w, h, color_type=2, bit_depth=8, pixels=True):
    """A PNG written chunk by chunk (IHDR, one IDAT of zero rows compressed as it goes, IEND), so a
    30000 x 30000 test file costs the test only its compressed bytes."""
    import struct
    import zlib

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)))
        if pixels:
            bits = {0: 1, 2: 3}[color_type] * bit_depth
            row, c = b"\0" * (1 + (w * bits + 7) // 8), zlib.compressobj(9)
            f.write(chunk(b"IDAT", b"".join(c.compress(row) for _ in range(h)) + c.flush()))
        f.write(chunk(b"IEND", b""))


def test_decompression_bombs_are_refused_from_their_header_at_a_few_mb(tmp_path):
    """The three bombs of issue 25 (a 1-bit 30000^2 PNG, a large RGB PNG of zeros, a header-only file)
    plus one under the pixel limit that only its compression ratio gives away: each is skipped with
    a 'too large' line and the loader's peak memory grows by a few MB at most (own process)."""
    import subprocess
    import sys

    _png(tmp_path / "onebit.png", 30000, 30000, color_type=0, bit_depth=1)
    _png(tmp_path / "rgb.png", 16000, 16000)
    _png(tmp_path / "ratio.png", 8000, 8000)
    _png(tmp_path / "header_only.png", 10000, 10000, pixels=False)
    _rgb(96, 64).save(tmp_path / "fine.png")
    assert (tmp_path / "header_only.png").stat().st_size < 100 and (tmp_path / "onebit.png").stat().st_size < 200_000
    code = (
        "import resource, sys\n"
        "from apt_core.images import load_image_folder, load_image_file, sdxl_buckets\n"
        "load_image_file(sys.argv[1] + '/fine.png', sdxl_buckets(64, 8))\n"  # warm up: imports, first decode
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "rep = load_image_folder(sys.argv[1], resolution=64, bucket_step=8)\n"
        "grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(len(rep.records), grew)\n"
        "print(rep.summary())\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    first, _, summary = out.stdout.partition("\n")
    n, grew_kb = (int(v) for v in first.split())
    assert n == 1
    for name in ("onebit.png", "rgb.png", "ratio.png", "header_only.png"):
        assert f"  {name}: too large" in summary, summary
    assert grew_kb < 20 * 1024, f"peak RSS grew by {grew_kb / 1024:.0f} MB"


def test_captions_lose_control_characters_and_very_long_ones_are_cut_with_a_warning(tmp_path):
    _rgb(64, 64).save(tmp_path / "a.png")
    _rgb(64, 64).save(tmp_path / "b.png")
    (tmp_path / "a.txt").write_bytes("a photo\x00 of sks\u200b dog\x1b[31m\r\non grass".encode())
    (tmp_path / "b.txt").write_text("word " * 200_000, encoding="utf-8")  # 1 MB
    rep = load_image_folder(tmp_path, resolution=64, bucket_step=8)
    a, b = rep.records
    assert a.caption == "a photo of sks dog [31m on grass"
    assert len(b.caption) <= I.MAX_CAPTION_CHARS and b.caption.startswith("word word") and b.caption.endswith("word")
    assert "Warning: the caption b.txt is longer than 1000 characters" in rep.summary()
