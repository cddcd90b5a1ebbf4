"""Convert official checkpoints to this bundle's networks.

``convert_state_dict(method, official)`` dispatches to a per-method converter in :data:`CONVERTERS`. A converter
drops keys of modules the official forward pass never uses, renames the rest to ours, and raises
:class:`CheckpointConversionError` listing any missing or unexpected key.

CLI::

    python -m scripts.convert --method dran --input official.pt --output models/dran.pt
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import torch

__all__ = ["CheckpointConversionError", "CONVERTERS", "convert_state_dict", "load_official_checkpoint", "main"]

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")


class CheckpointConversionError(ValueError):
    """The official checkpoint does not match the expected layout."""


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": sd}``, ``{"model": sd}`` (and similar, nested) and strip ``module.`` prefixes."""
    for _ in range(4):
        if _is_state_dict(obj):
            break
        if not isinstance(obj, Mapping):
            raise CheckpointConversionError(f"checkpoint is a {type(obj).__name__}, not a state dict")
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            raise CheckpointConversionError(
                f"no state dict found in checkpoint; top-level keys: {sorted(map(str, obj))[:20]}")
        obj = inner
    else:
        raise CheckpointConversionError("no state dict found in checkpoint (too deeply nested)")
    sd = dict(obj)
    while sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (no pickled code is ever run) and unwrap it."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointConversionError(
            f"{path}: refusing to load a checkpoint that contains pickled Python objects (a whole model or custom "
            "classes); only tensors/state dicts are accepted (torch.load weights_only=True). Re-save it in a "
            f"trusted environment with torch.save(model.state_dict(), ...). Original error: {e}") from e
    return unwrap_state_dict(obj)


def _rename(official: Mapping[str, torch.Tensor], prefix_map: Mapping[str, tuple[str, tuple[str, ...]]],
            dead_prefixes: tuple[str, ...], optional_suffixes: tuple[str, ...] = ("num_batches_tracked",)):
    """Map ``old_prefix + suffix`` to ``new_prefix + suffix`` for the listed suffixes; drop dead prefixes.

    Returns ``(converted, leftover)`` where ``leftover`` are official keys neither mapped nor dead (the caller
    consumes any special ones it knows, anything still left is unexpected). Raises on missing keys.
    """
    out: dict[str, torch.Tensor] = {}
    missing = []
    for old, (new, suffixes) in prefix_map.items():
        for suffix in suffixes:
            key = old + suffix
            if key in official:
                out[new + suffix] = official[key]
            elif suffix in optional_suffixes:
                out[new + suffix] = torch.tensor(0, dtype=torch.long)
            else:
                missing.append(key)
    if missing:
        raise CheckpointConversionError(f"missing keys in official checkpoint: {missing}")
    mapped = {old + s for old, (_, suffixes) in prefix_map.items() for s in suffixes}
    leftover = [k for k in official if k not in mapped and not k.startswith(dead_prefixes)]
    return out, leftover


_CONV = ("weight", "bias")
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# official prefix -> (our prefix, parameter/buffer names)
_DRAN_MAP = {
    "fe.conv1.": ("encoder.shallow.", _CONV),
    "fe.fe.convd1.": ("encoder.dra.dilated.0.", _CONV),
    "fe.fe.convd2.": ("encoder.dra.dilated.1.", _CONV),
    "fe.fe.convd3.": ("encoder.dra.dilated.2.", _CONV),
    "fe.fe.reduce.": ("encoder.dra.reduce.", _CONV),
    "fe.fe.bnorm1.": ("encoder.dra.norm.", _BN),
    "fe.fe.dilran.conv_d.": ("encoder.dra.recursive.", _CONV),
    "fe.edge_enhance.dense.conv1.conv.": ("encoder.edge.dense1.", _CONV),
    "fe.edge_enhance.dense.conv2.conv.": ("encoder.edge.dense2.", _CONV),
    "fe.edge_enhance.convdown.conv.": ("encoder.edge.dense_out.", _CONV),
    "fe.edge_enhance.convup.conv.": ("encoder.edge.grad_out.", _CONV),
    "recon.recon_conv.0.": ("decoder.0.", _CONV),
    "recon.recon_conv.2.": ("decoder.2.", _CONV),
    "recon.recon_conv.4.": ("decoder.4.", _CONV),
}
# registered but never called in the official forward pass (86,720 parameters)
_DRAN_DEAD = ("fe.conv_id.", "fe.conv2.", "fe.bnorm.", "fe.fe.dilran.bnorm.")
_DRAN_SOBEL = ("fe.edge_enhance.sobelconv.convx.weight", "fe.edge_enhance.sobelconv.convy.weight")


def convert_dran(official: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official en_dran ``fullModel`` state dict -> :class:`scripts.networks.DRAN` (spatial_dims=2).

    Keys of the never-called modules (``fe.conv_id``, ``fe.conv2``, ``fe.bnorm``, ``fe.fe.dilran.bnorm``) are
    dropped; the two depthwise Sobel convs are merged into one grouped weight; an absent BN
    ``num_batches_tracked`` is filled with 0 (it does not affect outputs). Any other missing/extra key raises.
    """
    if official and all(k.startswith(("encoder.", "decoder.")) for k in official):
        raise CheckpointConversionError("this state dict already has the converted (DRAN) layout")
    out, leftover = _rename(official, _DRAN_MAP, _DRAN_DEAD)
    missing = [k for k in _DRAN_SOBEL if k not in official]
    if missing:
        raise CheckpointConversionError(f"missing keys in official checkpoint: {missing}")
    # separate depthwise x / y convs (C, 1, 3, 3) -> one grouped weight, row c*2 + j = direction j of channel c
    wx, wy = (official[k] for k in _DRAN_SOBEL)
    out["encoder.edge.sobel.weight"] = torch.stack([wx, wy], dim=1).flatten(0, 1)
    unexpected = [k for k in leftover if k not in _DRAN_SOBEL]
    if unexpected:
        raise CheckpointConversionError(f"unexpected keys in official checkpoint: {unexpected}")
    return out


CONVERTERS: dict[str, Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "dran": convert_dran,
}


def convert_state_dict(method: str, official: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an (unwrapped) official state dict for ``method`` (a key of :data:`CONVERTERS`)."""
    try:
        converter = CONVERTERS[method.lower()]
    except KeyError:
        raise ValueError(f"no converter for method {method!r}; available: {sorted(CONVERTERS)}") from None
    return converter(unwrap_state_dict(official))


def _atomic_save(obj, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=sorted(CONVERTERS))
    parser.add_argument("--input", required=True, type=Path, help="official checkpoint (tensors only)")
    parser.add_argument("--output", required=True, type=Path, help="converted state dict to write")
    args = parser.parse_args(argv)
    if args.output.resolve() == args.input.resolve():
        parser.error("--output must differ from --input (refusing to overwrite the official checkpoint)")
    try:
        converted = convert_state_dict(args.method, load_official_checkpoint(args.input))
    except CheckpointConversionError as e:
        parser.exit(1, f"error: {e}\n")
    _atomic_save(converted, args.output)
    print(f"wrote {len(converted)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
