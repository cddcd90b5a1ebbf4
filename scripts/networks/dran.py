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
from torch import nn

from .blocks import PoolGate, SobelGradient, batch_norm_nd, conv_nd
from .fusion_rules import get_fusion_rule

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

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        s = self.shallow(img)
        x1 = img + self.gate(img) * s
        x2 = x1 + self.gate(x1) * self.dra(x1)
        return x2 + self.edge(s)


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

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """``(N, 1, *S) -> (N, features, *S)``."""
        return self.encoder(img)

    def decode(self, feat: torch.Tensor) -> torch.Tensor:
        """``(N, features, *S) -> (N, 1, *S)``, unclamped."""
        return self.decoder(feat)

    def fuse_features(self, fa: torch.Tensor, fb: torch.Tensor, return_weights: bool = False):
        """Apply the configured fusion rule; ``fa`` = MRI features, ``fb`` = other modality's features."""
        return get_fusion_rule(self.fusion_rule)(fa, fb, return_weights=return_weights)

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
