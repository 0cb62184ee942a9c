"""The memory model of a re-fused factor chain, and the tiling it chooses by it.

Memory accounting (:func:`chain_memory`) is defined so that it can be counted by hand: float32
elements x 4 bytes of every tensor the chain creates besides its input, weights and output.
Unfused (:func:`unfused_intermediates`): each op's output tensor. Fused
(:func:`fused_buffers`): each per-tile buffer, times the tiles computed at once (one per
thread); register tiles are not memory. :func:`edgecomp.kernels.fused_chain.allocated_buffers`
reads the same figure off the scheduled TIR. :func:`choose_tiles` picks the row tile and rank
block of the fused kernel within a per-thread budget and a share of the unfused memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgecomp.kernels.chain_spec import FLOAT_BYTES, MID, PROJ_IN, ChainSpec


def tile_rows(spec: ChainSpec, rows: int) -> int:
    """The tile height the CP / Tucker-2 kernel uses: the largest divisor of Ho <= ``rows``.

    Divisors keep every tile full, so no loop of the kernel carries a bounds predicate.
    """
    ho = spec.out_hw[0]
    rows = max(1, min(rows, ho))
    while ho % rows:
        rows -= 1
    return rows


def tile_rows_in(spec: ChainSpec, rows: int) -> int:
    """Input rows of a CP / Tucker-2 tile's window: its rows and halo, at most the map's H."""
    return min(spec.rows_in(rows), spec.in_shape[2])


def _gkpd_rank_bytes(spec: ChainSpec, rows: int) -> int:
    """GKPD: per-tile bytes of the B-conv output ``z`` per rank."""
    _, _, h, w = spec.in_shape
    rin = spec.rows_in(rows)
    r, k1, c1, kh1, kw1, k2, c2, kh2, kw2 = spec.ranks
    pt, pl, pb, pr = spec.geom.padding
    wz = w + pl + pr - spec.geom.dilation[1] * (kw2 - 1)
    return FLOAT_BYTES * k2 * c1 * rin * wz


def fused_buffers(spec: ChainSpec, rows: int, rank_block: int) -> dict[str, int]:
    """Bytes of each buffer one tile of the fused kernel allocates (what the TIR allocates).

    Hand count, float32, with ``rows`` the tile height (:func:`tile_rows`) and ``rows_in``
    its input window (:func:`tile_rows_in`: ``(rows-1)*sh + (kh-1)*dh + 1``, at most H):

    - CP: ``t1 = rb*rows_in*W`` (the input projection of one rank block, ``rb`` at most R) and
      ``dw = R*rows*Wo`` (the depthwise result of every rank, which the output projection reads);
    - Tucker-2: ``t1 = R3*rows_in*W`` and ``core = R4*rows*Wo``;
    - GKPD: ``z = rb*K2*C1*rows_in*Wz`` (``rows_in = (rows-1)*sh + (kh1-1)*kh2*dh + 1``).

    Register tiles (``local`` accumulators) are not memory and are not counted.
    """
    _, _, h, w = spec.in_shape
    wo = spec.out_hw[1]
    if spec.kind == "gkpd":
        rb = min(rank_block, spec.rank - spec.bias)  # the bias "rank" has no intermediate
        return {PROJ_IN: _gkpd_rank_bytes(spec, rows) * rb}
    rows = tile_rows(spec, rows)
    rows_in = tile_rows_in(spec, rows)
    if spec.kind == "cp":
        r = spec.ranks[0]
        return {
            PROJ_IN: FLOAT_BYTES * min(rank_block, r) * rows_in * w,
            MID[0]: FLOAT_BYTES * r * rows * wo,
        }
    r3, r4 = spec.ranks
    return {PROJ_IN: FLOAT_BYTES * r3 * rows_in * w, MID[1]: FLOAT_BYTES * r4 * rows * wo}


def unfused_intermediates(spec: ChainSpec) -> dict[str, int]:
    """Bytes of the tensors the chain passes between its ops when they run separately.

    Hand count, float32, batch N: every op output except the chain's result; reshapes are views
    (0 bytes). CP ``R*H*W + R*Ho*W + R*Ho*Wo``; Tucker-2 ``R3*H*W + R4*Ho*Wo``; GKPD
    ``2*R*K2*C1*Hz*Wz`` (B-conv output and its permuted copy) ``+ K*Ho*Wo`` (A-conv output before
    its permute); plus ``K*Ho*Wo`` (the conv output before the bias add) when a bias follows.
    Workspaces inside each op's kernel (padded copies, lowered buffers) are not counted, so
    this is a lower bound for the unfused chain.
    """
    n, c, h, w = spec.in_shape
    ho, wo = spec.out_hw
    k = spec.out_channels
    out: dict[str, int] = {}
    if spec.kind == "cp":
        r = spec.ranks[0]
        out["proj_in"] = r * h * w
        out["vert"] = r * ho * w
        out["horiz"] = r * ho * wo
    elif spec.kind == "tucker2":
        r3, r4 = spec.ranks
        out["proj_in"] = r3 * h * w
        out["core"] = r4 * ho * wo
    else:
        r, k1, c1, kh1, kw1, k2, c2, kh2, kw2 = spec.ranks
        pt, pl, pb, pr = spec.geom.padding
        dh, dw = spec.geom.dilation
        hz = h + pt + pb - dh * (kh2 - 1)
        wz = w + pl + pr - dw * (kw2 - 1)
        out["b_conv"] = r * k2 * c1 * hz * wz
        out["b_conv_permuted"] = r * k2 * c1 * hz * wz
        out["a_conv"] = k * ho * wo
    if spec.bias:
        out["before_bias"] = k * ho * wo
    return {name: FLOAT_BYTES * n * v for name, v in out.items()}


@dataclass(frozen=True)
class ChainMemory:
    """Intermediate memory of one chain, unfused vs fused (see :func:`chain_memory`)."""

    unfused_bytes: int
    fused_bytes: int
    rows: int
    rank_block: int
    concurrent_tiles: int

    @property
    def reduction(self) -> float:
        """Fraction of the unfused intermediate memory the fused kernel saves (0.9 = -90%)."""
        return 1.0 - self.fused_bytes / self.unfused_bytes if self.unfused_bytes else 0.0


def chain_memory(spec: ChainSpec, threads: int, rows: int, rank_block: int) -> ChainMemory:
    """Intermediate bytes of the chain run as separate ops vs as the fused kernel.

    Unfused: :func:`unfused_intermediates` summed. Fused: :func:`fused_buffers` of one tile
    times the tiles in flight at once, ``min(threads, number of row tiles)`` (each worker
    thread holds its own tile buffers); the batch is processed tile by tile, so N does not
    multiply the fused figure.
    """
    ho = spec.out_hw[0]
    if spec.kind != "gkpd":
        rows = tile_rows(spec, rows)
    tiles = spec.in_shape[0] * -(-ho // rows)
    concurrent = max(1, min(threads, tiles))
    return ChainMemory(
        unfused_bytes=sum(unfused_intermediates(spec).values()),
        fused_bytes=sum(fused_buffers(spec, rows, rank_block).values()) * concurrent,
        rows=rows,
        rank_block=rank_block,
        concurrent_tiles=concurrent,
    )


# The per-thread working set a tile aims for: well inside a typical L2 (1 MiB shared by the
# Cortex-A72 cluster, 512 KiB or more per core on x86), so that a tile's intermediates stay in
# cache between the stage that writes them and the one that reads them.
TILE_BUDGET_BYTES = 256 * 1024
# The fused kernel's buffers, over all threads, stay below this share of the unfused chain's
# intermediates (T1000's point: the memory saving is the reason to fuse).
MAX_SHARE = 0.08
# GKPD: each stage's micro-kernel is UNROLL_C output channels x VECTORS_PER_ROW vector registers
# of columns; rank blocks below MIN_RANK_BLOCK measured about 2x slower.
UNROLL_C = 4
VECTORS_PER_ROW = 2
MIN_RANK_BLOCK = 12


def choose_tiles(
    spec: ChainSpec,
    threads: int,
    lanes: int = 8,
    budget: int = TILE_BUDGET_BYTES,
    max_share: float = MAX_SHARE,
) -> tuple[int, int]:
    """Pick ``(tile rows, rank block)`` for a chain.

    Candidates: every divisor of Ho as tile rows, with the largest rank block (a divisor of R,
    CP only; Tucker-2's whole R3) whose tile buffers (:func:`fused_buffers`) fit ``budget`` per
    thread and ``max_share`` of the unfused intermediates over all threads. The modelled cost
    per output pixel, in multiply-adds, is minimised: the input projection with its halo
    recompute ``rows_in / (rows * sh)``, the middle stage and the output projection, each divided
    by the share of ``lanes`` its vectorized axis fills (the projections vectorize along a
    tile's flat pixels, the middle stage along output columns), all divided by the load
    balance of the tiles over ``threads``.
    """
    if spec.kind == "gkpd":
        return _choose_gkpd_tiles(spec, threads, lanes, budget, max_share)
    n, _, h, w = spec.in_shape
    ho, wo = spec.out_hw
    sh = spec.geom.strides[0]
    macs = spec.macs_per_pixel()
    unfused = sum(unfused_intermediates(spec).values())
    r = spec.ranks[0]
    blocks = [d for d in range(r, 0, -1) if r % d == 0] if spec.kind == "cp" else [r]
    best: tuple[float, int, int] | None = None
    fallback = (1, min(blocks))
    for rows in [d for d in range(1, ho + 1) if ho % d == 0]:
        tiles = n * (ho // rows)
        concurrent = max(1, min(threads, tiles))
        allowed = min(budget, max_share * unfused / concurrent)
        fits = [rb for rb in blocks if sum(fused_buffers(spec, rows, rb).values()) <= allowed]
        if not fits:
            continue
        rows_in = tile_rows_in(spec, rows)
        work = (
            macs["proj_in"] * rows_in / (rows * sh) / vector_fill(rows_in * w, lanes)
            + macs["mid"] / vector_fill(wo, lanes)
            + macs["proj_out"] / vector_fill(rows * wo, lanes)
        )
        balance = tiles / (threads * -(-tiles // threads))
        cost = work / balance
        if best is None or cost < best[0] * 0.999:
            best = (cost, rows, fits[0])
    if best is None:  # nothing fits: the smallest tile still beats the unfused chain
        return fallback
    return best[1], best[2]


def _choose_gkpd_tiles(
    spec: ChainSpec, threads: int, lanes: int, budget: int, max_share: float
) -> tuple[int, int]:
    """GKPD's ``(tile rows, rank block)``: the rank block is the largest that fits for each row
    count, and the cost model is :func:`choose_tiles`' with the output tile loaded and stored
    once per rank block (``2 * K * ceil(ranks / rb)``) and a 2x penalty for blocks below
    :data:`MIN_RANK_BLOCK`.
    """
    ho = spec.out_hw[0]
    sh = spec.geom.strides[0]
    macs = spec.macs_per_pixel()
    fill_w = divisor(spec.in_shape[3], lanes) / lanes
    unfused = sum(unfused_intermediates(spec).values())
    best: tuple[float, int, int] | None = None
    min_rb = min(MIN_RANK_BLOCK, spec.rank)
    for rows in [r for r in range(1, ho + 1) if ho % r == 0]:
        tiles = spec.in_shape[0] * -(-ho // rows)
        concurrent = max(1, min(threads, tiles))
        allowed = min(budget, max_share * unfused / concurrent)
        rb = min(spec.rank, int(allowed // _gkpd_rank_bytes(spec, rows)))
        if rb < 1:
            continue
        penalty = 1.0 if rb >= min_rb else 2.0
        balance = 1.0 if tiles < threads else tiles / (threads * -(-tiles // threads))
        recompute = macs["proj_in"] * spec.rows_in(rows) / (rows * sh)
        traffic = 2 * spec.out_channels * -(-spec.rank // rb)
        cost = (recompute + macs["proj_out"] + traffic) / fill_w * penalty / balance
        if best is None or cost < best[0] * 0.999:
            best = (cost, rows, rb)
    if best is None:
        return 1, 1
    _, rows, rb = best
    if rb >= UNROLL_C:
        rb -= rb % UNROLL_C
    return rows, rb


def divisor(extent: int, wanted: int) -> int:
    """The largest power of two <= ``wanted`` dividing ``extent`` (so splits need no predicate)."""
    f = wanted
    while f > 1 and extent % f:
        f //= 2
    return max(f, 1)


def vector_fill(extent: int, lanes: int) -> float:
    """Share of ``lanes`` the widest predicate-free vector along an ``extent``-long axis fills."""
    return divisor(extent, lanes) / lanes
