"""Thumbnails of the example workflows (`<name>.jpg`, what ComfyUI's template browser shows), drawn with Pillow."""

from __future__ import annotations

from pathlib import Path

from workflow_specs import MODE_ALWAYS, VIRTUAL_NODES


_TYPE_COLORS = {"MODEL": (180, 140, 255), "CLIP": (255, 210, 80), "VAE": (255, 110, 110),
                "CONDITIONING": (255, 160, 60), "LATENT": (255, 140, 200), "IMAGE": (100, 180, 255),
                "STRING": (120, 200, 120)}


def _header_color(n: dict) -> tuple[int, int, int]:
    if n["type"] in VIRTUAL_NODES:
        return (120, 100, 50)
    if n["type"].startswith("APT"):
        return (120, 60, 150)
    if "Loader" in n["type"]:
        return (50, 90, 130)
    if n["type"] in ("KSampler", "VAEDecode", "SaveImage"):
        return (50, 110, 70)
    return (70, 70, 80)


THUMB_SIZE = (640, 400)


def render_thumbnail(wf: dict, title: str, path: Path, object_info: dict, width: int = THUMB_SIZE[0],
                     height: int = THUMB_SIZE[1]) -> None:
    """A small picture of the graph: nodes as boxes with their titles, links as lines, muted nodes grey."""
    from PIL import Image, ImageDraw, ImageFont

    nodes = wf["nodes"]
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    top = 46
    scale = min((width - 20) / (x1 - x0), (height - top - 10) / (y1 - y0))
    ox = (width - (x1 - x0) * scale) / 2
    img = Image.new("RGB", (width, height), (32, 32, 36))
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=11)
        big = ImageFont.load_default(size=18)
    except TypeError:  # Pillow < 10.1
        font = big = ImageFont.load_default()

    def tx(x, y):
        return ox + (x - x0) * scale, top + (y - y0) * scale

    for g in wf.get("groups", []):
        gx, gy, gw, gh = g["bounding"]
        a, b = tx(gx, gy)
        c, e = tx(gx + gw, gy + gh)
        col = tuple(int(g["color"][k:k + 2], 16) for k in (1, 3, 5)) if len(g["color"]) == 7 else (80, 80, 80)
        d.rectangle([a, b, c, e], outline=col, width=2, fill=tuple(int(v * 0.35 + 32 * 0.65) for v in col))
    by_id = {n["id"]: n for n in nodes}
    for _lid, src, sslot, dst, dslot, ltype in wf["links"]:
        s, t = by_id[src], by_id[dst]
        a = tx(s["pos"][0] + s["size"][0], s["pos"][1] + 30 + 20 * sslot)
        row = sum(1 for inp in t["inputs"][:dslot] if "widget" not in inp)
        b = tx(t["pos"][0], t["pos"][1] + 30 + 20 * row)
        pts = []
        for k in range(21):
            u = k / 20
            cx = (1 - u) ** 3 * a[0] + 3 * (1 - u) ** 2 * u * (a[0] + 40) + 3 * (1 - u) * u ** 2 * (b[0] - 40) + u ** 3 * b[0]
            cy = (1 - u) ** 3 * a[1] + 3 * (1 - u) ** 2 * u * a[1] + 3 * (1 - u) * u ** 2 * b[1] + u ** 3 * b[1]
            pts.append((cx, cy))
        d.line(pts, fill=_TYPE_COLORS.get(ltype, (160, 160, 160)), width=2)
    for n in nodes:
        a = tx(*n["pos"])
        b = tx(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        muted = n.get("mode", 0) != MODE_ALWAYS
        body = (60, 60, 60) if muted else ((90, 80, 50) if n["type"] in VIRTUAL_NODES else (53, 53, 58))
        d.rounded_rectangle([a, b], radius=4, fill=body, outline=(20, 20, 20))
        hb = min(b[1], a[1] + 14)
        d.rounded_rectangle([a, (b[0], hb)], radius=4, fill=(90, 90, 90) if muted else _header_color(n))
        label = n.get("title") or object_info.get(n["type"], {}).get("display_name") or n["type"]
        maxc = max(3, int((b[0] - a[0] - 6) / 6))
        d.text((a[0] + 3, a[1] + 1), label if len(label) <= maxc else label[:maxc - 1] + "…", fill=(235, 235, 235),
               font=font)
    d.text((12, 12), title, fill=(240, 240, 240), font=big)
    img.save(path, "JPEG", quality=82, optimize=True)
