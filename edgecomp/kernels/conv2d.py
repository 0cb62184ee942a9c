"""``relax.nn.conv2d`` -> edgecomp's convolution kernels: the legalization and the rule.

Which kernel a convolution gets:

- depthwise (``groups == C``, one input channel per group): :mod:`.depthwise_conv`;
- on CPUs, dense NHWC 3x3 stride-1 convolutions with constant weights and at least 32
  channels in whole vectors: Winograd F(2x2, 3x3), :mod:`.winograd_conv` (2.25x fewer
  multiply-adds, its 16 GEMMs done by the same register-tiled GEMM);
- everything else, grouped or not, 1x1 or k x k, strided or dilated: a register-tiled GEMM
  over MEC's lowering (:mod:`.mec_conv`; :mod:`.im2col_conv` to measure it against). In NHWC a
  convolution without padding (1x1 above all) reads its input in place: a plain GEMM.

Both take NCHW or NHWC activations (``data_layout``) with OIHW weights. Convolutions that are
neither, or not statically shaped, keep TVM's own lowering.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax, s_tir, te, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from edgecomp.kernels import schedules
from edgecomp.kernels.conv_common import (
    CONV_GEMM,
    CONV_KINDS,
    DEPTHWISE,
    LAYOUTS,
    conv_key,
    conv_out_size,
    emit_gemm_weight,
    pack_weight_te,
    tiles_for,
)
from edgecomp.kernels.conv_gemm import schedule_conv_gemm_cpu, schedule_conv_gemm_gpu
from edgecomp.kernels.depthwise_conv import (
    depthwise_conv2d,
    nhwc_weight,
    nhwc_weight_te,
    schedule_depthwise_cpu,
    schedule_depthwise_gpu,
)
from edgecomp.kernels.im2col_conv import im2col_conv2d
from edgecomp.kernels.mec_conv import mec_conv2d
from edgecomp.kernels.target_info import is_gpu
from edgecomp.kernels.winograd_conv import (
    TILE,
    is_winograd,
    schedule_winograd_cpu,
    winograd_applies,
    winograd_conv2d,
    winograd_weight,
)


def _conv_attrs(call: relax.Call) -> tuple[list[int], list[int], list[int], int, str]:
    attrs = call.attrs
    out_dtype = str(attrs.out_dtype) if attrs.out_dtype is not None else ""
    if out_dtype in ("", "None", "void"):
        out_dtype = str(call.args[0].ty.dtype)
    return (
        [int(v) for v in attrs.strides],
        [int(v) for v in attrs.padding],
        [int(v) for v in attrs.dilation],
        int(attrs.groups),
        out_dtype,
    )


def _layout(call: relax.Call) -> str | None:
    """The activation layout of a convolution edgecomp's kernels take, else None."""
    attrs = call.attrs
    layout = str(attrs.data_layout)
    if layout not in LAYOUTS or str(attrs.out_layout) != layout:
        return None
    if str(attrs.kernel_layout) != "OIHW":
        return None
    shapes = [arg.ty.shape for arg in call.args[:2]]
    static = all(
        s is not None and all(isinstance(d, tirx.IntImm) for d in s.values) for s in shapes
    )
    return layout if static else None


def _stock_legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    legalize = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")
    return legalize(bb, call)


def legalize_conv2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """Legalize ``relax.nn.conv2d`` with edgecomp's kernels (MEC; direct for depthwise).

    Use as ``LegalizeOps(customize_legalize_map={"relax.nn.conv2d": legalize_conv2d})``.
    The micro-kernel tile depends on the target: legalize under ``with target:``.
    """
    return _legalize(bb, call, "mec")


def conv_legalizer(kind: str) -> Callable[[relax.BlockBuilder, relax.Call], relax.Expr]:
    """The legalization of ``relax.nn.conv2d`` for one of :data:`CONV_KINDS`.

    ``"mec"`` is :func:`legalize_conv2d`; ``"mec-buffer"`` and ``"im2col"`` exist to measure it
    against (bench/mec_vs_im2col.py, the memory report's "before").
    """
    if kind not in CONV_KINDS:
        raise ValueError(f"unknown convolution lowering {kind!r}; use one of {CONV_KINDS}")
    if kind == "mec":
        return legalize_conv2d
    return lambda bb, call: _legalize(bb, call, kind)


def _legalize(bb: relax.BlockBuilder, call: relax.Call, kind: str) -> relax.Expr:
    layout = _layout(call)
    if layout is None:
        return _stock_legalize(bb, call)
    strides, padding, dilation, groups, out_dtype = _conv_attrs(call)
    data, weight = call.args[0], call.args[1]
    shape = [int(v) for v in data.ty.shape.values]
    channels, width = (shape[3], shape[2]) if layout == "NHWC" else (shape[1], shape[3])
    k, cg, kh, kw = (int(v) for v in weight.ty.shape.values)
    if groups > 1 and cg == 1 and groups == channels:
        folded = layout == "NHWC" and isinstance(weight, tvm.ir.expr.Constant)
        if folded:
            weight = relax.const(nhwc_weight(weight.value.numpy()))

        def depthwise(x: te.Tensor, w: te.Tensor) -> te.Tensor:
            if layout == "NHWC" and not folded:
                w = nhwc_weight_te(w)
            return depthwise_conv2d(x, w, strides, padding, dilation, out_dtype, layout)

        return bb.call_te(depthwise, data, weight, primfunc_name_hint="depthwise_conv2d")
    target = Target.current(allow_none=True)
    wo = conv_out_size(width, kw, strides[1], padding[1], padding[3], dilation[1])
    key = conv_key(layout, shape, (k, cg, kh, kw), strides, padding, dilation, groups)
    height = shape[1] if layout == "NHWC" else shape[2]
    ho = conv_out_size(height, kh, strides[0], padding[0], padding[2], dilation[0])
    constant = isinstance(weight, tvm.ir.expr.Constant)
    cpu = target is not None and not is_gpu(target)
    geometry = (layout, (k, cg, kh, kw), strides, dilation, groups, (ho, wo), constant)
    tiles = tiles_for(-(-wo // TILE), k, target, cg, key)
    if kind == "mec" and cpu and winograd_applies(*geometry, tiles[2]):
        u = relax.const(winograd_weight(weight.value.numpy(), tiles[1] * tiles[2]))
        return bb.call_te(
            lambda x, wk: winograd_conv2d(x, wk, padding, tiles, k, out_dtype, key),
            data,
            u,
            primfunc_name_hint="winograd_conv2d",
        )
    tiles = tiles_for(wo, k // groups, target, kh * kw * cg, key)
    panel = tiles[1] * tiles[2]
    packed, folded = emit_gemm_weight(weight, groups, panel)

    def compute(x: te.Tensor, w: te.Tensor) -> te.Tensor:
        wk = w if folded else pack_weight_te(w, groups, panel)
        if kind == "im2col":
            return im2col_conv2d(
                x, wk, strides, padding, dilation, tiles, out_dtype, k, layout, key
            )
        buffered = kind == "mec-buffer"
        return mec_conv2d(
            x, wk, strides, padding, dilation, tiles, out_dtype, k, buffered, layout, key
        )

    name = "im2col_conv2d" if kind == "im2col" else "mec_conv2d"
    return bb.call_te(compute, data, packed, primfunc_name_hint=name)


def find_blocks_with(sch: s_tir.Schedule, key: str) -> list[s_tir.schedule.SBlockRV]:
    """All blocks of ``sch``'s function annotated with ``key`` (in program order)."""
    return [b for b in schedules.all_blocks(sch) if key in sch.get(b).annotations]


class ConvSchedule(ScheduleRule):
    """Schedule rule for edgecomp's convolutions (MEC, im2col and depthwise prim funcs).

    Claims a function when one of its blocks carries the ``edgecomp.conv_gemm`` or
    ``edgecomp.depthwise`` annotation set by this package's computes; returns None otherwise.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        """Schedule ``func`` for ``target``, or None when it holds no edgecomp convolution."""
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        gemms = find_blocks_with(sch, CONV_GEMM)
        depthwise = find_blocks_with(sch, DEPTHWISE)
        if len(gemms) + len(depthwise) != 1:
            return None  # none here, or a fused chain another rule must own
        gpu = is_gpu(target)
        if gemms and gpu:
            schedule_conv_gemm_gpu(sch, gemms[0], target)
        elif gemms and is_winograd(sch):
            schedule_winograd_cpu(sch, gemms[0], target, tunable)
        elif gemms:
            schedule_conv_gemm_cpu(sch, gemms[0], target, tunable)
        else:
            (schedule_depthwise_gpu if gpu else schedule_depthwise_cpu)(sch, depthwise[0], target)
        schedules.schedule_leftovers(sch, target)
        return sch
