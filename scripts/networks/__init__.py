"""Fusion networks."""

from .baselines import AverageFusion, GuidedFilterFusion, LaplacianPyramidFusion, MaxFusion
from .bsafusion import BSAFusion
from .dran import DRAN
from .mactfusion import MACTFusion
from .msgfusion import MsgFusion

__all__ = [
    "AverageFusion", "BSAFusion", "DRAN", "GuidedFilterFusion", "LaplacianPyramidFusion", "MACTFusion", "MaxFusion", "MsgFusion",
]
