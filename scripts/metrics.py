"""Objective image-fusion metrics and registration scores, in batched torch.

Conventions (see ``shared/design/metrics.md``):

* Inputs ``a``, ``b`` (the two sources) and ``f`` (the fused image) are grey tensors of shape ``(B,1,H,W)``
  or ``(B,1,D,H,W)`` on the **0-255 scale**, ideally integer valued, all with the same shape and device.
  Convert network outputs in [0,1] (or RGB) with :func:`to_grey255`. Every metric returns a float64
  tensor of shape ``(B,)`` on the input device; computation is done in float64.
* Defaults reproduce the CDDFuse ``utils/Evaluator.py`` ("[CDD]") where it defines the metric, i.e. the
  numbers of the CDDFuse/DDFM/EMMA tables: pair metrics (MI, VIF, SSIM, SCD) are **sums** over the two
  sources, MI is in nats, SSIM uses skimage-0.19 defaults with data_range=2. Other toolboxes' variants
  are keyword arguments. Metrics [CDD] lacks follow the toolbox named in their docstring.
* ``METRICS`` maps a name to ``(function, higher_is_better)``; every function there has the signature
  ``fn(a, b, f, **options)``. :func:`compute_metrics` evaluates a selection. ``REGISTRATION_METRICS`` and
  :func:`compute_registration_metrics` score a registered image against its ground truth.
* Degenerate inputs never give a silent NaN: each docstring says what a constant image yields (a
  documented value, or a ``ValueError`` naming the sample).
"""

from __future__ import annotations

import contextvars
import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "to_grey255", "en", "sd", "sf", "ag", "mi", "fmi", "scd", "vif", "qabf", "ssim", "ms_ssim", "q_cv", "q_y",
    "piella_qs", "piella_qw", "piella_qe", "psnr", "cc", "mae", "ncc", "METRICS", "REGISTRATION_METRICS",
    "compute_metrics", "compute_registration_metrics",
]

_DT = torch.float64
_EPS = 2.220446049250313e-16
_VALIDATED: contextvars.ContextVar = contextvars.ContextVar("fusion_metrics_validated", default=False)


# ----------------------------------------------------------------------------------------------- helpers
def to_grey255(x: torch.Tensor, input_range: float = 1.0, minmax: bool = False) -> torch.Tensor:
    """Convert images to the evaluator's grey convention: integer-valued float32 on 0..255.

    ``x``: ``(B,1|3,*spatial)``; values in ``[0, input_range]`` (1.0 for network outputs, 255 for uint8 data).
    RGB is reduced to the luminance Y = 0.299R + 0.587G + 0.114B (OpenCV ``BGR2GRAY`` / MATLAB ``rgb2gray``
    weights), then the result is rounded half-to-even (``np.round``) and clipped to [0,255]. ``minmax=True``
    first stretches each image to [0,1] (what the CDDFuse test script does to its fused output before saving
    it as a uint8 PNG; that save's quantisation is not reproduced here).
    """
    if x.dim() < 3 or x.shape[1] not in (1, 3):
        raise ValueError(f"to_grey255 expects (B,1|3,*spatial), got {tuple(x.shape)}")
    x = x.to(torch.float32)
    if minmax:
        dims = tuple(range(1, x.dim()))
        lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
        x = (x - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        input_range = 1.0
    x = x * (255.0 / input_range)
    if x.shape[1] == 3:
        x = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return torch.round(x).clamp_(0, 255)


def _check(*xs: torch.Tensor, metric: str = "metric", dims=(2, 3), names=("A", "B", "F")):
    """Validate (B,1,*S) inputs of equal shape; return float64 copies and the number of spatial dims."""
    out = []
    for n, x in zip(names, xs):
        if not torch.is_tensor(x):
            raise ValueError(f"{metric}: {n} must be a torch tensor, got {type(x).__name__}")
        if x.dim() not in (4, 5) or x.shape[1] != 1:
            raise ValueError(f"{metric}: {n} must be (B,1,H,W) or (B,1,D,H,W) grey images, got {tuple(x.shape)};"
                             " convert with to_grey255")
        out.append(x.to(_DT))
    shapes = {tuple(x.shape) for x in out}
    if len(shapes) != 1:
        desc = ", ".join(f"{n} {tuple(x.shape)}" for n, x in zip(names, out))
        raise ValueError(f"{metric}: size mismatch between images ({desc}); all must have the same shape")
    nd = out[0].dim() - 2
    if nd not in dims:
        raise ValueError(f"{metric} is defined for {'/'.join(map(str, dims))}D images only, got {nd}D input")
    if not _VALIDATED.get():
        for n, x in zip(names, out):
            if not torch.isfinite(x).all():
                raise ValueError(f"{metric}: {n} contains NaN or inf")
    return (*out, nd)


def _sdims(x: torch.Tensor):
    return tuple(range(1, x.dim()))


def _reduce(terms: torch.Tensor, reduction: str) -> torch.Tensor:
    """terms: (B,2) per-source scores -> 'sum' | 'mean' | 'none' (returns the (B,2) terms)."""
    if reduction == "sum":
        return terms.sum(1)
    if reduction == "mean":
        return terms.mean(1)
    if reduction == "none":
        return terms
    raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per sample; 0 where either image is constant (correlation undefined)."""
    x, y = x.flatten(1), y.flatten(1)
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    den = torch.sqrt((xc * xc).sum(1) * (yc * yc).sum(1))
    const = (x.amax(1) == x.amin(1)) | (y.amax(1) == y.amin(1))
    return torch.where(const, torch.zeros_like(den), (xc * yc).sum(1) / torch.where(const, torch.ones_like(den), den))


def _filt(x: torch.Tensor, k, dims=None, piece: int = 1 << 19) -> torch.Tensor:
    """'valid' separable correlation of x (N,C,*S) with the 1-D kernel k along each of ``dims`` (default:
    all spatial dims), by shift-and-add (much faster than float64 conv on CPU; zero taps are skipped).
    Large batches are filtered in pieces of ~``piece`` elements so the passes stay cache-resident."""
    dims = list(range(2, x.dim()) if dims is None else dims)
    kl = k.tolist() if torch.is_tensor(k) else list(k)
    taps = [(i, w) for i, w in enumerate(kl) if w != 0]
    per = max(1, piece // max(1, x[0].numel()))
    if x.shape[0] > per:
        return torch.cat([_filt(x[s:s + per], kl, dims, piece) for s in range(0, x.shape[0], per)], 0)
    for d in dims:
        n = x.shape[d] - len(kl) + 1
        if n < 1:
            raise ValueError(f"image too small: size {x.shape[d]} < filter size {len(kl)}")
        y = x.narrow(d, taps[0][0], n) * taps[0][1]
        for i, w in taps[1:]:
            y.add_(x.narrow(d, i, n), alpha=w)
        x = y
    return x


def _box(x: torch.Tensor, w: int) -> torch.Tensor:
    """'valid' mean over a w^nd box via cumulative sums (exact on integer-valued float64 data)."""
    for d in range(2, x.dim()):
        if x.shape[d] < w:
            raise ValueError(f"image too small: size {x.shape[d]} < window {w}")
        c = torch.cumsum(x, d)
        c = torch.cat([torch.zeros_like(c.narrow(d, 0, 1)), c], d)
        x = (c.narrow(d, w, c.shape[d] - w) - c.narrow(d, 0, c.shape[d] - w)) / w
    return x


def _gauss(n: int, sigma: float) -> list:
    g = [math.exp(-((i - (n - 1) / 2) ** 2) / (2 * sigma * sigma)) for i in range(n)]
    return [v / sum(g) for v in g]


def _stats(a, b, f, k=None, box: int = 0, ab: bool = False, clean: bool = False) -> dict:
    """'valid' windowed means (mA, mB, mF), variances (vA, vB, vF) and covariances (cAF, cBF[, cAB]) under
    the separable window k (or a ``box``-wide uniform window); F's maps are shared by the A and B terms.

    ``clean=True`` sets rounding noise of E[x^2]-E[x]^2 (|v| <= 1e-12 E[x^2]) to 0 so flat regions have exactly
    zero variance whatever their grey level (needed where the constants are ~0: Q_Y, Piella's weights)."""
    ims = [a, b, f, a * a, b * b, f * f, a * f, b * f] + ([a * b] if ab else [])
    m = [_box(x, box) if box else _filt(x, k) for x in ims]
    mA, mB, mF, sAA, sBB, sFF, sAF, sBF = m[:8]
    o = {"mA": mA, "mB": mB, "mF": mF, "vA": sAA - mA * mA, "vB": sBB - mB * mB, "vF": sFF - mF * mF,
         "cAF": sAF - mA * mF, "cBF": sBF - mB * mF}
    sec = {"vA": sAA, "vB": sBB, "vF": sFF, "cAF": (sAA, sFF), "cBF": (sBB, sFF)}
    if ab:
        o["cAB"], sec["cAB"] = m[8] - mA * mB, (sAA, sBB)
    if clean:
        for key, s in sec.items():
            v = o[key]
            small = v.abs() <= 1e-12 * s if torch.is_tensor(s) else v * v <= 1e-24 * s[0] * s[1]
            o[key] = torch.where(small, 0.0, v)
    return o


def _ssim(o: dict, x: str, y: str, c1: float, c2: float, cov_norm: float = 1.0) -> torch.Tensor:
    """Local SSIM map between images x, y ('A','B','F') from a _stats dict."""
    cxy = o["c" + x + y] if "c" + x + y in o else o["c" + y + x]
    mx, my = o["m" + x], o["m" + y]
    return ((2 * mx * my + c1) * (2 * cov_norm * cxy + c2)
            / ((mx * mx + my * my + c1) * (cov_norm * (o["v" + x] + o["v" + y]) + c2)))


def _sobel(x: torch.Tensor, pad_mode: str = "constant"):
    """2-D 'same' Sobel responses (sx, sy) = correlation with [[1,0,-1],[2,0,-2],[1,0,-1]] and its transpose
    with rows [-1,-2,-1] / [1,2,1] (the reference convolutions of Q^{AB/F} and Q_CV); zero or replicate pad."""
    xp = F.pad(x, (1, 1, 1, 1), mode=pad_mode)
    sx = _filt(_filt(xp, [1.0, 0.0, -1.0], [3]), [1.0, 2.0, 1.0], [2])
    sy = _filt(_filt(xp, [1.0, 2.0, 1.0], [3]), [-1.0, 0.0, 1.0], [2])
    return sx, sy


def _grey_levels(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x).clamp(0, 255).long().flatten(1)


def _entropy(p: torch.Tensor, dims) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(dims)


def _raise_if(bad: torch.Tensor, msg: str):
    idx = bad.nonzero().flatten().tolist()
    if idx:
        raise ValueError(msg.format(idx))


# ------------------------------------------------------------------------------------ F-only metrics
def en(a, b, f, base: float = 2.0) -> torch.Tensor:
    """EN, Shannon entropy of F's 256-bin grey histogram (bits by default). Higher is better. 2D/3D.

    [CDD]/[TANG]: F is rounded half-to-even and clipped to 0..255 first. ``base=math.e`` gives nats.
    A constant F gives 0."""
    *_, f, _ = _check(a, b, f, metric="EN")
    lv = _grey_levels(f)
    n = lv.shape[0]
    cnt = torch.bincount((lv + 256 * torch.arange(n, device=lv.device)[:, None]).flatten(), minlength=256 * n)
    return _entropy(cnt.view(n, 256).to(_DT) / lv.shape[1], 1) / math.log(base)


def sd(a, b, f) -> torch.Tensor:
    """SD, population standard deviation of F (ddof=0). Higher is better. 2D/3D. Constant F gives 0."""
    *_, f, _ = _check(a, b, f, metric="SD")
    return f.flatten(1).std(1, unbiased=False)


def sf(a, b, f, normalization: str = "mean") -> torch.Tensor:
    """SF, spatial frequency sqrt(RF^2 + CF^2 [+ DF^2 in 3D]). Higher is better. 2D/3D.

    ``normalization='mean'`` ([CDD]/[TANG]): each squared first-difference map is averaged over its own size
    (M x (N-1), (M-1) x N). ``'total'`` ([VIFB]/[LIU]) divides the sums by M*N instead (~0.2% lower)."""
    *_, f, nd = _check(a, b, f, metric="SF")
    if normalization not in ("mean", "total"):
        raise ValueError(f"SF normalization must be 'mean' or 'total', got {normalization!r}")
    tot = torch.zeros(f.shape[0], dtype=_DT, device=f.device)
    for d in range(2, 2 + nd):
        g2 = torch.diff(f, dim=d).pow(2).flatten(1)
        tot = tot + (g2.mean(1) if normalization == "mean" else g2.sum(1) / f[0].numel())
    return torch.sqrt(tot)


def ag(a, b, f, normalization: str = "mean") -> torch.Tensor:
    """AG, average gradient: sum of sqrt((Gx^2 + Gy^2 [+ Gz^2]) / ndim) / K. Higher is better. 2D/3D.

    Gradients as ``numpy.gradient`` (central inside, one-sided at borders). ``normalization='mean'`` ([CDD]):
    K = number of pixels; ``'interior'`` ([TANG]/[VIFB]): K = prod(n_i - 1) (~0.8% higher at 256^2)."""
    *_, f, nd = _check(a, b, f, metric="AG")
    if normalization not in ("mean", "interior"):
        raise ValueError(f"AG normalization must be 'mean' or 'interior', got {normalization!r}")
    grads = torch.gradient(f, dim=tuple(range(2, 2 + nd)))
    s = torch.sqrt(sum(g * g for g in grads) / nd).flatten(1).sum(1)
    return s / (f[0].numel() if normalization == "mean" else math.prod(n - 1 for n in f.shape[2:]))


# ------------------------------------------------------------------------------- information metrics
def _mi_pair(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MI in nats, H(X)+H(Y)-H(X,Y), from the 256x256 joint histogram of integer grey levels (one bincount)."""
    lx, ly = _grey_levels(x), _grey_levels(y)
    n, npx = lx.shape
    idx = lx * 256 + ly + 65536 * torch.arange(n, device=lx.device)[:, None]
    pxy = torch.bincount(idx.flatten(), minlength=65536 * n).view(n, 256, 256).to(_DT) / npx
    return (_entropy(pxy.sum(2), 1) + _entropy(pxy.sum(1), 1) - _entropy(pxy, (1, 2))).clamp_min(0)


def mi(a, b, f, base: float = math.e, reduction: str = "sum") -> torch.Tensor:
    """MI = MI(A;F) + MI(B;F) from 256x256 joint grey-level histograms. Higher is better. 2D/3D.

    [CDD] (``sklearn.mutual_info_score`` on grey levels): natural log, i.e. **nats**; ``base=2`` gives bits
    ([TANG]). Inputs are rounded/clipped to integer levels 0..255 (unrounded floats would inflate MI in the
    reference). Symmetric in its arguments. Constant images give 0."""
    a, b, f, _ = _check(a, b, f, metric="MI")
    return _reduce(torch.stack([_mi_pair(f, a), _mi_pair(f, b)], 1), reduction) / math.log(base)


def _sobel_edges_matlab(x: torch.Tensor) -> torch.Tensor:
    """Binary edge map in the style of MATLAB ``edge(I)`` (Sobel, automatic threshold, thinning).

    Replicate-padded Sobel/8 responses bx, by; b = bx^2 + by^2; cutoff = 4 mean(b); a pixel is an edge if
    b > cutoff and b is a directional local maximum (left/right when |bx| >= |by|, up/down when |by| >= |bx|).
    Written from the documented algorithm; bit parity with MATLAB's compiled thinning is not verified."""
    bx, by = _sobel(x / 8, "replicate")
    mag = bx * bx + by * by
    cutoff = 4 * mag.mean(_sdims(mag), keepdim=True)
    p = F.pad(mag, (1, 1, 1, 1), mode="replicate")
    left, right, up, down = p[..., 1:-1, :-2], p[..., 1:-1, 2:], p[..., :-2, 1:-1], p[..., 2:, 1:-1]
    ax, ay = bx.abs(), by.abs()
    horiz = (ax >= ay - 100 * _EPS) & (left < mag) & (mag >= right)
    vert = (ay >= ax - 100 * _EPS) & (up < mag) & (mag >= down)
    return ((mag > cutoff) & (horiz | vert)).to(_DT)


def _fmi_core(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Haghighat fast-FMI of window pairs x (source), y (fused), each (n, l) -> (n,); windows not identical.

    Each window is min-max normalised (constant -> ones) and divided by its sum to give a pdf over the l
    samples; the joint pdf mixes the Frechet upper (rho >= 0) or lower (rho < 0) bound copula with the
    independence copula, weighted by rho(pdfs) / rho(bound), rho(bound) from Hoeffding's covariance of the
    sample indices under the bound; fmi = 2 I / (H_x + H_y) with log2 entropies (0 if I = 0)."""
    def pdf(w):
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        z = torch.where(hi > lo, (w - lo) / torch.where(hi > lo, hi - lo, 1.0), 1.0)
        return z / z.sum(1, keepdim=True)

    def ent2(p):  # -sum p log2|p|: a mixture weight > 1 can make joint masses negative, as in the reference
        return -(p * torch.log2(torch.where(p != 0, p.abs(), 1.0))).sum(-1)

    p, q = pdf(x), pdf(y)
    idx = torch.arange(1, p.shape[1] + 1, dtype=_DT, device=x.device)
    pc, qc = p - p.mean(1, keepdim=True), q - q.mean(1, keepdim=True)
    num = (pc * qc).sum(1)
    den = torch.sqrt((pc * pc).sum(1) * (qc * qc).sum(1))
    c = torch.where((num == 0) | (den == 0), 0.0, num / torch.where(den > 0, den, 1.0))
    sdp = torch.sqrt(((p * idx * idx).sum(1) - (p * idx).sum(1) ** 2).clamp_min(0))
    sdq = torch.sqrt(((q * idx * idx).sum(1) - (q * idx).sum(1) ** 2).clamp_min(0))
    fc, ac = q.cumsum(1)[:, :, None], p.cumsum(1)[:, None, :]  # fused cdf on rows, source cdf on columns
    cop = torch.where((c >= 0)[:, None, None], torch.minimum(fc, ac), (fc + ac - 1).clamp_min(0))
    cov = (cop - fc * ac).sum((1, 2))
    corr_b = cov / torch.where(sdp * sdq > 0, sdp * sdq, 1.0)
    ok = (sdp > 0) & (sdq > 0) & (c != 0) & (corr_b != 0)
    w = torch.where(ok, c / torch.where(corr_b != 0, corr_b, 1.0), 0.0)[:, None, None]
    cp = F.pad(cop, (1, 0, 1, 0))
    mass = cp[:, 1:, 1:] - cp[:, :-1, 1:] - cp[:, 1:, :-1] + cp[:, :-1, :-1]
    hp, hq = ent2(p), ent2(q)
    m = hp + hq - ent2((w * mass + (1 - w) * q[:, :, None] * p[:, None, :]).flatten(1))
    return torch.where((m == 0) | (hp + hq == 0), 0.0, 2 * m / torch.where(hp + hq > 0, hp + hq, 1.0))


def _fmi_windows(x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """fmi per window row (identical windows -> 1), computing only the non-identical ones, in chunks."""
    out = torch.ones(x.shape[0], dtype=_DT, device=x.device)
    todo = (x != y).any(1).nonzero().squeeze(1)
    for s in range(0, todo.numel(), chunk):
        i = todo[s:s + chunk]
        out[i] = _fmi_core(x[i], y[i])
    return out


_FMI_LUT: dict = {}


def _fmi_binary(keys: torch.Tensor) -> torch.Tensor:
    """fmi of binary 3x3 window pairs given as 18-bit keys (source code << 9 | fused code), from a lazily
    filled 2^18 table (entries computed with _fmi_core the first time a key is seen)."""
    lut = _FMI_LUT.setdefault(str(keys.device), torch.full((1 << 18,), float("nan"), dtype=_DT, device=keys.device))
    vals = lut[keys]
    miss = torch.isnan(vals)
    if miss.any():
        new = torch.unique(keys[miss])
        bits = (new[:, None] >> torch.arange(18, device=keys.device)) & 1
        lut[new] = _fmi_windows(bits[:, 9:].to(_DT), bits[:, :9].to(_DT))
        vals = lut[keys]
    return vals


def fmi(a, b, f, feature: str = "edge", window: int = 3, reduction: str = "mean") -> torch.Tensor:
    """FMI, feature mutual information (Haghighat fast-FMI, ``fmi.m``). Higher is better, in [0,1]. 2D only.

    Mean over all interior ``window`` x ``window`` windows of (fmi_AF + fmi_BF)/2; windows are read in
    MATLAB column-major order; identical windows score 1. ``feature``: ``'edge'`` (default of ``fmi.m`` and
    hence of [TANG]'s "FMI_pixel": a binary Sobel edge map, see :func:`_sobel_edges_matlab`),
    ``'none'`` (raw pixels, the literal pixel FMI) or ``'gradient'`` (MATLAB ``gradient``: d/dx only).
    Binary 3x3 features use a lazily filled 2^18-entry table; other features run the vectorised copula on
    every non-identical window (slower). Constant images are fine (constant windows become uniform pdfs)."""
    a, b, f, _ = _check(a, b, f, metric="FMI", dims=(2,))
    if window % 2 != 1 or window < 3:
        raise ValueError(f"FMI window must be an odd size >= 3, got {window}")
    if feature == "edge":
        feats = [_sobel_edges_matlab(v) for v in (a, b, f)]
    elif feature == "none":
        feats = [a, b, f]
    elif feature == "gradient":
        feats = [torch.gradient(v, dim=3)[0] for v in (a, b, f)]
    else:
        raise ValueError(f"FMI feature must be 'edge', 'none' or 'gradient', got {feature!r}")
    n = a.shape[0]
    if feature == "edge" and window == 3:
        h, w = a.shape[-2] - 2, a.shape[-1] - 2
        codes = []
        for v in feats:  # bit (3*col + row) of the window, i.e. MATLAB's x(:) order
            c = sum(v[..., r:r + h, q:q + w] * float(2 ** (3 * q + r)) for r in range(3) for q in range(3))
            codes.append(c.long().flatten(1))
        ca, cb, cf = codes
        terms = torch.stack([_fmi_binary((ca << 9) | cf).mean(1), _fmi_binary((cb << 9) | cf).mean(1)], 1)
    else:
        l = window * window
        # transpose so that unfold's row-major patch order equals MATLAB's column-major x(:)
        wa, wb, wf = (F.unfold(v.transpose(-1, -2), window).transpose(1, 2).reshape(-1, l) for v in feats)
        terms = torch.stack([_fmi_windows(wa, wf).view(n, -1).mean(1), _fmi_windows(wb, wf).view(n, -1).mean(1)], 1)
    return _reduce(terms, reduction)


def scd(a, b, f) -> torch.Tensor:
    """SCD = r(F-B, A) + r(F-A, B) (Aslantas & Bendes; [CDD]/[TANG]). Higher is better, in [-2,2]. 2D/3D.

    A correlation whose operand is constant (e.g. a blank source, or F-B constant) is undefined and
    contributes 0 (documented value, no NaN)."""
    a, b, f, _ = _check(a, b, f, metric="SCD")
    return _pearson(f - b, a) + _pearson(f - a, b)


def cc(a, b, f, reduction: str = "mean") -> torch.Tensor:
    """CC = mean of Pearson r(F,A), r(F,B) ([CDD] extras). Higher is better, in [-1,1]. 2D/3D.
    A correlation with a constant image contributes 0."""
    a, b, f, _ = _check(a, b, f, metric="CC")
    return _reduce(torch.stack([_pearson(f, a), _pearson(f, b)], 1), reduction)


def psnr(a, b, f, peak="max_f") -> torch.Tensor:
    """PSNR = 10 log10(peak^2 / MSE), MSE = mean of MSE(A,F) and MSE(B,F). Higher is better. 2D/3D.

    ``peak='max_f'`` ([CDD]): the maximum of F; pass ``peak=255`` for the standard definition ([TANG]'s
    number is that + 48.13 dB). F equal to both sources gives +inf; an all-zero F with peak='max_f' gives -inf."""
    a, b, f, _ = _check(a, b, f, metric="PSNR")
    mse = 0.5 * ((a - f).pow(2).flatten(1).mean(1) + (b - f).pow(2).flatten(1).mean(1))
    pk = f.flatten(1).amax(1) if peak == "max_f" else torch.full_like(mse, float(peak))
    return 10 * torch.log10(pk * pk / mse)


# ------------------------------------------------------------------------------------ VIF
def vif(a, b, f, sigma_nsq: float = 2.0, reduction: str = "sum") -> torch.Tensor:
    """VIF = VIFp(A->F) + VIFp(B->F): Sheikh-Bovik pixel-domain VIF, 4 scales, Gaussian 17/9/5/3 (sigma N/5),
    sigma_n^2 = 2 (needs 0..255 data), each source as the reference ([CDD] ``VIFF``, [TANG]). Higher is
    better (a pair term may exceed 1). 2D/3D, >= 41 px per dim. Not Han's VIFF.

    Raises ``ValueError`` if a source has no local variance at any scale (constant image: VIF undefined)."""
    a, b, f, nd = _check(a, b, f, metric="VIF")
    eps, n = 1e-10, a.shape[0]
    num = torch.zeros(n, 2, dtype=_DT, device=a.device)
    den = torch.zeros_like(num)
    for s in range(1, 5):
        w = 2 ** (5 - s) + 1
        k = _gauss(w, w / 5)
        if s > 1:
            sl = (slice(None), slice(None)) + (slice(None, None, 2),) * nd
            a, b, f = (_filt(x, k)[sl] for x in (a, b, f))
        if min(a.shape[2:]) < w:
            raise ValueError(f"VIF: image too small for the 4-scale pyramid (needs >= 41 px per dim)")
        o = _stats(a, b, f, k)
        vy = o["vF"].clamp_min(0)
        for j, x in enumerate("AB"):
            vx, cxy = o["v" + x].clamp_min(0), o["c" + x + "F"]
            g = cxy / (vx + eps)
            sv = vy - g * cxy
            lowx = vx < eps
            g, sv, vx = torch.where(lowx, 0.0, g), torch.where(lowx, vy, sv), torch.where(lowx, 0.0, vx)
            lowy = vy < eps
            g, sv = torch.where(lowy, 0.0, g), torch.where(lowy, 0.0, sv)
            neg = g < 0
            sv, g = torch.where(neg, vy, sv), torch.where(neg, 0.0, g)
            sv = sv.clamp_min(eps)
            num[:, j] += torch.log10(1 + g * g * vx / (sv + sigma_nsq)).flatten(1).sum(1)
            den[:, j] += torch.log10(1 + vx / sigma_nsq).flatten(1).sum(1)
    _raise_if((den == 0).any(1), "VIF undefined: a source of sample(s) {} is constant (zero local variance)")
    return _reduce(num / den, reduction)


# ------------------------------------------------------------------------------- gradient metrics
def _sobel_ga(x: torch.Tensor):
    sx, sy = _sobel(x)
    g = torch.sqrt(sx * sx + sy * sy)
    return g, torch.where(sx == 0, math.pi / 2, torch.atan(sy / torch.where(sx == 0, 1.0, sx)))


def qabf(a, b, f, tie: str = "reference") -> torch.Tensor:
    """Q^{AB/F} (Xydeas & Petrovic 2000) as in [CDD]/[TANG]/[VIFB]. Higher is better, in [0,1]. 2D only.

    Zero-padded Sobel (same size), alpha = atan(sy/sx) (pi/2 where sx = 0), Gamma_g 0.9994, k_g -15,
    sigma_g 0.5, Gamma_a 0.9879, k_a -22, sigma_a 0.8, weights w = g_X (L=1), ratio of global sums.
    ``tie='reference'``: G = g_F where g_X == g_F, as the reference code; ``tie='one'``: G = 1 there.
    F = A = B gives ~0.975 (the sigmoids' ceiling). Raises ``ValueError`` when neither source has an edge
    (all-zero sources; a non-zero constant image has border edges because of the zero padding)."""
    a, b, f, _ = _check(a, b, f, metric="Qabf", dims=(2,))
    if tie not in ("reference", "one"):
        raise ValueError(f"Qabf tie must be 'reference' or 'one', got {tie!r}")
    gf, af = _sobel_ga(f)
    num = torch.zeros(a.shape[0], dtype=_DT, device=a.device)
    den = torch.zeros_like(num)
    for x in (a, b):
        gx, ax = _sobel_ga(x)
        gmax = torch.maximum(gx, gf)
        rel = torch.minimum(gx, gf) / torch.where(gmax > 0, gmax, 1.0)
        rel = torch.where(gx == gf, gf if tie == "reference" else 1.0, rel)
        ang = 1 - (ax - af).abs() / (math.pi / 2)
        q = 0.9994 / (1 + torch.exp(-15 * (rel - 0.5))) * 0.9879 / (1 + torch.exp(-22 * (ang - 0.8)))
        num += (q * gx).flatten(1).sum(1)
        den += gx.flatten(1).sum(1)
    _raise_if(den == 0, "Qabf undefined: both sources of sample(s) {} have no edges (constant images)")
    return num / den


def _normalize1(x: torch.Tensor) -> torch.Tensor:
    """[LIU] normalize1: per-image min-max stretch to 0..255, rounded; a constant image becomes 0."""
    lo, hi = x.amin(_sdims(x), keepdim=True), x.amax(_sdims(x), keepdim=True)
    return torch.round((x - lo) / torch.where(hi > lo, hi - lo, 1.0) * 255)


def q_cv(a, b, f, alpha: float = 5.0, block: int = 16) -> torch.Tensor:
    """Q_CV (Chen & Varshney 2007; [LIU] ``metricChen``). **Lower is better** (0 = ideal). 2D only.

    Images are min-max stretched to 0..255 (normalize1); region saliency lambda = sum over 16x16 blocks of
    the Sobel magnitude^alpha (alpha=5); A-F and B-F are filtered with the Mannos-Sakrison CSF
    S(r) = 2.6(0.0192+0.144r)exp(-(0.144r)^1.1), r from freqspace scaled by (N/8, M/8); d = blockwise mean of
    the squared filtered difference (partial blocks zero-padded, as blkproc);
    Q_CV = sum(l_A d_A + l_B d_B) / sum(l_A + l_B). Unbounded (squared grey levels).
    Raises ``ValueError`` when neither source has any gradient (constant images)."""
    a, b, f, _ = _check(a, b, f, metric="Q_CV", dims=(2,))
    a, b, f = _normalize1(a), _normalize1(b), _normalize1(f)
    m, n = a.shape[-2:]
    dev = a.device
    u = (torch.arange(n, dtype=_DT, device=dev) - n // 2) * (2 / n) * (n / 8)
    v = (torch.arange(m, dtype=_DT, device=dev) - m // 2) * (2 / m) * (m / 8)
    r = torch.sqrt(u[None, :] ** 2 + v[:, None] ** 2)
    csf = torch.fft.ifftshift(2.6 * (0.0192 + 0.144 * r) * torch.exp(-((0.144 * r) ** 1.1)))
    pad = (0, (-n) % block, 0, (-m) % block)
    sx, sy = _sobel(torch.cat([a, b], 0))
    g2 = sx * sx + sy * sy
    sal = g2 * g2 * torch.sqrt(g2) if alpha == 5 else g2 ** (alpha / 2)
    lam = F.avg_pool2d(F.pad(sal, pad), block) * block * block
    # the CSF is real and even, so real(ifft2(fft2(D) S)) == irfft2(rfft2(D) S[:, :n//2+1])
    dflt = torch.fft.irfft2(torch.fft.rfft2(torch.cat([a - f, b - f], 0)) * csf[:, : n // 2 + 1], s=(m, n))
    d = F.avg_pool2d(F.pad(dflt * dflt, pad), block)
    lam, d = lam.flatten(1), d.flatten(1)
    num = (lam * d).sum(1).view(2, -1).sum(0)
    den = lam.sum(1).view(2, -1).sum(0)
    _raise_if(den == 0, "Q_CV undefined: both sources of sample(s) {} are constant (no saliency)")
    return num / den


# ------------------------------------------------------------------------------------ SSIM family
def ssim(a, b, f, convention: str = "cdd", data_range: float | None = None, win_size: int | None = None,
         reduction: str = "sum") -> torch.Tensor:
    """SSIM fusion score SSIM(F,A) + SSIM(F,B). Higher is better (sum <= 2). 2D/3D.

    ``convention='cdd'`` (default, CDDFuse tables): skimage-0.19 ``structural_similarity`` defaults, i.e. a
    7x7 uniform window, sample covariance (x 49/48), K=(0.01, 0.03), mean over the 'valid' map (= 3-px border
    crop) and **data_range=2** (skimage's float dtype range; C1=4e-4, C2=3.6e-3 on 0..255 data).
    ``convention='wang'``: standard Wang SSIM via ``monai.metrics.SSIMMetric`` (Gaussian 11, sigma 1.5,
    'valid', data_range=255) -- the [VIFB] convention. ``data_range``/``win_size`` override either.
    ``reduction='mean'`` gives [TANG]'s 0.5(SSIM(F,A)+SSIM(F,B)); ``'none'`` the two terms. SSIM(X,X) = 1.
    Constant images are fine (the constants keep denominators positive)."""
    a, b, f, nd = _check(a, b, f, metric="SSIM")
    if convention == "cdd":
        w = win_size or 7
        dr = 2.0 if data_range is None else float(data_range)
        o = _stats(a, b, f, box=w)
        cn = w ** nd / (w ** nd - 1)
        terms = [_ssim(o, x, "F", (0.01 * dr) ** 2, (0.03 * dr) ** 2, cn).flatten(1).mean(1) for x in "AB"]
    elif convention == "wang":
        from monai.metrics import SSIMMetric

        metric = SSIMMetric(spatial_dims=nd, data_range=255.0 if data_range is None else float(data_range),
                            win_size=win_size or 11, kernel_sigma=1.5)
        terms = [metric(f, x).to(_DT).view(-1) for x in (a, b)]
    else:
        raise ValueError(f"SSIM convention must be 'cdd' or 'wang', got {convention!r}")
    return _reduce(torch.stack(terms, 1), reduction)


_MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim(a, b, f, data_range: float = 255.0, reduction: str = "sum", backend: str = "torch") -> torch.Tensor:
    """MS-SSIM(F,A) + MS-SSIM(F,B), Wang et al. 2003: 5 scales, weights (0.0448, 0.2856, 0.3001, 0.2363,
    0.1333), Gaussian 11/1.5 'valid', K=(0.01,0.03), data_range=255, 2x2 average-pool decimation, negative
    cs/ssim clipped to 0. Higher is better. 2D/3D, every spatial dim must be >= 176 px (``ValueError``
    otherwise). ``backend='monai'`` uses ``monai.metrics.MultiScaleSSIMMetric`` (float32, full 2-D/3-D
    Gaussian convolutions); the default ``'torch'`` is the same algorithm in float64 with separable filters (~4x
    faster on CPU; equal to MONAI within 1e-4, tested). Sum by default, consistent with the SSIM column;
    ``reduction='mean'`` is [MATR]'s convention. Not [TANG]'s MEF-SSIM. MS-SSIM(X,X) = 1."""
    a, b, f, nd = _check(a, b, f, metric="MS_SSIM")
    if min(f.shape[2:]) // 16 <= 10:
        raise ValueError(f"MS_SSIM needs every spatial dim >= 176 px for 5 scales, got {tuple(f.shape[2:])}")
    if backend == "monai":
        from monai.metrics import MultiScaleSSIMMetric

        metric = MultiScaleSSIMMetric(spatial_dims=nd, data_range=data_range, weights=_MS_WEIGHTS)
        return _reduce(torch.stack([metric(f, x).to(_DT).view(-1) for x in (a, b)], 1), reduction)
    if backend != "torch":
        raise ValueError(f"MS_SSIM backend must be 'torch' or 'monai', got {backend!r}")
    k = _gauss(11, 1.5)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    pool = getattr(F, f"avg_pool{nd}d")
    out = torch.ones(a.shape[0], 2, dtype=_DT, device=a.device)
    for i, wt in enumerate(_MS_WEIGHTS):
        o = _stats(a, b, f, k)
        for j, x in enumerate("AB"):
            cs = (2 * o["c" + x + "F"] + c2) / (o["v" + x] + o["vF"] + c2)
            if i == len(_MS_WEIGHTS) - 1:
                mx, mf = o["m" + x], o["mF"]
                cs = cs * (2 * mx * mf + c1) / (mx * mx + mf * mf + c1)
            out[:, j] *= cs.flatten(1).mean(1).clamp_min(0) ** wt
        if i < len(_MS_WEIGHTS) - 1:
            a, b, f = pool(torch.cat([a, b, f], 0), 2).split(a.shape[0], 0)
    return _reduce(out, reduction)


def q_y(a, b, f, threshold: float = 0.75) -> torch.Tensor:
    """Q_Y (Yang et al. 2008; [LIU] ``metricYang``). Higher is better, in [0,1]. 2D/3D.

    Local SSIM maps (7x7 Gaussian sigma 1.5, 'valid', C1 = C2 = 2e-16) s_AB, s_AF, s_BF; lambda =
    var_A/(var_A+var_B) (0.5 where both are 0 -- the verbatim code gives NaN there); Q_Y = mean of
    lambda s_AF + (1-lambda) s_BF where s_AB >= 0.75, max(s_AF, s_BF) elsewhere. Constant images: no NaN."""
    a, b, f, _ = _check(a, b, f, metric="Q_Y")
    o = _stats(a, b, f, _gauss(7, 1.5), ab=True, clean=True)
    c = 2e-16
    s_af, s_bf, s_ab = _ssim(o, "A", "F", c, c), _ssim(o, "B", "F", c, c), _ssim(o, "A", "B", c, c)
    tot = o["vA"] + o["vB"]
    lam = torch.where(tot > 0, o["vA"] / torch.where(tot > 0, tot, 1.0), 0.5)
    q = torch.where(s_ab >= threshold, lam * s_af + (1 - lam) * s_bf, torch.maximum(s_af, s_bf))
    return q.flatten(1).mean(1)


def _prewitt_mag(x: torch.Tensor) -> torch.Tensor:
    """Edge image: magnitude of Prewitt-like responses ([1 0 -1] across, [1 1 1] along the other dims), zero
    padded 'same' ([LIU] metricPeilla's 3x3 kernels in 2D; their separable generalisation in 3D)."""
    nd = x.dim() - 2
    xp = F.pad(x, (1, 1) * nd)
    tot = torch.zeros_like(x)
    for d in range(2, 2 + nd):
        g = _filt(_filt(xp, [1.0, 0.0, -1.0], [d]), [1.0, 1.0, 1.0], [e for e in range(2, 2 + nd) if e != d])
        tot += g * g
    return torch.sqrt(tot)


def _piella(a, b, f) -> tuple:
    """(Q_S, Q_W) of Piella & Heijmans with [LIU]'s SSIM (Gaussian 11/1.5, L=255, 'valid') and weights."""
    o = _stats(a, b, f, _gauss(11, 1.5), clean=True)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s_af, s_bf = _ssim(o, "A", "F", c1, c2), _ssim(o, "B", "F", c1, c2)
    zero = (o["vA"] + o["vB"]) == 0
    va, vb = torch.where(zero, 0.5, o["vA"]), torch.where(zero, 0.5, o["vB"])
    q = ((va * s_af + vb * s_bf) / (va + vb)).flatten(1)
    cw = torch.maximum(va, vb).flatten(1)
    return q.mean(1), (cw * q).sum(1) / cw.sum(1)


def piella(a, b, f, alpha: float = 1.0, edges: bool = True) -> dict:
    """Piella metrics at once ``{'Q_S', 'Q_W'[, 'Q_E']}`` (shares the SSIM maps; Q_E only if ``edges``)."""
    a, b, f, _ = _check(a, b, f, metric="Piella")
    qs, qw = _piella(a, b, f)
    if not edges:
        return {"Q_S": qs, "Q_W": qw}
    qwe = _piella(_prewitt_mag(a), _prewitt_mag(b), _prewitt_mag(f))[1]
    return {"Q_S": qs, "Q_W": qw, "Q_E": qw * torch.sign(qwe) * qwe.abs() ** alpha}


def piella_qs(a, b, f) -> torch.Tensor:
    """Piella Q_S ([LIU] ``metricPeilla`` sw=1): mean_w[l SSIM(A,F|w) + (1-l) SSIM(B,F|w)], l = s_A/(s_A+s_B)
    with s = Gaussian local variance; Wang SSIM 11/1.5, L=255, 'valid'; l = 0.5 where s_A+s_B = 0.
    Higher is better (<= 1). 2D/3D. No NaN for constant images."""
    a, b, f, _ = _check(a, b, f, metric="Q_S")
    return _piella(a, b, f)[0]


def piella_qw(a, b, f) -> torch.Tensor:
    """Piella Q_W ([LIU] sw=2): like Q_S but windows weighted by c(w) = max(s_A, s_B) / sum max(s_A, s_B)
    (0.5 where both are 0, so never 0/0). Higher is better (<= 1). 2D/3D."""
    a, b, f, _ = _check(a, b, f, metric="Q_W")
    return _piella(a, b, f)[1]


def piella_qe(a, b, f, alpha: float = 1.0) -> torch.Tensor:
    """Piella Q_E = Q_W(A,B,F) * Q_W(A',B',F')^alpha, primes = Prewitt edge-magnitude images, alpha = 1
    (the intended value of [LIU] sw=3, whose code multiplies by an undefined variable). Higher is better.
    2D/3D (3D uses the separable 3-D generalisation of the Prewitt kernels)."""
    return piella(a, b, f, alpha)["Q_E"]


# ------------------------------------------------------------------------------- registration scores
def mae(moved, target) -> torch.Tensor:
    """MAE between a registered image and its ground truth, on the inputs' scale. Lower is better. 2D/3D."""
    x, y, _ = _check(moved, target, metric="MAE", names=("moved", "target"))
    return (x - y).abs().flatten(1).mean(1)


def ncc(moved, target) -> torch.Tensor:
    """Global normalised cross-correlation (Pearson r) of registered image and ground truth. Higher is better,
    in [-1,1]. 2D/3D. A constant image (e.g. warped entirely out of the field of view) gives 0."""
    x, y, _ = _check(moved, target, metric="NCC", names=("moved", "target"))
    return _pearson(x, y)


# ------------------------------------------------------------------------------------ registry
METRICS: dict[str, tuple[Callable, bool]] = {
    "EN": (en, True), "SD": (sd, True), "SF": (sf, True), "AG": (ag, True), "MI": (mi, True),
    "FMI": (fmi, True), "SCD": (scd, True), "VIF": (vif, True), "Qabf": (qabf, True), "SSIM": (ssim, True),
    "MS_SSIM": (ms_ssim, True), "Q_CV": (q_cv, False), "Q_Y": (q_y, True), "Q_S": (piella_qs, True),
    "Q_W": (piella_qw, True), "Q_E": (piella_qe, True), "PSNR": (psnr, True), "CC": (cc, True),
}
REGISTRATION_METRICS: dict[str, tuple[Callable, bool]] = {"MAE": (mae, False), "NCC": (ncc, True)}
_ONLY_2D = {"FMI", "Qabf", "Q_CV"}
_PIELLA = ("Q_S", "Q_W", "Q_E")


def _applicable(name: str, shape) -> bool:
    sp = shape[2:]
    if len(sp) == 3 and name in _ONLY_2D:
        return False
    if name == "MS_SSIM":
        return min(sp) // 16 > 10
    if name == "VIF":
        return min(sp) >= 41
    return True


def compute_metrics(a, b, f, names=None, options: dict | None = None, chunk_size: int = 4) -> dict:
    """Compute metrics -> ``{name: tensor(B)}`` (float64, input device).

    ``names=None`` selects every metric of ``METRICS`` that applies to the input (2D-only FMI/Qabf/Q_CV are
    skipped for 3D volumes, MS-SSIM below 176 px, VIF below 41 px); an explicit name that does not apply
    raises. ``options`` maps a name to keyword arguments for its function (e.g. ``{"MI": {"base": 2}}``).
    The batch is processed in chunks of ``chunk_size`` samples (keeps filtering cache-resident on CPU and
    memory bounded); Q_S/Q_W/Q_E share one computation unless given options."""
    a, b, f, _ = _check(a, b, f, metric="compute_metrics")
    if names is None:
        names = [n for n in METRICS if _applicable(n, a.shape)]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {list(METRICS)}")
    options = options or {}
    out = {}
    token = _VALIDATED.set(True)  # inputs checked once above; skip the per-metric finite checks
    try:
        _run(a, b, f, names, options, chunk_size, out)
    finally:
        _VALIDATED.reset(token)
    return {n: out[n] for n in names}


def _run(a, b, f, names, options, chunk_size, out):
    for n in names:
        if n in out:
            continue
        sl = [slice(s, s + chunk_size) for s in range(0, a.shape[0], chunk_size)]
        if n in _PIELLA and not any(p in options for p in _PIELLA):
            parts = [piella(a[i], b[i], f[i], edges="Q_E" in names) for i in sl]
            for p in _PIELLA:
                if p in names:
                    out[p] = torch.cat([d[p] for d in parts], 0)
            continue
        fn, kw = METRICS[n][0], options.get(n, {})
        out[n] = torch.cat([fn(a[i], b[i], f[i], **kw) for i in sl], 0)


def compute_registration_metrics(moved, target, names=None) -> dict:
    """Registration scores ``{name: tensor(B)}`` of ``moved`` against ``target`` (see REGISTRATION_METRICS)."""
    names = list(REGISTRATION_METRICS) if names is None else names
    return {n: REGISTRATION_METRICS[n][0](moved, target) for n in names}
