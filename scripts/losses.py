"""Training losses, one class per method (``forward(pred, target)``), plus shared helpers."""

from __future__ import annotations

import functools
import os
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .networks.blocks import autocast_off, sobel_kernels, sobel_responses

__all__ = ["full_precision", "sobel_gradient_loss", "VGG16BNFeatures", "DRANLoss"]


def full_precision(fn):
    """Run a loss method in float32 with autocast off. Under AMP (the workflows' default on CUDA) the trainer calls
    the loss inside ``autocast``, where the SSIM / MS-SSIM filters and gradient convolutions would run in float16 /
    bfloat16 again after any ``.float()``: MS-SSIM's powers of small negative contrast terms then give NaN."""

    @functools.wraps(fn)
    def wrapper(self, pred, target, *args, **kwargs):
        ref = pred["fused"] if isinstance(pred, dict) else pred
        with autocast_off(ref.device.type):
            if isinstance(pred, dict):
                pred = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in pred.items()}
            elif pred.is_floating_point():
                pred = pred.float()
            return fn(self, pred, target.float(), *args, **kwargs)

    return wrapper


def sobel_gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sum_j mean((|S_j * pred| - |S_j * target|)^2)`` over the Sobel directions (x, y[, z]).

    Fixed Sobel kernels, "valid" convolution (no padding), applied to every channel of ``(B, C, *S)`` tensors.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    b, c, *spatial = pred.shape
    k = sobel_kernels(len(spatial), dtype=pred.dtype).to(pred.device).unsqueeze(1)  # (n_dirs, 1, 3, ...)
    both = torch.cat([pred, target]).reshape(2 * b * c, 1, *spatial)
    g = sobel_responses(both, k, padding=0).abs()  # (2BC, 1, n_dirs, *S')
    diff2 = (g[: b * c] - g[b * c :]).square()
    return diff2.transpose(0, 2).flatten(1).mean(1).sum()


class VGG16BNFeatures(nn.Module):
    """torchvision ``vgg16_bn().features[:22]`` rebuilt with the same layer indices (so its ``features.N.*`` keys
    load), returning the perceptual taps ``[relu1_2 (index 5), relu2_2 (12), bn3_3 (21, pre-ReLU)]``.

    These are the tensors the official loss ends up comparing: it hooks the BNs at 4/11/21, but the in-place
    ReLUs that follow overwrite the first two. Frozen and always in eval mode.
    """

    taps = (5, 12, 21)

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256):
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                in_ch = v
        self.features = nn.Sequential(*layers[: self.taps[-1] + 1])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG16BNFeatures":
        return super().train(False)

    def load_torchvision_weights(self, path: str | os.PathLike) -> None:
        """Load a local torchvision ``vgg16_bn`` state dict file (``features.N.*`` keys; others are ignored)."""
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        pattern = re.compile(r"^(?:module\.)?features\.(\d+)\.(.+)$")
        own = {}
        for key, value in sd.items():
            m = pattern.match(key)
            if m and int(m.group(1)) < len(self.features):
                own[f"{m.group(1)}.{m.group(2)}"] = value
        missing = sorted(set(self.features.state_dict()) - set(own))
        if missing:
            raise ValueError(f"{path}: not a torchvision vgg16_bn state dict, missing features.{missing[:5]}...")
        self.features.load_state_dict(own, strict=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


class DRANLoss(nn.Module):
    """DRAN autoencoder loss: ``MSE + grad_weight * L_grad + perceptual_weight * L_perc``.

    - ``L_grad``: :func:`sobel_gradient_loss` (fixed Sobel, valid convolution).
    - ``L_perc``: ``sum_l mean((phi_l(pred) - phi_l(target))^2)`` over the three taps of a frozen VGG16-bn
      (:class:`VGG16BNFeatures`); each channel is a grey image repeated to 3 channels, no ImageNet normalisation
      (as the official code). 2D only. Needs ``vgg_weights_path``, a local torchvision ``vgg16_bn`` state dict.

    The official argparse defaults are 0.5 / 0.5 (its README command uses 0.2 / 0.2); the perceptual term is off
    by default here because the VGG weights cannot be downloaded.

    Args:
        grad_weight: weight of the gradient loss.
        perceptual_weight: weight of the perceptual loss; > 0 requires ``vgg_weights_path``.
        vgg_weights_path: local torchvision ``vgg16_bn`` weights file (loaded with ``weights_only=True``).
    """

    def __init__(self, grad_weight: float = 0.5, perceptual_weight: float = 0.0,
                 vgg_weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.grad_weight = grad_weight
        self.perceptual_weight = perceptual_weight
        self.vgg = None
        if perceptual_weight > 0:
            if vgg_weights_path is None or not os.path.isfile(vgg_weights_path):
                raise ValueError(
                    "DRANLoss: perceptual_weight > 0 needs vgg_weights_path, a local torchvision vgg16_bn state "
                    f"dict file (nothing is downloaded); got {vgg_weights_path!r}. Set perceptual_weight=0 to "
                    "train without the perceptual term.")
            self.vgg = VGG16BNFeatures()
            self.vgg.load_torchvision_weights(vgg_weights_path)

    def perceptual(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.vgg is None:
            raise RuntimeError("perceptual loss disabled (perceptual_weight == 0)")
        if pred.ndim != 4:
            raise ValueError(f"the VGG perceptual loss is 2D only, got shape {tuple(pred.shape)}")

        def grey3(x):
            return x.reshape(-1, 1, *x.shape[2:]).expand(-1, 3, -1, -1)

        feats_p = self.vgg(grey3(pred))
        with torch.no_grad():
            feats_t = self.vgg(grey3(target))
        return sum(F.mse_loss(p, t) for p, t in zip(feats_p, feats_t))

    @full_precision
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.mse_loss(pred, target)
        if self.grad_weight:
            loss = loss + self.grad_weight * sobel_gradient_loss(pred, target)
        if self.perceptual_weight:
            loss = loss + self.perceptual_weight * self.perceptual(pred, target)
        return loss


class MsgFusionLoss(nn.Module):
    """MsgFusion loss (as the public code trains it): SSIM and MSE of the fused image to both sources.

    ``L = lam [g_s (1 - SSIM(O, A)) + (1 - g_s)(1 - SSIM(O, B))] + (1 - lam) [g_m MSE(O, A) + (1 - g_m) MSE(O, B)]``
    with ``O`` = fused ``pred`` (B, 1, *S) (raw, not clamped), ``A`` = MRI = ``target[:, 0]``, ``B`` = the other
    modality's grey/luminance = ``target[:, 1]`` (further target channels, e.g. a V' map, are ignored). Defaults
    lam = 0.8, g_s = g_m = 0.5, i.e. ``0.4 (1-SSIM_A) + 0.4 (1-SSIM_B) + 0.1 MSE_A + 0.1 MSE_B``. SSIM is MONAI's
    (:class:`monai.losses.SSIMLoss`: Gaussian window 11, sigma 1.5, K = (0.01, 0.03), "valid" filtering, mean over
    the image and the batch, data range 1), the same definition as the ``pytorch_msssim.ssim`` the public code
    uses. 2D or 3D (from the input); images must be at least ``win_size`` pixels along every axis.

    Args:
        ssim_weight: lam, weight of the SSIM part (the MSE part gets ``1 - lam``).
        ssim_mri_weight: g_s, share of the MRI in the SSIM part.
        mse_mri_weight: g_m, share of the MRI in the MSE part.
        win_size, kernel_sigma, data_range: SSIM window and data range.
        clamp_output: score the fused image clamped to [0, data_range], as every metric and the written images see
            it (not in the paper, default ``False``): the tanh output can sit a few grey levels above black in the
            background, which costs little in this loss but collapses SSIM there (model card, MsgFusion).
    """

    def __init__(self, ssim_weight: float = 0.8, ssim_mri_weight: float = 0.5, mse_mri_weight: float = 0.5,
                 win_size: int = 11, kernel_sigma: float = 1.5, data_range: float = 1.0,
                 clamp_output: bool = False) -> None:
        super().__init__()
        from monai.losses import SSIMLoss

        self.ssim_weight, self.ssim_mri_weight, self.mse_mri_weight = ssim_weight, ssim_mri_weight, mse_mri_weight
        self.clamp_output, self.data_range = clamp_output, data_range
        self.ssim = nn.ModuleDict({
            f"{d}d": SSIMLoss(spatial_dims=d, data_range=data_range, win_size=win_size, kernel_sigma=kernel_sigma)
            for d in (2, 3)
        })

    @full_precision
    def terms(self, pred: torch.Tensor, target: torch.Tensor) -> dict:
        """The four unweighted terms ``ssim_a``, ``ssim_b`` (1 - SSIM) and ``mse_a``, ``mse_b``."""
        if pred.ndim not in (4, 5) or pred.shape[1] != 1:
            raise ValueError(f"pred must be a fused (B, 1, *S) image, got shape {tuple(pred.shape)}")
        if target.ndim != pred.ndim or target.shape[1] < 2 or target.shape[2:] != pred.shape[2:] \
                or target.shape[0] != pred.shape[0]:
            raise ValueError(f"target must hold the sources (B, 2, *S) matching pred {tuple(pred.shape)}, "
                             f"got {tuple(target.shape)}")
        ssim = self.ssim[f"{pred.ndim - 2}d"]
        if self.clamp_output:
            pred = pred.clamp(0.0, self.data_range)
        a, b = target[:, 0:1].to(pred.dtype), target[:, 1:2].to(pred.dtype)
        return {"ssim_a": ssim(pred, a), "ssim_b": ssim(pred, b),
                "mse_a": F.mse_loss(pred, a), "mse_b": F.mse_loss(pred, b)}

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = self.terms(pred, target)
        lam, gs, gm = self.ssim_weight, self.ssim_mri_weight, self.mse_mri_weight
        return lam * (gs * t["ssim_a"] + (1 - gs) * t["ssim_b"]) + (1 - lam) * (gm * t["mse_a"] + (1 - gm) * t["mse_b"])


__all__ += ["MsgFusionLoss"]


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, kernel_size: int = 11,
            kernel_sigma: float = 1.5, weights=(0.0448, 0.2856, 0.3001, 0.2363, 0.1333),
            k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-sample multi-scale SSIM ``(B,)`` of ``(B, C, *S)`` images (2D or 3D), as the official MACTFusion loss
    defines it, on MONAI's single-scale :func:`monai.metrics.regression.compute_ssim_and_cs`.

    ``len(weights)`` scales with 2x average pooling between them; at each scale MONAI's sampled Gaussian window
    (``kernel_sigma``, "valid" filtering) of size ``kernel_size`` truncated to the largest odd size that fits the
    image (the official code truncates to ``min(11, h, w)``); ``cs`` at the first scales, ``ssim`` at the last, each
    averaged over the image and mapped to ``(v + 1) / 2`` (the official ``normalize=True``), combined as
    ``prod_s v_s ** w_s``. Differences from MONAI's ``compute_ms_ssim``: that one refuses images below
    ``(kernel_size - 1) * (len(weights) - 1) ** 2`` (161 px with these defaults, the bundle trains on 64 px crops)
    and clips ``cs`` with ReLU, whose ``0 ** w`` gradient is NaN. Differences from the official code: its last
    scale uses exponent ``4 * w_5`` (a bug in its vendored library) and it infers ``data_range`` from the image.
    The smallest side must be at least ``2 ** (len(weights) - 1)`` (16 px for 5 scales).
    """
    from monai.metrics.regression import compute_ssim_and_cs

    spatial_dims = x.ndim - 2
    levels = len(weights)
    if min(x.shape[2:]) < 2 ** (levels - 1):
        raise ValueError(f"MS-SSIM with {levels} scales needs every side >= {2 ** (levels - 1)} px, got "
                         f"{tuple(x.shape[2:])}; pass fewer weights")
    pool = (F.avg_pool2d, F.avg_pool3d)[spatial_dims - 2]
    w = torch.as_tensor(weights, dtype=torch.float32, device=x.device)
    values = []
    for level in range(levels):
        if level:
            x, y = pool(x, 2), pool(y, 2)
        ks = [min(kernel_size, s) - (1 - min(kernel_size, s) % 2) for s in x.shape[2:]]  # largest odd that fits
        ssim_map, cs_map = compute_ssim_and_cs(
            x, y, spatial_dims, kernel_size=ks, kernel_sigma=[kernel_sigma] * spatial_dims,
            data_range=data_range, k1=k1, k2=k2)
        v = (ssim_map if level == levels - 1 else cs_map).flatten(1).mean(1)
        values.append((v + 1) / 2)
    return torch.prod(torch.stack(values) ** w[:, None], dim=0)


class MACTFusionLoss(nn.Module):
    """MACTFusion loss: ``ssim_weight * L_ssim + intensity_weight * L_int + grad_weight * L_grad`` (10 / 20 / 10).

    With ``F`` = fused ``pred`` (B, 1, *S) (raw, not clamped), ``A`` = MRI = ``target[:, 0]`` (the official Y of the
    3-channel slot) and ``B`` = the other modality's grey/luminance = ``target[:, 1]``:

    - ``L_ssim = 0.5 (1 - MS(F, A)) + 0.5 (1 - MS(F, B))``, ``MS`` = :func:`ms_ssim` (batch mean);
    - ``L_int = MSE(F, max(A, B))`` (element-wise max; squared error, as the official code);
    - ``L_grad = L1(G(F), max(G(A), G(B)))``, ``G(x) = sum_j |S_j * x|``: fixed Sobel kernels, zero padding 1.

    2D or 3D (from the input; 3 Sobel directions in 3D). MS-SSIM defaults are the official ones (5 scales, 11-px
    Gaussian window, sigma 1.5); the window is truncated per scale to fit (see :func:`ms_ssim`), so 64x64 crops
    use windows 11/11/11/7/3 over 64/32/16/8/4 px and full 256x256 images are exactly 11 at every scale. Images
    need >= 16 px per side with 5 scales (pass fewer ``ms_ssim_weights`` for smaller ones).

    Args:
        ssim_weight, intensity_weight, grad_weight: the term weights (official 10, 20, 10).
        ms_ssim_weights: per-scale MS-SSIM exponents (their count is the number of scales).
        kernel_size, kernel_sigma, data_range: MS-SSIM Gaussian window and data range.
    """

    def __init__(self, ssim_weight: float = 10.0, intensity_weight: float = 20.0, grad_weight: float = 10.0,
                 ms_ssim_weights=(0.0448, 0.2856, 0.3001, 0.2363, 0.1333), kernel_size: int = 11,
                 kernel_sigma: float = 1.5, data_range: float = 1.0) -> None:
        super().__init__()
        self.ssim_weight, self.intensity_weight, self.grad_weight = ssim_weight, intensity_weight, grad_weight
        self.ms_ssim_weights = tuple(float(w) for w in ms_ssim_weights)
        self.kernel_size, self.kernel_sigma, self.data_range = kernel_size, kernel_sigma, data_range

    @staticmethod
    def gradient(x: torch.Tensor) -> torch.Tensor:
        """``sum_j |S_j * x|`` per channel, fixed Sobel kernels, zero padding 1, same size as ``x``."""
        k = sobel_kernels(x.ndim - 2, dtype=x.dtype).to(x.device).unsqueeze(1)  # (n_dirs, 1, 3, ...)
        b, c = x.shape[:2]
        g = sobel_responses(x.reshape(b * c, 1, *x.shape[2:]), k, padding=1).abs().sum(2)
        return g.view(x.shape)

    @full_precision
    def terms(self, pred: torch.Tensor, target: torch.Tensor) -> dict:
        """The unweighted terms ``ssim`` (L_ssim), ``intensity`` (L_int) and ``grad`` (L_grad)."""
        if pred.ndim not in (4, 5) or pred.shape[1] != 1:
            raise ValueError(f"pred must be a fused (B, 1, *S) image, got shape {tuple(pred.shape)}")
        if target.ndim != pred.ndim or target.shape[1] < 2 or target.shape[0] != pred.shape[0] \
                or target.shape[2:] != pred.shape[2:]:
            raise ValueError(f"target must hold the sources (B, 2, *S) matching pred {tuple(pred.shape)}, "
                             f"got {tuple(target.shape)}")
        a, b = target[:, 0:1], target[:, 1:2]  # float32: @full_precision
        kw = dict(data_range=self.data_range, kernel_size=self.kernel_size, kernel_sigma=self.kernel_sigma,
                  weights=self.ms_ssim_weights)
        l_ssim = 0.5 * (1 - ms_ssim(pred, a, **kw)).mean() + 0.5 * (1 - ms_ssim(pred, b, **kw)).mean()
        l_int = F.mse_loss(pred, torch.maximum(a, b))
        g = self.gradient(torch.cat([pred, a, b], dim=1))
        l_grad = F.l1_loss(g[:, :1], torch.maximum(g[:, 1:2], g[:, 2:3]))
        return {"ssim": l_ssim, "intensity": l_int, "grad": l_grad}

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = self.terms(pred, target)
        return self.ssim_weight * t["ssim"] + self.intensity_weight * t["intensity"] + self.grad_weight * t["grad"]


__all__ += ["ms_ssim", "MACTFusionLoss"]


class BSAFusionLoss(nn.Module):
    """BSAFusion's joint registration + fusion loss, ``ce + confusion + smooth + fusion + reg`` (weights 1).

    ``pred`` is the network's ``mode="train"`` dict; ``target`` (B, 2, *S) holds the fixed MRI and the moving image's
    *aligned* ground truth ``I_m*`` (the undeformed image when the misalignment is synthetic). With ``F`` fused,
    ``I_f`` fixed, ``W`` = moving warped by the predicted field with border padding:

    - ``ce`` = CE(fixed logits, MRI) + CE(moving logits, other): the modality classifier whose class token is the MFRH;
    - ``confusion`` = CE(discriminator logits of both Transfer outputs, (1/2, 1/2)); minimum 2 ln 2;
    - ``smooth`` = sum_i w_i R(phi_i) + R(u) over the per-level fields and the final one, ``R`` = MONAI
      :class:`~monai.losses.DiffusionLoss` / 3 (central differences; the official code uses forward differences,
      same /3). ``smooth_schedule="intended"`` (default) weights both fields of level k by 10^(k-5);
      ``"official"`` reproduces the official indexing bug (1e-4, 1.1e-3, 1.1e-2, 0.11, 1.1, 1, 0, 0, 0, 0);
    - ``fusion`` = (1-SSIM(F, I_f)) + lambda (1-SSIM(F, W)) + 0.5 |F - max(I_f, W)| + |G(F) - max(G(I_f), G(W))|
      (MONAI :class:`~monai.losses.SSIMLoss`, 11-px Gaussian window; ``G`` = sum of absolute Sobel responses).
      ``lambda`` is adaptive as officially: the ratio of the two SSIM terms summed over the previous epoch
      (1 in the first), updated by :meth:`epoch_completed` (``scripts.engine.EpochHooks`` calls it);
    - ``reg`` = (1-SSIM(I_m*, W)) + |I_m* - W|: supervised alignment to the ground truth;
    - ``mi`` (weight 0 by default) = MONAI :class:`~monai.losses.GlobalMutualInformationLoss` between ``I_f``
      and ``W``, for data without a ground truth (then set ``reg_weight`` to 0);
    - ``field`` (weight 0 by default; not in the official recipe) = mean end-point error (pixels) between the
      predicted pull field ``ddf`` and the true one, when ``target`` carries it as extra channels
      (B, 2 + N, *S): [fixed, aligned moving, N field components in MONAI order], as stored by
      :class:`~scripts.registration.RandMisalignd` (``ddf_gt``) and appended to the label in training. The image
      terms give the field a weak signal wherever the moving image is flat; the true field is a dense one (measured
      on CPU-length schedules it did not yet make the network register: see the model card).

    2D or 3D (from the input, for the 3D network ``BSAFusion(spatial_dims=3)``): 3D SSIM (11^3 Gaussian window,
    volumes need >= 11 voxels per side), 3 Sobel directions in ``G``, DiffusionLoss over 3-component fields
    (same /3 and level weights).
    """

    OFFICIAL_SMOOTH = (1e-4, 1.1e-3, 1.1e-2, 0.11, 1.1, 1.0, 0.0, 0.0, 0.0, 0.0)
    INTENDED_SMOOTH = (1e-4, 1e-4, 1e-3, 1e-3, 1e-2, 1e-2, 0.1, 0.1, 1.0, 1.0)

    def __init__(self, ce_weight: float = 1.0, confusion_weight: float = 1.0, smooth_weight: float = 1.0,
                 fusion_weight: float = 1.0, reg_weight: float = 1.0, mi_weight: float = 0.0,
                 smooth_schedule: str = "intended", adaptive_lambda: bool = True, field_weight: float = 0.0) -> None:
        super().__init__()
        from monai.losses import DiffusionLoss, GlobalMutualInformationLoss, SSIMLoss

        if smooth_schedule not in ("intended", "official"):
            raise ValueError(f"smooth_schedule must be 'intended' or 'official', got {smooth_schedule!r}")
        self.weights = dict(ce=ce_weight, confusion=confusion_weight, smooth=smooth_weight, fusion=fusion_weight,
                            reg=reg_weight, mi=mi_weight, field=field_weight)
        self.level_weights = self.OFFICIAL_SMOOTH if smooth_schedule == "official" else self.INTENDED_SMOOTH
        self.adaptive_lambda = adaptive_lambda
        self.ssim = SSIMLoss(spatial_dims=2, data_range=1.0)
        self.ssim3d = SSIMLoss(spatial_dims=3, data_range=1.0)  # no parameters or buffers: state dict unchanged
        self.diffusion = DiffusionLoss()
        self.mi = GlobalMutualInformationLoss() if mi_weight else None
        self.register_buffer("fusion_lambda", torch.tensor(1.0))
        self.register_buffer("_sums", torch.zeros(2, dtype=torch.float64))  # epoch sums of S(F, W), S(F, I_f)

    def _ssim(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.ssim if x.ndim == 4 else self.ssim3d)(x, y)  # MONAI SSIMLoss = 1 - SSIM, batch mean

    def smoothness(self, field: torch.Tensor) -> torch.Tensor:
        if min(field.shape[2:]) <= 2:  # DiffusionLoss needs > 2 px per side (tiny crops' coarsest level)
            return field.new_zeros(())
        with warnings.catch_warnings():  # MONAI indexes with a list of slices; torch warns on every call
            warnings.simplefilter("ignore", UserWarning)
            return self.diffusion(field) / 3

    @full_precision
    def terms(self, pred: dict, target: torch.Tensor) -> dict:
        if not isinstance(pred, dict) or "warped_border" not in pred:
            raise ValueError("BSAFusionLoss needs the network's mode='train' output (a dict with the fields, "
                             "logits and warped moving image); train with scripts.engine.FusionInferer(mode='train').")
        dims = pred["fused"].ndim - 2
        if target.ndim != pred["fused"].ndim or target.shape[1] not in (2, 2 + dims):
            raise ValueError(f"target must be (B, 2, *S) [fixed, aligned moving] or (B, {2 + dims}, *S) with the "
                             f"true pull field appended, like the {dims}D prediction; got {tuple(target.shape)}")
        if self.weights["field"] and target.shape[1] != 2 + dims:
            raise ValueError(f"field_weight > 0 needs the true field in the target (B, {2 + dims}, *S), e.g. "
                             f"RandMisalignd's 'ddf_gt' concatenated to the label; got {tuple(target.shape)}")
        fused, warped = pred["fused"], pred["warped_border"]  # tensors in float32: @full_precision
        fixed, truth = target[:, :1], target[:, 1:2]
        n = fused.shape[0]
        mri = torch.tensor([0.0, 1.0], device=fused.device).expand(n, 2)
        other, half = mri.flip(1), torch.full_like(mri, 0.5)
        ce = F.cross_entropy(pred["logits_fixed"], mri) + F.cross_entropy(pred["logits_moving"], other)
        confusion = (F.cross_entropy(pred["logits_disc_fixed"], half)
                     + F.cross_entropy(pred["logits_disc_moving"], half))
        smooth = self.smoothness(pred["flow"])
        for w, phi in zip(self.level_weights, pred["phis"]):
            if w:
                smooth = smooth + w * self.smoothness(phi.float())
        s_fixed, s_moving = self._ssim(fused, fixed), self._ssim(fused, warped)
        if self.training and self.adaptive_lambda:
            self._sums += torch.stack([s_moving.detach(), s_fixed.detach()]).double()
        grads = MACTFusionLoss.gradient(torch.cat([fused, fixed, warped], 1))
        fusion = (s_fixed + self.fusion_lambda * s_moving + 0.5 * F.l1_loss(fused, torch.maximum(fixed, warped))
                  + F.l1_loss(grads[:, :1], torch.maximum(grads[:, 1:2], grads[:, 2:3])))
        out = {"ce": ce, "confusion": confusion, "smooth": smooth, "fusion": fusion,
               "reg": self._ssim(truth, warped) + F.l1_loss(warped, truth)}
        if self.mi is not None:
            out["mi"] = self.mi(warped, fixed)
        if target.shape[1] == 2 + dims:
            out["field"] = torch.linalg.vector_norm(pred["ddf"] - target[:, 2:], dim=1).mean()
        return out

    def forward(self, pred: dict, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[k] * v for k, v in self.terms(pred, target).items() if self.weights[k])

    @torch.no_grad()
    def epoch_completed(self) -> None:
        """lambda <- sum S(F, W) / sum S(F, I_f) over the epoch just finished (kept if nothing was summed)."""
        if self.adaptive_lambda and self._sums[1] > 0:
            self.fusion_lambda.fill_(float(self._sums[0] / self._sums[1]))
        self._sums.zero_()


__all__ += ["BSAFusionLoss"]
