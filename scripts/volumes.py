"""Volumes (NIfTI, DICOM series): geometry, slice-wise (2.5D) and sliding-window fusion.

- Geometry. :class:`scripts.transforms.LoadFusionPaird` reads NIfTI with nibabel and DICOM series (a folder of
  ``.dcm`` slices) with ITK, both into MONAI's RAS world affine (ITK's LPS is converted). When the two sources carry
  geometry (not PNG/JPEG) and their grids differ (size, spacing, orientation, origin, obliqueness), the CT/PET/SPECT
  is resampled onto the MRI's grid with :func:`resample_to_reference` (trilinear, MONAI ``ResampleToMatch``;
  outside its field of view it takes its own minimum, i.e. air/background). The fused image is then written as
  NIfTI with the MRI's affine (:class:`scripts.transforms.SaveFusedd`), so it overlays the MRI in any viewer.
- Networks. :func:`build_network` builds the method's network for the workflow's ``spatial_dims``: for volumes
  (``spatial_dims=3``) natively in 3D when the method supports it and no 2D-trained weights are given, otherwise
  as the 2D network, which :class:`VolumeInferer` then runs slice by slice (``--slicewise auto``, the default;
  ``true``/``false`` force it).
- Inference. :class:`VolumeInferer` calls the network on the whole input (2D images, or volumes with a 3D network)
  exactly as :class:`scripts.engine.FusionInferer` does, or, with ``roi_size``, through MONAI's
  :class:`~monai.inferers.SlidingWindowInferer` (3D windows) so that volumes larger than memory allows are fused
  window by window; for a 3D input and a 2D network it runs MONAI's :class:`~monai.inferers.SliceInferer`:
  ``sw_batch_size`` slices (or in-plane windows of ``roi_size``) at a time along ``slice_axis``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer

__all__ = [
    "DICOM_SUFFIXES",
    "is_dicom_file",
    "is_dicom_series",
    "has_geometry",
    "grids_differ",
    "resample_to_reference",
    "spacing_of",
    "network_spatial_dims",
    "checkpoint_spatial_dims",
    "build_network",
    "default_3d_overrides",
    "default_3d_checkpoint",
    "VolumeInferer",
    "write_dicom_series",
    "SaveFusedDicomd",
]

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SERIES_PROBE = 8  # files looked at to decide whether a folder is a DICOM series


# ----------------------------------------------------------------------------------------------------- files
def is_dicom_file(path) -> bool:
    """A ``.dcm``/``.dicom``/``.ima`` file, or any file with the DICOM preamble magic ``DICM`` at byte 128."""
    p = Path(path)
    if not p.is_file() or p.name.startswith("."):
        return False
    if p.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_series(path) -> bool:
    """A folder whose files are DICOM slices (one series; ITK reads it as one volume)."""
    p = Path(path)
    if not p.is_dir() or p.name.startswith("."):
        return False
    try:
        files = [f for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")]
    except OSError:
        return False
    return bool(files) and any(is_dicom_file(f) for f in files[:_SERIES_PROBE])


def has_geometry(img) -> bool:
    """Whether an image read by ``LoadImage`` carries a world geometry worth resampling on: NIfTI, DICOM, MHA,
    NRRD... (not PNG/JPEG/TIFF rasters, not in-memory arrays)."""
    meta = getattr(img, "meta", None) or {}
    src = str(meta.get("filename_or_obj") or "")
    return bool(src) and not src.lower().endswith(RASTER_SUFFIXES)


# -------------------------------------------------------------------------------------------------- geometry
def _affine(img) -> np.ndarray:
    aff = getattr(img, "affine", None)
    aff = np.eye(img.ndim) if aff is None else np.asarray(torch.as_tensor(aff).detach().cpu(), dtype=np.float64)
    return aff[0] if aff.ndim == 3 else aff  # a batch's affine is (B, 4, 4)


def spacing_of(img) -> np.ndarray:
    """Voxel sizes (mm) along each spatial axis: the column norms of the affine."""
    aff = _affine(img)
    r = aff.shape[0] - 1
    return np.linalg.norm(aff[:r, :r], axis=0)


def grids_differ(a, b, atol: float = 1e-3) -> bool:
    """Whether two channel-first images sit on different voxel grids (size or affine, ``atol`` in mm)."""
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        return True
    aa, ab = _affine(a), _affine(b)
    return aa.shape != ab.shape or not np.allclose(aa, ab, rtol=0, atol=atol)


def resample_to_reference(img, ref, mode: str = "bilinear"):
    """``img`` (C, *S) resampled onto the voxel grid of ``ref`` (its size and world affine), MONAI
    ``ResampleToMatch``. Voxels outside ``img``'s field of view take ``img``'s minimum (air for CT, zero uptake for
    PET), not 0, which for CT in Hounsfield units would be water. Returns a float32 MetaTensor with ``ref``'s affine
    (its other metadata, e.g. the file name, stay ``img``'s)."""
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    lo = float(torch.as_tensor(img).min())
    shifted = MetaTensor(torch.as_tensor(img).float() - lo, meta=dict(img.meta))
    ref_grid = MetaTensor(torch.zeros((1, *ref.shape[1:])), meta=dict(ref.meta))
    out = ResampleToMatch(mode=mode, padding_mode="zeros", dtype=torch.float64)(shifted, ref_grid)
    out = MetaTensor(out.as_tensor().float() + lo, meta=dict(img.meta))
    out.affine = torch.as_tensor(_affine(ref), dtype=torch.float64)
    out.meta["spatial_shape"] = np.asarray(ref.shape[1:])
    return out


# -------------------------------------------------------------------------------------------------- networks
def network_spatial_dims(network) -> int | None:
    """2 or 3: the network's ``spatial_dims`` attribute, else the kind of its first convolution."""
    net = getattr(network, "module", network)  # DistributedDataParallel / DataParallel
    dims = getattr(net, "spatial_dims", None)
    if dims in (2, 3):
        return int(dims)
    if isinstance(net, torch.nn.Module):
        for m in net.modules():
            if isinstance(m, torch.nn.Conv3d):
                return 3
            if isinstance(m, torch.nn.Conv2d):
                return 2
    return None


def checkpoint_spatial_dims(path) -> int | None:
    """3 if a weights file holds 5-D tensors (3D convolutions), 2 if it holds 4-D ones, ``None`` if neither or it
    cannot be read (the weights loader then reports the problem)."""
    if path is None or not Path(str(path)).is_file():
        return None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - the checkpoint loader gives the real error message
        return None
    if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    if not isinstance(sd, Mapping):
        return None
    ndims = {v.ndim for v in sd.values() if isinstance(v, torch.Tensor)}
    return 3 if 5 in ndims else 2 if 4 in ndims else None


def _flag(value) -> bool | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    from scripts.engine import as_bool

    return as_bool(value)


def build_network(component: dict, overrides: dict | None = None, spatial_dims: int = 2, slicewise="auto",
                  ckpt_path=None):
    """Build a method's network for a ``spatial_dims``-D workflow.

    2D workflows: the 2D network, as :func:`scripts.methods.build`. 3D workflows (volumes):

    - ``slicewise="auto"`` (default): the 2D network (fused slice by slice by :class:`VolumeInferer`) when
      ``ckpt_path`` holds 2D weights or the method has no 3D form; else the native 3D network (every method has
      one, BSAFusion included: its 3D defaults come from ``spatial_dims``);
    - ``slicewise=True``: always the 2D network (slice-wise; needs 2D weights);
    - ``slicewise=False``: the native 3D network (needs 3D weights; an error for 2D-only methods).
    """
    from scripts.methods import build

    spatial_dims = int(spatial_dims)
    if spatial_dims == 2:
        return build(component, overrides, spatial_dims=2)
    if spatial_dims != 3:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    mode = _flag(slicewise)
    ckpt_dims = checkpoint_spatial_dims(ckpt_path)
    target = str(component.get("_target_", "network")).rsplit(".", 1)[-1]
    if mode is True:
        if ckpt_dims == 3:
            raise ValueError(f"{ckpt_path}: holds 3D weights; slice-wise fusion (--slicewise true) needs a 2D model. "
                             "Use --slicewise false (or auto) with these weights.")
        logger.info("%s: 2D network, fused slice by slice (--slicewise true).", target)
        return build(component, overrides, spatial_dims=2)
    if mode is False:
        if ckpt_dims == 2:
            raise ValueError(f"{ckpt_path}: holds 2D weights; a native 3D network (--slicewise false) needs weights "
                             "trained in 3D (configs/train_3d.json). Use --slicewise auto or true with these weights.")
        try:
            return build(component, overrides, spatial_dims=3)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{target} cannot be built in 3D ({_root_message(e)}); use --slicewise true or auto "
                             "to fuse volumes slice by slice with the 2D network.") from e
    if ckpt_dims == 2:
        logger.info("%s: %s holds 2D weights; fusing volumes slice by slice.", target, ckpt_path)
        return build(component, overrides, spatial_dims=2)
    try:
        net = build(component, overrides, spatial_dims=3)
        logger.info("%s: native 3D network.", target)
        return net
    except Exception as e:  # noqa: BLE001
        if ckpt_dims == 3:
            raise
        logger.info("%s has no 3D form (%s); fusing volumes slice by slice.", target, _root_message(e))
        return build(component, overrides, spatial_dims=2)


def _root_message(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# CPU-sized 3D widths for configs/train_3d.json and configs/inference_3d.json (same values, so the weights load).
_3D_OVERRIDES = {
    "dran": {"features": 16},
    "mactfusion": {"features": [8, 16, 24], "window_size": 4, "large_kernel_size": 7, "fix_attention_scale": True},
    "msgfusion": {"features": 8},
}


def default_3d_checkpoint(bundle_root, method: str) -> str | None:
    """Weights of a natively 3D model: ``models/<method>_3d.pt``, else ``runs/<method>_3d/model.pt`` (or
    ``model_final.pt``), as written by ``configs/train_3d.json``; ``None`` for methods without weights."""
    from scripts.methods import load_method_config

    if not load_method_config(bundle_root, method)["trainable"]:
        return None
    root = Path(bundle_root)
    candidates = [root / "models" / f"{method}_3d.pt"] + [root / "runs" / f"{method}_3d" / n
                                                          for n in ("model.pt", "model_final.pt")]
    for c in candidates:
        if c.is_file():
            return str(c)
    raise FileNotFoundError(
        f"no 3D weights for method {method!r}: looked for {', '.join(map(str, candidates))}. Train first "
        "(python -m monai.bundle run training --config_file \"['configs/train.json','configs/train_3d.json']\" "
        f"--method {method}) or pass --ckpt_path <file>; for 2D weights use configs/inference.json --spatial_dims 3."
    )


def default_3d_overrides(method: str) -> dict:
    """Network overrides that make a method's 3D network CPU-sized (``{}`` for the others)."""
    return dict(_3D_OVERRIDES.get(str(method), {}))


# ------------------------------------------------------------------------------------------------- inference
def _spatial_outputs(out, ndim: int, slice_axis: int | None = None):
    """Keep what a sliding window can stitch: tensors with the input's rank (drop e.g. BSAFusion's modality logits).
    In slice-wise mode a 2-component in-plane displacement ``ddf`` gets a zero component for the slice axis, so the
    stitched field is a valid 3D MONAI field (voxels, channel order of the volume's axes)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        kept = {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and v.ndim == ndim}
        ddf = kept.get("ddf")
        if slice_axis is not None and ddf is not None and ddf.shape[1] == ndim - 2:
            zero = torch.zeros_like(ddf[:, :1])
            kept["ddf"] = torch.cat([ddf[:, :slice_axis], zero, ddf[:, slice_axis:]], 1)
        return kept
    return type(out)(v for v in out if isinstance(v, torch.Tensor) and v.ndim == ndim)


def _with_meta_of(out, inputs):
    """Outputs carry the input batch's MONAI metadata, as when the network is called on the MetaTensor itself."""
    from monai.data import MetaTensor
    from monai.utils import convert_to_dst_type

    if not isinstance(inputs, MetaTensor):
        return out
    if isinstance(out, torch.Tensor):
        return convert_to_dst_type(out, inputs, dtype=out.dtype)[0]
    if isinstance(out, Mapping):
        return {k: _with_meta_of(v, inputs) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_with_meta_of(v, inputs) for v in out)
    return out


def _roi(value, dims: int):
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, str):
        import ast

        value = ast.literal_eval(value)
    roi = [int(v) for v in (value if isinstance(value, Sequence) else [value] * dims)]
    if len(roi) != dims:
        raise ValueError(f"roi_size {roi} must have {dims} entries here (one per axis of each window).")
    return roi


class VolumeInferer(Inferer):
    """Fusion inferer for images and volumes; calls ``network(x, mode=mode)``.

    - input dims == network dims (2D images, or volumes with a 3D network): the network runs on the whole input
      (identical to :class:`scripts.engine.FusionInferer`), or with ``roi_size`` set through MONAI's
      :class:`~monai.inferers.SlidingWindowInferer` (windows of ``roi_size``, ``sw_batch_size`` at a time,
      ``overlap``, Gaussian blending), which bounds memory for large volumes;
    - 3D input, 2D network: slice-wise (2.5D) through MONAI's :class:`~monai.inferers.SliceInferer` along
      ``slice_axis``: ``sw_batch_size`` whole slices per network call (``roi_size`` 2D: in-plane windows instead).

    Args:
        mode: the network's mode (``"fuse"``; ``"full"`` for registration methods, whose dict outputs are stitched
            entry by entry).
        slice_axis: voxel axis (0, 1, 2) the slices are taken across, or ``"auto"``: the axis with the largest voxel
            spacing (the acquisition's slice direction for anisotropic scans), the last one on ties.
        roi_size: window size (2 entries slice-wise, else one per spatial axis; -1 = whole extent); ``None``: whole
            slices / the whole input.
        sw_batch_size: slices or windows per network call.
        overlap: window overlap (slice-wise along the slice axis there is none: each slice is fused once).
        blend_mode: ``"gaussian"`` or ``"constant"`` weighting of overlapping windows.
        stitch_device: where the output is assembled (e.g. ``"cpu"`` for a volume whose output does not fit on the
            GPU); ``None``: the input's device.
        progress: a progress bar over the windows.

    Note: rules that weigh the sources globally (DRAN's nuclear-norm rule) weigh them per slice / per window here.
    """

    def __init__(self, mode: str = "fuse", slice_axis="auto", roi_size=None, sw_batch_size: int = 4,
                 overlap: float = 0.25, blend_mode: str = "gaussian", stitch_device=None, progress=False) -> None:
        super().__init__()
        self.mode = mode
        self.slice_axis = slice_axis
        self.roi_size = roi_size
        self.sw_batch_size = max(1, int(sw_batch_size))
        self.overlap = float(overlap)
        self.blend_mode = blend_mode
        self.stitch_device = None if stitch_device in (None, "", "None", "null") else stitch_device
        from scripts.engine import as_bool

        self.progress = as_bool(progress)
        self.last_plan: dict = {}

    def resolve_slice_axis(self, inputs) -> int:
        if not (isinstance(self.slice_axis, str) and self.slice_axis.strip().lower() == "auto"):
            axis = int(self.slice_axis)
            if axis not in (0, 1, 2):
                raise ValueError(f"slice_axis must be 0, 1, 2 or 'auto', got {self.slice_axis!r}.")
            return axis
        sp = spacing_of(inputs) if getattr(inputs, "affine", None) is not None else np.ones(3)
        if sp.shape[0] != 3:
            return 2
        biggest = sp.max()
        return max(i for i in range(3) if sp[i] >= biggest * (1 - 1e-3))

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        out = self._infer(inputs, network, *args, **kwargs)
        return _with_meta_of(out, inputs)

    def _infer(self, inputs: torch.Tensor, network, *args, **kwargs):
        from scripts.engine import float32_outputs

        kwargs = {"mode": self.mode, **kwargs}

        def call(x):  # AMP outputs (float16) are stitched and post-processed in float32
            return float32_outputs(network(x, *args, **kwargs))

        in_dims, net_dims = inputs.ndim - 2, network_spatial_dims(network)
        # the networks get plain tensors (MONAI metadata means nothing to them; the geometry is read here)
        plain = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        if net_dims is None or in_dims == net_dims:
            roi = _roi(self.roi_size, in_dims)
            self.last_plan = {"kind": "whole" if roi is None else "windows", "roi_size": roi}
            if roi is None:
                return call(plain)
            sw = SlidingWindowInferer(roi, self.sw_batch_size, self.overlap, mode=self.blend_mode,
                                      device=self.stitch_device, progress=self.progress)
            return sw(plain, lambda x: _spatial_outputs(call(x), x.ndim))
        if in_dims == 3 and net_dims == 2:
            axis = self.resolve_slice_axis(inputs)
            roi = _roi(self.roi_size, 2)
            self.last_plan = {"kind": "slices", "slice_axis": axis, "roi_size": roi}
            si = SliceInferer(spatial_dim=axis, roi_size=roi or [-1, -1], sw_batch_size=self.sw_batch_size,
                              overlap=self.overlap, mode="constant" if roi is None else self.blend_mode,
                              device=self.stitch_device, progress=self.progress)
            return si(plain, lambda x: _spatial_outputs(call(x), x.ndim, axis))
        raise ValueError(f"a {in_dims}D input cannot be fused by a {net_dims}D network; use --spatial_dims {in_dims}.")


# ------------------------------------------------------------------------------------------------ DICOM output
def _series_files_in_volume_order(folder) -> list:
    """The slices of a DICOM series folder (pydicom datasets without pixels) in the order ITK stacks them: by
    position along the image-plane normal."""
    import pydicom

    slices = []
    for f in sorted(Path(folder).iterdir()):
        if is_dicom_file(f):
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
            if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
                slices.append(ds)
    if not slices:
        raise ValueError(f"{folder}: no DICOM slices with a position and orientation.")
    uids = {str(s.get("SeriesInstanceUID", "")) for s in slices}
    if len(uids) > 1:  # ITK reads the first series only; keep the same
        first = sorted(uids)[0]
        slices = [s for s in slices if str(s.get("SeriesInstanceUID", "")) == first]
    iop = np.asarray(slices[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(slices, key=lambda s: float(np.dot(normal, np.asarray(s.ImagePositionPatient, float))))


def write_dicom_series(fused, reference_folder, out_folder, description: str = "fused", protect=()) -> Path:
    """Write a fused volume (1, X, Y, Z) in [0, 1] on the grid of the DICOM series ``reference_folder`` as a derived
    DICOM series in ``out_folder``: one file per slice, the reference slice's header (patient, study, frame of
    reference, position, orientation, pixel spacing) with a new series and instance UIDs, ``ImageType``
    DERIVED\\SECONDARY, 12-bit pixels (0..4095; ``RescaleSlope`` 1/4095 gives back [0, 1]), uncompressed, private
    tags removed. Written to a temporary folder, then renamed. Classic single-frame series only."""
    import shutil
    import tempfile

    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    vol = torch.as_tensor(fused).detach().float().cpu().clamp(0, 1)
    vol = vol[0] if vol.ndim == 4 else vol
    slices = _series_files_in_volume_order(reference_folder)
    nx, ny, nz = vol.shape
    rows, cols = int(slices[0].Rows), int(slices[0].Columns)
    if len(slices) != nz or (cols, rows) != (nx, ny) or int(slices[0].get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError(f"{reference_folder}: {len(slices)} slices of {cols} x {rows} do not hold a "
                         f"{nx} x {ny} x {nz} volume (multi-frame and resampled outputs are written as NIfTI only).")
    out_folder = Path(out_folder)
    for p in protect:
        if p is not None and Path(str(p)).resolve() == out_folder.resolve():
            raise FileExistsError(f"refusing to overwrite input {p}; choose another output folder.")
    out_folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_folder.name[:50]}.", suffix=".tmp", dir=out_folder.parent))
    series_uid = generate_uid()
    pixels = (vol * 4095.0).round().to(torch.int32).numpy().astype(np.uint16)
    try:
        for k, ds in enumerate(slices):
            ds.remove_private_tags()
            for tag in ("LargestImagePixelValue", "SmallestImagePixelValue", "PixelPaddingValue",
                        "WindowCenterWidthExplanation", "LossyImageCompression", "NumberOfFrames"):
                if tag in ds:
                    delattr(ds, tag)
            sop_uid = generate_uid()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.SOPInstanceUID, ds.SeriesInstanceUID = sop_uid, series_uid
            ds.SeriesNumber = int(ds.get("SeriesNumber", 0) or 0) + 1000
            ds.SeriesDescription = str(description)[:64]
            ds.ImageType = ["DERIVED", "SECONDARY", "FUSION"]
            ds.DerivationDescription = "multimodal image fusion (MONAI bundle); values in [0, 1] via RescaleSlope"
            ds.InstanceNumber = k + 1
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, f"{1 / 4095:.10g}"[:16], "US"
            ds.WindowCenter, ds.WindowWidth = 2048, 4096
            ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()  # (rows, columns)
            ds["PixelData"].VR = "OW"
            ds.save_as(str(tmp / f"IM{k + 1:05d}.dcm"), enforce_file_format=True)
        if out_folder.exists():
            shutil.rmtree(out_folder)
        os.replace(tmp, out_folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_folder


class SaveFusedDicomd:
    """Postprocessing: when ``source_a`` (the MRI) is a DICOM series folder and the fused volume lies on its grid,
    also write ``<output_dir>/<name>_fused_dicom/`` (:func:`write_dicom_series`). Other pairs pass unchanged."""

    def __init__(self, keys="pred", output_dir="./fused", ref_key: str = "source_a", name_key: str = "name",
                 description: str = "fused") -> None:
        self.key = keys if isinstance(keys, str) else list(keys)[0]
        self.output_dir, self.ref_key, self.name_key = Path(output_dir), ref_key, name_key
        self.description = description

    def __call__(self, data: Mapping) -> dict:
        from scripts import io as fio

        d = dict(data)
        ref = d.get(self.ref_key)
        src = str((getattr(ref, "meta", {}) or {}).get("filename_or_obj") or "")
        if not src or not is_dicom_series(src) or torch.as_tensor(d[self.key]).ndim != 4:
            return d
        name = fio.safe_name(d.get(self.name_key) or Path(src).name)
        inputs = [(getattr(d.get(k), "meta", {}) or {}).get("filename_or_obj") for k in ("source_a", "source_b")]
        out = write_dicom_series(d[self.key], src, self.output_dir / f"{name}_fused_dicom", self.description, inputs)
        d["fused_files"] = list(d.get("fused_files", [])) + [str(out)]
        return d
