"""DRAN: edge-enhanced Dilated Residual Attention Network for multimodal image fusion.

Zhou et al., "Edge-Enhanced Dilated Residual Attention Network for Multimodal Medical Image Fusion", BIBM 2024
(arXiv 2411.11799). Re-implemented from a written description of the official code; numerically equivalent to it
in eval mode (see tests/test_parity.py), with only the parameters that the forward pass uses.

Notation: ``G(x) = ReLU(U(A(x)))`` is the parameter-free pool gate (:class:`PoolGate`), ``phi`` is LeakyReLU(0.2).

Encoder (one single-channel image ``I``, width ``F = features``)::

    s  = C1[1->F](I)                            # shallow 1x1 conv (computed once; the original runs it twice)
    x1 = I + G(I) * s                           # I and G(I) broadcast over the F channels
    x2 = x1 + G(x1) * DRA(x1)
    F  = x2 + Edge(s)
    DRA(z0):  z = BN(C1[3F->F](cat(C3_d1(z0), C3_d3(z0), C3_d5(z0))))
              r = z + G(z) * (K z + K K z + K K K z)     # one weight-shared 3x3 conv K, no nonlinearity
              return BN(r)                               # the *same* BN module again (official quirk)
    Edge(s):  dense = C1[2F->F](drop(phi(C3[2F->2F](cat(s, phi(C3[F->F](s)))))))
              grad  = C1[F->F](|Kx * s| + |Ky * s|)      # depthwise, trainable, Sobel-initialised
              return drop(dense + grad)                  # one dropout module (p=dropout) at both sites

Decoder: ``C3[F->F], phi, C3[F->F/2], phi, C3[F/2->1]``, no output activation.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (
    PoolGate, SobelGradient, batch_norm_nd, conv_fn, conv_nd, few_channel_conv, fold_bn, mix_kernel, mul_upsampled,
    set_fast,
)
from .fusion_rules import get_fusion_rule, sfnn

__all__ = ["DRAN", "DRANEncoder", "DilatedResidualAttention", "EdgeEnhancer"]


class DilatedResidualAttention(nn.Module):
    """Dilated multiscale convs (dilations 1/3/5) + reduction + BN, then the residual gated recursive conv."""

    def __init__(self, spatial_dims: int, features: int) -> None:
        super().__init__()
        self.dilated = nn.ModuleList(conv_nd(spatial_dims, features, features, 3, dilation=d) for d in (1, 3, 5))
        self.reduce = conv_nd(spatial_dims, 3 * features, features, 1)
        self.norm = batch_norm_nd(spatial_dims, features)  # applied twice, as the official code does
        self.recursive = conv_nd(spatial_dims, features, features, 3)  # K, applied 1, 2 and 3 times
        self.gate = PoolGate(spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.reduce(torch.cat([conv(x) for conv in self.dilated], dim=1)))
        k1 = self.recursive(z)
        k2 = self.recursive(k1)
        k3 = self.recursive(k2)  # K z, K(K z), K(K(K z)): 3 conv calls instead of the official 6, same values
        return self.norm(z + self.gate(z) * (k1 + k2 + k3))


class EdgeEnhancer(nn.Module):
    """Dense conv path plus trainable-Sobel gradient path on the shallow features."""

    def __init__(self, spatial_dims: int, features: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.dense1 = conv_nd(spatial_dims, features, features, 3)
        self.dense2 = conv_nd(spatial_dims, 2 * features, 2 * features, 3)
        self.dense_out = conv_nd(spatial_dims, 2 * features, features, 1)
        self.sobel = SobelGradient(features, spatial_dims, trainable=True)
        self.grad_out = conv_nd(spatial_dims, features, features, 1)
        self.act = nn.LeakyReLU(0.2)
        self.dropout = nn.Dropout(dropout)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        a = self.act(self.dense1(s))
        b = self.act(self.dense2(torch.cat([s, a], dim=1)))
        dense = self.dense_out(self.dropout(b))
        grad = self.grad_out(self.sobel(s))
        return self.dropout(dense + grad)


class DRANEncoder(nn.Module):
    """``(N, 1, *S) -> (N, features, *S)``; full resolution throughout."""

    def __init__(self, spatial_dims: int = 2, features: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        self.shallow = conv_nd(spatial_dims, 1, features, 1)
        self.gate = PoolGate(spatial_dims)
        self.dra = DilatedResidualAttention(spatial_dims, features)
        self.edge = EdgeEnhancer(spatial_dims, features, dropout)

        self.fast = True

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return self.forward_fast(img)
        s = self.shallow(img)
        x1 = img + self.gate(img) * s
        x2 = x1 + self.gate(x1) * self.dra(x1)
        return x2 + self.edge(s)

    def forward_fast(self, img: torch.Tensor) -> torch.Tensor:
        """Same values as :meth:`forward` (float rounding aside) with about half the multiply-adds, channels-last.

        The shallow features are an affine function of the single-channel image, ``s[c] = w_c I + b_c``, so every
        map built linearly from them lives in a tiny channel basis, and a convolution that reads it can run on the
        basis with a pre-multiplied kernel (:func:`~.blocks.mix_kernel`; exact, zero padding included):

        - ``x1[c] = I + w_c G(I) I + b_c G(I)`` spans ``{I, G(I) I, G(I)}``: the three dilated 3x3 convs of the DRA
          block read these 3 channels instead of F, with the 1x1 reduction (and, in eval mode, the BatchNorm that
          follows it) folded into their kernels: one im2col + matrix product of 81 x F per pixel instead of
          3 F x F x 9 + 3F x F. ``G(x1)`` is pooled from the basis too.
        - ``s`` spans ``{I, 1}``: the edge enhancer's first 3x3 conv and the trainable Sobel responses read 2
          channels (one im2col product); the ``s`` half of the second 3x3 conv reads 2 channels instead of F.
        - the two 1x1 output convs of the edge enhancer accumulate into one buffer; gates multiply 2x2 blocks by
          broadcasting instead of materialising the upsampled gate; without autograd, sums are in place.

        The weight-shared recursive conv, the dense 3x3 conv and the decoder are unchanged. Maps are channels-last.
        """
        inplace = not torch.is_grad_enabled()
        conv = conv_fn(img)
        nd = img.ndim - 2
        n, spatial = img.shape[0], img.shape[2:]
        w_s = self.shallow.weight.reshape(-1)
        b_s = self.shallow.bias
        f = w_s.numel()
        pool = self.gate.pool
        g_img = self.gate(img)
        basis1 = torch.cat([img, g_img * img, g_img], 1)  # x1 = basis1 @ mix1^T, pixel-wise
        mix1 = torch.stack([torch.ones_like(w_s), w_s, b_s], 1)  # (F, 3)

        # DRA: z = BN(reduce(cat(C_d(x1) for d in 1, 3, 5))), every conv folded onto the 3-channel basis
        dra = self.dra
        reduce_w = dra.reduce.weight.reshape(f, 3, f)  # (out, dilation index, in)
        weights, bias = [], dra.reduce.bias
        for i, dconv in enumerate(dra.dilated):
            r = reduce_w[:, i]
            weights.append(mix_kernel(torch.einsum("oc,c...->o...", r, dconv.weight), mix1))
            bias = bias + r @ dconv.bias
        if not dra.norm.training:
            bias = fold_bn(dra.norm, weights[0], bias)[1]
            weights = [fold_bn(dra.norm, w, None)[0] for w in weights]
        z = few_channel_conv(basis1, weights, (1, 3, 5), bias).movedim(-1, 1)
        if dra.norm.training:
            z = dra.norm(z)
        k1 = dra.recursive(z)
        k2 = dra.recursive(k1)
        k3 = dra.recursive(k2)
        r = k1.add_(k2).add_(k3) if inplace else k1 + k2 + k3
        r = mul_upsampled(r, torch.relu(pool(z)), inplace)
        r = r.add_(z) if inplace else r + z
        if dra.norm.training:
            out = dra.norm(r)
        else:
            scale, shift = fold_bn(dra.norm, torch.ones(f, 1, device=r.device, dtype=r.dtype), None)
            shape = (1, f, *([1] * nd))
            out = torch.addcmul(shift.view(shape), r, scale.view(shape))
        # x2 = x1 + G(x1) * DRA(x1), G(x1) = ReLU(up(pool(basis1) @ mix1^T))
        gate1 = torch.relu(conv(pool(basis1), mix1.view(f, 3, *([1] * nd))))
        x2 = mul_upsampled(out, gate1, inplace=True)  # `out` is a fresh tensor
        x1 = torch.matmul(basis1.movedim(1, -1), mix1.t())  # (N, *S, F)
        x2 = x2.add_(x1.movedim(-1, 1)) if inplace else x2 + x1.movedim(-1, 1)

        # edge enhancer on s = [I, 1] @ [w, b]^T (zero padding of s = zero padding of both basis maps)
        edge = self.edge
        basis0 = torch.cat([img, torch.ones_like(img)], 1)
        mix0 = torch.stack([w_s, b_s], 1)  # (F, 2)
        dirs = edge.sobel.weight.shape[0] // f
        # Sobel kernel of channel c, direction j on basis0: [w_c K_cj, b_c K_cj], ordered direction-major
        sobel_w = edge.sobel.weight.view(f, dirs, 1, *edge.sobel.weight.shape[2:]) * mix0.view(f, 1, 2, *([1] * nd))
        sobel_w = sobel_w.transpose(0, 1).reshape(dirs * f, 2, *sobel_w.shape[3:])
        y = few_channel_conv(basis0, [torch.cat([mix_kernel(edge.dense1.weight, mix0), sobel_w])], (1,))
        a = F.leaky_relu(y[..., :f] + edge.dense1.bias, edge.act.negative_slope, inplace=True)
        grad_in = y[..., f:2 * f].abs()  # (N, *S, F): sum_j |K_j * s|
        for j in range(2, dirs + 1):
            grad_in = grad_in.add_(y[..., j * f:(j + 1) * f].abs())
        w2 = edge.dense2.weight
        w2 = torch.cat([w2[:, f:], mix_kernel(w2[:, :f], mix0)], 1)  # reads cat(a, basis0)
        a_b0 = torch.cat([a, basis0.movedim(1, -1)], -1).movedim(-1, 1)  # channels-last (N, F + 2, *S)
        b = edge.dropout(F.leaky_relu(conv(a_b0, w2, edge.dense2.bias, padding=1), edge.act.negative_slope,
                                      inplace=True))
        # dense_out(b) + grad_out(grad_in): two 1x1 convs accumulated as matrix products on the token layout
        e = torch.addmm(edge.dense_out.bias + edge.grad_out.bias, grad_in.reshape(-1, f),
                        edge.grad_out.weight.reshape(f, f).t())
        b_tok = b.movedim(1, -1).reshape(-1, b.shape[1])
        w_out = edge.dense_out.weight.reshape(f, -1).t()
        # the in-place product is not autocast: give it the activations' dtype (float16 / bfloat16 under AMP)
        e = e.addmm_(b_tok.to(e.dtype), w_out.to(e.dtype)) if inplace else torch.addmm(e, b_tok, w_out)
        e = edge.dropout(e.view(n, *spatial, f).movedim(-1, 1))
        return x2.add_(e) if inplace else x2 + e


class DRAN(nn.Module):
    """Edge-enhanced DRAN: an autoencoder trained on single images, fused at feature level at test time.

    Args:
        spatial_dims: 2 (faithful) or 3 (same architecture with 3D convs/pools and 3-direction Sobel).
        features: encoder width (64 in the paper); the decoder narrows to ``features // 2`` then 1.
        dropout: dropout probability at the two edge-enhancer sites (active in train mode only).
        fusion_rule: a key of :data:`~scripts.networks.fusion_rules.FEATURE_FUSION_RULES` ("sfnn" default,
            "addition", "average", "max", "l1", "fer") or a callable ``rule(fa, fb, return_weights=False)``.

    Forward ``forward(x, mode="fuse")``:
        - ``x``: ``(B, 2, *spatial)``, channel 0 = MRI (structural source A), channel 1 = CT/PET-Y/SPECT-Y
          (source B), intensities in [0, 1]. Any H/W/(D), odd included (see :class:`PoolGate`).
        - ``mode="fuse"``: fused image ``(B, 1, *spatial)``, raw decoder output (not clamped).
        - ``mode="train"``: per-channel autoencoder reconstruction ``(B, C, *spatial)``; every channel is encoded
          and decoded on its own (channels folded into the batch, one encoder and one decoder call).

    Channel order vs the official code: the official call is ``fusion_strategy(fe(functional), fe(MRI))`` with
    its first weight for the functional image. Here ``fuse_features(fa, fb)`` is called with ``fa`` = MRI
    (channel 0) and ``fb`` = the other modality (channel 1), so the official ``w_1`` / ``feat_a`` are our
    ``w_b`` / ``feat_b``. Every rule is symmetric, so the fused features are bit-identical either way.

    Parameters: 414,081 at ``features=64`` (the official model registers 500,801, of which 86,720 are in modules
    the forward pass never uses; those are not created here).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        features: int = 64,
        dropout: float = 0.2,
        fusion_rule: str | Callable = "sfnn",
        fast: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.features = features
        self.fusion_rule = fusion_rule
        self.encoder = DRANEncoder(spatial_dims, features, dropout)
        half = features // 2
        self.decoder = nn.Sequential(
            conv_nd(spatial_dims, features, features, 3),
            nn.LeakyReLU(0.2),
            conv_nd(spatial_dims, features, half, 3),
            nn.LeakyReLU(0.2),
            conv_nd(spatial_dims, half, 1, 3),
        )
        self.fast = fast
        set_fast(self, fast)

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """``(N, 1, *S) -> (N, features, *S)``."""
        return self.encoder(img)

    def decode(self, feat: torch.Tensor) -> torch.Tensor:
        """``(N, features, *S) -> (N, 1, *S)``, unclamped."""
        return self.decoder(feat)

    def fuse_features(self, fa: torch.Tensor, fb: torch.Tensor, return_weights: bool = False):
        """Apply the configured fusion rule; ``fa`` = MRI features, ``fb`` = other modality's features."""
        rule = get_fusion_rule(self.fusion_rule)
        if rule is sfnn:  # the fast path spreads the per-channel SVDs over the intra-op threads
            return sfnn(fa, fb, return_weights=return_weights, parallel=self.fast)
        return rule(fa, fb, return_weights=return_weights)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a (B, C, *spatial) tensor with {self.spatial_dims} spatial dims, "
                             f"got shape {tuple(x.shape)}")

    def _encode_channels(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, C, features, *S)`` with one encoder call on the channel-folded batch."""
        b, c = x.shape[:2]
        feats = self.encode(x.reshape(b * c, 1, *x.shape[2:]))
        return feats.view(b, c, *feats.shape[1:])

    def fuse(self, x: torch.Tensor, return_intermediates: bool = False):
        """Fused image ``(B, 1, *S)`` from ``x`` ``(B, 2, *S)``; optionally also a dict with ``feat_a`` (MRI),
        ``feat_b`` (other), ``feat_fused`` and the rule's ``info`` entries (e.g. ``nuc_a``, ``w_a`` for SFNN)."""
        self._check_input(x)
        if x.shape[1] != 2:
            raise ValueError(f"fuse mode expects 2 channels (MRI, other), got {x.shape[1]}")
        feats = self._encode_channels(x)
        fa, fb = feats[:, 0], feats[:, 1]
        fused, info = self.fuse_features(fa, fb, return_weights=True)
        out = self.decode(fused)
        if not return_intermediates:
            return out
        return out, {"feat_a": fa, "feat_b": fb, "feat_fused": fused, **info}

    def forward(self, x: torch.Tensor, mode: str = "fuse") -> torch.Tensor:
        if mode == "fuse":
            return self.fuse(x)
        if mode == "train":
            self._check_input(x)
            b, c = x.shape[:2]
            recon = self.decode(self.encode(x.reshape(b * c, 1, *x.shape[2:])))
            return recon.view(b, c, *x.shape[2:])
        raise ValueError(f"mode must be 'fuse' or 'train', got {mode!r}")
