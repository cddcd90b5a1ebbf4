"""Parameter-free classical fusion baselines with the bundle's network contract.

Every module takes ``x`` of shape ``(B, 2, *spatial)`` (2D ``(B,2,H,W)`` or 3D ``(B,2,D,H,W)``) with
intensities in [0, 1], channel 0 = MRI and channel 1 = the other modality, and returns the fused image
``(B, 1, *spatial)`` in [0, 1] with the input's dtype. ``forward(x, mode="fuse")`` is the only mode (these
methods do not register). The modules own no parameters and no buffers, so ``state_dict()`` is empty and
checkpoint/export code that expects a network works unchanged. All are batched torch (CPU or CUDA).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["AverageFusion", "MaxFusion", "LaplacianPyramidFusion", "GuidedFilterFusion"]


def _check_input(x: torch.Tensor, mode: str) -> int:
    if mode != "fuse":
        raise ValueError(f"classical fusion baselines only support mode='fuse', got {mode!r}")
    if x.dim() not in (4, 5) or x.shape[1] != 2:
        raise ValueError(f"expected x of shape (B,2,H,W) or (B,2,D,H,W) (MRI, other modality), got {tuple(x.shape)}")
    return x.dim() - 2


class _Baseline(nn.Module):
    """Parameter-free fusion of (B, 2, *spatial) -> (B, 1, *spatial); ``spatial_dims`` is checked against the input."""

    def __init__(self, spatial_dims: int = 2):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor, mode: str = "fuse") -> torch.Tensor:
        if _check_input(x, mode) != self.spatial_dims:
            raise ValueError(f"{type(self).__name__}(spatial_dims={self.spatial_dims}) got a {x.dim() - 2}D input")
        return self.fuse(x[:, 0:1], x[:, 1:2])

    def fuse(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class AverageFusion(_Baseline):
    """F = (MRI + other) / 2."""

    def fuse(self, a, b):
        return (a + b) / 2


class MaxFusion(_Baseline):
    """F = max(MRI, other), pixel-wise."""

    def fuse(self, a, b):
        return torch.maximum(a, b)


# ------------------------------------------------------------------------------------------ helpers
def _conv_axis(x: torch.Tensor, k: list, dim: int) -> torch.Tensor:
    """'valid' correlation with the 1-D kernel k along spatial ``dim`` (x is (N,1,*S)), as shift-and-add of
    ``len(k)`` slices (zero taps skipped): faster than a float64 convolution on CPU, and exportable to ONNX in
    float64 (onnxruntime has no float64 Conv)."""
    n = x.shape[dim] - len(k) + 1
    out = None
    for i, w in enumerate(k):
        if w == 0:
            continue
        term = x.narrow(dim, i, n) * w
        out = term if out is None else out + term
    return out if out is not None else x.narrow(dim, 0, n) * 0


def _pad_axis(x: torch.Tensor, dim: int, lo: int, hi: int) -> torch.Tensor:
    """Replicate-pad one spatial dim (any amount, any size >= 1)."""
    if not (lo or hi):
        return x
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, x.shape[dim] - 1, 1)
    return torch.cat([first.repeat_interleave(lo, dim), x, last.repeat_interleave(hi, dim)], dim)


def _sep_filter(x: torch.Tensor, k: list) -> torch.Tensor:
    """'same' separable filtering with replicate padding along every spatial dim."""
    r = len(k) // 2
    for d in range(2, x.dim()):
        x = _conv_axis(_pad_axis(x, d, r, r), k, d)
    return x


_BINOMIAL = [1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16]


def _reduce(x: torch.Tensor) -> torch.Tensor:
    """Burt-Adelson REDUCE: binomial 5-tap blur, keep every second sample (sizes must be even)."""
    y = _sep_filter(x, _BINOMIAL)
    return y[(slice(None), slice(None)) + (slice(None, None, 2),) * (x.dim() - 2)]


def _expand(x: torch.Tensor) -> torch.Tensor:
    """Burt-Adelson EXPAND (zero insertion + 2 x binomial blur) in polyphase form, replicate borders:
    even outputs (x[i-1] + 6 x[i] + x[i+1]) / 8, odd outputs (x[i] + x[i+1]) / 2; doubles every dim."""
    for d in range(2, x.dim()):
        n = x.shape[d]
        p = _pad_axis(x, d, 1, 1)
        even = (p.narrow(d, 0, n) + 6 * p.narrow(d, 1, n) + p.narrow(d, 2, n)) / 8
        odd = (p.narrow(d, 1, n) + p.narrow(d, 2, n)) / 2
        x = torch.stack([even, odd], d + 1).flatten(d, d + 1)
    return x


class LaplacianPyramidFusion(_Baseline):
    """Laplacian-pyramid fusion (Burt & Adelson 1983; Burt & Kolczynski 1993 selection rule).

    Each source is decomposed into ``levels`` Laplacian detail bands (binomial 5-tap REDUCE/EXPAND) and a
    Gaussian base; detail coefficients are chosen by maximum absolute value (ties -> MRI), the bases are
    averaged, and the pyramid is collapsed. Any size (odd included) works: inputs are replicate-padded to a
    multiple of 2**levels and the result is cropped back. 2D and 3D. With identical inputs the output equals
    the input up to float rounding (perfect reconstruction). The result is clipped to [0, 1] when ``clip``.
    """

    def __init__(self, levels: int = 4, clip: bool = True, spatial_dims: int = 2):
        super().__init__(spatial_dims)
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.levels, self.clip = int(levels), bool(clip)

    def decompose(self, x: torch.Tensor) -> list:
        """[L_0, ..., L_{levels-1}, G_levels] for x whose sizes are multiples of 2**levels."""
        pyr = []
        for _ in range(self.levels):
            g = _reduce(x)
            pyr.append(x - _expand(g))
            x = g
        return pyr + [x]

    def collapse(self, pyr: list) -> torch.Tensor:
        x = pyr[-1]
        for lap in reversed(pyr[:-1]):
            x = _expand(x) + lap
        return x

    def fuse(self, a, b):
        sizes = a.shape[2:]
        m = 2 ** self.levels
        ab = torch.cat([a, b], 0)
        for i, n in enumerate(sizes):
            ab = _pad_axis(ab, 2 + i, 0, (-n) % m)
        pyr = [lvl.chunk(2, 0) for lvl in self.decompose(ab)]
        fused = [torch.where(la.abs() >= lb.abs(), la, lb) for la, lb in pyr[:-1]] + [(pyr[-1][0] + pyr[-1][1]) / 2]
        out = self.collapse(fused)[(slice(None), slice(None)) + tuple(slice(0, n) for n in sizes)]
        return out.clamp(0, 1) if self.clip else out


def _box_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over a (2r+1)^nd window truncated at the borders (He et al.'s boxfilter / N), via cumsums."""
    for d in range(2, x.dim()):
        n = x.shape[d]
        c = torch.cumsum(x, d)
        c = torch.cat([torch.zeros_like(c.narrow(d, 0, 1)), c], d)
        idx = torch.arange(n, device=x.device)
        hi, lo = (idx + r + 1).clamp(max=n), (idx - r).clamp(min=0)
        cnt = (hi - lo).to(x.dtype).view([-1 if i == d else 1 for i in range(x.dim())])
        x = (c.index_select(d, hi) - c.index_select(d, lo)) / cnt
    return x


def guided_filter(p: torch.Tensor, guide: torch.Tensor, r: int, eps: float) -> torch.Tensor:
    """He et al. guided filter (grey guide): q = mean(a) I + mean(b), a = cov(I,p)/(var(I)+eps)."""
    mi, mp = _box_mean(guide, r), _box_mean(p, r)
    a = (_box_mean(guide * p, r) - mi * mp) / (_box_mean(guide * guide, r) - mi * mi + eps)
    b = mp - a * mi
    return _box_mean(a, r) * guide + _box_mean(b, r)


class GuidedFilterFusion(_Baseline):
    """GFF, guided-filtering fusion (S. Li, X. Kang, J. Hu, IEEE TIP 22(7), 2013).

    1. Two-scale decomposition: base B_n = mean filter of I_n (``avg_size`` = 31 window, truncated at the
       borders), detail D_n = I_n - B_n.
    2. Saliency S_n = |Laplacian(I_n)| (3x3, 6-neighbour in 3D) smoothed by a Gaussian of radius ``r_g`` = 5
       and sigma ``sigma_g`` = 5; binary maps P_n = [S_n == max_m S_m] (ties give both maps a 1).
    3. Weights W_n^B = GF(P_n, guide I_n, ``r1`` = 45, ``eps1`` = 0.3), W_n^D = GF(P_n, I_n, ``r2`` = 7,
       ``eps2`` = 1e-6) (He et al. guided filter), clipped at 0 and normalised to sum 1 at every pixel.
    4. F = sum_n W_n^B B_n + sum_n W_n^D D_n, clipped to [0,1].
    Parameters are the paper's defaults, which assume intensities in [0,1]. Computed in float64 (eps2 = 1e-6
    is below float32 cumulative-sum noise) and returned in the input dtype. 2D and 3D. Identical inputs are
    returned unchanged (weights 1/2 everywhere).
    """

    def __init__(self, avg_size: int = 31, r_g: int = 5, sigma_g: float = 5.0, r1: int = 45, eps1: float = 0.3,
                 r2: int = 7, eps2: float = 1e-6, spatial_dims: int = 2):
        super().__init__(spatial_dims)
        if avg_size % 2 != 1:
            raise ValueError(f"avg_size must be odd, got {avg_size}")
        self.avg_size, self.r_g, self.sigma_g = avg_size, r_g, sigma_g
        self.r1, self.eps1, self.r2, self.eps2 = r1, eps1, r2, eps2

    def fuse(self, a, b):
        dtype = a.dtype
        imgs = torch.cat([a, b], 0).to(torch.float64)
        nd = imgs.dim() - 2
        base = _box_mean(imgs, self.avg_size // 2)
        detail = imgs - base
        lap = -2 * nd * imgs
        for d in range(2, imgs.dim()):
            lap = lap + _conv_axis(_pad_axis(imgs, d, 1, 1), [1.0, 0.0, 1.0], d)
        g = [math.exp(-(i * i) / (2 * self.sigma_g ** 2)) for i in range(-self.r_g, self.r_g + 1)]
        sal = _sep_filter(lap.abs(), [v / sum(g) for v in g])
        sa, sb = sal.chunk(2, 0)
        smax = torch.maximum(sa, sb)
        p = torch.cat([(sa == smax), (sb == smax)], 0).to(torch.float64)
        wb = guided_filter(p, imgs, self.r1, self.eps1).clamp_min(0)
        wd = guided_filter(p, imgs, self.r2, self.eps2).clamp_min(0)

        def norm(w):
            w0, w1 = w.chunk(2, 0)
            s = w0 + w1
            ok = s > 1e-12
            return torch.where(ok, w0 / torch.where(ok, s, 1.0), 0.5), torch.where(ok, w1 / torch.where(ok, s, 1.0), 0.5)

        (wb0, wb1), (wd0, wd1) = norm(wb), norm(wd)
        b0, b1 = base.chunk(2, 0)
        d0, d1 = detail.chunk(2, 0)
        out = wb0 * b0 + wb1 * b1 + wd0 * d0 + wd1 * d1
        return out.clamp(0, 1).to(dtype)
