"""MACTFusion: lightweight cross multi-axis Transformer for multimodal medical image fusion.

Xie et al., "MACTFusion: Lightweight Cross Transformer for Adaptive Multimodal Medical Image Fusion" (code:
millieXie/MACTFusion). Re-implemented from a written description of the official code; numerically
equivalent to it in eval mode with the released CT-MRI weights (see tests/test_parity.py), with only the modules
that the forward pass uses.

Notation: ``C_k[a->b]`` is a k x k (x k) convolution with zero "same" padding, ``phi_s`` LeakyReLU(slope s),
widths ``f0, f1, f2 = features`` (16, 32, 48), ``P`` the window size (8), every map at full resolution.

One encoder per source (no shared weights), ``I -> F``::

    DenseFeatureExtractor (no activation; GN = per-channel GroupNorm, convs bias-free, c = f0 / 4):
        a1 = GN(C3[1->c](I)); a2 = C3(a1); a3 = C3(a2); a4 = C3(a3); S = cat(a1..a4)
        b1 = GN(C31[f0->c, groups=c](S)); b2 = C3(b1 + a4); b3 = C3(b2 + a3); b4 = C3(b3 + a2)
        out = cat(b1..b4) + S                   # C31: computed by FFT (LargeKernelGroupedConv)
    GRDB[a->b] (x2: f0->f1, f1->f2):
        phi_0.1(C1[3a->b](dense(x)) + C1[a->b](|Kx * x| + |Ky * x|))   # K: trainable, Sobel-initialised
        dense(x) = cat(x, d1, d2), d1 = phi_0.2(C3[a->a](x)), d2 = phi_0.2(C3[2a->a](cat(x, d1)))
    MultiAxisBlock: SDConv -> window transformer -> grid transformer
        SDConv(x) = x + C1(SimAM(n + BN(C1(GELU(BN(DW3(n))))))),  n = BN(x)
        transformer(t) on P x P token groups: t += Attn(LN(t)); t += MLP(LN(t))   (relative position bias)

Cross fusion, one module per direction (``own``/``other`` = this/the other source's encoder features)::

    S = SAFM(own, other) = IN(other) * (gamma(h) + std(own)) + (beta(h) + mean(own)),
        h = GELU(C3[2f2->f2](cat(own, other))), gamma/beta = C3 (zero-initialised)
    q = SDConv_q(own); c = SDConv_kv(S); T = grid_cross(window_cross(q, c), c)   # K/V from c in both stages
    out = own + sigmoid(C1[f2->1](other)) * (own + T)

Decoder on ``cat(out_a, out_b)``: ``phi_0.1(C1[2f2->f2])``, ``phi_0.1(C3r[f2->f1])``, ``phi_0.1(C3r[f1->1])``
(``C3r``: reflection padding), so the fused image is unbounded (the workflows clamp it).

Window partition: non-overlapping P x P tiles. Grid partition (MaxViT): group (i, j) holds the pixels
``(g_h * H / P + i, g_w * W / P + j)``, a dilated P x P lattice spanning the image. Both are einops rearranges of
the whole batch; attention runs on all groups at once with ``scaled_dot_product_attention``. Inputs whose size is
not a multiple of P are padded up to one and the output is cropped back (:meth:`MACTFusion.fuse`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.networks.layers.factories import Conv, Norm
from monai.utils import ensure_tuple_rep
from torch import nn

from .blocks import LOW_PRECISION, SobelGradient, batch_norm_nd, channels_last, conv_nd, set_fast, spatial_norm

__all__ = [
    "MACTFusion",
    "MACTFusionEncoder",
    "DenseFeatureExtractor",
    "LargeKernelGroupedConv",
    "GradientResidualDenseBlock",
    "SDConv",
    "RelativePositionAttention",
    "MultiAxisTransformer",
    "MultiAxisBlock",
    "SpatialAdaptationFusion",
    "CrossModalFusion",
    "simam",
    "partition_tokens",
    "reverse_tokens",
    "tokens_to_groups",
    "groups_to_tokens",
    "relative_position_index",
]

_AXES = ("d", "h", "w")


def _patterns(spatial_dims: int, kind: str) -> tuple[str, str, list[str], list[str]]:
    """einops patterns ``image -> tokens`` for a window or grid partition, plus the group/in-group axis names."""
    axes = _AXES[-spatial_dims:]
    n = [f"n{a}" for a in axes]  # number of groups along an axis
    p = [f"p{a}" for a in axes]  # in-group (token) coordinate along an axis, size P
    if kind == "window":  # P x P tiles: pixel = n * P + p
        image = " ".join(f"({ni} {pi})" for ni, pi in zip(n, p))
    elif kind == "grid":  # dilated lattice: pixel = p * (S / P) + n
        image = " ".join(f"({pi} {ni})" for ni, pi in zip(n, p))
    else:
        raise ValueError(f"partition must be 'window' or 'grid', got {kind!r}")
    return f"b c {image}", f"(b {' '.join(n)}) ({' '.join(p)}) c", n, p


def partition_tokens(x: torch.Tensor, window: Sequence[int], kind: str) -> torch.Tensor:
    """``(B, C, *S) -> (B * groups, prod(window), C)``; ``S`` must be a multiple of ``window``."""
    image, tokens, n, p = _patterns(x.ndim - 2, kind)
    return rearrange(x, f"{image} -> {tokens}", **dict(zip(p, window)))


def reverse_tokens(t: torch.Tensor, spatial: Sequence[int], window: Sequence[int], kind: str) -> torch.Tensor:
    """Inverse of :func:`partition_tokens` back to ``(B, C, *spatial)``."""
    image, tokens, n, p = _patterns(len(spatial), kind)
    sizes = {**dict(zip(p, window)), **{ni: s // w for ni, s, w in zip(n, spatial, window)}}
    return rearrange(t, f"{tokens} -> {image}", **sizes)


def _group_perm(nd: int, kind: str) -> list[int]:
    """Permutation of an image view ``(B, [a_i, b_i] per axis, rest)`` (``a_i, b_i`` = (n, P) for windows, (P, n)
    for grids) to ``(B, n..., P..., rest)``, i.e. groups then in-group tokens, each row-major."""
    n_pos = [1 + 2 * i + (kind == "grid") for i in range(nd)]
    p_pos = [1 + 2 * i + (kind == "window") for i in range(nd)]
    return [0, *n_pos, *p_pos, 1 + 2 * nd]


def tokens_to_groups(t: torch.Tensor, window: Sequence[int], kind: str) -> torch.Tensor:
    """Token-layout map ``(B, *S, C)`` -> ``(B * groups, prod(window), C)`` in one copy: the window or grid
    partition of :func:`partition_tokens` (same groups and token order) of a channels-last map, moving contiguous
    runs of C values (no copy before the permutation when ``t`` is contiguous)."""
    b, spatial = t.shape[0], t.shape[1:-1]
    split = [v for s, w in zip(spatial, window) for v in ((s // w, w) if kind == "window" else (w, s // w))]
    g = t.reshape(b, *split, t.shape[-1]).permute(_group_perm(len(window), kind))
    return g.reshape(-1, math.prod(window), t.shape[-1])


def groups_to_tokens(g: torch.Tensor, spatial: Sequence[int], window: Sequence[int], kind: str) -> torch.Tensor:
    """Inverse of :func:`tokens_to_groups`: ``(B * groups, prod(window), C) -> (B, *S, C)``."""
    nd = len(window)
    counts = [s // w for s, w in zip(spatial, window)]
    c = g.shape[-1]
    g = g.reshape(-1, *counts, *window, c)
    perm = _group_perm(nd, kind)
    inverse = [perm.index(i) for i in range(len(perm))]
    return g.permute(inverse).reshape(g.shape[0], *spatial, c)


def relative_position_index(window: Sequence[int]) -> torch.Tensor:
    """Swin-v1 pair-wise relative position index ``(N, N)``, ``N = prod(window)``, tokens in row-major order.

    In 2D: ``(i1 - i2 + P - 1) * (2P - 1) + (j1 - j2 + P - 1)``, an index into a ``(2P - 1)^2``-row table.
    """
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # (dims, N, N)
    index = torch.zeros(rel.shape[1:], dtype=torch.long)
    for axis, w in enumerate(window):
        index = index * (2 * w - 1) + rel[axis] + (w - 1)
    return index


def simam(x: torch.Tensor, e_lambda: float = 1e-4) -> torch.Tensor:
    """Parameter-free SimAM attention: ``x * sigmoid(d / (4 (sum(d) / (n - 1) + lambda)) + 0.5)``, with
    ``d = (x - mean)^2`` per sample and channel over the ``n`` spatial positions."""
    if x.dtype in LOW_PRECISION:  # AMP: the sum over a whole map overflows float16
        return simam(x.float(), e_lambda).to(x.dtype)
    dims = tuple(range(2, x.ndim))
    n = math.prod(x.shape[2:]) - 1
    d = (x - x.mean(dim=dims, keepdim=True)).pow(2)
    e = d / (4 * (d.sum(dim=dims, keepdim=True) / n + e_lambda)) + 0.5
    return x * torch.sigmoid(e)


def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (a fast FFT size)."""
    m = n
    while True:
        k = m
        for f in (2, 3, 5):
            while k % f == 0:
                k //= f
        if k == 1:
            return m
        m += 1


class LargeKernelGroupedConv(nn.Module):
    """Bias-free grouped convolution with one output channel per group, zero "same" padding, computed by FFT.

    ``weight`` has the ``nn.Conv`` layout ``(groups, in_channels // groups, K, ..., K)`` and default ``nn.Conv`` init;
    output channel ``g`` correlates input channels ``[g * n, (g + 1) * n)``, ``n = in_channels // groups``. Same
    values as ``nn.Conv{2,3}d(in, groups, K, padding=K // 2, groups=groups, bias=False)`` (float32 FFT; closer to a
    float64 reference than the direct conv at K=31), but on CPU much faster: PyTorch's direct grouped 31x31 conv
    ran at ~0.1 GMAC/s here (about 10 s per branch at 256x256) and its backward is slow in every direct variant.
    Computed in float32 (also under autocast) and cast back to the input dtype.
    """

    def __init__(self, spatial_dims: int, in_channels: int, groups: int, kernel_size: int) -> None:
        super().__init__()
        if in_channels % groups or kernel_size % 2 == 0:
            raise ValueError(f"need in_channels % groups == 0 and an odd kernel, got {in_channels}, {groups}, "
                             f"{kernel_size}")
        self.spatial_dims = spatial_dims
        self.groups = groups
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(groups, in_channels // groups, *([kernel_size] * spatial_dims)))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv's default init
        self.export_mode = False  # True (scripts/export.py, ONNX): the direct grouped conv, same values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, k = self.spatial_dims, self.kernel_size
        if self.export_mode:
            conv = F.conv2d if d == 2 else F.conv3d
            return conv(x, self.weight.to(x.dtype), padding=k // 2, groups=self.groups)
        p = k // 2
        spatial = [int(s) for s in x.shape[2:]]  # plain ints: FFT sizes and crops are Python arithmetic
        dims = tuple(range(-d, 0))
        size = [_fast_len(s + k - 1) for s in spatial]  # linear (not circular) convolution
        xf = torch.fft.rfftn(x.float(), s=size, dim=dims)
        wf = torch.fft.rfftn(self.weight.float().flip(dims), s=size, dim=dims)  # correlation = conv with flip
        yf = (xf.unflatten(1, (self.groups, -1)) * wf).sum(2)
        y = torch.fft.irfftn(yf, s=size, dim=dims)
        return y[(..., *(slice(p, p + s) for s in spatial))].to(x.dtype)


class DenseFeatureExtractor(nn.Module):
    """Cascade of bias-free 3x3 convs with reverse cross-connections through a large grouped conv (no activation).

    ``(N, in_channels, *S) -> (N, out_channels, *S)``; ``out_channels`` must be a multiple of 4 (four stages of
    ``out_channels // 4``). The two norms are ``GroupNorm(4, out_channels // 4)`` as in the official code (per-channel
    at the official width); for a quarter-width not divisible by 4, ``gcd(4, quarter)`` groups are used.
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1, out_channels: int = 16,
                 large_kernel_size: int = 31) -> None:
        super().__init__()
        if out_channels % 4:
            raise ValueError(f"out_channels must be a multiple of 4, got {out_channels}")
        c = out_channels // 4
        groups = math.gcd(4, c)
        self.stem = conv_nd(spatial_dims, in_channels, c, 3, bias=False)
        self.stem_norm = nn.GroupNorm(groups, c)
        self.cascade = nn.ModuleList(conv_nd(spatial_dims, c, c, 3, bias=False) for _ in range(3))
        self.large = LargeKernelGroupedConv(spatial_dims, out_channels, c, large_kernel_size)
        self.large_norm = nn.GroupNorm(groups, c)
        self.reverse = nn.ModuleList(conv_nd(spatial_dims, c, c, 3, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = [self.stem_norm(self.stem(x))]
        for conv in self.cascade:
            a.append(conv(a[-1]))
        s = torch.cat(a, dim=1)
        b = [self.large_norm(self.large(s))]
        for conv, skip in zip(self.reverse, a[:0:-1]):  # b_{k+1} = conv(b_k + a_{5-k}): a4, a3, a2
            b.append(conv(b[-1] + skip))
        return torch.cat(b, dim=1) + s


class GradientResidualDenseBlock(nn.Module):
    """GRDB: 2-conv dense path + trainable Sobel gradient path, ``(N, in, *S) -> (N, out, *S)``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.dense1 = conv_nd(spatial_dims, in_channels, in_channels, 3)
        self.dense2 = conv_nd(spatial_dims, 2 * in_channels, in_channels, 3)
        self.dense_out = conv_nd(spatial_dims, 3 * in_channels, out_channels, 1)
        self.sobel = SobelGradient(in_channels, spatial_dims, trainable=True)
        self.grad_out = conv_nd(spatial_dims, in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.cat([x, F.leaky_relu(self.dense1(x), 0.2)], dim=1)
        t = torch.cat([t, F.leaky_relu(self.dense2(t), 0.2)], dim=1)
        return F.leaky_relu(self.dense_out(t) + self.grad_out(self.sobel(x)), 0.1)


class SDConv(nn.Module):
    """Simple depthwise-separable conv block (MBConv with SimAM in place of squeeze-excitation), C -> C.

    ``x + proj(SimAM(n + pw_norm(pw(GELU(dw_norm(dw(n)))))))`` with ``n = norm(x)``; BN eps 1e-5, exact GELU.
    """

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.norm = batch_norm_nd(spatial_dims, channels)
        self.dw = conv_nd(spatial_dims, channels, channels, 3, groups=channels, bias=False)
        self.dw_norm = batch_norm_nd(spatial_dims, channels)
        self.pw = conv_nd(spatial_dims, channels, channels, 1, bias=False)
        self.pw_norm = batch_norm_nd(spatial_dims, channels)
        self.proj = conv_nd(spatial_dims, channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm(x)
        u = self.pw_norm(self.pw(F.gelu(self.dw_norm(self.dw(n))))) + n
        return x + self.proj(simam(u))


class RelativePositionAttention(nn.Module):
    """Multi-head attention inside each token group with a learned Swin-v1 relative position bias.

    Self-attention (``cross=False``: one ``qkv`` Linear C -> 3C) or cross-attention (``cross=True``: ``q`` Linear on
    the query tokens, ``kv`` Linear C -> 2C on the context tokens of the same group). Heads are contiguous channel
    blocks of q, k and v. ``logits = scale * q k^T + bias``; ``forward`` takes ``(G, N, C)`` tokens.
    """

    def __init__(self, channels: int, num_heads: int, window: Sequence[int], scale: float,
                 cross: bool = False) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = scale
        self.cross = cross
        if cross:
            self.q = nn.Linear(channels, channels)
            self.kv = nn.Linear(channels, 2 * channels)
        else:
            self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(math.prod(2 * w - 1 for w in window), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """``(num_heads, N, N)`` additive logit bias."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.num_heads
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs context tokens")
            q = rearrange(self.q(x), "g n (h d) -> g h n d", h=h)
            k, v = rearrange(self.kv(context), "g n (two h d) -> two g h n d", two=2, h=h)
        else:
            q, k, v = rearrange(self.qkv(x), "g n (three h d) -> three g h n d", three=3, h=h)
        bias = self.relative_position_bias().to(q.dtype).unsqueeze(0)  # a 4D mask lets CPU SDPA use its fused kernel
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(rearrange(out, "g h n d -> g n (h d)"))


class MultiAxisTransformer(nn.Module):
    """Pre-norm Transformer layer on window or grid token groups of a ``(B, C, *S)`` map (``S`` multiple of P).

    ``t = t + Attn(LN1(t)[, LN1(context)]); t = t + MLP(LN2(t))`` on the partitioned tokens, then reversed. In
    cross mode the same ``norm1`` normalises the query and the context tokens (official behaviour); the MLP and the
    residuals act on the query stream only.
    """

    def __init__(self, channels: int, window: Sequence[int], partition: str, num_heads: int = 4,
                 mlp_ratio: float = 4.0, scale: float | None = None, cross: bool = False) -> None:
        super().__init__()
        _patterns(len(window), partition)  # validates the partition kind
        self.window = tuple(window)
        self.partition = partition
        self.norm1 = nn.LayerNorm(channels)
        scale = num_heads**-0.5 if scale is None else scale
        self.attn = RelativePositionAttention(channels, num_heads, window, scale, cross=cross)
        self.norm2 = nn.LayerNorm(channels)
        hidden = int(mlp_ratio * channels)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

        self.fast = True

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.fast:
            return self.forward_fast(x, context)
        t = partition_tokens(x, self.window, self.partition)
        ctx = None if context is None else self.norm1(partition_tokens(context, self.window, self.partition))
        t = t + self.attn(self.norm1(t), ctx)
        t = t + self.mlp(self.norm2(t))
        return reverse_tokens(t, x.shape[2:], self.window, self.partition)

    def forward_fast(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Same values as :meth:`forward` for a channels-last ``x``: the window/grid partition and its inverse are
        single copies of C-value runs from/to the channels-last map (:func:`tokens_to_groups`; einops' generic
        rearrange of an NCHW map moves single values and is several times slower); the attention's head split
        stays a strided view for the fused attention kernel; the MLP runs on blocks of tokens that fit in cache;
        the output is channels-last again."""
        spatial = x.shape[2:]
        t = tokens_to_groups(x.movedim(1, -1), self.window, self.partition)
        ctx = None
        if context is not None:
            ctx = self.norm1(tokens_to_groups(context.movedim(1, -1), self.window, self.partition))
        t = t + self.attn(self.norm1(t), ctx)
        t = _token_mlp(t, self.norm2, self.mlp)
        return groups_to_tokens(t, spatial, self.window, self.partition).movedim(-1, 1)


def _token_mlp(t: torch.Tensor, norm: nn.Module, mlp: nn.Sequential, block: int = 4096) -> torch.Tensor:
    """``t + mlp(norm(t))`` on a ``(..., C)`` token tensor, ``block`` tokens at a time so that the 4C-wide hidden
    activations stay in cache (memory traffic, not arithmetic, bounds the MLP on CPU: 2x faster at 256x256).
    Token-wise, so blocking changes no value; one block when tracing (keeps traced graphs size-independent)."""
    flat = t.reshape(-1, t.shape[-1])
    if flat.shape[0] <= block or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return t + mlp(norm(t))
    out = torch.empty_like(flat)
    for i in range(0, flat.shape[0], block):
        chunk = flat[i:i + block]
        out[i:i + block] = chunk + mlp(norm(chunk))
    return out.view(t.shape)


class MultiAxisBlock(nn.Module):
    """SD-Conv, then window attention (local), then grid attention (global, dilated), C -> C.

    ``cross=False`` (encoder): ``grid(window(SDConv(x)))``. ``cross=True`` (cross-modal Transformer):
    ``c = sdconv_context(context)`` is computed once and gives keys/values to both stages,
    ``grid(window(sdconv(x), c), c)``.
    """

    def __init__(self, spatial_dims: int, channels: int, window: Sequence[int], num_heads: int = 4,
                 mlp_ratio: float = 4.0, scale: float | None = None, cross: bool = False) -> None:
        super().__init__()
        self.sdconv = SDConv(spatial_dims, channels)
        self.sdconv_context = SDConv(spatial_dims, channels) if cross else None
        kw = dict(num_heads=num_heads, mlp_ratio=mlp_ratio, scale=scale, cross=cross)
        self.window_attn = MultiAxisTransformer(channels, window, "window", **kw)
        self.grid_attn = MultiAxisTransformer(channels, window, "grid", **kw)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        c = None
        if self.sdconv_context is not None:
            if context is None:
                raise ValueError("a cross MultiAxisBlock needs a context tensor")
            c = self.sdconv_context(context)
        return self.grid_attn(self.window_attn(self.sdconv(x), c), c)


class SpatialAdaptationFusion(nn.Module):
    """SAFM: the other source's instance-normalised features restyled with the own source's statistics.

    ``IN(other) * (gamma(h) + std(own)) + (beta(h) + mean(own))``, ``h = GELU(C3[2C->C](cat(own, other)))``;
    per-sample, per-channel spatial mean and unbiased std; ``gamma``/``beta`` are zero-initialised 3x3 convs, so at
    initialisation this is AdaIN.
    """

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.norm = Norm[Norm.INSTANCE, spatial_dims](channels, affine=False)
        self.shared = conv_nd(spatial_dims, 2 * channels, channels, 3)
        self.gamma = conv_nd(spatial_dims, channels, channels, 3)
        self.beta = conv_nd(spatial_dims, channels, channels, 3)
        for conv in (self.gamma, self.beta):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

        self.fast = True

    def forward(self, own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        if self.fast:  # channels-last maps; statistics in one pass each; InstanceNorm written out (keeps the layout)
            own, other = channels_last(own), channels_last(other)
            dims = tuple(range(2, own.ndim))
            std, mean = torch.std_mean(own.float(), dim=dims, keepdim=True)  # float32 also under AMP
            h = F.gelu(self.shared(torch.cat([own, other], dim=1)))
            gamma, beta = self.gamma(h), self.beta(h)
            return spatial_norm(other, self.norm.eps) * (gamma + std) + (beta + mean)
        flat = own.flatten(2).float()
        shape = (*own.shape[:2], *([1] * (own.ndim - 2)))
        mean, std = flat.mean(-1).view(shape), flat.std(-1).view(shape)
        h = F.gelu(self.shared(torch.cat([own, other], dim=1)))
        return self.norm(other) * (self.gamma(h) + std) + (self.beta(h) + mean)


class CrossModalFusion(nn.Module):
    """One direction of the adaptive cross-modal fusion: ``own + sigmoid(gate(other)) * (own + T)``,
    ``T = CrossMultiAxis(own, SAFM(own, other))`` (queries from ``own``, keys/values from the SAFM output)."""

    def __init__(self, spatial_dims: int, channels: int, window: Sequence[int], num_heads: int = 4,
                 mlp_ratio: float = 4.0, scale: float | None = None) -> None:
        super().__init__()
        self.safm = SpatialAdaptationFusion(spatial_dims, channels)
        self.transformer = MultiAxisBlock(spatial_dims, channels, window, num_heads, mlp_ratio, scale, cross=True)
        self.gate = conv_nd(spatial_dims, channels, 1, 1)

    def forward(self, own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        t = self.transformer(own, self.safm(own, other))
        return own + torch.sigmoid(self.gate(other)) * (own + t)


class MACTFusionEncoder(nn.Module):
    """One source's branch: dense extractor -> GRDB -> GRDB -> multi-axis block, ``(N, 1, *S) -> (N, f2, *S)``."""

    def __init__(self, spatial_dims: int, features: Sequence[int], window: Sequence[int], num_heads: int = 4,
                 mlp_ratio: float = 4.0, scale: float | None = None, large_kernel_size: int = 31) -> None:
        super().__init__()
        f0, f1, f2 = features
        self.extractor = DenseFeatureExtractor(spatial_dims, 1, f0, large_kernel_size)
        self.grdb1 = GradientResidualDenseBlock(spatial_dims, f0, f1)
        self.grdb2 = GradientResidualDenseBlock(spatial_dims, f1, f2)
        self.mixer = MultiAxisBlock(spatial_dims, f2, window, num_heads, mlp_ratio, scale, cross=False)

        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.extractor(x)  # few channels (4 per stage): stays NCHW, as its FFT conv wants
        if self.fast:
            f = channels_last(f)
        return self.mixer(self.grdb2(self.grdb1(f)))


class MACTFusion(nn.Module):
    """MACTFusion: two encoders, symmetric SAFM-guided cross multi-axis fusion, convolutional reconstruction.

    Args:
        spatial_dims: 2 (faithful) or 3 (same architecture with 3D convs, P x P x P windows/grids and a 3-direction
            Sobel; untested against any official model, and the large grouped kernel becomes
            ``large_kernel_size^3``: consider ``large_kernel_size=7`` and ``window_size=4`` in 3D).
        features: encoder widths ``(f0, f1, f2)``: dense extractor, GRDB1, GRDB2 / attention width (official
            ``(16, 32, 48)``). ``f0`` must be a multiple of 4 and ``f2`` of ``num_heads``.
        window_size: window and grid size P (int or per-axis; official 8, i.e. 64 tokens per group).
        num_heads: attention heads (official 4).
        mlp_ratio: Transformer MLP hidden width / ``f2`` (official 4).
        large_kernel_size: kernel of the grouped conv in the dense extractor (official 31).
        fix_attention_scale: ``False`` (default, faithful) scales the logits by ``num_heads ** -0.5`` (0.5), the
            official bug that the released weights were trained with; ``True`` uses the standard
            ``head_dim ** -0.5`` (0.289 at the official width); use it when training from scratch.
        fast: ``True`` (default): the optimised forward (channels-last maps after the dense extractor; window /
            grid partitions as one copy of C-value runs each way (:func:`tokens_to_groups`); the MLP on blocks of
            tokens that fit in cache; per-direction depthwise Sobel convs; SAFM statistics in one pass);
            ``False``: the plain parity-faithful forward (``scripts/benchmark.py`` times both). Same parameters
            and outputs (float rounding); every module is still called, so hooks (e.g. MAC counters) see the same
            calls. Switch later with :func:`~.blocks.set_fast`.

    Forward ``forward(x, mode="fuse")``:
        - ``x``: ``(B, 2, *spatial)`` in [0, 1]; channel 0 = MRI (official ``image_vis`` slot, source A), channel 1 =
          CT / PET-Y / SPECT-Y (official ``image_ir`` slot, source B). Any size: sizes that are not a multiple of
          ``window_size`` are padded (reflect, or replicate when the image is smaller than the pad) to the next
          multiple, symmetrically, and the output is cropped back.
        - ``mode="fuse"`` and ``mode="train"``: the fused image ``(B, 1, *spatial)``, raw (LeakyReLU output,
          unbounded; not clamped). The loss (:class:`scripts.losses.MACTFusionLoss`) needs only the fused image.

    Official slots: the official network takes a 3-channel ``image_vis`` in YCrCb and reads only its Y channel.
    The official test feeds the MRI there (a grey PNG read as 3 equal BGR channels, so Y = the grey value up to
    float rounding: ``0.299 + 0.587 + 0.114`` is 1 in float32 only approximately) and the CT in ``image_ir``.
    Here channel 0 is that Y directly: a grey MRI in [0, 1] goes in unchanged, a colour image would go in as its
    luminance (the bundle's colour handling restores the chroma of the colour source afterwards). The official
    code only recolours ``image_vis``, so for PET/SPECT it would put the colour image there; the architecture and
    the loss are symmetric in the two slots (separate, identical branches), so MRI-first costs nothing.

    Parameters: 571,035 at the default width (the official module registers 623,355; 52,320 belong to modules its
    forward never calls, ``SAM.conv_noshared``, the self block's second SD-Conv and the MaxViT classifier parts,
    which are not created here).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        features: Sequence[int] = (16, 32, 48),
        window_size: int | Sequence[int] = 8,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        large_kernel_size: int = 31,
        fix_attention_scale: bool = False,
        fast: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        features = tuple(int(f) for f in features)
        if len(features) != 3:
            raise ValueError(f"features must be (f0, f1, f2), got {features}")
        f0, f1, f2 = features
        if f2 % num_heads:
            raise ValueError(f"features[2] ({f2}) must be divisible by num_heads ({num_heads})")
        self.spatial_dims = spatial_dims
        self.features = features
        self.window_size = tuple(int(w) for w in ensure_tuple_rep(window_size, spatial_dims))
        self.fix_attention_scale = fix_attention_scale
        scale = (f2 // num_heads) ** -0.5 if fix_attention_scale else num_heads**-0.5
        kw = dict(num_heads=num_heads, mlp_ratio=mlp_ratio, scale=scale)
        enc = dict(large_kernel_size=large_kernel_size, **kw)
        self.encoder_a = MACTFusionEncoder(spatial_dims, features, self.window_size, **enc)
        self.encoder_b = MACTFusionEncoder(spatial_dims, features, self.window_size, **enc)
        self.fusion_a = CrossModalFusion(spatial_dims, f2, self.window_size, **kw)
        self.fusion_b = CrossModalFusion(spatial_dims, f2, self.window_size, **kw)
        conv = Conv[Conv.CONV, spatial_dims]
        self.decoder = nn.Sequential(
            conv(2 * f2, f2, 1),
            nn.LeakyReLU(0.1),
            conv(f2, f1, 3, padding=1, padding_mode="reflect"),
            nn.LeakyReLU(0.1),
            conv(f1, 1, 3, padding=1, padding_mode="reflect"),
            nn.LeakyReLU(0.1),
        )
        self.fast = fast
        set_fast(self, fast)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a (B, 2, *spatial) tensor with {self.spatial_dims} spatial dims, "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != 2:
            raise ValueError(f"expected 2 channels (MRI, other), got {x.shape[1]}")

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...] | None]:
        """Pad the spatial size up to a multiple of the window; return the padded tensor and the crop back."""
        spatial = x.shape[2:]
        total = [(-s) % w for s, w in zip(spatial, self.window_size)]
        if not any(total):
            return x, None
        lo = [t // 2 for t in total]
        pad = [p for t, low in zip(reversed(total), reversed(lo)) for p in (low, t - low)]  # last axis first
        mode = "reflect" if all(t - low < s for t, low, s in zip(total, lo, spatial)) else "replicate"
        crop = (..., *(slice(low, low + s) for low, s in zip(lo, spatial)))
        return F.pad(x, pad, mode=mode), crop

    def fuse(self, x: torch.Tensor, return_intermediates: bool = False):
        """Fused image ``(B, 1, *S)`` from ``x`` ``(B, 2, *S)``; optionally also a dict of the encoder outputs
        ``feat_a`` (MRI) / ``feat_b`` (other) and the cross-fusion outputs ``cross_a`` / ``cross_b`` (the
        decoder input is ``cat(cross_a, cross_b)``), all ``(B, f2, *S)``."""
        self._check_input(x)
        x, crop = self._pad(x)
        fa = self.encoder_a(x[:, :1])
        fb = self.encoder_b(x[:, 1:2])
        ca = self.fusion_a(fa, fb)
        cb = self.fusion_b(fb, fa)
        out = self.decoder(torch.cat([ca, cb], dim=1))
        if crop is not None:
            out = out[crop]
        if not return_intermediates:
            return out
        inter = {"feat_a": fa, "feat_b": fb, "cross_a": ca, "cross_b": cb}
        if crop is not None:
            inter = {k: v[crop] for k, v in inter.items()}
        return out, inter

    def forward(self, x: torch.Tensor, mode: str = "fuse") -> torch.Tensor:
        if mode not in ("fuse", "train"):
            raise ValueError(f"mode must be 'fuse' or 'train', got {mode!r}")
        return self.fuse(x)
