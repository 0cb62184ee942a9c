"""Default schedule rules for everything that is not a convolution, and shared helpers.

Stock TVM 0.27 leaves CPU prim funcs unscheduled (one thread, scalar loops). These rules give
every function edgecomp emits for AlexNet / VGG-19 / small CNNs a reasonable schedule without
tuning:

- :class:`Matmul` - ``relax.matmul`` / ``nn.linear`` after legalization, batch-1 fully
  connected layers above all: memory bound, so the reduction is split over cores (rfactor)
  and each core streams its contiguous block of weight rows into a partial output row in L1.
- :class:`CpuFallback` - any other function: injective producers inlined, then every block gets
  its outer spatial loops parallel and, for injective blocks, its innermost loop vectorized.
  This covers bias + ReLU, pooling, LRN, softmax, reshapes and transposes.
- GPU targets use ``s_tir.dlight.gpu`` rules for these (see ``default_rules``).

The helpers (``inline_epilogues``, ``schedule_leftovers`` ...) are also used by the
convolution rules, which schedule the blocks FuseTIR put next to their GEMM.
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.schedule import ExprRV, LoopRV, SBlockRV, ScheduleError
from tvm.target import Target

from edgecomp.kernels.target_info import cpu_info, is_gpu, num_cores

log = logging.getLogger("edgecomp.schedule")

# What a schedule primitive raises when a function does not fit it: TVM's ScheduleError, a
# ValueError from its region analysis (non-affine indices), or an InternalError (seen:
# reverse_compute_inline on a squeeze-and-excitation block, "Cannot dispatch a null expression").
SCHEDULE_ERRORS = (ScheduleError, ValueError, tvm.error.InternalError)

# Below this many iterations a parallel loop costs more in thread wake-up than it saves.
_MIN_PARALLEL_WORK = 4096


# ----------------------------------------------------------------------------- helpers
def all_blocks(sch: s_tir.Schedule) -> list[SBlockRV]:
    """Every block of the function being scheduled, outer blocks first (root excluded)."""
    root = sch.get_sblock("root")
    out: list[SBlockRV] = []
    todo = list(sch.get_child_blocks(root))
    while todo:
        block = todo.pop(0)
        out.append(block)
        todo.extend(sch.get_child_blocks(block))
    return out


def _is_reduction(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _is_scheduled_loop(sch: s_tir.Schedule, loop: LoopRV) -> bool:
    kind = sch.get(loop).kind
    return kind in (tirx.ForKind.PARALLEL, tirx.ForKind.THREAD_BINDING, tirx.ForKind.VECTORIZED)


def inline_epilogues(sch: s_tir.Schedule, block: SBlockRV) -> SBlockRV:
    """Fold the elementwise consumers of ``block`` into it (bias, ReLU ...), as far as legal.

    Returns the block that now writes the final value (``block`` itself: a reverse-inlined
    consumer disappears into it). An epilogue that reads ``block`` twice (HardSwish's
    ``x * clip(x + 3) / 6``, SiLU's ``x * sigmoid(x)``) first has its side chain inlined
    forward into its last op, which then folds in. Consumers that cannot be inlined (a
    broadcast to a larger map, a reduction such as LRN's window sum) are left for
    :func:`schedule_leftovers`.
    """
    while True:
        consumers = sch.get_consumers(block)
        if not consumers:
            return block
        if len(consumers) == 1:
            try:
                sch.reverse_compute_inline(consumers[0])
                continue
            except SCHEDULE_ERRORS:
                return block
        if not _inline_side_chain(sch, consumers):
            return block


def _inline_side_chain(sch: s_tir.Schedule, consumers: list[SBlockRV]) -> bool:
    """Inline one consumer that feeds other blocks into them; False when none can be."""
    for consumer in consumers:
        if _is_reduction(sch, consumer) or not sch.get_consumers(consumer):
            continue
        try:
            sch.compute_inline(consumer)
            return True
        except SCHEDULE_ERRORS:
            continue
    return False


# ----------------------------------------------------------------------------- knobs
# Every choice a rule makes for a kernel's speed alone is drawn from the schedule itself, with
# today's heuristic pick as the decision: the trace of the schedule is then a MetaSchedule
# design space whose default point is the untuned schedule. The rules never branch in Python
# on a drawn value, so the trace replays with any other decision.
def tile_knob(
    sch: s_tir.Schedule, loop: LoopRV, inner: int, max_inner: int = 16
) -> list[ExprRV | int | None]:
    """Split factors ``[outer, inner]`` of ``loop``: ``sample_perfect_tile`` with ``inner``
    (a divisor of the loop's extent) as its decision, candidates every divisor up to
    ``max(max_inner, inner)``. Where ``inner`` does not divide the extent (a split with a
    tail) the factors are the fixed ``[None, inner]``."""
    extent = sch.get(loop).extent
    if not isinstance(extent, tirx.IntImm) or int(extent) % inner:
        return [None, inner]
    return list(
        sch.sample_perfect_tile(
            loop,
            n=2,
            max_innermost_factor=max(max_inner, inner),
            decision=[int(extent) // inner, inner],
        )
    )


def choice_knob(sch: s_tir.Schedule, candidates: list[int], default: int) -> ExprRV:
    """``sample_categorical`` over ``candidates`` (uniform), ``default`` as its decision."""
    return sch.sample_categorical(
        candidates=list(candidates),
        probs=[1.0 / len(candidates)] * len(candidates),
        decision=list(candidates).index(default),
    )


def divisors(n: int, limit: int) -> list[int]:
    """The divisors of ``n`` up to ``limit``, ascending."""
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def write_tile(sch: s_tir.Schedule, block: SBlockRV, outer: LoopRV, lanes: int) -> None:
    """Schedule the loops of ``block`` (a register tile's write-back) inside ``outer``: the
    innermost split into whole vectors, every other loop unrolled. The accumulators are then
    read at constant indices and stay in registers; one loop left rolled puts them all on the
    stack (MobileNet v2's 1x1 24 -> 144 layer: 0.30 -> 0.25 ms).

    In a design space (see :func:`tile_knob`) this replays with any decision as long as the
    number of ``block``'s loops and whether the innermost extent is a multiple of ``lanes``
    do not depend on it: place ``block`` with ``preserve_unit_loops=True`` and keep the
    innermost extent a drawn count of whole vectors."""
    loops = sch.get_loops(block)
    at = [sch.get(lp).same_as(sch.get(outer)) for lp in loops]
    tile = loops[at.index(True) + 1 :] if True in at else loops
    if not tile:
        return
    inner = tile[-1]
    extent = sch.get(inner).extent
    if lanes > 1 and isinstance(extent, tirx.IntImm) and int(extent) % lanes == 0:
        vectors, vec = sch.split(inner, [None, lanes])
        sch.vectorize(vec)
        tile = [*tile[:-1], vectors]
    for lp in tile:
        sch.unroll(lp)


def try_inline_producers(sch: s_tir.Schedule) -> None:
    """Inline every spatial block whose result feeds others (pads, reshapes, transposes)."""
    changed = True
    while changed:
        changed = False
        for block in all_blocks(sch):
            if _is_reduction(sch, block) or not sch.get_consumers(block):
                continue
            try:
                sch.compute_inline(block)
                changed = True
                break
            except SCHEDULE_ERRORS:
                continue


def schedule_spatial_block(
    sch: s_tir.Schedule, block: SBlockRV, target: Target, vectorize: bool = True
) -> None:
    """Parallel outer loops; vectorize the innermost loop when it splits into whole vectors."""
    loops = sch.get_loops(block)
    if not loops or any(_is_scheduled_loop(sch, lp) for lp in loops):
        return
    lanes = cpu_info(target).lanes
    inner = loops[-1]
    extent = sch.get(inner).extent
    outer = list(loops[:-1])
    if vectorize and isinstance(extent, tirx.IntImm) and int(extent) % lanes == 0:
        if int(extent) > lanes:
            rest, vec = sch.split(inner, [None, lanes])
            outer.append(rest)
            sch.vectorize(vec)
        else:
            sch.vectorize(inner)
    elif not outer:
        outer = [inner]
    if outer:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if _work(sch, block) >= _MIN_PARALLEL_WORK and num_cores(target) > 1:
            sch.parallel(fused)


def _work(sch: s_tir.Schedule, block: SBlockRV) -> int:
    total = 1
    for loop in sch.get_loops(block):
        extent = sch.get(loop).extent
        total *= int(extent) if isinstance(extent, tirx.IntImm) else 1 << 20
    return total


def schedule_reduction_block(sch: s_tir.Schedule, block: SBlockRV, target: Target) -> None:
    """Pooling, softmax, LRN: parallel outer spatial loops; small windows vectorized.

    For a small reduction window (pooling: 2x2, 3x3, LRN's 5 channels) the window loops move
    outside the innermost spatial loop, which is then vectorized: one vector of outputs per
    window tap instead of one scalar reduction per output (VGG-19's first max-pool went from
    3 ms to well under 1).
    """
    loops = sch.get_loops(block)
    if any(_is_scheduled_loop(sch, lp) for lp in loops):
        return
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    n_spatial = kinds.index(tirx.IterVar.CommReduce) if tirx.IterVar.CommReduce in kinds else 0
    # A fresh TE nest has one loop per iterator, spatial ones first; anything else was
    # already transformed by someone who knew better.
    if len(loops) != len(kinds) or n_spatial == 0:
        return
    spatial, reduce = loops[:n_spatial], loops[n_spatial:]
    lanes = cpu_info(target).lanes
    window = 1
    for lp in reduce:
        window *= int(sch.get(lp).extent)
    inner = int(sch.get(spatial[-1]).extent)
    parallel_ok = _work(sch, block) >= _MIN_PARALLEL_WORK and num_cores(target) > 1
    # NHWC pooling and global means reduce over rows and columns with channels innermost:
    # vectorizing the channels is right whatever the window (a 56 x 56 global average pool).
    channels_last = _reduces_outer_axes(sch, block)
    # Channels that are not whole vectors (MobileNet v3's 120) take half or quarter vectors.
    while lanes > 4 and inner % lanes:
        lanes //= 2
    if n_spatial >= 2 and (window <= 64 or channels_last) and inner % lanes == 0:
        s_o, s_v = sch.split(spatial[-1], [None, lanes])
        sch.reorder(*spatial[:-1], s_o, *reduce, s_v)
        # The channel vectors join the parallel loop: a global pool has no other (EfficientNet's
        # squeeze-and-excitation mean over 28 x 28 x 240 ran on one core, 0.06 ms).
        outer = sch.fuse(*spatial[:-1], s_o)
        if parallel_ok:
            sch.parallel(outer)
        sch.vectorize(s_v)
        if window <= 64:
            for lp in reduce:
                sch.unroll(lp)
        init = sch.decompose_reduction(block, reduce[0])
        sch.vectorize(sch.get_loops(init)[-1])
        return
    # Keep the innermost spatial loop out of the fused parallel loop: cheaper index math.
    leading = spatial[:-1] if n_spatial >= 2 else spatial
    fused = sch.fuse(*leading) if len(leading) > 1 else leading[0]
    if parallel_ok:
        sch.parallel(fused)


def _reduces_outer_axes(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """True when the block's last spatial iterator indexes the last axis of what it reads
    (channels, in NHWC), so its reduction runs over outer axes."""
    stmt = sch.get(block)
    spatial = [iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    if not spatial or not stmt.reads:
        return False
    last = stmt.reads[0].region[-1].min
    return isinstance(last, tirx.Var) and last.same_as(spatial[-1])


def schedule_transpose(sch: s_tir.Schedule, block: SBlockRV, target: Target) -> bool:
    """Schedule a layout change (NCHW <-> NHWC, a transpose fused with a concatenation) in
    8 x 8 tiles of the axis its input is contiguous in by the axis its output is contiguous
    in, so that both its reads and its writes are whole runs; False when ``block`` is not one.

    Done per element along the output's last axis, such a transpose reads one float per
    input plane: 2 GB/s for SqueezeNet's 55 x 55 x 128 maps on Zen 3, a third of a fire
    module's time.
    """
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    iters = [iv.var for iv in stmt.iter_vars]
    if _is_reduction(sch, block) or len(iters) < 2 or len(loops) != len(iters) or not stmt.reads:
        return False
    if any(_is_scheduled_loop(sch, lp) for lp in loops):
        return False
    last_read = [r.region[-1].min for r in stmt.reads if len(r.region) >= 2]
    axes = {
        i
        for i, v in enumerate(iters)
        for e in last_read
        if isinstance(e, tirx.Var) and e.same_as(v)
    }
    if len(axes) != 1 or len(iters) - 1 in axes:
        return False
    (j,) = axes
    inner_extent = [int(sch.get(lp).extent) for lp in (loops[j], loops[-1])]
    if min(inner_extent) < 8:
        return False
    r_o, r_i = sch.split(loops[j], [None, 8])
    w_o, w_i = sch.split(loops[-1], [None, 8])
    others = [lp for i, lp in enumerate(loops[:-1]) if i != j]
    sch.reorder(*others, r_o, w_o, r_i, w_i)
    outer = sch.fuse(*others, r_o) if others else r_o
    if _work(sch, block) >= _MIN_PARALLEL_WORK and num_cores(target) > 1:
        sch.parallel(outer)
    sch.unroll(r_i)
    sch.unroll(w_i)
    return True


def schedule_leftovers(sch: s_tir.Schedule, target: Target) -> None:
    """Give every block that no rule placed yet a plain parallel (CPU) or bound (GPU) nest."""
    for block in all_blocks(sch):
        loops = sch.get_loops(block)
        if not loops or any(_is_scheduled_loop(sch, lp) for lp in loops):
            continue
        if is_gpu(target):
            schedule_spatial_block_gpu(sch, block, target)
        elif schedule_transpose(sch, block, target):
            continue
        elif _is_reduction(sch, block):
            schedule_reduction_block(sch, block, target)
        else:
            schedule_spatial_block(sch, block, target)


def gpu_threads(target: Target) -> int:
    """Threads per GPU work group: the target's limit, at most 256."""
    return min(256, int(target.attrs.get("max_num_threads", 256) or 256))


def schedule_spatial_block_gpu(sch: s_tir.Schedule, block: SBlockRV, target: Target) -> None:
    """One thread per output element of the block's spatial loops (reductions stay serial)."""
    loops = sch.get_loops(block)
    if not loops or any(_is_scheduled_loop(sch, lp) for lp in loops):
        return
    spatial = []
    block_stmt = sch.get(block)
    n_spatial = sum(1 for iv in block_stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar)
    spatial = list(loops[:n_spatial]) if n_spatial else []
    if not spatial:
        spatial = [sch.add_unit_loop(block)]
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    bx, tx = sch.split(fused, [None, gpu_threads(target)])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


# ----------------------------------------------------------------------------- rules
def _single_gemm(sch: s_tir.Schedule) -> SBlockRV | None:
    """The one reduction block of a function ``C[.., i, j] += A[.., i, k] * B[.., k, j]``."""
    reductions = [b for b in all_blocks(sch) if _is_reduction(sch, b)]
    if len(reductions) != 1:
        return None
    block = reductions[0]
    stmt = sch.get(block)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if kinds[-1] != tirx.IterVar.CommReduce or kinds.count(tirx.IterVar.CommReduce) != 1:
        return None
    if len(stmt.reads) != 2 or len(kinds) < 3:
        return None
    j_var = stmt.iter_vars[-2].var
    k_var = stmt.iter_vars[-1].var
    # B[k, j]: the output column must index B's last axis and the reduction its second to last.
    for region in stmt.reads:
        idx = [r.min for r in region.region]
        if len(idx) >= 2 and _is_var(idx[-1], j_var) and _is_var(idx[-2], k_var):
            body = stmt.body
            if isinstance(body, tirx.BufferStore) and isinstance(body.value, tirx.Add):
                return block
    return None


def _is_var(expr: tirx.PrimExpr, var: tirx.Var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


class Matmul(ScheduleRule):
    """CPU rule for ``C[i, j] = sum_k A[i, k] * B[k, j]`` (weights as ``[in, out]``).

    Batch-1 fully connected layers (at most 4 rows) are memory bound: the reduction is split
    over cores (``rfactor``) so that each core streams a contiguous block of weight rows into
    a partial row of C that stays in L1, four weight rows per pass over the row. Larger
    matmuls get column chunks per core with a local accumulator. Epilogues (bias, ReLU) are
    inlined where legal, else scheduled as plain vectorized loops.

    Knobs (drawn from the schedule, see :func:`tile_knob`; the defaults give the heuristic
    schedule):

    - GEMV ``reduction``: ``sample_perfect_tile`` of the reduction in three (parts over the
      cores, steps, weight rows unrolled per step; innermost at most 8); default
      ``[2 * cores (else cores, else 1), rest, 4 (else 1)]``.
    - Column chunks ``chunk``: columns per parallel task, ``sample_categorical`` over the
      multiples of the vector width among 4 ... 512 dividing the columns (and the default);
      default the largest with at least one chunk per core. None when the default chunk is
      not a whole number of vectors.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        """Schedule a matmul function for an LLVM target, or return None."""
        if not isinstance(func, tirx.PrimFunc) or is_gpu(target) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        block = _single_gemm(sch)
        if block is None:
            return None
        loops = sch.get_loops(block)
        extents = [sch.get(lp).extent for lp in loops]
        if not all(isinstance(e, tirx.IntImm) for e in extents):
            return None
        n_rows = 1
        for e in extents[:-2]:
            n_rows *= int(e)
        try_inline_producers(sch)
        if n_rows <= 4 and int(extents[-1]) >= 256:
            _schedule_gemv(sch, block, target)
        else:
            _schedule_column_chunks(sch, block, target)
        schedule_leftovers(sch, target)
        return sch


def _schedule_gemv(sch: s_tir.Schedule, block: SBlockRV, target: Target) -> None:
    lanes = cpu_info(target).lanes
    *rows, col, red = sch.get_loops(block)
    n_cols = int(sch.get(col).extent)
    n_red = int(sch.get(red).extent)
    parts = 2 * num_cores(target)
    if n_red % parts:
        parts = num_cores(target) if n_red % num_cores(target) == 0 else 1
    unroll = 4 if (n_red // parts) % 4 == 0 else 1
    # One perfect 3-way tile of the reduction: (parts, steps, unrolled weight rows).
    red_o, red_io, red_ii = sch.split(
        red,
        sch.sample_perfect_tile(
            red, n=3, max_innermost_factor=8, decision=[parts, n_red // parts // unroll, unroll]
        ),
    )
    partial = sch.rfactor(red_o, 0)
    *rows, col, part, red_io, red_ii = sch.get_loops(partial)  # rfactor keeps the loop order
    vec = lanes if n_cols % lanes == 0 else 1
    col_o, col_v = sch.split(col, [None, vec])
    sch.reorder(part, *rows, red_io, col_o, red_ii, col_v)
    sch.parallel(part)
    sch.unroll(red_ii)
    if vec > 1:
        sch.vectorize(col_v)
    init = sch.decompose_reduction(partial, red_io)
    if vec > 1:
        sch.vectorize(sch.split(sch.get_loops(init)[-1], [None, vec])[1])
    # The final sum over the partial rows: reduction outside, columns vectorized inside.
    *rows, col, red_o = sch.get_loops(block)
    sch.reorder(*rows, red_o, col)
    if vec > 1:
        sch.vectorize(sch.split(col, [None, vec])[1])
    init = sch.decompose_reduction(block, red_o)
    if vec > 1:
        sch.vectorize(sch.split(sch.get_loops(init)[-1], [None, vec])[1])


def _schedule_column_chunks(sch: s_tir.Schedule, block: SBlockRV, target: Target) -> None:
    lanes = cpu_info(target).lanes
    *rows, col, red = sch.get_loops(block)
    n_cols = int(sch.get(col).extent)
    write_back = sch.cache_write(block, 0, "local")
    write_back = inline_epilogues(sch, write_back)
    chunk = _column_chunk(n_cols, lanes, num_cores(target))
    vectorized = chunk % lanes == 0
    if vectorized:  # every candidate a multiple of the vector width dividing the columns
        chunks = [c for c in _CHUNKS if c % lanes == 0 and n_cols % c == 0]
        chunk = choice_knob(sch, sorted({*chunks, chunk}), chunk)
    *rows, col, red = sch.get_loops(block)
    col_o, col_i = sch.split(col, [None, chunk])
    sch.reorder(*rows, col_o, red, col_i)
    sch.reverse_compute_at(write_back, col_o)  # its loop: the chunk, never a unit loop
    outer = sch.fuse(*rows, col_o) if rows else col_o
    sch.parallel(outer)
    if vectorized:
        sch.vectorize(sch.split(col_i, [None, lanes])[1])
    init = sch.decompose_reduction(block, red)
    if vectorized:
        sch.vectorize(sch.split(sch.get_loops(init)[-1], [None, lanes])[1])


_CHUNKS = (512, 256, 128, 64, 32, 16, 8, 4)


def _column_chunk(n_cols: int, lanes: int, cores: int) -> int:
    """Columns per parallel task: a multiple of the vector width dividing ``n_cols``, C in L1."""
    for chunk in _CHUNKS[:-1]:
        if chunk % lanes == 0 and n_cols % chunk == 0 and n_cols // chunk >= cores:
            return chunk
    return n_cols if n_cols <= 512 else 1


class Guarded(ScheduleRule):
    """A rule that never fails a compile: when ``rule`` raises on a function (a schedule
    primitive that does not fit it), ``fallback`` schedules it instead, and that is logged at
    debug level; if the fallback fails too, the function stays unscheduled (it still builds on
    CPUs). The same with ``tunable``: the fallback then gives its untuned schedule (a design
    space without knobs)."""

    def __init__(self, rule: ScheduleRule, fallback: ScheduleRule | None) -> None:
        self.rule = rule
        self.fallback = fallback

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        """``rule.apply``, or the fallback's schedule when it raised."""
        try:
            return self.rule.apply(func, target, tunable)
        except Exception as err:  # any failure of a rule is a reason to fall back, not to stop
            name = type(self.rule).__name__
            log.debug("%s failed on a function (%s); using the fallback schedule", name, err)
        if self.fallback is not None:
            try:
                sch = self.fallback.apply(func, target, False)
                if sch is not None:
                    return sch
            except Exception as err:  # noqa: BLE001 - the plain function still builds
                log.debug("the fallback schedule failed too (%s); left unscheduled", err)
        return None if is_gpu(target) else s_tir.Schedule(func)


class CpuFallback(ScheduleRule):
    """Any function on an LLVM target: inline producers, parallel + vectorize what is left."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        """Schedule every block of ``func`` with the generic CPU nests."""
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        if not all_blocks(sch):
            return None
        try_inline_producers(sch)
        schedule_leftovers(sch, target)
        return sch
