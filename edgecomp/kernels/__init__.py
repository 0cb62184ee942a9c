"""edgecomp's kernels: TE computes with their schedule rules, and the default rule list.

- :mod:`edgecomp.kernels.mec_conv` - MEC convolution (and direct depthwise), its Relax
  legalization and its schedule rule.
- :mod:`edgecomp.kernels.im2col_conv` - the im2col lowering MEC is compared against.
- :mod:`edgecomp.kernels.fused_chain` - one kernel for a whole CP / Tucker-2 / GKPD chain
  (T1000 re-fusion), intermediates per output tile.
- :mod:`edgecomp.kernels.schedules` - rules for matmul and everything else.
"""

from __future__ import annotations

from tvm.s_tir import dlight
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from edgecomp.kernels.fused_chain import FusedChainRule
from edgecomp.kernels.mec_conv import ConvSchedule, conv_legalizer, legalize_conv2d
from edgecomp.kernels.schedules import CpuFallback, Matmul
from edgecomp.kernels.target_info import is_gpu


def default_rules(target: Target) -> list[ScheduleRule]:
    """The schedule rules ``edgecomp compile`` applies, most specific first.

    Use as ``s_tir.dlight.ApplyDefaultSchedule(*default_rules(target))`` inside ``with target``.
    CPU: edgecomp's convolution rule, its matmul rule, then a parallel/vectorizing fallback.
    GPU (Mali/OpenCL): the convolution rule with thread bindings, then dlight's GPU rules,
    whose ``Fallback`` binds whatever is left so the module builds.
    """
    if is_gpu(target):
        return [
            ConvSchedule(),
            dlight.gpu.Matmul(),
            dlight.gpu.GEMV(),
            dlight.gpu.Reduction(),
            dlight.gpu.GeneralReduction(),
            dlight.gpu.Fallback(),
        ]
    return [FusedChainRule(), ConvSchedule(), Matmul(), CpuFallback()]


__all__ = [
    "ConvSchedule",
    "CpuFallback",
    "FusedChainRule",
    "Matmul",
    "default_rules",
    "conv_legalizer",
    "legalize_conv2d",
]
