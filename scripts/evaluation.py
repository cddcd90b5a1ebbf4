"""Evaluation workflow pieces (``configs/evaluate.json``): per-image fusion metrics, summaries and figures.

Scoring convention (the published CDDFuse protocol, ``shared/design/metrics.md`` §0.1):

- sources: grey 0..255 as read from disk, rounded; a colour source is scored by its luminance
  Y = 0.299R + 0.587G + 0.114B. Sources outside 0..255 (e.g. CT in HU, 16-bit) are min-max stretched to 0..255.
- fused image: the 8-bit image that inference writes (``round(255 * clamp(pred, 0, 1))``; NIfTI outputs are
  not quantised), then, with ``fused_minmax`` (default), min-max stretched per image to 0..255 and rounded.
  Scoring a ``--fused_dir`` of files written by inference therefore gives exactly the scores of evaluating the
  method directly.
- with a deformed moving ``source_b`` and its ground truth ``aligned_b``, the fusion is scored against the
  aligned image, and ``reg_MAE``/``reg_NCC``/``reg_SSIM`` score the aligned output (the network's ``registered``
  output if it gives one, else the moving input itself: the no-registration floor) against the ground truth.
"""

from __future__ import annotations

import csv
import io as _io
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform

from scripts import io as fio
from scripts import metrics as M
from scripts.transforms import FusionDataError

__all__ = ["ScoringSourcesd", "attach_fused_files", "LoadFusedd", "FusedPassThrough", "FusionMetricsWriter"]

RASTER = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
REG = {f"reg_{k}": v[1] for k, v in M.REGISTRATION_METRICS.items()} | {"reg_SSIM": True, "reg_folding": False}
INFO = ["name", "pair", "modality_a", "modality_b", "method"]
FILES = ["error", "fused_file", "source_a", "source_b", "aligned_b"]
_LOADER = LoadImage(image_only=True, ensure_channel_first=True)


def _path(x) -> str:
    return str(getattr(x, "meta", {}).get("filename_or_obj", "") if torch.is_tensor(x) else x or "")


def read_grey(path) -> torch.Tensor:
    """(1, *spatial) float image of a file as stored (alpha dropped; RGB -> luminance, unrounded)."""
    p = Path(path)
    if not p.is_file():
        raise FusionDataError(f"{p}: file not found.")
    try:
        img = _plain(_LOADER(str(p)))
    except Exception as e:
        raise FusionDataError(f"{p}: cannot read as an image ({type(e).__name__}: {e}).") from e
    if img.shape[0] in (2, 4):
        img = img[:-1]
    if img.shape[0] == 3:
        img = 0.299 * img[0:1] + 0.587 * img[1:2] + 0.114 * img[2:3]
    if img.shape[0] != 1:
        raise FusionDataError(f"{p}: {img.shape[0]} channels; expected grey or RGB.")
    return img


def _plain(x) -> torch.Tensor:
    """A float CPU torch.Tensor (MetaTensor bookkeeping makes the metrics ~10x slower)."""
    x = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
    return x.detach().float().cpu()


def _rc(x) -> torch.Tensor:
    """(C, x, y) as MONAI loads 2D files -> (C, row, column) as image files are read by the published evaluator
    (Qabf and FMI depend on the orientation); volumes unchanged."""
    x = _plain(x)
    return x.transpose(-1, -2) if x.dim() == 3 else x


def grey255(x: torch.Tensor) -> torch.Tensor:
    """(1, *spatial) source values -> rounded 0..255 grey.

    Data on an 8-bit scale (values in 0..255 beyond 0..1: PNG/JPEG sources and their luminance) is kept as is,
    the published evaluator's convention; anything else (float NIfTI in 0..1, CT in HU, 12-bit DICOM) is min-max
    stretched to 0..255 first, since the metrics' constants (VIF's noise variance 2, SSIM's C1/C2) assume an
    8-bit range."""
    x = _plain(x)
    eight_bit = bool(x.min() >= 0 and 1 < x.max() <= 255)
    return M.to_grey255(x[None], input_range=255.0, minmax=not eight_bit)[0]


def _check_size(img: torch.Tensor, ref: torch.Tensor, path, what: str) -> None:
    if tuple(img.shape[1:]) != tuple(ref.shape[1:]):
        raise FusionDataError(f"{path}: {what} is {tuple(img.shape[1:])} but its sources are "
                              f"{tuple(ref.shape[1:])}; it must have the size of the sources.")


def studio(y: torch.Tensor) -> torch.Tensor:
    """Full-range luminance (0..255) -> studio-range Y (16..235) of MATLAB ``rgb2ycbcr``, rounded."""
    return torch.round(16.0 + y * (219.0 / 255.0))


class ScoringSourcesd(MapTransform):
    """Keep the 0..255 grey sources that the metrics use (``score_a``, ``score_b``; place it before any intensity
    scaling). Loads ``aligned_b`` when it is not ``source_b`` itself: then ``score_b`` is the aligned ground truth
    and ``score_moving`` the moving input (registration scores are computed).

    ``truth_luminance``: how the grey ground truth of a *colour* moving image was made, so that the moving
    image's luminance is compared on the same scale: ``"full"`` (BT.601 full range, PIL/OpenCV) or ``"studio"``
    (16..235, MATLAB ``rgb2ycbcr``; the AANLIB PET/SPECT ``*_aligned.png``)."""

    def __init__(self, keys=("source_a", "source_b"), reference_key: str = "aligned_b",
                 truth_luminance: str = "full") -> None:
        super().__init__(keys)
        if truth_luminance not in ("full", "studio"):
            raise ValueError(f"truth_luminance must be 'full' or 'studio', got {truth_luminance!r}.")
        self.reference_key, self.truth_luminance = reference_key, truth_luminance

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        key_a, key_b = self.keys
        d["score_a"], d["score_b"] = grey255(d[key_a]), grey255(d[key_b])
        ref = d.get(self.reference_key)
        if isinstance(ref, str | os.PathLike) and ref and Path(ref).resolve() != Path(_path(d[key_b])).resolve():
            gt = read_grey(ref)
            _check_size(gt, d[key_a], ref, "the aligned ground truth")
            d["score_moving"], d["score_b"] = d["score_b"], grey255(gt)
            if self.truth_luminance == "studio" and d.get(f"{key_b}_chroma") is not None:
                d["score_moving"], d["truth_studio"] = studio(grey255(d[key_b])), True
        return d


def _candidates(fused_dir: Path, item: dict) -> list[Path]:
    name, src = fio.safe_name(item["name"]), Path(str(item["source_a"]))
    stem = src.name[: -len(".nii.gz")] if src.name.lower().endswith(".nii.gz") else src.stem
    return [fused_dir / f"{name}_fused.png", fused_dir / f"{name}_fused.nii.gz", fused_dir / f"{stem}.png"]


def attach_fused_files(datalist: list[dict], fused_dir) -> list[dict]:
    """Add ``fused`` (the file to score) to each item; ``fused_dir=None`` returns ``datalist`` unchanged.

    Accepted names, first found wins: ``<name>_fused.png``, ``<name>_fused.nii.gz`` (what the bundle's inference
    writes) and ``<stem of source_a>.png`` (other methods' result folders). Raises one :class:`FusionDataError`
    naming every missing file, or a stem shared by several pairs (score one pair type at a time: ``--pairs``)."""
    if not fused_dir:
        return datalist
    fused_dir, out, missing, used = Path(fused_dir), [], [], {}
    if not fused_dir.is_dir():
        raise FusionDataError(f"{fused_dir}: fused_dir not found.")
    for item in datalist:
        cands = _candidates(fused_dir, item)
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            missing.append(f"{cands[0]}: fused image of pair '{item['name']}' not found "
                           f"(also looked for {cands[1].name}, {cands[2].name}).")
            continue
        used.setdefault(found, []).append(item["name"])
        out.append({**item, "fused": str(found)})
    missing += [f"{f}: ambiguous, the same file would score pairs {n}; use --pairs or <name>_fused.png names."
                for f, n in used.items() if len(n) > 1]
    if missing:
        raise FusionDataError(f"{len(missing)} fused image(s) unusable in {fused_dir}:\n  " + "\n  ".join(missing))
    return out


class LoadFusedd(MapTransform):
    """Load the fused file ``d[key]`` as ``d[output_key]``, grey (RGB -> luminance) on the [0, 1] scale of
    network outputs (8-bit raster / 255, 16-bit / 65535; NIfTI and other formats as stored); its size must
    equal the sources'."""

    def __init__(self, keys="fused", output_key: str = "image", ref_key: str = "source_a") -> None:
        super().__init__(keys)
        self.output_key, self.ref_key = output_key, ref_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = read_grey(d[key])
            _check_size(img, d[self.ref_key], d[key], "the fused image")
            if str(d[key]).lower().endswith(RASTER):
                img = img / (65535.0 if float(img.max()) > 255 else 255.0)
            d[self.output_key] = img
        return d


class FusedPassThrough(torch.nn.Module):
    """The "network" of ``--fused_dir`` evaluation: returns the loaded fused image."""

    def forward(self, x: torch.Tensor, mode: str = "fuse") -> torch.Tensor:
        return x


def _fmt(v) -> str:
    return "nan" if v is None or not math.isfinite(v) else repr(float(v))


def _num(s) -> float:
    """A table cell as a float; empty or unreadable cells are nan."""
    try:
        return float(s)
    except (TypeError, ValueError):
        return math.nan


def _arrow(m: str) -> str:
    return "↑" if (M.METRICS[m][1] if m in M.METRICS else REG.get(m, True)) else "↓"


class FusionMetricsWriter:
    """Ignite handler: scores every decollated (batch, output) item and, at completion, writes into ``output_dir``
    ``metrics.csv`` (one row per image), ``metrics_summary.csv``/``.md`` (mean, std per pair type and method) and
    ``figures/`` (side-by-side PNG per pair type, box plot per metric). Rows of other methods already in
    ``metrics.csv`` are kept (rows of ``method`` are replaced), so evaluating several methods one command each into
    one folder gives one table. Metrics that fail on an image (e.g. a constant source) are ``nan`` in that row with
    the reason in ``error``; summaries leave them out and count them.

    Args:
        metrics: names of :data:`scripts.metrics.METRICS`; ``None``: every one applicable to the images.
        fused_minmax: stretch each fused image to 0..255 before scoring (published protocol).
        num_threads: torch threads while scoring (1: per-image metrics are small ops that intra-op threading slows
            down, badly so on a busy CPU; ``None`` keeps the global setting).
    """

    def __init__(self, output_dir, method: str, metrics=None, fused_minmax: bool = True, figures: bool = True,
                 num_threads: int | None = 1) -> None:
        self.output_dir, self.method, self.num_threads = Path(output_dir), str(method), num_threads
        self.metrics, self.fused_minmax, self.figures = metrics, fused_minmax, figures
        self.rows: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.write())

    def collect(self, engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, dict):
            raise ValueError("FusionMetricsWriter needs decollated engine outputs (decollate=True).")
        for b, o in zip(batch, output):
            self.rows.append(self.score({**b, **o}))

    def score(self, d: Mapping) -> dict:
        fused = d.get("fused") or (d.get("fused_files") or [""])[0]
        a, b, x = _rc(d["score_a"]), _rc(d["score_b"]), _rc(d["pred"])[:1]
        if fio.output_extension(fused or _path(d.get("source_a"))) == ".png":
            x = torch.round(x.clamp(0, 1) * 255.0) / 255.0  # the 8-bit file inference writes
        f = M.to_grey255(x[None], minmax=self.fused_minmax)
        row = {k: str(d.get(k, "")) for k in INFO[:4]}
        row.update(method=self.method, fused_file=str(fused), source_a=_path(d.get("source_a")),
                   source_b=_path(d.get("source_b")), aligned_b=str(d.get("aligned_b", "") or ""))
        threads = torch.get_num_threads()
        torch.set_num_threads(self.num_threads or threads)
        try:
            row.update(self._values(a, b, f, d))
        finally:
            torch.set_num_threads(threads)
        return row

    def _values(self, a, b, f, d: Mapping) -> dict:
        errors, vals = [], {}
        try:
            vals = M.compute_metrics(a[None], b[None], f, self.metrics)
        except Exception:  # some metric is undefined here: score the others one at a time, nan for that one
            for n in self.metrics or [n for n in M.METRICS if M._applicable(n, f.shape)]:
                try:
                    vals[n] = M.compute_metrics(a[None], b[None], f, [n])[n]
                except Exception as e:
                    vals[n] = None
                    errors.append(f"{n}: {e}")
        out = {n: _fmt(v if v is None else float(v[0])) for n, v in vals.items()}
        if "score_moving" in d:  # registration: the method's aligned output, else the moving input itself
            moved = d.get("registered")  # [0, 1] luminance
            if d.get("ddf") is not None:  # warp the moving image's own grey values with the method's field
                from scripts.registration import warp

                ddf = torch.as_tensor(d["ddf"]).float().cpu()
                moved = _rc(warp(_plain(d["score_moving"]).float(), ddf))
            elif moved is not None:
                moved = M.to_grey255(_rc(moved)[None])[0]
                moved = studio(moved) if d.get("truth_studio") else moved
            moved = _rc(d["score_moving"]) if moved is None else moved
            reg = M.compute_registration_metrics(moved[None], b[None])
            reg.setdefault("SSIM", M.ssim(b[None], b[None], moved[None], convention="wang", reduction="none")[:, 0])
            out.update({f"reg_{k}": _fmt(float(v[0])) for k, v in reg.items()})
        if d.get("ddf") is not None:  # fraction of folding pixels (Jacobian determinant <= 0) of the method's field
            from scripts.registration import folding_fraction

            out["reg_folding"] = _fmt(folding_fraction(torch.as_tensor(d["ddf"]).float().cpu()))
        out["error"] = "; ".join(errors)
        return out

    # ------------------------------------------------------------------------------------------- outputs
    def write(self) -> None:
        path = self.output_dir / "metrics.csv"
        old = []
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                old = [r for r in csv.DictReader(fh) if r.get("method") != self.method]
        rows = old + self.rows
        keys = {k for r in rows for k in r}
        metrics = [m for m in list(M.METRICS) + list(REG) if m in keys]
        _write_csv(path, INFO + metrics + FILES, rows)
        summary = summarise(rows, metrics)
        _write_csv(self.output_dir / "metrics_summary.csv",
                   ["pair", "method", "metric", "direction", "mean", "std", "n", "n_nan"], summary)
        md = summary_markdown(summary, metrics)
        fio.atomic_save(self.output_dir / "metrics_summary.md", lambda t: Path(t).write_text(md, encoding="utf-8"))
        if self.figures:
            from scripts.figures import write_figures

            write_figures(rows, metrics, self.output_dir / "figures")


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    fio.atomic_save(path, lambda t: Path(t).write_text(buf.getvalue(), encoding="utf-8"))


def summarise(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Mean and population std over images per (pair type, method), plus pair ``all`` when there are several
    pair types; non-finite values (metric undefined for that image) are left out and counted in ``n_nan``."""
    pairs = sorted({r["pair"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for pair in pairs + (["all"] if len(pairs) > 1 else []):
        for method in methods:
            group = [r for r in rows if r["method"] == method and pair in ("all", r["pair"])]
            for m in metrics:
                vals = np.array([_num(r.get(m)) for r in group if r.get(m) not in ("", None)])
                ok = vals[np.isfinite(vals)]
                if vals.size:
                    mean, std = (ok.mean(), ok.std()) if ok.size else (None, None)
                    out.append({"pair": pair, "method": method, "metric": m, "direction": _arrow(m),
                                "mean": _fmt(mean), "std": _fmt(std), "n": str(ok.size),
                                "n_nan": str(vals.size - ok.size)})
    return out


def summary_markdown(summary: list[dict], metrics: list[str]) -> str:
    """One markdown table: a row per (pair type, method), ``mean ± std`` per metric, best mean per pair in bold."""
    cells = {(s["pair"], s["method"], s["metric"]): s for s in summary}
    sign = {m: 1 if _arrow(m) == "↑" else -1 for m in metrics}
    best = {}
    for s in summary:
        if math.isfinite(_num(s["mean"])):
            key = (s["pair"], s["metric"])
            best[key] = max(best.get(key, -math.inf), sign[s["metric"]] * _num(s["mean"]))
    groups = list(dict.fromkeys((s["pair"], s["method"]) for s in summary))
    several = len({g[1] for g in groups}) > 1
    lines = ["| pair | method | n | " + " | ".join(f"{m} {_arrow(m)}" for m in metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    for pair, method in groups:
        row, n = [], 0
        for m in metrics:
            s = cells.get((pair, method, m))
            mean, text = (_num(s["mean"]), "nan") if s else (math.nan, "")
            if math.isfinite(mean):
                dec = min(4, max(0, 3 - math.floor(math.log10(abs(mean))))) if mean else 4  # 4 significant digits
                text = f"{mean:.{dec}f} ± {_num(s['std']):.{dec}f}"
                text = f"**{text}**" if several and sign[m] * mean == best[(pair, m)] else text
            if s and s["n_nan"] != "0":
                text += f" ({s['n_nan']} nan)"
            n = max(n, int(s["n"]) + int(s["n_nan"])) if s else n
            row.append(text)
        lines.append(f"| {pair} | {method} | {n} | " + " | ".join(row) + " |")
    return "\n".join(lines) + (
        "\n\nmean ± std (population) over images; ↑ higher is better, ↓ lower is better"
        + ("; best mean per pair type in bold" if several else "")
        + ("; (k nan): k images where the metric is undefined, left out (reason in metrics.csv `error`)"
           if any(s["n_nan"] != "0" for s in summary) else "") + ".\n")
