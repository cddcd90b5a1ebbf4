"""Training losses, one class per method (``forward(pred, target)``), plus shared helpers."""

from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from .networks.blocks import sobel_kernels, sobel_responses

__all__ = ["sobel_gradient_loss", "VGG16BNFeatures", "DRANLoss"]


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

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.mse_loss(pred, target)
        if self.grad_weight:
            loss = loss + self.grad_weight * sobel_gradient_loss(pred, target)
        if self.perceptual_weight:
            loss = loss + self.perceptual_weight * self.perceptual(pred, target)
        return loss
