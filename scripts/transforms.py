"""Dictionary transforms for loading, checking, colour-splitting and saving multimodal fusion pairs.

A pair is two co-registered (or, for registration methods, roughly aligned) images of one anatomy:

- ``source_a``: the structural image, MRI (T1/T2); the fixed image of registration methods;
- ``source_b``: the other modality, CT, PET or SPECT (grey or pseudo-colour), or a second MR contrast.

The networks fuse grey intensities. A colour source is split into luminance (fused) and chroma (kept aside as
``<key>_chroma``, 0..255) with the full-range BT.601 YCbCr transform that PIL and the official fusion codes use;
:class:`MergeColourd` puts the chroma back around the fused luminance.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform

__all__ = [
    "FusionDataError",
    "rgb_to_ycbcr",
    "ycbcr_to_rgb",
    "LoadFusionPaird",
    "MergeColourd",
    "SaveFusedd",
]

SOURCE_KEYS = ("source_a", "source_b")

# With pydicom installed, every LoadImage() also builds MONAI's GPU (nvImageCodec) DICOM reader, which logs that
# the GPU codec is absent each time. DICOM series are read by ITK here; that reader is never used.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")


class FusionDataError(ValueError):
    """A fusion input is unusable; the message names the file and the problem."""


# Full-range BT.601 (JFIF) as used by PIL ``convert('YCbCr')``; inputs and outputs on the 0..255 scale.
_RGB2YCC = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=torch.float64
)
_YCC2RGB = torch.linalg.inv(_RGB2YCC)
_CHROMA_OFFSET = 128.0


def _apply_colour_matrix(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Multiply the channel axis (dim 0) of a (3, *spatial) tensor by ``matrix``."""
    flat = x.reshape(3, -1).to(torch.float64)
    return (matrix @ flat).reshape(x.shape).to(x.dtype if x.is_floating_point() else torch.float32)


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """(3, *spatial) RGB in 0..255 -> (3, *spatial) YCbCr in 0..255 (chroma centred on 128)."""
    ycc = _apply_colour_matrix(torch.as_tensor(rgb), _RGB2YCC)
    ycc[1:] += _CHROMA_OFFSET
    return ycc


def ycbcr_to_rgb(ycc: torch.Tensor) -> torch.Tensor:
    """(3, *spatial) YCbCr in 0..255 -> (3, *spatial) RGB in 0..255 (not clipped)."""
    ycc = torch.as_tensor(ycc).clone().to(torch.float32)
    ycc[1:] -= _CHROMA_OFFSET
    return _apply_colour_matrix(ycc, _YCC2RGB)


def _pil_standard_mode(img):
    """PIL image -> grey / grey+alpha / RGB / RGBA as displayed: a palette PNG holds colour *indices* (its pixels
    are not intensities), a CMYK/YCbCr/LAB/HSV JPEG has 3-4 channels that are not RGB(A), bilevel is 0/1."""
    mode = img.mode
    if mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode in ("PA", "RGBa"):
        return img.convert("RGBA")
    if mode == "La":
        return img.convert("LA")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    if mode == "1":
        return img.convert("L")
    return img


def _read_error_reason(e: BaseException) -> str:
    """One line out of MONAI's LoadImage error, which holds a traceback per reader it tried: the first reader's
    final ``SomeError: message`` line (e.g. PIL's 'cannot identify image file')."""
    import re

    text = str(e)
    found = re.findall(r"^([A-Za-z_][\w.]*(?:Error|Exception|Warning)): (.+)$", text, flags=re.M)
    if found:
        reasons = []
        for name, msg in found:
            r = f"{name.rsplit('.', 1)[-1]}: {msg.strip()}"
            if r not in reasons:
                reasons.append(r)
        reason = "; ".join(reasons[:2])
    else:
        reason = f"{type(e).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"
    return reason[:300]


def _describe(path) -> str:
    return str(path) if path is not None else "<in-memory image>"


class LoadFusionPaird(MapTransform):
    """Load and check the two sources of a fusion pair.

    Accepts any of these input dictionaries (the first three are what the datalist readers produce; the last is
    what MONAI Label sends):

    - ``{"source_a": path, "source_b": path, ...}``
    - ``{"image": [path_a, path_b], ...}``
    - ``{"image": path}`` to one file holding the two sources as channels.

    and returns ``source_a`` / ``source_b`` as (1, *spatial) float MetaTensors (geometry from the file), plus
    ``<key>_chroma`` (2, *spatial), 0..255, for a colour source. Every problem raises :class:`FusionDataError`
    naming the file: unreadable/empty/non-image files, a channel count other than 1 (grey), 2 (grey+alpha),
    3 (RGB) or 4 (RGBA), NaN/Inf, a constant image (e.g. all zeros), and a size mismatch between the sources.

    Args:
        keys: the two source keys, structural first.
        reader: passed to :class:`monai.transforms.LoadImage` (``None`` picks by file type: PIL for PNG/JPEG,
            nibabel for NIfTI, ITK for DICOM series and other formats).
        image_key: key of the alternative ``image`` input forms.
        allow_constant: accept constant images (for inference on odd data; training rejects them).
        spatial_dims: the workflow's dimensionality: trailing size-1 axes beyond it are dropped (a one-slice DICOM or
            NIfTI is 2D), any other mismatch (a volume given to a 2D workflow) raises a clear error. ``None``: no check.
        resample: when both sources are volumes with a world geometry (NIfTI, DICOM series folders, MHA/NRRD;
            not in 2D workflows) and their voxel grids differ (size, spacing, orientation, origin), resample
            ``source_b`` onto ``source_a``'s grid (:func:`scripts.volumes.resample_to_reference`: trilinear, its own
            minimum outside its field of view) instead of failing with a size mismatch. ``source_b_resampled`` says
            whether it was (set for such pairs only).

    A path may be a DICOM series folder (read by ITK as one volume, LPS converted to MONAI's RAS affine).
    """

    def __init__(
        self,
        keys: KeysCollection = SOURCE_KEYS,
        reader=None,
        image_key: str = "image",
        allow_constant: bool = False,
        spatial_dims: int | None = None,
        resample: bool = True,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"LoadFusionPaird needs exactly two source keys, got {self.keys}.")
        self.loader = LoadImage(reader=reader, image_only=True, ensure_channel_first=True)
        from monai.data import PILReader

        for r in self.loader.readers:  # palette/CMYK/bilevel PNG/JPEG/TIFF converted to what they show
            if isinstance(r, PILReader) and r.converter is None:
                r.converter = _pil_standard_mode
        self.image_key = image_key
        self.allow_constant = allow_constant
        self.spatial_dims = None if spatial_dims is None else int(spatial_dims)
        self.resample = bool(resample)

    def _read(self, path) -> MetaTensor:
        if isinstance(path, torch.Tensor | np.ndarray):
            img = torch.as_tensor(path)
            return img if isinstance(img, MetaTensor) else MetaTensor(img)
        p = Path(path)
        if not p.exists():
            raise FusionDataError(f"{p}: file not found.")
        if p.is_file() and p.stat().st_size == 0:
            raise FusionDataError(f"{p}: file is empty (0 bytes).")
        if p.is_dir():
            from scripts.volumes import is_dicom_series

            if not is_dicom_series(p):
                raise FusionDataError(f"{p}: a folder is read as one DICOM series, but it holds no DICOM files.")
        try:
            return self.loader(str(p))
        except Exception as e:  # every reader fails differently on corrupt or non-image files
            raise FusionDataError(f"{p}: cannot read as an image ({_read_error_reason(e)}).") from e

    def _to_grey(self, img: MetaTensor, path, key: Hashable, d: dict) -> MetaTensor:
        c = img.shape[0]
        if c in (2, 4):  # drop alpha
            img, c = img[: c - 1], c - 1
        if c == 3:
            if torch.equal(img[0], img[1]) and torch.equal(img[0], img[2]):
                return img[:1]
            scale = 255.0 / float(img.max()) if float(img.max()) > 255.0 else 1.0  # 16-bit colour
            ycc = rgb_to_ycbcr(img.as_tensor() * scale)
            d[f"{key}_chroma"] = ycc[1:]
            return MetaTensor(ycc[:1], meta=img.meta)
        if c != 1:
            raise FusionDataError(
                f"{_describe(path)}: {c} channels; expected 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA)."
            )
        return img

    def _match_dims(self, img: MetaTensor, path) -> MetaTensor:
        if self.spatial_dims is None:
            return img
        squeezed = False
        while img.ndim - 1 > self.spatial_dims and img.shape[-1] == 1:
            img, squeezed = img[..., 0], True
        if squeezed and isinstance(img, MetaTensor):
            # keep the metadata's shape in step with the tensor (consumers such as MONAI's Restored resize to it)
            img.meta["spatial_shape"] = np.asarray(img.shape[1:])
        if img.ndim - 1 != self.spatial_dims:
            raise FusionDataError(
                f"{_describe(path)}: {img.ndim - 1}D image of size {tuple(img.shape[1:])} in a {self.spatial_dims}D "
                f"workflow; use --spatial_dims {img.ndim - 1} or give {self.spatial_dims}D images."
            )
        return img

    def _check_finite(self, img: torch.Tensor, path) -> None:
        """NaN/Inf, and a value range too wide for float32 arithmetic (intensity scaling would overflow)."""
        if img.numel() == 0:
            raise FusionDataError(f"{_describe(path)}: image has no pixels (size {tuple(img.shape[1:])}).")
        finite = torch.isfinite(img)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(img).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise FusionDataError(
                f"{_describe(path)}: contains {n_nan} NaN and {n_inf} Inf values"
                + (" (values beyond +-3.4e38 are Inf in float32)" if n_inf else "") + "."
            )
        lo, hi = img.min().float(), img.max().float()
        if not bool(torch.isfinite(hi - lo)):
            raise FusionDataError(
                f"{_describe(path)}: value range [{float(lo):g}, {float(hi):g}] is too wide for float32 "
                "arithmetic; rescale the image."
            )

    def _on_grid_of(self, img: MetaTensor, ref: MetaTensor, path, d: dict) -> MetaTensor:
        """``img`` resampled onto ``ref``'s voxel grid when both have a world geometry that differs."""
        from scripts.volumes import grids_differ, has_geometry, resample_to_reference

        volumes = img.ndim == ref.ndim == 4 and min(img.shape[1:]) > 1 and min(ref.shape[1:]) > 1
        if not (self.resample and self.spatial_dims != 2 and volumes and has_geometry(img) and has_geometry(ref)):
            return img  # 2D images (one-slice NIfTI/DICOM included) are fused pixel by pixel, as before
        d[f"{self.keys[1]}_resampled"] = grids_differ(img, ref)
        if not d[f"{self.keys[1]}_resampled"]:
            return img
        self._check_finite(img, path)  # NaN/Inf would spread through the interpolation: name the file first
        return resample_to_reference(img, ref)

    def _check_values(self, img: torch.Tensor, path) -> None:
        finite = torch.isfinite(img)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(img).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise FusionDataError(f"{_describe(path)}: contains {n_nan} NaN and {n_inf} Inf values.")
        lo, hi = float(img.min()), float(img.max())
        if lo == hi and not self.allow_constant:
            raise FusionDataError(f"{_describe(path)}: image is constant (every value is {lo:g}); nothing to fuse.")

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        key_a, key_b = self.keys
        if key_a in d and key_b in d:
            paths = [d[key_a], d[key_b]]
            images = [self._read(p) for p in paths]
        elif self.image_key in d:
            src = d[self.image_key]
            if isinstance(src, str | os.PathLike):
                both = self._read(src)
                if both.shape[0] != 2:
                    raise FusionDataError(
                        f"{src}: {both.shape[0]} channels; a single-file pair must hold exactly 2 (structural, other)."
                    )
                paths, images = [src, src], [both[:1], both[1:]]
            elif isinstance(src, Sequence) and len(src) == 2:
                paths = list(src)
                images = [self._read(p) for p in paths]
            else:
                raise FusionDataError(f"'{self.image_key}' must be one 2-channel file or a list of two files.")
        else:
            raise FusionDataError(f"a pair needs '{key_a}' and '{key_b}' (or '{self.image_key}'); got {sorted(d)}.")

        images[1] = self._on_grid_of(images[1], images[0], paths[1], d)
        for key, path, img in zip(self.keys, paths, images):
            img = self._match_dims(img, path)
            self._check_finite(img, path)
            img = self._to_grey(img, path, key, d)
            self._check_values(img, path)
            d[key] = img.float()
        shape_a, shape_b = tuple(d[key_a].shape[1:]), tuple(d[key_b].shape[1:])
        if shape_a != shape_b:
            raise FusionDataError(
                f"size mismatch: {_describe(paths[0])} is {shape_a} but {_describe(paths[1])} is {shape_b}; "
                "resample the pair onto one grid first."
            )
        if not isinstance(d.get(self.image_key), torch.Tensor):
            d.pop(self.image_key, None)  # the file path(s); ConcatItemsd rebuilds ``image`` from the sources
        return d


class MergeColourd(MapTransform):
    """Rebuild an RGB image from a fused luminance and the chroma kept by :class:`LoadFusionPaird`.

    ``pred`` (1, *spatial) in [0, 1] becomes ``<output_key>`` (3, *spatial) in [0, 1]. The chroma comes from the
    first of ``chroma_keys`` present; with none (both sources grey) the output is grey RGB. As in the official
    codes, the fused luminance is used as it is (its per-image stretch is not undone).
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        chroma_keys: Sequence[str] = ("source_b_chroma", "source_a_chroma"),
        output_key: str = "pred_rgb",
    ) -> None:
        super().__init__(keys)
        self.chroma_keys = tuple(chroma_keys)
        self.output_key = output_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            y = torch.as_tensor(d[key]).detach().float().clamp(0, 1)[:1] * 255.0
            chroma = next((d[k] for k in self.chroma_keys if d.get(k) is not None), None)
            if chroma is None:
                rgb = y.repeat(3, *([1] * (y.ndim - 1))) / 255.0
            else:
                chroma = torch.as_tensor(chroma, device=y.device).float()
                if chroma.shape[1:] != y.shape[1:]:
                    raise FusionDataError(f"chroma {tuple(chroma.shape[1:])} and fused {tuple(y.shape[1:])} differ.")
                rgb = (ycbcr_to_rgb(torch.cat([y, chroma], 0)).clamp(0, 255).round() / 255.0).to(y.device)
            d[self.output_key] = MetaTensor(rgb, meta=getattr(d[key], "meta", {}))
        return d


def _nifti_codes(meta: Mapping) -> tuple[int, int]:
    """(qform, sform) codes for a fused NIfTI: the source NIfTI's (one set code used for both when only one is set),
    else 1 ('scanner': DICOM patient coordinates)."""
    try:
        q, s = int(meta.get("qform_code", 0) or 0), int(meta.get("sform_code", 0) or 0)
    except (TypeError, ValueError):
        q, s = 0, 0
    q, s = q or s or 1, s or q or 1
    return q, s


class SaveFusedd(MapTransform):
    """Write the fused grey (and colour) image of one pair, atomically, next to nothing of the inputs.

    PNG/JPEG/BMP/TIFF inputs give ``<output_dir>/<name>_fused.png`` (8-bit grey) and ``<name>_fused_rgb.png``;
    NIfTI/DICOM/other inputs give ``<name>_fused.nii.gz`` on the geometry (affine) of ``source_a`` (its voxel grid,
    spacing and orientation; sform and qform both set, with the source NIfTI's codes) and, for a 2D colour result,
    ``<name>_fused_rgb.png``. ``name`` comes from the datalist item (sanitised so it cannot leave
    ``output_dir``), else from the ``source_a`` file name. Raises if an output would replace an input file.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = "./fused",
        rgb_key: str | None = "pred_rgb",
        ref_key: str = "source_a",
        name_key: str = "name",
        output_ext: str | None = None,
    ) -> None:
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.rgb_key = rgb_key
        self.ref_key = ref_key
        self.name_key = name_key
        self.output_ext = output_ext

    def __call__(self, data: Mapping) -> dict:
        from scripts import io as fio

        d = dict(data)
        ref = d.get(self.ref_key)
        meta = dict(getattr(ref, "meta", {}) or {})
        src = meta.get("filename_or_obj") or ""
        name = fio.safe_name(d.get(self.name_key) or Path(str(src)).name or "pair")
        ext = self.output_ext or fio.output_extension(src)
        inputs = [m.get("filename_or_obj") for m in (getattr(d.get(k), "meta", {}) for k in SOURCE_KEYS)]
        written = []
        codes = _nifti_codes(meta)
        for key in self.key_iterator(d):
            grey = torch.as_tensor(d[key]).detach().float().cpu().clamp(0, 1)
            affine = getattr(ref, "affine", None)
            written.append(fio.write_image(grey, self.output_dir / f"{name}_fused{ext}", affine, protect=inputs,
                                           nifti_codes=codes))
            if self.rgb_key and self.rgb_key in d and grey.ndim == 3:
                rgb = torch.as_tensor(d[self.rgb_key]).detach().float().cpu()
                written.append(fio.write_image(rgb, self.output_dir / f"{name}_fused_rgb.png", None, protect=inputs))
        d["fused_files"] = [str(p) for p in written]
        return d


class MsgFusionVPrimed(MapTransform):
    """MsgFusion's modified brightness V' of the other modality, from its colour image when there is one.

    Place it right after :class:`LoadFusionPaird` (before any intensity scaling). For a colour source the RGB is
    rebuilt from ``source_b`` (Y) and ``source_b_chroma`` and V' is computed from it (the public code computes V'
    from the colour PET/SPECT file); for a grey source V' comes from the min-max scaled grey image, which is what
    :class:`scripts.networks.MsgFusion` computes itself from a 2-channel input. Writes ``output_key``
    (1, *spatial) in [0, 1]; concatenate it as the third ``image`` channel
    (``ConcatItemsd(keys=["source_a", "source_b", "v_prime"], name="image")``) to give the network the colour V'.

    Args:
        keys: the other modality's key (``source_b``).
        variant: ``"functional"`` (PET/SPECT) or ``"ct"``, as the network's ``variant``; ``"auto"`` picks
            ``"ct"`` when the item's ``modality_b`` is CT, else ``"functional"`` (the variant each model is
            trained for, see ``configs/methods/msgfusion.json``).
        output_key: where V' is stored.
    """

    def __init__(self, keys: KeysCollection = "source_b", variant: str = "functional",
                 output_key: str = "v_prime") -> None:
        if variant not in ("functional", "ct", "auto"):
            raise ValueError(f"variant must be 'functional', 'ct' or 'auto', got {variant!r}")
        super().__init__(keys)
        self.variant = variant
        self.output_key = output_key

    def __call__(self, data: Mapping) -> dict:
        from scripts.networks.msgfusion import msgfusion_v_prime

        d = dict(data)
        for key in self.key_iterator(d):
            y = torch.as_tensor(d[key]).float()
            chroma = d.get(f"{key}_chroma")
            if chroma is not None:
                img = ycbcr_to_rgb(torch.cat([y[:1], torch.as_tensor(chroma).float()], 0)).clamp(0, 255) / 255.0
            else:
                lo, hi = y.min(), y.max()
                img = (y[:1] - lo) / (hi - lo) if hi > lo else torch.zeros_like(y[:1])
            variant = self.variant
            if variant == "auto":
                variant = "ct" if str(d.get("modality_b", "")).upper() == "CT" else "functional"
            v = msgfusion_v_prime(img[None], variant)[0]
            d[self.output_key] = MetaTensor(v, meta=getattr(d[key], "meta", {})) if isinstance(d[key], MetaTensor) else v
        return d


__all__ += ["MsgFusionVPrimed"]
