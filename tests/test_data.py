"""Data layer: the three dataset layouts, colour handling, bad-input errors and output writing."""

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from scripts import io as fio
from scripts.data import build_datalist, in_validation_split
from scripts.transforms import FusionDataError, LoadFusionPaird, MergeColourd, SaveFusedd, rgb_to_ycbcr, ycbcr_to_rgb

RNG = np.random.default_rng(0)


def _grey(size=(32, 40), seed=0):
    r = np.random.default_rng(seed)
    return (r.random(size) * 200 + 20).astype(np.uint8)


def _rgb(size=(32, 40), seed=1):
    r = np.random.default_rng(seed)
    return (r.random((*size, 3)) * 255).astype(np.uint8)


def _png(path: Path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return path


def _folder_dataset(root: Path, n=5, colour=True):
    for i in range(n):
        _png(root / "MRI" / f"{i:02d}.png", _grey(seed=i))
        _png(root / "PET" / f"{i:02d}.png", _rgb(seed=100 + i) if colour else _grey(seed=100 + i))
    return root


# ----------------------------------------------------------------------------------------------------- layouts
def test_folder_layout_pairs_by_name_and_orders_mri_first(tmp_path):
    root = _folder_dataset(tmp_path / "ds")
    items = build_datalist(root)
    assert len(items) == 5
    for it in items:
        assert it["modality_a"] == "MRI" and it["modality_b"] == "PET" and it["pair"] == "PET-MRI"
        assert Path(it["source_a"]).parent.name == "MRI" and Path(it["source_b"]).parent.name == "PET"
        assert Path(it["source_a"]).name == Path(it["source_b"]).name


def test_folder_layout_with_pair_type_subfolders(tmp_path):
    _folder_dataset(tmp_path / "ds" / "MRI_PET", n=3)
    for i in range(2):
        _png(tmp_path / "ds" / "MRI_CT" / "CT" / f"{i}.png", _grey(seed=i + 50))
        _png(tmp_path / "ds" / "MRI_CT" / "MRI" / f"{i}.png", _grey(seed=i + 60))
    items = build_datalist(tmp_path / "ds")
    assert sorted({it["pair"] for it in items}) == ["CT-MRI", "PET-MRI"]
    assert len(items) == 5
    assert len(build_datalist(tmp_path / "ds", pairs=["CT-MRI"])) == 2


def test_folder_layout_missing_partner_names_the_file(tmp_path):
    root = _folder_dataset(tmp_path / "ds", n=3)
    os.remove(root / "PET" / "01.png")
    with pytest.raises(FusionDataError, match=r"MRI/01\.png: no partner named '01\.\*'"):
        build_datalist(root)


def test_csv_manifest_aanlib(aanlib_dir):
    items = build_datalist(aanlib_dir, check=False)
    with open(aanlib_dir / "pairs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(items) == len(rows)
    first = items[0]
    assert first["name"] == f"{rows[0]['pair']}_{rows[0]['id']}"
    assert first["source_b"].endswith(rows[0]["aligned"]) and first["aligned_b"].endswith(rows[0]["aligned"])
    moving = build_datalist(aanlib_dir, pair_source="moving", check=False)
    assert moving[0]["source_b"].endswith(rows[0]["moving"])
    # fixed hold-out by name: disjoint, covers everything, about 20%
    train = {it["name"] for it in build_datalist(aanlib_dir, "training", check=False)}
    val = {it["name"] for it in build_datalist(aanlib_dir, "validation", check=False)}
    assert not train & val and len(train | val) == len(rows)
    assert 0.1 < len(val) / len(rows) < 0.35


def test_csv_generic_manifest_and_relative_paths(tmp_path):
    _png(tmp_path / "a" / "x.png", _grey())
    _png(tmp_path / "b" / "x.png", _grey(seed=3))
    (tmp_path / "list.csv").write_text("source_a,source_b,modality_a,modality_b\na/x.png,b/x.png,T1,CT\n")
    (item,) = build_datalist(tmp_path / "list.csv")
    assert item["pair"] == "CT-T1" and Path(item["source_a"]).is_absolute() and Path(item["source_a"]).exists()


def test_csv_unknown_columns_error(tmp_path):
    (tmp_path / "pairs.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(FusionDataError, match="unknown manifest columns"):
        build_datalist(tmp_path)


def test_json_datalist_nifti_keeps_geometry(tmp_path):
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    affine[:3, 3] = [-10, 20, 5]
    for name in ("t1", "pet"):
        nib.save(nib.Nifti1Image(RNG.random((12, 10, 6)).astype(np.float32), affine), tmp_path / f"{name}.nii.gz")
    datalist = {
        "training": [{"source_a": "t1.nii.gz", "source_b": "pet.nii.gz", "modality_a": "MRI", "modality_b": "PET"}],
        "validation": [{"image": ["t1.nii.gz", "pet.nii.gz"], "label": "t1.nii.gz"}],
    }
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    (train,) = build_datalist(tmp_path, "training")
    assert train["pair"] == "PET-MRI"
    (val,) = build_datalist(tmp_path / "datalist.json", "validation")
    assert val["source_b"].endswith("pet.nii.gz") and val["lesion"].endswith("t1.nii.gz") and "label" not in val
    d = LoadFusionPaird()(train)
    assert d["source_a"].shape == (1, 12, 10, 6)
    np.testing.assert_allclose(d["source_a"].affine.numpy(), affine, atol=1e-5)


def test_empty_dataset_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FusionDataError, match="no image pairs found"):
        build_datalist(tmp_path / "empty")
    with pytest.raises(FusionDataError, match="dataset folder not found"):
        build_datalist(tmp_path / "nope")


def test_validation_split_is_stable():
    names = [f"PET-MRI_{i:03d}" for i in range(200)]
    held = [in_validation_split(n) for n in names]
    assert held == [in_validation_split(n) for n in names]
    assert 0.12 < sum(held) / len(names) < 0.28


# ------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "problem, pattern",
    [
        ("size", r"size mismatch: .*MRI/00\.png is \(40, 32\) but .*PET/00\.png is \(41, 32\)"),
        ("corrupt", r"PET/00\.png: cannot read as an image"),
        ("text", r"PET/00\.png: cannot read as an image"),
        ("empty", r"PET/00\.png: file is empty"),
        ("constant", r"PET/00\.png: image is constant \(every value is 0\)"),
    ],
)
def test_bad_pairs_fail_before_training_naming_the_file(tmp_path, problem, pattern):
    root = _folder_dataset(tmp_path / "ds", n=2, colour=False)
    bad = root / "PET" / "00.png"
    if problem == "size":
        _png(bad, _grey(size=(32, 41)))
    elif problem == "corrupt":
        bad.write_bytes(bad.read_bytes()[:60])
    elif problem == "text":
        bad.write_text("this is not an image")
    elif problem == "empty":
        bad.write_bytes(b"")
    elif problem == "constant":
        _png(bad, np.zeros((32, 40), np.uint8))
    with pytest.raises(FusionDataError, match=pattern):
        build_datalist(root)


def test_nan_and_channel_count_errors(tmp_path):
    a = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(RNG.random((8, 8, 4)).astype(np.float32), np.eye(4)), a)
    arr = RNG.random((8, 8, 4)).astype(np.float32)
    arr[1, 2, 3] = np.nan
    arr[0, 0, 0] = np.inf
    b = tmp_path / "b.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), b)
    with pytest.raises(FusionDataError, match=r"b\.nii\.gz: contains 1 NaN and 1 Inf"):
        LoadFusionPaird()({"source_a": str(a), "source_b": str(b)})
    five = tmp_path / "five.nii.gz"
    nib.save(nib.Nifti1Image(RNG.random((8, 8, 4, 5)).astype(np.float32), np.eye(4)), five)
    with pytest.raises(FusionDataError, match=r"five\.nii\.gz: 5 channels; expected 1"):
        LoadFusionPaird()({"source_a": str(a), "image": None, "source_b": str(five)})


def test_missing_keys_error():
    with pytest.raises(FusionDataError, match="a pair needs 'source_a' and 'source_b'"):
        LoadFusionPaird()({"name": "x"})


# ------------------------------------------------------------------------------------------------------ colour
def test_colour_round_trip_is_identity():
    rgb = torch.from_numpy(_rgb(size=(64, 48))).permute(2, 0, 1).float()
    back = ycbcr_to_rgb(rgb_to_ycbcr(rgb))
    assert torch.allclose(back, rgb, atol=1e-3)
    assert torch.equal(back.round().clamp(0, 255), rgb)


def test_ycbcr_matches_pil():
    arr = _rgb(size=(16, 16))
    ours = rgb_to_ycbcr(torch.from_numpy(arr).permute(2, 0, 1).float())
    pil = torch.from_numpy(np.asarray(Image.fromarray(arr).convert("YCbCr"))).permute(2, 0, 1).float()
    assert (ours.round() - pil).abs().max() <= 1


def test_split_then_merge_returns_the_colour_input(tmp_path):
    arr = _rgb()
    _png(tmp_path / "mri.png", _grey())
    _png(tmp_path / "pet.png", arr)
    d = LoadFusionPaird()({"source_a": str(tmp_path / "mri.png"), "source_b": str(tmp_path / "pet.png")})
    assert d["source_b"].shape == (1, 40, 32) and d["source_b_chroma"].shape == (2, 40, 32)
    assert "source_a_chroma" not in d  # grey stays grey
    out = MergeColourd()({"pred": d["source_b"] / 255.0, "source_b_chroma": d["source_b_chroma"]})
    rgb = (out["pred_rgb"] * 255).round().permute(2, 1, 0).numpy()  # (x, y, c) -> (rows, cols, c)
    assert np.abs(rgb - arr).max() <= 1  # luminance quantised once to 8 bit


def test_grey_stored_as_rgb_and_alpha_are_grey(tmp_path):
    g = _grey()
    _png(tmp_path / "rgb_grey.png", np.stack([g, g, g], -1))
    _png(tmp_path / "la.png", np.stack([g, np.full_like(g, 255)], -1), mode="LA")
    rgba = np.concatenate([_rgb(), np.full((32, 40, 1), 255, np.uint8)], -1)
    _png(tmp_path / "rgba.png", rgba, mode="RGBA")
    d = LoadFusionPaird()({"source_a": str(tmp_path / "rgb_grey.png"), "source_b": str(tmp_path / "la.png")})
    assert d["source_a"].shape[0] == 1 and d["source_b"].shape[0] == 1 and "source_a_chroma" not in d
    assert torch.equal(d["source_a"][0], torch.from_numpy(g).T.float())
    d = LoadFusionPaird()({"source_a": str(tmp_path / "rgb_grey.png"), "source_b": str(tmp_path / "rgba.png")})
    assert "source_b_chroma" in d


def test_merge_without_chroma_gives_grey_rgb():
    pred = torch.rand(1, 8, 6)
    out = MergeColourd()({"pred": pred})["pred_rgb"]
    assert out.shape == (3, 8, 6) and torch.equal(out[0], out[1]) and torch.allclose(out[0], pred[0])


def test_single_two_channel_file_input(tmp_path):
    arr = RNG.random((10, 12, 4, 2)).astype(np.float32) + 0.1  # a volume pair, channels last as MONAI Label sends
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "pair.nii.gz")
    d = LoadFusionPaird()({"image": str(tmp_path / "pair.nii.gz")})
    assert d["source_a"].shape == (1, 10, 12, 4) and "image" not in d
    np.testing.assert_allclose(d["source_b"][0].numpy(), arr[..., 1], rtol=1e-6)


# ------------------------------------------------------------------------------------------------------ output
def test_save_png_atomic_and_never_onto_inputs(tmp_path):
    root = _folder_dataset(tmp_path / "ds", n=1)
    (item,) = build_datalist(root)
    d = LoadFusionPaird()(item)
    fused = torch.rand(1, *d["source_a"].shape[1:])
    d = MergeColourd()({**d, "pred": fused})
    out = SaveFusedd(output_dir=tmp_path / "out")({**d, "name": "../../evil/name"})
    files = sorted(Path(p).name for p in out["fused_files"])
    assert files == ["_.._evil_name_fused.png", "_.._evil_name_fused_rgb.png"]
    assert all(Path(p).parent == tmp_path / "out" for p in out["fused_files"])
    grey = np.asarray(Image.open(out["fused_files"][0]))
    assert grey.shape == (32, 40) and np.abs(grey / 255.0 - fused[0].numpy().T).max() <= 0.5 / 255 + 1e-6
    assert Image.open(out["fused_files"][1]).mode == "RGB"
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]
    umask = os.umask(0)
    os.umask(umask)
    assert all(os.stat(p).st_mode & 0o777 == 0o666 & ~umask for p in out["fused_files"])  # not mkstemp's 0600
    with pytest.raises(FileExistsError, match="refusing to overwrite input"):
        fio.write_image(fused, item["source_a"], protect=[item["source_a"]])


def test_save_nifti_keeps_source_affine(tmp_path):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [5, -7, 12]
    for name in ("t1", "ct"):
        nib.save(nib.Nifti1Image(RNG.random((9, 11, 5)).astype(np.float32) + 0.1, affine), tmp_path / f"{name}.nii")
    d = LoadFusionPaird()({"source_a": str(tmp_path / "t1.nii"), "source_b": str(tmp_path / "ct.nii"), "name": "p"})
    out = SaveFusedd(output_dir=tmp_path / "out")({**d, "pred": d["source_a"] * 0.5})
    (path,) = out["fused_files"]
    assert path.endswith("p_fused.nii.gz")
    img = nib.load(path)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert img.shape == (9, 11, 5)


def test_aanlib_split_file_holds_out_a_fifth_of_every_pair_type(aanlib_dir, bundle_root):
    """The split of the shipped weights: >= 20% of each pair type held out, disjoint, covering all 89 pairs."""
    split = bundle_root / "configs" / "aanlib_split.json"
    train = build_datalist(aanlib_dir, "training", split_file=split, check=False)
    val = build_datalist(aanlib_dir, "validation", split_file=split, check=False)
    names = set(json.loads(split.read_text())["validation"])
    assert {it["name"] for it in val} == names
    assert not names & {it["name"] for it in train}
    assert len(train) + len(val) == len(build_datalist(aanlib_dir, "all", check=False)) == 89
    for pair in ("CT-MRI", "PET-MRI", "SPECT-MRI"):
        n_val = sum(it["pair"] == pair for it in val)
        n_all = n_val + sum(it["pair"] == pair for it in train)
        assert n_val >= 0.2 * n_all, (pair, n_val, n_all)


def test_split_file_errors_name_the_file(tmp_path, aanlib_dir):
    bad = tmp_path / "split.json"
    bad.write_text('{"validation": []}')
    with pytest.raises(FusionDataError, match=r"split\.json.*non-empty"):
        build_datalist(aanlib_dir, "training", split_file=bad, check=False)
    bad.write_text('{"validation": ["PAIR_THAT_DOES_NOT_EXIST"]}')
    with pytest.raises(FusionDataError, match=r"split\.json: none of its 1 validation pair names"):
        build_datalist(aanlib_dir, "validation", split_file=bad, check=False)
    bad.write_text("{not json")
    with pytest.raises(FusionDataError, match=r"split\.json: cannot read"):
        build_datalist(aanlib_dir, "validation", split_file=bad, check=False)
