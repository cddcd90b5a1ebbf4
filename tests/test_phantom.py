"""Tests of the embedded MNI152-derived phantom dataset (scripts/phantom.py).

Small settings keep the file fast: one 3-subject dataset at the default 2 mm grid is shared by the layout /
value tests, and the determinism / cache / CLI / race tests use tiny 4 mm datasets.
"""

import hashlib
import json
import os
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from scripts import phantom
from scripts.phantom import PAIR_TYPES, default_dataset_dir, ensure_phantom_dataset

MAIN = dict(seed=0, n_subjects=3, size_2d=128, slices_per_subject=2, spacing_3d=2.0, lesions=True)
TINY = dict(n_subjects=2, size_2d=48, slices_per_subject=2, spacing_3d=4.0)
GREY = {"MRI", "CT", "T1", "T2"}


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    return Path(ensure_phantom_dataset(tmp_path_factory.mktemp("phantom") / "phantom", **MAIN))


def _digests(root: Path) -> dict:
    """md5 of every PNG / datalist and of every NIfTI *array* under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.suffix == ".png" or p.name.startswith("datalist"):
            out[rel] = hashlib.md5(p.read_bytes()).hexdigest()
        elif p.name.endswith(".nii.gz"):
            out[rel] = hashlib.md5(np.asarray(nib.load(str(p)).dataobj).tobytes()).hexdigest()
    return out


def _mtimes(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _load(p: Path) -> np.ndarray:
    return np.asarray(nib.load(str(p)).dataobj)


def test_default_dataset_dir():
    assert default_dataset_dir("/x/bundle") == os.path.join("/x/bundle", "data", "phantom")
    assert default_dataset_dir(Path("/x/bundle")) == os.path.join("/x/bundle", "data", "phantom")


def test_determinism(tmp_path):
    a = Path(ensure_phantom_dataset(tmp_path / "a", seed=3, **TINY))
    b = Path(ensure_phantom_dataset(tmp_path / "b", seed=3, **TINY))
    c = Path(ensure_phantom_dataset(tmp_path / "c", seed=4, **TINY))
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert len([k for k in da if k.endswith(".png")]) == 2 * 2 * 9  # subjects x slices x (8 pair images + mask)
    assert da == db  # same seed: byte-identical PNGs, identical NIfTI arrays and datalists
    pngs = [k for k in da if k.endswith(".png")]
    assert not any(da[k] == dc.get(k) for k in pngs if "lesion_masks" not in k)
    vol = [k for k in da if k.endswith("t1.nii.gz")]
    assert vol and not any(da[k] == dc.get(k) for k in vol)


def test_cache_reuse_and_regeneration(tmp_path):
    root = tmp_path / "ph"
    ensure_phantom_dataset(root, seed=0, **TINY)
    before = _mtimes(root)
    assert ensure_phantom_dataset(root, seed=0, **TINY) == str(root)
    assert _mtimes(root) == before  # reused: nothing rewritten

    ensure_phantom_dataset(root, seed=0, **{**TINY, "size_2d": 32})  # a parameter changed -> regenerated
    meta = json.loads((root / "phantom.json").read_text())
    assert meta["params"]["size_2d"] == 32 and meta["version"] == phantom.VERSION
    png = next((root / "2d" / "CT-MRI" / "CT").glob("*.png"))
    assert Image.open(png).size == (32, 32)
    assert not list(tmp_path.glob(".ph.tmp-*"))  # no temporary directory left behind

    before = _mtimes(root)
    ensure_phantom_dataset(root, seed=0, force=True, **{**TINY, "size_2d": 32})
    after = _mtimes(root)
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)


def test_refuses_to_replace_foreign_directory(tmp_path):
    (tmp_path / "ph").mkdir()
    (tmp_path / "ph" / "precious.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        ensure_phantom_dataset(tmp_path / "ph", **TINY)
    assert (tmp_path / "ph" / "precious.txt").exists()


def test_concurrent_callers_generate_once(tmp_path, monkeypatch):
    calls = []
    real = phantom._generate

    def counting(out, params):
        calls.append(out)
        real(out, params)

    monkeypatch.setattr(phantom, "_generate", counting)
    root, results, errors = tmp_path / "ph", [], []

    def worker():
        try:
            results.append(ensure_phantom_dataset(root, seed=1, **TINY))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [str(root)] * 3
    assert len(calls) == 1  # the losers waited on the lock and reused the winner's dataset
    assert (root / "phantom.json").exists()


def test_layout_and_datalists(ds):
    meta = json.loads((ds / "phantom.json").read_text())
    assert meta["params"] == MAIN and meta["version"] == phantom.VERSION
    names_by_folder = {}
    for pair, (a, b, _v) in PAIR_TYPES.items():
        for mod in (a, b):
            names_by_folder[(pair, mod)] = sorted(p.stem for p in (ds / "2d" / pair / mod).glob("*.png"))
    names_by_folder["mask"] = sorted(p.stem for p in (ds / "2d" / "lesion_masks").glob("*.png"))
    names = names_by_folder["mask"]
    assert len(names) == MAIN["n_subjects"] * MAIN["slices_per_subject"]
    assert all(v == names for v in names_by_folder.values())  # same names across pair types
    assert all(len(n) == len("s00_z040") and n[0] == "s" and n[3:5] == "_z" for n in names)
    for sid in ("s00", "s01", "s02"):
        for m in ("t1", "t2", "ct", "pet", "spect", "lesion"):
            assert (ds / "3d" / sid / f"{m}.nii.gz").is_file()

    for kind, n_items in (("2d", len(names) * 4), ("3d", MAIN["n_subjects"] * 4)):
        dl = json.loads((ds / f"datalist_{kind}.json").read_text())
        assert set(dl) == {"training", "validation", "testing"}
        assert sum(len(v) for v in dl.values()) == n_items
        subjects = {k: {it["subject"] for it in v} for k, v in dl.items()}
        assert all(subjects[k] for k in subjects)  # >= 1 subject in each split
        assert not (subjects["training"] & subjects["validation"] or subjects["training"] & subjects["testing"]
                    or subjects["validation"] & subjects["testing"])
        assert subjects["validation"] == {"s02"} and subjects["testing"] == {"s01"}
        for items in dl.values():
            for it in items:
                assert {"name", "pair", "source_a", "source_b", "modality_a", "modality_b", "label"} <= set(it)
                assert it["pair"] in PAIR_TYPES
                a, b, v = PAIR_TYPES[it["pair"]]
                assert (it["modality_a"], it["modality_b"]) == (a, b)
                for key in ("source_a", "source_b", "label"):
                    assert not os.path.isabs(it[key]) and (ds / it[key]).is_file(), it[key]
                assert it["name"].startswith(it["subject"])
                if kind == "2d":
                    assert it["source_a"] == f"2d/{it['pair']}/{a}/{it['name']}.png"
                    assert it["source_b"] == f"2d/{it['pair']}/{b}/{it['name']}.png"
                else:
                    assert it["source_a"].endswith("t1.nii.gz") and it["source_b"].endswith(f"{v}.nii.gz")


def test_png_modes_and_colour(ds):
    coloured = {"PET": False, "SPECT": False}
    for pair, (a, b, _v) in PAIR_TYPES.items():
        for mod in (a, b):
            for p in (ds / "2d" / pair / mod).glob("*.png"):
                im = Image.open(p)
                assert im.size == (MAIN["size_2d"], MAIN["size_2d"])
                if mod in GREY:
                    assert im.mode == "L"
                    assert np.asarray(im).max() > 100
                else:
                    assert im.mode == "RGB"
                    x = np.asarray(im).astype(int)
                    coloured[mod] |= bool((x[..., 0] != x[..., 1]).any())
                    corners = x[:4, :4].reshape(-1, 3)
                    assert corners.max() <= 10  # black background
    assert all(coloured.values())
    for p in (ds / "2d" / "lesion_masks").glob("*.png"):
        im = Image.open(p)
        assert im.mode == "L" and set(np.unique(np.asarray(im))) <= {0, 255}
    # MRI and T1 are the same T1 slice in every pair type
    for p in (ds / "2d" / "T2-T1" / "T1").glob("*.png"):
        for pair in ("CT-MRI", "PET-MRI", "SPECT-MRI"):
            assert (ds / "2d" / pair / "MRI" / p.name).read_bytes() == p.read_bytes()


def test_nifti_affines(ds):
    for sid in ("s00", "s01", "s02"):
        ref = nib.load(str(ds / "3d" / sid / "t1.nii.gz"))
        assert nib.aff2axcodes(ref.affine) == ("R", "A", "S")
        assert np.allclose(ref.header.get_zooms()[:3], MAIN["spacing_3d"])
        assert all(48 <= s <= 128 for s in ref.shape)
        for m in ("t2", "ct", "pet", "spect", "lesion"):
            img = nib.load(str(ds / "3d" / sid / f"{m}.nii.gz"))
            assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
            assert np.allclose(img.get_sform(), ref.affine) and np.allclose(img.get_qform(), ref.affine)
            x = np.asarray(img.dataobj)
            if m == "lesion":
                assert x.dtype == np.uint8 and set(np.unique(x)) <= {0, 1}
            else:
                assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.5


def _template_on_grid(img):
    """Template GM / WM / brain mask (nearest voxel) at the world positions of ``img``'s voxels."""
    d = phantom._template_dir()
    tpl = {m: nib.load(str(d / phantom._TEMPLATE_NAME.format(m))) for m in ("t1", "gm", "wm")}
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in img.shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    t_aff = tpl["t1"].affine
    tidx = np.round((world - t_aff[:3, 3]) @ np.linalg.inv(t_aff[:3, :3]).T).astype(int)
    shape = np.array(tpl["t1"].shape)
    inside = np.all((tidx >= 0) & (tidx < shape), 1)
    out = {}
    for m, im in tpl.items():
        v = np.zeros(len(ijk), np.float32)
        data = np.asarray(im.dataobj)
        v[inside] = data[tuple(tidx[inside].T)] / 255.0
        out[m] = v.reshape(img.shape)
    return out


def test_values_are_sane(ds):
    # subject 0 has the template geometry, so the template tissue maps apply voxel by voxel
    img = nib.load(str(ds / "3d" / "s00" / "ct.nii.gz"))
    tpl = _template_on_grid(img)
    brain = tpl["t1"] > 0
    gm, wm = tpl["gm"] > 0.8, tpl["wm"] > 0.8
    vol = {m: _load(ds / "3d" / "s00" / f"{m}.nii.gz").astype(np.float64) for m in ("t1", "t2", "ct", "pet", "spect")}
    ct = vol["ct"]
    bone = ct > 0.9
    assert bone.sum() > 1000 and (bone & brain).sum() < 0.01 * bone.sum()  # a bright skull, outside the brain
    assert ct[bone].mean() > ct[brain].mean() + 0.3
    assert ct[brain].mean() > ct[~brain].mean()  # brain above the air / fat background
    assert vol["pet"][gm].mean() > 1.5 * vol["pet"][wm].mean()  # FDG: GM uptake well above WM
    assert vol["spect"][gm].mean() > vol["spect"][wm].mean()
    assert vol["t1"][wm].mean() > vol["t1"][gm].mean()  # T1: WM brighter
    assert vol["t2"][wm].mean() < vol["t2"][gm].mean()  # T2: WM darker

    n_lesion_subjects = 0
    for sid in ("s00", "s01", "s02"):
        les = _load(ds / "3d" / sid / "lesion.nii.gz") > 0
        if not les.any():
            continue
        n_lesion_subjects += 1
        pet = _load(ds / "3d" / sid / "pet.nii.gz")
        spect = _load(ds / "3d" / sid / "spect.nii.gz")
        t1 = _load(ds / "3d" / sid / "t1.nii.gz")
        t2 = _load(ds / "3d" / sid / "t2.nii.gz")
        tissue = pet > 0.15
        assert pet[les].mean() > pet[tissue].mean() + 0.1  # lesions are hot in PET
        assert spect[les].mean() > spect[spect > 0.15].mean()
        assert t2[les].mean() > t2[t1 > 0.6].mean()  # hyperintense on T2 vs white matter
    assert n_lesion_subjects >= 1  # lesions=True: at least one lesion in the dataset
    meta = json.loads((ds / "phantom.json").read_text())
    assert sum(s["n_lesions"] for s in meta["info"]["subjects"]) >= 1


def test_no_lesions_option(tmp_path):
    root = Path(ensure_phantom_dataset(tmp_path / "ph", seed=0, lesions=False, **TINY))
    for p in root.glob("3d/*/lesion.nii.gz"):
        assert not _load(p).any()
    for p in (root / "2d" / "lesion_masks").glob("*.png"):
        assert not np.asarray(Image.open(p)).any()


def test_cli(tmp_path, capsys):
    # in-process (the ``python -m scripts.phantom`` entry point is ``sys.exit(main())``): a subprocess would spend
    # most of its time importing the ``scripts`` package (monai) again
    root = tmp_path / "cli"
    argv = ["--root", str(root), "--seed", "2", "--n_subjects", "1", "--slices_per_subject", "1", "--size_2d", "32",
            "--spacing_3d", "4", "--preview", str(tmp_path / "p.png")]
    assert phantom.main(argv) == 0
    assert str(root) in capsys.readouterr().out
    meta = json.loads((root / "phantom.json").read_text())
    assert meta["params"] == dict(seed=2, n_subjects=1, size_2d=32, slices_per_subject=1, spacing_3d=4.0, lesions=True)
    assert len(list((root / "2d" / "PET-MRI" / "PET").glob("*.png"))) == 1
    assert Image.open(tmp_path / "p.png").mode == "RGB"
    before = _mtimes(root)
    assert phantom.main(argv[:-2]) == 0 and _mtimes(root) == before  # cached
    assert phantom.main(argv[:-2] + ["--force"]) == 0 and _mtimes(root) != before
