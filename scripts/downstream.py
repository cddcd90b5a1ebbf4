"""Downstream tasks: does fusion help a lesion segmenter or a lesion classifier?

Two MONAI bundle configs train a small network on one *input* at a time and write one row per input into a
results table; this module holds their data layer, metrics and table writer, and a driver that runs everything:

- ``configs/downstream_segmentation.json``: MONAI ``UNet`` segmenting the lesion mask (pooled and per-slice Dice);
- ``configs/downstream_classification.json``: MONAI ``DenseNet`` (CPU-sized; ``DenseNet121`` by override) telling
  slices with a lesion from slices without (accuracy, balanced accuracy, ROC AUC).

Inputs (``--input``): ``mri`` (source A alone), ``functional`` (source B alone: CT / PET / SPECT luminance), ``both``
(the two as two channels: early fusion, a reference), ``fused`` (a fusion method's output, ``--fused_dir``: the
folder ``configs/inference.json`` wrote, ``<name>_fused.png`` per pair).

Data: by default a larger instance of the embedded phantom (``scripts.phantom``; :data:`DOWNSTREAM_PHANTOM`,
cached in ``data/phantom_downstream``): the default ``data/phantom`` has 6 subjects and no lesion in its test
subject's slices. Any dataset that :func:`scripts.data.build_datalist` reads works if its items carry a lesion
mask (``label`` in a datalist JSON, ``lesion`` in a CSV). Slices are split by subject (:func:`subject_split`,
stratified so that subjects with and without lesions are spread over the three splits).

Driver::

    python -m scripts.downstream                      # all inputs, both tasks, PET-MRI, seed 0
    python -m scripts.downstream --seeds 0 1 2 --methods average max --tasks segmentation

It trains the fusion networks that have no weights yet with the CPU default command
(``python -m monai.bundle run training --config_file configs/train.json --method M``, into
``runs/downstream/fusion/M``), fuses the dataset with ``configs/inference.json`` (``runs/downstream/fused/M``), runs
each task config for each input and seed, and writes ``runs/downstream/{segmentation,classification}.csv`` / ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.metrics import CumulativeIterationMetric
from monai.transforms import LoadImage, MapTransform

__all__ = [
    "DOWNSTREAM_PHANTOM", "INPUTS", "default_dataset", "subject_split", "build_datalists", "fused_file",
    "oversample_lesions", "LoadDownstreamd", "PooledDiceMetric", "SliceDiceMetric", "EmptySliceFPMetric",
    "BinaryClassificationMetric", "roc_auc", "positive_weight", "input_channels", "record", "result_row", "main",
]

# the embedded phantom, larger: 24 subjects (0-2 lesions each) x 16 axial slices of 128 x 128, another seed
# than the fusion networks' training data (data/phantom, seed 0)
DOWNSTREAM_PHANTOM = {"seed": 1, "n_subjects": 24, "slices_per_subject": 16, "size_2d": 128}
INPUTS = ("mri", "functional", "both", "fused")
SPLITS = ("training", "validation", "testing")
TASK_COLUMNS = {
    "segmentation": ["dice_pooled", "dice_lesion_slices", "fp_empty_slices", "best_val_dice"],
    "classification": ["accuracy", "balanced_accuracy", "auc", "best_val_auc"],
}
BASELINES = ("average", "max", "laplacian_pyramid", "guided_filter")
NETWORKS = ("dran", "mactfusion", "msgfusion", "bsafusion")


# ------------------------------------------------------------------------------------------------------------ data
def default_dataset(bundle_root=".", **overrides) -> str:
    """Generate (first call, ~1-3 min on 2 cores) or reuse the downstream phantom under ``<bundle_root>/data``."""
    from scripts.phantom import ensure_phantom_dataset

    params = {**DOWNSTREAM_PHANTOM, **overrides}
    return ensure_phantom_dataset(os.path.join(os.fspath(bundle_root), "data", "phantom_downstream"), **params)


def subject_split(has_lesion: Mapping[str, bool], fractions=(3, 1, 1)) -> dict[str, str]:
    """Subject -> split, stratified: subjects with a lesion and subjects without are each dealt in sorted order over
    a cycle of ``fractions`` (training, validation, testing; 3:1:1 = 60/20/20 %) that starts with one of each split
    (training, validation, testing, training, training), so 3 subjects already fill every split; the lesion-free
    subjects continue the cycle where the lesion-bearing ones stopped. No RNG."""
    counts = [int(n) for n in fractions]
    if len(counts) != 3 or min(counts) < 1:
        raise ValueError(f"fractions must be three positive integers (training, validation, testing), got {fractions}.")
    cycle = list(SPLITS) + [s for s, n in zip(SPLITS, counts) for _ in range(n - 1)]
    out: dict[str, str] = {}
    i = 0  # one running position: the lesion-free subjects go on where the lesion-bearing ones stopped
    for group in (True, False):
        for subject in sorted(s for s, v in has_lesion.items() if bool(v) == group):
            out[subject] = cycle[i % len(cycle)]
            i += 1
    return out


def fused_file(fused_dir, item: Mapping) -> str:
    """The file ``configs/inference.json`` wrote for ``item`` in ``fused_dir`` (grey ``<name>_fused.png`` or the
    NIfTI); its name is the pair name, qualified by the pair type when inference ran on several pair types."""
    from scripts.io import safe_name

    names = [str(item["name"]), f"{item.get('pair')}_{item['name']}"]
    for name in names:
        for ext in (".png", ".nii.gz"):
            p = Path(fused_dir) / f"{safe_name(name)}_fused{ext}"
            if p.is_file():
                return str(p)
    raise FileNotFoundError(
        f"{Path(fused_dir) / (safe_name(names[0]) + '_fused.png')}: no fused image for pair {item['name']!r}; run "
        f"configs/inference.json on the same dataset with --output_dir {fused_dir} first."
    )


def _mask_has_lesion(path) -> bool:
    from PIL import Image

    if str(path).lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
        with Image.open(path) as im:
            return bool(np.asarray(im).any())
    return bool(np.asarray(LoadImage(image_only=True)(str(path))).any())


def build_datalists(
    dataset_dir, pair: str = "PET-MRI", input: str = "mri", fused_dir=None, task: str = "segmentation",
    fractions=(3, 1, 1), max_per_split: int | None = None,
) -> dict[str, list[dict]]:
    """``{"training": [...], "validation": [...], "testing": [...]}`` of ``{"image": [paths], "label": ..., ...}``.

    ``label`` is the lesion-mask path for ``task="segmentation"`` and ``[0.0]`` / ``[1.0]`` (no lesion / lesion in
    the slice) for ``"classification"``. Every item also carries ``name``, ``subject`` and ``has_lesion``.
    ``max_per_split`` keeps the first N items of each split (quick runs).
    """
    from scripts.data import build_datalist

    if input not in INPUTS:
        raise ValueError(f"input must be one of {INPUTS}, got {input!r}.")
    if task not in TASK_COLUMNS:
        raise ValueError(f"task must be one of {tuple(TASK_COLUMNS)}, got {task!r}.")
    if input == "fused" and not fused_dir:
        raise ValueError("input 'fused' needs fused_dir (the output folder of configs/inference.json).")
    items = build_datalist(dataset_dir, "all", pairs=[pair] if pair else None, check=False)
    missing = [it["name"] for it in items if not it.get("lesion")]
    if missing:
        raise ValueError(
            f"{dataset_dir}: {len(missing)} pairs have no lesion mask (e.g. {missing[0]!r}); downstream tasks need "
            "'label' (datalist JSON) or 'lesion' (CSV) for every pair."
        )
    for it in items:
        it["has_lesion"] = _mask_has_lesion(it["lesion"])
        it["subject"] = str(it.get("subject") or str(it["name"]).split("_")[0])
    by_subject: dict[str, bool] = {}
    for it in items:
        by_subject[it["subject"]] = by_subject.get(it["subject"], False) or it["has_lesion"]
    split_of = subject_split(by_subject, fractions)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for it in sorted(items, key=lambda x: (x["subject"], str(x["name"]))):
        if input == "mri":
            image = [it["source_a"]]
        elif input == "functional":
            image = [it["source_b"]]
        elif input == "both":
            image = [it["source_a"], it["source_b"]]
        else:
            image = [fused_file(fused_dir, it)]
        label = it["lesion"] if task == "segmentation" else [float(it["has_lesion"])]
        out[split_of[it["subject"]]].append({
            "image": image, "label": label, "name": str(it["name"]), "subject": it["subject"],
            "has_lesion": float(it["has_lesion"]), "mask": it["lesion"],
        })
    if max_per_split:
        out = {k: v[: int(max_per_split)] for k, v in out.items()}
    for split, lst in out.items():
        if not lst:
            raise ValueError(f"{dataset_dir}: the {split} split is empty ({len(by_subject)} subjects); need >= 3.")
    return out


def oversample_lesions(datalist: list[dict]) -> list[dict]:
    """Repeat each slice with a lesion ``round(negatives / positives)`` times, so about half of the training slices
    an epoch sees have one (lesions are rare: ~18 % of the phantom's slices); the order is kept."""
    pos = sum(1 for it in datalist if it["has_lesion"])
    k = max(1, round((len(datalist) - pos) / pos)) if pos else 1
    return [it for it in datalist for _ in range(k if it["has_lesion"] else 1)]


def input_channels(input: str) -> int:
    return 2 if input == "both" else 1


def positive_weight(datalist: list[dict]) -> torch.Tensor:
    """``pos_weight`` for ``BCEWithLogitsLoss``: negatives / positives of the training list (1 if one class)."""
    pos = sum(1 for it in datalist if it["has_lesion"])
    neg = len(datalist) - pos
    return torch.tensor([neg / pos if pos and neg else 1.0])


class LoadDownstreamd(MapTransform):
    """Load the ``image`` file list as channels (colour by its BT.601 luminance, as the fusion workflows do), each
    min-max scaled to [0, 1]; a ``label`` path is loaded as a binary mask (1, *S), a number list as a tensor."""

    def __init__(self, keys: KeysCollection = "image", label_key: str = "label") -> None:
        super().__init__(keys)
        self.label_key = label_key
        self.loader = LoadImage(image_only=True, ensure_channel_first=True)

    def _grey(self, path) -> torch.Tensor:
        from scripts.transforms import rgb_to_ycbcr

        img = torch.as_tensor(self.loader(str(path))).float()
        if img.shape[0] in (2, 4):  # alpha
            img = img[:-1]
        if img.shape[0] == 3:
            img = rgb_to_ycbcr(img)[:1].float()
        lo, hi = img.min(), img.max()
        return (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            paths = d[key] if isinstance(d[key], list | tuple) else [d[key]]
            chans = [self._grey(p) for p in paths]
            shapes = {tuple(c.shape[1:]) for c in chans}
            if len(shapes) != 1:
                raise ValueError(f"{paths}: images of different sizes {sorted(shapes)}.")
            d[key] = torch.cat(chans, 0)
        lab = d.get(self.label_key)
        if isinstance(lab, str | os.PathLike):
            d[self.label_key] = (torch.as_tensor(self.loader(str(lab)))[:1] > 0).float()
        elif lab is not None:
            d[self.label_key] = torch.as_tensor(lab, dtype=torch.float32).reshape(-1)
        return d


# --------------------------------------------------------------------------------------------------------- metrics
def _binarise(y_pred: torch.Tensor, logits: bool) -> torch.Tensor:
    return (y_pred > 0).float() if logits else (y_pred > 0.5).float()


class _BinaryMetric(CumulativeIterationMetric):
    """Shared plumbing: ``y_pred`` logits (``logits=True``) or probabilities, (B, 1, *S), ``y`` binary masks;
    subclasses compute one row per image from the binarised prediction ``p`` and mask ``t``."""

    def __init__(self, logits: bool = True) -> None:
        super().__init__()
        self.logits = logits

    def _compute_tensor(self, y_pred, y=None, **kwargs):
        p, t = _binarise(y_pred.float(), self.logits), (y.float() > 0.5).float()
        return self._rows(p, t, tuple(range(1, p.ndim)))

    def _rows(self, p, t, dims):
        raise NotImplementedError

    def _nanmean(self):
        """Mean of the buffer's non-nan values (images the metric does not apply to are nan); nan if none."""
        v = self.get_buffer().flatten()
        v = v[~torch.isnan(v)]
        return torch.tensor(float(v.mean()) if v.numel() else float("nan"))


class PooledDiceMetric(_BinaryMetric):
    """Dice of all pixels of all images together: 2 TP / (2 TP + FP + FN); empty slices count their false positives."""

    def _rows(self, p, t, dims):
        tp, fp, fn = (p * t).sum(dims), (p * (1 - t)).sum(dims), ((1 - p) * t).sum(dims)
        return torch.stack([tp, fp, fn], 1)

    def aggregate(self):
        tp, fp, fn = (float(v) for v in self.get_buffer().sum(0))
        return torch.tensor(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 1.0)


class SliceDiceMetric(_BinaryMetric):
    """Mean per-slice Dice over the slices whose ground truth has a lesion (empty slices are left out)."""

    def _rows(self, p, t, dims):
        dice = 2 * (p * t).sum(dims) / (p.sum(dims) + t.sum(dims)).clamp(min=1e-8)
        return torch.where(t.sum(dims) > 0, dice, torch.full_like(dice, float("nan")))[:, None]

    def aggregate(self):
        return self._nanmean()


class EmptySliceFPMetric(_BinaryMetric):
    """Fraction of lesion-free slices on which the segmenter predicts any lesion pixel."""

    def _rows(self, p, t, dims):
        fp = (p.sum(dims) > 0).float()
        return torch.where(t.sum(dims) == 0, fp, torch.full_like(fp, float("nan")))[:, None]

    def aggregate(self):
        return self._nanmean()


def roc_auc(scores, labels) -> float:
    """Mann-Whitney ROC AUC (ties count 1/2); ``nan`` when one class is missing."""
    s, y = np.asarray(scores, float).ravel(), np.asarray(labels, float).ravel() > 0.5
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


class BinaryClassificationMetric(CumulativeIterationMetric):
    """``"auc"``, ``"accuracy"`` (threshold 0.5 on the sigmoid) or ``"balanced_accuracy"`` of (B, 1) logits."""

    def __init__(self, kind: str = "auc") -> None:
        super().__init__()
        if kind not in ("auc", "accuracy", "balanced_accuracy"):
            raise ValueError(f"unknown kind {kind!r}")
        self.kind = kind

    def _compute_tensor(self, y_pred, y=None, **kwargs):
        return torch.stack([y_pred.float().reshape(-1), y.float().reshape(-1)], 1)

    def aggregate(self):
        buf = self.get_buffer()
        s, y = buf[:, 0].numpy(), buf[:, 1].numpy() > 0.5
        if self.kind == "auc":
            return torch.tensor(roc_auc(s, y))
        pred = s > 0
        if self.kind == "accuracy":
            return torch.tensor(float((pred == y).mean()))
        sens = float(pred[y].mean()) if y.any() else float("nan")
        spec = float((~pred[~y]).mean()) if (~y).any() else float("nan")
        return torch.tensor(float(np.nanmean([sens, spec])))


# ----------------------------------------------------------------------------------------------------------- table
def _order(name: str) -> tuple:
    head = ["mri", "functional", "both"]
    if name in head:
        return (0, head.index(name), name)
    base = name.removeprefix("fused:")
    known = list(BASELINES) + list(NETWORKS)
    return (1, known.index(base) if base in known else len(known), name)


def _fmt(values: list[float]) -> str:
    v = [x for x in values if x == x]
    if not v:
        return "nan"
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}"


def record(results_dir, task: str, row: Mapping, metrics: Mapping | None = None) -> str:
    """Put ``row`` (+ ``metrics``, an Ignite ``state.metrics``) into ``<results_dir>/<task>.csv``, replacing the row of
    the same input, pair and seed; rewrite ``<task>.md`` (mean ± population std over seeds per input). Returns the
    CSV path. Runs in several processes may share one folder (a lock file serialises them; files are replaced by
    rename)."""
    from scripts.io import ensure_writable_dir, file_lock

    if task not in TASK_COLUMNS:
        raise ValueError(f"task must be one of {tuple(TASK_COLUMNS)}, got {task!r}.")
    results_dir = Path(ensure_writable_dir(results_dir))
    row = {**dict(row), **{k: float(v) for k, v in (metrics or {}).items() if k in TASK_COLUMNS[task]}}
    for k in TASK_COLUMNS[task]:
        row.setdefault(k, float("nan"))
    path = results_dir / f"{task}.csv"
    with file_lock(results_dir / f".{task}.lock"):
        return _record(results_dir, path, task, row)


def _record(results_dir: Path, path: Path, task: str, row: dict) -> str:
    rows = []
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    key = lambda r: (str(r["input"]), str(r["pair"]), str(r["seed"]))  # noqa: E731
    rows = [r for r in rows if key(r) != key({k: str(v) for k, v in row.items()})] + [row]
    rows.sort(key=lambda r: (_order(str(r["input"])), str(r["pair"]), int(r["seed"])))
    fields = list(dict.fromkeys([k for r in rows for k in r]))
    fd, tmp = tempfile.mkstemp(dir=results_dir, prefix=f".{task}.", suffix=".csv")
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    _write_markdown(results_dir / f"{task}.md", task, rows)
    return str(path)


def _write_markdown(path: Path, task: str, rows: list[dict]) -> None:
    cols = TASK_COLUMNS[task]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((str(r["input"]), str(r["pair"])), []).append(r)
    head = ["input", "pair", "seeds", "n train / val / test", "test slices with lesion"] + cols
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (name, pair), rs in groups.items():
        seeds = ",".join(str(r["seed"]) for r in rs)
        r0 = rs[0]
        vals = [_fmt([float(r[c]) for r in rs]) for c in cols]
        lines.append("| " + " | ".join([name, pair, seeds, f"{r0['n_train']} / {r0['n_val']} / {r0['n_test']}",
                                        str(r0["n_test_lesion"])] + vals) + " |")
    settings = sorted({str(r.get("settings", "")) for r in rows} - {""})
    note = ["", "mean ± population std over seeds (one value: one seed); " + ", ".join(settings)] if settings else []
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines + note) + "\n")
    os.replace(tmp, path)


def result_row(input_name: str, pair: str, seed, datalists: Mapping, epochs, settings: str = "") -> dict:
    return {
        "input": input_name, "pair": pair, "seed": int(seed), "epochs": int(epochs),
        "n_train": len(datalists["training"]), "n_val": len(datalists["validation"]),
        "n_test": len(datalists["testing"]),
        "n_test_lesion": int(sum(it["has_lesion"] for it in datalists["testing"])), "settings": settings,
    }


# ---------------------------------------------------------------------------------------------------------- driver
def _run(cmd: list[str], cwd: Path, log: Path) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        res = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"command failed ({res.returncode}), log {log}:\n{tail}")
    return time.time() - t0


def _bundle(config: str, *args: str, run_id: str | None = None) -> list[str]:
    head = [sys.executable, "-m", "monai.bundle", "run"] + ([run_id] if run_id else [])
    return head + ["--config_file", config, "--meta_file", "configs/metadata.json",
                   "--logging_file", "configs/logging.conf", *args]


def _fused_complete(fused_dir: Path, dataset_dir, pair: str) -> bool:
    from scripts.data import build_datalist

    try:
        for it in build_datalist(dataset_dir, "all", pairs=[pair], check=False):
            fused_file(fused_dir, it)
    except (FileNotFoundError, OSError):
        return False
    return True


def main(argv=None) -> int:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset_dir", default=None, help="default: the downstream phantom (generated on first use)")
    ap.add_argument("--pair", default="PET-MRI", help="pair type: PET-MRI (default), SPECT-MRI, CT-MRI")
    ap.add_argument("--methods", nargs="*", default=list(BASELINES + NETWORKS), help="fusion methods (fused inputs)")
    ap.add_argument("--inputs", nargs="*", default=["mri", "functional", "both"], help="non-fused inputs")
    ap.add_argument("--tasks", nargs="*", default=["segmentation", "classification"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--work_dir", default=str(root / "runs" / "downstream"))
    ap.add_argument("--results_dir", default=None, help="default: <work_dir>")
    ap.add_argument("--ckpt_dir", default=None,
                    help="fusion weights <ckpt_dir>/<method>/model.pt (default <work_dir>/fusion; missing ones are "
                         "trained with the CPU default command)")
    ap.epilog = "Any other --key value pair is passed on to the task configs, e.g. --epochs 5 --batch_size 8."
    args, overrides = ap.parse_known_args(argv)
    if any(not (o.startswith("--") and len(o) > 2) for o in overrides[::2]) or len(overrides) % 2:
        ap.error(f"config overrides must be '--key value' pairs, got {overrides}")
    work = Path(args.work_dir).resolve()
    results = Path(args.results_dir).resolve() if args.results_dir else work
    dataset = args.dataset_dir or default_dataset(root)
    ckpt_dir = Path(args.ckpt_dir).resolve() if args.ckpt_dir else work / "fusion"
    logs = work / "logs"
    timings: dict[str, float] = {}

    fused_dirs = {}
    for m in args.methods:
        from scripts.methods import load_method_config

        cfg = load_method_config(root, m)
        extra = []
        if cfg["trainable"]:
            ckpt = ckpt_dir / m / "model.pt"
            if not ckpt.is_file():
                timings[f"train {m}"] = _run(
                    _bundle("configs/train.json", "--method", m, "--output_dir", str(ckpt.parent), run_id="training"),
                    root, logs / f"train_{m}.log")
            extra = ["--ckpt_path", str(ckpt)]
        fused = work / "fused" / args.pair / m
        if not _fused_complete(fused, dataset, args.pair):
            timings[f"fuse {m}"] = _run(
                _bundle("configs/inference.json", "--method", m, "--dataset_dir", str(dataset),
                        "--pairs", json.dumps([args.pair]), "--pair_source", "aligned", "--output_dir", str(fused),
                        *extra),
                root, logs / f"fuse_{m}.log")
        fused_dirs[m] = fused

    runs = [(i, None) for i in args.inputs] + [("fused", m) for m in args.methods]
    for task in args.tasks:
        for seed in args.seeds:
            for inp, m in runs:
                name = f"fused:{m}" if m else inp
                cmd = _bundle(f"configs/downstream_{task}.json", "--dataset_dir", str(dataset), "--pair", args.pair,
                              "--input", inp, "--input_name", name, "--seed", str(seed),
                              "--results_dir", str(results),
                              "--output_dir", str(work / task / args.pair / name.replace(":", "_") / f"seed{seed}"),
                              *(["--fused_dir", str(fused_dirs[m])] if m else []), *overrides)
                timings[f"{task} {name} seed {seed}"] = _run(
                    cmd, root, logs / f"{task}_{name.replace(':', '_')}_seed{seed}.log")
    for task in args.tasks:
        md = results / f"{task}.md"
        if md.is_file():
            print(f"\n{task} ({md}):\n" + md.read_text())
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
