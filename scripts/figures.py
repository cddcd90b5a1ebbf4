"""Evaluation figures drawn with PIL + numpy only (no matplotlib): a side-by-side panel of the inputs and every
method's fused output per pair type, and a box plot per metric across methods. They read the rows of
``metrics.csv`` (file paths and scores), so methods evaluated one command each into one folder share the figures.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from monai.transforms import LoadImage

from scripts import io as fio
from scripts.evaluation import RASTER, _arrow, _num

__all__ = ["pair_figure", "box_plot", "write_figures"]
_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int = 13):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: a fixed bitmap font
        return ImageFont.load_default()


def _thumb(path: str, size: int):
    """An RGB thumbnail of an image file as a viewer shows it (middle slice of a volume); grey if unreadable."""
    from PIL import Image

    if not path or not os.path.isfile(path):
        return Image.new("RGB", (size, size), (90, 90, 90))
    try:
        im = Image.open(path) if path.lower().endswith(RASTER) else None
        if im is None or im.mode not in ("L", "LA", "RGB", "RGBA", "P"):  # volumes, 16-bit: middle slice, stretched
            arr = np.nan_to_num(np.asarray(LoadImage(image_only=True)(path), dtype=np.float64))
            while arr.ndim > 2:
                arr = arr[..., arr.shape[-1] // 2]
            arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12)
            im = Image.fromarray(np.round(arr.T * 255).astype(np.uint8))
        im, scale = im.convert("RGB"), size / max(im.size)
        return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                         Image.NEAREST if scale > 1 else Image.LANCZOS)
    except Exception:
        return Image.new("RGB", (size, size), (90, 90, 90))


def _save_png(im, path: Path) -> None:
    fio.atomic_save(path, lambda t: im.save(t, format="PNG"))


def pair_figure(rows: list[dict], methods: list[str], path: Path, size: int = 192) -> None:
    """Inputs and each method's fused output, side by side, for the first pair scored by the most methods."""
    from PIL import Image, ImageDraw

    by_name: dict = {}
    for r in rows:
        by_name.setdefault(r["name"], {})[r["method"]] = r
    name = max(sorted(by_name), key=lambda n: len(by_name[n]))
    got, r0 = by_name[name], next(iter(by_name[name].values()))
    reg = bool(r0.get("reg_MAE"))
    panels = [(f"A: {r0['modality_a']}", r0["source_a"]), (f"B: {r0['modality_b']}{' moving' * reg}", r0["source_b"])]
    panels += [(f"{r0['modality_b']} aligned (truth)", r0["aligned_b"])] * reg
    for m in (m for m in methods if m in got):  # the colour version where inference wrote one
        f = got[m]["fused_file"]
        rgb = f[: -len("_fused.png")] + "_fused_rgb.png"
        panels.append((m, rgb if f.endswith("_fused.png") and os.path.isfile(rgb) else f))
    font, pad, head = _font(13), 8, 44
    im = Image.new("RGB", (pad + len(panels) * (size + pad), head + size + pad), "white")
    draw = ImageDraw.Draw(im)
    draw.text((pad, 4), f"{r0['pair']}: {name}", fill="black", font=_font(15))
    for i, (label, p) in enumerate(panels):
        x = pad + i * (size + pad)
        draw.text((x, 24), label[:28], fill="black", font=font)
        th = _thumb(str(p), size)
        im.paste(th, (x + (size - th.width) // 2, head + (size - th.height) // 2))
    _save_png(im, path)


def box_plot(rows: list[dict], metric: str, methods: list[str], pairs: list[str], path: Path) -> None:
    """A group of boxes (one colour per method) per pair type: quartile box, median line, whiskers to the furthest
    value within 1.5 IQR, dots beyond."""
    from PIL import Image, ImageDraw

    data = {(p, m): np.array([v for r in rows if r["pair"] == p and r["method"] == m
                              for v in [_num(r.get(metric))] if math.isfinite(v)]) for p in pairs for m in methods}
    allv = np.concatenate(list(data.values()))
    if not allv.size:
        return
    left, top, bottom, step, font, big = 72, 56, 290, 26, _font(12), _font(15)
    width = max(460, left + 20 + len(pairs) * (len(methods) * step + 34))
    gw = (width - left - 20) / len(pairs)
    im = Image.new("RGB", (width, bottom + 40), "white")
    draw = ImageDraw.Draw(im)
    lo, hi = float(allv.min()), float(allv.max())
    lo, hi = (lo - 1, hi + 1) if hi == lo else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))

    def y(v):
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    mag = 10 ** math.floor(math.log10((hi - lo) / 5))
    tick = min(k * mag for k in (1, 2, 2.5, 5, 10) if k * mag >= (hi - lo) / 5)
    for t in np.arange(math.ceil(lo / tick) * tick, hi, tick):  # y axis: grid, ticks, labels
        draw.line([(left, y(t)), (width - 10, y(t))], fill=(225, 225, 225))
        draw.line([(left - 4, y(t)), (left, y(t))], fill="black")
        label = f"{round(t, 10):.10f}".rstrip("0").rstrip(".")
        draw.text((left - 8 - draw.textlength(label, font=font), y(t) - 7), label, fill="black", font=font)
    draw.line([(left, top - 6), (left, bottom), (width - 10, bottom)], fill="black")
    up, ax = _arrow(metric) == "↑", left + draw.textlength(metric, font=big) + 10
    draw.text((left, 6), metric, fill="black", font=big)  # title; the arrow drawn (fonts may lack the glyph)
    draw.line([(ax, 8), (ax, 22)], fill="black", width=2)
    draw.polygon([(ax - 4, 12), (ax + 4, 12), (ax, 6)] if up else [(ax - 4, 18), (ax + 4, 18), (ax, 24)], fill="black")
    draw.text((ax + 10, 8), f"({'higher' if up else 'lower'} is better)", fill="black", font=font)
    x = left
    for i, m in enumerate(methods):  # legend
        draw.rectangle([x, 32, x + 10, 42], fill=_COLOURS[i % len(_COLOURS)], outline="black")
        draw.text((x + 14, 30), m, fill="black", font=font)
        x += 24 + draw.textlength(m, font=font)
    for g, p in enumerate(pairs):
        centre = left + (g + 0.5) * gw
        draw.text((centre - draw.textlength(p, font=font) / 2, bottom + 10), p, fill="black", font=font)
        for i, m in enumerate(methods):
            v = data[(p, m)]
            if not v.size:
                continue
            cx = centre + (i - (len(methods) - 1) / 2) * step
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            inside = v[(v >= q1 - 1.5 * (q3 - q1)) & (v <= q3 + 1.5 * (q3 - q1))]
            for w in (inside.min(), inside.max()):
                draw.line([(cx, y(w)), (cx, y(med))], fill="black")
                draw.line([(cx - 5, y(w)), (cx + 5, y(w))], fill="black")
            draw.rectangle([cx - 9, y(q3), cx + 9, y(q1)], fill=_COLOURS[i % len(_COLOURS)], outline="black")
            draw.line([(cx - 9, y(med)), (cx + 9, y(med))], fill="black", width=2)
            for o in v[(v < inside.min()) | (v > inside.max())]:
                draw.ellipse([cx - 2, y(o) - 2, cx + 2, y(o) + 2], outline="black")
    _save_png(im, path)


def write_figures(rows: list[dict], metrics: list[str], folder: Path) -> None:
    """``fusion_<pair>.png`` per pair type and ``box_<metric>.png`` per metric, over every method in ``rows``."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    pairs = sorted({r["pair"] for r in rows})
    for p in pairs:
        pair_figure([r for r in rows if r["pair"] == p], methods, folder / f"fusion_{fio.safe_name(p)}.png")
    for m in metrics:
        box_plot(rows, m, methods, pairs, folder / f"box_{fio.safe_name(m)}.png")
