"""Plumbing between the fusion networks and MONAI's Ignite workflows: inferer, validation metric, progress bar."""

from __future__ import annotations

import torch
from monai.handlers import from_engine
from monai.inferers import Inferer
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction

__all__ = ["FusionInferer", "SourceMeanMetric", "ProgressBar"]


class FusionInferer(Inferer):
    """Calls ``network(inputs, mode=mode)``.

    Every fusion network fuses with ``mode="fuse"`` (the default forward, one tensor out, as MONAI Label and
    export expect) and returns what its loss needs with ``mode="train"`` (e.g. DRAN's per-source reconstructions).
    Going through ``forward`` keeps DistributedDataParallel's gradient hooks in play.
    """

    def __init__(self, mode: str = "fuse") -> None:
        super().__init__()
        self.mode = mode

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        return network(inputs, *args, mode=self.mode, **kwargs)


class SourceMeanMetric(CumulativeIterationMetric):
    """Mean over the sources of a MONAI regression metric between the fused image and each source.

    ``y_pred`` is the fused (B, 1, *S) image, ``y`` the stacked sources (B, N, *S); e.g.
    ``SourceMeanMetric(SSIMMetric(spatial_dims=2, data_range=1.0))`` is the mean SSIM of the fusion to its inputs.
    """

    def __init__(self, metric: CumulativeIterationMetric, reduction: str = "mean") -> None:
        super().__init__()
        self.metric = metric
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        y_pred = y_pred.float().clamp(0, 1)
        scores = [self.metric._compute_tensor(y_pred, y[:, i : i + 1].float()) for i in range(y.shape[1])]
        return torch.stack([s.reshape(s.shape[0], -1).mean(1) for s in scores], 0).mean(0, keepdim=False)[:, None]

    def aggregate(self, reduction: str | None = None):
        f, _ = do_metric_reduction(self.get_buffer(), reduction or self.reduction)
        return f


class ProgressBar:
    """tqdm progress bar (via Ignite) showing the running loss; attach like any MONAI handler."""

    def __init__(self, output_transform=None, persist: bool = True, desc: str = "train") -> None:
        self.output_transform = output_transform or from_engine(["loss"], first=True)
        self.persist = persist
        self.desc = desc

    def attach(self, engine) -> None:
        from ignite.handlers import ProgressBar as IgniteProgressBar

        def loss(output):
            value = self.output_transform(output)
            value = value[0] if isinstance(value, list | tuple) else value
            return {"loss": float(value)}

        IgniteProgressBar(persist=self.persist, desc=self.desc).attach(engine, output_transform=loss)
