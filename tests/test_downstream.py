"""Downstream tasks (scripts/downstream.py, configs/downstream_*.json) on a tiny lesion dataset: the split, the
metrics, both task configs for every kind of input (fused ones from configs/inference.json), the results table, and
the driver end to end."""

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from conftest import BUNDLE_ROOT
from scripts import downstream

CONFIGS = BUNDLE_ROOT / "configs"


def _lesion_dataset(root: Path, n_subjects=5, n_slices=4, size=32, seed=0) -> Path:
    """Phantom-like layout: datalist_2d.json with subject, pair, MRI / colour PET / lesion mask PNGs. Subjects
    s02 (and every third) have no lesion; the others have a disc on even slices (dark on MRI, hot on PET)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    items = []
    for s in range(n_subjects):
        for z in range(n_slices):
            name = f"s{s:02d}_z{z:03d}"
            base = 60 + 40 * np.sin(xx / 5.0 + s) * np.cos(yy / 4.0 - z) + rng.normal(0, 5, (size, size))
            mask = np.zeros((size, size), bool)
            if s % 3 != 2 and z % 2 == 0:
                cy, cx = rng.integers(8, size - 8, 2)
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
            mri = np.clip(base - 50 * mask, 0, 255).astype(np.uint8)
            pet = np.clip(base * 0.5 + 150 * mask + 20, 0, 255).astype(np.uint8)
            pet = np.stack([pet, (pet * 0.6).astype(np.uint8), np.full_like(pet, 10)], -1)
            for sub, arr in (("MRI", mri), ("PET", pet), ("lesion_masks", mask.astype(np.uint8) * 255)):
                folder = root / "2d" / ("PET-MRI/" + sub if sub != "lesion_masks" else sub)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(folder / f"{name}.png")
            items.append({"name": name, "subject": f"s{s:02d}", "pair": "PET-MRI", "modality_a": "MRI",
                          "modality_b": "PET", "source_a": f"2d/PET-MRI/MRI/{name}.png",
                          "source_b": f"2d/PET-MRI/PET/{name}.png", "label": f"2d/lesion_masks/{name}.png"})
    (root / "datalist_2d.json").write_text(json.dumps({"training": items}))
    return root


def _workflow(workflow_type, config, **override):
    return ConfigWorkflow(
        workflow_type=workflow_type, config_file=str(CONFIGS / config), meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"), bundle_root=str(BUNDLE_ROOT), **override,
    )


def _run(workflow_type, config, **override):
    wf = _workflow(workflow_type, config, **override)
    wf.initialize()
    wf.run()
    wf.finalize()


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def lesions(tmp_path_factory):
    return _lesion_dataset(tmp_path_factory.mktemp("lesions"))


@pytest.fixture(scope="module")
def fused_average(lesions, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused_average")
    _run("infer", "inference.json", dataset_dir=str(lesions), output_dir=str(out), method="average",
         pairs=["PET-MRI"])
    return out


def test_subject_split_is_stratified_deterministic_and_fills_every_split():
    subjects = {f"s{i:02d}": i % 3 != 0 for i in range(24)}
    split = downstream.subject_split(subjects)
    assert split == downstream.subject_split(dict(reversed(list(subjects.items()))))  # order-independent
    counts = {s: sum(v == s for v in split.values()) for s in ("training", "validation", "testing")}
    assert counts == {"training": 14, "validation": 5, "testing": 5}
    for group in (True, False):  # lesion-bearing and lesion-free subjects are both spread over the splits
        assert {split[s] for s, v in subjects.items() if v == group} == {"training", "validation", "testing"}
    assert set(downstream.subject_split({"a": True, "b": True, "c": False}).values()) == {
        "training", "validation", "testing"}


def test_datalists_split_by_subject_and_name_missing_fused_files(lesions, tmp_path):
    lists = downstream.build_datalists(lesions, "PET-MRI", "both", task="segmentation")
    subjects = {k: {it["subject"] for it in v} for k, v in lists.items()}
    assert not (subjects["training"] & subjects["validation"] or subjects["training"] & subjects["testing"]
                or subjects["validation"] & subjects["testing"])
    assert sum(len(v) for v in lists.values()) == 20
    assert all(len(it["image"]) == 2 and it["label"].endswith(".png") for it in lists["testing"])
    assert all(any(it["has_lesion"] for it in v) for v in lists.values())
    cls = downstream.build_datalists(lesions, "PET-MRI", "mri", task="classification")
    assert {tuple(it["label"]) for v in cls.values() for it in v} == {(0.0,), (1.0,)}
    with pytest.raises(FileNotFoundError, match="s00_z000_fused.png"):
        downstream.build_datalists(lesions, "PET-MRI", "fused", fused_dir=tmp_path)
    with pytest.raises(ValueError, match="input must be one of"):
        downstream.build_datalists(lesions, "PET-MRI", "rgb")


def test_loader_gives_scaled_luminance_channels_and_binary_masks(lesions):
    item = downstream.build_datalists(lesions, "PET-MRI", "both")["training"][0]
    d = downstream.LoadDownstreamd("image")(item)
    assert d["image"].shape == (2, 32, 32) and d["label"].shape == (1, 32, 32)
    assert float(d["image"].min()) == 0.0 and float(d["image"].max()) == 1.0
    rgb = np.asarray(Image.open(item["image"][1])).astype(float)
    y = rgb @ np.array([0.299, 0.587, 0.114])
    y = (y - y.min()) / (y.max() - y.min())
    assert np.allclose(d["image"][1].numpy(), y.T, atol=1e-5)  # MONAI's PIL reader is (column, row)
    assert set(np.unique(d["label"].numpy())) <= {0.0, 1.0}


def test_metrics_on_known_cases():
    t = torch.zeros(3, 1, 4, 4)
    t[0, 0, :2, :2] = 1  # 4 lesion pixels; slice 1 and 2 empty
    p = torch.full((3, 1, 4, 4), -5.0)  # logits
    p[0, 0, :2, :1] = 5  # 2 of 4 found
    p[1, 0, 3, 3] = 5  # one false positive on an empty slice
    pooled, per_slice, fp = downstream.PooledDiceMetric(), downstream.SliceDiceMetric(), downstream.EmptySliceFPMetric()
    for m in (pooled, per_slice, fp):
        m(p, t)
    assert float(pooled.aggregate()) == pytest.approx(2 * 2 / (2 * 2 + 1 + 2), rel=1e-6)  # float32 results
    assert float(per_slice.aggregate()) == pytest.approx(2 * 2 / (2 + 4), rel=1e-6)
    assert float(fp.aggregate()) == 0.5
    assert downstream.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert math.isnan(downstream.roc_auc([0.1, 0.2], [0, 0]))
    acc, bal = downstream.BinaryClassificationMetric("accuracy"), downstream.BinaryClassificationMetric(
        "balanced_accuracy")
    logits, labels = torch.tensor([[2.0], [-1.0], [-3.0], [1.0]]), torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    for m in (acc, bal):
        m(logits, labels)
    assert float(acc.aggregate()) == 0.5 and float(bal.aggregate()) == 0.5


def test_segmentation_config_writes_one_row_per_input(lesions, fused_average, tmp_path):
    results = tmp_path / "results"
    runs = [("mri", None), ("functional", None), ("both", None), ("fused", "fused:average")]
    for inp, name in runs:
        _run(None, "downstream_segmentation.json", dataset_dir=str(lesions), input=inp, input_name=name or inp,
             fused_dir=str(fused_average) if name else None, epochs=1, batch_size=4, results_dir=str(results),
             output_dir=str(tmp_path / inp))
        assert (tmp_path / inp / "model.pt").is_file()
    rows = _rows(results / "segmentation.csv")
    assert [r["input"] for r in rows] == ["mri", "functional", "both", "fused:average"]
    for r in rows:
        assert r["pair"] == "PET-MRI" and r["seed"] == "0" and r["epochs"] == "1"
        assert (int(r["n_train"]), int(r["n_val"]), int(r["n_test"])) == (12, 4, 4) and int(r["n_test_lesion"]) == 2
        for k in ("dice_pooled", "dice_lesion_slices", "fp_empty_slices", "best_val_dice"):
            assert 0.0 <= float(r[k]) <= 1.0, (k, r[k])
    md = (results / "segmentation.md").read_text().splitlines()
    assert md[0].startswith("| input | pair | seeds |") and len([ln for ln in md if ln.startswith("| fused:")]) == 1
    assert len([ln for ln in md if ln.startswith("| ")]) == 1 + 4
    # a rerun of one input replaces its row; another seed adds one, and the table shows mean ± std over seeds
    _run(None, "downstream_segmentation.json", dataset_dir=str(lesions), input="mri", epochs=1, batch_size=4,
         results_dir=str(results), output_dir=str(tmp_path / "mri_again"))
    _run(None, "downstream_segmentation.json", dataset_dir=str(lesions), input="mri", epochs=1, batch_size=4,
         seed=1, results_dir=str(results), output_dir=str(tmp_path / "mri_seed1"))
    rows = _rows(results / "segmentation.csv")
    assert [(r["input"], r["seed"]) for r in rows][:2] == [("mri", "0"), ("mri", "1")] and len(rows) == 5
    assert "| mri | PET-MRI | 0,1 |" in (results / "segmentation.md").read_text()


def test_classification_config_reports_accuracy_and_auc(lesions, fused_average, tmp_path):
    results = tmp_path / "results"
    for inp, name in (("functional", None), ("fused", "fused:average")):
        _run(None, "downstream_classification.json", dataset_dir=str(lesions), input=inp, input_name=name or inp,
             fused_dir=str(fused_average) if name else None, epochs=1, batch_size=4, results_dir=str(results),
             output_dir=str(tmp_path / inp))
    rows = _rows(results / "classification.csv")
    assert [r["input"] for r in rows] == ["functional", "fused:average"]
    for r in rows:
        for k in ("accuracy", "balanced_accuracy", "auc", "best_val_auc"):
            assert 0.0 <= float(r[k]) <= 1.0, (k, r[k])
        assert "DenseNet" in r["settings"]
    assert len([ln for ln in (results / "classification.md").read_text().splitlines() if ln.startswith("| ")]) == 3


def _run_in_process(cmd, cwd, log):
    """Stand-in for the driver's subprocess runner: the same ``python -m monai.bundle run ...`` command, run by
    ``monai.bundle.run`` in this process (values parsed as the command line's fire parser does), so the driver's
    orchestration is tested without paying three interpreter start-ups."""
    import ast

    from monai.bundle import run

    args = cmd[cmd.index("run") + 1:]
    run_id = None
    if not args[0].startswith("--"):
        run_id, args = args[0], args[1:]
    kwargs = {}
    for key, value in zip(args[::2], args[1::2]):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        kwargs[key[2:]] = value
    run(run_id=run_id, **kwargs)
    return 0.0


def test_driver_fuses_then_runs_each_input(lesions, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(BUNDLE_ROOT)
    commands = []
    monkeypatch.setattr(downstream, "_run",
                        lambda cmd, cwd, log: commands.append(cmd) or _run_in_process(cmd, cwd, log))
    argv = ["--dataset_dir", str(lesions), "--methods", "max", "--inputs", "mri", "--tasks", "segmentation",
            "--work_dir", str(tmp_path), "--epochs", "1", "--batch_size", "4"]
    assert downstream.main(argv) == 0
    assert [c[c.index("--config_file") + 1] for c in commands] == [
        "configs/inference.json", "configs/downstream_segmentation.json", "configs/downstream_segmentation.json"]
    assert len(list((tmp_path / "fused" / "PET-MRI" / "max").glob("*_fused.png"))) == 20
    assert [r["input"] for r in _rows(tmp_path / "segmentation.csv")] == ["mri", "fused:max"]
    assert all(r["epochs"] == "1" for r in _rows(tmp_path / "segmentation.csv"))
    assert "| fused:max | PET-MRI | 0 |" in capsys.readouterr().out
    commands.clear()
    assert downstream.main(argv) == 0  # fused images already there: not fused again
    assert "configs/inference.json" not in [c[c.index("--config_file") + 1] for c in commands]
    with pytest.raises(SystemExit):
        downstream.main(argv + ["--epochs"])  # an override without its value
