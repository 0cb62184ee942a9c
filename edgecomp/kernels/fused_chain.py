"""Re-fused factor chains (T1000): one TE compute per CP / Tucker-2 / GKPD chain, and its schedule.

``DecomposeConv`` replaces a dense convolution by a chain of small convolutions. Run as separate
operators, that chain writes every intermediate map at full size (T1000's complaint: memory grows
although FLOPs fall). Here the whole chain is one TE compute; :class:`FusedChainRule` schedules it
tile by tile: for each tile of output rows (in parallel), the intermediates exist only for the
rows the tile needs (with the halo of the kh taps / dilation / stride), in tile-sized buffers.
CP and Tucker-2 computes carry the tile as an explicit axis (:func:`cp_te`), so each tile's input
window is a contiguous run of input rows and both 1x1 projections are GEMMs along a tile's flat
pixels, register-tiled like MEC's (:func:`register_tile`); their output is ``[N, K, Ho*Wo]``,
viewed as NCHW by a reshape. GKPD keeps row tiles over rank blocks (:func:`schedule_gkpd_cpu`).

Weights are taken in the layouts of the ``relax.nn.conv2d`` ops of the chain (OIHW), so the
re-fusion pass can hand the chain's constants over unchanged:

- CP rank R: ``w_in [R, C, 1, 1]``, ``w_v [R, 1, kh, 1]``, ``w_h [R, 1, 1, kw]``,
  ``w_out [K, R, 1, 1]``.
- Tucker-2: ``w_in [R3, C, 1, 1]``, ``w_core [R4, R3, kh, kw]``, ``w_out [K, R4, 1, 1]``.
- GKPD rank R: ``a [R, K1, C1, kh1, kw1]`` and ``b [R, K2, C2, kh2, kw2]`` (the Kronecker
  factors; see :func:`gkpd_te`).

Legalization (:class:`LegalizeFusedChains`, phase 3 of ``pipeline.lower``) turns each call of a
fused chain's composite function (what ``RefuseChains`` chose to fuse) into a ``call_tir`` of its
kernel, with the tiling :func:`~.chain_memory.choose_tiles` picks for the target.

Every PrimFunc made here (:func:`emit_fused_chain`) carries the function attributes
``edgecomp.fused_chain`` (``"cp"``, ``"tucker2"`` or ``"gkpd"``), ``edgecomp.tile_rows`` and
``edgecomp.rank_block`` (the tiling :func:`choose_tiles` picked); :class:`FusedChainRule`
recognises its functions by the first and returns None for everything else.

The chain's description is :mod:`.chain_spec`; its memory model and tiling choice
:mod:`.chain_memory`; this module holds the TE computes, their emission, the schedules and the
rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import tvm
from tvm import relax, s_tir, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from edgecomp.kernels.chain_memory import (
    TILE_BUDGET_BYTES,
    UNROLL_C,
    VECTORS_PER_ROW,
    choose_tiles,
    divisor,
    tile_rows,
    tile_rows_in,
)
from edgecomp.kernels.chain_spec import (
    ATTR_KIND,
    ATTR_RANK_BLOCK,
    ATTR_TILE_ROWS,
    BIAS,
    COMPOSITE,
    FUSED,
    MID,
    PROJ_IN,
    PROJ_OUT,
    SPEC_ATTR,
    ChainSpec,
    ConvGeometry,
    pad_ranks,
)
from edgecomp.kernels.schedules import choice_knob, divisors, tile_knob
from edgecomp.kernels.target_info import CpuInfo, cpu_info, num_cores


def _padded(t: te.Tensor, pads: tuple[int, int, int, int], name: str) -> te.Tensor:
    """Zero-padded view of an NCHW tensor; the schedule inlines it, so no buffer is made."""
    pt, pl, pb, pr = pads
    if pt == pl == pb == pr == 0:
        return t
    n, c, h, w = (int(d) for d in t.shape)

    def value(b, ch, y, x):
        inside = tirx.all(y >= pt, y < h + pt, x >= pl, x < w + pl)
        return tirx.if_then_else(inside, t[b, ch, y - pt, x - pl], tirx.const(0.0, t.dtype))

    return te.compute((n, c, h + pt + pb, w + pl + pr), value, name=name)


def _tile_start(yt: tirx.PrimExpr, spec: ChainSpec, rows: int) -> tirx.PrimExpr:
    """First input row of tile ``yt``'s input window, shifted inside the map at its borders.

    The window holds :func:`tile_rows_in` rows; moved to stay inside ``[0, H)`` it still holds
    every valid row the tile reads (the rows it loses are padding, which read zero).
    """
    h = spec.in_shape[2]
    pt = spec.geom.padding[0]
    start = yt * (rows * spec.geom.strides[0]) - pt
    return tirx.max(tirx.min(start, h - tile_rows_in(spec, rows)), 0)


def _proj_in(x: te.Tensor, w_in: te.Tensor, spec: ChainSpec, rows: int) -> te.Tensor:
    """The input 1x1 projection C -> R of each tile's input window, ``[N, tiles, R, rows_in*W]``.

    The window's rows are contiguous in the input and in the result, so the pixels of a tile
    are one flat axis: the GEMM vectorizes along it whatever the map's width.
    """
    n, c, h, w = (int(d) for d in x.shape)
    rows_in = tile_rows_in(spec, rows)
    rc = te.reduce_axis((0, c), name="rc")
    return te.compute(
        (n, spec.out_hw[0] // rows, int(w_in.shape[0]), rows_in * w),
        lambda b, yt, ch, q: te.sum(
            x[b, rc, _tile_start(yt, spec, rows) + q // w, q % w] * w_in[ch, rc, 0, 0], axis=rc
        ),
        name=PROJ_IN,
    )


def _window_tap(
    t1: te.Tensor, spec: ChainSpec, rows: int, idx: tuple, row: tirx.PrimExpr, col: tirx.PrimExpr
) -> tirx.PrimExpr:
    """``t1``'s value at input ``(row, col)`` (zero in the padding) for tile ``idx = (b, yt, ch)``.

    The row offset inside the window is taken modulo its height: the same value for every
    valid row, an in-bounds index for padding rows (masked anyway), and a region TVM's
    ``compute_at`` bounds by the window without further analysis.
    """
    b, yt, ch = idx
    _, _, h, w = spec.in_shape
    rows_in = tile_rows_in(spec, rows)
    inside = tirx.all(row >= 0, row < h, col >= 0, col < w)
    offset = tirx.floormod(row - _tile_start(yt, spec, rows), rows_in)
    return tirx.if_then_else(inside, t1[b, yt, ch, offset * w + col], tirx.const(0.0, "float32"))


def _proj_out(
    mid: te.Tensor, w_out: te.Tensor, bias: te.Tensor | None, relu: bool = False
) -> te.Tensor:
    """The output 1x1 projection R -> K (+ bias, + ReLU), written as ``[N, K, Ho*Wo]``.

    ``mid`` is ``[N, tiles, R, rows, Wo]``; a tile's ``rows * Wo`` output pixels are contiguous in
    the flat output, so the projection vectorizes along them like :func:`_proj_in`.
    """
    n, tiles, r, rows, wo = (int(d) for d in mid.shape)
    k, tp = int(w_out.shape[0]), rows * wo
    rr = te.reduce_axis((0, r), name="rr")
    acc = te.compute(
        (n, k, tiles * tp),
        lambda b, kk, p: te.sum(
            mid[b, p // tp, rr, p % tp // wo, p % wo] * w_out[kk, rr, 0, 0], axis=rr
        ),
        name=PROJ_OUT,
    )
    if bias is None:
        return acc

    def biased(b: tirx.PrimExpr, kk: tirx.PrimExpr, p: tirx.PrimExpr) -> tirx.PrimExpr:
        value = acc[b, kk, p] + bias[kk]
        return tirx.max(value, tirx.const(0.0, "float32")) if relu else value

    return te.compute((n, k, tiles * tp), biased, name=BIAS)


def cp_te(
    x: te.Tensor,
    w_in: te.Tensor,
    w_v: te.Tensor,
    w_h: te.Tensor,
    w_out: te.Tensor,
    bias: te.Tensor | None,
    spec: ChainSpec,
    rows: int,
) -> te.Tensor:
    """The CP chain 1x1 (C->R), dw kh x 1, dw 1 x kw, 1x1 (R->K) (+ bias), tile by tile.

    For each tile of ``rows`` output rows: the input projection of its input window, both
    depthwise filters as one ``kh x kw`` rank-1 filter per rank (stride, padding and dilation of
    the dense convolution), then the output projection. Output ``[N, K, Ho*Wo]``.
    """
    n, _, h, w = (int(d) for d in x.shape)
    r, kh, kw = int(w_in.shape[0]), int(w_v.shape[2]), int(w_h.shape[3])
    (sh, sw), (pt, pl, _, _), (dh, dw) = spec.geom.strides, spec.geom.padding, spec.geom.dilation
    ho, wo = spec.out_hw
    t1 = _proj_in(x, w_in, spec, rows)
    ri = te.reduce_axis((0, kh), name="ri")
    rj = te.reduce_axis((0, kw), name="rj")

    def depthwise(b, yt, ch, yy, xo):
        row = (yt * rows + yy) * sh + ri * dh - pt
        col = xo * sw + rj * dw - pl
        tap = _window_tap(t1, spec, rows, (b, yt, ch), row, col)
        return te.sum(tap * (w_v[ch, 0, ri, 0] * w_h[ch, 0, 0, rj]), axis=[ri, rj])

    mid = te.compute((n, ho // rows, r, rows, wo), depthwise, name=MID[0])
    return _proj_out(mid, w_out, bias, spec.relu)


def tucker2_te(
    x: te.Tensor,
    w_in: te.Tensor,
    w_core: te.Tensor,
    w_out: te.Tensor,
    bias: te.Tensor | None,
    spec: ChainSpec,
    rows: int,
) -> te.Tensor:
    """The Tucker-2 chain 1x1 (C->R3), kh x kw core (R3->R4), 1x1 (R4->K) (+ bias), tile by tile.

    As :func:`cp_te`, with the core convolution between the projections. Output
    ``[N, K, Ho*Wo]``.
    """
    n, _, h, w = (int(d) for d in x.shape)
    r3, r4 = int(w_core.shape[1]), int(w_core.shape[0])
    kh, kw = int(w_core.shape[2]), int(w_core.shape[3])
    (sh, sw), (pt, pl, _, _), (dh, dw) = spec.geom.strides, spec.geom.padding, spec.geom.dilation
    ho, wo = spec.out_hw
    t1 = _proj_in(x, w_in, spec, rows)
    rc = te.reduce_axis((0, r3), name="rc")
    ri = te.reduce_axis((0, kh), name="ri")
    rj = te.reduce_axis((0, kw), name="rj")

    def core(b, yt, ch, yy, xo):
        row = (yt * rows + yy) * sh + ri * dh - pt
        col = xo * sw + rj * dw - pl
        tap = _window_tap(t1, spec, rows, (b, yt, rc), row, col)
        return te.sum(tap * w_core[ch, rc, ri, rj], axis=[rc, ri, rj])

    mid = te.compute((n, ho // rows, r4, rows, wo), core, name=MID[1])
    return _proj_out(mid, w_out, bias, spec.relu)


def gkpd_te(
    x: te.Tensor,
    a: te.Tensor,
    b: te.Tensor,
    bias: te.Tensor | None,
    geom: ConvGeometry,
) -> te.Tensor:
    """The GKPD chain ``sum_r A_r (x) B_r`` applied as a B-conv then an A-conv, as one compute.

    With ``c = c1*C2 + c2``, ``k = k1*K2 + k2``, ``i = i1*kh2 + i2`` and ``j = j1*kw2 + j2``:

    - ``z[r, k2, c1, y, x] =
      sum_{c2,i2,j2} B[r,k2,c2,i2,j2] * xpad[c1*C2 + c2, y + i2*dh, x + j2*dw]``
      (the B conv: stride 1, over channel groups, on the padded input);
    - ``out[k1*K2 + k2, y, x] =
      sum_{r,c1,i1,j1} A[r,k1,c1,i1,j1] * z[r,k2,c1, y*sh + i1*kh2*dh, x*sw + j1*kw2*dw]``
      (the A conv: dilation = B's spatial size times the original dilation, original stride).
    """
    n, _, h, w = (int(d) for d in x.shape)
    rank, k1, c1, kh1, kw1 = (int(d) for d in a.shape)
    _, k2, c2, kh2, kw2 = (int(d) for d in b.shape)
    sh, sw = geom.strides
    dh, dw = geom.dilation
    ho, wo = geom.out_size(h, w, kh1 * kh2, kw1 * kw2)
    xp = _padded(x, geom.padding, "fc_pad")
    hz = int(xp.shape[2]) - dh * (kh2 - 1)
    wz = int(xp.shape[3]) - dw * (kw2 - 1)
    rc2 = te.reduce_axis((0, c2), name="rc2")
    ri2 = te.reduce_axis((0, kh2), name="ri2")
    rj2 = te.reduce_axis((0, kw2), name="rj2")
    # z is kept 4-D (channels flattened as (r, k2, c1)) so that it tiles like the other chains.
    z = te.compute(
        (n, rank * k2 * c1, hz, wz),
        lambda bb, ch, y, xx: te.sum(
            b[ch // (k2 * c1), ch // c1 % k2, rc2, ri2, rj2]
            * xp[bb, ch % c1 * c2 + rc2, y + ri2 * dh, xx + rj2 * dw],
            axis=[rc2, ri2, rj2],
        ),
        name=PROJ_IN,
    )
    # With a bias, rank R (one past the last) contributes bias[k] once (see _proj_out).
    rr = te.reduce_axis((0, rank + (bias is not None)), name="rr")
    rc1 = te.reduce_axis((0, c1), name="rc1")
    ri1 = te.reduce_axis((0, kh1), name="ri1")
    rj1 = te.reduce_axis((0, kw1), name="rj1")

    def value(bb, k, y, xx):
        term = (
            a[rr, k // k2, rc1, ri1, rj1]
            * z[
                bb, (rr * k2 + k % k2) * c1 + rc1, y * sh + ri1 * kh2 * dh, xx * sw + rj1 * kw2 * dw
            ]
        )
        if bias is None:
            return term
        first = tirx.all(rc1 == 0, ri1 == 0, rj1 == 0)
        zero = tirx.const(0.0, "float32")
        return tirx.if_then_else(rr < rank, term, tirx.if_then_else(first, bias[k], zero))

    return te.compute(
        (n, k1 * k2, ho, wo),
        lambda bb, k, y, xx: te.sum(value(bb, k, y, xx), axis=[rr, rc1, ri1, rj1]),
        name=PROJ_OUT,
    )


# TVM's op-pattern kind "opaque": FuseOps then never merges the fused chain with its neighbours,
# so the PrimFunc keeps its attributes and block names for FusedChainRule.
_OPAQUE = 8


def fused_chain_te(
    spec: ChainSpec, x: te.Tensor, *weights_and_bias: te.Tensor, rows: int = 1
) -> te.Tensor:
    """The fused compute of ``spec`` for tiles of ``rows`` output rows (a divisor of Ho).

    Arguments: the input, the weights as in the module docstring, then the bias (if any).
    CP and Tucker-2 return ``[N, K, Ho*Wo]`` (see :func:`emit_fused_chain`), GKPD NCHW.
    """
    weights = list(weights_and_bias)
    bias = weights.pop() if spec.bias else None
    if spec.kind == "cp":
        w_in, w_v, w_h, w_out = weights
        return cp_te(x, w_in, w_v, w_h, w_out, bias, spec, rows)
    if spec.kind == "tucker2":
        w_in, w_core, w_out = weights
        return tucker2_te(x, w_in, w_core, w_out, bias, spec, rows)
    a, b = weights
    return gkpd_te(x, a, b, bias, spec.geom)


def emit_fused_chain(
    bb: relax.BlockBuilder,
    spec: ChainSpec,
    data: relax.Expr,
    weights: list[relax.Expr],
    bias: relax.Expr | None,
    rows: int,
    rank_block: int,
) -> relax.Expr:
    """A ``call_tir`` to the fused kernel of ``spec`` (its PrimFunc added to ``bb``'s module).

    The PrimFunc carries ``edgecomp.fused_chain`` = kind, the tile rows and the rank block, which
    :class:`FusedChainRule` reads when it schedules it.
    """
    args = [data, *weights] + ([bias] if bias is not None else [])
    if spec.kind != "gkpd":
        rows = tile_rows(spec, rows)

    def compute(x: te.Tensor, *rest: te.Tensor) -> te.Tensor:  # call_te takes no dataclasses
        return fused_chain_te(spec, x, *rest, rows=rows)

    out = bb.call_te(
        compute,
        *args,
        primfunc_name_hint=f"fused_{spec.kind}_chain",
        primfunc_attrs={
            ATTR_KIND: spec.kind,
            ATTR_TILE_ROWS: rows,
            ATTR_RANK_BLOCK: rank_block,
            "op_pattern": _OPAQUE,
        },
    )
    if spec.kind == "gkpd":
        return out
    # The flat [N, K, Ho*Wo] output as NCHW: a view (TVM's RewriteDataflowReshape), no copy.
    return bb.emit(relax.op.reshape(out, (spec.in_shape[0], spec.out_channels, *spec.out_hw)))


def _fused_spec(mod: tvm.IRModule, call: relax.Expr) -> ChainSpec | None:
    """The spec of a call of a fused chain's composite function, else None."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.GlobalVar)):
        return None
    func = mod[call.op] if call.op in mod.get_global_vars() else None
    attrs = func.attrs if isinstance(func, relax.Function) else None
    if attrs is None or not str(attrs.get(COMPOSITE, "")).startswith(FUSED):
        return None
    spec = ChainSpec.from_json(str(attrs[SPEC_ATTR]))
    shape = tuple(int(d) for d in call.args[0].ty.shape.values)
    return replace(spec, in_shape=shape)  # type: ignore[arg-type]


@mutator
class _ChainLegalizer(PyExprMutator):  # type: ignore[misc]
    def __init__(self, mod: tvm.IRModule, threads: int, lanes: int, budget: int) -> None:
        super().__init__(mod)
        self.mod, self.threads, self.lanes, self.budget = mod, threads, lanes, budget

    def visit_call_(self, op: relax.Call) -> relax.Expr:
        spec = _fused_spec(self.mod, op)
        if spec is None:
            return super().visit_call_(op)
        args = [a.value.numpy() for a in op.args[1:]]
        bias = relax.const(args.pop()) if spec.bias else None
        spec, weights = pad_ranks(spec, args)
        rows, rank_block = choose_tiles(spec, self.threads, self.lanes, budget=self.budget)
        data = self.visit_expr(op.args[0])
        consts = [relax.const(w) for w in weights]
        return emit_fused_chain(self.builder_, spec, data, consts, bias, rows, rank_block)


@tvm.transform.module_pass(opt_level=0, name="LegalizeFusedChains")
class LegalizeFusedChains:
    """Each call of a fused chain's composite function becomes a ``call_tir`` of its kernel.

    ``target`` (default: the current one): its ``num-cores`` sets how many tiles run at once,
    which the tile choice balances, and its L2 share the per-thread tile budget.
    """

    def __init__(self, target: Target | None = None) -> None:
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """Rewrite every Relax function that calls a fused chain; drop the composites."""
        target = self.target or Target.current(allow_none=True)
        threads = max(1, num_cores(target)) if target is not None else 1
        info = cpu_info(target)
        # Per-thread tile budget: the L2 share the target table gives a core's working set, if
        # larger than the default. On the x86 host (640 KiB) it lets 56 x 56 chains run as one
        # whole-map tile, whose input projection vectorizes over rows x columns instead of 56
        # columns, and 112 x 112 chains use 28-row tiles: VGG conv3 chain 0.47x -> 0.67x of
        # unfused, conv2 0.64x -> 0.73x (bench/fused_vs_unfused.py, 2 threads); memory saved
        # per layer still >= 95%. 224 x 224 layers get bigger tiles with no measurable change.
        budget = max(TILE_BUDGET_BYTES, info.panel_bytes)
        changed = False
        # A shallow copy: ``mod[gvar] = ...`` below writes in place, and the caller's module
        # (compile's decomposed module, which its report lowers again) must stay as it was.
        mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function) or (func.attrs and COMPOSITE in func.attrs):
                continue
            calls = relax.analysis.get_var2val(func).values()
            if not any(_fused_spec(mod, c) is not None for c in calls):
                continue
            legalizer = _ChainLegalizer(mod, threads, info.lanes, budget)
            new_func = legalizer.visit_expr(func)
            mod = legalizer.builder_.get()
            mod[gvar] = new_func
            changed = True
        return relax.transform.DeadCodeElimination()(mod) if changed else mod


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


def vector_lanes(target: Target) -> int:
    """float32 lanes of the target's SIMD registers (edgecomp's shared target table)."""
    return cpu_info(target).lanes


PAD_BLOCKS = ("fc_pad", "fc_pad_v", "fc_pad_h")


def _block_names(sch: s_tir.Schedule) -> list[str]:
    """The stage blocks of a fused chain present in ``sch`` (a chain has no bias, or no pads)."""
    names = []
    for name in (PROJ_IN, *MID, PROJ_OUT, BIAS, *PAD_BLOCKS):
        try:
            sch.get_sblock(name)
        except Exception:  # noqa: BLE001 - the schedule raises a bare TVM error for a missing block
            continue
        names.append(name)
    return names


def _roles(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, outer: int) -> dict[int, object]:
    """Map each loop below the first ``outer`` loops of ``block`` to the block iter it drives.

    The computes here all have iters ``(n, channel, row, column, *reductions)``; compute_at drops
    loops of extent 1, so loops are found by what they bind, not by their position.
    """
    loops = list(sch.get_loops(block))[outer:]
    realize = sch.get(sch.get_loops(block)[-1]).body
    roles: dict[int, object] = {}
    for loop in loops:
        var = sch.get(loop).loop_var
        for idx, value in enumerate(realize.iter_values):
            if any(v.same_as(var) for v in tirx.analysis.undefined_vars(value)):
                roles.setdefault(idx, loop)
                break
    return roles


def _schedule_stage(
    sch: s_tir.Schedule,
    block: s_tir.schedule.SBlockRV,
    outer: int,
    lanes: int,
    unroll_c: int = UNROLL_C,
    decompose: bool = True,
    fuse_rows: bool = False,
    parallel: bool = False,
) -> None:
    """Register-block one stage below its tile loops: channels by ``unroll_c``, columns by lanes.

    The innermost loops become (channel block, unrolled) x (columns, vectorized), below the
    reduction loops, so each input vector serves several output channels and the accumulators
    stay in registers across the reduction; the init is then hoisted out of the reduction.
    With ``fuse_rows`` the tile's rows and columns become one axis first: right for a stage
    that reads and writes whole rows of the same width (its addresses stay linear), and it lets
    narrow maps (14 columns) still fill the vector lanes.
    """
    roles = _roles(sch, block, outer)
    c, y, x = roles.get(1), roles.get(2), roles.get(3)
    if fuse_rows and y is not None and x is not None:
        x, y = sch.fuse(y, x), None
    red = [roles[i] for i in sorted(roles) if i >= 4]
    xb = divisor(int(sch.get(x).extent), lanes) if x is not None else 1
    if fuse_rows and 1 < xb <= lanes // 2:
        # The output projection on short rows (one vector): twice the channels keep 8
        # accumulators busy (VGG conv4 chain, 28 columns: 44 -> 35 ms on one x86 core). The
        # same for the other stages measured slower (28 columns: 34 -> 47 ms; 56: 12 -> 15 ms).
        unroll_c *= 2
    inner = []
    order = []
    if c is not None:
        cb = divisor(int(sch.get(c).extent), unroll_c)
        if cb > 1:
            c, c_i = sch.split(c, [None, _power_knob(sch, c, cb, 16)])
            inner.append(c_i)
        order.append(c)
    if y is not None:
        order.append(y)
    x_i = None
    if x is not None:
        if xb > 1:
            x, x_i = sch.split(x, [None, _power_knob(sch, x, xb, lanes)])
        order.append(x)
    sch.reorder(*order, *red, *inner, *([x_i] if x_i is not None else []))
    if parallel:  # the outermost channel block: enough chunks, no write conflicts
        sch.parallel(order[0])
    if inner:
        sch.unroll(inner[0])
    # A strided consumer can leave gaps in the rows a stage computes (stride 2 over a 1x1 A
    # factor reads every other row): the bindings are then not affine, and vectorize /
    # decompose_reduction refuse. Both checks run before the IR changes, so the stage simply
    # stays scalar / keeps its init inside: still correct.
    if x_i is not None:
        _try(sch.vectorize, x_i)
    if red and decompose:  # after vectorize: once split off, the update is not a "reduction block"
        _try(sch.decompose_reduction, block, red[0])


def _power_knob(
    sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV, default: int, limit: int
) -> s_tir.schedule.ExprRV:
    """An inner split factor of ``loop``: ``sample_categorical`` over the powers of two up to
    ``limit`` dividing its extent (1 included), default ``default``."""
    extent = int(sch.get(loop).extent)
    powers = [1 << i for i in range(limit.bit_length()) if (1 << i) <= limit]
    return choice_knob(sch, sorted({*(p for p in powers if extent % p == 0), default}), default)


def _try_block(
    primitive: Callable[..., s_tir.schedule.SBlockRV], *args: object
) -> s_tir.schedule.SBlockRV | None:
    try:
        return primitive(*args)
    except s_tir.schedule.ScheduleError:
        return None


def _try(primitive: Callable[..., object], *args: object) -> bool:
    try:
        primitive(*args)
    except s_tir.schedule.ScheduleError:
        return False
    return True


def register_tile(bcast: int, vec: int, lanes: int, registers: int) -> tuple[int, int, int]:
    """The register tile ``(m, n_vec, l)`` of a GEMM stage: ``m x n_vec`` vector accumulators.

    Per reduction step the micro-kernel broadcasts ``m`` weights (``m`` divides ``bcast``, the
    channels it computes) and loads ``n_vec`` vectors of ``l`` pixels (``n_vec * l`` divides
    ``vec``, ``l`` the widest power of two <= ``lanes`` dividing it): no padding, no predicate.
    The cost is that of :func:`edgecomp.kernels.conv_common.choose_tiles` (two FMA and two load
    ports, FMA latency 4 wanting >= 8 accumulators) per useful lane.
    """
    lanes_used = divisor(vec, lanes)
    best: tuple[tuple[float, float], int, int] | None = None
    for n_vec in range(1, 9):
        if (vec // lanes_used) % n_vec:
            continue
        for m in range(1, 17):
            if bcast % m or m * n_vec + n_vec + 1 > registers:
                continue
            step = max(m * n_vec, m + n_vec, 10) / 2.0
            cost = step / (m * n_vec) * lanes / lanes_used
            key = (round(cost, 4), (m + n_vec) / (m * n_vec))
            if best is None or key < best[0]:
                best = (key, m, n_vec)
    assert best is not None  # m = n_vec = 1 always fits
    return best[1], best[2], lanes_used


def _vectors_knob(
    sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV, n_vec: int, lanes: int
) -> s_tir.schedule.ExprRV:
    """Vectors of pixels in a GEMM stage's register tile: ``sample_categorical`` over the
    divisors (up to 8) of the vectors in ``loop``, default ``n_vec``."""
    return choice_knob(sch, divisors(int(sch.get(loop).extent) // lanes, 8), n_vec)


def _gemm_stage(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, info: CpuInfo) -> None:
    """Register-tile a projection whose three innermost loops are (channel, pixel, reduction).

    The ``m x n_vec`` accumulators of :func:`register_tile` live in a ``local`` buffer across
    the whole reduction and are written back once per register tile.
    """
    ch, px, red = sch.get_loops(block)[-3:]
    m, n_vec, lanes = register_tile(
        int(sch.get(ch).extent), int(sch.get(px).extent), info.lanes, info.registers
    )
    ch_o, ch_i = sch.split(ch, tile_knob(sch, ch, m))
    px_o, px_v, px_l = sch.split(px, [None, _vectors_knob(sch, px, n_vec, lanes), lanes])
    sch.reorder(ch_o, px_o, red, ch_i, px_v, px_l)
    out = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(out, px_o, preserve_unit_loops=True)
    if lanes > 1:
        sch.vectorize(sch.split(sch.get_loops(out)[-1], [None, lanes])[1])
    sch.unroll(ch_i)
    sch.unroll(px_v)
    if lanes > 1:
        sch.vectorize(px_l)
    init = sch.decompose_reduction(block, red)
    if lanes > 1:
        sch.vectorize(sch.get_loops(init)[-1])


def schedule_cpu(func: tirx.PrimFunc, target: Target) -> s_tir.Schedule:
    """Schedule a fused chain: tiles of output rows in parallel, intermediates per tile.

    CP / Tucker-2 loop nest (``rows`` = attr ``edgecomp.tile_rows``, ``rb`` =
    ``edgecomp.rank_block``)::

        parallel for each tile of `rows` output rows (over the batch too):
            [Tucker-2: input projection C -> R3 of the tile's input window]
            for each block of `rb` ranks (CP):
                [CP: input projection C -> rb of the tile's input window]
                [depthwise kh x kw / core conv, into the tile's R-channel buffer]
            for each block of m output channels, each run of n_vec x lanes pixels:
                [output projection over all ranks in registers, + bias, stored once]

    Both projections are GEMMs along a tile's flat pixels with register tiles from
    :func:`register_tile`; the middle stage vectorizes along output columns, its padding a
    condition. GKPD chains keep their own schedule (:func:`schedule_gkpd_cpu`).

    Knobs (drawn from the schedule, see :func:`edgecomp.kernels.schedules.tile_knob`; the
    defaults are :func:`register_tile`'s picks; the row tile and rank block stay in the
    compute):

    - ``out_m``: output channels of the output projection's register tile,
      ``sample_perfect_tile`` of K, divisors up to 16; default ``m``.
    - ``out_vec``: pixel vectors of that tile, ``sample_categorical`` over the divisors (up
      to 8) of the tile's vectors; default ``n_vec``.
    - ``mid_vec``: output columns vectorized in the middle stage, ``sample_categorical``
      over the powers of two up to the vector width dividing Wo (1 included); default the
      largest. None when that is 1 (the stage stays scalar).
    - ``in_m``, ``in_vec``: the same as ``out_m``, ``out_vec`` for the input projection
      (channels of its stage, vectors of its window's pixels).

    GKPD chains: see :func:`schedule_gkpd_cpu`.
    """
    if str(func.attrs[ATTR_KIND]) == "gkpd":
        return schedule_gkpd_cpu(func, target)
    info = cpu_info(target)
    sch = s_tir.Schedule(func)
    proj_out = sch.get_sblock(PROJ_OUT)
    bias = sch.get_sblock(BIAS) if BIAS in _block_names(sch) else None
    mid = sch.get_sblock(MID[0] if str(func.attrs[ATTR_KIND]) == "cp" else MID[1])
    proj_in = sch.get_sblock(PROJ_IN)
    mid_iters = sch.get(mid).iter_vars
    tiles, ranks = int(mid_iters[1].dom.extent), int(mid_iters[2].dom.extent)
    rows, wo = int(mid_iters[3].dom.extent), int(mid_iters[4].dom.extent)
    # The output: [N, K, Ho*Wo] split into tiles of rows * Wo pixels, register-tiled.
    out = bias if bias is not None else sch.cache_write(proj_out, 0, "local")
    b, k, p = sch.get_loops(out)
    p_t, p_i = sch.split(p, [tiles, rows * wo])
    m, n_vec, lanes = register_tile(int(sch.get(k).extent), rows * wo, info.lanes, info.registers)
    k_o, k_i = sch.split(k, tile_knob(sch, k, m))
    p_o, p_v, p_l = sch.split(p_i, [None, _vectors_knob(sch, p_i, n_vec, lanes), lanes])
    sch.reorder(b, p_t, k_o, p_o, k_i, p_v, p_l)
    tile = sch.fuse(b, p_t)
    sch.parallel(tile)
    sch.compute_at(proj_out, p_o, preserve_unit_loops=True)
    if bias is not None:
        sch.set_scope(proj_out, 0, "local")
    sch.unroll(k_i)
    sch.unroll(p_v)
    if lanes > 1:
        sch.vectorize(p_l)
    # The projection's loops under p_o: (channel, pixel, rank); pixels in vectors.
    ch, px, rr = sch.get_loops(proj_out)[-3:]
    px_v, px_l = sch.split(px, [None, lanes])
    sch.reorder(rr, ch, px_v, px_l)
    sch.unroll(ch)
    sch.unroll(px_v)
    if lanes > 1:
        sch.vectorize(px_l)
    init = sch.decompose_reduction(proj_out, rr)
    if lanes > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    # The middle stage for the whole tile, vectorized along its output columns.
    sch.compute_at(mid, tile, preserve_unit_loops=True)
    n_red = len(sch.get(mid).iter_vars) - 5
    ch, yy, xo, *red = sch.get_loops(mid)[-(3 + n_red) :]
    rb = min(int(func.attrs.get(ATTR_RANK_BLOCK, ranks)), ranks)
    blocked = str(func.attrs[ATTR_KIND]) == "cp" and rb < ranks
    ch_o, ch = sch.split(ch, [None, rb]) if blocked else (tile, ch)
    col_lanes = divisor(wo, info.lanes)
    vectorized = col_lanes > 1
    if vectorized:
        col_lanes = _power_knob(sch, xo, col_lanes, info.lanes)
    xo_o, xo_l = sch.split(xo, [None, col_lanes])
    sch.reorder(ch, yy, xo_o, *red, xo_l)
    if vectorized:
        sch.vectorize(xo_l)
    sch.decompose_reduction(mid, red[0])
    # The input projection of the window: per rank block (CP) or per tile (Tucker-2).
    sch.compute_at(proj_in, ch_o, preserve_unit_loops=True)
    _gemm_stage(sch, proj_in, info)
    return sch


def schedule_gkpd_cpu(func: tirx.PrimFunc, target: Target) -> s_tir.Schedule:
    """Tile a GKPD chain over output rows and rank blocks, computing intermediates per tile.

    Loop nest (``rows`` = attr ``edgecomp.tile_rows``, ``rb`` = attr ``edgecomp.rank_block``)::

        parallel for each tile of `rows` output rows:
            for each block of `rb` ranks:
                [the rank block's B conv for the tile's rows]
                [A conv, accumulated in the output over the rank blocks; with a bias, the
                 last rank block adds it]

    Each stage is vectorized along its columns. With fewer row tiles than cores each stage's
    outer channel-block loop is parallel instead of the tile loop.

    Knobs, per stage (input then output), where the heuristic splits at all
    (``sample_categorical`` over powers of two dividing the loop, 1 included):

    - ``c_block``: output channels unrolled, up to 16; default the largest power of two up
      to :data:`UNROLL_C` dividing them.
    - ``x_vec``: columns vectorized, up to 2 vectors; default the largest power of two up to
      that dividing them.
    """
    sch = s_tir.Schedule(func)
    names = _block_names(sch)
    lanes = vector_lanes(target) * VECTORS_PER_ROW
    rows = int(func.attrs.get(ATTR_TILE_ROWS, 1))
    for name in names:  # zero padding becomes a condition inside the consumer: no padded copy
        if name in PAD_BLOCKS:
            sch.compute_inline(sch.get_sblock(name))
    proj_out = sch.get_sblock(PROJ_OUT)
    b, k, y, x, *red = sch.get_loops(proj_out)
    y_o, y_i = sch.split(y, [None, rows])
    sch.reorder(b, y_o, k, y_i, x, *red)
    tile = sch.fuse(b, y_o)
    inner_parallel = int(sch.get(tile).extent) < num_cores(target)
    if not inner_parallel:
        sch.parallel(tile)
    roles = _roles(sch, proj_out, 1)
    rank = roles[4]  # the first sum of the output projection runs over the ranks
    rb = int(func.attrs.get(ATTR_RANK_BLOCK, int(sch.get(rank).extent)))
    rank_o, rank_i = sch.split(rank, [None, rb])
    spatial = [roles[i] for i in (1, 2, 3) if i in roles]
    sch.reorder(rank_o, *spatial, rank_i)
    sch.compute_at(sch.get_sblock(PROJ_IN), rank_o)
    _schedule_stage(sch, sch.get_sblock(PROJ_IN), 2, lanes, parallel=inner_parallel)
    _schedule_stage(sch, proj_out, 2, lanes, decompose=False, parallel=inner_parallel)
    # The accumulator is zeroed once per tile, before the first rank block.
    init = _try_block(sch.decompose_reduction, proj_out, rank_o)
    if inner_parallel and init is not None:
        sch.parallel(sch.get_loops(init)[1])
    return sch


def allocated_buffers(func: tirx.PrimFunc) -> dict[str, tuple[int, ...]]:
    """Shapes of the buffers a scheduled PrimFunc allocates, as TVM will allocate them.

    Runs the first lowering steps of TVM's own pipeline (allocation placement and
    ``CompactBufferAllocation``, which shrinks each buffer to the region its loop nest touches)
    and reads every block's ``alloc_buffers`` except register tiles (scope ``local``). This is
    the measured counterpart of :func:`fused_buffers`.
    """
    mod = tvm.IRModule({"main": func})
    mod = tvm.transform.Sequential(
        [
            s_tir.transform.CanonicalizeLoop(),
            s_tir.transform.LowerInitBlock(),
            s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
            s_tir.transform.ConvertBlocksToOpaque(),
            s_tir.transform.CompactBufferAllocation(),
        ]
    )(mod)
    found: dict[str, tuple[int, ...]] = {}
    todo: list[object] = [mod["main"].body]
    while todo:
        node = todo.pop()
        if isinstance(node, s_tir.SBlock):
            for buf in node.alloc_buffers:
                if buf.scope() != "local":  # register tiles are not memory
                    found[buf.name] = tuple(int(d) for d in buf.shape)
        for field in ("body", "block", "then_case", "else_case", "init"):
            child = getattr(node, field, None)
            if child is not None:
                todo.append(child)
        todo.extend(getattr(node, "seq", None) or [])
    return found


class FusedChainRule(ScheduleRule):
    """dlight rule for the fused chains of this module; None for every other function.

    CPU (``llvm``) targets get :func:`schedule_cpu`. GPU targets get None: ``RefuseChains`` leaves
    chains unfused for them (a per-tile GPU schedule needs shared-memory staging not written yet).
    """

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        """Schedule ``func`` if it is a fused chain and the target is a CPU."""
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None:
            return None
        if ATTR_KIND not in func.attrs or target.kind.name != "llvm":
            return None
        return schedule_cpu(func, target)
