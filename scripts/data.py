"""Datalist readers: turn the layouts people have into MONAI datalists of fusion pairs.

Each item is a dict with ``source_a`` (structural MRI), ``source_b`` (CT/PET/SPECT or another MR contrast),
``modality_a``, ``modality_b``, ``pair`` (e.g. ``"PET-MRI"``) and a unique ``name``; optional ``aligned_b``
(ground truth of a deformed ``source_b``), ``moving`` and ``lesion`` (mask) paths.

Layouts (``layout="auto"`` picks by what it finds):

- ``csv``: a ``pairs.csv`` manifest, either the AANLIB one (``pair,id,mri,moving,aligned``) or a generic one
  (``source_a,source_b[,name,pair,modality_a,modality_b,lesion]``); paths relative to the CSV's folder.
- ``folders``: the paired-folder layout of public fusion benchmarks, ``<dir>/<MODALITY>/<name>.<ext>`` matched by
  file name, optionally one level deeper per pair type (``<dir>/MRI_CT/{MRI,CT}/...``); for volumes
  (``spatial_dims=3``) an image may be a DICOM series folder (``<dir>/MRI/<name>/*.dcm``, matched by the folder
  name, e.g. with ``<dir>/PET/<name>.nii.gz``).
- ``json``: a MONAI (decathlon-style) datalist JSON of NIfTI/DICOM/PNG files (or DICOM series folders) with
  ``training``/``validation``/``testing`` lists; a folder holding ``datalist_<N>d.json``, ``datalist.json`` or
  ``dataset.json`` works too.

Layouts without explicit splits are split by a hash of the pair name (stable across machines and methods).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import zlib
from pathlib import Path

from monai.data import load_decathlon_datalist

from scripts.io import safe_name
from scripts.transforms import FusionDataError, LoadFusionPaird
from scripts.volumes import is_dicom_series

__all__ = ["build_datalist", "check_datalist", "in_validation_split"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".dcm")
# Structural modalities, most preferred first: the first one found becomes source_a.
STRUCTURAL = ("MRI", "MR", "T1", "T1W", "T1CE", "T1C", "T2", "T2W", "FLAIR", "PD")
NON_MODALITY_DIRS = {"mask", "masks", "label", "labels", "seg", "segmentation", "lesion_masks", "fused", "gt"}
PATH_KEYS = ("source_a", "source_b", "aligned_b", "moving", "lesion")
ERROR_KEY = "fusion_error"  # an item that cannot be fused: inference logs and skips it (scripts.engine.SkipBadPairs)
SPLITS = ("training", "validation", "testing", "all")


def in_validation_split(name: str, fraction: float = 0.2) -> bool:
    """Deterministic hold-out by pair name: CRC32 (not Python's salted hash) so every run and method agrees."""
    return zlib.crc32(str(name).encode("utf-8")) % 1000 < round(fraction * 1000)


def read_split_file(path: str | os.PathLike) -> set[str]:
    """The validation pair names of a split file ``{"validation": ["CT-MRI_003", ...]}``."""
    path = Path(path)
    try:
        names = json.loads(path.read_text(encoding="utf-8")).get("validation")
    except (OSError, ValueError, AttributeError) as e:
        raise FusionDataError(f"{path}: cannot read the split file ({type(e).__name__}: {e}).") from e
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise FusionDataError(f'{path}: a split file needs a non-empty "validation" list of pair names.')
    return set(names)


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def _modality_order(mod: str) -> tuple:
    up = mod.upper()
    return (STRUCTURAL.index(up) if up in STRUCTURAL else len(STRUCTURAL), up)


# ----------------------------------------------------------------------------------------------------- readers
def _read_csv(path: Path, pair_source: str, skip_bad: bool = False) -> list[dict]:
    base = path.parent
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    items = []
    for i, row in enumerate(rows):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        if "mri" in row:  # AANLIB manifest: pair,id,mri,moving,aligned
            pair = row.get("pair") or "X-MRI"
            other = row.get("aligned") if pair_source == "aligned" and row.get("aligned") else row.get("moving")
            item = {
                "name": f"{pair}_{row.get('id') or i:0>3}",
                "pair": pair,
                "modality_a": pair.split("-")[-1] or "MRI",
                "modality_b": pair.split("-")[0],
                "source_a": row["mri"],
                "source_b": other,
            }
            if row.get("aligned"):
                item["aligned_b"] = row["aligned"]
            if row.get("moving"):
                item["moving"] = row["moving"]
        elif "source_a" in row and "source_b" in row:
            item = {k: v for k, v in row.items() if v}
            item.setdefault("modality_a", "A")
            item.setdefault("modality_b", "B")
            item.setdefault("pair", f"{item['modality_b']}-{item['modality_a']}")
            item.setdefault("name", f"{item['pair']}_{_stem(Path(item['source_a']))}")
        else:
            raise FusionDataError(
                f"{path}: unknown manifest columns {sorted(row)}; expected pair,id,mri,moving,aligned "
                "or source_a,source_b[,name,pair,modality_a,modality_b,lesion]."
            )
        if not item.get("source_b") or not item.get("source_a"):
            message = f"{path}: row {i + 2} has no partner image for {item.get('source_a') or item.get('source_b')}."
            if not skip_bad:
                raise FusionDataError(message)
            item[ERROR_KEY] = message
        items.append(item)
    return [_resolve(item, base) for item in items]


def _is_entry(path: Path, series: bool) -> bool:
    """An image of a modality folder: an image file, or (``series``) a DICOM series folder."""
    return _is_image(path) or (series and is_dicom_series(path))


def _folder_groups(root: Path, spatial_dims: int = 2) -> list[tuple[str, Path, bool]]:
    """(pair label prefix, folder of modality sub-folders, whether DICOM series folders count as images): root
    itself, or each pair-type sub-folder. In 2D workflows a folder of ``.dcm`` files is a set of 2D images (as
    before); in 3D workflows it is one volume, a DICOM series (``<dir>/<MODALITY>/<name>/*.dcm``), next to NIfTI
    (or other) volume files."""

    def modality_dirs(d: Path, series: bool) -> list[Path]:
        return [
            s
            for s in sorted(d.iterdir())
            if s.is_dir() and s.name.lower() not in NON_MODALITY_DIRS and any(_is_entry(f, series) for f in s.iterdir())
        ]

    for series in (True, False) if int(spatial_dims) == 3 else (False,):
        if len(modality_dirs(root, series)) >= 2:
            return [("", root, series)]
        groups = [(sub.name, sub, series) for sub in sorted(root.iterdir())
                  if sub.is_dir() and len(modality_dirs(sub, series)) >= 2]
        if groups:
            return groups
    return []


def _read_folders(root: Path, skip_bad: bool = False, spatial_dims: int = 2) -> list[dict]:
    items = []
    for _, group, series in _folder_groups(root, spatial_dims):
        mods = {
            d.name: {_stem(f): f for f in sorted(d.iterdir()) if _is_entry(f, series)}
            for d in sorted(group.iterdir())
            if d.is_dir() and d.name.lower() not in NON_MODALITY_DIRS and any(_is_entry(f, series) for f in d.iterdir())
        }
        names = sorted(mods, key=_modality_order)
        mod_a, others = names[0], names[1:]
        files_a = mods[mod_a]
        for mod_b in others:
            files_b = mods[mod_b]
            pair = f"{mod_b}-{mod_a}"
            if not skip_bad:
                for stem in sorted(set(files_a) ^ set(files_b)):
                    have, missing = (mod_a, mod_b) if stem in files_a else (mod_b, mod_a)
                    raise FusionDataError(
                        f"{mods[have][stem]}: no partner named '{stem}.*' in {group / missing}; "
                        "paired folders must hold the same file names."
                    )
            for stem in sorted(set(files_a) | set(files_b)):
                if stem not in files_a or stem not in files_b:  # skip_bad: an item that says what is wrong
                    have, missing = (mod_a, mod_b) if stem in files_a else (mod_b, mod_a)
                    items.append({
                        "name": f"{pair}_{stem}", "pair": pair, "modality_a": mod_a, "modality_b": mod_b,
                        "source_a": str(mods[have][stem]),
                        ERROR_KEY: f"{mods[have][stem]}: no partner named '{stem}.*' in {group / missing}; "
                        "paired folders must hold the same file names.",
                    })
                    continue
                items.append(
                    {
                        "name": f"{pair}_{stem}",
                        "pair": pair,
                        "modality_a": mod_a,
                        "modality_b": mod_b,
                        "source_a": str(files_a[stem]),
                        "source_b": str(files_b[stem]),
                    }
                )
    return items


def _read_json(path: Path, split: str) -> tuple[list[dict], bool]:
    """Items of ``split`` and whether the file defined that split itself."""
    with open(path, encoding="utf-8") as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as e:
            raise FusionDataError(f"{path}: not valid JSON ({e}).") from e
    lists = [k for k in ("training", "validation", "testing") if isinstance(content.get(k), list)]
    if not lists:
        raise FusionDataError(f"{path}: no 'training', 'validation' or 'testing' list in this datalist.")
    keys = lists if split == "all" else [split] if split in lists else ["training"]
    # absolute base: MONAI joins it to the entries, and a relative one would be joined again when resolving
    items = [it for k in keys for it in load_decathlon_datalist(path, False, k, base_dir=path.parent.resolve())]
    for it in items:
        if "label" in it:  # in a fusion datalist, 'label' is a lesion mask; 'label' is the training target here
            it["lesion"] = it.pop("label")
        if "image" in it and "source_a" not in it and isinstance(it["image"], list) and len(it["image"]) == 2:
            it["source_a"], it["source_b"] = it.pop("image")
        it.setdefault("modality_a", "A")
        it.setdefault("modality_b", "B")
        it.setdefault("pair", f"{it['modality_b']}-{it['modality_a']}")
        src = it.get("source_a") or it.get("image")
        it.setdefault("name", f"{it['pair']}_{_stem(Path(str(src)))}")
    return [_resolve(it, path.parent) for it in items], split in lists


def _resolve(item: dict, base: Path) -> dict:
    for k in PATH_KEYS:
        if item.get(k) and not os.path.isabs(str(item[k])):
            item[k] = str((base / str(item[k])).resolve())
    return item


# ------------------------------------------------------------------------------------------------------ public
def _detect(dataset_dir: Path, spatial_dims: int) -> tuple[str, Path]:
    if dataset_dir.is_file():
        suffix = dataset_dir.suffix.lower()
        if suffix in (".csv", ".json"):
            return suffix[1:], dataset_dir
        raise FusionDataError(f"{dataset_dir}: a dataset must be a folder, a .csv manifest or a .json datalist.")
    if not dataset_dir.is_dir():
        raise FusionDataError(f"{dataset_dir}: dataset folder not found.")
    if (dataset_dir / "pairs.csv").is_file():
        return "csv", dataset_dir / "pairs.csv"
    for name in (f"datalist_{spatial_dims}d.json", "datalist.json", "dataset.json"):
        if (dataset_dir / name).is_file():
            return "json", dataset_dir / name
    return "folders", dataset_dir


def build_datalist(
    dataset_dir: str | os.PathLike,
    split: str = "all",
    layout: str = "auto",
    spatial_dims: int = 2,
    pair_source: str = "aligned",
    pairs: list[str] | None = None,
    val_fraction: float = 0.2,
    check: bool = True,
    skip_bad: bool = False,
    split_file: str | os.PathLike | None = None,
) -> list[dict]:
    """Read ``dataset_dir`` into a list of fusion-pair dicts.

    Args:
        dataset_dir: a folder (any layout above), a ``.csv`` manifest or a ``.json`` datalist.
        split: ``"training"``, ``"validation"``, ``"testing"`` or ``"all"``. Layouts without splits hold out
            ``val_fraction`` of the pairs by name hash as validation (``"testing"`` is that same hold-out).
        layout: ``"auto"``, ``"csv"``, ``"folders"`` or ``"json"``.
        spatial_dims: picks ``datalist_<N>d.json`` in a folder that has one (the embedded dataset); in paired
            folders with 3, a folder of DICOM files is one volume (a series), with 2 a set of 2D images.
        pair_source: for manifests with a deformed ``moving`` image and its ``aligned`` ground truth: which one
            becomes ``source_b`` (``"aligned"`` for fusion methods, ``"moving"`` for registration methods).
        pairs: keep only these pair types (e.g. ``["CT-MRI"]``); ``None`` keeps all.
        check: load every pair once and fail with one error listing each unusable file (missing, corrupt, wrong
            channel count, NaN/Inf, constant, size mismatch) before any training or inference starts.
        skip_bad: instead of raising, return a pair that cannot be used (no partner; with ``check``, any problem
            above) as an item with a ``fusion_error`` message; batch inference logs and skips such items.
        split_file: a JSON file ``{"validation": [pair names]}`` that fixes the hold-out instead of the name hash
            (``configs/aanlib_split.json``: the split of the shipped weights' model card); the other pairs are
            the training split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if pair_source not in ("aligned", "moving"):
        raise ValueError(f"pair_source must be 'aligned' or 'moving', got {pair_source!r}.")
    dataset_dir = Path(os.path.expanduser(str(dataset_dir)))
    kind, path = _detect(dataset_dir, spatial_dims)
    kind = kind if layout == "auto" else layout
    has_split = False
    if kind == "csv":
        items = _read_csv(path, pair_source, skip_bad)
    elif kind == "folders":
        items = _read_folders(path, skip_bad, spatial_dims)
    elif kind == "json":
        items, has_split = _read_json(path, split)
    else:
        raise ValueError(f"layout must be 'auto', 'csv', 'folders' or 'json', got {layout!r}.")
    if pairs:
        wanted = {p.upper() for p in pairs}
        items = [it for it in items if str(it.get("pair", "")).upper() in wanted]
    if split_file and split != "all":
        held_out = read_split_file(split_file)
        known = {it["name"] for it in items}
        if not held_out & known:
            raise FusionDataError(
                f"{split_file}: none of its {len(held_out)} validation pair names (e.g. {sorted(held_out)[0]!r}) "
                f"is a pair of {dataset_dir} (names like {sorted(known)[0]!r}): wrong split file for this dataset?"
            )
        keep_val = split in ("validation", "testing")
        items = [it for it in items if (it["name"] in held_out) == keep_val]
    elif not has_split and split != "all":
        keep_val = split in ("validation", "testing")
        items = [it for it in items if in_validation_split(it["name"], val_fraction) == keep_val]
    if not items:
        raise FusionDataError(
            f"{dataset_dir}: no image pairs found for split '{split}'"
            + (f" and pairs {pairs}" if pairs else "")
            + f" (layout '{kind}': expected a pairs.csv, a datalist JSON or paired modality folders)."
        )
    names = [it["name"] for it in items]
    if len(set(names)) != len(names):  # e.g. one slice name shared by several pair types: qualify by pair
        for it in items:
            if not str(it["name"]).startswith(f"{it['pair']}_"):
                it["name"] = f"{it['pair']}_{it['name']}"
        names = [it["name"] for it in items]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise FusionDataError(f"{dataset_dir}: duplicate pair names {dup}; names must be unique.")
    # outputs are named <safe_name(name)>_fused.*: two names that sanitise alike would overwrite each other
    by_file: dict[str, str] = {}
    for n in names:
        other = by_file.setdefault(safe_name(n), n)
        if other != n:
            raise FusionDataError(
                f"{dataset_dir}: pair names {other!r} and {n!r} give the same output file name "
                f"{safe_name(n)!r}; rename one of them."
            )
    if check:
        check_datalist(items, mark=skip_bad)
    logger.info("%s: %d pairs (%s, split %s)", dataset_dir, len(items), kind, split)
    return items


def check_datalist(
    items: list[dict], loader: LoadFusionPaird | None = None, max_report: int = 20, mark: bool = False
) -> None:
    """Load every pair once; raise one :class:`FusionDataError` listing each unusable pair (``mark``: set the
    item's ``fusion_error`` instead)."""
    loader = loader or LoadFusionPaird()
    problems = []
    for item in items:
        if item.get(ERROR_KEY):
            problems.append(item[ERROR_KEY])
            continue
        try:
            loader({k: item[k] for k in ("source_a", "source_b") if k in item})
        except FusionDataError as e:
            if mark:
                item[ERROR_KEY] = str(e)
            problems.append(str(e))
    if mark:
        return
    if problems:
        more = f"\n  ... and {len(problems) - max_report} more" if len(problems) > max_report else ""
        raise FusionDataError(
            f"{len(problems)} of {len(items)} pairs are unusable:\n  " + "\n  ".join(problems[:max_report]) + more
        )
