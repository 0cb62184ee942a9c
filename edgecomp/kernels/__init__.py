"""edgecomp's kernels: TE computes with their schedule rules, and the default rule list.

- :mod:`.conv_common` - what the convolution kernels share: geometry, weight panels, padding,
  the register-tile cost model.
- :mod:`.conv2d` - ``relax.nn.conv2d`` legalized to the kernels below, and their rule.
- :mod:`.mec_conv` - MEC convolution (NCHW / NHWC); :mod:`.im2col_conv` - the im2col lowering
  MEC is compared against; :mod:`.conv_gemm` - the register-tiled GEMM schedule both share.
- :mod:`.winograd_conv` - Winograd F(2x2, 3x3) for 3x3 stride-1 convolutions on CPUs: its
  transforms around a grouped GEMM, by bands of rows.
- :mod:`.depthwise_conv` - direct depthwise convolution and its schedules.
- :mod:`.fused_chain` - one kernel for a whole CP / Tucker-2 / GKPD chain (T1000 re-fusion),
  intermediates per output tile.
- :mod:`.schedules` - rules for matmul and everything else, and the shared helpers.

On CPUs each rule's schedule is also a MetaSchedule design space: its knobs are drawn from
the schedule (``sample_perfect_tile`` / ``sample_categorical``, see
:func:`.schedules.tile_knob`) with the heuristic pick as the decision, so its trace replays
with any other decision and its default point is the untuned schedule; ``tunable`` changes
nothing there.
"""

from __future__ import annotations

from tvm.s_tir import dlight
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from edgecomp.kernels.conv2d import ConvSchedule, conv_legalizer, legalize_conv2d
from edgecomp.kernels.fused_chain import FusedChainRule
from edgecomp.kernels.schedules import CpuFallback, Guarded, Matmul
from edgecomp.kernels.target_info import is_gpu


def default_rules(target: Target) -> list[ScheduleRule]:
    """The schedule rules ``edgecomp compile`` applies, most specific first.

    Use as ``s_tir.dlight.ApplyDefaultSchedule(*default_rules(target))`` inside ``with target``.
    CPU: the fused-chain rule, edgecomp's convolution rule, its matmul rule, then a
    parallel/vectorizing fallback. GPU (Mali/OpenCL): the convolution rule with thread
    bindings, then dlight's GPU rules, whose ``Fallback`` binds whatever is left. Each of
    edgecomp's rules is guarded: where it fails on a function, the fallback schedules it.
    """
    if is_gpu(target):
        return [
            Guarded(ConvSchedule(), dlight.gpu.Fallback()),
            dlight.gpu.Matmul(),
            dlight.gpu.GEMV(),
            dlight.gpu.Reduction(),
            dlight.gpu.GeneralReduction(),
            dlight.gpu.Fallback(),
        ]
    fallback = CpuFallback()
    return [
        Guarded(FusedChainRule(), fallback),
        Guarded(ConvSchedule(), fallback),
        Guarded(Matmul(), fallback),
        Guarded(fallback, None),
    ]


def tunable(func: object, target: Target) -> bool:
    """True when one of edgecomp's kernel rules (not the fallback) schedules ``func``: the
    prim funcs ``edgecomp tune`` searches (CPU targets; GPU kernels are not tuned yet)."""
    if is_gpu(target):
        return False
    for rule in (FusedChainRule(), ConvSchedule(), Matmul()):
        try:
            if rule.apply(func, target, False) is not None:
                return True
        except Exception:  # noqa: BLE001 - the fallback schedules it: nothing to tune
            return False
    return False


__all__ = [
    "ConvSchedule",
    "CpuFallback",
    "FusedChainRule",
    "Guarded",
    "Matmul",
    "default_rules",
    "tunable",
    "conv_legalizer",
    "legalize_conv2d",
]
