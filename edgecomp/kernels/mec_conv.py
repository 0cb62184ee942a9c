"""MEC convolution (Cho and Brand, ICML 2017): TE compute, Relax legalization, schedule rule.

MEC lowers the input along one spatial axis only. For output column ``q`` the lowered buffer
holds every padded input row, each with the ``kw`` input columns the window at ``q`` covers::

    L[n, q, r, j, c] = xpad[n, c, r, q * sw + j * dw]          # shape Wo x (H * kw * C) per image

so the window of output pixel ``(p, q)`` is the contiguous slice ``L[n, q, p*sh : p*sh + kh]``
(for dh = 1), and output row ``p`` is one small GEMM ``Wo x (kh*kw*C) . (kh*kw*C) x K`` whose
A operand is a window of ``L`` with leading dimension ``H*kw*C``; consecutive rows' windows
overlap by ``(kh - sh) * kw * C``. The lowered buffer is ``kh / sh`` times smaller than im2col's.

Blocks of the compute (the schedule rule finds them by name / annotation):

- ``conv_pad``: zero-padded NHWC copy of the input, so that building ``L`` copies runs of
  contiguous channels instead of gathering one float per input plane;
- ``mec_lower``: the lowered buffer ``L`` above (output width padded to the register tile).
  Each of its rows ``L[n, q, r]`` (``kw * C`` floats) is, for dilation 1, the contiguous run
  ``xpad[n, r, q*sw : q*sw + kw, :]`` of the padded NHWC copy: ``L`` is a strided view of that
  copy. By default (lowering ``"mec"``) the schedule therefore inlines it and the GEMM reads
  its overlapping windows in place: no lowered buffer at all, and on the x86 host 3-15% faster
  per VGG-19 layer than copying it first (the copy is written and read once more from
  memory). Lowering ``"mec-buffer"`` materializes ``L`` as in the paper;
- ``mec_conv``: the GEMMs, writing ``conv[n, p, q, k]`` (channels innermost, so that the
  micro-kernel vectorizes over output channels whatever the image width), annotated
  ``edgecomp.conv_gemm`` with the tile chosen at legalization;
- ``out``: the transpose to NCHW; bias, ReLU and other elementwise epilogues fused by
  ``FuseOps`` are inlined into it.

The weight is packed at compile time (constants) into column panels of the micro-kernel's
width, ``[G, K/G/panel, kh, kw, C/G, panel]``, so each panel is one contiguous stream.

Grouped convolutions with more than one input channel per group use the same kernel (the group
picks a channel slice of ``L``); depthwise convolutions get a direct kernel (see
:func:`depthwise_conv2d`), since a GEMM with one input channel has nothing to reuse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.schedule import ScheduleError
from tvm.target import Target

from edgecomp.kernels import schedules
from edgecomp.kernels.target_info import CpuInfo, cpu_info, is_gpu

# Block annotation that marks the GEMM block of a lowered convolution (value: one of
# CONV_KINDS); the tile sizes chosen at legalization travel with it so the schedule agrees with
# the padding the compute already did.
CONV_GEMM = "edgecomp.conv_gemm"
TILE_W = "edgecomp.tile_w"
TILE_VEC = "edgecomp.tile_vec"
LANES = "edgecomp.lanes"
DEPTHWISE = "edgecomp.depthwise"
# The convolution lowerings: MEC read in place (the default), MEC with its lowered buffer
# materialized, and im2col (the baseline MEC is measured against).
CONV_KINDS = ("mec", "mec-buffer", "im2col")


# ----------------------------------------------------------------------------- tiling choice
def choose_tiles(
    out_w: int, k_per_group: int, info: CpuInfo, reduction: int = 0
) -> tuple[int, int, int]:
    """Pick the register tile of the GEMM micro-kernel: ``(tile_w, n_vec, lanes)``.

    The micro-kernel keeps ``tile_w x (n_vec * lanes)`` outputs in ``tile_w * n_vec`` vector
    registers, loads ``n_vec`` weight vectors and broadcasts ``tile_w`` inputs per step.
    The cost model counts, per useful multiply-add, the cycles of one step on a core with two
    FMA pipes and ``info.load_ports`` load ports (FMA latency 4 wants 8-10 independent
    accumulators), times the padding waste of rounding ``out_w`` up to a multiple of
    ``tile_w`` and the channels of a group up to a multiple of ``n_vec * lanes`` (decomposed
    layers have ranks like 50 or 17: padding them with zero weights keeps the kernel
    vectorized). Panels whose weights (``reduction`` floats per column) would not fit
    ``info.panel_bytes`` are left out while a narrower one fits: they are re-read for every
    tile (VGG-19 conv5 on AVX-512: 64-wide panels 370 GFLOP/s, 32-wide 480).
    """
    lanes = info.lanes
    while lanes > 1 and lanes // 2 >= k_per_group:
        lanes //= 2  # 3 channels per group: 4-lane vectors, not 8 of which 5 are padding
    best: tuple[tuple[float, int, float, int], int, int] | None = None
    # Panel widths that divide the channels need no padding (and keep the NCHW write-back an
    # affine index); pad only when no width divides.
    exact = [n for n in (1, 2, 3, 4) if k_per_group % (n * lanes) == 0] or [1, 2, 3, 4]
    fitting = [n for n in exact if reduction * n * lanes * 4 <= info.panel_bytes]
    for n_vec in fitting or exact[:1]:
        panel = n_vec * lanes
        waste_k = math.ceil(k_per_group / panel) * panel / k_per_group
        for tile_w in range(1, 17):
            if tile_w * n_vec + n_vec + 1 > info.registers:
                continue
            step = max(tile_w * n_vec / 2.0, (tile_w + n_vec) / info.load_ports, 5.0)
            waste = math.ceil(out_w / tile_w) * tile_w / out_w * waste_k
            cost = step / (tile_w * n_vec) * waste
            # Ties go to more accumulators (32-register files), then to fewer loads per FMA:
            # the weight panel streams from L2, and more independent FMAs hide its latency
            # (VGG-19 layers on AVX-512: 14 x 2 vectors 3-10% faster than 4 x 4 at the same
            # modelled cost). 16-register files (AVX2, armv7) keep room for the loads.
            acc = tile_w * n_vec
            loads = (tile_w + n_vec) / acc
            key = (round(cost, 4), -acc if info.registers >= 32 else 0, loads, -acc)
            if best is None or key < best[0]:
                best = (key, tile_w, n_vec)
    assert best is not None  # n_vec = 1, tile_w = 1 always fits
    return best[1], best[2], lanes


def _gpu_tiles(out_w: int) -> tuple[int, int, int]:
    # One thread per (4 columns x 4 channels): the schedule binds, it needs no padding beyond 4.
    return min(4, out_w), 1, 4


def _tiles_for(
    out_w: int, k_per_group: int, target: Target | None, reduction: int = 0
) -> tuple[int, int, int]:
    if target is not None and is_gpu(target):
        return _gpu_tiles(out_w)
    return choose_tiles(out_w, k_per_group, cpu_info(target), reduction)


# ----------------------------------------------------------------------------- TE computes
def conv_out_size(size: int, k: int, stride: int, pad_lo: int, pad_hi: int, dil: int) -> int:
    """Output extent of one spatial axis."""
    return (size + pad_lo + pad_hi - dil * (k - 1) - 1) // stride + 1


def mec_conv2d(
    x: te.Tensor,
    wk: te.Tensor,
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    tiles: tuple[int, int, int],
    out_dtype: str = "float32",
    out_channels: int | None = None,
    buffered: bool = False,
) -> te.Tensor:
    """MEC convolution of an NCHW input with a weight in GEMM layout.

    Parameters
    ----------
    x : te.Tensor
        Input ``[N, C, H, W]``.
    wk : te.Tensor
        Weight ``[G, K/G/kv, kh, kw, C/G, kv]`` with ``kv = n_vec * lanes``: for each group the
        ``(kh*kw*C/G) x (K/G)`` B operand of the GEMM, cut into column panels of the
        micro-kernel's width so that each panel is one contiguous stream (see
        :func:`pack_weight`).
    strides, dilation : sequence of int
        ``(sh, sw)`` and ``(dh, dw)``.
    padding : sequence of int
        ``(top, left, bottom, right)`` as in ``relax.nn.conv2d``.
    tiles : (tile_w, n_vec, lanes)
        Register tile from :func:`choose_tiles`; the output width is padded to ``tile_w``.
    out_dtype : str
        Accumulation and output dtype.
    out_channels : int, optional
        ``K`` when the packed weight carries zero-padded channels (default: no padding).
    buffered : bool
        Mark the GEMM ``"mec-buffer"``: the schedule then materializes the lowered buffer
        instead of reading it in place from the padded copy (see the module docstring).

    Returns
    -------
    te.Tensor
        Output ``[N, K, Ho, Wo]``.
    """
    n, c, h, w = (int(v) for v in x.shape)
    groups, kg, kh, kw, cg = _gemm_weight_dims(wk)
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    pt, pl, pb, pr = (int(v) for v in padding)
    ho = conv_out_size(h, kh, sh, pt, pb, dh)
    wo = conv_out_size(w, kw, sw, pl, pr, dw)
    tile_w = tiles[0]
    wo_pad = math.ceil(wo / tile_w) * tile_w
    rows = (ho - 1) * sh + (kh - 1) * dh + 1  # padded input rows some window touches

    cols = (wo_pad - 1) * sw + (kw - 1) * dw + 1  # padded input columns some window touches
    xt = padded_nhwc(x, rows, cols, pt, pl)
    lowered = te.compute(
        (n, wo_pad, rows, kw, c),
        lambda b, q, r, j, ch: xt[b, r, q * sw + j * dw, ch],
        name="mec_lower",
    )
    ri = te.reduce_axis((0, kh), "ri")
    rj = te.reduce_axis((0, kw), "rj")
    rc = te.reduce_axis((0, cg), "rc")

    def gemm(b, p, q, k):
        g = k // kg if groups > 1 else 0
        a = lowered[b, q, p * sh + ri * dh, rj, g * cg + rc if groups > 1 else rc]
        bw = gemm_weight(wk, g, k % kg if groups > 1 else k, ri, rj, rc)
        return te.sum(_cast(a, out_dtype) * _cast(bw, out_dtype), axis=[ri, rj, rc])

    conv = te.compute(
        (n, ho, wo_pad, groups * kg),
        gemm,
        name="mec_conv",
        attrs=_tile_attrs("mec-buffer" if buffered else "mec", tiles),
    )
    return to_nchw(conv, groups, kg, out_channels, ho, wo)


def to_nchw(
    conv: te.Tensor, groups: int, kg_pad: int, out_channels: int | None, ho: int, wo: int
) -> te.Tensor:
    """Block ``out``: ``conv[n, p, q, k_padded]`` -> NCHW ``[n, K, Ho, Wo]``, padding dropped."""
    n = int(conv.shape[0])
    k_total = out_channels or groups * kg_pad
    kg = k_total // groups

    def pick(b, k, p, q):
        if kg == kg_pad or groups == 1:
            return conv[b, p, q, k]
        return conv[b, p, q, k // kg * kg_pad + k % kg]

    return te.compute((n, k_total, ho, wo), pick, name="out")


def padded_nhwc(x: te.Tensor, rows: int, cols: int, pad_top: int, pad_left: int) -> te.Tensor:
    """Zero-padded NHWC copy ``[N, rows, cols, C]`` of an NCHW input (block ``conv_pad``).

    Lowering from it copies runs of ``C`` (for stride 1: ``kw * C``) contiguous floats with
    no bounds test; lowering straight from NCHW gathers one float per input plane instead,
    which made the lowering of VGG-19's first layers cost as much as their GEMM.
    """
    n, c, h, w = (int(v) for v in x.shape)

    def pad(b, r, col, ch):
        iy, ix = r - pad_top, col - pad_left
        inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
        return tirx.if_then_else(inside, x[b, ch, iy, ix], tirx.const(0, x.dtype))

    return te.compute((n, rows, cols, c), pad, name="conv_pad")


def _cast(value: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    # A cast to the same dtype would hide the multiply-add from TVM's op-pattern analysis.
    return value if str(value.dtype) == dtype else value.astype(dtype)


def _tile_attrs(kind: str, tiles: tuple[int, int, int]) -> dict[str, object]:
    return {CONV_GEMM: kind, TILE_W: tiles[0], TILE_VEC: tiles[1], LANES: tiles[2]}


def depthwise_conv2d(
    x: te.Tensor,
    w: te.Tensor,
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    out_dtype: str = "float32",
) -> te.Tensor:
    """Direct depthwise convolution (``groups == C``, weight ``[K, 1, kh, kw]``, K = C * mult).

    A depthwise window has ``kh*kw`` taps: there is no GEMM worth lowering for, so the kernel
    reads a zero-padded copy of the input directly and vectorizes along the output width.
    """
    n, c, h, wd = (int(v) for v in x.shape)
    k, _, kh, kw = (int(v) for v in w.shape)
    mult = k // c
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    pt, pl, pb, pr = (int(v) for v in padding)
    ho = conv_out_size(h, kh, sh, pt, pb, dh)
    wo = conv_out_size(wd, kw, sw, pl, pr, dw)

    def pad(b, ch, r, s):
        iy, ix = r - pt, s - pl
        inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < wd)
        return tirx.if_then_else(inside, x[b, ch, iy, ix], tirx.const(0, x.dtype))

    xp = te.compute((n, c, h + pt + pb, wd + pl + pr), pad, name="dw_pad")
    ri = te.reduce_axis((0, kh), "ri")
    rj = te.reduce_axis((0, kw), "rj")
    return te.compute(
        (n, k, ho, wo),
        lambda b, o, p, q: te.sum(
            _cast(xp[b, o // mult, p * sh + ri * dh, q * sw + rj * dw], out_dtype)
            * _cast(w[o, 0, ri, rj], out_dtype),
            axis=[ri, rj],
        ),
        name="dw_conv",
        attrs={DEPTHWISE: 1},
    )


def pack_weight(w: np.ndarray, groups: int, panel: int) -> np.ndarray:
    """OIHW ``[K, C/G, kh, kw]`` -> GEMM panels ``[G, Kp/panel, kh, kw, C/G, panel]`` (numpy).

    ``Kp`` is ``K/G`` rounded up to a multiple of ``panel``; the extra channels are zeros.
    """
    k, cg, kh, kw = w.shape
    kg = k // groups
    kg_pad = math.ceil(kg / panel) * panel
    grouped = np.zeros((groups, kg_pad, cg, kh, kw), dtype=w.dtype)
    grouped[:, :kg] = w.reshape(groups, kg, cg, kh, kw)
    return np.ascontiguousarray(
        grouped.reshape(groups, kg_pad // panel, panel, cg, kh, kw).transpose(0, 1, 4, 5, 3, 2)
    )


def pack_weight_te(w: te.Tensor, groups: int, panel: int) -> te.Tensor:
    """The same layout change as :func:`pack_weight`, for weights that are not constants."""
    k, cg, kh, kw = (int(v) for v in w.shape)
    kg = k // groups
    kg_pad = math.ceil(kg / panel) * panel

    def pick(g, o, i, j, c, v):
        kk = o * panel + v
        inside = kk < kg
        safe = tirx.if_then_else(inside, kk, 0)
        return tirx.if_then_else(inside, w[g * kg + safe, c, i, j], tirx.const(0, w.dtype))

    return te.compute((groups, kg_pad // panel, kh, kw, cg, panel), pick, name="w_pack")


def _gemm_weight_dims(wk: te.Tensor) -> tuple[int, int, int, int, int]:
    """``(groups, K/G, kh, kw, C/G)`` of a weight in :func:`pack_weight`'s layout."""
    groups, panels, kh, kw, cg, panel = (int(v) for v in wk.shape)
    return groups, panels * panel, kh, kw, cg


def gemm_weight(
    wk: te.Tensor,
    g: tirx.PrimExpr,
    kk: tirx.PrimExpr,
    i: tirx.PrimExpr,
    j: tirx.PrimExpr,
    c: tirx.PrimExpr,
) -> tirx.PrimExpr:
    """Element ``W[g*K/G + kk, c, i, j]`` of a weight in :func:`pack_weight`'s layout."""
    panel = int(wk.shape[5])
    return wk[g, kk // panel, i, j, c, kk % panel]


# ----------------------------------------------------------------------------- legalization
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


def _is_plain_static_conv(call: relax.Call) -> bool:
    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return False
    shapes = [arg.ty.shape for arg in call.args[:2]]
    return all(s is not None and all(isinstance(d, tirx.IntImm) for d in s.values) for s in shapes)


def _stock_legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    legalize = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")
    return legalize(bb, call)


def _emit_gemm_weight(weight: relax.Expr, groups: int, panel: int) -> tuple[relax.Expr, bool]:
    """The weight in GEMM layout: packed now when it is a constant, else at run time."""
    if isinstance(weight, tvm.ir.expr.Constant):
        return relax.const(pack_weight(weight.value.numpy(), groups, panel)), True
    return weight, False


def legalize_conv2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """Legalize ``relax.nn.conv2d`` with edgecomp's kernels (MEC; direct for depthwise).

    Use as ``LegalizeOps(customize_legalize_map={"relax.nn.conv2d": legalize_conv2d})``.
    Convolutions that are not NCHW/OIHW or not statically shaped keep TVM's own lowering.
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
    if not _is_plain_static_conv(call):
        return _stock_legalize(bb, call)
    strides, padding, dilation, groups, out_dtype = _conv_attrs(call)
    data, weight = call.args[0], call.args[1]
    channels = int(data.ty.shape[1])
    k, cg = (int(v) for v in weight.ty.shape.values[:2])
    if groups > 1 and cg == 1 and groups == channels:
        return bb.call_te(
            depthwise_conv2d,
            data,
            weight,
            strides,
            padding,
            dilation,
            out_dtype,
            primfunc_name_hint="depthwise_conv2d",
        )
    target = Target.current(allow_none=True)
    kw_ = int(weight.ty.shape[3])
    wo = conv_out_size(int(data.ty.shape[3]), kw_, strides[1], padding[1], padding[3], dilation[1])
    kh_ = int(weight.ty.shape[2])
    tiles = _tiles_for(wo, k // groups, target, kh_ * kw_ * cg)
    panel = tiles[1] * tiles[2]
    packed, folded = _emit_gemm_weight(weight, groups, panel)

    def compute(x: te.Tensor, w: te.Tensor) -> te.Tensor:
        wk = w if folded else pack_weight_te(w, groups, panel)
        if kind == "im2col":
            from edgecomp.kernels.im2col_conv import im2col_conv2d

            return im2col_conv2d(x, wk, strides, padding, dilation, tiles, out_dtype, k)
        buffered = kind == "mec-buffer"
        return mec_conv2d(x, wk, strides, padding, dilation, tiles, out_dtype, k, buffered)

    name = "im2col_conv2d" if kind == "im2col" else "mec_conv2d"
    return bb.call_te(compute, data, packed, primfunc_name_hint=name)


# ----------------------------------------------------------------------------- schedules
def find_blocks_with(sch: s_tir.Schedule, key: str) -> list[s_tir.schedule.SBlockRV]:
    """All blocks of ``sch``'s function annotated with ``key`` (in program order)."""
    found = []
    for block in schedules.all_blocks(sch):
        if key in sch.get(block).annotations:
            found.append(block)
    return found


def _ann_int(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, key: str) -> int:
    return int(sch.get(block).annotations[key])


def _buffer_bytes(buf: tirx.Buffer) -> int:
    size = 1
    for d in buf.shape:
        size *= int(d)
    return size * tvm.runtime.DataType(buf.dtype).bits // 8


def _rows_outer(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, panel: int) -> bool:
    """Loop order of the GEMM: output rows outside channel panels, or the other way round.

    Panels outside stream the whole lowered buffer once per panel (``|L| * K / panel``);
    rows outside stream the whole weight once per output row (``|W| * Ho``). Pick the smaller
    stream: early layers (large images, few channels) want rows outside, late layers the
    opposite.
    """
    stmt = sch.get(block)
    lowered = stmt.reads[0].source
    weight = stmt.reads[1].source
    out_rows = int(stmt.iter_vars[1].dom.extent)
    channels = int(stmt.iter_vars[3].dom.extent)
    return _buffer_bytes(weight) * out_rows < _buffer_bytes(lowered) * (channels // panel)


def schedule_conv_gemm_cpu(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, target: Target, tunable: bool = False
) -> None:
    """Register-tiled GEMM over a lowered buffer (MEC or im2col) for LLVM CPU targets.

    Loop nest (outer to inner)::

        parallel(n, p, k_outer)  q_outer  |  ri rj rc  |  q_inner k_vec (unrolled)  lanes (vector)

    (``k_outer`` and ``p`` swap when that streams less memory, see :func:`_rows_outer`).
    ``q_inner x k_vec x lanes`` accumulators stay in registers (a ``local`` cache) and are
    stored per tile into a row buffer ``[Wo, k_vec * lanes]`` (contiguous vector stores);
    the transpose to NCHW, with any fused epilogue, then runs once per row and panel, writing
    whole output rows. Writing NCHW straight from the register tile touched ``k_vec * lanes``
    output planes per tile and made small-reduction layers (VGG conv1_1) 10x slower.

    With ``tunable`` the register tile (columns, vectors) is sampled with
    ``sample_perfect_tile`` within the padded width, for MetaSchedule to search.
    """
    tile_w = _ann_int(sch, block, TILE_W)
    n_vec = _ann_int(sch, block, TILE_VEC)
    lanes = _ann_int(sch, block, LANES)
    producers = list(sch.get_producers(block))
    rows_outer = _rows_outer(sch, block, n_vec * lanes)
    write_back = sch.cache_write(block, 0, "local")
    out_block = sch.get_consumers(write_back)[0]
    out_block = schedules.inline_epilogues(sch, out_block)

    b, p, q, k, ri, rj, rc = sch.get_loops(block)
    if tunable:
        q_o, q_i = sch.split(q, sch.sample_perfect_tile(q, n=2, max_innermost_factor=16))
        k_rest, k_l = sch.split(k, [None, lanes])
        k_o, k_v = sch.split(k_rest, sch.sample_perfect_tile(k_rest, n=2, max_innermost_factor=4))
    else:
        q_o, q_i = sch.split(q, [None, tile_w])
        k_o, k_v, k_l = sch.split(k, [None, n_vec, lanes])
    outer = [b, p, k_o] if rows_outer else [b, k_o, p]
    sch.reorder(*outer, q_o, ri, rj, rc, q_i, k_v, k_l)
    sch.reverse_compute_at(write_back, q_o)
    # Parallelize before decompose_reduction: TVM only parallelizes loops over complete or
    # (init-carrying) reduction blocks.
    fused = sch.fuse(*outer)
    sch.parallel(fused)
    try:
        sch.reverse_compute_at(out_block, fused)
    except (ScheduleError, ValueError):
        # Channel padding inside groups makes `out`'s index non-affine (TVM then fails its
        # region analysis with a ValueError): `out` runs after the whole GEMM instead.
        pass
    sch.unroll(q_i)
    sch.unroll(k_v)
    if lanes > 1:
        sch.vectorize(k_l)
        sch.vectorize(sch.split(sch.get_loops(write_back)[-1], [None, lanes])[1])
    init = sch.decompose_reduction(block, ri)
    if lanes > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    in_place = str(sch.get(block).annotations[CONV_GEMM]) == "mec"
    for producer in producers:
        if in_place and sch.get(producer).name_hint == "mec_lower":
            pads = sch.get_producers(producer)
            sch.compute_inline(producer)  # the GEMM reads L's windows from the padded copy
            producers.extend(pads)
        elif sch.get(producer).name_hint == "conv_pad":
            schedule_padding_cpu(sch, producer)
        else:
            schedule_lowering_cpu(sch, producer, lanes)
    schedules.schedule_leftovers(sch, target)


def schedule_padding_cpu(sch: s_tir.Schedule, pad: s_tir.schedule.SBlockRV) -> None:
    """``conv_pad`` is a transpose (input columns -> channels): it goes in 8 x 8 tiles, so that
    both its reads and its writes are whole 32-byte runs."""
    b, r, col, ch = sch.get_loops(pad)
    n_col, n_ch = int(sch.get(col).extent), int(sch.get(ch).extent)
    tq = next((t for t in (8, 4, 2) if n_col % t == 0), 1)
    tc = next((t for t in (8, 4) if n_ch % t == 0), 1)
    col_o, col_i = sch.split(col, [None, tq])
    c_o, c_i = sch.split(ch, [None, tc])
    sch.reorder(b, r, col_o, c_o, col_i, c_i)
    sch.parallel(sch.fuse(b, r))
    sch.unroll(col_i)
    sch.unroll(c_i)


def schedule_lowering_cpu(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> None:
    """A materialized lowering (MEC buffer, im2col) copies channel runs (vectorized) in
    parallel; its padded input first."""
    for pad in sch.get_producers(block):
        if sch.get(pad).name_hint == "conv_pad":
            schedule_padding_cpu(sch, pad)
    *outer, ch = sch.get_loops(block)
    n_ch = int(sch.get(ch).extent)
    sch.parallel(sch.fuse(*outer[:-1]) if len(outer) > 2 else outer[0])
    if n_ch % lanes == 0:
        sch.vectorize(sch.split(ch, [None, lanes])[1])


def schedule_conv_gemm_gpu(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, target: Target
) -> None:
    """One GPU thread per ``tile_w`` columns x ``lanes`` channels of one output row.

    The threads of one row and 16-thread channel group are cut into work groups of at most
    the target's ``max_num_threads`` (256 on Mali); each thread keeps its ``tile_w x lanes``
    accumulators in registers and writes them, with the fused epilogue, itself.
    """
    tile_w = _ann_int(sch, block, TILE_W)
    lanes = _ann_int(sch, block, LANES)
    producers = sch.get_producers(block)
    write_back = sch.cache_write(block, 0, "local")
    out_block = sch.get_consumers(write_back)[0]
    sch.compute_inline(write_back)
    out_block = schedules.inline_epilogues(sch, out_block)

    b, p, q, k, ri, rj, rc = sch.get_loops(block)
    q_o, q_i = sch.split(q, [None, tile_w])
    channels = int(sch.get(k).extent)
    group = next(g for g in (16, 8, 4, 2, 1) if channels % (g * lanes) == 0)
    k_o, k_t, k_l = sch.split(k, [None, group, lanes])
    sch.reorder(b, p, k_o, q_o, k_t, ri, rj, rc, q_i, k_l)
    threads = sch.fuse(q_o, k_t)
    n_threads = int(sch.get(threads).extent)
    per_group = max(d for d in range(1, schedules.gpu_threads(target) + 1) if n_threads % d == 0)
    t_o, t_i = sch.split(threads, [None, per_group])
    sch.reverse_compute_at(out_block, t_i)
    sch.bind(sch.fuse(b, p, k_o, t_o), "blockIdx.x")
    sch.bind(t_i, "threadIdx.x")
    sch.unroll(q_i)
    sch.unroll(k_l)
    sch.decompose_reduction(block, ri)
    for producer in producers:
        schedules.schedule_spatial_block_gpu(sch, producer, target)
    schedules.schedule_leftovers(sch, target)


def schedule_depthwise_cpu(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, target: Target
) -> None:
    """Direct depthwise: padding inlined, parallel over (n, k, p), vector over the width."""
    lanes = cpu_info(target).lanes
    for producer in sch.get_producers(block):
        if sch.get(producer).name_hint.startswith("dw_pad"):
            sch.compute_inline(producer)
    write_back = sch.cache_write(block, 0, "local")
    write_back = schedules.inline_epilogues(sch, write_back)
    b, o, p, q, ri, rj = sch.get_loops(block)
    wo = int(sch.get(q).extent)
    tile = lanes if wo >= lanes else 1
    q_o, q_i = sch.split(q, [None, tile])
    sch.reorder(b, o, p, q_o, ri, rj, q_i)
    sch.reverse_compute_at(write_back, q_o)
    sch.parallel(sch.fuse(b, o, p))
    sch.decompose_reduction(block, ri)
    schedules.schedule_leftovers(sch, target)


def schedule_depthwise_gpu(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, target: Target
) -> None:
    """Direct depthwise on a GPU: one thread per output pixel."""
    for producer in sch.get_producers(block):
        if sch.get(producer).name_hint.startswith("dw_pad"):
            sch.compute_inline(producer)
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


class ConvSchedule(ScheduleRule):
    """Schedule rule for edgecomp's convolutions (MEC, im2col and depthwise prim funcs).

    Claims a function when one of its blocks carries the ``edgecomp.conv_gemm`` or
    ``edgecomp.depthwise`` annotation set by this module's computes; returns None otherwise.
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
        elif gemms:
            schedule_conv_gemm_cpu(sch, gemms[0], target, tunable)
        else:
            (schedule_depthwise_gpu if gpu else schedule_depthwise_cpu)(sch, depthwise[0], target)
        return sch
