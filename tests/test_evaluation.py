"""configs/evaluate.json + scripts/evaluation.py: metric tables, summaries, figures, --fused_dir, registration."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from conftest import BUNDLE_ROOT, SHARED_DIR
from test_workflows import _chain, _tiny_dataset

CONFIGS = BUNDLE_ROOT / "configs"
TINY_METRICS = ["EN", "SD", "SF", "AG", "MI", "FMI", "SCD", "Qabf", "SSIM", "Q_CV", "Q_Y", "Q_S", "Q_W", "Q_E",
                "PSNR", "CC"]  # 32x32 images: VIF (>= 41 px) and MS_SSIM (>= 176 px) do not apply
NAMES = {f"{p}_{i:02d}" for p in ("CT-MRI", "PET-MRI") for i in range(6)}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _workflow(config_file=CONFIGS / "evaluate.json", run_id="evaluating", **override):
    return ConfigWorkflow(workflow_type="infer", config_file=str(config_file), run_id=run_id,
                          meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
                          bundle_root=str(BUNDLE_ROOT), **override)


def _evaluate(**override):
    wf = _workflow(**override)
    wf.initialize()
    assert wf.check_properties() in (None, [])
    wf.run()
    wf.finalize()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def two_methods(tiny, tmp_path_factory):
    """`average` by the documented command line, then `max` into the same folder."""
    out = tmp_path_factory.mktemp("eval")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", "configs/evaluate.json",
           "--dataset_dir", str(tiny), "--method", "average", "--output_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT)}
    res = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    _evaluate(dataset_dir=str(tiny), method="max", output_dir=str(out))
    return out


@pytest.fixture(scope="module")
def fused_by_inference(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("inference")
    wf = _workflow(CONFIGS / "inference.json", run_id="run", dataset_dir=str(tiny), output_dir=str(out),
                   method="average")
    wf.initialize()
    wf.run()
    wf.finalize()
    return out


def test_metrics_csv_one_row_per_image_with_every_metric(two_methods):
    rows = _rows(two_methods / "metrics.csv")
    cols = list(rows[0])
    assert cols[:5] == ["name", "pair", "modality_a", "modality_b", "method"]
    assert cols[5:5 + len(TINY_METRICS)] == TINY_METRICS
    assert not any(c.startswith("reg_") for c in cols)  # aligned pairs: no registration scores
    for method in ("average", "max"):
        mine = [r for r in rows if r["method"] == method]
        assert {r["name"] for r in mine} == NAMES and len(mine) == 12
        for r in mine:
            assert r["pair"] in ("CT-MRI", "PET-MRI") and r["modality_a"] == "MRI" and not r["error"]
            assert all(math.isfinite(float(r[m])) for m in TINY_METRICS)
            assert Path(r["fused_file"]).is_file()
    assert 0 < float(rows[0]["Qabf"]) < 1 and 0 < float(rows[0]["FMI"]) < 1


def test_summaries_mean_std_per_pair_and_method_with_arrows(two_methods):
    rows = _rows(two_methods / "metrics.csv")
    summary = _rows(two_methods / "metrics_summary.csv")
    assert list(summary[0]) == ["pair", "method", "metric", "direction", "mean", "std", "n", "n_nan"]
    got = {(s["pair"], s["method"], s["metric"]): s for s in summary}
    assert len(got) == 3 * 2 * len(TINY_METRICS)  # CT-MRI, PET-MRI, all x 2 methods x metrics
    s = got[("CT-MRI", "max", "SD")]
    vals = [float(r["SD"]) for r in rows if r["pair"] == "CT-MRI" and r["method"] == "max"]
    assert float(s["mean"]) == pytest.approx(np.mean(vals)) and float(s["std"]) == pytest.approx(np.std(vals))
    assert (s["n"], s["n_nan"], s["direction"]) == ("6", "0", "↑")
    assert got[("all", "average", "Q_CV")]["direction"] == "↓" and got[("all", "average", "EN")]["n"] == "12"
    md = (two_methods / "metrics_summary.md").read_text(encoding="utf-8")
    header = md.splitlines()[0]
    assert "EN ↑" in header and "Q_CV ↓" in header and "SSIM ↑" in header
    for pair in ("CT-MRI", "PET-MRI", "all"):
        for method in ("average", "max"):
            assert f"| {pair} | {method} |" in md
    assert " ± " in md


def test_figures_are_pngs(two_methods):
    figs = two_methods / "figures"
    expected = ["fusion_CT-MRI.png", "fusion_PET-MRI.png"] + [f"box_{m}.png" for m in TINY_METRICS]
    for name in expected:
        path = figs / name
        assert path.stat().st_size > 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            im.verify()
    with Image.open(figs / "fusion_PET-MRI.png") as im:  # MRI, PET, average, max panels side by side
        assert im.width > 4 * 192 and im.mode == "RGB"


def test_fused_dir_scores_inference_outputs_like_direct_evaluation(two_methods, fused_by_inference, tiny, tmp_path):
    _evaluate(dataset_dir=str(tiny), method="average", fused_dir=str(fused_by_inference), output_dir=str(tmp_path),
              figures=False)
    direct = {r["name"]: r for r in _rows(two_methods / "metrics.csv") if r["method"] == "average"}
    scored = _rows(tmp_path / "metrics.csv")
    assert len(scored) == 12
    for r in scored:
        assert Path(r["fused_file"]).parent == fused_by_inference
        assert {m: r[m] for m in TINY_METRICS} == {m: direct[r["name"]][m] for m in TINY_METRICS}


def test_fused_dir_missing_and_wrong_size_files_are_named(fused_by_inference, tiny, tmp_path):
    fused = Path(shutil.copytree(fused_by_inference, tmp_path / "fused"))
    (fused / "CT-MRI_03_fused.png").unlink()
    args = dict(dataset_dir=str(tiny), method="average", fused_dir=str(fused), figures=False, pairs=["CT-MRI"])
    with pytest.raises(Exception) as err:
        _evaluate(output_dir=str(tmp_path / "o1"), **args)
    assert f"{fused / 'CT-MRI_03_fused.png'}: fused image of pair 'CT-MRI_03' not found" in _chain(err.value)

    Image.fromarray(np.zeros((20, 32), np.uint8)).save(fused / "CT-MRI_03_fused.png")
    with pytest.raises(Exception) as err:
        _evaluate(output_dir=str(tmp_path / "o2"), **args)
    assert f"{fused / 'CT-MRI_03_fused.png'}: the fused image is (32, 20) but its sources are (32, 32)" in _chain(
        err.value)


def test_fused_dir_accepts_source_stem_names(tiny, tmp_path):
    fused = tmp_path / "fused"
    fused.mkdir()
    for i in range(6):  # another method's result folder: <stem of source_a>.png, one pair type at a time
        Image.open(tiny / "MRI_CT" / "CT" / f"{i:02d}.png").save(fused / f"{i:02d}.png")
    _evaluate(dataset_dir=str(tiny), method="ct_copy", fused_dir=str(fused), output_dir=str(tmp_path / "o"),
              pairs=["CT-MRI"], metrics=["SSIM", "PSNR"], figures=False)
    rows = _rows(tmp_path / "o" / "metrics.csv")
    assert {r["fused_file"] for r in rows} == {str(fused / f"{i:02d}.png") for i in range(6)}
    assert all(r["method"] == "ct_copy" for r in rows)
    with pytest.raises(Exception) as err:  # both pair types share the stems: ambiguous
        _evaluate(dataset_dir=str(tiny), method="x", fused_dir=str(fused), output_dir=str(tmp_path / "o2"))
    assert "ambiguous" in _chain(err.value)


def test_registration_scores_for_moving_images(tiny, tmp_path):
    with open(tmp_path / "pairs.csv", "w", newline="") as f:  # AANLIB-style manifest: mri, moving, aligned
        w = csv.writer(f)
        w.writerow(["pair", "id", "mri", "moving", "aligned"])
        for i in range(3):
            ct = np.asarray(Image.open(tiny / "MRI_CT" / "CT" / f"{i:02d}.png"))
            Image.fromarray(np.roll(ct, 2, axis=1)).save(tmp_path / f"moving{i}.png")
            w.writerow(["CT-MRI", i, tiny / "MRI_CT" / "MRI" / f"{i:02d}.png", tmp_path / f"moving{i}.png",
                        tiny / "MRI_CT" / "CT" / f"{i:02d}.png"])
    _evaluate(dataset_dir=str(tmp_path / "pairs.csv"), pair_source="moving", method="average",
              output_dir=str(tmp_path / "o"), metrics=["SSIM", "MI"])
    rows = _rows(tmp_path / "o" / "metrics.csv")
    assert len(rows) == 3 and list(rows[0])[5:10] == ["MI", "SSIM", "reg_MAE", "reg_NCC", "reg_SSIM"]
    for r in rows:
        assert r["source_b"].endswith(".png") and "moving" in r["source_b"] and r["aligned_b"].endswith(".png")
        assert float(r["reg_MAE"]) > 0 and 0 < float(r["reg_NCC"]) < 1 and 0 < float(r["reg_SSIM"]) < 1
    md = (tmp_path / "o" / "metrics_summary.md").read_text(encoding="utf-8")
    assert "reg_MAE ↓" in md and "reg_NCC ↑" in md
    assert (tmp_path / "o" / "figures" / "box_reg_MAE.png").stat().st_size > 0

    _evaluate(dataset_dir=str(tmp_path / "pairs.csv"), method="average", output_dir=str(tmp_path / "o2"),
              metrics=["SSIM"], figures=False)  # aligned pairs: nothing to register
    assert "reg_MAE" not in _rows(tmp_path / "o2" / "metrics.csv")[0]


def test_undefined_metrics_are_reported_per_row_and_excluded_from_summaries(tmp_path):
    from scripts.evaluation import FusionMetricsWriter, summarise

    yy, xx = np.mgrid[:48, :48]
    b = torch.tensor((np.sin(xx / 3.0) * 100 + 120).round(), dtype=torch.float32)[None]
    items = [{"name": f"p{i}", "pair": "CT-MRI", "score_a": b if i else torch.full_like(b, 7.0), "score_b": b,
              "pred": b / 255} for i in range(3)]
    w = FusionMetricsWriter(tmp_path, "average", metrics=["VIF", "SD"])
    rows = [w.score(d) for d in items]
    assert rows[0]["VIF"] == "nan" and "VIF" in rows[0]["error"] and "constant" in rows[0]["error"]
    assert math.isfinite(float(rows[0]["SD"])) and not rows[1]["error"]
    s = {x["metric"]: x for x in summarise(rows, ["VIF", "SD"])}
    assert (s["VIF"]["n"], s["VIF"]["n_nan"]) == ("2", "1") and math.isfinite(float(s["VIF"]["mean"]))
    assert (s["SD"]["n"], s["SD"]["n_nan"]) == ("3", "0")
    w.rows = rows
    w.write()
    assert "(1 nan)" in (tmp_path / "metrics_summary.md").read_text(encoding="utf-8")


def test_reference_values_on_real_pairs(aanlib_dir, tmp_path):
    """The published evaluator's numbers for F = round((aligned + mri) / 2) on six AANLIB pairs, scored as a
    --fused_dir (files stored as they are: no per-image stretch, as the evaluator reads saved results)."""
    ref = json.loads((SHARED_DIR / "data" / "metric_reference_values.json").read_text())
    fused = tmp_path / "fused"
    fused.mkdir()
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair", "id", "mri", "moving", "aligned"])
        for p in ref["pairs"]:
            w.writerow([p["pair"], p["id"], aanlib_dir / p["mri"], "", aanlib_dir / p["aligned"]])
            mri, aligned = (np.asarray(Image.open(aanlib_dir / p[k])).astype(np.float32) for k in ("mri", "aligned"))
            F = np.round((aligned + mri) / 2).astype(np.uint8)
            assert int(F.sum()) == p["fused"]["sum"]
            Image.fromarray(F).save(fused / f"{p['pair']}_{p['id']}_fused.png")
    names = ref["metric_order"]
    _evaluate(dataset_dir=str(tmp_path / "pairs.csv"), method="reference_average", fused_dir=str(fused),
              fused_minmax=False, metrics=names, output_dir=str(tmp_path / "o"), figures=False)
    rows = {r["name"]: r for r in _rows(tmp_path / "o" / "metrics.csv")}
    assert len(rows) == 6
    for p in ref["pairs"]:
        row = rows[f"{p['pair']}_{p['id']}"]
        for m in names:
            assert float(row[m]) == pytest.approx(p["metrics"][m], rel=1e-3), (p["pair"], p["id"], m)


def test_grey255_keeps_8bit_sources_and_stretches_float_volumes():
    """Metric constants assume 0..255: 8-bit data is scored as stored, 0..1 floats / HU / 12-bit are stretched,
    so a float NIfTI volume scores like its 8-bit version (3D VIF was ~17 when 0..1 data was rounded as is)."""
    from scripts.evaluation import grey255

    torch.manual_seed(0)
    png = torch.randint(10, 200, (1, 8, 8)).float()
    assert torch.equal(grey255(png), png)  # kept: the published evaluator's convention
    vol = torch.rand(1, 6, 7, 8)
    for scaled in (vol, vol * 4000 - 1000, vol * 4095):  # float 0..1, CT-like HU, 12-bit
        out = grey255(scaled)
        assert out.min() == 0 and out.max() == 255
        assert torch.allclose(out, torch.round((vol - vol.min()) / (vol.max() - vol.min()) * 255), atol=1)
