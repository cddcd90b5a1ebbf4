"""Method registry: ``--method <name>`` selects ``configs/methods/<name>.json``.

A method file holds what differs between methods: the network and loss (as ``_target_`` configs), whether the
method trains, and its training defaults (epochs, batch size, patch size, learning rate) that the workflow configs
read and the command line can override (``--epochs 300``). Network arguments can be overridden with
``--network_overrides "{'fusion_rule': 'average'}"``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from monai.bundle import ConfigParser

__all__ = ["available_methods", "load_method_config", "build", "build_list", "default_checkpoint"]


def _methods_dir(bundle_root) -> Path:
    return Path(bundle_root) / "configs" / "methods"


def available_methods(bundle_root=".") -> list[str]:
    return sorted(p.stem for p in _methods_dir(bundle_root).glob("*.json"))


def load_method_config(bundle_root, method: str) -> dict:
    """The raw (not yet instantiated) content of ``configs/methods/<method>.json``."""
    # validated against the registry by name: a user string never becomes a path ('../x' cannot load another JSON)
    path = _methods_dir(bundle_root) / f"{method}.json"
    if not isinstance(method, str) or method not in available_methods(bundle_root) or not path.is_file():
        raise ValueError(f"unknown method {method!r}; available: {', '.join(available_methods(bundle_root))}.")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.setdefault("name", method)
    cfg.setdefault("trainable", True)
    return cfg


def build(component: dict, overrides: dict | None = None, **kwargs):
    """Instantiate a ``{"_target_": ..., **args}`` config with ``overrides`` then ``kwargs`` applied on top."""
    cfg = {**component, **(overrides or {}), **kwargs}
    return ConfigParser({"c": cfg}).get_parsed_content("c")


def build_list(components) -> list:
    """Instantiate a list of ``{"_target_": ...}`` configs (a method's extra transforms); ``[]`` for none."""
    return [build(c) for c in components or []]


def _shipped_candidates(bundle_root, method: str, pairs=None) -> list[Path]:
    """The shipped weight files for ``method``, most specific first: ``models/<method>_<pair>.pt`` when ``pairs``
    names one modality pair, then the all-pairs ``models/<method>.pt``."""
    models = Path(bundle_root) / "models"
    candidates = [models / f"{method}_{pairs[0]}.pt"] if pairs and len(pairs) == 1 else []
    return candidates + [models / f"{method}.pt"]


def default_checkpoint(bundle_root, method: str, output_dir=None, pairs=None) -> str | None:
    """Weights to use when none are given: the shipped ``models/<method>_<pair>.pt`` when ``pairs`` names one
    modality pair (e.g. ``["CT-MRI"]``) and that file exists, else the shipped all-pairs ``models/<method>.pt``,
    else the training run's ``model.pt``.

    Returns ``None`` for methods without weights (baselines); raises a clear error for a trainable method with none.
    """
    if not load_method_config(bundle_root, method)["trainable"]:
        return None
    models = Path(bundle_root) / "models"
    candidates = _shipped_candidates(bundle_root, method, pairs)
    run_dir = Path(output_dir) if output_dir else Path(bundle_root) / "runs" / method
    candidates += [run_dir / "model.pt", run_dir / "model_final.pt"]
    for c in candidates:
        if c.is_file():
            logging.getLogger(__name__).info("%s: weights %s%s", method, c,
                                             " (shipped; --ckpt_path selects others)" if c.parent == models else "")
            return str(c)
    raise FileNotFoundError(
        f"no weights for method {method!r}: looked for {', '.join(map(str, candidates))}. Train first "
        f"(python -m monai.bundle run training --config_file configs/train.json --method {method}) "
        "or pass --ckpt_path <file>."
    )


def initial_checkpoint(bundle_root, method: str, init_ckpt=None, pairs=None) -> str | None:
    """Weights a training run starts from (``--init_ckpt``; fine-tuning): ``None`` (random initialisation),
    ``"shipped"`` (the shipped ``models/<method>[_<pair>].pt`` that inference would pick) or a weights file
    (a shipped-style state dict or a run's ``model.pt``). The optimizer and epoch start fresh, unlike ``--resume``."""
    if init_ckpt in (None, "", "None", "null"):
        return None
    if str(init_ckpt) == "shipped":
        candidates = _shipped_candidates(bundle_root, method, pairs)
        for c in candidates:
            if c.is_file():
                return str(c)
        raise FileNotFoundError(f"--init_ckpt shipped: no shipped weights for {method!r} "
                                f"(looked for {', '.join(map(str, candidates))}).")
    if not Path(str(init_ckpt)).is_file():
        raise FileNotFoundError(f"{init_ckpt}: weights to start training from not found (--init_ckpt).")
    return str(init_ckpt)


def require_trainable(method_config: dict) -> None:
    """Fail before any data is touched when training a method that has nothing to train (a baseline)."""
    if not method_config.get("trainable", True):
        raise ValueError(
            f"method {method_config.get('name')!r} has no trainable parameters; use it directly with "
            "configs/inference.json or configs/evaluate.json."
        )
