"""Depthwise convolution (``groups == C``): TE compute in NCHW and NHWC, and its schedules.

A depthwise window has ``kh*kw`` taps per output: there is no GEMM worth lowering for, so the
kernel reads the (zero-padded) input directly. In NHWC (CPUs) it vectorizes over channels and
keeps a register tile of a few output columns x one or two channel vectors, each tap loading
one input vector and one weight vector; in NCHW (GPUs, and what the memory report's "before"
keeps) it vectorizes along the output width.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tvm import s_tir, te, tirx
from tvm.target import Target

from edgecomp.kernels import schedules
from edgecomp.kernels.conv_common import DEPTHWISE, cast, conv_out_size, nchw_dims
from edgecomp.kernels.target_info import cpu_info


def depthwise_conv2d(
    x: te.Tensor,
    w: te.Tensor,
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    out_dtype: str = "float32",
    layout: str = "NCHW",
) -> te.Tensor:
    """Direct depthwise convolution, ``K = C * mult`` output channels.

    ``layout`` is the input's and the output's (``NCHW`` or ``NHWC``); the weight is
    ``[K, 1, kh, kw]`` for NCHW and ``[kh, kw, K]`` for NHWC (see :func:`nhwc_weight`), so
    that a vector of channels loads contiguous weights. The padding is a block of its own
    (``dw_pad``) that the schedule inlines as bounds-checked reads.
    """
    n, c, h, wd = nchw_dims(x, layout)
    if layout == "NHWC":
        kh, kw, k = (int(v) for v in w.shape)
    else:
        k, _, kh, kw = (int(v) for v in w.shape)
    mult = k // c
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    pt, pl, pb, pr = (int(v) for v in padding)
    ho = conv_out_size(h, kh, sh, pt, pb, dh)
    wo = conv_out_size(wd, kw, sw, pl, pr, dw)
    ri = te.reduce_axis((0, kh), "ri")
    rj = te.reduce_axis((0, kw), "rj")
    zero = tirx.const(0, x.dtype)

    if layout == "NHWC":

        def pad_nhwc(b, r, s, ch):
            iy, ix = r - pt, s - pl
            inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < wd)
            return tirx.if_then_else(inside, x[b, iy, ix, ch], zero)

        xp = te.compute((n, h + pt + pb, wd + pl + pr, c), pad_nhwc, name="dw_pad")
        return te.compute(
            (n, ho, wo, k),
            lambda b, p, q, o: te.sum(
                cast(xp[b, p * sh + ri * dh, q * sw + rj * dw, o // mult], out_dtype)
                * cast(w[ri, rj, o], out_dtype),
                axis=[ri, rj],
            ),
            name="dw_conv",
            attrs={DEPTHWISE: "NHWC"},
        )

    def pad(b, ch, r, s):
        iy, ix = r - pt, s - pl
        inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < wd)
        return tirx.if_then_else(inside, x[b, ch, iy, ix], zero)

    xp = te.compute((n, c, h + pt + pb, wd + pl + pr), pad, name="dw_pad")
    return te.compute(
        (n, k, ho, wo),
        lambda b, o, p, q: te.sum(
            cast(xp[b, o // mult, p * sh + ri * dh, q * sw + rj * dw], out_dtype)
            * cast(w[o, 0, ri, rj], out_dtype),
            axis=[ri, rj],
        ),
        name="dw_conv",
        attrs={DEPTHWISE: "NCHW"},
    )


def nhwc_weight(w: np.ndarray) -> np.ndarray:
    """``[K, 1, kh, kw]`` -> ``[kh, kw, K]``: the weight layout of the NHWC kernel."""
    return np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))


def nhwc_weight_te(w: te.Tensor) -> te.Tensor:
    """:func:`nhwc_weight` for weights that are not constants."""
    k, _, kh, kw = (int(v) for v in w.shape)
    return te.compute((kh, kw, k), lambda i, j, o: w[o, 0, i, j], name="dw_weight")


def _inline_padding(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> None:
    for producer in sch.get_producers(block):
        if sch.get(producer).name_hint.startswith("dw_pad"):
            sch.compute_inline(producer)


def _is_nhwc(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    return str(sch.get(block).annotations[DEPTHWISE]) == "NHWC"


def schedule_depthwise_cpu(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, target: Target
) -> None:
    """Depthwise on a CPU, padding inlined as bounds-checked reads.

    NHWC: parallel over output rows, then a register tile of ``tile_q`` columns x ``n_vec``
    channel vectors under the ``kh x kw`` taps. NCHW: parallel over (n, k, p), a vector of
    output columns.

    Knobs (drawn from the schedule, see :func:`schedules.tile_knob`; the defaults give the
    heuristic schedule):

    - NHWC ``q_tile``: output columns of the register tile, ``sample_perfect_tile`` of the
      output width, divisors up to 8; default the largest of 4, 3, 2, 1 dividing it.
    - NHWC ``o_vec``: channel vectors of the register tile, ``sample_categorical`` over 1, 2
      and 4 where they divide the channel vectors; default 2 when it divides them, else 1.
    - NCHW ``q_tile``: output columns per vector, ``sample_perfect_tile`` of the output width
      (divisors up to 16) when the vector width divides it; default the vector width (1 when
      the width is narrower). Otherwise fixed.
    """
    lanes = cpu_info(target).lanes
    _inline_padding(sch, block)
    if _is_nhwc(sch, block):
        _schedule_nhwc(sch, block, target, lanes)
    else:
        write_back = sch.cache_write(block, 0, "local")
        write_back = schedules.inline_epilogues(sch, write_back)
        b, o, p, q, ri, rj = sch.get_loops(block)
        wo = int(sch.get(q).extent)
        tile = lanes if wo >= lanes else 1
        q_o, q_i = sch.split(q, schedules.tile_knob(sch, q, tile))
        sch.reorder(b, o, p, q_o, ri, rj, q_i)
        sch.reverse_compute_at(write_back, q_o, preserve_unit_loops=True)
        sch.parallel(sch.fuse(b, o, p))
        sch.decompose_reduction(block, ri)
    schedules.schedule_leftovers(sch, target)


def _schedule_nhwc(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, target: Target, lanes: int
) -> None:
    b, p, q, o, ri, rj = sch.get_loops(block)
    wo, channels = int(sch.get(q).extent), int(sch.get(o).extent)
    # The widest vector that divides the channels (AVX-512's 16 lanes and 120 channels: 8).
    vec = next((v for v in (lanes, lanes // 2, lanes // 4) if v > 1 and channels % v == 0), 1)
    n_vec = 2 if channels % (2 * vec) == 0 and vec > 1 else 1
    tile_q = next(t for t in (4, 3, 2, 1) if wo % t == 0)
    write_back = sch.cache_write(block, 0, "local")
    write_back = schedules.inline_epilogues(sch, write_back)
    q_o, q_i = sch.split(q, schedules.tile_knob(sch, q, tile_q, max_inner=8))
    vectors = [v for v in (1, 2, 4) if (channels // vec) % v == 0]
    o_vec = schedules.choice_knob(sch, vectors, n_vec)
    o_o, o_v, o_l = sch.split(o, [None, o_vec, vec])
    sch.reorder(b, p, q_o, o_o, ri, rj, q_i, o_v, o_l)
    sch.reverse_compute_at(write_back, o_o, preserve_unit_loops=True)
    sch.parallel(sch.fuse(b, p))
    sch.unroll(ri)
    sch.unroll(rj)
    sch.unroll(q_i)
    sch.unroll(o_v)
    if vec > 1:
        sch.vectorize(o_l)
    schedules.write_tile(sch, write_back, o_o, vec)
    init = sch.decompose_reduction(block, ri)
    if vec > 1:
        sch.vectorize(sch.get_loops(init)[-1])


def schedule_depthwise_gpu(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, target: Target
) -> None:
    """Direct depthwise on a GPU: one thread per output pixel."""
    _inline_padding(sch, block)
    write_back = sch.cache_write(block, 0, "local")
    write_back = schedules.inline_epilogues(sch, write_back)
    b, o, p, q, ri, rj = sch.get_loops(block)
    fused = sch.fuse(b, o, p, q)
    bx, tx = sch.split(fused, [None, schedules.gpu_threads(target)])
    sch.reverse_compute_at(write_back, tx)
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.decompose_reduction(block, ri)
    schedules.schedule_leftovers(sch, target)
