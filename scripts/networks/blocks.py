"""Small building blocks shared by the fusion networks (all ``spatial_dims``-generic, 2D or 3D)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm, Pool
from torch import nn

__all__ = [
    "conv_nd", "batch_norm_nd", "PoolGate", "sobel_kernels", "sobel_responses", "SobelGradient", "set_fast",
    "channels_last", "conv_fn", "fold_bn", "mix_kernel", "few_channel_conv", "mul_upsampled", "tune_cpu_allocator",
    "compile_network",
]


# ------------------------------------------------------------------------------------------ fast-path helpers
def tune_cpu_allocator(enable: bool = True) -> bool:
    """Keep freed CPU tensor memory in the process instead of handing it back to the OS (glibc ``mallopt``).

    glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh ``mmap`` pages and unmaps them
    when freed, so every large intermediate (a 64-channel 256x256 pair is 33 MiB) is page-faulted and zeroed again
    on each forward pass: on the 2-core VM this made an elementwise add of 33 MiB take 32 ms instead of 4.4 ms and
    a window-partition copy 51 ms instead of 6 ms. ``enable=True`` raises the mmap and trim thresholds to 1 GiB
    (memory is reused; the process keeps its peak heap), ``False`` restores glibc's 128 KiB defaults (without the
    dynamic threshold) and trims the heap. Process-wide, affects every later allocation. Returns ``False`` where
    ``mallopt`` is unavailable (not glibc): a no-op there (use jemalloc/tcmalloc via ``LD_PRELOAD`` instead).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    value = 1 << 30 if enable else 128 * 1024
    ok = bool(mallopt(m_mmap_threshold, value)) and bool(mallopt(m_trim_threshold, value))
    if not enable and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    return ok


def set_fast(module: nn.Module, fast: bool = True) -> nn.Module:
    """Switch every submodule that has a ``fast`` attribute to the optimised (``True``) or the reference,
    parity-faithful (``False``) forward. Both paths use the same parameters and state dict; the fast one only
    reorders the arithmetic (outputs equal within float rounding, see ``tests/test_parity.py``). Returns ``module``."""
    for m in module.modules():
        if hasattr(m, "fast"):
            m.fast = bool(fast)
    return module


def compile_network(net: nn.Module, enabled: bool = True, **kwargs) -> nn.Module:
    """Opt-in ``torch.compile`` of ``net`` in place (``nn.Module.compile``: state dict keys unchanged) that falls
    back to eager execution, with a warning, if compiling or the first compiled call fails (e.g. no C++ compiler).

    Measured on the 2-core CPU VM: compiling MACTFusion took ~6 minutes and gave no speed-up over the eager
    optimised forward (``scripts/benchmark.py --compile`` times it); on a GPU it may pay off. Returns ``net``.
    """
    import logging

    if not enabled:
        return net
    log = logging.getLogger(__name__)
    try:
        net.compile(**kwargs)
    except Exception as e:  # noqa: BLE001 - opt-in optimisation: never fatal
        log.warning("torch.compile unavailable (%s); running eagerly", e)
        return net
    compiled = net._compiled_call_impl

    def guarded(*args, **kw):
        try:
            return compiled(*args, **kw)
        except Exception as e:  # noqa: BLE001
            log.warning("torch.compile failed (%s: %s); falling back to eager", type(e).__name__, str(e)[:200])
            net._compiled_call_impl = None
            return net._call_impl(*args, **kw)

    net._compiled_call_impl = guarded
    return net


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory order (NHWC / NDHWC strides, same shape and values): oneDNN's convolutions
    run ~1.3-2x faster on it than on NCHW on CPU; a no-op for other ranks."""
    if x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.ndim == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocast_off(device_type: str):
    """A context with autocast disabled on ``device_type`` (a no-op where autocast does not exist, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def spatial_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-(sample, channel) normalisation over the spatial axes, no affine (``InstanceNorm`` / a ``layer_norm``
    over ``x.shape[2:]``), written out so a channels-last map stays channels-last (``instance_norm`` and
    ``layer_norm`` return NCHW copies, which every following convolution would convert back)."""
    if x.dtype in LOW_PRECISION:  # AMP: float16 statistics over a whole map overflow (NaN gradients); float32
        return spatial_norm(x.float(), eps).to(x.dtype)
    var, mean = torch.var_mean(x, dim=tuple(range(2, x.ndim)), unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def conv_fn(x: torch.Tensor):
    """``F.conv2d`` or ``F.conv3d`` for a (N, C, *S) tensor with 2 or 3 spatial dims."""
    return F.conv2d if x.ndim == 4 else F.conv3d


def mix_kernel(weight: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """Kernel of ``conv(x, weight)`` for an input ``x = mix @ basis`` (channel ``c`` of x = ``sum_j mix[c, j]
    basis[j]``): ``(O, C, *k) x (C, J) -> (O, J, *k)``, so that ``conv(x, weight) == conv(basis, result)`` (exact
    in real arithmetic, also at zero-padded borders since the map is linear and pixel-wise)."""
    return torch.einsum("oc...,cj->oj...", weight, mix.to(weight.dtype))


def few_channel_conv(x: torch.Tensor, weights, dilations, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i conv(x, weights[i], dilation=dilations[i], padding="same") + bias`` for an input with few channels
    (a 1-3 channel "basis"), returned in token layout ``(N, *S, O)`` (contiguous; ``.movedim(-1, 1)`` is the
    channels-last ``(N, O, *S)`` map). 2D: one im2col (``F.unfold``) + one matrix product for all the kernels
    (oneDNN runs convolutions with 1-3 input channels at a few GMAC/s); 3D: ``F.conv3d`` calls."""
    n, spatial = x.shape[0], x.shape[2:]
    out_ch = weights[0].shape[0]
    if x.ndim == 4:
        cols = [F.unfold(x, int(w.shape[-1]), dilation=d, padding=d * (int(w.shape[-1]) // 2))
                for w, d in zip(weights, dilations)]
        cols = cols[0] if len(cols) == 1 else torch.cat(cols, 1)  # (N, sum C k^2, HW)
        kernel = torch.cat([w.reshape(out_ch, -1) for w in weights], 1)  # (O, sum C k^2)
        out = torch.matmul(cols.transpose(1, 2), kernel.t())  # (N, HW, O)
        if bias is not None:
            out = out + bias
        return out.view(n, *spatial, out_ch)
    out = None
    for w, d in zip(weights, dilations):
        y = conv_fn(x)(x, w, None, padding=d * (int(w.shape[-1]) // 2), dilation=d)
        out = y if out is None else out + y
    if bias is not None:
        out = out + bias.view(-1, *([1] * len(spatial)))
    return out.movedim(1, -1).contiguous()


def mul_upsampled(x: torch.Tensor, low: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``x * up2(low)`` cropped to ``x``'s size (``up2`` = x2 nearest upsampling), ``low`` of size ``ceil(S / 2)``.

    For channels-last ``x`` with even sizes the upsampled map is never materialised (a broadcast over 2x2 blocks);
    ``inplace`` (no autograd) overwrites ``x``. Same values as ``x * F.interpolate(low, scale_factor=2)[crop]``.
    """
    spatial = x.shape[2:]
    nd = len(spatial)
    fmt = torch.channels_last if nd == 2 else torch.channels_last_3d
    if all(s % 2 == 0 for s in spatial) and x.is_contiguous(memory_format=fmt):
        t = x.movedim(1, -1)  # (N, *S, C), contiguous
        blocks = t.view(t.shape[0], *[v for s in spatial for v in (s // 2, 2)], t.shape[-1])
        lo = low.movedim(1, -1)
        lo = lo.reshape(lo.shape[0], *[v for s in lo.shape[1:-1] for v in (s, 1)], lo.shape[-1])
        res = blocks.mul_(lo) if inplace else blocks * lo
        return res.view(t.shape).movedim(-1, 1)
    up = F.interpolate(low, scale_factor=2, mode="nearest")
    if tuple(up.shape[2:]) != tuple(spatial):
        up = up[(..., *(slice(0, int(s)) for s in spatial))]
    return x.mul_(up) if inplace else x * up


def fold_bn(bn: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
    """Eval-mode ``bn(conv(x, weight, bias))`` as one conv: returns the folded ``(weight, bias)``."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    w = weight * scale.view(-1, *([1] * (weight.ndim - 1)))
    b = shift if bias is None else bias * scale + shift
    return w, b


def conv_nd(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = True,
) -> nn.Module:
    """``nn.Conv{2,3}d`` with zero "same" padding for an odd ``kernel_size``."""
    padding = dilation * (kernel_size - 1) // 2
    conv_type = Conv[Conv.CONV, spatial_dims]
    return conv_type(
        in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, groups=groups, bias=bias
    )


def batch_norm_nd(spatial_dims: int, channels: int) -> nn.Module:
    """``nn.BatchNorm{2,3}d`` with PyTorch defaults (eps 1e-5, momentum 0.1)."""
    return Norm[Norm.BATCH, spatial_dims](channels)


class PoolGate(nn.Module):
    """Parameter-free gate ``G(x) = ReLU(U(A(x)))``: 2x average pooling, x2 nearest upsampling, ReLU.

    Output has the shape of ``x``. Odd sizes (on which the original pool-then-upsample crashes) are handled by
    padding to even and cropping back: the pool uses ``ceil_mode=True``, whose last partial window averages only
    the real pixels (identical to replicate-padding by one), and the upsampled gate is cropped to ``x``'s size.
    For even sizes this is bit-identical to the plain pool/upsample. ReLU is applied before the (exact) nearest
    upsampling, on the 2^d times smaller tensor; the two commute.
    """

    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        self.pool = Pool[Pool.AVG, spatial_dims](kernel_size=2, stride=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        gate = F.interpolate(torch.relu(self.pool(x)), scale_factor=2, mode="nearest")
        if tuple(gate.shape[2:]) != tuple(size):
            gate = gate[(..., *(slice(0, s) for s in size))]
        return gate


def sobel_kernels(spatial_dims: int = 2, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sobel kernels, shape ``(spatial_dims, 3, ..., 3)``.

    Kernel ``j`` differentiates (``[1, 0, -1]``) along spatial axis ``-(j + 1)`` (j=0: x/width, 1: y/height,
    2: z/depth) and smooths (``[1, 2, 1]``) along the others. In 2D: ``k[0] = [[1,0,-1],[2,0,-2],[1,0,-1]]`` and
    ``k[1] = k[0].T``.
    """
    smooth = torch.tensor([1.0, 2.0, 1.0], dtype=dtype)
    deriv = torch.tensor([1.0, 0.0, -1.0], dtype=dtype)
    kernels = []
    for j in range(spatial_dims):
        axis = spatial_dims - 1 - j
        k = torch.ones((), dtype=dtype)
        for a in range(spatial_dims):
            k = k[..., None] * (deriv if a == axis else smooth)
        kernels.append(k)
    return torch.stack(kernels)


def sobel_responses(x: torch.Tensor, weight: torch.Tensor, padding: int = 1) -> torch.Tensor:
    """Depthwise directional responses ``(B, C, n_dirs, *S')`` of ``x`` (B, C, *S).

    ``weight`` is ``(C * n_dirs, 1, 3, ..., 3)``, row ``c * n_dirs + j`` being direction ``j`` of channel ``c``.
    One grouped convolution computes all directions; ``padding=0`` gives the "valid" output.
    """
    b, c = x.shape[:2]
    conv = (F.conv2d, F.conv3d)[x.ndim - 4] if x.ndim in (4, 5) else F.conv1d
    y = conv(x, weight, padding=padding, groups=c)
    return y.view(b, c, weight.shape[0] // c, *y.shape[2:])


class SobelGradient(nn.Module):
    """Depthwise gradient magnitude ``sum_j |K_j * x|`` (no bias, zero padding 1), per channel.

    ``K_j`` are Sobel-initialised (:func:`sobel_kernels`); with ``trainable=True`` (the DRAN default) they are a
    parameter ``weight`` of shape ``(channels * spatial_dims, 1, 3, ..., 3)`` that training may move away from
    Sobel, otherwise a buffer.
    """

    def __init__(self, channels: int, spatial_dims: int = 2, trainable: bool = True) -> None:
        super().__init__()
        self.channels = channels
        k = sobel_kernels(spatial_dims)
        weight = k.unsqueeze(1).repeat(channels, *([1] * k.ndim))  # (C * n_dirs, 1, 3, ...)
        if trainable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return sobel_responses(x, self.weight, padding=1).abs().sum(2)
        # one depthwise conv per direction (channel multiplier 1): oneDNN runs a grouped conv with 2 outputs per
        # group through a slow generic kernel (~5x slower than two multiplier-1 depthwise convs); same values
        dirs = self.weight.shape[0] // self.channels
        conv = conv_fn(x)
        out = conv(x, self.weight[0::dirs], padding=1, groups=self.channels).abs()
        for j in range(1, dirs):
            out = out + conv(x, self.weight[j::dirs], padding=1, groups=self.channels).abs()
        return out
