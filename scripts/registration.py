"""Registration side of unaligned fusion (BSAFusion): misalignment synthesis, field utilities, scores, outputs.

Fields are MONAI dense displacement fields (DDF): (2, *S) or (B, 2, *S) pull fields in pixels along the image
tensor's spatial axes, ``warped(p) = image(p + ddf(p))`` (:class:`monai.networks.blocks.Warp`). For PNGs read by
MONAI's PIL reader the first spatial axis is the image's x (column) axis.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

__all__ = [
    "warp", "invert_ddf", "jacobian_determinant", "folding_fraction", "registration_scores",
    "RandMisalignd", "SplitRegistrationd", "SaveRegistrationd", "grid_picture",
]


def _warp_layer(padding_mode: str = "border"):
    from monai.networks.blocks import Warp

    with warnings.catch_warnings():  # "using PyTorch native grid_sample": intended
        warnings.simplefilter("ignore")
        return Warp(mode="bilinear", padding_mode=padding_mode)


def warp(image: torch.Tensor, ddf: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Pull-warp (C, *S) or (B, C, *S) ``image`` with a (2, *S) / (B, 2, *S) DDF through MONAI ``Warp``."""
    batched = image.ndim == ddf.ndim and image.ndim == 4
    img, field = (image, ddf) if batched else (image[None], ddf[None])
    out = _warp_layer(padding_mode)(img.float(), field.float())
    return out if batched else out[0]


def invert_ddf(ddf: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Inverse of a smooth pull field by fixed-point iteration ``v(p) = -u(p + v(p))`` (exact for translations)."""
    u = ddf[None] if ddf.ndim == 3 else ddf
    v = -u
    for _ in range(iterations):
        v = -warp(u, v)
    return v[0] if ddf.ndim == 3 else v


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) of a 2D DDF (B, 2, H, W) or (2, H, W), central differences (one-sided at the borders)."""
    u = ddf[None] if ddf.ndim == 3 else ddf
    g0 = torch.gradient(u, dim=2)  # d/d axis0 of both components
    g1 = torch.gradient(u, dim=3)
    d00, d10 = 1 + g0[0][:, 0], g0[0][:, 1]  # d u0 / d x0, d u1 / d x0
    d01, d11 = g1[0][:, 0], 1 + g1[0][:, 1]
    det = d00 * d11 - d01 * d10
    return det[0] if ddf.ndim == 3 else det


def folding_fraction(ddf: torch.Tensor) -> float:
    """Fraction of pixels where the mapping folds (Jacobian determinant <= 0)."""
    return float((jacobian_determinant(ddf) <= 0).float().mean())


def registration_scores(aligned: torch.Tensor, truth: torch.Tensor, moving: torch.Tensor | None = None,
                        ddf: torch.Tensor | None = None, ddf_truth: torch.Tensor | None = None) -> dict:
    """Scores of one registered image against its ground truth (images (1, *S) in [0, 1]).

    ``MAE``, ``NCC`` and ``SSIM`` (MONAI, 11-px Gaussian window) of ``aligned`` to ``truth``; with ``moving``
    the same for the unregistered input (``*_before``); with ``ddf`` the folding fraction; with ``ddf_truth``
    (a synthetic misalignment's inverse) the mean end-point error ``EPE`` in pixels.
    """
    from monai.metrics import SSIMMetric

    def scores(x):
        x, t = x.float().reshape(truth.shape), truth.float()
        xc, tc = x - x.mean(), t - t.mean()
        ncc = float((xc * tc).sum() / (xc.norm() * tc.norm()).clamp_min(1e-12))
        ssim = float(SSIMMetric(spatial_dims=t.ndim - 1, data_range=1.0)(x[None], t[None]).mean())
        return {"MAE": float((x - t).abs().mean()), "NCC": ncc, "SSIM": ssim}

    out = scores(aligned)
    if moving is not None:
        out.update({f"{k}_before": v for k, v in scores(moving).items()})
    if ddf is not None:
        out["folding"] = folding_fraction(ddf)
        out["max_displacement"] = float(ddf.float().norm(dim=-3).max())
    if ddf is not None and ddf_truth is not None:
        out["EPE"] = float((ddf.float() - ddf_truth.float()).norm(dim=-3).mean())
    return out


class RandMisalignd(RandomizableTransform, MapTransform):
    """Synthetic misalignment of the moving channel: smooth random elastic field plus a small affine.

    Defaults reproduce the magnitude of BSAFusion's official training recipe: uniform noise in [-1, 1] per pixel
    and axis, Gaussian-smoothed (sigma 16 px, radius 50 px), times 256; a translation of up to 2.56 px per axis;
    no rotation or scaling (per-axis displacement std ~3 px, 95th percentile of |u| ~7 px). Stronger settings:
    raise ``magnitude``, ``translate``, ``rotate`` (degrees) and ``scale`` (relative).

    Warps channel(s) ``channels`` of each key (default the moving channel 1 of the 2-channel ``image``) with
    MONAI ``Warp`` (bilinear, border) and stores under ``ddf_key`` the field that undoes it (what a registration
    network should predict, a pull field in pixels), so registration error can be measured.
    Works on (C, H, W) tensors; the field is stationary, so crops see the same statistics as whole images.
    """

    def __init__(self, keys: KeysCollection = "image", channels=(1,), prob: float = 1.0, sigma: float = 16.0,
                 magnitude: float = 256.0, translate: float = 2.56, rotate: float = 0.0, scale: float = 0.0,
                 ddf_key: str | None = "ddf_gt", allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.channels = tuple(channels)
        self.sigma, self.magnitude, self.translate = float(sigma), float(magnitude), float(translate)
        self.rotate, self.scale = float(rotate), float(scale)
        self.ddf_key = ddf_key
        self.radius = max(1, int(round(3.125 * self.sigma)))
        self._noise = self._affine = None

    def randomize(self, shape) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        h, w = (s + 2 * self.radius for s in shape)
        self._noise = self.R.uniform(-1.0, 1.0, size=(2, h, w)).astype(np.float32)
        self._affine = (self.R.uniform(-self.rotate, self.rotate), self.R.uniform(-self.scale, self.scale),
                        self.R.uniform(-self.translate, self.translate, size=2))

    def field(self, shape) -> torch.Tensor:
        """The (2, H, W) pull field of the last draw: ``deformed(p) = image(p + field(p))``."""
        x = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / self.sigma) ** 2)
        k = k / k.sum()
        noise = torch.from_numpy(self._noise)[:, None]  # (2, 1, H+2r, W+2r)
        blurred = F.conv2d(F.conv2d(noise, k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))[:, 0]  # "valid": (2, H, W)
        angle, rel_scale, shift = self._affine
        grid = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in shape), indexing="ij"))
        centre = torch.tensor([(s - 1) / 2 for s in shape]).view(2, 1, 1)
        a = math.radians(angle)
        rot = (1 + rel_scale) * torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        rel = grid - centre
        affine = torch.einsum("ij,jhw->ihw", rot, rel) - rel + torch.tensor(shift, dtype=torch.float32).view(2, 1, 1)
        return blurred * self.magnitude + affine

    def __call__(self, data: Mapping, randomize: bool = True) -> dict:
        d = dict(data)
        first = next(self.key_iterator(d), None)
        if first is None:
            return d
        shape = tuple(d[first].shape[1:])
        if len(shape) != 2:
            raise ValueError(f"RandMisalignd works on 2D (C, H, W) images, got shape {tuple(d[first].shape)}.")
        if randomize:
            self.randomize(shape)
        if not self._do_transform:
            if self.ddf_key:
                d[self.ddf_key] = torch.zeros(2, *shape)
            return d
        u = self.field(shape)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            moved = img.clone()
            idx = list(self.channels)
            moved[idx] = warp(img[idx].float(), u).to(img.dtype)
            d[key] = moved
        if self.ddf_key:
            d[self.ddf_key] = invert_ddf(u)
        return d


class SplitRegistrationd(MapTransform):
    """Unpack a registration network's dict output: ``pred`` <- fused, plus ``aligned`` and ``ddf`` keys.

    The colour chroma of the moving source (``<moving_key>_chroma``) is warped with the same field (border
    padding, as officially) so the colour output is rebuilt in the MRI frame. A tensor ``pred`` passes through.
    """

    def __init__(self, keys: KeysCollection = "pred", fused_key: str = "fused",
                 chroma_key: str = "source_b_chroma") -> None:
        super().__init__(keys)
        self.fused_key, self.chroma_key = fused_key, chroma_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            out = d[key]
            if not isinstance(out, Mapping):
                continue
            d[key] = out[self.fused_key]
            for k, v in out.items():
                if k != self.fused_key:
                    d[k] = v
            chroma = d.get(self.chroma_key)
            if chroma is not None and "ddf" in out:
                d[self.chroma_key] = warp(torch.as_tensor(chroma).float().to(out["ddf"].device), out["ddf"])
        return d


def grid_picture(image: torch.Tensor, ddf: torch.Tensor, spacing: int = 12) -> torch.Tensor:
    """(3, *S) RGB in [0, 1]: the grey ``image`` (1, *S) with a regular grid deformed by ``ddf`` drawn in red.

    The grid lines are drawn in the fixed (output) frame as the iso-lines of the deformed coordinates
    ``p + ddf(p)``: where the field is zero they are straight, every ``spacing`` pixels.
    """
    img = image.float().clamp(0, 1)[:1]
    coords = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in img.shape[1:]),
                                        indexing="ij")) + ddf.float().cpu()
    frac = torch.remainder(coords, spacing)
    line = ((frac < 0.5) | (frac > spacing - 0.5)).any(0)
    rgb = img.repeat(3, 1, 1) * 0.85
    rgb[0][line], rgb[1][line], rgb[2][line] = 1.0, 0.15, 0.15
    return rgb


class SaveRegistrationd(MapTransform):
    """Write the registration outputs of one pair next to its fused image, atomically.

    ``<name>_aligned.png`` (or ``.nii.gz`` for volumetric inputs): the moving image warped onto the MRI;
    ``<name>_ddf.nii.gz`` (vector NIfTI, (*S, 1, 1, 2), MRI affine) and ``<name>_ddf.pt`` (``{"ddf": (2, *S)}``, loads
    with ``weights_only=True``): the pull field in pixels, MONAI order; ``<name>_grid.png``: the deformation grid
    over the aligned image. Keys that are absent (a method that does not register) are skipped.
    """

    def __init__(self, keys: KeysCollection = ("aligned", "ddf"), output_dir: str | os.PathLike = "./fused",
                 ref_key: str = "source_a", name_key: str = "name", grid_spacing: int = 12) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.output_dir = Path(output_dir)
        self.ref_key, self.name_key, self.grid_spacing = ref_key, name_key, grid_spacing

    def __call__(self, data: Mapping) -> dict:
        from scripts import io as fio
        from scripts.transforms import SOURCE_KEYS

        d = dict(data)
        aligned_key, ddf_key = (list(self.keys) + [None, None])[:2]
        if aligned_key not in d and ddf_key not in d:
            return d
        ref = d.get(self.ref_key)
        src = str(dict(getattr(ref, "meta", {}) or {}).get("filename_or_obj") or "")
        name = fio.safe_name(d.get(self.name_key) or Path(src).name or "pair")
        ext = fio.output_extension(src)
        affine = getattr(ref, "affine", None)
        inputs = [dict(getattr(d.get(k), "meta", {}) or {}).get("filename_or_obj") for k in SOURCE_KEYS]
        written = []
        aligned = d.get(aligned_key)
        if aligned is not None:
            aligned = torch.as_tensor(aligned).detach().float().cpu().clamp(0, 1)
            written.append(fio.write_image(aligned, self.output_dir / f"{name}_aligned{ext}", affine, inputs))
        ddf = d.get(ddf_key)
        if ddf is not None:
            ddf = torch.as_tensor(ddf).detach().float().cpu()
            written.append(fio.atomic_save(self.output_dir / f"{name}_ddf.pt",
                                           lambda tmp: torch.save({"ddf": ddf.clone()}, tmp), inputs))
            written.append(_save_vector_nifti(ddf, self.output_dir / f"{name}_ddf.nii.gz", affine, inputs))
            if aligned is not None and aligned.ndim == 3:
                pic = grid_picture(aligned, ddf, self.grid_spacing)
                written.append(fio.write_image(pic, self.output_dir / f"{name}_grid.png", None, inputs))
        d["registration_files"] = [str(p) for p in written]
        return d


def _save_vector_nifti(ddf: torch.Tensor, path: Path, affine, protect) -> Path:
    """(2, *S) field -> NIfTI vector image (intent VECTOR): shape (*S, [1,] 1, 2) with the reference affine."""
    import nibabel as nib

    from scripts import io as fio

    arr = np.moveaxis(ddf.numpy().astype(np.float32), 0, -1)  # (*S, 2)
    while arr.ndim < 4:  # spatial x, y, z then t = 1, then the vector components (5th dim)
        arr = arr[..., None, :]
    arr = arr[..., None, :]
    aff = np.eye(4) if affine is None else np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)
    if aff.shape == (3, 3):
        aff = np.block([[aff[:2, :2], np.zeros((2, 1)), aff[:2, 2:]], [np.array([[0, 0, 1, 0], [0, 0, 0, 1.0]])]])
    nii = nib.Nifti1Image(arr, aff)
    nii.header.set_intent("vector")
    return fio.atomic_save(path, lambda tmp: nib.save(nii, tmp), protect)
