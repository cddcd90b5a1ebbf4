"""Volumes: NIfTI and DICOM series in their own space, resampling onto the MRI grid, slice-wise (2.5D) and
sliding-window fusion, 3D training, and the header round trip of the fused NIfTI.

Real volumes that the installed packages ship are used where they exist: nibabel's test data (an LAS anatomical,
an oblique anisotropic 4D EPI, a two-slice Siemens DICOM series), pydicom's test files and nilearn's MNI152
templates. Synthetic volumes (small, <= 40^3) add oblique / anisotropic / LPS-vs-RAS geometry with known answers.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor

from conftest import BUNDLE_ROOT
from scripts.data import build_datalist
from scripts.transforms import FusionDataError, LoadFusionPaird
from scripts.volumes import (
    VolumeInferer,
    build_network,
    checkpoint_spatial_dims,
    is_dicom_series,
    network_spatial_dims,
)

CONFIGS = BUNDLE_ROOT / "configs"
NIB_DATA = Path(__import__("nibabel.testing", fromlist=["data_path"]).data_path)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ------------------------------------------------------------------------------------------------------ helpers
def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(rotation, spacing, origin):
    aff = np.eye(4)
    aff[:3, :3] = rotation @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def _world(shape, affine):
    """World (RAS mm) coordinates of every voxel centre, (3, *shape)."""
    idx = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:]).reshape(3, *shape)


def _f(p):
    """A smooth, asymmetric test function of world position (mm): a mirror or axis swap changes it."""
    x, y, z = p
    return 3.0 + np.sin(0.15 * x + 0.3) + np.cos(0.11 * y - 0.2) + 0.6 * np.sin(0.13 * z + 0.05 * x) + 0.02 * x


def _save_nifti(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return str(path)


def _write_dicom_series(folder, volume, lps_affine, modality="MR", shuffle=True):
    """Write ``volume`` (cols, rows, slices) as a DICOM series whose LPS geometry is ``lps_affine`` (columns:
    direction x spacing of the column index, the row index and the slice index; translation: first slice's IPP).
    Files are written in shuffled order so the reader has to sort them by position."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m = np.asarray(lps_affine, float)
    col_dir, row_dir, slice_vec = m[:3, 0], m[:3, 1], m[:3, 2]
    dx, dy, dz = np.linalg.norm(col_dir), np.linalg.norm(row_dir), np.linalg.norm(slice_vec)
    iop = list(col_dir / dx) + list(row_dir / dy)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    arr = np.asarray(volume)
    order = np.random.default_rng(0).permutation(arr.shape[2]) if shuffle else range(arr.shape[2])
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"im{n:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.Modality, ds.SeriesNumber = "Phantom^Test", "0001", modality, 1
        ds.InstanceNumber = int(k) + 1
        ds.ImagePositionPatient = [float(v) for v in m[:3, 3] + k * slice_vec]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [float(dy), float(dx)]  # DICOM: row spacing (between rows), column spacing
        ds.SliceThickness = float(dz)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(arr[:, :, k].T.astype(np.uint16)).tobytes()  # (rows, cols)
        ds.save_as(str(folder / f"im{n:03d}.dcm"), enforce_file_format=True)
    return str(folder)


def _expected_series_affine(folder):
    """RAS affine of a DICOM series folder computed from its tags with pydicom (independently of ITK/MONAI). The
    slice axis is the normal of the image plane times the slice distance along it (an orthonormal direction matrix,
    as ITK builds it: a slice-to-slice shift within the plane, e.g. gantry tilt, is not represented)."""
    pydicom = pytest.importorskip("pydicom")
    slices = [pydicom.dcmread(str(f)) for f in sorted(Path(folder).iterdir())]
    iop = np.asarray(slices[0].ImageOrientationPatient, float)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    slices.sort(key=lambda s: float(np.dot(normal, np.asarray(s.ImagePositionPatient, float))))
    first, second = (np.asarray(s.ImagePositionPatient, float) for s in slices[:2])
    dr, dc = (float(v) for v in slices[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * dc, col_cos * dr, normal * np.dot(second - first,
                                                                                                   normal), first
    return LPS_TO_RAS @ lps, slices


def _workflow(config_file, **override):
    return ConfigWorkflow(workflow_type="infer", config_file=config_file, meta_file=str(CONFIGS / "metadata.json"),
                          logging_file=str(CONFIGS / "logging.conf"), bundle_root=str(BUNDLE_ROOT), **override)


def _run(config_file, **override):
    wf = _workflow(config_file, **override)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def _assert_same_grid(path, affine, shape):
    """A fused NIfTI lies on the reference grid: affine, qform, sform, shape, voxel sizes and axis codes, as nibabel
    and as ITK (through MONAI's ITKReader) read them."""
    from monai.transforms import LoadImage

    img = nib.load(str(path))
    assert img.shape == tuple(shape)
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)
    np.testing.assert_allclose(img.get_sform(), affine, atol=1e-4)
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-4)
    assert img.header["qform_code"] > 0 and img.header["sform_code"] > 0
    np.testing.assert_allclose(img.header.get_zooms(), np.linalg.norm(affine[:3, :3], axis=0), atol=1e-4)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(affine)
    itk_img = LoadImage(reader="ITKReader", image_only=True)(str(path))
    np.testing.assert_allclose(np.asarray(itk_img.affine), affine, atol=1e-3)
    assert tuple(itk_img.shape) == tuple(shape)
    return img


# ------------------------------------------------------------------------------------------------- DICOM reading
def test_synthetic_oblique_dicom_series_reads_in_ras(tmp_path):
    lps = _affine(_rotation(0.2, -0.15, 0.35), (1.2, 0.9, 3.0), (-12.0, 20.0, -7.5))
    vol = np.add.outer(np.add.outer(np.arange(14), 20 * np.arange(11)), 300 * np.arange(5)) + 50  # 14 x 11 x 5
    folder = _write_dicom_series(tmp_path / "MR_series", vol, lps)
    assert is_dicom_series(folder) and not is_dicom_series(tmp_path)

    expected, _ = _expected_series_affine(folder)
    np.testing.assert_allclose(expected, LPS_TO_RAS @ lps, atol=1e-4)  # the helper computes what was written
    d = LoadFusionPaird(spatial_dims=3)({"source_a": folder, "source_b": folder})
    a = d["source_a"]
    assert tuple(a.shape) == (1, 14, 11, 5)  # (columns, rows, slices): x along a row, y down the columns
    np.testing.assert_allclose(np.asarray(a.affine), expected, atol=1e-4)
    np.testing.assert_array_equal(a[0].numpy(), vol)  # sorted by position although written shuffled
    assert not d.get("source_b_resampled")


def test_real_dicom_series_from_nibabel(tmp_path):
    """nibabel ships two slices of a real (slightly oblique) Siemens series: read as one 256 x 256 x 2 volume whose
    affine follows from the tags."""
    folder = tmp_path / "dwi"
    folder.mkdir()
    for f in ("0.dcm", "1.dcm"):
        shutil.copy(NIB_DATA / f, folder / f)
    expected, slices = _expected_series_affine(folder)
    img = LoadFusionPaird(spatial_dims=3)({"source_a": str(folder), "source_b": str(folder)})["source_a"]
    assert tuple(img.shape) == (1, 256, 256, 2)
    np.testing.assert_allclose(np.asarray(img.affine), expected, atol=1e-3)
    ras_codes = nib.aff2axcodes(expected)
    assert ras_codes == ("L", "P", "S")  # LPS world of DICOM, expressed in MONAI's RAS affine
    np.testing.assert_array_equal(img[0, :, :, 0].numpy().T, slices[0].pixel_array.astype(np.float32))


def test_empty_or_non_dicom_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("not an image")
    for name in ("empty", "text"):
        with pytest.raises(FusionDataError, match="holds no DICOM files"):
            LoadFusionPaird(spatial_dims=3)({"source_a": str(tmp_path / name), "source_b": str(tmp_path / name)})


# --------------------------------------------------------------------------------------------- grids / resampling
@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz"])
def test_reoriented_copy_resamples_back_exactly(tmp_path, name):
    """nibabel's LAS anatomical and its oblique, anisotropic EPI: the same image stored in another voxel order
    (as_closest_canonical: RAS) is resampled back onto the original grid exactly."""
    img = nib.load(str(NIB_DATA / name))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = data[..., 0] if data.ndim == 4 else data
    a = _save_nifti(tmp_path / "a.nii.gz", data, img.affine)
    canon = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
    assert nib.aff2axcodes(canon.affine) != nib.aff2axcodes(img.affine)
    b = _save_nifti(tmp_path / "b_ras.nii.gz", canon.get_fdata(), canon.affine)
    d = LoadFusionPaird(spatial_dims=3)({"source_a": a, "source_b": b})
    assert d["source_b_resampled"]
    np.testing.assert_allclose(d["source_b"].numpy(), d["source_a"].numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(d["source_b"].affine), img.affine, atol=1e-5)


def test_oblique_anisotropic_mr_and_ras_ct_meet_in_world_space(tmp_path):
    """A function of world position sampled on an oblique, anisotropic LAS MR grid and on a RAS CT grid of other
    spacing and extent: after resampling, the CT equals the function on the MR grid (LPS/RAS, axis order and
    obliqueness all handled); where the CT does not reach, it takes its own minimum."""
    mr_aff = _affine(_rotation(0.25, 0.1, -0.4) @ np.diag([-1, 1, 1]), (1.3, 0.9, 3.2), (10.0, -8.0, -12.0))
    mr_shape = (20, 18, 9)
    ct_aff = _affine(np.eye(3), (2.0, 2.0, 2.0), (-40.0, -40.0, -40.0))
    ct_shape = (40, 40, 40)
    a = _save_nifti(tmp_path / "mr.nii.gz", _f(_world(mr_shape, mr_aff)), mr_aff)
    b = _save_nifti(tmp_path / "ct.nii.gz", _f(_world(ct_shape, ct_aff)), ct_aff)
    d = LoadFusionPaird(spatial_dims=3)({"source_a": a, "source_b": b})
    got, want = d["source_b"][0].numpy(), _f(_world(mr_shape, mr_aff))
    assert got.shape == mr_shape
    assert np.abs(got - want).max() < 0.06  # trilinear at 2 mm on a function of range ~5
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999

    # the CT covers only x >= 0: the rest is padded with the CT's minimum (air), not with 0
    half_aff = _affine(np.eye(3), (2.0, 2.0, 2.0), (0.0, -40.0, -40.0))
    half = _f(_world((20, 40, 40), half_aff)) - 10.0  # all values negative, as CT HU of air are
    c = _save_nifti(tmp_path / "half.nii.gz", half, half_aff)
    d = LoadFusionPaird(spatial_dims=3)({"source_a": a, "source_b": c})
    got = d["source_b"][0].numpy()
    x = _world(mr_shape, mr_aff)[0]
    outside, inside = x < -2.5, x > 2.5
    assert outside.any() and inside.any()
    np.testing.assert_allclose(got[outside], half.min(), atol=1e-4)
    assert np.abs(got[inside] - (want[inside] - 10.0)).max() < 0.06


def test_mni_template_pet_like_lands_on_anatomy(tmp_path):
    """nilearn's MNI152 templates: a grey-matter map at 2 mm RAS is resampled onto a 4 mm LAS T1 grid and equals
    the grey-matter map made directly on that grid."""
    import nilearn

    tdir = Path(nilearn.__file__).parent / "datasets" / "data"
    t1 = nib.load(str(tdir / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    gm = nib.load(str(tdir / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"))
    assert np.allclose(t1.affine, gm.affine)

    def block(img, k):  # k-mm block average of a 1 mm RAS volume, with its exact affine
        arr = torch.as_tensor(np.asarray(img.dataobj, dtype=np.float32))
        s = [n - n % k for n in arr.shape]
        arr = torch.nn.functional.avg_pool3d(arr[None, None, : s[0], : s[1], : s[2]], k)[0, 0].numpy()
        aff = img.affine @ np.array([[k, 0, 0, (k - 1) / 2], [0, k, 0, (k - 1) / 2], [0, 0, k, (k - 1) / 2],
                                     [0, 0, 0, 1]])
        return arr, aff

    t1_4, aff4 = block(t1, 4)
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = t1_4.shape[0] - 1
    las_aff = aff4 @ flip  # same world, x stored right-to-left (LAS)
    mr = _save_nifti(tmp_path / "t1_las.nii.gz", t1_4[::-1], las_aff)
    gm_2, aff2 = block(gm, 2)
    pet = _save_nifti(tmp_path / "gm_2mm.nii.gz", gm_2, aff2)
    d = LoadFusionPaird(spatial_dims=3)({"source_a": mr, "source_b": pet})
    assert nib.aff2axcodes(np.asarray(d["source_a"].affine)) == ("L", "A", "S")
    got = d["source_b"][0].numpy()
    truth = block(gm, 4)[0][::-1]  # each 4 mm voxel centre is the centre of 8 2 mm voxels: trilinear = their mean
    assert got.shape == t1_4.shape
    np.testing.assert_allclose(got, truth, rtol=0, atol=1e-3)
    assert np.abs(got - truth[::-1]).max() > 0.3  # the (near-symmetric) template mirrored would not match


def test_png_size_mismatch_is_still_an_error(tmp_path):
    from PIL import Image

    Image.fromarray((np.arange(12 * 10).reshape(12, 10) % 200).astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray((np.arange(14 * 10).reshape(14, 10) % 200).astype(np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(FusionDataError, match="size mismatch"):
        LoadFusionPaird()({"source_a": str(tmp_path / "a.png"), "source_b": str(tmp_path / "b.png")})


# ---------------------------------------------------------------------------------------------------- datalists
def test_folder_layout_with_dicom_series_and_nifti(tmp_path):
    root = tmp_path / "data"
    lps = _affine(np.eye(3), (2.0, 2.0, 4.0), (0.0, 0.0, 0.0))
    (root / "PET").mkdir(parents=True)
    for case in ("p1", "p2"):
        _write_dicom_series(root / "MRI" / case, np.random.default_rng(1).integers(1, 900, (8, 8, 3)), lps)
        _save_nifti(root / "PET" / f"{case}.nii.gz", np.random.default_rng(2).random((6, 6, 4)) + 0.1,
                    np.diag([3.0, 3, 3, 1]))
    items = build_datalist(root, "all", spatial_dims=3)
    assert [(it["name"], Path(it["source_a"]).name, Path(it["source_b"]).name) for it in items] == [
        ("PET-MRI_p1", "p1", "p1.nii.gz"), ("PET-MRI_p2", "p2", "p2.nii.gz")]
    assert Path(items[0]["source_a"]).is_dir()

    # a folder of 2D .dcm files (pydicom's real CT and MR test images) keeps meaning: a set of 2D images
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    flat = tmp_path / "flat"
    for mod, f in (("MRI", "MR_small.dcm"), ("CT", "CT_small.dcm")):
        (flat / "MRI_CT" / mod).mkdir(parents=True)
        shutil.copy(get_testdata_file(f), flat / "MRI_CT" / mod / "x.dcm")
    items = build_datalist(flat, "all", check=False)
    assert [(it["name"], Path(it["source_a"]).name) for it in items] == [("CT-MRI_x", "x.dcm")]
    assert pydicom.dcmread(items[0]["source_b"]).Modality == "CT"


# ------------------------------------------------------------------------------------- slice-wise / sliding window
def _tiny_overrides(method):
    return {
        "dran": {"features": 8},
        "mactfusion": {"features": [4, 8, 8], "large_kernel_size": 7},
        "msgfusion": {"features": 8},
        "bsafusion": {"hidden_size": 32, "reg_channels": [32, 16, 8, 4, 2, 1], "fusion_channels": [8, 8, 8, 8],
                      "pos_size": 32},
    }.get(method, {})


@pytest.mark.parametrize("method", ["average", "max", "laplacian_pyramid", "guided_filter", "dran", "mactfusion",
                                    "msgfusion", "bsafusion"])
def test_every_method_fuses_volumes_slice_by_slice(method):
    from scripts.methods import load_method_config

    cfg = load_method_config(BUNDLE_ROOT, method)
    net = build_network(cfg["network"], _tiny_overrides(method), spatial_dims=3, slicewise=True).eval()
    assert network_spatial_dims(net) == 2
    torch.manual_seed(0)
    aff = torch.diag(torch.tensor([0.9, 0.9, 4.0, 1.0], dtype=torch.float64))
    x = MetaTensor(torch.rand(1, 2, 20, 16, 5), affine=aff)
    mode = cfg.get("inference_mode", "fuse")
    inferer = VolumeInferer(mode=mode, sw_batch_size=2)
    with torch.no_grad():
        out = inferer(x, net)
        assert inferer.last_plan["kind"] == "slices" and inferer.last_plan["slice_axis"] == 2  # thick 4 mm axis
        fused = out["fused"] if isinstance(out, dict) else out
        assert tuple(fused.shape) == (1, 1, 20, 16, 5) and torch.isfinite(fused).all()
        for k in (0, 3):
            ref = net(x[..., k].as_tensor(), mode=mode)
            ref = ref["fused"] if isinstance(ref, dict) else ref
            torch.testing.assert_close(fused[..., k].as_tensor(), ref, atol=2e-5, rtol=1e-4)
    if method == "bsafusion":  # in-plane fields stitched into a valid 3D field (zero across the slices)
        assert tuple(out["ddf"].shape) == (1, 3, 20, 16, 5) and float(out["ddf"][:, 2].abs().max()) == 0.0
        assert tuple(out["aligned"].shape) == (1, 1, 20, 16, 5) and "logits_fixed" not in out


def test_slice_axis_and_in_plane_windows():
    from scripts.networks import DRAN

    torch.manual_seed(0)
    net = DRAN(features=8).eval()
    x = torch.rand(1, 2, 6, 24, 20)
    with torch.no_grad():
        out = VolumeInferer(slice_axis=0, sw_batch_size=4)(x, net)
        ref = torch.stack([net(x[:, :, i]) for i in range(6)], 2)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        # anisotropic affine: 'auto' slices across the axis with the largest spacing
        mt = MetaTensor(x, affine=torch.diag(torch.tensor([5.0, 1.0, 1.0, 1.0], dtype=torch.float64)))
        assert VolumeInferer().resolve_slice_axis(mt) == 0
        assert VolumeInferer().resolve_slice_axis(torch.rand(1, 2, 4, 4, 4)) == 2  # no geometry: the last axis
    from scripts.networks import MaxFusion  # pixel-wise: windows cannot change the result

    with torch.no_grad():
        win = VolumeInferer(slice_axis=0, roi_size=[8, 8], sw_batch_size=3)
        torch.testing.assert_close(win(x, MaxFusion()), x.amax(1, keepdim=True))
        assert win.last_plan == {"kind": "slices", "slice_axis": 0, "roi_size": [8, 8]}


def test_sliding_window_bounds_what_the_network_sees():
    """Native 3D with roi_size: the network never sees more than sw_batch_size windows of roi_size."""
    from scripts.networks import AverageFusion, DRAN

    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.spatial_dims = net, 3

        def forward(self, x, mode="fuse"):
            seen.append(tuple(x.shape))
            return self.net(x, mode=mode)

    torch.manual_seed(0)
    x = torch.rand(1, 2, 40, 36, 24)
    with torch.no_grad():
        out = VolumeInferer(roi_size=[16, 16, 16], sw_batch_size=2, overlap=0.25)(x, Spy(AverageFusion(spatial_dims=3)))
    torch.testing.assert_close(out, x.mean(1, keepdim=True), atol=1e-6, rtol=0)
    assert len(seen) > 4 and all(s[0] <= 2 and s[2:] == (16, 16, 16) for s in seen)
    net = DRAN(spatial_dims=3, features=4).eval()
    with torch.no_grad():
        whole = VolumeInferer()(x, net)
        windows = VolumeInferer(roi_size=[24, 24, 24], sw_batch_size=1)(x, net)
    assert whole.shape == windows.shape == (1, 1, 40, 36, 24)
    assert torch.corrcoef(torch.stack([whole.flatten(), windows.flatten()]))[0, 1] > 0.9


def test_build_network_picks_native_3d_or_slices(tmp_path):
    from scripts.methods import load_method_config
    from scripts.networks import DRAN

    dran = load_method_config(BUNDLE_ROOT, "dran")["network"]
    assert network_spatial_dims(build_network(dran, {"features": 4}, spatial_dims=3)) == 3
    assert network_spatial_dims(build_network(dran, {"features": 4}, spatial_dims=2)) == 2
    torch.save(DRAN(features=4).state_dict(), tmp_path / "w2d.pt")
    torch.save(DRAN(spatial_dims=3, features=4).state_dict(), tmp_path / "w3d.pt")
    assert checkpoint_spatial_dims(tmp_path / "w2d.pt") == 2 and checkpoint_spatial_dims(tmp_path / "w3d.pt") == 3
    # 2D weights meeting a volume: the 2D network, slice by slice (auto); forcing native 3D is a clear error
    assert network_spatial_dims(build_network(dran, {"features": 4}, 3, "auto", tmp_path / "w2d.pt")) == 2
    assert network_spatial_dims(build_network(dran, {"features": 4}, 3, "auto", tmp_path / "w3d.pt")) == 3
    with pytest.raises(ValueError, match="holds 2D weights"):
        build_network(dran, {"features": 4}, 3, "false", tmp_path / "w2d.pt")
    with pytest.raises(ValueError, match="holds 3D weights"):
        build_network(dran, {"features": 4}, 3, True, tmp_path / "w3d.pt")
    bsa = load_method_config(BUNDLE_ROOT, "bsafusion")["network"]
    small = _tiny_overrides("bsafusion")
    assert network_spatial_dims(build_network(bsa, small, spatial_dims=3)) == 3  # native 3D without 2D weights
    with pytest.raises(ValueError, match="cannot be built in 3D"):  # a 3D build that fails is named as such
        build_network(bsa, {**small, "fusion_channels": [8, 8, 8]}, spatial_dims=3, slicewise=False)
    for method in ("mactfusion", "msgfusion", "average", "guided_filter"):  # these have a native 3D form
        cfg = load_method_config(BUNDLE_ROOT, method)["network"]
        assert network_spatial_dims(build_network(cfg, _tiny_overrides(method), spatial_dims=3)) == 3


# ------------------------------------------------------------------------------------------------- workflows
@pytest.fixture(scope="module")
def volume_dataset(tmp_path_factory):
    """A datalist of two pairs on different grids: an oblique anisotropic LAS NIfTI MR with a RAS PET, and an
    oblique DICOM MR series (LPS) with a NIfTI CT."""
    root = tmp_path_factory.mktemp("volumes")
    mr_aff = _affine(_rotation(0.2, 0.0, 0.3) @ np.diag([-1, 1, 1]), (1.5, 1.1, 3.0), (5.0, -10.0, -6.0))
    mr_shape = (24, 20, 8)
    _save_nifti(root / "mr.nii.gz", _f(_world(mr_shape, mr_aff)) * 100, mr_aff)
    pet_aff = _affine(np.eye(3), (3.0, 3.0, 3.0), (-45.0, -45.0, -45.0))
    _save_nifti(root / "pet.nii.gz", np.cos(_world((30, 30, 30), pet_aff)[1] * 0.07) + 1.5, pet_aff)
    lps = _affine(_rotation(-0.1, 0.2, 0.0), (1.4, 1.0, 2.5), (-15.0, -12.0, -8.0))
    ras = LPS_TO_RAS @ lps
    dcm_shape = (20, 16, 6)
    _write_dicom_series(root / "mr_dicom", np.round(_f(_world(dcm_shape, ras)) * 100), lps)
    _save_nifti(root / "ct.nii.gz", _f(_world((30, 30, 30), pet_aff)) * 100 - 1000, pet_aff)
    datalist = {"testing": [
        {"name": "nifti_pair", "source_a": "mr.nii.gz", "source_b": "pet.nii.gz", "modality_a": "MRI",
         "modality_b": "PET"},
        {"name": "dicom_pair", "source_a": "mr_dicom", "source_b": "ct.nii.gz", "modality_a": "MRI",
         "modality_b": "CT"},
    ]}
    (root / "datalist.json").write_text(json.dumps(datalist))
    return {"root": root, "nifti": (mr_aff, mr_shape), "dicom": (ras, dcm_shape)}


def test_inference_writes_fused_nifti_on_the_mr_grid(volume_dataset, tmp_path):
    root = volume_dataset["root"]
    _run(str(CONFIGS / "inference.json"), dataset_dir=str(root / "datalist.json"), output_dir=str(tmp_path),
         method="average", spatial_dims=3, dicom_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dicom_pair_fused.nii.gz", "dicom_pair_fused_dicom", "nifti_pair_fused.nii.gz"]  # DICOM out for a DICOM MR
    for name in ("nifti", "dicom"):
        affine, shape = volume_dataset[name]
        img = _assert_same_grid(tmp_path / f"{name}_pair_fused.nii.gz", affine, shape)
        fused = img.get_fdata()
        if name == "dicom":  # the average of the two min-max scaled sources, the CT resampled onto the MR
            d = LoadFusionPaird(spatial_dims=3)({"source_a": str(root / "mr_dicom"),
                                                 "source_b": str(root / "ct.nii.gz")})
            norm = [(v - v.min()) / (v.max() - v.min()) for v in (d["source_a"][0].numpy(), d["source_b"][0].numpy())]
            np.testing.assert_allclose(fused, (norm[0] + norm[1]) / 2, atol=1e-5)
            # CT and MR hold the same function of world position: the resampled CT lines up with the DICOM MR
            assert np.corrcoef(norm[0].ravel(), norm[1].ravel())[0, 1] > 0.99
            # the derived DICOM series: same grid as the MR series, the fused values (12 bit), a new series
            pydicom = pytest.importorskip("pydicom")
            out = tmp_path / "dicom_pair_fused_dicom"
            back = LoadFusionPaird(spatial_dims=3)({"source_a": str(out), "source_b": str(out)})["source_a"]
            np.testing.assert_allclose(np.asarray(back.affine), affine, atol=1e-3)
            np.testing.assert_allclose(back[0].numpy(), fused, atol=0.5 / 4095 + 1e-6)
            src = pydicom.dcmread(next((root / "mr_dicom").iterdir()))
            written = [pydicom.dcmread(f) for f in sorted(out.iterdir())]
            assert len(written) == shape[2] and len({w.SOPInstanceUID for w in written}) == shape[2]
            assert {w.SeriesInstanceUID for w in written} != {src.SeriesInstanceUID}
            assert {w.StudyInstanceUID for w in written} == {src.StudyInstanceUID}
            assert written[0].ImageType[:2] == ["DERIVED", "SECONDARY"]


def test_slicewise_inference_with_2d_weights_and_3d_training(volume_dataset, tmp_path):
    """2D DRAN weights on volumes: slice by slice (automatic); then 3D training (train_3d.json) on NIfTI volumes
    and native 3D inference (inference_3d.json); both write the fused volume on the MR grid."""
    from scripts.networks import DRAN

    root = volume_dataset["root"]
    torch.manual_seed(0)
    torch.save(DRAN(features=4).state_dict(), tmp_path / "dran2d.pt")
    wf = _run(str(CONFIGS / "inference.json"), dataset_dir=str(root / "datalist.json"), output_dir=str(tmp_path / "o2"),
              method="dran", spatial_dims=3, ckpt_path=str(tmp_path / "dran2d.pt"), network_overrides={"features": 4})
    assert network_spatial_dims(wf.parser.get_parsed_content("network")) == 2
    assert wf.parser.get_parsed_content("inferer").last_plan["kind"] == "slices"
    for name in ("nifti", "dicom"):
        _assert_same_grid(tmp_path / "o2" / f"{name}_pair_fused.nii.gz", *volume_dataset[name])

    # a tiny 3D dataset in the layout of the embedded one (datalist_3d.json), all on one grid
    data = tmp_path / "train3d"
    data.mkdir()
    aff = _affine(np.eye(3), (2.0, 2.0, 2.0), (-20.0, -20.0, -20.0))
    rng = np.random.default_rng(0)
    items = []
    for i in range(4):
        p = _world((20, 20, 20), aff) + rng.normal(0, 3, (3, 1, 1, 1))
        _save_nifti(data / f"t1_{i}.nii.gz", _f(p), aff)
        _save_nifti(data / f"ct_{i}.nii.gz", (np.linalg.norm(p, axis=0) < 12 + i) + 0.1 * _f(p), aff)
        items.append({"name": f"s{i}", "source_a": f"t1_{i}.nii.gz", "source_b": f"ct_{i}.nii.gz", "pair": "CT-MRI"})
    (data / "datalist_3d.json").write_text(json.dumps({"training": items[:3], "validation": items[3:]}))
    train = ConfigWorkflow(
        workflow_type="train", config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "train_3d.json")],
        meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(BUNDLE_ROOT), dataset_dir=str(data), output_dir=str(tmp_path / "run3d"), epochs=1,
        batch_size=2, patch_size=[16, 16, 16], val_roi_size=[16, 16, 16], network_overrides={"features": 4})
    train.initialize()
    train.run()
    train.finalize()
    assert checkpoint_spatial_dims(tmp_path / "run3d" / "model.pt") == 3
    wf = _run([str(CONFIGS / "inference.json"), str(CONFIGS / "inference_3d.json")],
              dataset_dir=str(root / "datalist.json"), output_dir=str(tmp_path / "o3"),
              ckpt_path=str(tmp_path / "run3d" / "model.pt"), network_overrides={"features": 4})
    assert network_spatial_dims(wf.parser.get_parsed_content("network")) == 3
    for name in ("nifti", "dicom"):
        _assert_same_grid(tmp_path / "o3" / f"{name}_pair_fused.nii.gz", *volume_dataset[name])


def test_cli_fuses_a_dicom_series_folder_pair(volume_dataset, tmp_path):
    """The README command on a paired-folder dataset: MRI/<case>/ DICOM series + CT/<case>.nii.gz."""
    root = volume_dataset["root"]
    data = tmp_path / "data"
    shutil.copytree(root / "mr_dicom", data / "MRI" / "case1")
    (data / "CT").mkdir()
    shutil.copy(root / "ct.nii.gz", data / "CT" / "case1.nii.gz")
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
        "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
        "--method", "laplacian_pyramid", "--spatial_dims", "3", "--dataset_dir", str(data),
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "nvImageCodec" not in res.stderr  # MONAI's GPU DICOM codec notice is silenced
    _assert_same_grid(tmp_path / "out" / "CT-MRI_case1_fused.nii.gz", *volume_dataset["dicom"])


def test_networks_get_plain_tensors_and_outputs_keep_the_batch_metadata():
    """A collated MetaTensor batch: the network sees a plain tensor (MACTFusion's blocked token MLP cannot slice a
    batched MetaTensor), the output carries the batch's metadata as before."""
    from monai.data import decollate_batch, list_data_collate

    from scripts.networks import MACTFusion

    aff = torch.diag(torch.tensor([0.8, 0.8, 2.0, 1.0], dtype=torch.float64))
    batch = list_data_collate([{"image": MetaTensor(torch.rand(2, 72, 72), affine=aff,
                                                    meta={"filename_or_obj": "mr.nii.gz"})}])["image"]
    net = MACTFusion(features=[4, 8, 8], large_kernel_size=7).eval()  # 72 x 72 = 5184 tokens > one MLP block
    with torch.no_grad():
        out = VolumeInferer()(batch, net)
    assert isinstance(out, MetaTensor) and tuple(out.shape) == (1, 1, 72, 72)
    item = decollate_batch({"pred": out})[0]["pred"]
    torch.testing.assert_close(item.affine, aff)
    assert item.meta["filename_or_obj"] == "mr.nii.gz"


def test_bsafusion_registers_volumes_slice_by_slice(volume_dataset, tmp_path):
    """The 2D-only registration method on volumes: fused, aligned and field volumes on the MR grid; the field has a
    zero component across the slices."""
    from scripts.methods import build, load_method_config

    root = volume_dataset["root"]
    torch.manual_seed(0)
    net = build(load_method_config(BUNDLE_ROOT, "bsafusion")["network"], _tiny_overrides("bsafusion"))
    torch.save(net.state_dict(), tmp_path / "bsa.pt")
    out = tmp_path / "out"
    _run(str(CONFIGS / "inference.json"), dataset_dir=str(root / "datalist.json"), output_dir=str(out),
         method="bsafusion", spatial_dims=3, ckpt_path=str(tmp_path / "bsa.pt"),
         network_overrides=_tiny_overrides("bsafusion"))
    for name in ("nifti", "dicom"):
        affine, shape = volume_dataset[name]
        _assert_same_grid(out / f"{name}_pair_fused.nii.gz", affine, shape)
        _assert_same_grid(out / f"{name}_pair_aligned.nii.gz", affine, shape)
        ddf = nib.load(str(out / f"{name}_pair_ddf.nii.gz"))
        np.testing.assert_allclose(ddf.affine, affine, atol=1e-4)
        field = np.asarray(ddf.dataobj).reshape(*shape, 3)
        assert np.abs(field[..., :2]).max() > 0 and np.abs(field[..., 2]).max() == 0  # slices along the last axis
        assert tuple(torch.load(out / f"{name}_pair_ddf.pt", weights_only=True)["ddf"].shape) == (3, *shape)
