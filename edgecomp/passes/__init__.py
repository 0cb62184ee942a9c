"""edgecomp's Relax graph passes, one per module."""

from edgecomp.passes.decompose_conv import DecomposeConv, LayerRecord

__all__ = ["DecomposeConv", "LayerRecord"]
