"""Embedded default dataset: a deterministic multimodal brain phantom derived from the MNI152 templates.

The bundle must train on a fresh machine without any data. This module builds, on first use, a small but
realistic co-registered multimodal brain dataset from the MNI152 2009 (sym, 09a) T1 / GM / WM templates that
nilearn ships inside its package (``nilearn/datasets/data``; read with nibabel, nothing is downloaded), and
caches it on disk.

For each synthetic subject (subject 0 is the template geometry itself, the others get a small random affine
plus a smooth random deformation, random contrast / bias-field variation and noise) it synthesises:

* ``t1``    MR-T1: the template (skull-stripped in nilearn) plus synthetic extra-cerebral tissues
            (CSF rim, skull with dark cortical tables and brighter diploe, scalp with bright fat),
* ``t2``    T2-like: CSF bright, GM intermediate, WM dark (from the GM/WM/CSF probability maps),
* ``ct``    CT-like: HU-like values (air -1000, fat -90, CSF ~8, WM ~28, GM ~38, bone up to ~1600),
            windowed to [0, 1] with ``CT_WINDOW``,
* ``pet``   FDG-PET-like: GM high, WM lower, CSF ~0, blurred to 6 mm FWHM, correlated noise,
* ``spect`` perfusion-SPECT-like: lower GM/WM contrast, blurred to 10 mm FWHM, noisier,
* ``lesion`` binary mask of 0-2 random smooth-edged ellipsoidal lesions (hypo T1, hyper T2, hot PET/SPECT,
            slightly hyperdense CT).

The skull and scalp are not in the template (nilearn's T1 is brain-masked); they are built as shells at
(smoothly varying) distances outside a brain hull: a morphological closing of the brain mask (torch max_pool),
then an outward distance estimated from the Gaussian-blurred hull (``d = -sigma * Phi^-1(G_sigma * hull)``,
exact for a flat boundary). Everything is torch/numpy, no scipy.

Layout written under ``root`` (see :func:`ensure_phantom_dataset`)::

    root/phantom.json                                 parameters + version (cache key) + info
    root/datalist_2d.json, root/datalist_3d.json      decathlon-style {"training","validation","testing"}
    root/3d/sNN/{t1,t2,ct,pet,spect}.nii.gz           float32 in [0, 1], RAS affine, ``spacing_3d`` mm
    root/3d/sNN/lesion.nii.gz                         uint8 {0, 1}
    root/2d/CT-MRI/{MRI,CT}/sNN_zKKK.png              8-bit grey ('L')
    root/2d/PET-MRI/{MRI,PET}/sNN_zKKK.png            MRI 'L', PET 'RGB' hot colour map
    root/2d/SPECT-MRI/{MRI,SPECT}/sNN_zKKK.png        MRI 'L', SPECT 'RGB' jet-like colour map (black at 0)
    root/2d/T2-T1/{T1,T2}/sNN_zKKK.png                8-bit grey ('L')
    root/2d/lesion_masks/sNN_zKKK.png                 0/255 'L'

``zKKK`` is the z index of the axial plane in the subject's 3D grid, so a 2D slice is exactly the plane
``z = KKK`` of the 3D volumes, sampled on a ``size_2d`` square covering the head (radiological display:
patient's right on the image left, anterior at the top). T1/T2/CT slices are synthesised directly at the pixel
positions from the 1 mm template (sharp at 256 px); PET/SPECT slices are interpolated from the 3D volumes.
All subjects share one 3D grid (RAS, ``spacing_3d`` mm, cropped to the head, sizes multiples of 8: 96x120x96 at
2 mm); float volumes are quantised to 1/4096 steps (smaller, faster gzip).

Datalist items: ``name`` (``sNN_zKKK`` in 2D, ``sNN`` in 3D, shared by the four pair types), ``subject``, ``pair``,
``source_a`` / ``source_b`` / ``label`` (paths relative to ``root``), ``modality_a`` / ``modality_b`` (the folder
names: MRI with CT/PET/SPECT, T1 with T2, in 2D and 3D alike). Split by subject: the last subject is
``validation``, the one before ``testing``, the rest ``training``.

Usage::

    from scripts.phantom import default_dataset_dir, ensure_phantom_dataset
    root = ensure_phantom_dataset(default_dataset_dir(bundle_root))

    python -m scripts.phantom --root DIR [--seed N] [--size_2d 256] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scripts.io import file_lock

__all__ = [
    "VERSION",
    "PAIR_TYPES",
    "CT_WINDOW",
    "default_dataset_dir",
    "ensure_phantom_dataset",
    "hot_lut",
    "jet_lut",
    "save_preview",
    "main",
]

VERSION = "phantom-1.1"  # bump whenever the generated data change: it invalidates cached datasets

# pair type -> (folder/modality name of source_a, folder/modality name of source_b, 3D volume of source_b)
PAIR_TYPES = {
    "CT-MRI": ("MRI", "CT", "ct"),
    "PET-MRI": ("MRI", "PET", "pet"),
    "SPECT-MRI": ("MRI", "SPECT", "spect"),
    "T2-T1": ("T1", "T2", "t2"),
}
CT_WINDOW = (-120.0, 240.0)  # HU mapped linearly to [0, 1] (clipped): air/fat dark, brain grey, bone white

_TEMPLATE_NAME = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_META = "phantom.json"
_HULL_SIGMA_MM = 6.0  # Gaussian used for the brain hull / outward distance
_HEAD_MARGIN_MM = 6.0  # room for the random deformation around the scalp when cropping the grid


# ----------------------------------------------------------------------------------------------- paths / cache


def default_dataset_dir(bundle_root) -> str:
    """Where the bundle caches the embedded dataset: ``<bundle_root>/data/phantom`` (git-ignored)."""
    return os.path.join(os.fspath(bundle_root), "data", "phantom")


def _params(seed, n_subjects, size_2d, slices_per_subject, spacing_3d, lesions) -> dict:
    return {
        "seed": int(seed),
        "n_subjects": int(n_subjects),
        "size_2d": int(size_2d),
        "slices_per_subject": int(slices_per_subject),
        "spacing_3d": float(spacing_3d),
        "lesions": bool(lesions),
    }


def _read_meta(root: Path):
    try:
        with open(root / _META) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_valid(root: Path, params: dict) -> bool:
    meta = _read_meta(root)
    return bool(meta) and meta.get("version") == VERSION and meta.get("params") == params


def ensure_phantom_dataset(
    root,
    seed: int = 0,
    n_subjects: int = 6,
    size_2d: int = 128,
    slices_per_subject: int = 8,
    spacing_3d: float = 2.0,
    lesions: bool = True,
    force: bool = False,
) -> str:
    """Generate the phantom dataset under ``root`` unless an identical one is cached there; return ``root``.

    The cache (``root/phantom.json``) is reused only when the version and all parameters match exactly;
    otherwise the dataset is rebuilt in a temporary sibling directory and swapped in with renames, so ``root``
    never holds a half-written dataset. A lock file ``<root>.lock`` serialises concurrent callers (e.g. DDP
    ranks): the first one generates, the others wait and then reuse its result. Same seed -> byte-identical
    PNGs and identical NIfTI arrays; a different seed gives a different dataset.
    """
    if int(n_subjects) < 1 or int(slices_per_subject) < 1 or int(size_2d) < 16 or float(spacing_3d) <= 0:
        raise ValueError("need n_subjects >= 1, slices_per_subject >= 1, size_2d >= 16, spacing_3d > 0")
    if int(seed) < 0:
        raise ValueError("seed must be >= 0")
    params = _params(seed, n_subjects, size_2d, slices_per_subject, spacing_3d, lesions)
    root = Path(os.path.abspath(os.fspath(root)))
    if not force and _is_valid(root, params):
        return str(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / (root.name + ".lock")):
        if not force and _is_valid(root, params):  # another process generated it while we waited
            return str(root)
        if root.exists() and any(root.iterdir()) and _read_meta(root) is None:
            raise FileExistsError(f"{root} exists, is not empty and is not a phantom dataset; refusing to replace it")
        prefix = f".{root.name}.tmp-"
        for stale in root.parent.glob(prefix + "*"):  # leftovers of a crashed run (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=root.parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); the dataset is an ordinary folder
            _generate(tmp, params)
            if root.exists():
                old = Path(tempfile.mkdtemp(prefix=prefix + "old-", dir=root.parent))
                os.replace(root, old / "d")
                os.replace(tmp, root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(root)


# ------------------------------------------------------------------------------------------- torch helpers


def _blur(x: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """Gaussian blur (isotropic, ``sigma_vox`` voxels) of a (..., X, Y, Z) tensor via FFT with zero padding."""
    if sigma_vox <= 0.05:
        return x
    r = int(math.ceil(3.5 * sigma_vox))
    xp = F.pad(x, (r, r, r, r, r, r))
    shp = xp.shape[-3:]
    spec = torch.fft.rfftn(xp, dim=(-3, -2, -1))
    freqs = [torch.fft.fftfreq(shp[0]), torch.fft.fftfreq(shp[1]), torch.fft.rfftfreq(shp[2])]
    g = [torch.exp(-2.0 * (math.pi * sigma_vox * f) ** 2) for f in freqs]
    spec = spec * (g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :])
    y = torch.fft.irfftn(spec, s=shp, dim=(-3, -2, -1))
    return y[..., r:-r, r:-r, r:-r].contiguous()


def _dilate(x: torch.Tensor, r: int = 1) -> torch.Tensor:
    """Grey dilation with a (2r+1)^3 cube, separable max_pool (x: (N, C, X, Y, Z))."""
    k = 2 * r + 1
    x = F.max_pool3d(x, (k, 1, 1), 1, (r, 0, 0))
    x = F.max_pool3d(x, (1, k, 1), 1, (0, r, 0))
    return F.max_pool3d(x, (1, 1, k), 1, (0, 0, r))


def _erode(x: torch.Tensor, r: int = 1) -> torch.Tensor:
    return -_dilate(-x, r)


def _smoothstep(d: torch.Tensor, edge: float, width: float) -> torch.Tensor:
    """Soft 0 -> 1 step at ``edge`` (a partial-volume-like ramp of ``width`` mm)."""
    return torch.sigmoid((d - edge) * (4.0 / width))


def _sample(vol: torch.Tensor, affine: np.ndarray, pts: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Trilinear sampling of ``vol`` (1, C, X, Y, Z) with diagonal ``affine`` at world points ``pts`` (..., 3) mm.

    Returns (C, ...) values.
    """
    shape = pts.shape[:-1]
    sp = torch.tensor(np.diag(affine)[:3], dtype=torch.float32)
    org = torch.tensor(affine[:3, 3], dtype=torch.float32)
    size = torch.tensor(vol.shape[2:], dtype=torch.float32)
    idx = (pts.reshape(-1, 3) - org) / sp
    norm = 2.0 * idx / (size - 1) - 1.0
    grid = norm.flip(-1).view(1, 1, 1, -1, 3)  # grid_sample wants (W, H, D) = (z, y, x)
    out = F.grid_sample(vol, grid, mode="bilinear", padding_mode=padding, align_corners=True)
    return out.reshape(vol.shape[1], *shape)


# ----------------------------------------------------------------------------------------------- colour maps


def hot_lut() -> np.ndarray:
    """(256, 3) uint8 'hot' colour map: black -> red -> yellow -> white."""
    v = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
    return np.round(rgb * 255).astype(np.uint8)


def jet_lut() -> np.ndarray:
    """(256, 3) uint8 jet-like rainbow (blue -> cyan -> green -> yellow -> red) that starts at black."""
    v = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.clip(1.5 - np.abs(4 * v - 3), 0, 1), np.clip(1.5 - np.abs(4 * v - 2), 0, 1),
                    np.clip(1.5 - np.abs(4 * v - 1), 0, 1)], -1)
    rgb *= np.clip(v / 0.12, 0, 1)[:, None]  # fade the dark-blue low end to a black background
    return np.round(rgb * 255).astype(np.uint8)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


# -------------------------------------------------------------------------------------------------- template


def _template_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")  # locate the package without importing it (no download code runs)
    if spec is None or spec.origin is None:
        raise ImportError("nilearn is required for the embedded phantom dataset (it ships the MNI152 templates)")
    return Path(spec.origin).parent / "datasets" / "data"


class _Template:
    """MNI152 2009 sym templates as torch tensors at several resolutions, plus the head geometry."""

    def __init__(self):
        import nibabel as nib

        d = _template_dir()
        vols, aff = [], None
        for m in ("t1", "gm", "wm"):
            img = nib.load(str(d / _TEMPLATE_NAME.format(m)))
            if aff is None:
                aff = img.affine
            elif not np.allclose(aff, img.affine) or img.shape != vols[0].shape:
                raise ValueError("MNI152 templates are not on the same grid")
            vols.append(np.asarray(img.dataobj))  # uint8 0..255
        if not (np.allclose(aff[:3, :3], np.diag(np.diag(aff)[:3])) and np.all(np.diag(aff)[:3] > 0)):
            raise ValueError("expected an axis-aligned RAS template affine")
        # channels (t1, gm, wm, brain mask), filled in place: the 1 mm volumes are large
        fine = torch.empty((1, 4) + tuple(vols[0].shape), dtype=torch.float32)
        for c, v in enumerate(vols):
            fine[0, c].copy_(torch.from_numpy(np.ascontiguousarray(v)))
        del vols
        fine[0, :3].mul_(1.0 / 255.0)
        fine[0, 3].copy_(fine[0, 0] > 0)  # nilearn's T1 is brain-masked: brain (incl. CSF) = T1 > 0
        fine[0, 1].mul_(fine[0, 3])
        fine[0, 2].mul_(fine[0, 3])
        total = fine[0, 1] + fine[0, 2]
        if bool((total > 1.0).any()):
            fine[0, 1:3].div_(total.clamp(min=1.0))
        del total
        self.fine = fine
        self.affine = aff.astype(np.float64)
        self._levels = {1: (self.fine, self.affine)}
        self.z_bottom = float(aff[2, 3])

        # head geometry on a 2 mm grid: signed distance-like field to a smooth brain hull
        coarse, caff = self.level(2)
        sig = _HULL_SIGMA_MM / caff[0, 0]
        hull = torch.maximum(_erode(_dilate(coarse[:, 3:4], 2), 2), coarse[:, 3:4])  # closing fills the sulci
        g = _blur(hull, sig).clamp(1e-6, 1 - 1e-6)
        dist = -_HULL_SIGMA_MM * math.sqrt(2.0) * torch.erfinv(2.0 * g - 1.0)  # > 0 outside, < 0 inside (mm)
        self.dist, self.dist_affine = dist, caff

        # crop box of the head in world mm: scalp (<= ~18 mm outside the hull) + deformation margin
        head = (dist[0, 0] < 18.0).numpy()
        ijk = np.argwhere(head)
        lo = caff[:3, 3] + ijk.min(0) * caff[0, 0] - _HEAD_MARGIN_MM
        hi = caff[:3, 3] + ijk.max(0) * caff[0, 0] + _HEAD_MARGIN_MM
        lo[2] = max(lo[2], self.z_bottom + 2.0)  # the template stops at the brainstem: no empty neck below
        self.head_lo, self.head_hi = lo, hi

        # lesion centre candidates: deep (>= 14 mm inside the hull) cerebral tissue above the tentorium
        cg = coarse[0]
        cand = (dist[0, 0] < -14.0) & ((cg[1] + cg[2]) > 0.85)
        ijk = np.argwhere(cand.numpy())
        xyz = caff[:3, 3] + ijk * caff[0, 0]
        self.lesion_candidates = xyz[xyz[:, 2] > -20.0]

    def level(self, factor: int):
        """Template channels (t1, gm, wm, brain) area-averaged by an integer factor, with their affine."""
        factor = max(1, int(factor))
        if factor not in self._levels:
            vol = F.avg_pool3d(self.fine, factor, factor)
            aff = self.affine.copy()
            aff[:3, :3] *= factor
            aff[:3, 3] += (factor - 1) / 2.0 * np.diag(self.affine)[:3]
            self._levels[factor] = (vol, aff)
        return self._levels[factor]


@lru_cache(maxsize=1)
def _template() -> _Template:
    return _Template()


# --------------------------------------------------------------------------------------------------- subjects


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


class _Subject:
    """Random geometry / contrast of one synthetic subject (subject 0: template geometry, nominal contrast)."""

    CENTRE = np.array([0.0, -18.0, 8.0])  # approximate MNI brain centre, pivot of the affine

    def __init__(self, seed: int, index: int, lesions: bool, n_lesions: int, tpl: _Template):
        self.index = index
        rng = _rng(seed, index, 0)
        vary = index > 0
        # --- geometry: q_template = c + A (p - c) + t + u(p)
        if vary:
            ang = np.deg2rad(np.clip(rng.normal(0.0, 3.0, 3), -7, 7))
            scale = 1.0 + np.clip(rng.normal(0, 0.03), -0.07, 0.07)  # global size
            scale = scale * (1.0 + np.clip(rng.normal(0, 0.015, 3), -0.04, 0.04))  # per axis
            trans = np.clip(rng.normal(0.0, 2.0, 3), -5, 5)
        else:
            ang, scale, trans = np.zeros(3), np.ones(3), np.zeros(3)
        cx, cy, cz = np.cos(ang)
        sx, sy, sz = np.sin(ang)
        rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        self.A = rz @ ry @ rx @ np.diag(1.0 / scale)  # maps subject -> template (subject is `scale` x template)
        self.t = trans
        m = 6
        dirs = rng.normal(size=(m, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        wl = rng.uniform(70.0, 160.0, m)
        self.k = dirs * (2 * np.pi / wl)[:, None]
        self.phase = rng.uniform(0, 2 * np.pi, (m, 3))
        amp = rng.normal(0.0, 1.6, (m, 3)) if vary else np.zeros((m, 3))
        lip = (np.abs(amp) * np.linalg.norm(self.k, axis=1)[:, None]).sum(0).max()
        self.amp = amp * min(1.0, 0.3 / max(lip, 1e-9))  # |grad u| <= 0.3: smooth, no folding
        # --- bias field (MR), smooth multiplicative exp(sum of low-frequency sines)
        bdirs = rng.normal(size=(3, 3))
        bdirs /= np.linalg.norm(bdirs, axis=1, keepdims=True)
        self.bk = bdirs * (2 * np.pi / rng.uniform(180.0, 320.0, 3))[:, None]
        self.bphase = rng.uniform(0, 2 * np.pi, (2, 3))
        self.bamp = rng.uniform(0.03, 0.08, (2, 3)) if vary else np.zeros((2, 3))

        def jit(sd, lo=-3.0, hi=3.0):
            return float(np.clip(rng.normal(0.0, sd), lo * sd, hi * sd)) if vary else 0.0

        # --- head layers (mm outside the brain hull)
        self.r_csf = 2.0 + jit(0.3)
        self.r_skull = self.r_csf + 6.5 + jit(0.7)
        self.r_scalp = self.r_skull + 5.5 + jit(0.8)
        # smooth spatial variation of the skull / scalp thickness (template coordinates, mm)
        tdirs = rng.normal(size=(4, 3))
        tdirs /= np.linalg.norm(tdirs, axis=1, keepdims=True)
        self.tk = tdirs * (2 * np.pi / rng.uniform(90.0, 200.0, 4))[:, None]
        self.tphase = rng.uniform(0, 2 * np.pi, 4)
        self.tamp = np.array([0.8, 0.8, 1.5, 1.5]) * rng.uniform(0.6, 1.0, 4)
        # --- contrast
        self.t1_gamma = math.exp(jit(0.08))
        self.t1_gain = 1.0 + jit(0.04)
        self.t2 = dict(csf=1.0 + jit(0.03), gm=0.56 + jit(0.02), wm=0.36 + jit(0.02))
        self.t2_gain = 1.0 + jit(0.04)
        self.ct = dict(gm=38.0 + jit(2.0), wm=28.0 + jit(2.0), csf=8.0 + jit(2.0), bone=1600.0 * (1 + jit(0.06)),
                       diploe=650.0 * (1 + jit(0.1)))
        self.pet = dict(gm=1.0, wm=0.30 * (1 + jit(0.1)), csf=0.03, gain=1.0 + jit(0.06))
        self.spect = dict(gm=1.0, wm=0.50 * (1 + jit(0.08)), csf=0.05, gain=1.0 + jit(0.06))
        # --- lesions, in template coordinates (they follow the subject's deformation)
        self.lesions = []
        lrng = _rng(seed, index, 1)
        cands = tpl.lesion_candidates
        for _ in range(n_lesions if lesions else 0):
            c = cands[lrng.integers(len(cands))] + lrng.uniform(-1.0, 1.0, 3)
            axes = lrng.uniform(4.0, 11.0, 3)
            q, _r = np.linalg.qr(lrng.normal(size=(3, 3)))
            self.lesions.append(dict(centre=c, rot=q, axes=axes, strength=float(lrng.uniform(0.75, 1.0))))

    # all functions below take world points p (..., 3) in mm as a float32 torch tensor
    def to_template(self, p: torch.Tensor) -> torch.Tensor:
        c = torch.tensor(self.CENTRE, dtype=torch.float32)
        q = (p - c) @ torch.tensor(self.A.T, dtype=torch.float32) + c + torch.tensor(self.t, dtype=torch.float32)
        if np.any(self.amp):
            ph = p @ torch.tensor(self.k.T, dtype=torch.float32)  # (..., m)
            s = torch.sin(ph[..., None] + torch.tensor(self.phase, dtype=torch.float32))  # (..., m, 3)
            q = q + (s * torch.tensor(self.amp, dtype=torch.float32)).sum(-2)
        return q

    def bias(self, p: torch.Tensor) -> torch.Tensor:
        """(2, ...) multiplicative bias fields for T1 and T2."""
        if not np.any(self.bamp):
            return torch.ones(2, *p.shape[:-1])
        ph = p @ torch.tensor(self.bk.T, dtype=torch.float32)  # (..., 3)
        out = []
        for j in range(2):
            s = torch.sin(ph + torch.tensor(self.bphase[j], dtype=torch.float32))
            out.append(torch.exp((s * torch.tensor(self.bamp[j], dtype=torch.float32)).sum(-1)))
        return torch.stack(out)

    def thickness(self, q: torch.Tensor):
        """Local skull and scalp thickness offsets (mm) at template points ``q``."""
        s = torch.sin(q @ torch.tensor(self.tk.T, dtype=torch.float32) + torch.tensor(self.tphase, dtype=torch.float32))
        s = s * torch.tensor(self.tamp, dtype=torch.float32)
        return s[..., 0] + s[..., 1], s[..., 2] + s[..., 3]

    def lesion_prob(self, q: torch.Tensor, width: float):
        """Soft lesion membership in [0, 1] at template points ``q``, and the per-voxel lesion strength."""
        prob = torch.zeros(q.shape[:-1])
        strength = torch.zeros(q.shape[:-1])
        for les in self.lesions:
            v = (q - torch.tensor(les["centre"], dtype=torch.float32)) @ torch.tensor(les["rot"], dtype=torch.float32)
            r = torch.sqrt(((v / torch.tensor(les["axes"], dtype=torch.float32)) ** 2).sum(-1))
            pl = torch.sigmoid((1.0 - r) * float(les["axes"].mean()) * (4.0 / width))
            strength = torch.where(pl > prob, torch.full_like(pl, les["strength"]), strength)
            prob = torch.maximum(prob, pl)
        return prob, strength


# --------------------------------------------------------------------------------------------- synthesis


def _tissues(tpl: _Template, subj: _Subject, q: torch.Tensor, bias: torch.Tensor, level: int, width: float) -> dict:
    """Tissue fractions / template intensities of ``subj`` at points ``q`` (..., 3) (template mm coordinates)."""
    vol, aff = tpl.level(level)
    t1, gm, wm, brain = _sample(vol, aff, q)
    dist = _sample(tpl.dist, tpl.dist_affine, q, padding="border")[0]
    lp, lstr = subj.lesion_prob(q, width)
    lp = lp * brain
    out_brain = (1.0 - brain).clamp(0, 1)
    csf_in = (brain - gm - wm).clamp(min=0)
    dskull, dscalp = subj.thickness(q)
    r_csf = subj.r_csf
    r_skull = subj.r_skull + dskull
    r_scalp = r_skull + (subj.r_scalp - subj.r_skull) + dscalp
    s_csf = _smoothstep(dist, r_csf, width)
    s_skull = _smoothstep(dist, r_skull, width)
    s_scalp = _smoothstep(dist, r_scalp, width)
    skull = (s_csf - s_skull).clamp(min=0) * out_brain
    diploe = (_smoothstep(dist, r_csf + 1.8, width) - _smoothstep(dist, r_skull - 1.8, width)).clamp(min=0)
    diploe = diploe * out_brain
    scalp = (s_skull - s_scalp).clamp(min=0) * out_brain
    fat = (_smoothstep(dist, r_skull + 1.5, width) - _smoothstep(dist, r_scalp - 1.2, width)).clamp(min=0)
    fat = fat * out_brain
    csf_out = (1.0 - s_csf) * out_brain
    head = (1.0 - s_scalp).clamp(0, 1).maximum(brain)
    return dict(t1=t1, gm=gm, wm=wm, brain=brain, csf_in=csf_in, csf_out=csf_out, skull=skull, diploe=diploe,
                cortical=(skull - diploe).clamp(min=0), scalp=scalp, fat=fat, muscle=(scalp - fat).clamp(min=0),
                head=head, lesion=lp, lesion_strength=lstr, bias=bias)


def _mr_ct(tis: dict, subj: _Subject, rng: np.random.Generator) -> dict:
    """Pointwise MR-T1, T2-like and CT-like images (in [0, 1]) from tissue maps, with noise."""
    L = tis["lesion"] * tis["lesion_strength"]
    shape = tis["t1"].shape

    def noise(sd):
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)) * sd

    head = tis["head"]
    # T1: template brain + extra-cerebral tissues (dark CSF rim, black cortical bone, grey diploe, bright fat)
    t1 = tis["t1"].clamp(min=0) ** subj.t1_gamma
    t1 = (t1 + 0.26 * tis["csf_out"] + 0.03 * tis["cortical"] + 0.42 * tis["diploe"] + 0.92 * tis["fat"]
          + 0.42 * tis["muscle"])
    t1 = t1 * (1.0 - 0.55 * L) + 0.55 * L * 0.33
    t1 = 0.92 * subj.t1_gain * t1 * tis["bias"][0]
    t1 = (t1 + noise(0.012) * head).clamp(0, 1)
    # T2-like from tissue probabilities
    p = subj.t2
    t2 = (p["csf"] * (tis["csf_in"] + tis["csf_out"]) + p["gm"] * tis["gm"] + p["wm"] * tis["wm"]
          + 0.02 * tis["cortical"] + 0.30 * tis["diploe"] + 0.62 * tis["fat"] + 0.28 * tis["muscle"])
    t2 = t2 * (1.0 - 0.7 * L) + 0.7 * L * 0.86
    t2 = 0.9 * subj.t2_gain * t2 * tis["bias"][1]
    t2 = (t2 + noise(0.015) * head).clamp(0, 1)
    # CT: HU-like, then windowed
    c = subj.ct
    hu = (c["gm"] * tis["gm"] + c["wm"] * tis["wm"] + c["csf"] * (tis["csf_in"] + tis["csf_out"])
          + c["bone"] * tis["cortical"] + c["diploe"] * tis["diploe"] - 90.0 * tis["fat"] + 45.0 * tis["muscle"])
    hu = hu + 14.0 * L * tis["brain"]
    hu = hu - 1000.0 * (1.0 - head)
    hu = hu + noise(5.0) * head
    ct = ((hu - CT_WINDOW[0]) / (CT_WINDOW[1] - CT_WINDOW[0])).clamp(0, 1)
    return dict(t1=t1, t2=t2, ct=ct)


def _activity(tis: dict, subj: _Subject) -> dict:
    """Unblurred tracer activity maps (FDG-PET-like, perfusion-SPECT-like)."""
    L = tis["lesion"] * tis["lesion_strength"]
    out = {}
    for name, par, hot in (("pet", subj.pet, 2.0), ("spect", subj.spect, 1.6)):
        a = (par["gm"] * tis["gm"] + par["wm"] * tis["wm"] + par["csf"] * (tis["csf_in"] + tis["csf_out"])
             + 0.04 * tis["skull"] + 0.12 * tis["muscle"] + 0.05 * tis["fat"])
        a = a * (1.0 - L) + L * hot
        out[name] = a * par["gain"]
    return out


def _emission(act: torch.Tensor, head: torch.Tensor, fwhm: float, spacing: float, rng, pre_sd: float,
              post_sd: float, scale: float) -> torch.Tensor:
    """Blur a 3D activity map to ``fwhm`` mm with correlated + white Poisson-like noise; scale to [0, 1]."""
    shape = act.shape
    n1 = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    n2 = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    sig = fwhm / 2.3548 / spacing
    noisy = act + pre_sd * torch.sqrt(act.clamp(min=0)) * n1 * head
    img = _blur(noisy[None, None], sig)[0, 0]
    img = img + post_sd * torch.sqrt(img.clamp(min=0)) * n2
    return (img / scale).clamp(0, 1)


def _grid(tpl: _Template, spacing: float):
    """The common 3D output grid (RAS, axis-aligned) cropped to the head, sizes rounded up to multiples of 8.

    x and y are centred on the head; z starts just above the template's lower edge (the brainstem is cut there)
    and the rounding adds air above the scalp.
    """
    ext = tpl.head_hi - tpl.head_lo
    n = np.ceil(ext / spacing).astype(int) + 1
    n = (np.ceil(n / 8) * 8).astype(int)
    centre = (tpl.head_hi + tpl.head_lo) / 2.0
    origin = centre - (n - 1) / 2.0 * spacing
    origin[2] = tpl.head_lo[2]
    origin = np.round(origin * 2.0) / 2.0  # 0.5 mm rounded origin
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = origin
    return tuple(int(v) for v in n), aff


def _grid_points(shape, aff) -> torch.Tensor:
    axes = [torch.arange(s, dtype=torch.float32) * float(aff[i, i]) + float(aff[i, 3]) for i, s in enumerate(shape)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


def _smooth_fields_on_grid(subj: _Subject, shape, aff, stride: int = 4):
    """Template coordinates (X, Y, Z, 3) and MR bias fields (2, X, Y, Z) of ``subj`` on a regular grid.

    Both are smooth (wavelengths >= 70 mm), so they are evaluated exactly on a grid ``stride`` times coarser
    spanning the same extent and trilinearly upsampled (the affine part is reproduced exactly).
    """
    nc = [max(2, int(math.ceil((s - 1) / stride)) + 1) for s in shape]
    axes = [torch.linspace(float(aff[i, 3]), float(aff[i, 3] + (s - 1) * aff[i, i]), n)
            for i, (s, n) in enumerate(zip(shape, nc))]
    pc = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    coarse = torch.cat([subj.to_template(pc).permute(3, 0, 1, 2), subj.bias(pc)], 0)[None]
    fine = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0]
    return fine[:3].permute(1, 2, 3, 0).contiguous(), fine[3:].contiguous()


# ------------------------------------------------------------------------------------------------ generation


def _save_nifti(path: Path, arr: np.ndarray, aff: np.ndarray):
    import nibabel as nib

    img = nib.Nifti1Image(arr, aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    img.header.set_xyzt_units("mm")
    if arr.dtype == np.float32:
        img.header["cal_min"], img.header["cal_max"] = 0.0, 1.0
    nib.save(img, str(path))


def _save_png(path: Path, arr: np.ndarray):
    from PIL import Image

    Image.fromarray(arr).save(str(path), format="PNG")


class _Setup:
    """Grids shared by all subjects."""

    def __init__(self, tpl: _Template, params: dict):
        self.params = params
        self.spacing = sp = params["spacing_3d"]
        self.size = size = params["size_2d"]
        self.shape, self.aff = _grid(tpl, sp)
        self.lvl3 = max(1, int(sp + 1e-6))
        self.width3 = max(0.8, 0.6 * sp)
        # 2D field of view: a square a bit larger than the head's x/y extent, radiological display
        shape, aff = self.shape, self.aff
        ext = tpl.head_hi - tpl.head_lo - 2 * _HEAD_MARGIN_MM
        fov = float(np.ceil(max(ext[0], ext[1]) * 1.06))
        cx, cy = (tpl.head_hi[:2] + tpl.head_lo[:2]) / 2.0
        self.pix = fov / size
        off = (torch.arange(size, dtype=torch.float32) + 0.5) * self.pix - fov / 2.0
        self.xs, self.ys = cx - off, cy - off  # columns: x from patient right (+x) to left; rows: anterior to posterior
        self.lvl2 = max(1, int(self.pix + 1e-6))
        self.width2 = max(0.8, 0.6 * self.pix)
        # normalised positions of the 2D pixels in the 3D grid's x/y plane (for the blurry emission images)
        gx = 2 * ((self.xs - aff[0, 3]) / sp) / (shape[0] - 1) - 1
        gy = 2 * ((self.ys - aff[1, 3]) / sp) / (shape[1] - 1) - 1
        self.grid2 = torch.stack([gy[:, None].expand(size, size), gx[None, :].expand(size, size)], -1)[None]
        tpl.level(self.lvl3), tpl.level(self.lvl2)  # build the pyramid levels before any worker thread starts


def _write_subject(out: Path, tpl: _Template, st: _Setup, index: int, n_lesions: int) -> dict:
    """Synthesise subject ``index``; write its 3D volumes and 2D slices; return its summary."""
    prm = st.params
    seed, sid = prm["seed"], f"s{index:02d}"
    subj = _Subject(seed, index, prm["lesions"], n_lesions, tpl)
    # ---- 3D
    q3, bias3 = _smooth_fields_on_grid(subj, st.shape, st.aff)
    tis = _tissues(tpl, subj, q3, bias3, st.lvl3, st.width3)
    del q3, bias3
    rng3 = _rng(seed, index, 2)
    vols = _mr_ct(tis, subj, rng3)
    act = _activity(tis, subj)
    vols["pet"] = _emission(act["pet"], tis["head"], 6.0, st.spacing, rng3, 0.5, 0.008, 1.12)
    vols["spect"] = _emission(act["spect"], tis["head"], 10.0, st.spacing, rng3, 1.5, 0.015, 1.10)
    lesion = (tis["lesion"] > 0.5).to(torch.uint8)
    area = tis["brain"].sum((0, 1)).numpy()
    del tis, act
    d3 = out / "3d" / sid
    d3.mkdir(parents=True)
    for k in ("t1", "t2", "ct", "pet", "spect"):
        # quantised to 1/4096 steps (12 bits, finer than the 8-bit PNGs): ~40 % smaller and faster to gzip
        arr = (torch.round(vols[k] * 4096.0) / 4096.0).numpy().astype(np.float32)
        _save_nifti(d3 / f"{k}.nii.gz", np.ascontiguousarray(arr), st.aff)
    _save_nifti(d3 / "lesion.nii.gz", np.ascontiguousarray(lesion.numpy()), st.aff)

    # ---- 2D: axial planes z = const of the 3D grid, evenly spaced through the brain, skipping small slices
    n = prm["slices_per_subject"]
    valid = np.nonzero(area >= 0.35 * area.max())[0]  # skip the skull base (least realistic) and vertex
    zs = np.unique(np.round(np.linspace(valid[0], valid[-1], n + 2)[1:-1]).astype(int))
    if len(zs) < n:
        zs = np.unique(np.round(np.linspace(valid[0], valid[-1], n)).astype(int))
    size, nz = st.size, len(zs)
    zw = torch.tensor(st.aff[2, 3] + zs * st.spacing, dtype=torch.float32)
    p2 = torch.stack([st.xs[None, None, :].expand(nz, size, size), st.ys[None, :, None].expand(nz, size, size),
                      zw[:, None, None].expand(nz, size, size)], -1)
    t2d = _tissues(tpl, subj, subj.to_template(p2), subj.bias(p2), st.lvl2, st.width2)
    img = {k: _to_u8(v.numpy()) for k, v in _mr_ct(t2d, subj, _rng(seed, index, 3)).items()}
    les2 = ((t2d["lesion"] > 0.5).numpy() * 255).astype(np.uint8)
    for m, lut in (("pet", hot_lut()), ("spect", jet_lut())):
        sl = vols[m][:, :, torch.from_numpy(zs)].permute(2, 0, 1)[:, None]  # (nz, 1, X, Y)
        em = F.grid_sample(sl, st.grid2.expand(nz, size, size, 2), mode="bilinear", padding_mode="zeros",
                           align_corners=True)[:, 0]
        img[m] = lut[_to_u8(em.numpy())]
    names = []
    for j, z in enumerate(zs):
        name = f"{sid}_z{int(z):03d}"
        names.append(name)
        for pair, (a, b, v) in PAIR_TYPES.items():
            _save_png(out / "2d" / pair / a / f"{name}.png", img["t1"][j])
            _save_png(out / "2d" / pair / b / f"{name}.png", img[v][j])
        _save_png(out / "2d" / "lesion_masks" / f"{name}.png", les2[j])
    return dict(id=sid, n_lesions=len(subj.lesions), lesion_voxels_3d=int(lesion.sum()), slices=[int(z) for z in zs],
                names=names)


def _generate(out: Path, params: dict):
    t0 = time.time()
    n_threads = torch.get_num_threads()
    # small tensors: intra-op threading costs more than it gains (badly so on a busy machine); instead the
    # subjects are processed by a pool of threads (torch, zlib and PNG encoding release the GIL)
    torch.set_num_threads(1)
    try:
        tpl = _template()
        st = _Setup(tpl, params)
        seed, n_sub = params["seed"], params["n_subjects"]
        n_les = _rng(seed, 10**6).integers(0, 3, n_sub)
        if params["lesions"] and n_les.sum() == 0:
            n_les[0] = 1  # guarantee at least one lesion in the dataset
        for pair, (a, b, _v) in PAIR_TYPES.items():
            (out / "2d" / pair / a).mkdir(parents=True)
            (out / "2d" / pair / b).mkdir(parents=True)
        (out / "2d" / "lesion_masks").mkdir(parents=True)
        workers = max(1, min(2, os.cpu_count() or 1, n_sub))
        with ThreadPoolExecutor(workers) as ex:
            subjects = list(ex.map(lambda i: _write_subject(out, tpl, st, i, int(n_les[i])), range(n_sub)))
    finally:
        torch.set_num_threads(n_threads)

    # datalists, split by subject: last -> validation, the one before -> testing, the rest -> training
    sids = [s["id"] for s in subjects]
    split = {sid: "training" for sid in sids}
    if len(sids) >= 2:
        split[sids[-1]] = "validation"
    if len(sids) >= 3:
        split[sids[-2]] = "testing"
    dl2 = {"training": [], "validation": [], "testing": []}
    dl3 = {"training": [], "validation": [], "testing": []}
    for s in subjects:
        sid = s["id"]
        for pair, (a, b, v) in PAIR_TYPES.items():
            for name in s["names"]:
                dl2[split[sid]].append(dict(
                    name=name, subject=sid, pair=pair, source_a=f"2d/{pair}/{a}/{name}.png",
                    source_b=f"2d/{pair}/{b}/{name}.png", modality_a=a, modality_b=b,
                    label=f"2d/lesion_masks/{name}.png"))
            dl3[split[sid]].append(dict(
                name=sid, subject=sid, pair=pair, source_a=f"3d/{sid}/t1.nii.gz", source_b=f"3d/{sid}/{v}.nii.gz",
                modality_a=a, modality_b=b, label=f"3d/{sid}/lesion.nii.gz"))
    for fname, dl in (("datalist_2d.json", dl2), ("datalist_3d.json", dl3)):
        with open(out / fname, "w") as f:
            json.dump(dl, f, indent=1)
    for s in subjects:
        s.pop("names")
    meta = dict(
        version=VERSION, params=params,
        info=dict(
            source="MNI152 2009 sym (09a) T1/GM/WM templates shipped with nilearn",
            grid_shape=list(st.shape), affine=st.aff.tolist(), pixel_mm_2d=st.pix, ct_window_hu=list(CT_WINDOW),
            pet_fwhm_mm=6.0, spect_fwhm_mm=10.0, split=split, subjects=subjects,
            generation_seconds=round(time.time() - t0, 2),
        ),
    )
    tmp = out / (_META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, out / _META)  # written last: its presence marks a complete dataset


# --------------------------------------------------------------------------------------------------- preview


def save_preview(root, path, name=None):
    """Save a montage (T1, T2, CT, PET, SPECT, lesion) of one 2D slice of a generated dataset to ``path``."""
    from PIL import Image

    root = Path(root)
    if name is None:  # the slice with the largest lesion, else the middle slice of the first subject
        masks = sorted((root / "2d" / "lesion_masks").glob("*.png"))
        area = [int(np.count_nonzero(np.asarray(Image.open(p)))) for p in masks]
        first = [p for p in masks if p.stem[:3] == masks[0].stem[:3]]
        name = masks[int(np.argmax(area))].stem if max(area) > 0 else first[len(first) // 2].stem
    files = [root / "2d/T2-T1/T1", root / "2d/T2-T1/T2", root / "2d/CT-MRI/CT", root / "2d/PET-MRI/PET",
             root / "2d/SPECT-MRI/SPECT", root / "2d/lesion_masks"]
    tiles = [np.asarray(Image.open(d / f"{name}.png").convert("RGB")) for d in files]
    Image.fromarray(np.concatenate(tiles, 1)).save(str(path))
    return str(path)


def main(argv=None):
    bundle_root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description="Generate the embedded MNI152-derived multimodal phantom dataset.")
    ap.add_argument("--root", default=default_dataset_dir(bundle_root), help="output dataset directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n_subjects", type=int, default=6)
    ap.add_argument("--size_2d", type=int, default=128)
    ap.add_argument("--slices_per_subject", type=int, default=8)
    ap.add_argument("--spacing_3d", type=float, default=2.0)
    ap.add_argument("--no_lesions", action="store_true")
    ap.add_argument("--force", action="store_true", help="regenerate even if a matching cache exists")
    ap.add_argument("--preview", default=None, help="also save a montage of one slice to this PNG path")
    args = ap.parse_args(argv)
    t0 = time.time()
    root = ensure_phantom_dataset(args.root, seed=args.seed, n_subjects=args.n_subjects, size_2d=args.size_2d,
                                  slices_per_subject=args.slices_per_subject, spacing_3d=args.spacing_3d,
                                  lesions=not args.no_lesions, force=args.force)
    print(f"phantom dataset ready at {root} ({time.time() - t0:.1f} s)")
    if args.preview:
        print("preview:", save_preview(root, args.preview))
    return 0


if __name__ == "__main__":
    sys.exit(main())
