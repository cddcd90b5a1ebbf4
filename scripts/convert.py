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
        flat = flatten_bsafusion_checkpoint(obj)
        if flat is not None:
            obj = flat
            continue
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
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated / not a checkpoint: say which file and what
        raise CheckpointConversionError(
            f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:300]})."
        ) from e
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


_W = ("weight",)
_LN = ("weight", "bias")


def _mactfusion_map() -> tuple[dict, tuple[str, ...], dict[str, str], tuple[str, ...]]:
    """(prefix map, dead prefixes, Sobel pairs ``ours -> official x prefix``, relative-position-index keys)."""
    pmap: dict[str, tuple[str, tuple[str, ...]]] = {}
    sobel: dict[str, str] = {}
    index_keys: list[str] = []

    def sdconv(old: str, new: str) -> None:
        pmap[old + "main_path.0."] = (new + "norm.", _BN)
        pmap[old + "main_path.1.conv_dw."] = (new + "dw.", _W)
        pmap[old + "main_path.1.bn1."] = (new + "dw_norm.", _BN)
        pmap[old + "main_path.1.conv_pw."] = (new + "pw.", _W)
        pmap[old + "main_path.1.bn2."] = (new + "pw_norm.", _BN)
        pmap[old + "main_path.3."] = (new + "proj.", _CONV)

    def transformer(old: str, new: str, cross: bool) -> None:
        pmap[old + "norm_1."] = (new + "norm1.", _LN)
        pmap[old + "norm_2."] = (new + "norm2.", _LN)
        pmap[old + "attention."] = (new + "attn.", ("relative_position_bias_table",))
        index_keys.append(old + "attention.relative_position_index")
        for o, n in ((("q", "q"), ("kv", "kv")) if cross else (("qkv_mapping", "qkv"),)) + (("proj", "proj"),):
            pmap[f"{old}attention.{o}."] = (f"{new}attn.{n}.", _CONV)
        pmap[old + "mlp.fc1."] = (new + "mlp.0.", _CONV)
        pmap[old + "mlp.fc2."] = (new + "mlp.2.", _CONV)

    dead = []
    for off, ours in (("vis", "a"), ("inf", "b")):
        enc, fus = f"encoder_{ours}.", f"fusion_{ours}."
        c = f"{off}_conv."
        pmap[c + "conv11.0.0."] = (enc + "extractor.stem.", _W)
        pmap[c + "conv11.1."] = (enc + "extractor.stem_norm.", _LN)
        pmap[c + "conv11_.0.0."] = (enc + "extractor.large.", _W)
        pmap[c + "conv11_.1."] = (enc + "extractor.large_norm.", _LN)
        for i, name in enumerate(("conv33", "conv55", "conv77")):
            pmap[f"{c}{name}.0.0."] = (f"{enc}extractor.cascade.{i}.", _W)
            pmap[f"{c}{name}_.0.0."] = (f"{enc}extractor.reverse.{i}.", _W)
        for k in (1, 2):
            r, g = f"{off}_rgbd{k}.", f"{enc}grdb{k}."
            pmap[r + "dense.conv1.conv."] = (g + "dense1.", _CONV)
            pmap[r + "dense.conv2.conv."] = (g + "dense2.", _CONV)
            pmap[r + "convdown.conv."] = (g + "dense_out.", _CONV)
            pmap[r + "convup.conv."] = (g + "grad_out.", _CONV)
            sobel[g + "sobel.weight"] = r + "sobelconv.conv"
        sdconv(f"{off}_max.mb1_conv.", enc + "mixer.sdconv.")
        transformer(f"{off}_max.block_transformer.", enc + "mixer.window_attn.", cross=False)
        transformer(f"{off}_max.grid_transformer.", enc + "mixer.grid_attn.", cross=False)
        x = f"{off}_cross."
        pmap[x + "t1_adap_1.conv_shared.0."] = (fus + "safm.shared.", _CONV)
        pmap[x + "t1_adap_1.conv_gamma."] = (fus + "safm.gamma.", _CONV)
        pmap[x + "t1_adap_1.conv_beta."] = (fus + "safm.beta.", _CONV)
        pmap[x + "select1.conv."] = (fus + "gate.", _CONV)
        sdconv(x + "sam.mb1_conv.", fus + "transformer.sdconv.")
        sdconv(x + "sam.mb2_conv.", fus + "transformer.sdconv_context.")
        transformer(x + "sam.block_transformer.", fus + "transformer.window_attn.", cross=True)
        transformer(x + "sam.grid_transformer.", fus + "transformer.grid_attn.", cross=True)
        # built but never called by the official forward: the self block's second SD-Conv, SAFM's conv_noshared
        dead += [f"{off}_max.mb2_conv.", x + "t1_adap_1.conv_noshared."]
    for i in range(3):
        pmap[f"decode.{i}.conv2d."] = (f"decoder.{2 * i}.", _CONV)
    return pmap, tuple(dead), sobel, tuple(index_keys)


_MACT_MAP, _MACT_DEAD, _MACT_SOBEL, _MACT_INDEX = _mactfusion_map()


def convert_mactfusion(official: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official MACTFusion (``Fusionnet.MACTFusion``) state dict -> :class:`scripts.networks.MACTFusion` (2D).

    Official ``vis`` (3-channel YCrCb slot, the MRI in the released CT-MRI model) -> our ``*_a`` (channel 0), ``inf``
    -> ``*_b``. Dropped: the never-called modules (``*_max.mb2_conv``, ``*.t1_adap_1.conv_noshared``; 52,320
    parameters) and the 8 ``relative_position_index`` buffers (recomputed by our network; each is checked to be
    the 8x8 Swin index, i.e. a window size of 8). The depthwise Sobel x/y convs are merged into one grouped weight.
    Any other missing/extra key raises :class:`CheckpointConversionError`.
    """
    if official and all(k.startswith(("encoder_", "fusion_", "decoder.")) for k in official):
        raise CheckpointConversionError("this state dict already has the converted (MACTFusion) layout")
    out, leftover = _rename(official, _MACT_MAP, _MACT_DEAD)
    consumed = set(_MACT_INDEX)
    missing = [k for k in _MACT_INDEX if k not in official]
    for ours, old in _MACT_SOBEL.items():
        keys = (old + "x.weight", old + "y.weight")
        missing += [k for k in keys if k not in official]
        consumed.update(keys)
        if all(k in official for k in keys):
            # separate depthwise x / y convs (C, 1, 3, 3) -> one grouped weight, row c*2 + j = direction j of channel c
            out[ours] = torch.stack([official[keys[0]], official[keys[1]]], dim=1).flatten(0, 1)
    if missing:
        raise CheckpointConversionError(f"missing keys in official checkpoint: {missing}")
    unexpected = [k for k in leftover if k not in consumed]
    if unexpected:
        raise CheckpointConversionError(f"unexpected keys in official checkpoint: {unexpected}")
    from .networks.mactfusion import relative_position_index

    expected = relative_position_index((8, 8))
    bad = [k for k in _MACT_INDEX if not torch.equal(official[k].long(), expected)]
    if bad:
        raise CheckpointConversionError(
            f"relative_position_index buffers {bad} are not the 8x8 window index; only window_size=8 checkpoints "
            "are supported")
    return out


def _bsafusion_map() -> tuple[dict, tuple[str, ...]]:
    """(prefix map, dead prefixes) for :func:`convert_bsafusion`."""
    pmap: dict[str, tuple[str, tuple[str, ...]]] = {}

    def restormer(old: str, new: str) -> None:
        pmap[old + "mlp."] = (new + "proj.", _CONV)
        for i, name in ((1, "query"), (2, "key"), (3, "value")):
            for j in (0, 1):
                pmap[f"{old}mdta.conv{i}.{j}."] = (f"{new}{name}.{j}.", _CONV)
        pmap[old + "mdta.conv4."] = (new + "attn_out.", _CONV)
        for i, name in ((1, "gate"), (2, "value")):
            for j in (0, 1):
                pmap[f"{old}gdfn.Dconv{i}.{j}."] = (f"{new}ffn_{name}.{j}.", _CONV)
        pmap[old + "gdfn.conv."] = (new + "ffn_out.", _CONV)

    def vit(old: str, new: str) -> None:
        # the official block applies norm_layer2 before both sub-blocks; norm_layer1 is never used
        pmap[old + "norm_layer2."] = (new + "norm.", _LN)
        pmap[old + "attention.qkv."] = (new + "attention.qkv.", _W)
        pmap[old + "attention.out_proj."] = (new + "attention.out_proj.", _CONV)
        pmap[old + "mlp.linear1."] = (new + "mlp.linear1.", _CONV)
        pmap[old + "mlp.linear2."] = (new + "mlp.linear2.", _CONV)

    restormer("encoder.rb1.", "encoder_shallow.")
    restormer("encoder.rb2.", "encoder_deep.")
    for old, new in (("transfer.classifier.", "classifier."), ("transfer.modal_dis.", "discriminator.")):
        pmap[old + "cls_token"] = (new + "cls_token", ("",))
        for i in range(2):
            vit(f"{old}vit_blks.vit{i}.", f"{new}blocks.{i}.")
        pmap[old + "head.0."] = (new + "head.0.", _CONV)
        pmap[old + "head.2."] = (new + "head.2.", _CONV)
    pmap["transfer.classifier.embedding.position_embedding"] = ("classifier.pos_map", ("",))
    pmap["transfer.classifier.embedding.patch_embedding."] = ("classifier.patch_embed.", _CONV)
    for k, side in ((1, "fixed"), (2, "moving")):
        pmap[f"transfer.transfer.cls{k}"] = (f"transfer_{side}.token", ("",))
        for i in range(2):
            vit(f"transfer.transfer.VitBLK{k}.vit{i}.", f"transfer_{side}.blocks.{i}.")
        for level in range(5):
            old, new = f"reg_net.f{k}_FR{level + 1}.", f"registration.{side}_steps.{level}."
            pmap[old + "conv1x1.0."] = (new + "mix.", _CONV)
            pmap[old + "crossAtt1.conv1.0."] = (new + "cross.conv_a.", _CONV)
            pmap[old + "crossAtt1.conv2.0."] = (new + "cross.conv_b.", _CONV)
            pmap[old + "feature_output.0.feature_output.0."] = (new + "refine.", _CONV)
            pmap[old + "flow_output.0."] = (new + "flow.", _CONV)
            pmap[old + "up1.1."] = (new + "state_out.", _CONV)
    for i in range(4):
        pmap[f"reg_net.D.up{i + 1}.up_sample.1."] = (f"registration.upsamplers.{i}.reduce.", _CONV)
        pmap[f"reg_net.D.up{i + 1}.conv1."] = (f"registration.upsamplers.{i}.conv.", _CONV)
        restormer(f"fusion_net.F{i + 1}.", f"fusion.stages.{i}.")
    for i in range(3):
        pmap[f"fusion_net.up_sample{i + 1}.up1.1."] = (f"fusion.token_up.{i}.", _CONV)
        pmap[f"fusion_net.up_sample{i + 1}.up3.1."] = (f"fusion.fused_up.{i}.", _CONV)
    for i in range(2):
        restormer(f"fusion_net.outLayer.{i}.", f"fusion.reconstruct.{i}.")
    # never used by the official forward: the unused LayerNorms and the discriminator's image embedding
    dead = ("transfer.classifier.norm.", "transfer.modal_dis.norm.", "transfer.modal_dis.embedding.")
    return pmap, dead


_BSA_MAP, _BSA_DEAD = _bsafusion_map()


def convert_bsafusion(official: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official BSAFusion checkpoint -> :class:`scripts.networks.BSAFusion`.

    Accepts the official training checkpoint (a dict of ``encoder_state_dict``, ``transfer_state_dict``,
    ``reg_net_state_dict`` and ``fusion_net_state_dict``) or the same flattened with ``encoder.``/``transfer.``/
    ``reg_net.``/``fusion_net.`` prefixes. Dropped: every ViT block's unused ``norm_layer1``, the unused
    ``classifier.norm``/``modal_dis.norm`` and the discriminator's unused image embedding. Any other
    missing/extra key raises :class:`CheckpointConversionError`.
    """
    if official and all(k.startswith(("encoder_shallow.", "encoder_deep.", "classifier.", "registration."))
                        for k in list(official)[:4]):
        raise CheckpointConversionError("this state dict already has the converted (BSAFusion) layout")
    dead = _BSA_DEAD + tuple(k for k in official if ".norm_layer1." in k)
    out, leftover = _rename(official, _BSA_MAP, dead)
    if leftover:
        raise CheckpointConversionError(f"unexpected keys in official checkpoint: {leftover}")
    return out


_BSA_PARTS = ("encoder", "transfer", "reg_net", "fusion_net")


def flatten_bsafusion_checkpoint(obj) -> dict[str, torch.Tensor] | None:
    """The official ``{"<part>_state_dict": sd, ...}`` checkpoint as one ``<part>.<key>`` dict (else ``None``)."""
    if isinstance(obj, Mapping) and all(f"{p}_state_dict" in obj for p in _BSA_PARTS):
        return {f"{p}.{k}": v for p in _BSA_PARTS for k, v in obj[f"{p}_state_dict"].items()}
    return None


CONVERTERS: dict[str, Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "dran": convert_dran,
    "mactfusion": convert_mactfusion,
    "bsafusion": convert_bsafusion,
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
