"""Export a fusion network to TorchScript or ONNX, and run an exported ONNX model.

TorchScript goes through MONAI's own exporter (``monai.bundle ckpt_export``, traced: the networks' forward uses
einops, Python-level shape arithmetic and optional arguments that ``torch.jit.script`` rejects), so this command
and the ``python -m monai.bundle ckpt_export ... --use_trace True`` line in the README give the same file, with
the bundle's metadata and ``configs/inference.json`` embedded::

    python -m scripts.export --method mactfusion --ckpt_path models/mactfusion.pt --output models/mactfusion.ts
    python -m scripts.export --method mactfusion --ckpt_path models/mactfusion.pt --format onnx \\
        --output models/mactfusion.onnx
    python -m scripts.export --method dran --format onnx --output models/dran.onnx --check ../shared/data/aanlib

A traced or ONNX model is exported for one input size (``--input_shape``, default ``1 2 256 256``): shape
arithmetic is frozen at that size, so fuse images of that size (the eager network takes any size). Baselines
need no checkpoint; a trainable method without ``--ckpt_path`` uses its default checkpoint
(``models/<method>.pt`` or the training run's ``model.pt``).

ONNX notes (``torch.onnx.export``; needs the ``onnx`` and ``onnxscript`` packages, not in requirements.txt;
running it needs ``onnxruntime``):

- MACTFusion: the 31x31 grouped conv is exported as a direct grouped convolution (the eager network computes it
  by FFT; same values).
- MsgFusion: ``rfftn``/``irfftn`` of the Fourier unit are exported as products with the real DFT matrices of the
  export size (ONNX has no complex tensors); same values within float rounding.
- DRAN: ONNX has no SVD, so the SFNN rule (per-channel nuclear norms) cannot live in the graph. The export writes
  ``<output>`` with the encoder (``image -> features (B, 2, F, *S)``) and ``<stem>_decoder.onnx``
  (``features -> fused image``); :class:`OnnxFusion` runs the encoder, the fusion rule in numpy
  (``numpy.linalg.svd``) and the decoder. Rules without SVD (``average``, ``max``, ...) export as one graph.

:class:`OnnxFusion` (``OnnxFusion("models/dran.onnx")(x)``, ``x`` a ``(B, 2, *S)`` float32 numpy array) runs any
of these exports with onnxruntime; ``--check DIR`` fuses the first pair of a dataset with both the eager network
and the export and prints the largest difference.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts import methods  # noqa: E402

__all__ = ["build_network", "export_torchscript", "export_onnx", "OnnxFusion", "load_pair", "main"]

DEFAULT_SHAPE = (1, 2, 256, 256)


def build_network(method: str, ckpt_path=None, network_overrides: dict | None = None, spatial_dims: int = 2,
                  use_default_checkpoint: bool = True) -> nn.Module:
    """The method's network (``configs/methods/<method>.json`` + overrides) with its weights, in eval mode."""
    cfg = methods.load_method_config(ROOT, method)
    net = methods.build(cfg["network"], network_overrides, spatial_dims=spatial_dims)
    if ckpt_path is None and use_default_checkpoint:
        ckpt_path = methods.default_checkpoint(ROOT, method)
    if ckpt_path is not None:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        net.load_state_dict(state, strict=True)
    return net.eval()


def export_torchscript(method: str, output, ckpt_path=None, input_shape=DEFAULT_SHAPE,
                       network_overrides: dict | None = None) -> Path:
    """Traced TorchScript through ``monai.bundle.ckpt_export`` (metadata and inference config embedded)."""
    from monai.bundle import ckpt_export

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    spatial_dims = len(input_shape) - 2
    trainable = methods.load_method_config(ROOT, method)["trainable"]
    with tempfile.TemporaryDirectory() as tmp:
        if ckpt_path is None and trainable:
            ckpt_path = methods.default_checkpoint(ROOT, method)
        ckpt_file = ckpt_path
        if ckpt_file is None:  # a baseline: no weights, ckpt_export still wants a checkpoint file
            ckpt_file = os.path.join(tmp, "empty.pt")
            torch.save({}, ckpt_file)
        ckpt_export(
            net_id="network_def",
            filepath=str(output),
            ckpt_file=str(ckpt_file),
            meta_file=str(ROOT / "configs" / "metadata.json"),
            config_file=str(ROOT / "configs" / "inference.json"),
            use_trace=True,
            input_shape=list(input_shape),
            bundle_root=str(ROOT),
            method=method,
            spatial_dims=spatial_dims,
            network_overrides=dict(network_overrides or {}),
            ckpt_path=None if ckpt_path is None else str(ckpt_path),  # the config's network_def reads it
        )
    return output


# ---------------------------------------------------------------------------------------------------- ONNX
class _Encoder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net._encode_channels(x)


class _Decoder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, feat):
        return self.net.decode(feat)


def _onnx_export(module, args, path, input_names, output_names) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, input_names=input_names, output_names=output_names,
                                    external_data=False, optimize=True)
    program.save(str(path))


def export_onnx(method: str, output, ckpt_path=None, input_shape=DEFAULT_SHAPE,
                network_overrides: dict | None = None, net: nn.Module | None = None) -> list[Path]:
    """ONNX export (see the module docstring); returns the written files."""
    from scripts.networks import DRAN
    from scripts.networks.blocks import set_fast

    if net is None:
        net = build_network(method, ckpt_path, network_overrides, spatial_dims=len(input_shape) - 2)
    net = net.eval()
    set_fast(net, True)
    x = torch.rand(*input_shape)
    output = Path(output)
    prev = _set_export_mode(net, True)
    try:
        if isinstance(net, DRAN) and _rule_name(net) == "sfnn":
            decoder_path = output.with_name(output.stem + "_decoder.onnx")
            with torch.no_grad():
                feats = net._encode_channels(x)
            _onnx_export(_Encoder(net), (x,), output, ["image"], ["features"])
            _onnx_export(_Decoder(net), (feats[:, 0],), decoder_path, ["features"], ["pred"])
            return [output, decoder_path]
        _onnx_export(net, (x,), output, ["image"], ["pred"])
        return [output]
    finally:
        _set_export_mode(net, prev)


def _rule_name(net) -> str:
    rule = net.fusion_rule
    return rule.lower() if isinstance(rule, str) else getattr(rule, "__name__", "")


def _set_export_mode(net: nn.Module, flag: bool) -> bool:
    """Switch modules with an ONNX-friendly formulation (``export_mode`` attribute); returns the previous state."""
    prev = False
    for m in net.modules():
        if hasattr(m, "export_mode"):
            prev = prev or m.export_mode
            m.export_mode = flag
    return prev


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sfnn_numpy(fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """The SFNN rule of :func:`scripts.networks.fusion_rules.sfnn` in numpy, ``(B, C, H, W)`` features (3D
    features ``(B, C, D, H, W)`` as ``(D*H, W)`` matrices)."""
    def max_nuc(f):
        s = _softmax(f, 1)
        if s.ndim == 5:
            s = s.reshape(*s.shape[:2], -1, s.shape[-1])
        return np.linalg.svd(s, compute_uv=False).sum(-1).astype(np.float64).max(1)

    ma2, mb2 = max_nuc(fa) ** 2, max_nuc(fb) ** 2
    shape = (-1,) + (1,) * (fa.ndim - 1)
    wa = (ma2 / (ma2 + mb2)).astype(fa.dtype).reshape(shape)
    wb = (mb2 / (ma2 + mb2)).astype(fa.dtype).reshape(shape)
    return wa * fa + wb * fb


class OnnxFusion:
    """Run an exported network with onnxruntime: ``OnnxFusion(path)(x)``, ``x`` ``(B, 2, *S)`` float32 -> fused
    ``(B, 1, *S)``. A DRAN SFNN export (``<stem>_decoder.onnx`` next to it) runs encoder, numpy rule, decoder."""

    def __init__(self, path, providers=None) -> None:
        import onnxruntime as ort

        path = Path(path)
        providers = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), providers=providers)
        decoder = path.with_name(path.stem + "_decoder.onnx")
        self.decoder = ort.InferenceSession(str(decoder), providers=providers) if decoder.is_file() else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = self.session.run(None, {self.session.get_inputs()[0].name: x})[0]
        if self.decoder is None:
            return out
        fused = sfnn_numpy(out[:, 0], out[:, 1])
        return self.decoder.run(None, {self.decoder.get_inputs()[0].name: fused})[0]


# ---------------------------------------------------------------------------------------------------- check
def load_pair(dataset_dir, index: int = 0, pair_source: str = "aligned") -> torch.Tensor:
    """``(1, 2, *S)`` input of pair ``index`` of a dataset, exactly as ``configs/inference.json`` prepares it."""
    from monai.transforms import Compose, ConcatItemsd, ScaleIntensityd

    from scripts import data
    from scripts.transforms import LoadFusionPaird

    items = data.build_datalist(str(dataset_dir), "all", spatial_dims=2, pair_source=pair_source)
    keys = ["source_a", "source_b"]
    item = Compose([LoadFusionPaird(keys=keys), ScaleIntensityd(keys=keys), ConcatItemsd(keys=keys, name="image")])(
        items[index])
    return torch.as_tensor(item["image"]).float()[None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    ap.add_argument("--output", type=Path, default=None, help="default models/<method>.ts|.onnx")
    ap.add_argument("--ckpt_path", type=Path, default=None)
    ap.add_argument("--input_shape", type=int, nargs="+", default=list(DEFAULT_SHAPE))
    ap.add_argument("--network_overrides", default="{}", help="python dict literal, e.g. \"{'features': 64}\"")
    ap.add_argument("--check", type=Path, default=None, help="dataset folder: compare export and eager on pair 0")
    args = ap.parse_args(argv)
    overrides = ast.literal_eval(args.network_overrides)
    suffix = ".ts" if args.format == "torchscript" else ".onnx"
    output = args.output or ROOT / "models" / f"{args.method}{suffix}"
    shape = tuple(args.input_shape)
    if args.format == "torchscript":
        files = [export_torchscript(args.method, output, args.ckpt_path, shape, overrides)]
    else:
        files = export_onnx(args.method, output, args.ckpt_path, shape, overrides)
    print("wrote " + ", ".join(map(str, files)))
    if args.check is not None:
        x = load_pair(args.check)
        if tuple(x.shape) != shape:
            print(f"check: pair 0 has shape {tuple(x.shape)}, export is for {shape}; skipped")
            return 0
        net = build_network(args.method, args.ckpt_path, overrides, spatial_dims=len(shape) - 2)
        with torch.inference_mode():
            ref = net(x).numpy()
        if args.format == "torchscript":
            with torch.inference_mode():
                got = torch.jit.load(str(files[0]))(x).numpy()
        else:
            got = OnnxFusion(files[0])(x.numpy())
        print(f"check on pair 0 of {args.check}: max |export - eager| = {np.abs(got - ref).max():.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
