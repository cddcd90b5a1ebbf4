"""Fusion networks."""

from .baselines import AverageFusion, GuidedFilterFusion, LaplacianPyramidFusion, MaxFusion
from .dran import DRAN

__all__ = ["AverageFusion", "DRAN", "GuidedFilterFusion", "LaplacianPyramidFusion", "MaxFusion"]
