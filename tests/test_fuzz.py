"""Property-based fuzzing of the readers and transforms (hypothesis).

Random sizes, dtypes, channel counts, value ranges (NaN/Inf, constant, extreme) and file formats, and random damage
to valid files, go through the inference data path: :class:`LoadFusionPaird` -> intensity scaling -> a fusion
baseline -> :class:`MergeColourd` -> :class:`SaveFusedd`. The only allowed failure is the documented
:class:`FusionDataError` (message naming the file); anything that loads must give finite outputs in [0, 1] with
the sources' size. ``derandomize=True``: CI runs the same examples every time (no flaky failures); raise
``max_examples`` locally to search further.
"""

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.transforms import Compose, ConcatItemsd, ScaleIntensityd
from PIL import Image

from scripts.networks import AverageFusion
from scripts.transforms import FusionDataError, LoadFusionPaird, MergeColourd, SaveFusedd

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KEYS = ["source_a", "source_b"]
LOAD = LoadFusionPaird(spatial_dims=2)
SCALE = Compose([ScaleIntensityd(keys=KEYS), ConcatItemsd(keys=KEYS, name="image")])
NET = AverageFusion()


def _values(draw, shape, dtype):
    kind = draw(st.sampled_from(["random", "random", "constant", "nan", "inf", "extreme", "tiny_range", "binary"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo = draw(st.integers(int(info.min), int(info.max)))
        hi = draw(st.integers(lo, int(info.max)))
        arr = rng.integers(lo, hi, size=shape, endpoint=True, dtype=np.int64)
    else:
        big = min(float(np.finfo(dtype).max) * 0.9, 1e300)  # float32: the range (2 * big) overflows
        lo = draw(st.floats(-1e6, 1e6)) if kind != "extreme" else -big
        hi = lo + draw(st.floats(0, 1e6)) if kind != "extreme" else big
        arr = rng.uniform(lo, hi, size=shape)
    if kind == "constant":
        arr = np.full(shape, arr.flat[0])
    elif kind == "binary":
        arr = (arr > np.median(arr)).astype(np.int64)
    elif kind == "tiny_range" and not np.issubdtype(dtype, np.integer):
        arr = 1.0 + rng.random(shape) * 1e-6
    arr = arr.astype(dtype)
    if kind in ("nan", "inf") and not np.issubdtype(dtype, np.integer) and arr.size:
        flat = arr.reshape(-1)
        flat[rng.integers(0, flat.size)] = np.nan if kind == "nan" else -np.inf
    return arr


@st.composite
def image_files(draw, shape=None):
    """(writer, array) where writer(path_stem) -> path. PNG/TIFF through PIL, NIfTI through nibabel."""
    h, w = shape or (draw(st.integers(1, 33)), draw(st.integers(1, 33)))
    fmt = draw(st.sampled_from(["png8", "png16", "tiff_float", "nifti"]))
    if fmt == "png8":
        mode, c = draw(st.sampled_from([("L", None), ("LA", 2), ("RGB", 3), ("RGBA", 4), ("P", 3), ("1", None)]))
        arr = _values(draw, (h, w) if c is None else (h, w, c), np.uint8)

        def write(stem):
            img = Image.fromarray(arr) if mode != "LA" else Image.fromarray(arr, mode="LA")
            img = img.convert(mode) if mode in ("P", "1") else img
            img.save(f"{stem}.png")
            return f"{stem}.png"

        return write, (h, w)
    if fmt == "png16":
        arr = _values(draw, (h, w), np.uint16)
        return (lambda stem: Image.fromarray(arr).save(f"{stem}.png") or f"{stem}.png"), (h, w)
    if fmt == "tiff_float":
        arr = _values(draw, (h, w), np.float32)
        return (lambda stem: Image.fromarray(arr).save(f"{stem}.tiff") or f"{stem}.tiff"), (h, w)
    dtype = draw(st.sampled_from([np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64]))
    extra = draw(st.sampled_from([(), (1,), (draw(st.integers(2, 5)),), (1, draw(st.integers(1, 5)))]))
    arr = _values(draw, (h, w, *extra), dtype)

    def write_nii(stem):
        nib.save(nib.Nifti1Image(arr, np.eye(4)), f"{stem}.nii.gz")
        return f"{stem}.nii.gz"

    return write_nii, (h, w)


def _fuse_and_save(d: dict, out: Path) -> None:
    """The inference path after loading; checks what a successful load must give."""
    shape = tuple(d["source_a"].shape)
    assert len(shape) == 3 and shape[0] == 1 and tuple(d["source_b"].shape) == shape
    for k in KEYS:
        assert d[k].dtype == torch.float32 and bool(torch.isfinite(d[k]).all())
        chroma = d.get(f"{k}_chroma")
        assert chroma is None or (tuple(chroma.shape) == (2, *shape[1:]) and bool(torch.isfinite(chroma).all()))
    d = SCALE(d)
    assert bool(torch.isfinite(d["image"]).all()) and float(d["image"].min()) >= 0 and float(d["image"].max()) <= 1
    with torch.no_grad():
        d["pred"] = NET(d["image"][None])[0].clamp(0, 1)
    d = MergeColourd()(d)
    assert bool(torch.isfinite(d["pred_rgb"]).all()) and tuple(d["pred_rgb"].shape) == (3, *shape[1:])
    d = SaveFusedd(output_dir=out)({**d, "name": "fuzz"})
    assert all(Path(f).is_file() for f in d["fused_files"])


@FUZZ
@given(a=image_files(), b=image_files(), same_size=st.booleans(), data=st.data())
def test_random_images_load_and_fuse_or_fail_clearly(a, b, same_size, data):
    if same_size:
        b = data.draw(image_files(shape=a[1]))
    with tempfile.TemporaryDirectory() as tmp:
        pa, pb = a[0](f"{tmp}/a"), b[0](f"{tmp}/b")
        try:
            d = LOAD({"source_a": pa, "source_b": pb})
        except FusionDataError as e:
            assert pa in str(e) or pb in str(e), str(e)  # the message names the file
            return
        _fuse_and_save(d, Path(tmp) / "out")


def _valid_files(tmp: Path) -> list[Path]:
    import itk

    r = np.random.default_rng(1)
    g = (r.random((12, 10)) * 200 + 20).astype(np.uint8)
    files = [tmp / "g.png", tmp / "c.png", tmp / "f.tiff", tmp / "v.nii.gz", tmp / "v.nii", tmp / "d.dcm"]
    Image.fromarray(g).save(files[0])
    Image.fromarray(np.stack([g, 255 - g, g // 2], -1)).save(files[1])
    Image.fromarray(g.astype(np.float32) / 3).save(files[2])
    nib.save(nib.Nifti1Image(g.astype(np.float32), np.eye(4)), files[3])
    nib.save(nib.Nifti1Image(g.astype(np.int16), np.eye(4)), files[4])
    itk.imwrite(itk.image_from_array(g.astype(np.uint16)), str(files[5]))
    return files


@FUZZ
@given(which=st.integers(0, 5), damage=st.sampled_from(["truncate", "flip", "garbage_tail", "zero_block", "prefix"]),
       where=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_damaged_files_load_or_fail_clearly(which, damage, where, seed):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = _valid_files(tmp)
        target = files[which]
        raw = bytearray(target.read_bytes())
        pos = int(where * (len(raw) - 1))
        rng = np.random.default_rng(seed)
        if damage == "truncate":
            raw = raw[:pos]
        elif damage == "flip":
            for i in rng.integers(0, len(raw), size=1 + int(rng.integers(0, 8))):
                raw[i] ^= 1 << int(rng.integers(0, 8))
        elif damage == "garbage_tail":
            raw += rng.bytes(int(rng.integers(1, 200)))
        elif damage == "zero_block":
            raw[pos:pos + 64] = bytes(len(raw[pos:pos + 64]))
        else:
            raw = bytearray(rng.bytes(int(rng.integers(0, 16)))) + raw
        target.write_bytes(bytes(raw))
        partner = files[0] if which != 0 else files[2]
        try:
            d = LOAD({"source_a": str(target), "source_b": str(partner)})
        except FusionDataError as e:
            assert str(target) in str(e) or str(partner) in str(e), str(e)
            return
        if d["source_a"].shape == d["source_b"].shape:
            _fuse_and_save(d, tmp / "out")


def test_regressions_found_by_review_of_the_fuzzed_paths(tmp_path):
    """Pinned cases: a finite float32 range too wide for scaling (would give NaN fused pixels), float64 beyond the
    float32 range (Inf after loading), a palette PNG (indices, not intensities) and a CMYK JPEG (not RGBA)."""
    g = (np.random.default_rng(0).random((9, 7)) * 200 + 20).astype(np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    wide = np.linspace(-3e38, 3e38, 63, dtype=np.float32).reshape(9, 7)
    Image.fromarray(wide).save(tmp_path / "wide.tiff")
    nib.save(nib.Nifti1Image(np.full((7, 9), 1e300), np.eye(4)), tmp_path / "huge.nii.gz")
    with_partner = lambda f: {"source_a": str(tmp_path / "g.png"), "source_b": str(tmp_path / f)}  # noqa: E731
    try:
        LOAD(with_partner("wide.tiff"))
        raise AssertionError("a range wider than float32 must be refused")
    except FusionDataError as e:
        assert "wide.tiff: value range" in str(e) and "too wide for float32" in str(e)
    try:
        LOAD({"source_a": str(tmp_path / "huge.nii.gz"), "source_b": str(tmp_path / "huge.nii.gz")})
        raise AssertionError("values beyond float32 must be refused")
    except FusionDataError as e:
        assert "huge.nii.gz: contains 0 NaN and 63 Inf values (values beyond +-3.4e38" in str(e)
    rgb = np.stack([g, 255 - g, g // 2], -1)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(tmp_path / "pal.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    ref = LOAD(with_partner("rgb.png"))
    for f, tol in (("pal.png", 12), ("cmyk.jpg", 12)):
        d = LOAD(with_partner(f))
        assert "source_b_chroma" in d  # colour kept, not read as index / 4-channel data
        assert float((d["source_b"] - ref["source_b"]).abs().max()) <= tol, f
        _fuse_and_save(d, tmp_path / "out")
