"""Multimodal medical image fusion bundle: code referenced by the configs as ``scripts.<module>.<name>``.

- ``transforms``: loading, checking, colour split/merge, saving of fusion pairs
- ``data``: datalist readers (pairs.csv, paired folders, MONAI datalist JSON)
- ``phantom``: the embedded MNI152-derived default dataset
- ``networks``: one network per method, plus classical baselines
- ``losses``, ``metrics``: training losses, fusion metrics
- ``engine``: inferer, validation metric and progress bar for the Ignite workflows
- ``methods``: ``--method`` registry (``configs/methods/<name>.json``)
- ``convert``: official checkpoint -> bundle weights
- ``io``: atomic output writing
"""

from . import data, engine, io, losses, methods, networks, phantom, transforms
