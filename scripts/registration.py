"""Registration side of unaligned fusion (BSAFusion): misalignment synthesis, field utilities, scores, outputs.

Fields are MONAI dense displacement fields (DDF): (N, *S) or (B, N, *S) pull fields in pixels (voxels) along the
image tensor's N = 2 or 3 spatial axes, in that axis order, ``warped(p) = image(p + ddf(p))``
(:class:`monai.networks.blocks.Warp`). For PNGs read by MONAI's PIL reader the first spatial axis is the image's x
(column) axis. Every function here works on 2D images and 3D volumes.

``python -m scripts.registration`` (:func:`evaluate_misaligned_volumes`) measures a trained 3D BSAFusion on
held-out phantom volumes deformed by :class:`RandMisalignd` with a fixed seed: error before (identity) and after.
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
    "warp", "invert_ddf", "jacobian_determinant", "folding_fraction", "registration_scores", "refine_field_mi",
    "RandMisalignd", "SplitRegistrationd", "SaveRegistrationd", "grid_picture", "evaluate_misaligned_volumes",
]


def _is_batched(ddf: torch.Tensor) -> bool:
    """(B, N, *S) rather than (N, *S), N = 2 or 3 spatial dims (a (3, 2, H, W) tensor counts as a 2D batch)."""
    if ddf.ndim > 2 and ddf.ndim == ddf.shape[1] + 2 and ddf.shape[1] in (2, 3):
        return True
    if ddf.ndim == ddf.shape[0] + 1 and ddf.shape[0] in (2, 3):
        return False
    raise ValueError(f"a displacement field is (N, *S) or (B, N, *S) with N = 2 or 3 spatial dims, "
                     f"got shape {tuple(ddf.shape)}")


def _warp_layer(padding_mode: str = "border"):
    from monai.networks.blocks import Warp

    with warnings.catch_warnings():  # "using PyTorch native grid_sample": intended
        warnings.simplefilter("ignore")
        return Warp(mode="bilinear", padding_mode=padding_mode)


def warp(image: torch.Tensor, ddf: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Pull-warp (C, *S) or (B, C, *S) ``image`` with a (N, *S) / (B, N, *S) DDF through MONAI ``Warp`` (2D or 3D:
    bilinear / trilinear)."""
    batched = image.ndim == ddf.ndim and _is_batched(ddf)
    img, field = (image, ddf) if batched else (image[None], ddf[None])
    out = _warp_layer(padding_mode)(img.float(), field.float())
    return out if batched else out[0]


def refine_field_mi(fixed: torch.Tensor, moving: torch.Tensor, ddf: torch.Tensor | None = None, iterations: int = 100,
                    downsample: int = 4, grid: int = 16, smooth: float = 10.0, lr: float = 0.5, num_bins: int = 16,
                    warp_fn=None) -> torch.Tensor:
    """Test-time refinement of a pull field by maximising the mutual information of the warped moving image with
    the fixed one (cross-modal; MONAI ``GlobalMutualInformationLoss``, Gaussian Parzen windows).

    ``fixed``, ``moving`` (B, 1, *S) in [0, 1]; ``ddf`` (B, N, *S) the initial field (``None``: identity), in the
    order ``warp_fn(image, field)`` expects (default :func:`warp`, MONAI order). A residual field on a coarse
    control grid (``grid`` nodes per axis, upsampled bicubic in 2D, trilinear in 3D) is optimised with Adam for
    ``iterations`` steps on both images average-pooled by ``downsample`` (speed, and a coarse-to-fine bias), under a
    first-difference smoothness penalty of weight ``smooth``; ``lr`` is in pooled pixels. Returns the refined field
    ``ddf + residual`` (B, N, *S), float32, detached. Runs with autograd on even under ``torch.inference_mode``.

    On the 89 AANLIB moving pairs (defaults, starting from the identity) it lowers the mean MAE to the aligned
    ground truth (README, "Unaligned pairs"); it is a classical instance optimisation, not part of the published
    method, and needs no training.
    """
    from monai.losses import GlobalMutualInformationLoss

    from scripts.networks.blocks import autocast_off

    warp_fn = warp_fn or warp
    dims = fixed.ndim - 2
    mode = "bicubic" if dims == 2 else "trilinear"
    pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
    size = tuple(fixed.shape[2:])
    with torch.inference_mode(False), torch.enable_grad(), autocast_off(fixed.device.type):
        fix = fixed.detach().float().clone()
        mov = moving.detach().float().clone()
        ds = max(1, min(int(downsample), *(s // 8 for s in size)))  # keep at least 8 pooled pixels per axis
        fix_s, mov_s = (pool(fix, ds), pool(mov, ds)) if ds > 1 else (fix, mov)
        small = tuple(fix_s.shape[2:])
        base = 0.0 if ddf is None else ddf.detach().float()
        base_s = 0.0 if ddf is None else F.interpolate(
            base, size=small, mode="bilinear" if dims == 2 else "trilinear", align_corners=False) / ds
        residual = torch.zeros(fix.shape[0], dims, *([min(grid, min(small))] * dims), device=fix.device,
                               requires_grad=True)
        loss_fn = GlobalMutualInformationLoss(num_bins=num_bins, reduction="sum")
        opt = torch.optim.Adam([residual], lr=lr)
        for _ in range(int(iterations)):
            field = base_s + F.interpolate(residual, size=small, mode=mode, align_corners=True)
            loss = loss_fn(warp_fn(mov_s, field).clamp(0, 1), fix_s)
            loss = loss + smooth * sum(residual.diff(dim=2 + a).pow(2).mean() for a in range(dims)) * fix.shape[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            return (base + F.interpolate(residual, size=size, mode=mode, align_corners=True) * ds).detach()


def invert_ddf(ddf: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Inverse of a smooth pull field by fixed-point iteration ``v(p) = -u(p + v(p))`` (exact for translations)."""
    batched = _is_batched(ddf)
    u = ddf if batched else ddf[None]
    v = -u
    for _ in range(iterations):
        v = -warp(u, v)
    return v if batched else v[0]


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) of a DDF (B, N, *S) or (N, *S), N = 2 or 3, central differences (one-sided at the borders).
    Returns (B, *S) or (*S)."""
    batched = _is_batched(ddf)
    u = ddf if batched else ddf[None]
    if u.shape[1] == 2:
        g0 = torch.gradient(u, dim=2)  # d/d axis0 of both components
        g1 = torch.gradient(u, dim=3)
        d00, d10 = 1 + g0[0][:, 0], g0[0][:, 1]  # d u0 / d x0, d u1 / d x0
        d01, d11 = g1[0][:, 0], 1 + g1[0][:, 1]
        det = d00 * d11 - d01 * d10
    else:  # J[i][j] = delta_ij + d u_i / d x_j, determinant by cofactors along the first row
        grads = [torch.gradient(u, dim=2 + j)[0] for j in range(3)]  # grads[j][:, i] = d u_i / d x_j
        j = [[grads[c][:, r] + (1.0 if r == c else 0.0) for c in range(3)] for r in range(3)]
        det = (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
               - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
               + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
    return det if batched else det[0]


def folding_fraction(ddf: torch.Tensor) -> float:
    """Fraction of pixels (voxels) where the mapping folds (Jacobian determinant <= 0)."""
    return float((jacobian_determinant(ddf) <= 0).float().mean())


def registration_scores(aligned: torch.Tensor, truth: torch.Tensor, moving: torch.Tensor | None = None,
                        ddf: torch.Tensor | None = None, ddf_truth: torch.Tensor | None = None) -> dict:
    """Scores of one registered image against its ground truth (images (1, *S) in [0, 1]).

    ``MAE``, ``NCC`` and ``SSIM`` (MONAI, 11-px Gaussian window) of ``aligned`` to ``truth``; with ``moving``
    the same for the unregistered input (``*_before``); with ``ddf`` the folding fraction; with ``ddf_truth``
    (a synthetic misalignment's inverse) the mean end-point error ``EPE`` in pixels (and ``EPE_before``, that of
    the identity: the mean length of ``ddf_truth``). 2D images (1, H, W) or volumes (1, D, H, W) (3D SSIM).
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
    vec = -truth.ndim  # the vector axis of an (N, *S) field
    if ddf is not None:
        out["folding"] = folding_fraction(ddf)
        out["max_displacement"] = float(ddf.float().norm(dim=vec).max())
    if ddf is not None and ddf_truth is not None:
        out["EPE"] = float((ddf.float() - ddf_truth.float()).norm(dim=vec).mean())
        out["EPE_before"] = float(ddf_truth.float().norm(dim=vec).mean())
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
    Works on (C, H, W) images and (C, D, H, W) volumes; the field is stationary, so crops see the same statistics
    as whole images.

    Volumes (the natural 3D version of the recipe): 3-component noise per voxel, blurred by the same separable
    Gaussian along the three axes and rescaled by ``1 / sqrt(sum k^2)`` of the 1D kernel ``k``, so that with the
    same ``sigma`` and ``magnitude`` each component has the per-axis standard deviation of the 2D recipe (a 3D
    blur averages over more noise: without the rescaling it would be ~7.5x smaller at sigma 16); ``rotate`` draws
    one angle per axis (rotations in the (1, 2), (0, 2) and (0, 1) planes, composed in that order, about the
    centre); ``scale`` is isotropic; ``translate`` per axis.
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
        n = len(shape)
        padded = tuple(s + 2 * self.radius for s in shape)
        self._noise = self.R.uniform(-1.0, 1.0, size=(n, *padded)).astype(np.float32)
        angle = self.R.uniform(-self.rotate, self.rotate) if n == 2 else self.R.uniform(-self.rotate, self.rotate, 3)
        self._affine = (angle, self.R.uniform(-self.scale, self.scale),
                        self.R.uniform(-self.translate, self.translate, size=n))

    @staticmethod
    def _rotation(angle) -> torch.Tensor:
        """2x2 rotation by ``angle`` degrees, or 3x3: rotations in the (1, 2), (0, 2), (0, 1) planes by its 3 angles."""
        def plane(n, i, j, deg):
            a = math.radians(float(deg))
            r = torch.eye(n, dtype=torch.float64)
            r[i, i], r[i, j], r[j, i], r[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
            return r

        if np.ndim(angle) == 0:
            a = math.radians(angle)
            return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        return (plane(3, 0, 1, angle[2]) @ plane(3, 0, 2, angle[1]) @ plane(3, 1, 2, angle[0])).float()

    def field(self, shape) -> torch.Tensor:
        """The (N, *S) pull field of the last draw (N = 2 or 3): ``deformed(p) = image(p + field(p))``."""
        x = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / self.sigma) ** 2)
        k = k / k.sum()
        n = len(shape)
        noise = torch.from_numpy(self._noise)[:, None]  # (N, 1, *(S + 2r))
        if n == 2:
            blurred = F.conv2d(F.conv2d(noise, k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))[:, 0]  # "valid": (2, H, W)
        else:  # separable, "valid", then the gain that keeps the 2D recipe's per-axis std
            for axis in range(3):
                view = [1, 1, 1, 1, 1]
                view[2 + axis] = -1
                noise = F.conv3d(noise, k.view(view))
            blurred = noise[:, 0] / float(k.square().sum().sqrt())
        angle, rel_scale, shift = self._affine
        grid = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in shape), indexing="ij"))
        view = (n,) + (1,) * n
        centre = torch.tensor([(s - 1) / 2 for s in shape]).view(view)
        rot = (1 + rel_scale) * self._rotation(angle)
        rel = grid - centre
        spec = "ij,jhw->ihw" if n == 2 else "ij,jdhw->idhw"
        affine = torch.einsum(spec, rot, rel) - rel + torch.tensor(shift, dtype=torch.float32).view(view)
        return blurred * self.magnitude + affine

    def __call__(self, data: Mapping, randomize: bool = True) -> dict:
        d = dict(data)
        first = next(self.key_iterator(d), None)
        if first is None:
            return d
        shape = tuple(d[first].shape[1:])
        if len(shape) not in (2, 3):
            raise ValueError(f"RandMisalignd works on 2D (C, H, W) images and 3D (C, D, H, W) volumes, got shape "
                             f"{tuple(d[first].shape)}.")
        if randomize:
            self.randomize(shape)
        if not self._do_transform:
            if self.ddf_key:
                d[self.ddf_key] = torch.zeros(len(shape), *shape)
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
            ddf = ddf.as_tensor() if hasattr(ddf, "as_tensor") else ddf  # a plain tensor: loads with weights_only
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


# ------------------------------------------------------------------------------------- 3D registration check
def _misalign_params(bundle_root, method: str) -> dict:
    """The method's training misalignment (its ``RandMisalignd`` entry of ``train_transforms``), or the defaults."""
    from scripts.methods import load_method_config

    for t in load_method_config(bundle_root, method).get("train_transforms", []):
        if str(t.get("_target_", "")).endswith("RandMisalignd"):
            return {k: v for k, v in t.items() if not k.startswith("_") and k not in ("keys", "ddf_key")}
    return {}


def _load_weights(net: torch.nn.Module, path) -> None:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    net.load_state_dict(state)


def evaluate_misaligned_volumes(ckpt_path=None, bundle_root=".", dataset_dir=None, split: str = "testing",
                                seed: int = 0, method: str = "bsafusion", network_overrides: dict | None = None,
                                misalign: dict | None = None, pairs=None, roi_size=None, network=None,
                                device: str = "cpu", output_json=None, log=print) -> dict:
    """Registration error of a 3D registration network on held-out volumes with a known synthetic misalignment.

    For each pair of ``split`` (default: the embedded phantom's ``testing`` volumes, never seen in training), the
    moving volume (``source_b``, min-max scaled as in training) is deformed by :class:`RandMisalignd` with the
    method's training parameters (``misalign`` overrides them) and the fixed seed ``seed + index``; the network
    (``mode="full"``, 3D, whole volumes or ``roi_size`` sliding windows) registers it to the MRI. Scores of
    :func:`registration_scores` of the moving volume against its undeformed ground truth: ``*_before`` for the
    identity (the deformed input), the plain names for the input warped by the predicted ``ddf``; plus the
    predicted field's folding fraction and end-point error against the true inverse field (``EPE`` vs the
    identity's ``EPE_before``), in voxels.

    Returns ``{"pairs": [per-pair scores], "mean": {...}, "settings": {...}}`` and writes it to ``output_json``.
    """
    import json
    import time

    from monai.transforms import ScaleIntensityd

    from scripts import phantom
    from scripts.data import build_datalist
    from scripts.methods import build, load_method_config
    from scripts.transforms import SOURCE_KEYS, LoadFusionPaird
    from scripts.volumes import VolumeInferer

    if dataset_dir is None:
        dataset_dir = phantom.ensure_phantom_dataset(phantom.default_dataset_dir(bundle_root))
    items = build_datalist(dataset_dir, split, spatial_dims=3, pairs=pairs, check=False)
    if not items:
        raise ValueError(f"{dataset_dir}: no {split} volume pairs.")
    if network is None:
        net = build(load_method_config(bundle_root, method)["network"], network_overrides or {}, spatial_dims=3)
        if ckpt_path is not None:
            _load_weights(net, ckpt_path)
    else:
        net = network
    net = net.to(device).eval()
    params = {**_misalign_params(bundle_root, method), **(misalign or {})}
    load = LoadFusionPaird(SOURCE_KEYS, spatial_dims=3)
    scale = ScaleIntensityd(SOURCE_KEYS)
    inferer = VolumeInferer(mode="full", roi_size=roi_size, sw_batch_size=1)
    rows = []
    for i, item in enumerate(items):
        d = scale(load(dict(item)))
        fixed, truth = (torch.as_tensor(d[k]).float()[:1] for k in SOURCE_KEYS)
        t = RandMisalignd(keys="image", **params)
        t.set_random_state(seed + i)
        m = t({"image": torch.cat([fixed, truth])})
        moving, ddf_truth = m["image"][1:], m["ddf_gt"]
        start = time.perf_counter()
        with torch.no_grad():
            out = inferer(m["image"][None].to(device), net)
        seconds = time.perf_counter() - start
        ddf = out["ddf"][0].float().cpu()
        aligned = warp(moving, ddf)
        s = registration_scores(aligned, truth, moving, ddf=ddf, ddf_truth=ddf_truth)
        s.update(name=str(item.get("name")), pair=str(item.get("pair")), shape=list(truth.shape[1:]),
                 seconds=round(seconds, 2))
        rows.append(s)
        log(f"{s['name']} {s['pair']}: MAE {s['MAE_before']:.4f} -> {s['MAE']:.4f}, NCC {s['NCC_before']:.4f} -> "
            f"{s['NCC']:.4f}, SSIM {s['SSIM_before']:.4f} -> {s['SSIM']:.4f}, EPE {s['EPE_before']:.3f} -> "
            f"{s['EPE']:.3f} vox, folding {s['folding']:.5f} ({seconds:.1f} s)")
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    log("mean: " + ", ".join(f"{k} {v:.4f}" for k, v in mean.items()))
    result = {"pairs": rows, "mean": mean,
              "settings": {"ckpt_path": None if ckpt_path is None else str(ckpt_path), "split": split, "seed": seed,
                           "misalign": params, "network_overrides": network_overrides or {},
                           "roi_size": roi_size, "dataset_dir": str(dataset_dir)}}
    if output_json:
        Path(output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(output_json).write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> dict:
    """CLI of :func:`evaluate_misaligned_volumes`."""
    import argparse
    import ast

    p = argparse.ArgumentParser(prog="python -m scripts.registration", description=(
        "Registration error before (identity) and after a 3D BSAFusion on held-out phantom volumes deformed by "
        "RandMisalignd with a fixed seed."))
    p.add_argument("--ckpt_path", default=None,
                   help="3D weights (default: models/bsafusion_3d.pt or runs/bsafusion_3d/model.pt); 'none': untrained")
    p.add_argument("--bundle_root", default=".")
    p.add_argument("--dataset_dir", default=None, help="default: the embedded phantom (datalist_3d.json)")
    p.add_argument("--split", default="testing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", default=None, help="e.g. \"['CT-MRI']\"")
    p.add_argument("--network_overrides", default="{}", help="Python dict literal, as for training")
    p.add_argument("--misalign", default="{}", help="RandMisalignd overrides, e.g. \"{'magnitude': 512.0}\"")
    p.add_argument("--roi_size", default=None, help="sliding windows, e.g. \"[64, 64, 64]\" (default: whole volumes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output_json", default=None)
    a = p.parse_args(argv)
    ckpt = a.ckpt_path
    if ckpt is None:
        from scripts.volumes import default_3d_checkpoint

        ckpt = default_3d_checkpoint(a.bundle_root, "bsafusion")
    elif str(ckpt).lower() == "none":
        ckpt = None
    lit = (lambda v: None if v is None else ast.literal_eval(v))
    return evaluate_misaligned_volumes(ckpt, a.bundle_root, a.dataset_dir, a.split, a.seed, "bsafusion",
                                       lit(a.network_overrides), lit(a.misalign), lit(a.pairs), lit(a.roi_size),
                                       device=a.device, output_json=a.output_json)


if __name__ == "__main__":
    main()
