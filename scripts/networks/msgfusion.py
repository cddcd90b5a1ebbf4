"""MsgFusion: medical-semantic-guided two-branch network for multimodal brain image fusion.

Wen et al., "MsgFusion: Medical Semantic Guided Two-Branch Network for Multimodal Brain Image Fusion",
IEEE Transactions on Multimedia. Built from the paper's description (the PAPER's method); where the paper is
silent the public code (``22385wjy/MsgFusion``, described in ``shared/design/msgfusion.md``) or the choices listed in
``docs/README.md`` are followed. Written from scratch; nothing is copied from the official code.

Notation: ``F = features``, ``K[i->o]`` = replicate-padded 3x3 conv (no bias) + BN + ReLU, ``W(A, B)`` = per-pixel
softmax-weighted map fusion of A and B by their channel means (:func:`weighted_map_fusion`).

Data flow (``x`` = ``(B, 2|3, *S)``: MRI, other modality's grey/luminance, optional V')::

    SF branch (MRI only):
        SF1 = LeakyReLU0.2(BN(Conv7x7[1->F](mri)))                      # spatial domain
        P   = ReLU(BN(Conv3x3[1->F](mri)))                               # features taken to the frequency domain
        Z   = rfft(P);  A = |Z|, phi = angle(Z)
        A'  = C1(LReLU(C1(A))),  phi' = C1(LReLU(C1(phi)))               # learnable amplitude / phase processing
        SF2 = P + irfft(A' exp(i phi'))                                  # (use_frequency=False: SF2 = P)
        SF  = W(SF2, SF1)
    GV branch (CT / PET-Y / SPECT-Y):
        GV1 = two-scale cascade of weight-shared K blocks with max-pooling, nearest upsampling and skips, tanh
        V'  = modified HSV brightness of the other modality (variant-specific, see :func:`msgfusion_v_prime`)
    Classification-based hierarchical fusion:
        p   = softmax(Classifier(pool_r(cat(SF, GV1))))  upsampled     # (anatomical, functional, mixed) per region
        Fe  = p_a * SF + p_f * GV1 + p_m * max(SF, GV1)                  # level 2: class-steered feature fusion
        F1  = Dec(Fe)                                                   # level 3: reconstruction
        F2  = W(V', Dec(SF1-conv(V')))                                  # level 4: V' image (shared conv7 + decoder)
        out = F1 + p_f * ReLU(F2 - F1)                                  # class-gated max(F1, F2); F1 if no V'
    Dec = tanh(C1[F/2->1](LReLU0.2(C3[F->F/2](.))))
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from .blocks import autocast_off, conv_nd, fold_bn, set_fast

__all__ = [
    "MsgFusion",
    "MsgFusionGVBranch",
    "MsgFusionSFBranch",
    "FourierUnit",
    "RegionClassifier",
    "msgfusion_v_prime",
    "weighted_map_fusion",
    "VARIANTS",
    "REGION_CLASSES",
]

VARIANTS = ("functional", "ct")
REGION_CLASSES = ("anatomical", "functional", "mixed")


# ------------------------------------------------------------------------------------------------ helpers
def weighted_map_fusion(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``W(a, b) = w_a a + w_b b`` with ``(w_a, w_b) = softmax(mean_c a, mean_c b)`` per pixel (B, 1, *S) weights.

    The paper's "weighted feature-map fusion"; the public code uses ``exp / (sum exp + 1e-5)``, this is the exact
    softmax (numerically stable; differs by at most ~1e-5 relative).
    """
    w = torch.softmax(torch.stack([a.mean(1, keepdim=True), b.mean(1, keepdim=True)]), dim=0)
    return w[0] * a + w[1] * b


def msgfusion_v_prime(img: torch.Tensor, variant: str = "functional", normalize: bool = True) -> torch.Tensor:
    """The modified HSV brightness V' of MsgFusion's GV branch, ``(B, 1|3, *S)`` in [0, 1] -> ``(B, 1, *S)``.

    ``img`` is the other modality: RGB (colour PET/SPECT) or grey (treated as R = G = B). With ``S = R + G + B``:

    - ``variant="functional"`` (MR-PET/SPECT): ``V' = clip(S - max(R, G, B))`` = the sum of the two non-maximal
      channels (HSV V is ``max(R, G, B)``), which keeps bright, yellow-white (high-uptake) colours and suppresses
      saturated red/blue (low uptake). For grey ``y``: ``min(2y, 1)``.
    - ``variant="ct"`` (CT-MR): ``V' = clip(S - 1)``, for grey ``y``: ``clip(3y - 1)``, zero below y = 1/3 and
      saturated above 2/3, i.e. it keeps the dense tissue / bone of the CT.

    (both are the public code's formulas on the 0..1 scale, without its 8-bit truncation). ``normalize`` min-max
    scales each image to [0, 1] as the public code does; a constant V' becomes all zeros.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if img.shape[1] not in (1, 3):
        raise ValueError(f"V' needs a grey (1) or RGB (3) image, got {img.shape[1]} channels")
    if img.shape[1] == 1:
        total, vmax = 3.0 * img, img
    else:
        total, vmax = img.sum(1, keepdim=True), img.amax(1, keepdim=True)
    v = (total - vmax if variant == "functional" else total - 1.0).clamp(0.0, 1.0)
    if not normalize:
        return v
    dims = tuple(range(2, v.ndim))
    lo, hi = v.amin(dims, keepdim=True), v.amax(dims, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (v - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(v))


def _safe_angle(re: torch.Tensor, im: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``atan2(im, re)`` whose gradient is ``(-im, re) / (re^2 + im^2 + eps)``: finite at and near ``z = 0``
    (``torch.angle`` gives NaN/huge gradients for the zero coefficients of e.g. an all-zero ReLU channel). Plain
    tensor ops (no custom autograd Function), so it traces/exports."""
    with torch.no_grad():
        denom = re * re + im * im + eps
        re_d, im_d = re / denom, im / denom
    surrogate = re_d * im - im_d * re  # value irrelevant, gradient is the wanted one
    return torch.atan2(im, re).detach() + (surrogate - surrogate.detach())


class _DebiasedRunningStats:
    """BatchNorm whose running statistics are a bias-free average: momentum ``max(momentum, 1 / n)`` for the n-th
    training batch (a plain mean over the first ``1 / momentum`` batches, then PyTorch's EMA). Parameters, state
    dict and train-mode outputs are those of ``nn.BatchNorm``; only eval mode after few batches differs (PyTorch's
    EMA starts from mean 0 / variance 1 and needs ~100 batches to forget it, which a short CPU run never reaches)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            if not hasattr(self, "_base_momentum"):
                self._base_momentum = self.momentum
            if self._base_momentum is not None:  # None: PyTorch's cumulative average, already bias-free
                # the batch count mirrored in Python: reading the buffer every step would sync a GPU per layer
                if "_seen" not in self.__dict__:
                    self._seen = int(self.num_batches_tracked)
                self.momentum = max(self._base_momentum, 1.0 / (self._seen + 1))
                self._seen += 1
        return super().forward(x)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.__dict__.pop("_seen", None)  # re-read the loaded count


class _BatchNorm2d(_DebiasedRunningStats, nn.BatchNorm2d):
    pass


class _BatchNorm3d(_DebiasedRunningStats, nn.BatchNorm3d):
    pass


def _batch_norm(spatial_dims: int, channels: int) -> nn.Module:
    return (_BatchNorm2d if spatial_dims == 2 else _BatchNorm3d)(channels)


def _replicate_conv(spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int, bias: bool = False) -> nn.Module:
    return Conv[Conv.CONV, spatial_dims](
        in_ch, out_ch, kernel_size, padding=kernel_size // 2, padding_mode="replicate", bias=bias
    )


def _upsample2_to(x: torch.Tensor, size) -> torch.Tensor:
    """x2 nearest upsampling cropped to ``size`` (exact inverse layout of a ``ceil_mode`` 2x2 pool)."""
    up = F.interpolate(x, scale_factor=2, mode="nearest")
    if tuple(up.shape[2:]) != tuple(size):
        up = up[(..., *(slice(0, s) for s in size))]
    return up


class ConvBlock(nn.Module):
    """``K[i->o]``: replicate-padded 3x3 conv (no bias), BatchNorm, ReLU (the public code's ConvBlock).

    The conv is shared by every call site (the public code reuses its blocks); each of the ``sites`` call sites
    has its own BatchNorm (``forward(x, site)``) unless ``share_norm``, where one BN serves every site as in the
    public code (its running statistics then average over inputs of different distributions, so eval-mode outputs
    drift from train-mode ones).
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, sites: int = 1, share_norm: bool = False) -> None:
        super().__init__()
        self.conv = _replicate_conv(spatial_dims, in_ch, out_ch, 3)
        self.norms = nn.ModuleList(_batch_norm(spatial_dims, out_ch) for _ in range(1 if share_norm else sites))
        self.sites = sites

        self.fast = True

    def _norm(self, site: int) -> nn.Module:
        if not 0 <= site < self.sites:
            raise IndexError(f"site {site} out of range for a block with {self.sites} call sites")
        return self.norms[min(site, len(self.norms) - 1)]

    def plain(self, x: torch.Tensor, site: int = 0) -> torch.Tensor:
        """The reference computation (conv, BatchNorm, ReLU), whatever ``fast`` says."""
        return torch.relu(self._norm(site)(self.conv(x)))

    def forward(self, x: torch.Tensor, site: int = 0) -> torch.Tensor:
        norm = self._norm(site)
        if self.fast and not norm.training:  # BatchNorm folded into the conv
            w, b = fold_bn(norm, self.conv.weight, None)
            return torch.relu_(self.conv._conv_forward(x, w, b))
        return torch.relu(norm(self.conv(x)))

    def forward_upsampled(self, v: torch.Tensor, size, site: int = 0) -> torch.Tensor:
        """``forward(up2(v)[crop to size], site)`` without building the x2 nearest-upsampled input.

        A 3x3 conv (replicate padding) of a nearest-upsampled map is, on each of the ``2^d`` output phases, a 2x2
        conv of the low-resolution map whose taps are sums of the 3x3 taps (per axis: phase 0 reads offsets
        (-1, 0) with weights (k[-1], k[0] + k[1]), phase 1 offsets (0, +1) with (k[-1] + k[0], k[1])); replicate
        padding of ``v`` by one is exactly the replicate padding of the upsampled map, odd ``size`` included. Same
        values (float rounding) with 4/9 of the multiply-adds, at a quarter of the pixels in 2D.
        """
        norm = self._norm(site)
        nd = v.ndim - 2
        w, b = self.conv.weight, None
        if not norm.training:
            w, b = fold_bn(norm, w, None)
        taps = w.new_tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # (phase, 2, 3)
        vp = F.pad(v, (1, 1) * nd, mode="replicate")
        low = v.shape[2:]
        conv = F.conv2d if nd == 2 else F.conv3d
        phases = []
        for index in range(2 ** nd):
            ph = [(index >> (nd - 1 - a)) & 1 for a in range(nd)]  # phase per axis, last axis fastest
            k = w
            with autocast_off(w.device.type):  # kernel algebra in the weights' dtype
                for a, p in enumerate(ph):  # combine the taps of spatial axis a
                    k = torch.tensordot(k, taps[p], dims=([2 + a], [1])).movedim(-1, 2 + a)
            view = vp[(..., *(slice(p, p + int(n) + 1) for p, n in zip(ph, low)))]
            phases.append(conv(view, k, b))
        out = torch.stack(phases, -1).view(*phases[0].shape, *([2] * nd))  # (N, O, *low, *phase)
        order = [0, 1] + [i for a in range(nd) for i in (2 + a, 2 + nd + a)]
        out = out.permute(order).reshape(*out.shape[:2], *[2 * n for n in low])
        out = out[(..., *(slice(0, int(s)) for s in size))]
        return torch.relu(out if not norm.training else norm(out))


# --------------------------------------------------------------------------------------------- SF branch
class FourierUnit(nn.Module):
    """Learnable amplitude/phase processing in the frequency domain, ``(N, C, *S) -> (N, C, *S)``.

    ``Z = rfftn(x)`` (orthonormal, over the spatial axes), amplitude ``|Z|`` and phase ``angle(Z)`` each go through
    ``1x1 conv -> LeakyReLU(0.1) -> 1x1 conv`` (mixing channels at every frequency), the spectrum is rebuilt as
    ``A' exp(i phi')`` and brought back with ``irfftn`` to the input size (odd sizes included). The amplitude
    convs have no bias, so the amplitude map is positively homogeneous (``A'(cA) = c A'(A)``): the low-frequency
    amplitudes grow with the image size, and this keeps a model trained on crops consistent on whole images.
    """

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()

        def mlp(bias):
            return nn.Sequential(
                conv_nd(spatial_dims, channels, channels, 1, bias=bias),
                nn.LeakyReLU(0.1),
                conv_nd(spatial_dims, channels, channels, 1, bias=bias),
            )

        self.amplitude = mlp(bias=False)
        self.phase = mlp(bias=True)
        self.export_mode = False  # True (scripts/export.py, ONNX): real DFT matrices instead of complex FFTs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.export_mode:
            return self._forward_real_dft(x)
        dims = tuple(range(2, x.ndim))
        size = x.shape[2:]
        with autocast_off(x.device.type):  # FFTs and spectra in float32 under AMP
            z = torch.fft.rfftn(x.float(), dim=dims, norm="ortho")
            amp = self.amplitude(z.abs())
            pha = self.phase(_safe_angle(z.real, z.imag))
            z = torch.complex(amp * torch.cos(pha), amp * torch.sin(pha))
            out = torch.fft.irfftn(z, s=size, dim=dims, norm="ortho")
        return out.to(x.dtype)


    def _forward_real_dft(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with the orthonormal ``rfftn`` / ``irfftn`` written as products with real cosine / sine
        matrices of the input size (real and imaginary parts carried separately): for exporters without complex
        tensors (ONNX). Same values within float rounding; O(S) more multiply-adds than an FFT."""
        x = x.float()
        dev = x.device
        spatial = [int(s) for s in x.shape[2:]]
        w = spatial[-1]
        half = w // 2 + 1
        kw = torch.arange(half, dtype=torch.float64, device=dev)
        ang = 2 * torch.pi * torch.arange(w, dtype=torch.float64, device=dev)[:, None] * kw[None] / w  # (W, half)
        cw, sw = (torch.cos(ang) / w**0.5).float(), (torch.sin(ang) / w**0.5).float()
        re, im = x @ cw, -(x @ sw)  # rfft along the last axis
        mats = []
        for axis, n in enumerate(spatial[:-1]):  # complex DFT along every other spatial axis
            k = torch.arange(n, dtype=torch.float64, device=dev)
            a = 2 * torch.pi * k[:, None] * k[None] / n
            c, s_ = (torch.cos(a) / n**0.5).float(), (torch.sin(a) / n**0.5).float()
            mats.append((c, s_))
            dim = 2 + axis
            re_m, im_m = re.movedim(dim, -1), im.movedim(dim, -1)
            re, im = (re_m @ c + im_m @ s_).movedim(-1, dim), (im_m @ c - re_m @ s_).movedim(-1, dim)
        # self-conjugate bins (index 0 or n/2 on every axis) are real: the FFT returns +0.0 as their imaginary part,
        # so their phase is exactly 0 or +pi; the matrix products leave +-1e-8 there, and atan2 jumps to -pi
        real_bin = torch.ones((), dtype=torch.bool, device=dev)
        for axis, n in enumerate(spatial[:-1] + [w]):
            idx = torch.arange(half if axis == len(spatial) - 1 else n, device=dev)
            flag = (idx == 0) | ((idx * 2 == n) & (n % 2 == 0))
            real_bin = real_bin & flag.view(*([1] * axis), -1, *([1] * (len(spatial) - 1 - axis)))
        im = torch.where(real_bin, torch.zeros((), dtype=im.dtype), im)
        amp = self.amplitude(torch.sqrt(re * re + im * im))
        pha = self.phase(torch.atan2(im, re))
        re, im = amp * torch.cos(pha), amp * torch.sin(pha)
        for axis, (c, s_) in enumerate(mats):  # inverse complex DFTs
            dim = 2 + axis
            re_m, im_m = re.movedim(dim, -1), im.movedim(dim, -1)
            re, im = (re_m @ c - im_m @ s_).movedim(-1, dim), (im_m @ c + re_m @ s_).movedim(-1, dim)
        # Hermitian half-spectrum: interior bins count twice
        weight = torch.full((half,), 2.0, dtype=torch.float64, device=dev)
        weight[0] = 1.0
        if w % 2 == 0:
            weight[-1] = 1.0
        icw, isw = (cw.double().t() * weight[:, None]).float(), (sw.double().t() * weight[:, None]).float()
        return re @ icw - im @ isw  # C2R along the last axis (imaginary parts of DC / Nyquist drop out)


class MsgFusionSFBranch(nn.Module):
    """Spatial + frequency (SF) branch for the MRI, ``(N, 1, *S) -> (N, F, *S)`` (see module docstring).

    ``spatial`` (conv 7x7, 64 channels, BN, LeakyReLU; the paper's SF1) is also used on V' in the fusion stage
    (:meth:`spatial_features`, ``site=1``: same conv, its own BN unless ``share_norm``). ``use_frequency=False``
    removes the Fourier unit (then ``SF2`` is the plain conv features, which is what the public code's no-op
    FFT/shift/IFFT/modulus step computes).
    """

    def __init__(self, spatial_dims: int = 2, features: int = 64, use_frequency: bool = True,
                 share_norm: bool = False) -> None:
        super().__init__()
        self.spatial = conv_nd(spatial_dims, 1, features, 7)
        self.spatial_norms = nn.ModuleList(_batch_norm(spatial_dims, features) for _ in range(1 if share_norm else 2))
        self.pre = ConvBlock(spatial_dims, 1, features)
        self.fourier = FourierUnit(spatial_dims, features) if use_frequency else None

    def spatial_features(self, x: torch.Tensor, site: int = 0) -> torch.Tensor:
        """SF1 = LeakyReLU0.2(BN(Conv7x7(x))); ``site`` 0 = MRI, 1 = V'."""
        return F.leaky_relu(self.spatial_norms[min(site, len(self.spatial_norms) - 1)](self.spatial(x)), 0.2)

    def forward(self, mri: torch.Tensor, return_parts: bool = False):
        sf1 = self.spatial_features(mri, 0)
        # always the plain conv + BN here: the Fourier unit's phases are discontinuous at (near-)zero spectral
        # coefficients, so a 1-ulp change of these features (e.g. a folded BatchNorm) can move SF2 by ~1e-3
        pre = self.pre.plain(mri)
        sf2 = pre + self.fourier(pre) if self.fourier is not None else pre
        sf = weighted_map_fusion(sf2, sf1)
        return (sf, sf1, sf2) if return_parts else sf


# --------------------------------------------------------------------------------------------- GV branch
class MsgFusionGVBranch(nn.Module):
    """Grey multi-scale cascade (GV1) for CT / PET-Y / SPECT-Y, ``(N, 1, *S) -> (N, F, *S)`` in [0, 1).

    Two scales (full, 1/2) joined by max-pooling, nearest upsampling and concatenation skips, with nine conv
    blocks each reused at several sites (20 calls), as the public code: ``K2 F->F, K3 F->2F, K4 2F->4F, K5 4F->F,
    K7 4F->4F, K8 4F->2F, K9 2F->F, K10 3F->2F, K11 6F->4F``. ``c1 = stem(x)`` (7x7 conv, no bias, replicate pad)::

        p = pool(c1); a2 = K2(p); a7 = K7(cat(up(K3(a2)), up(p), up(a2)))        # half-scale path
        d2 = K2(c1); b = K4(K3(d2)); m = K5(max(a7, b))                           # full-scale path, scale merge
        t = K9(K8(a7)); t = K9(cat(t, m)); GA = K9(cat(t, m))
        d3 = K3(K9(cat(c1, d2))); d4 = K4(K10(cat(d2, d3))); GC = K5(K11(cat(d3, d4)))   # dense skips
        GV1 = tanh(K2(K9(cat(GC, GA))))

    Odd sizes: the pool uses ``ceil_mode`` and the upsampled maps are cropped back. Each call site has its own
    BatchNorm (``share_norm=True``: one per block, as the public code). ``d2`` is computed once (the public code
    computes the identical ``K2(c1)`` twice).
    """

    SITES = {"k2": 3, "k3": 3, "k4": 2, "k5": 2, "k7": 1, "k8": 1, "k9": 5, "k10": 1, "k11": 1}

    def __init__(self, spatial_dims: int = 2, features: int = 64, share_norm: bool = False) -> None:
        super().__init__()
        f = features
        self.stem = _replicate_conv(spatial_dims, 1, f, 7, bias=False)
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2, ceil_mode=True)
        chans = {"k2": (f, f), "k3": (f, 2 * f), "k4": (2 * f, 4 * f), "k5": (4 * f, f), "k7": (4 * f, 4 * f),
                 "k8": (4 * f, 2 * f), "k9": (2 * f, f), "k10": (3 * f, 2 * f), "k11": (6 * f, 4 * f)}
        for name, (i, o) in chans.items():
            self.add_module(name, ConvBlock(spatial_dims, i, o, self.SITES[name], share_norm))

        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.stem(x)
        size = c1.shape[2:]
        p = self.pool(c1)
        a2 = self.k2(p, 0)
        if self.fast and x.ndim == 4:  # K7 of the upsampled maps at half resolution (ConvBlock.forward_upsampled;
            # in 3D oneDNN's 2x2x2 convs are no faster than the 3x3x3 one, measured)
            a7 = self.k7.forward_upsampled(torch.cat([self.k3(a2, 0), p, a2], 1), size)
        else:
            a7 = self.k7(torch.cat([_upsample2_to(t, size) for t in (self.k3(a2, 0), p, a2)], 1))
        d2 = self.k2(c1, 1)
        m = self.k5(torch.maximum(a7, self.k4(self.k3(d2, 1), 0)), 0)
        t = self.k9(self.k8(a7), 0)
        t = self.k9(torch.cat([t, m], 1), 1)
        ga = self.k9(torch.cat([t, m], 1), 2)
        d3 = self.k3(self.k9(torch.cat([c1, d2], 1), 3), 2)
        d4 = self.k4(self.k10(torch.cat([d2, d3], 1)), 1)
        gc = self.k5(self.k11(torch.cat([d3, d4], 1)), 1)
        return torch.tanh(self.k2(self.k9(torch.cat([gc, ga], 1), 4), 2))


# ------------------------------------------------------------------------------------------ fusion stage
class RegionClassifier(nn.Module):
    """Soft region classes ``(N, 3, *S)`` (anatomical, functional, mixed; sum 1) from the two branch features.

    The features ``(N, 2F, *S)`` are average-pooled to regions of ``region_size`` pixels (adaptive, so any size
    works), classified by ``3x3 conv -> LeakyReLU -> 1x1 conv -> softmax`` (the 3x3 conv sees neighbouring
    regions), and the probabilities are interpolated back (linear, so they still sum to 1). The last conv starts at
    zero: every region begins as an equal mix of the three rules. Trained end to end by the fusion loss (no class
    labels exist).
    """

    def __init__(self, spatial_dims: int, in_channels: int, hidden: int = 32, region_size: int = 8) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.region_size = region_size
        self.net = nn.Sequential(
            conv_nd(spatial_dims, in_channels, hidden, 3),
            nn.LeakyReLU(0.2),
            conv_nd(spatial_dims, hidden, len(REGION_CLASSES), 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        size = feats.shape[2:]
        grid = [max(1, -(-s // self.region_size)) for s in size]
        pooled = (F.adaptive_avg_pool2d if self.spatial_dims == 2 else F.adaptive_avg_pool3d)(feats, grid)
        probs = torch.softmax(self.net(pooled), dim=1)
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        return F.interpolate(probs, size=size, mode=mode, align_corners=False)


class MsgFusion(nn.Module):
    """MsgFusion two-branch fusion network (SF branch for the MRI, GV branch for CT/PET/SPECT).

    Args:
        spatial_dims: 2 (default, the paper) or 3 (same design with 3D convs and ``rfftn``).
        features: branch width F (64 in the paper).
        variant: ``"functional"`` (MR-PET/SPECT, default) or ``"ct"`` (CT-MR); selects the V' rule of the GV
            branch (:func:`msgfusion_v_prime`). MRI always goes to the SF branch. Pick it per model, e.g.
            ``--network_overrides "{'variant': 'ct'}"``.
        use_frequency: keep the Fourier unit of the SF branch (ablation switch).
        use_v_prime: keep the HSV V' path (level-4 injection); ``False`` outputs ``F1`` (ablation switch).
        region_size: size in pixels of the regions the classifier labels.
        classifier_hidden: hidden width of the region classifier.
        share_norm: one BatchNorm per reused conv for all its call sites, as the public code (default ``False``:
            one BatchNorm per call site; see :class:`ConvBlock`).
        stem_weights: optional path of a LOCAL file holding a ResNet ``conv1`` weight ``(F, 3, 7, 7)`` (a torchvision
            ResNet state dict with ``conv1.weight``, or the tensor itself) for the GV stem; it is summed over RGB
            (the grey image replicated to 3 channels) and frozen, as the public code freezes its ImageNet stem.
            Nothing is downloaded; ``None`` (default) trains the stem from scratch.
        fast: ``True`` (default): the optimised forward (eval-mode BatchNorms folded into the convs; the GV
            cascade's K7, which reads three nearest-upsampled maps, computed at half resolution with 2x2 polyphase
            kernels in 2D: 4/9 of its multiply-adds); ``False``: the plain forward. Same parameters and outputs (float
            rounding, < 1e-5); ``scripts/benchmark.py`` times both; switch later with :func:`~.blocks.set_fast`.

    Forward ``forward(x, mode="fuse")``:
        - ``x``: ``(B, 2, *spatial)`` in [0, 1], channel 0 = MRI, channel 1 = CT / PET-Y / SPECT-Y; any size, odd
          included. Optionally ``(B, 3, *spatial)`` whose channel 2 is a precomputed V' in [0, 1] (e.g.
          :func:`msgfusion_v_prime` of the colour PET/SPECT, see ``scripts.transforms.MsgFusionVPrimed``); without
          it V' is computed from channel 1 as a grey image (exact for grey CT and for luminance-only inputs).
        - ``mode="fuse"``: fused image ``(B, 1, *spatial)``, raw (tanh range, not clamped).
        - ``mode="train"``: the same fused image (what :class:`scripts.losses.MsgFusionLoss` needs).

    Parameters: 2,701,252 at ``features=64`` (2,684,740 without the Fourier unit; 2,699,204 with ``share_norm``);
    the public code uses 2,641,091 in its forward pass (2,971,110 registered).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        features: int = 64,
        variant: str = "functional",
        use_frequency: bool = True,
        use_v_prime: bool = True,
        region_size: int = 8,
        classifier_hidden: int = 32,
        share_norm: bool = False,
        stem_weights: str | os.PathLike | None = None,
        fast: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if features < 2:
            raise ValueError(f"features must be >= 2, got {features}")
        self.spatial_dims = spatial_dims
        self.features = features
        self.variant = variant
        self.use_frequency = use_frequency
        self.use_v_prime = use_v_prime
        self.sf = MsgFusionSFBranch(spatial_dims, features, use_frequency, share_norm)
        self.gv = MsgFusionGVBranch(spatial_dims, features, share_norm)
        self.classifier = RegionClassifier(spatial_dims, 2 * features, classifier_hidden, region_size)
        half = max(1, features // 2)
        self.decoder = nn.Sequential(
            conv_nd(spatial_dims, features, half, 3), nn.LeakyReLU(0.2), conv_nd(spatial_dims, half, 1, 1), nn.Tanh()
        )
        self._init_weights()
        if stem_weights is not None:
            self.load_stem(stem_weights)
        self.fast = fast
        set_fast(self, fast)

    def _init_weights(self) -> None:
        """He (fan-out) normal init of the GV convs, the pre-FFT conv and the decoder, as the public code does for
        its conv blocks and output conv; the 7x7 SF conv, Fourier unit and classifier keep PyTorch's defaults."""
        for module in (self.gv, self.sf.pre, self.decoder):
            for m in module.modules():
                if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def load_stem(self, path: str | os.PathLike, freeze: bool = True) -> None:
        """Load the GV stem from a local ResNet ``conv1`` weight file (see the class docstring)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"stem_weights: {path} is not a local file (nothing is downloaded).")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict):
            sd = sd.get("state_dict", sd)
            key = next((k for k in sd if k.endswith("conv1.weight") and sd[k].ndim == 4), None)
            if key is None:
                raise ValueError(f"{path}: no ResNet 'conv1.weight' tensor found")
            sd = sd[key]
        w = torch.as_tensor(sd).float()
        expected = (self.features, 7, 7) if self.spatial_dims == 2 else (self.features, 7, 7, 7)
        if (w.shape[0], *w.shape[2:]) != expected:
            raise ValueError(f"{path}: stem weight {tuple(w.shape)} does not fit ({expected[0]}, C, 7, 7)")
        with torch.no_grad():
            self.gv.stem.weight.copy_(w.sum(1, keepdim=True))
        self.gv.stem.weight.requires_grad_(not freeze)

    # ------------------------------------------------------------------------------------------------ api
    def _split(self, x: torch.Tensor):
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a (B, C, *spatial) tensor with {self.spatial_dims} spatial dims, "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] not in (2, 3):
            raise ValueError(f"MsgFusion expects 2 channels (MRI, other) or 3 (MRI, other, V'), got {x.shape[1]}")
        mri, other = x[:, :1], x[:, 1:2]
        if not self.use_v_prime:
            return mri, other, None
        vp = x[:, 2:3] if x.shape[1] == 3 else msgfusion_v_prime(other, self.variant)
        return mri, other, vp

    def fuse(self, x: torch.Tensor, return_intermediates: bool = False):
        """Fused image ``(B, 1, *S)``; optionally also a dict of the intermediate maps (``sf1``, ``sf2``, ``sf``,
        ``gv1``, ``probs`` (B, 3, *S) in :data:`REGION_CLASSES` order, ``feat``, ``f1`` and, with V', ``v_prime``,
        ``gv2``, ``f2``)."""
        mri, other, vp = self._split(x)
        sf, sf1, sf2 = self.sf(mri, return_parts=True)
        gv1 = self.gv(other)
        probs = self.classifier(torch.cat([sf, gv1], 1))
        p_a, p_f, p_m = probs[:, 0:1], probs[:, 1:2], probs[:, 2:3]
        feat = p_a * sf + p_f * gv1 + p_m * torch.maximum(sf, gv1)
        f1 = self.decoder(feat)
        inter = {"sf1": sf1, "sf2": sf2, "sf": sf, "gv1": gv1, "probs": probs, "feat": feat, "f1": f1}
        if vp is None:
            out = f1
        else:
            gv2 = self.decoder(self.sf.spatial_features(vp, 1))
            f2 = weighted_map_fusion(vp, gv2)
            out = f1 + p_f * torch.relu(f2 - f1)
            inter.update(v_prime=vp, gv2=gv2, f2=f2)
        return (out, inter) if return_intermediates else out

    def forward(self, x: torch.Tensor, mode: str = "fuse") -> torch.Tensor:
        if mode not in ("fuse", "train"):
            raise ValueError(f"mode must be 'fuse' or 'train', got {mode!r}")
        return self.fuse(x)
