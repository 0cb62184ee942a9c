"""The register-tiled GEMM schedule that MEC and im2col convolutions share (CPU and GPU).

The GEMM block ``conv[n, p, q, k]`` (annotated ``edgecomp.conv_gemm`` with its register tile)
is followed by ``out``, the crop to the model's layout with the fused epilogues inlined. The
schedule differs by that layout:

- NHWC (CPUs): the register tile is written straight into the output, epilogue applied, from
  the tile loop: ``conv`` lives only as the tile's accumulators;
- NCHW: the tile is stored into a row buffer ``[Wo, panel]`` and the transpose to NCHW, with
  the epilogue, runs once per row and panel, writing whole output rows.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.target import Target

from edgecomp.kernels import schedules
from edgecomp.kernels.conv_common import CONV_GEMM, LANES, LAYOUT, TILE_VEC, TILE_W
from edgecomp.kernels.schedules import SCHEDULE_ERRORS
from edgecomp.kernels.target_info import cpu_info


def _ann_int(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, key: str) -> int:
    return int(sch.get(block).annotations[key])


def _buffer_bytes(buf: tirx.Buffer) -> int:
    size = 1
    for d in buf.shape:
        size *= int(d)
    return size * tvm.runtime.DataType(buf.dtype).bits // 8


def _rows_outer(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, panel: int, cache_bytes: int
) -> bool:
    """Loop order of the GEMM: output rows outside channel panels, or the other way round.

    Rows outside whenever the whole weight fits in ``cache_bytes`` (the target's weight
    budget, :attr:`CpuInfo.panel_bytes`): reading it again for each row then costs cache
    bandwidth only, and each thread reads only its own rows of the input. (Panels outside had
    each thread read the whole input, half of it written by the other core: 3x3 64->64 @56
    0.95 -> 0.87 ms, 3x3 s2 128->128 @56 1.09 -> 0.89 ms on the AVX-512 host.) Otherwise the
    smaller memory stream: panels outside stream the whole lowered buffer once per panel
    (``|L| * K / panel``), rows outside the whole weight once per output row (``|W| * Ho``).
    """
    stmt = sch.get(block)
    lowered = stmt.reads[0].source
    weight = stmt.reads[1].source
    out_rows = int(stmt.iter_vars[1].dom.extent)
    channels = int(stmt.iter_vars[3].dom.extent)
    if _buffer_bytes(weight) <= cache_bytes:
        return True
    return _buffer_bytes(weight) * out_rows < _buffer_bytes(lowered) * (channels // panel)


def schedule_conv_gemm_cpu(
    sch: s_tir.Schedule,
    block: s_tir.schedule.SBlockRV,
    target: Target,
    tunable: bool = False,
    nested: bool = False,
) -> None:
    """Register-tiled GEMM over a lowered buffer (MEC or im2col) for LLVM CPU targets.

    Loop nest (outer to inner)::

        parallel(n, p, k_outer)  q_outer  |  ri rj rc  |  q_inner k_vec (unrolled)  lanes (vector)

    (``k_outer`` and ``p`` swap when that streams less memory, see :func:`_rows_outer`).
    ``q_inner x k_vec x lanes`` accumulators stay in registers. NHWC: they are written,
    through the fused epilogue, straight into the output under ``q_outer``. NCHW: they are
    stored per tile into a row buffer ``[Wo, k_vec * lanes]`` and the transpose to NCHW, with
    the epilogue, then runs once per row and panel, writing whole output rows (writing NCHW
    straight from the register tile touched ``k_vec * lanes`` output planes per tile and made
    small-reduction layers, VGG conv1_1, 10x slower).

    Knobs (drawn from the schedule, see :func:`schedules.tile_knob`; ``tunable`` or not, the
    default decisions give the same schedule; the width padding ``tile_w`` and the weight
    panel ``n_vec * lanes`` are baked into the compute at legalization):

    - ``q_tile``: output columns of the register tile, ``sample_perfect_tile`` of the padded
      width, divisors up to 16; default ``tile_w``.
    - ``k_vec``: channel vectors of the register tile, ``sample_perfect_tile`` of the
      panel's ``n_vec`` vectors (a tile stays inside one weight panel); default ``n_vec``.
    - ``p_block`` x ``k_block``: output rows x weight panels per block of the parallel loop
      nest, both ``sample_perfect_tile``; default rows outside (every row, one panel block)
      or panels outside, as :func:`_rows_outer` picks.

    ``nested``: the GEMM was moved under a parallel loop of the caller's (Winograd's bands);
    its own outer loops then stay serial. Producers other than the padding and the lowering,
    and blocks left over, are the caller's to schedule.
    """
    tile_w = _ann_int(sch, block, TILE_W)
    n_vec = _ann_int(sch, block, TILE_VEC)
    lanes = _ann_int(sch, block, LANES)
    producers = list(sch.get_producers(block))
    rows_outer = _rows_outer(sch, block, n_vec * lanes, cpu_info(target).panel_bytes)
    out_block = sch.get_consumers(block)[0]
    nhwc = str(sch.get(block).annotations.get(LAYOUT, "NCHW")) == "NHWC"
    write_back = out_block if nhwc else sch.cache_write(block, 0, "local")
    if not nhwc:
        out_block = sch.get_consumers(write_back)[0]
    out_block = schedules.inline_epilogues(sch, out_block)

    b, p, q, k, ri, rj, rc = sch.get_loops(block)[-7:]
    q_o, q_i = sch.split(q, schedules.tile_knob(sch, q, tile_w))
    k_o, k_panel, k_l = sch.split(k, [None, n_vec, lanes])
    k_mid, k_v = sch.split(k_panel, schedules.tile_knob(sch, k_panel, n_vec))
    # Rows x panels blocking: rows outside (p_o = all rows, k_oo = 1) or panels outside
    # (p_o = 1, k_oo = all panels) as the default picks, or any block of rows x panels.
    n_rows, n_panels = (int(sch.get(loop).extent) for loop in (p, k_o))
    p_inner = 1 if rows_outer else n_rows
    k_inner = n_panels if rows_outer else 1
    p_o, p_i = sch.split(p, schedules.tile_knob(sch, p, p_inner, n_rows))
    k_oo, k_oi = sch.split(k_o, schedules.tile_knob(sch, k_o, k_inner, n_panels))
    outer = [b, p_o, k_oo, p_i, k_oi, k_mid]
    sch.reorder(*outer, q_o, ri, rj, rc, q_i, k_v, k_l)
    # Parallelize before decompose_reduction: TVM only parallelizes loops over complete or
    # (init-carrying) reduction blocks.
    fused = sch.fuse(*outer)
    if not nested:
        sch.parallel(fused)
    if nhwc:
        _write_tile_nhwc(sch, block, out_block, q_o, lanes)
    else:
        sch.reverse_compute_at(write_back, q_o, preserve_unit_loops=True)
        try:
            sch.reverse_compute_at(out_block, fused)
        except SCHEDULE_ERRORS:
            # Channel padding inside groups makes `out`'s index non-affine (TVM then fails its
            # region analysis): `out` runs after the whole GEMM instead.
            pass
        schedules.write_tile(sch, write_back, q_o, lanes)
    sch.unroll(q_i)
    sch.unroll(k_v)
    if lanes > 1:
        sch.vectorize(k_l)
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
        elif sch.get(producer).name_hint in ("mec_lower", "im2col_lower"):
            schedule_lowering_cpu(sch, producer, lanes)


def _write_tile_nhwc(
    sch: s_tir.Schedule,
    block: s_tir.schedule.SBlockRV,
    out_block: s_tir.schedule.SBlockRV,
    q_o: s_tir.schedule.LoopRV,
    lanes: int,
) -> None:
    """NHWC: the output (crop + epilogue) is computed per register tile, so ``conv`` is only
    the tile's accumulators; where the crop cannot follow the tile (channels padded inside
    groups), ``out`` runs after the whole GEMM."""
    try:
        sch.reverse_compute_at(out_block, q_o, preserve_unit_loops=True)
    except SCHEDULE_ERRORS:
        return
    sch.set_scope(block, 0, "local")
    schedules.write_tile(sch, out_block, q_o, lanes)


def schedule_padding_cpu(sch: s_tir.Schedule, pad: s_tir.schedule.SBlockRV) -> None:
    """``conv_pad`` from NCHW is a transpose (input columns -> channels): it goes in 8 x 8
    tiles, so that both its reads and its writes are whole 32-byte runs. From NHWC it is a
    copy: parallel over rows, vectorized over channels."""
    b, r, col, ch = sch.get_loops(pad)
    n_col, n_ch = int(sch.get(col).extent), int(sch.get(ch).extent)
    stmt = sch.get(pad)
    source = stmt.reads[0].region if stmt.reads else []
    from_nhwc = len(source) == 4 and _reads_channels_last(stmt)
    if from_nhwc:
        sch.parallel(sch.fuse(b, r))
        if n_ch % 4 == 0:
            sch.vectorize(sch.split(ch, [None, 4 if n_ch % 8 else 8])[1])
        return
    tq = next((t for t in (8, 4, 2) if n_col % t == 0), 1)
    tc = next((t for t in (8, 4) if n_ch % t == 0), 1)
    col_o, col_i = sch.split(col, [None, tq])
    c_o, c_i = sch.split(ch, [None, tc])
    sch.reorder(b, r, col_o, c_o, col_i, c_i)
    sch.parallel(sch.fuse(b, r))
    sch.unroll(col_i)
    sch.unroll(c_i)


def _reads_channels_last(stmt: tirx.stmt.SBlock) -> bool:
    last = stmt.reads[0].region[-1].min
    channel = stmt.iter_vars[3].var
    return isinstance(last, tirx.Var) and last.same_as(channel)


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
