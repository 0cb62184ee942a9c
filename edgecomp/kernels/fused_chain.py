"""Re-fused factor chains (T1000): one TE compute per CP / Tucker-2 / GKPD chain, and its schedule.

``DecomposeConv`` replaces a dense convolution by a chain of small convolutions. Run as separate
operators, that chain writes every intermediate map at full size (T1000's complaint: memory grows
although FLOPs fall). Here the whole chain is one TE compute; :class:`FusedChainRule` schedules it
so that, for each tile of output rows and each block of ranks, the intermediates are computed only
for the rows the tile needs (with the halo of the kh tap / dilation / stride) and only for the
block's ranks, into tile-sized buffers; the output projection accumulates the rank blocks in the
output. Small maps (28 x 28 and below on VGG) are one tile; the stages then run their channel
blocks in parallel instead of the tiles.

Weights are taken in the layouts of the ``relax.nn.conv2d`` ops of the chain (OIHW), so the
re-fusion pass can hand the chain's constants over unchanged:

- CP rank R: ``w_in [R, C, 1, 1]``, ``w_v [R, 1, kh, 1]``, ``w_h [R, 1, 1, kw]``,
  ``w_out [K, R, 1, 1]``.
- Tucker-2: ``w_in [R3, C, 1, 1]``, ``w_core [R4, R3, kh, kw]``, ``w_out [K, R4, 1, 1]``.
- GKPD rank R: ``a [R, K1, C1, kh1, kw1]`` and ``b [R, K2, C2, kh2, kw2]`` (the Kronecker
  factors; see :func:`gkpd_te`).

Every PrimFunc made here (:func:`emit_fused_chain`) carries the function attributes
``edgecomp.fused_chain`` (``"cp"``, ``"tucker2"`` or ``"gkpd"``), ``edgecomp.tile_rows`` and
``edgecomp.rank_block`` (the tiling :func:`choose_tiles` picked); :class:`FusedChainRule`
recognises its functions by the first and returns None for everything else.

Memory accounting (:func:`chain_memory`) is defined so that it can be counted by hand: float32
elements x 4 bytes of every tensor the chain creates besides its input, weights and output.
Unfused (:func:`unfused_intermediates`): each op's output tensor. Fused
(:func:`fused_buffers`): each per-tile buffer, times the tiles computed at once (one per
thread). :func:`allocated_buffers` reads the same figure off the scheduled TIR.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, te, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from edgecomp.kernels.target_info import cpu_info, num_cores

ATTR_KIND = "edgecomp.fused_chain"
ATTR_TILE_ROWS = "edgecomp.tile_rows"
ATTR_RANK_BLOCK = "edgecomp.rank_block"
FLOAT_BYTES = 4

# Block names of the stages, shared by the TE computes and the schedule.
PROJ_IN = "fc_proj_in"  # 1x1 C -> R (CP, Tucker-2) / the B-factor conv (GKPD)
MID = ("fc_vert", "fc_horiz", "fc_core")  # spatial stages between the projections
PROJ_OUT = "fc_proj_out"  # 1x1 R -> K (CP, Tucker-2) / the A-factor conv (GKPD)


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding (top, left, bottom, right) and dilation of the dense convolution."""

    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)

    def out_size(self, h: int, w: int, kh: int, kw: int) -> tuple[int, int]:
        """Output rows and columns of a kh x kw convolution over an h x w map."""
        sh, sw = self.strides
        pt, pl, pb, pr = self.padding
        dh, dw = self.dilation
        return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (
            w + pl + pr - dw * (kw - 1) - 1
        ) // sw + 1


@dataclass(frozen=True)
class ChainSpec:
    """Shapes of one factor chain: everything tiling and memory accounting need.

    Attributes
    ----------
    kind : str
        ``"cp"``, ``"tucker2"`` or ``"gkpd"``.
    in_shape : tuple of int
        Input ``(N, C, H, W)``.
    out_channels : int
        K, the channels of the dense convolution the chain replaces.
    kernel : tuple of int
        ``(kh, kw)`` of that dense convolution.
    ranks : tuple of int
        CP ``(R,)``; Tucker-2 ``(R3, R4)``; GKPD ``(R, K1, C1, kh1, kw1, K2, C2, kh2, kw2)``.
    geom : ConvGeometry
        Stride, padding and dilation of the dense convolution.
    bias : bool
        Whether a bias add follows (and is folded into the kernel).
    """

    kind: str
    in_shape: tuple[int, int, int, int]
    out_channels: int
    kernel: tuple[int, int]
    ranks: tuple[int, ...]
    geom: ConvGeometry
    bias: bool

    @property
    def out_hw(self) -> tuple[int, int]:
        """Output rows and columns."""
        return self.geom.out_size(self.in_shape[2], self.in_shape[3], *self.kernel)

    @property
    def rank(self) -> int:
        """Extent of the rank loop the kernel blocks: CP R, Tucker-2 R4, GKPD R (+1 for a bias)."""
        return (self.ranks[1] if self.kind == "tucker2" else self.ranks[0]) + self.bias

    def macs_per_pixel(self) -> dict[str, int]:
        """Multiply-adds per output pixel of each stage, without halo recompute.

        The input stage runs on every input pixel, hence the ``sh * sw`` factor.
        """
        c = self.in_shape[1]
        kh, kw = self.kernel
        k = self.out_channels
        sh, sw = self.geom.strides
        if self.kind == "cp":
            r = self.ranks[0]
            return {"proj_in": r * c * sh * sw, "mid": r * (kh * sw + kw), "proj_out": r * k}
        if self.kind == "tucker2":
            r3, r4 = self.ranks
            return {"proj_in": r3 * c * sh * sw, "mid": r4 * r3 * kh * kw, "proj_out": r4 * k}
        r, k1, c1, kh1, kw1, k2, c2, kh2, kw2 = self.ranks
        return {
            "proj_in": r * k2 * c1 * c2 * kh2 * kw2 * sh * sw,
            "mid": 0,
            "proj_out": k * r * c1 * kh1 * kw1,
        }

    def rows_in(self, rows: int) -> int:
        """Rows of the first intermediate one tile of ``rows`` output rows reads (halo included)."""
        sh = self.geom.strides[0]
        dh = self.geom.dilation[0]
        if self.kind == "gkpd":
            kh1, kh2 = self.ranks[3], self.ranks[7]
            return (rows - 1) * sh + (kh1 - 1) * kh2 * dh + 1
        return (rows - 1) * sh + (self.kernel[0] - 1) * dh + 1


def _rank_bytes(spec: ChainSpec, rows: int) -> int:
    """Per-tile bytes of the intermediates that scale with the rank block, per rank."""
    _, _, h, w = spec.in_shape
    ho, wo = spec.out_hw
    rin = spec.rows_in(rows)
    if rows >= ho and spec.kind != "gkpd":  # whole map: the projection skips the padding rows
        rin = h
    if spec.kind == "cp":
        return FLOAT_BYTES * (rin * w + rows * w + rows * wo)
    if spec.kind == "tucker2":
        return FLOAT_BYTES * rows * wo
    r, k1, c1, kh1, kw1, k2, c2, kh2, kw2 = spec.ranks
    pt, pl, pb, pr = spec.geom.padding
    wz = w + pl + pr - spec.geom.dilation[1] * (kw2 - 1)
    return FLOAT_BYTES * k2 * c1 * rin * wz


def fused_buffers(spec: ChainSpec, rows: int, rank_block: int) -> dict[str, int]:
    """Bytes of each buffer one tile of the fused kernel allocates (what the TIR allocates).

    Hand count, float32: CP ``t1 = rb*rows_in*W``, ``t2 = rb*rows*W``, ``t3 = rb*rows*Wo``;
    Tucker-2 ``t1 = R3*rows_in*W``, ``core = rb*rows*Wo``; GKPD ``z = rb*K2*C1*rows_in*Wz``;
    with ``rows_in = (rows-1)*sh + (kh-1)*dh + 1`` (GKPD: ``(kh1-1)*kh2*dh``) and ``rb`` the
    rank block (at most the number of ranks). The output projection accumulates in the
    kernel's output, so nothing else.
    """
    _, _, h, w = spec.in_shape
    ho, wo = spec.out_hw
    rb = min(rank_block, spec.rank - spec.bias)  # the bias "rank" has no intermediate channel
    rin = spec.rows_in(rows)
    if rows >= ho and spec.kind != "gkpd":  # whole map: the projection skips the padding rows
        rin = h
    if spec.kind == "cp":
        return {
            PROJ_IN: FLOAT_BYTES * rb * rin * w,
            MID[0]: FLOAT_BYTES * rb * rows * w,
            MID[1]: FLOAT_BYTES * rb * rows * wo,
        }
    if spec.kind == "tucker2":
        return {
            PROJ_IN: FLOAT_BYTES * spec.ranks[0] * rin * w,
            MID[2]: FLOAT_BYTES * rb * rows * wo,
        }
    return {PROJ_IN: _rank_bytes(spec, rows) * rb}


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
# Cortex-A72 cluster, 512 KiB or more per core on x86), so that a rank block's intermediates
# stay in cache between the stage that writes them and the one that reads them.
TILE_BUDGET_BYTES = 256 * 1024
# Each stage's micro-kernel: UNROLL_C output channels x VECTORS_PER_ROW vector registers of
# columns, i.e. 8 accumulators, enough to hide the FMA latency (2 vectors per channel measured
# 1.3-1.5x faster than 1 on x86); one input vector load feeds UNROLL_C accumulators.
UNROLL_C = 4
VECTORS_PER_ROW = 2
# Smaller rank blocks measured about 2x slower (see choose_tiles).
MIN_RANK_BLOCK = 12


def choose_tiles(
    spec: ChainSpec,
    threads: int,
    lanes: int = 8,
    budget: int = TILE_BUDGET_BYTES,
    max_share: float = 0.05,
) -> tuple[int, int]:
    """Pick ``(tile rows, rank block)`` for a chain.

    For every row count, the rank block is the largest whose tile buffers fit both ``budget``
    per thread and ``max_share`` of the unfused intermediates over all threads (so the fused
    kernel's memory stays an order of magnitude below the unfused chain's). Among those the
    modelled cost per output pixel is minimised, in multiply-adds: the input projection with
    its halo recompute ``rows_in / (rows * sh)``, the other stages, and one load + store of the
    output tile per rank block (``2 * K * ceil(ranks / rb)``), each stage divided by the share
    of the ``lanes`` its vectorized axis fills (the output projection vectorizes rows x
    columns of the tile, the others columns; a whole-map tile's input projection too), and
    all divided by the load balance of the row tiles over ``threads`` (1 when there are fewer
    tiles than threads: the schedule then parallelizes inside the stages).
    """
    ho, wo = spec.out_hw
    sh = spec.geom.strides[0]
    macs = spec.macs_per_pixel()
    fill_w = _divisor(spec.in_shape[3], lanes) / lanes
    unfused = sum(unfused_intermediates(spec).values())
    best: tuple[float, int, int] | None = None
    # Rows divide Ho: a partial last tile puts a row predicate inside the vectorized loops,
    # which TVM then scalarizes. Rank blocks below MIN_RANK_BLOCK measured 2x slower (VGG conv1_2
    # on x86: rb 8 -> 40 ms, rb 12 -> 22 ms), so they are used only when nothing else fits.
    min_rb = min(MIN_RANK_BLOCK, spec.rank)
    for rows in [r for r in range(1, ho + 1) if ho % r == 0]:
        tiles = spec.in_shape[0] * -(-ho // rows)
        concurrent = max(1, min(threads, tiles))
        allowed = min(budget, max_share * unfused / concurrent)
        free = allowed - sum(fused_buffers(spec, rows, 0).values())  # Tucker-2's t1 is fixed
        rb = min(spec.rank, int(free // _rank_bytes(spec, rows)))
        if rb < 1:
            continue
        penalty = 1.0 if rb >= min_rb else 2.0
        whole = rows == ho and spec.kind != "gkpd"
        if tiles < threads:  # the schedule parallelizes inside the stages instead
            balance = 1.0
        else:
            balance = tiles / (threads * -(-tiles // threads))
        if whole:  # no halo, and the projection's rows x columns vectorize as one run
            recompute = macs["proj_in"]
            fill_in = _divisor(spec.in_shape[2] * spec.in_shape[3], lanes) / lanes
        else:
            recompute = macs["proj_in"] * spec.rows_in(rows) / (rows * sh)
            fill_in = fill_w
        fill_out = _divisor(rows * wo, lanes) / lanes if spec.kind != "gkpd" else fill_w
        traffic = 2 * spec.out_channels * -(-spec.rank // rb)
        work = recompute / fill_in + macs["mid"] / fill_w + (macs["proj_out"] + traffic) / fill_out
        cost = work * penalty / balance
        if best is None or cost < best[0] * 0.999:
            best = (cost, rows, rb)
    if best is None:  # nothing fits: the smallest tile still beats the unfused chain
        return 1, 1
    _, rows, rb = best
    # A multiple of the stages' channel unroll, so that every stage keeps its register block.
    step = UNROLL_C
    if rows >= ho and spec.kind != "gkpd" and spec.in_shape[0] < threads:
        # One tile: each stage splits the rank block into parallel chunks of up to 2 * UNROLL_C
        # channels, so a multiple of threads x that keeps the threads evenly loaded (VGG conv4
        # chain, 28 x 28, 2 threads: rb 24 = 3 chunks 6.99 ms, rb 32 6.26 ms, unfused 3.85 ms).
        step = max(step, threads * 2 * UNROLL_C)
    if rb >= step:
        rb -= rb % step
    elif rb >= UNROLL_C:
        rb -= rb % UNROLL_C
    return rows, rb


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


def _proj(x: te.Tensor, w: te.Tensor, name: str) -> te.Tensor:
    """1x1 convolution (a channel projection) of an NCHW tensor."""
    n, c, h, wd = (int(d) for d in x.shape)
    rc = te.reduce_axis((0, c), name="rc")
    return te.compute(
        (n, int(w.shape[0]), h, wd),
        lambda b, k, y, xx: te.sum(x[b, rc, y, xx] * w[k, rc, 0, 0], axis=rc),
        name=name,
    )


def _proj_padded_rows(x: te.Tensor, w: te.Tensor, pt: int, pb: int) -> te.Tensor:
    """1x1 projection computed over the zero-padded rows ``[-pt, H + pb)`` of its input.

    Padding rows come out 0 because the weight is masked there (the input row index is clamped
    so nothing is read out of bounds). Computing the padded domain keeps the region a tile reads
    a plain affine window of this buffer (no clamping at the borders), so TVM can shrink the
    buffer to the tile; the mask is uniform along a row, so the column loop still vectorizes.
    """
    n, c, h, wd = (int(d) for d in x.shape)
    rc = te.reduce_axis((0, c), name="rc")

    def value(b, k, y, xx):
        row = tirx.max(tirx.min(y - pt, h - 1), 0)
        inside = tirx.all(y >= pt, y < h + pt)
        weight = tirx.if_then_else(inside, w[k, rc, 0, 0], tirx.const(0.0, "float32"))
        return te.sum(x[b, rc, row, xx] * weight, axis=rc)

    return te.compute((n, int(w.shape[0]), h + pt + pb, wd), value, name=PROJ_IN)


def _proj_out(t: te.Tensor, w: te.Tensor, bias: te.Tensor | None) -> te.Tensor:
    """The output 1x1 projection R -> K, with the bias folded in as one more rank.

    With a bias the sum runs over ``R + 1`` ranks and the last one contributes ``bias[k]``
    (as if the intermediate had a constant-1 channel). The kernel then accumulates straight
    into its output: no separate bias pass and no tile-sized accumulator.
    """
    if bias is None:
        return _proj(t, w, PROJ_OUT)
    n, r, h, wd = (int(d) for d in t.shape)
    rr = te.reduce_axis((0, r + 1), name="rr")
    return te.compute(
        (n, int(w.shape[0]), h, wd),
        lambda b, k, y, x: te.sum(
            tirx.if_then_else(rr < r, t[b, rr, y, x] * w[k, rr, 0, 0], bias[k]), axis=rr
        ),
        name=PROJ_OUT,
    )


def cp_te(
    x: te.Tensor,
    w_in: te.Tensor,
    w_v: te.Tensor,
    w_h: te.Tensor,
    w_out: te.Tensor,
    bias: te.Tensor | None,
    geom: ConvGeometry,
    whole_map: bool = False,
) -> te.Tensor:
    """The CP chain 1x1 (C->R), dw kh x 1, dw 1 x kw, 1x1 (R->K) (+ bias) as one compute.

    The vertical depthwise carries the vertical stride / padding / dilation, the horizontal one
    the horizontal ones, exactly as the separate ``conv2d`` ops of the chain do. ``whole_map``:
    the schedule will not tile rows, so the input projection covers the unpadded map (a plain
    1x1 convolution, whose rows x columns vectorize as one run) and the padding becomes a
    condition in the vertical stage.
    """
    n, _, h, w = (int(d) for d in x.shape)
    r, kh, kw = int(w_in.shape[0]), int(w_v.shape[2]), int(w_h.shape[3])
    sh, sw = geom.strides
    pt, pl, pb, pr = geom.padding
    dh, dw = geom.dilation
    ho, wo = geom.out_size(h, w, kh, kw)
    if whole_map:
        t1 = _padded(_proj(x, w_in, PROJ_IN), (pt, 0, pb, 0), "fc_pad_v")
    else:
        t1 = _proj_padded_rows(x, w_in, pt, pb)
    ri = te.reduce_axis((0, kh), name="ri")
    t2 = te.compute(
        (n, r, ho, w),
        lambda b, c, y, xx: te.sum(t1[b, c, y * sh + ri * dh, xx] * w_v[c, 0, ri, 0], axis=ri),
        name=MID[0],
    )
    t2p = _padded(t2, (0, pl, 0, pr), "fc_pad_h")
    rj = te.reduce_axis((0, kw), name="rj")
    t3 = te.compute(
        (n, r, ho, wo),
        lambda b, c, y, xx: te.sum(t2p[b, c, y, xx * sw + rj * dw] * w_h[c, 0, 0, rj], axis=rj),
        name=MID[1],
    )
    return _proj_out(t3, w_out, bias)


def tucker2_te(
    x: te.Tensor,
    w_in: te.Tensor,
    w_core: te.Tensor,
    w_out: te.Tensor,
    bias: te.Tensor | None,
    geom: ConvGeometry,
    whole_map: bool = False,
) -> te.Tensor:
    """The Tucker-2 chain 1x1 (C->R3), kh x kw core (R3->R4), 1x1 (R4->K) (+ bias), one compute.

    ``whole_map`` as for :func:`cp_te` (the padding becomes a condition in the core).
    """
    n, _, h, w = (int(d) for d in x.shape)
    r3, r4 = int(w_core.shape[1]), int(w_core.shape[0])
    kh, kw = int(w_core.shape[2]), int(w_core.shape[3])
    sh, sw = geom.strides
    dh, dw = geom.dilation
    ho, wo = geom.out_size(h, w, kh, kw)
    pt, pl, pb, pr = geom.padding
    if whole_map:
        t1 = _padded(_proj(x, w_in, PROJ_IN), geom.padding, "fc_pad")
    else:
        t1 = _padded(_proj_padded_rows(x, w_in, pt, pb), (0, pl, 0, pr), "fc_pad_h")
    rc = te.reduce_axis((0, r3), name="rc")
    ri = te.reduce_axis((0, kh), name="ri")
    rj = te.reduce_axis((0, kw), name="rj")
    t2 = te.compute(
        (n, r4, ho, wo),
        lambda b, c, y, xx: te.sum(
            t1[b, rc, y * sh + ri * dh, xx * sw + rj * dw] * w_core[c, rc, ri, rj],
            axis=[rc, ri, rj],
        ),
        name=MID[2],
    )
    return _proj_out(t2, w_out, bias)


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
    """The fused compute of ``spec`` for tiles of ``rows`` output rows.

    Arguments: the input, the weights as in the module docstring, then the bias (if any).
    """
    weights = list(weights_and_bias)
    bias = weights.pop() if spec.bias else None
    whole_map = rows >= spec.out_hw[0]
    if spec.kind == "cp":
        return cp_te(x, *weights, bias, spec.geom, whole_map)
    if spec.kind == "tucker2":
        return tucker2_te(x, *weights, bias, spec.geom, whole_map)
    return gkpd_te(x, *weights, bias, spec.geom)


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

    def compute(x: te.Tensor, *rest: te.Tensor) -> te.Tensor:  # call_te takes no dataclasses
        return fused_chain_te(spec, x, *rest, rows=rows)

    return bb.call_te(
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


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


def vector_lanes(target: Target) -> int:
    """float32 lanes of the target's SIMD registers (edgecomp's shared target table)."""
    return cpu_info(target).lanes


def _divisor(extent: int, wanted: int) -> int:
    """The largest power of two <= ``wanted`` dividing ``extent`` (so splits need no predicate)."""
    f = wanted
    while f > 1 and extent % f:
        f //= 2
    return max(f, 1)


def vector_fill(extent: int, lanes: int) -> float:
    """Share of ``lanes`` the widest predicate-free vector along an ``extent``-long axis fills."""
    return _divisor(extent, lanes) / lanes


PAD_BLOCKS = ("fc_pad", "fc_pad_v", "fc_pad_h")


def _block_names(sch: s_tir.Schedule) -> list[str]:
    """The stage blocks of a fused chain present in ``sch`` (a chain has no bias, or no pads)."""
    names = []
    for name in (PROJ_IN, *MID, PROJ_OUT, *PAD_BLOCKS):
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
    xb = _divisor(int(sch.get(x).extent), lanes) if x is not None else 1
    if fuse_rows and 1 < xb <= lanes // 2:
        # The output projection on short rows (one vector): twice the channels keep 8
        # accumulators busy (VGG conv4 chain, 28 columns: 44 -> 35 ms on one x86 core). The
        # same for the other stages measured slower (28 columns: 34 -> 47 ms; 56: 12 -> 15 ms).
        unroll_c *= 2
    inner = []
    order = []
    if c is not None:
        cb = _divisor(int(sch.get(c).extent), unroll_c)
        if cb > 1:
            c, c_i = sch.split(c, [None, cb])
            inner.append(c_i)
        order.append(c)
    if y is not None:
        order.append(y)
    x_i = None
    if x is not None:
        if xb > 1:
            x, x_i = sch.split(x, [None, xb])
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


def schedule_cpu(func: tirx.PrimFunc, target: Target) -> s_tir.Schedule:
    """Tile a fused chain over output rows and rank blocks, computing intermediates per tile.

    Loop nest (``rows`` = attr ``edgecomp.tile_rows``, ``rb`` = attr ``edgecomp.rank_block``)::

        parallel for each tile of `rows` output rows:
            [Tucker-2 only: C -> R3 projection of the input rows the tile needs, halo included]
            for each block of `rb` ranks (CP: R, Tucker-2: R4, GKPD: R):
                [the rank block's intermediates for the tile's rows: projection / B conv,
                 depthwise(s) / core]
                [output projection / A conv, accumulated in the output over the rank blocks;
                 with a bias, the last rank block adds it (see _proj_out)]

    CP and GKPD ranks are independent until the output projection sums them, so only one rank
    block of every intermediate exists at a time; each stage is vectorized along its columns.
    With fewer row tiles than cores (``rows`` = the whole map) each stage's outer channel-block
    loop is parallel instead of the tile loop.
    """
    sch = s_tir.Schedule(func)
    names = _block_names(sch)
    lanes = vector_lanes(target) * VECTORS_PER_ROW
    rows = int(func.attrs.get(ATTR_TILE_ROWS, 1))
    kind = str(func.attrs[ATTR_KIND])
    for name in names:  # zero padding becomes a condition inside the consumer: no padded copy
        if name in PAD_BLOCKS:
            sch.compute_inline(sch.get_sblock(name))
    proj_out = sch.get_sblock(PROJ_OUT)
    b, k, y, x, *red = sch.get_loops(proj_out)
    whole_map = rows >= int(sch.get(y).extent) and kind != "gkpd"
    y_o, y_i = sch.split(y, [None, rows])
    sch.reorder(b, y_o, k, y_i, x, *red)
    tile = sch.fuse(b, y_o)
    # Fewer tiles than cores (a whole small map per tile): the stages' channel loops are
    # parallel instead, one parallel region per stage and rank block.
    inner_parallel = int(sch.get(tile).extent) < num_cores(target)
    if not inner_parallel:
        sch.parallel(tile)
    roles = _roles(sch, proj_out, 1)
    rank = roles[4]  # the first sum of the output projection runs over the ranks
    rb = int(func.attrs.get(ATTR_RANK_BLOCK, int(sch.get(rank).extent)))
    rank_o, rank_i = sch.split(rank, [None, rb])
    spatial = [roles[i] for i in (1, 2, 3) if i in roles]
    sch.reorder(rank_o, *spatial, rank_i)
    blocked = [n for n in (*reversed(MID), PROJ_IN) if n in names]
    if kind == "tucker2":  # the core mixes all R3 channels: the projection is per tile only
        blocked.remove(PROJ_IN)
    for name in blocked:  # consumers first, so that each producer finds its consumer in the loop
        sch.compute_at(sch.get_sblock(name), rank_o)
    stages = [(name, 2) for name in blocked]
    if kind == "tucker2":
        sch.compute_at(sch.get_sblock(PROJ_IN), tile)
        stages.append((PROJ_IN, 1))
    for name, outer in stages:
        # A whole-map input projection is a plain 1x1 convolution: rows x columns are one run.
        fuse = whole_map and name == PROJ_IN
        block = sch.get_sblock(name)
        _schedule_stage(sch, block, outer, lanes, fuse_rows=fuse, parallel=inner_parallel)
    # CP / Tucker-2: the output projection reads a [rb, rows, Wo] tile and writes whole output
    # rows, so rows x columns is one linear run.
    _schedule_stage(
        sch,
        proj_out,
        2,
        lanes,
        decompose=False,
        fuse_rows=kind != "gkpd",
        parallel=inner_parallel,
    )
    # The accumulator is zeroed once per tile, before the first rank block.
    init = _try_block(sch.decompose_reduction, proj_out, rank_o)
    if inner_parallel and init is not None:
        sch.parallel(sch.get_loops(init)[1])
    return sch


def allocated_buffers(func: tirx.PrimFunc) -> dict[str, tuple[int, ...]]:
    """Shapes of the buffers a scheduled PrimFunc allocates, as TVM will allocate them.

    Runs the first lowering steps of TVM's own pipeline (allocation placement and
    ``CompactBufferAllocation``, which shrinks each buffer to the region its loop nest touches)
    and reads every block's ``alloc_buffers``. This is the measured counterpart of
    :func:`fused_buffers`.
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
