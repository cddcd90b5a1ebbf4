"""BSAFusion: one-stage registration and fusion of unaligned pairs (Li et al., AAAI 2025).

Built from the official code's architecture (``slrl123/BSAFusion``, ``RegFusion_lite``) as described in
``docs/README.md``; converted official weights reproduce its forward pass (``tests/test_parity.py``).

The moving image (CT, or the luminance of PET/SPECT) is registered to the fixed MRI and fused in the MRI frame:

1. a shared Restormer-style encoder gives shallow features (fused at the end) and a 3-channel map for
2. a shared ViT modality classifier whose class token is the *modality feature representation head* (MFRH);
3. the MFRH exchange (each image's patch tokens plus the *other* image's MFRH) and one Transfer ViT stack per image;
4. two registration chains (fixed and moving features), five coarse-to-fine steps each; every step predicts a
   +-1 px field on its grid, warps its chain's features and upsamples them; the final field is the difference
   of the two chains' upsampled, rescaled sums ("bidirectional stepwise" fields);
5. a fusion decoder that warps the moving token stream at each scale and reconstructs a Sigmoid image.

Every warp goes through :class:`monai.networks.blocks.Warp`. Fields are pull fields in pixels,
``aligned(p) = moving(p + ddf(p))``; the public ``ddf`` output uses MONAI's channel order (row, column), so
``Warp()(moving, ddf)`` applies it; the official code orders them (column, row).

``spatial_dims=3`` is the same architecture on volumes (not in the paper or the official code; no official
weights): 3D convolutions, Restormer channel attention and cross attention over voxels, ViT tokens from
``patch_size^3`` patches, 3-channel fields, trilinear resizing, warps through MONAI ``Warp`` in 3D. Internally every
field is in ``grid_sample`` order, last spatial axis first (2D: the official (column, row); 3D: (W, H, D) =
(axis 2, axis 1, axis 0)); the public ``ddf`` is its channel flip, MONAI order (axis 0, axis 1[, axis 2]), in both.
The 2D learned pixel-level positional map (resized to the image) has no cheap 3D counterpart (a 256^3 map is 16.7M
parameters); 3D uses a learned positional table over the token grid instead (see :class:`ModalityClassifier`).

Faithful defaults and explicit fixes (see the model card):

- ``official_warp=True`` reproduces the official feature/image warp (zero padding and a half-pixel
  ``align_corners`` mismatch: a zero field is not the identity); ``False`` warps with border padding exactly.
- ``token_shift=True`` reproduces the Transfer stacks' off-by-one (registration tokens shifted by one raster
  position); ``False`` drops the appended token instead.
- Any size works: inputs are zero-padded (at the end of each axis) to a multiple of ``patch_size`` and outputs
  cropped back (the official code takes only 256x256). The learned positional map is resized to the (padded) input,
  as officially (3D: the positional table to the token grid).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock, SABlock, Warp

from .blocks import autocast_off, channels_last, set_fast, spatial_norm

__all__ = ["BSAFusion", "RestormerLayer", "FieldWarp", "compose_fields"]

LEVELS = 5

# Defaults per spatial_dims: 2D = the official network; 3D = a CPU-sized width (patch 8 -> 4 registration levels).
DEFAULTS = {
    2: dict(hidden_size=256, patch_size=16, pos_size=256, reg_channels=(256, 64, 32, 16, 8, 1),
            fusion_channels=(64, 32, 16, 12), zero_init_fields=False),
    3: dict(hidden_size=64, patch_size=8, pos_size=None, reg_channels=(64, 32, 16, 8, 1),  # pos: 4 * patch
            fusion_channels=(32, 16, 12), zero_init_fields=True),
}


def _conv(cin: int, cout: int, k: int, dims: int = 2) -> nn.Module:
    return (nn.Conv2d if dims == 2 else nn.Conv3d)(cin, cout, k, padding=k // 2)


def _linear_mode(x: torch.Tensor) -> str:
    """``"bilinear"`` for (B, C, H, W), ``"trilinear"`` for (B, C, D, H, W)."""
    return "bilinear" if x.ndim == 4 else "trilinear"


def _spatial_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-(sample, channel) normalisation over the spatial axes without affine (the official "LayerNorm")."""
    return F.layer_norm(x, x.shape[2:])


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, prod(S), C): a view for a channels-last map."""
    return x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])


def _channel_attention(k: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``softmax`` over all C x C entries of ``G = k q`` (``k`` (B, C, N), ``q`` (B, N, C); ``G_ij = <k_i, q_j>``).

    In float32 with autocast off: the products sum over every pixel, which overflows float16 under AMP."""
    with autocast_off(k.device.type):
        gram = torch.bmm(k.float(), q.float())
        return gram.flatten(1).softmax(1).view_as(gram)


class RestormerLayer(nn.Module):
    """1x1 projection, single-head channel ("transposed") attention and a gated feed-forward, both residual.

    Differs from Restormer as the official code does: the attention softmax runs over all C x C entries jointly
    without temperature, the 3x3 convolutions are dense (not depthwise) and the norm is spatial.

    Input (B, in_channels, *S) -> (B, out_channels, *S), 2D or 3D (``dims``; the attention runs over all voxels).
    """

    def __init__(self, in_channels: int, out_channels: int, expansion: int = 4, dims: int = 2) -> None:
        super().__init__()
        c, h = out_channels, out_channels * expansion
        self.proj = _conv(in_channels, c, 1, dims)
        self.query = nn.Sequential(_conv(c, c, 1, dims), _conv(c, c, 3, dims))
        self.key = nn.Sequential(_conv(c, c, 1, dims), _conv(c, c, 3, dims))
        self.value = nn.Sequential(_conv(c, c, 1, dims), _conv(c, c, 3, dims))
        self.attn_out = _conv(c, c, 1, dims)
        self.ffn_gate = nn.Sequential(_conv(c, h, 1, dims), _conv(h, h, 3, dims))
        self.ffn_value = nn.Sequential(_conv(c, h, 1, dims), _conv(h, h, 3, dims))
        self.ffn_out = _conv(h, c, 1, dims)
        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and x.ndim == 4:
            return self._forward_cl(channels_last(x))
        x = self.proj(x)
        b, c = x.shape[:2]
        n = _spatial_norm(x)
        q, k, v = (m(n).flatten(2) for m in (self.query, self.key, self.value))
        attn = _channel_attention(k, q.transpose(1, 2)).to(v.dtype)
        x = x + self.attn_out(torch.bmm(attn.transpose(1, 2), v).view_as(x))
        n = _spatial_norm(x)
        return x + self.ffn_out(F.gelu(self.ffn_gate(n)) * self.ffn_value(n))

    def _forward_cl(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer on channels-last maps, the channel attention on token views (B, N, C): no layout copy."""
        x = self.proj(x)
        b, c = x.shape[:2]
        n = spatial_norm(x)
        q, k, v = (_tokens(m(n)) for m in (self.query, self.key, self.value))
        attn = _channel_attention(k.transpose(1, 2), q).to(v.dtype)
        out = torch.bmm(v, attn)  # (B, HW, C) = (attn^T v^T)^T
        x = x + self.attn_out(out.view(b, *x.shape[2:], c).movedim(-1, 1))
        n = spatial_norm(x)
        return x + self.ffn_out(F.gelu(self.ffn_gate(n)) * self.ffn_value(n))


class ViTBlock(nn.Module):
    """Pre-norm Transformer block on (B, N, hidden) tokens; one LayerNorm serves both sub-blocks (as officially)."""

    def __init__(self, hidden_size: int = 256, num_heads: int = 4, mlp_dim: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        # MONAI's flash path applies its dropout even in eval mode, so it is used only where dropout is 0.
        self.attention = SABlock(hidden_size, num_heads, dropout_rate=dropout, qkv_bias=False,
                                 use_flash_attention=dropout == 0)
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout_rate=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm(x))
        return x + self.mlp(self.norm(x))


class ModalityClassifier(nn.Module):
    """ViT that classifies the modality from tokens; its class-token output is the MFRH.

    With ``embed=True`` (the classifier) it first adds a learned positional map resized to the image and embeds
    16x16 patches; without (the discriminator) it starts from tokens. Returns (logits (B, 2), MFRH (B, hidden),
    patch tokens (B, N, hidden), N in raster order of the token grid).

    3D (``dims=3``): ``patch_size^3`` patches (a strided Conv3d), and the natural 3D positional embedding: a learned
    table ``pos_table`` (1, hidden, g, g, g) over the token grid, ``g = max(1, pos_size // patch_size)``
    (initialised N(0, 0.02^2) as in ViT), added to the patch tokens after embedding and resized trilinearly
    (corners aligned) to the input's token grid when that differs, as the 2D map is resized to the image.
    """

    def __init__(self, in_channels: int = 3, hidden_size: int = 256, patch_size: int = 16, num_heads: int = 4,
                 depth: int = 2, dropout: float = 0.1, embed: bool = True, pos_size: int = 256,
                 dims: int = 2) -> None:
        super().__init__()
        if embed and dims == 2:
            self.pos_map = nn.Parameter(torch.randn(1, 1, pos_size, pos_size))
            self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        elif embed:
            g = max(1, pos_size // patch_size)
            self.pos_table = nn.Parameter(torch.randn(1, hidden_size, g, g, g) * 0.02)
            self.patch_embed = nn.Conv3d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.blocks = nn.Sequential(*[ViTBlock(hidden_size, num_heads, hidden_size, dropout) for _ in range(depth)])
        self.head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, 2))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5:
            t = self.patch_embed(x)
            pos = self.pos_table
            if pos.shape[2:] != t.shape[2:]:
                pos = F.interpolate(pos, size=t.shape[2:], mode="trilinear", align_corners=True)
            return (t + pos).flatten(2).transpose(1, 2)
        pos = F.interpolate(self.pos_map, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return self.patch_embed(x + pos).flatten(2).transpose(1, 2)

    def forward(self, tokens: torch.Tensor):
        t = self.blocks(torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], 1))
        return self.head(t[:, 0]), t[:, 0], t[:, 1:]


class TransferStack(nn.Module):
    """MFRH injection (broadcast add of the other image's MFRH) and a ViT stack with one appended learned token."""

    def __init__(self, hidden_size: int = 256, num_heads: int = 4, depth: int = 2, token_shift: bool = True) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.blocks = nn.Sequential(*[ViTBlock(hidden_size, num_heads, hidden_size, 0.0) for _ in range(depth)])
        self.token_shift = token_shift

    def forward(self, tokens: torch.Tensor, other_mfrh: torch.Tensor) -> torch.Tensor:
        t = torch.cat([tokens + other_mfrh[:, None], self.token.expand(tokens.shape[0], -1, -1)], 1)
        t = self.blocks(t)
        # Official: drops position 0 and keeps the appended token, shifting the grid by one token.
        return t[:, 1:] if self.token_shift else t[:, :-1]


class FieldWarp(nn.Module):
    """Pull-warp through MONAI ``Warp`` with a field in the official (column, row) channel order, in pixels.

    2D or 3D: the field is in ``grid_sample`` order, last spatial axis first ((column, row); 3D (W, H, D)), and is
    flipped into MONAI's order for ``Warp``. ``official=True`` reproduces the official ``Warper2d``: it normalises
    with the ``align_corners=True`` rule but samples with ``align_corners=False`` and zero padding, i.e. it samples
    at ``(p + u) * N / (N - 1) - 0.5`` along each axis (3D: the same rule per axis).
    """

    def __init__(self, official: bool = False) -> None:
        super().__init__()
        self.official = official
        with warnings.catch_warnings():  # MONAI warns that it uses torch's grid_sample: that is intended
            warnings.simplefilter("ignore")
            self.warp = Warp(mode="bilinear", padding_mode="zeros" if official else "border")

    def forward(self, image: torch.Tensor, flow_xy: torch.Tensor) -> torch.Tensor:
        ddf = flow_xy.flip(1)
        if self.official:
            spatial = ddf.shape[2:]
            comps = []
            for i, n in enumerate(spatial):
                view = [1] * len(spatial)
                view[i] = n
                p = torch.arange(n, device=ddf.device, dtype=ddf.dtype).view(view)
                comps.append((p + ddf[:, i]) * (n / max(n - 1, 1)) - 0.5 - p)
            ddf = torch.stack(comps, 1)
        return self.warp(image, ddf)


def compose_fields(fields: list[torch.Tensor], size) -> torch.Tensor:
    """Sum of coarse-to-fine per-level fields upsampled to ``size`` (bilinear / trilinear in 3D, corners aligned),
    each scaled by its grid's ratio to ``size`` (a plain sum, not a composition by warping, as officially)."""
    total = 0
    for phi in fields:
        scale = size[-1] / phi.shape[-1]
        up = phi if phi.shape[2:] == tuple(size) else F.interpolate(phi, size=tuple(size), mode=_linear_mode(phi),
                                                                      align_corners=True)
        total = total + up * scale
    return total


class _CrossAttention(nn.Module):
    """a + a' * softmax_HW(a' * b'), with a' = ReLU(conv(a)), b' = ReLU(conv'(b)); softmax over all voxels in 3D."""

    def __init__(self, channels: int, dims: int = 2) -> None:
        super().__init__()
        self.conv_a = _conv(channels, channels, 3, dims)
        self.conv_b = _conv(channels, channels, 3, dims)
        self.fast = True

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a2, b2 = F.relu(self.conv_a(a)), F.relu(self.conv_b(b))
        if self.fast and a2.ndim == 4 and a2.is_contiguous(memory_format=torch.channels_last):
            # softmax over the pixels on the token view (B, HW, C): the result stays channels-last
            w = _tokens(a2 * b2).float().softmax(1).view(a2.shape[0], *a2.shape[2:], a2.shape[1]).movedim(-1, 1)
            return a + a2 * w.to(a2.dtype)
        # softmax over all pixels in float32 (also under AMP)
        return a + a2 * (a2 * b2).flatten(2).float().softmax(-1).view_as(a2).to(a2.dtype)


class RegistrationStep(nn.Module):
    """One step of a registration chain: a +-1 px field on this grid (``dims`` channels, tanh) and the chain's state
    for the next grid."""

    def __init__(self, channels: int, out_channels: int, dims: int = 2) -> None:
        super().__init__()
        self.mix = _conv(2 * channels, channels, 1, dims)
        self.cross = _CrossAttention(channels, dims)  # shared by both orders
        self.refine = _conv(channels, channels, 3, dims)
        self.flow = _conv(channels, dims, 3, dims)
        self.state_out = _conv(channels, out_channels, 1, dims)

    def forward(self, state: torch.Tensor, pair: torch.Tensor, last: bool = False):
        g = F.leaky_relu(self.mix(pair))
        z = self.cross(state, g) + self.cross(g, state)
        z = z + F.relu(self.refine(z))
        phi = torch.tanh(self.flow(z))
        if last:  # the official code computes the next state here too and throws it away
            return None, phi
        up = F.interpolate(z, scale_factor=2, mode=_linear_mode(z), align_corners=True)
        return F.leaky_relu(self.state_out(up)), phi


class _FeatureUpsampler(nn.Module):
    """x2 bilinear / trilinear (corners aligned), 1x1 then 3x3 conv, instance norm, LeakyReLU."""

    def __init__(self, cin: int, cout: int, dims: int = 2) -> None:
        super().__init__()
        self.reduce = _conv(cin, cout, 1, dims)
        self.conv = _conv(cout, cout, 3, dims)
        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.reduce(F.interpolate(x, scale_factor=2, mode=_linear_mode(x), align_corners=True)))
        if self.fast and x.ndim == 4:  # instance_norm would return NCHW
            return F.leaky_relu(spatial_norm(channels_last(x)))
        return F.leaky_relu(F.instance_norm(x.float()).to(x.dtype))  # statistics in float32 under AMP


class RegistrationNet(nn.Module):
    """Two chains of stepwise fields: the fixed chain's sum is subtracted from the moving chain's sum."""

    def __init__(self, channels=(256, 64, 32, 16, 8, 1), official_warp: bool = True, dims: int = 2) -> None:
        super().__init__()
        pairs = list(zip(channels[:-1], channels[1:]))
        self.fixed_steps = nn.ModuleList([RegistrationStep(c, o, dims) for c, o in pairs])
        self.moving_steps = nn.ModuleList([RegistrationStep(c, o, dims) for c, o in pairs])
        self.upsamplers = nn.ModuleList([_FeatureUpsampler(c, o, dims) for c, o in pairs[:-1]])
        self.warp = FieldWarp(official_warp)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor):
        """(B, C, h, w) token maps -> (per-level fields [phi_1..phi_10], field (B, 2, 16h, 16w), (column, row)).

        3D: (B, C, d, h, w) -> fields with 3 channels, (W, H, D) order, at ``patch_size`` times the token grid."""
        a_f, a_m, s_f, s_m = fixed, moving, fixed, moving
        phis = []
        n = len(self.fixed_steps)
        for k in range(n):
            last = k == n - 1
            pair = torch.cat([a_f, a_m], 1)
            s_f, phi_f = self.fixed_steps[k](s_f, pair, last)
            s_m, phi_m = self.moving_steps[k](s_m, pair, last)
            phis += [phi_f, phi_m]
            if not last:  # the last level's warped features are unused officially: not computed
                b = a_f.shape[0]
                warped = self.warp(torch.cat([a_f, a_m], 0), torch.cat([phi_f, phi_m], 0))
                # instance norm is per sample, so the shared upsampler can take both chains as one batch
                a_f, a_m = self.upsamplers[k](warped).split(b, 0)
        size = phis[-1].shape[2:]
        flow = compose_fields(phis[1::2], size) - compose_fields(phis[0::2], size)
        return phis, flow


class FusionDecoder(nn.Module):
    """Fuses the fixed token stream with the warped moving one at 4 scales, then the shallow encoder features."""

    def __init__(self, hidden_size: int = 256, channels=(64, 32, 16, 12), shallow: int = 8,
                 official_warp: bool = True, dims: int = 2) -> None:
        super().__init__()
        c = list(channels)
        self.stages = nn.ModuleList([RestormerLayer(2 * hidden_size, c[0], dims=dims)]
                                    + [RestormerLayer(3 * c[i - 1], c[i], dims=dims) for i in range(1, len(c))])
        tok = [hidden_size] + c[:-2]
        self.token_up = nn.ModuleList([_conv(tok[i], c[i], 1, dims) for i in range(len(c) - 1)])
        self.fused_up = nn.ModuleList([_conv(c[i], c[i], 1, dims) for i in range(len(c) - 1)])
        self.reconstruct = nn.Sequential(RestormerLayer(c[-1] + 2 * shallow, c[-1], dims=dims),
                                         RestormerLayer(c[-1], 1, dims=dims))
        self.warp = FieldWarp(official_warp)

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode=_linear_mode(x), align_corners=False)

    def forward(self, shallow_f, shallow_m, tokens_f, tokens_m, flow) -> torch.Tensor:
        q = None
        for i, stage in enumerate(self.stages):
            if i:
                b = tokens_f.shape[0]
                both = self._up(torch.cat([tokens_f, tokens_m], 0))  # the token upsampler is shared
                tokens_f, tokens_m = F.relu(self.token_up[i - 1](both)).split(b, 0)
                q = F.relu(self.fused_up[i - 1](self._up(q)))
            scale = flow.shape[-1] / tokens_m.shape[-1]
            flow_d = F.interpolate(flow, size=tokens_m.shape[2:], mode=_linear_mode(flow), align_corners=False) / scale
            parts = [tokens_f, self.warp(tokens_m, flow_d)] + ([q] if q is not None else [])
            q = stage(torch.cat(parts, 1))
        q = self._up(q)
        x = torch.cat([q, shallow_f, self.warp(shallow_m, flow)], 1)
        return torch.sigmoid(self.reconstruct(x))


class BSAFusion(nn.Module):
    """BSAFusion network.

    Input ``x`` (B, 2, H, W) in [0, 1]: channel 0 the fixed MRI, channel 1 the moving image (CT or PET/SPECT
    luminance). Any H, W (zero-padded to a multiple of ``patch_size`` internally and cropped back).

    ``forward(x, mode="fuse")`` returns the fused image (B, 1, H, W) in (0, 1) (MRI frame).
    ``mode="full"`` returns a dict: ``fused``, ``aligned`` (the moving image warped onto the MRI with border
    padding, as the training loss and the official colour path warp it, (B, 1, H, W); with ``official_warp`` also
    ``aligned_official``, the zero-padded, half-pixel-shifted warp the official test script saves),
    ``ddf`` (B, 2, H, W) the pull field in pixels, MONAI (row, column) order, ``logits_fixed``/``logits_moving``
    (B, 2) modality logits (index 1 = MRI). ``mode="train"`` adds what :class:`scripts.losses.BSAFusionLoss`
    needs: the per-level fields, the discriminator logits and the moving image warped with border padding.

    3D (``spatial_dims=3``): input (B, 2, D, H, W), any size (padded to multiples of ``patch_size`` per axis);
    ``fused``/``aligned`` (B, 1, D, H, W); ``ddf`` (B, 3, D, H, W) in voxels, MONAI order (axis 0, 1, 2), so
    ``monai.networks.blocks.Warp()(moving, ddf)`` gives ``aligned``; ``mode="train"``'s ``flow`` and ``phis`` are in
    the internal (axis 2, 1, 0) order (``ddf = flow.flip(1)``). Token grid ``(D/p, H/p, W/p)`` (raster order),
    ``log2(p)`` registration levels (the last at full resolution) and ``log2(p)`` fusion stages.

    Args:
        spatial_dims: 2 (the official network, parity-exact with converted weights) or 3 (volumes).
        hidden_size, num_heads, patch_size, depth: ViT width, heads, patch side, blocks per ViT stack.
            ``None``: 256 / 16 in 2D (official); 64 / 8 in 3D (CPU-sized: a 32^3 crop is 4^3 tokens; 4
            registration levels). ``patch_size`` must be ``2 ** (len(reg_channels) - 2)``; with only
            ``reg_channels`` given it follows from them.
        pos_size: 2D: side of the learned pixel-level positional map (resized to the input; 256 officially).
            3D: the voxel extent its learned token table covers, ``(pos_size // patch_size)^3`` tokens (resized to
            the token grid; default ``4 * patch_size``, one 32^3 training crop with patch 8).
        reg_channels: channel schedule of the registration chains (first = hidden_size; one level per entry but
            the last). ``None``: (256, 64, 32, 16, 8, 1) in 2D, (hidden_size, 32, 16, 8, 1) in 3D.
        fusion_channels: fusion decoder widths per scale, ``log2(patch_size)`` entries. ``None``:
            (64, 32, 16, 12) in 2D, (32, 16, 12) in 3D.
        shallow_channels: width of the shallow encoder features (8 officially).
        official_warp, token_shift: reproduce the official quirks (see module docstring); in 3D they act the same.
        dropout: attention/output dropout of the classifier and discriminator (0.1 officially).
        zero_init_fields: initialise the field heads to zero, so training starts from the identity mapping
            (a training choice, not the official init; converted weights overwrite it anyway). ``None``: False in
            2D (official init), True in 3D (no official 3D init exists; CPU-length runs start from the identity).
        fast: ``True`` (default): the optimised 2D forward (channels-last maps and weights, layout-keeping norms
            and attention; same outputs within float rounding); ``False``: the plain NCHW reference forward.
            Switchable later with :func:`scripts.networks.blocks.set_fast`. 3D always runs the reference path.
        refine_iters: 0 (default, the published method): the predicted field is used as is. ``> 0``: outside
            training, the full-resolution field is refined for that many Adam steps by maximising the mutual
            information of the warped moving image with the MRI (:func:`scripts.registration.refine_field_mi`, a
            classical test-time instance optimisation, not in the paper) before the fusion decoder, the aligned
            image and the returned ``ddf`` use it. ``refine_init``: ``"network"`` starts from the predicted field,
            ``"identity"`` from zero (replaces the network's field: the better choice for the shipped CPU-trained
            weights, whose field is about a constant offset). ``refine_options``: other keyword arguments.
    """

    def __init__(self, spatial_dims: int = 2, hidden_size: int | None = None, num_heads: int = 4,
                 patch_size: int | None = None, depth: int = 2, pos_size: int | None = None, reg_channels=None,
                 fusion_channels=None, shallow_channels: int = 8, official_warp: bool = True,
                 token_shift: bool = True, dropout: float = 0.1, zero_init_fields: bool | None = None,
                 fast: bool = True, refine_iters: int = 0, refine_init: str = "network",
                 refine_options: dict | None = None) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        dflt = DEFAULTS[spatial_dims]
        if hidden_size is None:
            hidden_size = reg_channels[0] if reg_channels is not None else dflt["hidden_size"]
        if reg_channels is None:
            reg_channels = (hidden_size, *dflt["reg_channels"][1:])
        reg_channels = tuple(int(c) for c in reg_channels)
        if patch_size is None:
            patch_size = 2 ** (len(reg_channels) - 2) if len(reg_channels) >= 2 else dflt["patch_size"]
        fusion_channels = tuple(dflt["fusion_channels"] if fusion_channels is None else fusion_channels)
        if pos_size is None:
            pos_size = dflt["pos_size"] or 4 * patch_size
        if zero_init_fields is None:
            zero_init_fields = dflt["zero_init_fields"]
        if reg_channels[0] != hidden_size:
            raise ValueError(f"reg_channels[0] ({reg_channels[0]}) must equal hidden_size ({hidden_size}).")
        if patch_size != 2 ** (len(reg_channels) - 2):
            raise ValueError(f"patch_size {patch_size} must be 2**(len(reg_channels) - 2) so that the last "
                             "registration step runs at full resolution.")
        if 2 ** len(fusion_channels) != patch_size:
            raise ValueError(f"fusion_channels needs log2(patch_size) = {patch_size.bit_length() - 1} entries (one "
                             f"decoder stage per scale), got {len(fusion_channels)}.")
        d = self.spatial_dims = spatial_dims
        self.patch_size = patch_size
        self.encoder_shallow = RestormerLayer(1, shallow_channels, dims=d)
        self.encoder_deep = RestormerLayer(shallow_channels, 3, dims=d)
        self.classifier = ModalityClassifier(3, hidden_size, patch_size, num_heads, depth, dropout, True, pos_size, d)
        self.discriminator = ModalityClassifier(3, hidden_size, patch_size, num_heads, depth, dropout, embed=False)
        self.discriminator.requires_grad_(False)  # a lagging copy of the classifier (see ``epoch_completed``)
        self.transfer_fixed = TransferStack(hidden_size, num_heads, depth, token_shift)
        self.transfer_moving = TransferStack(hidden_size, num_heads, depth, token_shift)
        self.registration = RegistrationNet(reg_channels, official_warp, d)
        self.fusion = FusionDecoder(hidden_size, fusion_channels, shallow_channels, official_warp, d)
        self.official_warp = official_warp
        if zero_init_fields:  # start training from the identity (officially: default init, fields of ~20 px)
            for step in list(self.registration.fixed_steps) + list(self.registration.moving_steps):
                nn.init.zeros_(step.flow.weight)
                nn.init.zeros_(step.flow.bias)
        self.image_warp = FieldWarp(official_warp)
        self.border_warp = FieldWarp(official=False)
        self._layout = torch.contiguous_format
        self.fast = fast
        set_fast(self, fast)  # the submodules' paths too
        if refine_iters < 0:
            raise ValueError(f"refine_iters must be >= 0, got {refine_iters}.")
        if refine_init not in ("network", "identity"):
            raise ValueError(f"refine_init must be 'network' or 'identity', got {refine_init!r}.")
        self.refine_iters, self.refine_init = int(refine_iters), refine_init
        self.refine_options = dict(refine_options or {})

    def _sync_layout(self) -> None:
        """Keep the convolution weights in the layout of the path in use (channels-last for ``fast``): oneDNN
        converts a weight whose layout differs from its input's on every call. Values and state dict unchanged."""
        layout = torch.channels_last if self.fast and self.spatial_dims == 2 else torch.contiguous_format
        if layout != self._layout:
            # not under inference_mode: weights converted there would become inference tensors, unusable for training
            with torch.inference_mode(False), torch.no_grad():
                for m in self.modules():
                    if isinstance(m, nn.Conv2d) and not m.weight.is_contiguous(memory_format=layout):
                        m.weight.data = m.weight.data.contiguous(memory_format=layout)
            self._layout = layout

    @torch.no_grad()
    def epoch_completed(self) -> None:
        """Copy the classifier's Transformer and head into the frozen discriminator (done after every epoch)."""
        src = self.classifier.state_dict()
        self.discriminator.load_state_dict({k: v for k, v in src.items() if k in self.discriminator.state_dict()})

    def _grid(self, t: torch.Tensor, shape) -> torch.Tensor:
        grid = [s // self.patch_size for s in shape]
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)

    def forward(self, x: torch.Tensor, mode: str = "fuse"):
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != 2:
            axes = "H, W" if self.spatial_dims == 2 else "D, H, W"
            raise ValueError(f"BSAFusion expects (B, 2, {axes}) [fixed MRI, moving]; got {tuple(x.shape)}.")
        if mode not in ("fuse", "full", "train"):
            raise ValueError(f"mode must be 'fuse', 'full' or 'train', got {mode!r}.")
        size = tuple(x.shape[2:])
        p = self.patch_size
        pads = [(-s) % p for s in size]
        if any(pads):  # at the end of each axis; F.pad lists the last axis first
            x = F.pad(x, [v for pad in reversed(pads) for v in (0, pad)])
        self._sync_layout()
        if self.fast and self.spatial_dims == 2:  # (CPU conv3d returns NCDHW whatever its input: 3D stays NCDHW)
            x = channels_last(x)  # oneDNN's convolutions on few-channel maps run 2-4x faster channels-last
        fixed, moving = x[:, :1], x[:, 1:2]
        shape = x.shape[2:]

        # the shared encoder and classifier see both images as one batch (same result, one call each)
        n = x.shape[0]
        shallow = self.encoder_shallow(torch.cat([fixed, moving], 0))
        logits, mfrh, tokens = self.classifier(self.classifier.embed(self.encoder_deep(shallow)))
        shallow_f, shallow_m = shallow[:n], shallow[n:]
        logits_f, logits_m, mfrh_f, mfrh_m = logits[:n], logits[n:], mfrh[:n], mfrh[n:]
        tokens_f, tokens_m = tokens[:n], tokens[n:]
        trans_f = self.transfer_fixed(tokens_f, mfrh_m)
        trans_m = self.transfer_moving(tokens_m, mfrh_f)
        phis, flow = self.registration(self._grid(trans_f, shape), self._grid(trans_m, shape))
        if self.refine_iters and not self.training and mode != "train":
            from scripts.registration import refine_field_mi

            init = flow if self.refine_init == "network" else None
            flow = refine_field_mi(fixed, moving, init, self.refine_iters, warp_fn=self.border_warp,
                                   **self.refine_options).to(flow.dtype)
        fused = self.fusion(shallow_f, shallow_m, self._grid(tokens_f, shape), self._grid(tokens_m, shape), flow)

        crop = (..., *(slice(0, s) for s in size))
        if mode == "fuse":
            return fused[crop]
        out = {
            "fused": fused[crop],
            "aligned": self.border_warp(moving, flow)[crop],
            "ddf": flow.flip(1)[crop],
            "logits_fixed": logits_f,
            "logits_moving": logits_m,
        }
        if self.official_warp:  # what the official test script saves (zero padding, half-pixel shift)
            out["aligned_official"] = self.image_warp(moving, flow)[crop]
        if mode == "train":
            out["phis"] = phis
            out["flow"] = flow[crop]
            out["warped_border"] = out["aligned"]
            out["fixed"], out["moving"] = fixed[crop], moving[crop]
            out["logits_disc_fixed"] = self.discriminator(trans_f)[0]
            out["logits_disc_moving"] = self.discriminator(trans_m)[0]
        return out
