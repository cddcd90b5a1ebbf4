"""Small building blocks shared by the fusion networks (all ``spatial_dims``-generic, 2D or 3D)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm, Pool
from torch import nn

__all__ = ["conv_nd", "batch_norm_nd", "PoolGate", "sobel_kernels", "sobel_responses", "SobelGradient"]


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sobel_responses(x, self.weight, padding=1).abs().sum(2)
