"""Deploy the bundle's fusion methods as MONAI Label models, one per method, in a ``monaibundle`` sample app.

MONAI Label's ``BundleInferTask`` / ``BundleTrainTask`` read ``<app>/model/<name>/configs/inference.json`` and
``configs/train.json`` with their defaults (a request can change neither the method nor the network), so each
method gets its own model folder; ``/infer/fusion_dran``, ``/infer/fusion_bsafusion``, ... then serve them side by
side and ``/train/fusion_<method>`` fine-tunes the trainable ones::

    python -m scripts.monailabel_app --app apps/monaibundle                  # every method
    python -m scripts.monailabel_app --app apps/monaibundle --methods dran bsafusion --weights dran=runs/dran/model.pt

``<app>/model/fusion_<method>/`` holds:

- ``scripts`` and every file of ``configs/`` except the two below: links to this bundle (code changes apply at the
  next server start);
- ``configs/inference.json``: this bundle's, with ``method`` set, ``ckpt_path`` pointing at ``models/model.pt``
  (trainable methods), the bundle's own file writers removed from ``postprocessing`` (MONAI Label writes the
  answer itself; the writers would leave a copy of every request in the model folder) and
  :class:`RestoreInputGridd` appended (the answer on the input's voxel grid);
- ``configs/train.json`` (trainable methods only; baselines get no trainer): this bundle's, with ``method`` set and
  the best model (key metric on the validation images; with no validation images, the final model) written to
  ``models/model.pt``, the file MONAI Label serves and starts the next training from; the rest of a run
  (``checkpoint.pt``, ``model_final.pt``, TensorBoard logs) stays in ``runs/<method>/`` inside the model folder;
- ``models/model.pt``: the weights as a plain state dict, checked to load strictly into the method's network. From
  ``--weights METHOD=PATH``, else the method's default checkpoint (``models/<method>.pt``, then
  ``runs/<method>/model.pt``), else a freshly initialised network (``--seed``; a warning says it is untrained).
  Baselines get their (parameter-free) state dict: MONAI Label ignores a model folder without ``model.pt``.
  An existing ``models/model.pt`` (e.g. trained through MONAI Label) is kept unless ``--weights``, ``--fresh`` or
  ``--replace_weights`` is given.

The generated configs are copies: run the command again after changing ``configs/inference.json`` or
``configs/train.json`` (the weights stay). It needs only this bundle's environment, not MONAI Label's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from monai.transforms import MapTransform

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and str(ROOT) not in sys.path:  # python scripts/monailabel_app.py (MONAI Label imports
    sys.path.insert(0, str(ROOT))                           # this module for RestoreInputGridd: no side effect there)

from scripts import methods  # noqa: E402

__all__ = ["deploy", "deploy_method", "inference_config", "train_config", "model_name", "RestoreInputGridd", "main"]

logger = logging.getLogger(__name__)

GENERATED = ("inference.json", "train.json")
# MONAI Label's own configs/ outputs (multi-GPU training writes monailabel_train.json there): never linked back
SKIPPED = GENERATED + ("monailabel_train.json",)
WRITERS = ("SaveFusedd", "SaveFusedDicomd", "SaveRegistrationd")
MODEL_PT = "$os.path.join(@bundle_root, 'models', 'model.pt')"
MODELS_DIR = "$os.path.join(@bundle_root, 'models')"


class RestoreInputGridd(MapTransform):
    """Put the fused image back on the input's voxel grid for MONAI Label's ``Restored`` and writer.

    ``LoadFusionPaird`` drops the singleton axis of a one-slice 3D file (a ``(rows, cols, 1, 2)`` NIfTI), so ``pred``
    is ``(1, rows, cols)``; MONAI Label's ``Restored`` keeps such a 3-dim result as it is and its writer then stores
    the channel as the first spatial axis (a ``(1, rows, cols)`` NIfTI, axes permuted against the input). This
    appends the dropped singleton axes to ``pred`` again (up to the spatial rank of ``ref_key``'s affine) and sets
    the reference's ``spatial_shape`` to match, so the answer is ``(rows, cols, 1)`` with the input's affine.
    Inputs without a dropped axis (2D files) pass through.
    """

    def __init__(self, keys="pred", ref_key: str = "image") -> None:
        super().__init__(keys)
        self.ref_key = ref_key

    def __call__(self, data):
        d = dict(data)
        ref = d.get(self.ref_key)
        affine = getattr(ref, "affine", None)
        if affine is None:
            return d
        rank = int(affine.shape[-1]) - 1
        for key in self.key_iterator(d):
            x = d[key]
            while x.ndim - 1 < rank:
                x = x[..., None]
            d[key] = x
            ref.meta["spatial_shape"] = np.asarray(x.shape[1:])
        return d


def model_name(method: str, prefix: str = "fusion_") -> str:
    return f"{prefix}{method}"


def _read_config(bundle_root: Path, name: str) -> dict:
    with open(bundle_root / "configs" / name, encoding="utf-8") as f:
        return json.load(f)


def inference_config(bundle_root, method: str) -> dict:
    """``configs/inference.json`` of ``bundle_root`` as MONAI Label serves ``method``."""
    cfg = _read_config(Path(bundle_root), "inference.json")
    cfg["method"] = method
    if methods.load_method_config(bundle_root, method)["trainable"]:
        cfg["ckpt_path"] = MODEL_PT
    post = cfg.get("postprocessing")
    if not (isinstance(post, dict) and isinstance(post.get("transforms"), list)):
        raise ValueError("configs/inference.json: 'postprocessing' must be a Compose with a 'transforms' list.")
    post["transforms"] = [t for t in post["transforms"]
                          if str(t.get("_target_", "")).rsplit(".", 1)[-1] not in WRITERS]
    post["transforms"].append({"_target_": "scripts.monailabel_app.RestoreInputGridd", "keys": "pred"})
    return cfg


def train_config(bundle_root, method: str) -> dict:
    """``configs/train.json`` of ``bundle_root`` for MONAI Label's ``BundleTrainTask`` training ``method``."""
    cfg = _read_config(Path(bundle_root), "train.json")
    cfg["method"] = method
    savers = [h for h in cfg.get("validate", {}).get("handlers", [])
              if str(h.get("_target_", "")).endswith("CheckpointSaver") and h.get("key_metric_filename") == "model.pt"]
    if len(savers) != 1:
        raise ValueError("configs/train.json: expected one validation CheckpointSaver writing model.pt.")
    savers[0]["save_dir"] = MODELS_DIR
    # no validation images (MONAI Label's val_split of 1-2 images, or val_split 0): the final model instead
    cfg["train"]["handlers"].append({
        "_target_": "CheckpointSaver",
        "_disabled_": "$len(@validate#dataset#data) > 0",
        "save_dir": MODELS_DIR,
        "save_dict": {"model": "@network"},
        "save_final": True,
        "final_filename": "model.pt",
        "save_interval": 0,
    })
    for key in ("network", "run"):  # what BundleTrainTask needs: the network to load model.pt into, the run id
        if key not in cfg:
            raise ValueError(f"configs/train.json: MONAI Label training needs the key {key!r}.")
    return cfg


def _network(method: str, bundle_root=ROOT):
    cfg = methods.load_method_config(bundle_root, method)
    return methods.build(cfg["network"], spatial_dims=2)


def _state_dict(method: str, weights, seed: int, bundle_root=ROOT) -> tuple[dict, str]:
    """(state dict, where it came from) for ``method``; ``weights``: a file, or ``None`` for a fresh network."""
    torch.manual_seed(seed)
    net = _network(method, bundle_root)
    if weights is None:
        return net.state_dict(), f"freshly initialised (seed {seed})"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights}: not weights of {method}'s network ({' '.join(str(e).split())[:300]})") from e
    return net.state_dict(), str(weights)


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.is_file():
        link.unlink()
    link.symlink_to(target, target_is_directory=target.is_dir())


def _write_json(cfg: dict, path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def deploy_method(app_dir, method: str, weights=None, fresh: bool = False, replace_weights: bool = False,
                  seed: int = 0, prefix: str = "fusion_", bundle_root=ROOT) -> Path:
    """Create or update ``<app_dir>/model/<prefix><method>``; returns that folder."""
    bundle_root = Path(bundle_root).resolve()
    cfg = methods.load_method_config(bundle_root, method)  # validates the name
    trainable = bool(cfg["trainable"])
    folder = Path(app_dir) / "model" / model_name(method, prefix)
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    _link(bundle_root / "scripts", folder / "scripts")
    for entry in sorted((bundle_root / "configs").iterdir()):
        if entry.name not in SKIPPED and not entry.name.startswith("."):
            _link(entry, folder / "configs" / entry.name)
    _write_json(inference_config(bundle_root, method), folder / "configs" / "inference.json")
    if trainable:
        _write_json(train_config(bundle_root, method), folder / "configs" / "train.json")
    elif (folder / "configs" / "train.json").exists():
        (folder / "configs" / "train.json").unlink()

    model_pt = folder / "models" / "model.pt"
    if model_pt.is_file() and not (weights or fresh or replace_weights):
        logger.info("%s: kept the existing %s", method, model_pt)
        return folder
    if trainable and weights is None and not fresh:
        try:
            weights = methods.default_checkpoint(bundle_root, method)
        except FileNotFoundError:
            logger.warning("%s: no trained weights found (models/%s.pt, runs/%s/model.pt); serving a freshly "
                           "initialised, untrained network: train it (POST /train/%s) or pass --weights.",
                           method, method, method, model_name(method, prefix))
    state, source = _state_dict(method, None if fresh or not trainable else weights, seed, bundle_root)
    if model_pt.is_symlink():
        model_pt.unlink()
    tmp = model_pt.with_name("model.pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, model_pt)
    logger.info("%s: %s <- %s", method, model_pt, source if trainable else "parameter-free baseline")
    return folder


def deploy(app_dir, method_names=None, weights: dict | None = None, fresh: bool = False,
           replace_weights: bool = False, seed: int = 0, prefix: str = "fusion_", bundle_root=ROOT) -> list[str]:
    """Deploy several methods (default: every method of the registry); returns the MONAI Label model names."""
    method_names = list(method_names or methods.available_methods(bundle_root))
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(method_names))
    if unknown:
        raise ValueError(f"--weights for methods not deployed: {', '.join(unknown)}")
    names = []
    for m in method_names:
        deploy_method(app_dir, m, weights.get(m), fresh=fresh, replace_weights=replace_weights, seed=seed,
                      prefix=prefix, bundle_root=bundle_root)
        names.append(model_name(m, prefix))
    return names


def _parse_weights(items) -> dict:
    out = {}
    for item in items or []:
        method, sep, path = item.partition("=")
        if not sep or not method or not path:
            raise SystemExit(f"--weights takes METHOD=PATH, got {item!r}")
        out[method] = path
    return out


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", required=True, help="the monaibundle sample app folder (its model/ gets the bundles)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"methods to deploy (default: all: {' '.join(methods.available_methods(ROOT))})")
    parser.add_argument("--weights", nargs="+", default=None, metavar="METHOD=PATH",
                        help="weights per method (default: models/<method>.pt, then runs/<method>/model.pt)")
    parser.add_argument("--fresh", action="store_true", help="freshly initialised networks for all (untrained)")
    parser.add_argument("--replace_weights", action="store_true",
                        help="replace an existing models/model.pt with the default weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of freshly initialised networks")
    parser.add_argument("--prefix", default="fusion_", help="model name prefix (default fusion_)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app = Path(args.app)
    if not (app / "main.py").is_file():
        logger.warning("%s has no main.py: is it MONAI Label's monaibundle sample app? (monailabel apps --download "
                       "--name monaibundle --output apps)", app)
    names = deploy(app, args.methods, _parse_weights(args.weights), fresh=args.fresh,
                   replace_weights=args.replace_weights, seed=args.seed, prefix=args.prefix)
    print("Start the server in MONAI Label's environment (README 'MONAI Label'):\n"
          f"  MONAI_LABEL_RELOAD_APP_LIB=false python -m monailabel.main start_server --app {app} --studies <folder> "
          f"--conf models {','.join(names)} --conf zoo_source ngc --conf sam2 false")
    return names


if __name__ == "__main__":
    main()
