"""Multimodal medical image fusion bundle: code referenced by the configs as ``scripts.<module>.<name>``.

- ``transforms``: loading, checking, colour split/merge, saving of fusion pairs
- ``data``: datalist readers (pairs.csv, paired folders, MONAI datalist JSON)
- ``phantom``: the embedded MNI152-derived default dataset
- ``networks``: one network per method, plus classical baselines
- ``losses``, ``metrics``: training losses, fusion metrics
- ``evaluation``, ``figures``: evaluation workflow pieces (metric tables, summaries) and its PIL figures
- ``engine``: inferer, validation metric and progress bar for the Ignite workflows
- ``methods``: ``--method`` registry (``configs/methods/<name>.json``)
- ``convert``: official checkpoint -> bundle weights
- ``io``: atomic output writing
- ``volumes``: NIfTI/DICOM volume geometry, slice-wise (2.5D) and sliding-window fusion of volumes
"""

import importlib

_SUBMODULES = (
    "convert", "data", "engine", "evaluation", "io", "losses", "methods", "metrics", "networks", "phantom", "transforms",
    "volumes",
)


def __getattr__(name):
    # Submodules load on first use (``scripts.data.build_datalist`` in a config), so ``python -m scripts.convert``
    # does not import everything first and configs still need only ``$import scripts``.
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
