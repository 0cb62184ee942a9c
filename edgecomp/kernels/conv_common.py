"""What edgecomp's convolution kernels share: geometry, weight panels, padding, the tile cost model.

- output-size formula, the block annotations the schedule rules look for;
- weight packing into GEMM column panels (at compile time for constants, else in TE);
- the zero-padded NHWC copy every GEMM lowering reads from, and the crop of a GEMM's padded
  output back to the model's layout (NCHW or NHWC);
- the register-tile cost model (:func:`choose_tiles`), the one knob every GEMM-based kernel
  decides at legalization.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.target import Target

from edgecomp.kernels.target_info import CpuInfo, cpu_info, is_gpu

# Block annotation that marks the GEMM block of a lowered convolution (value: one of
# CONV_KINDS); the tile sizes chosen at legalization travel with it so the schedule agrees with
# the padding the compute already did.
CONV_GEMM = "edgecomp.conv_gemm"
TILE_W = "edgecomp.tile_w"
TILE_VEC = "edgecomp.tile_vec"
LANES = "edgecomp.lanes"
LAYOUT = "edgecomp.layout"
DEPTHWISE = "edgecomp.depthwise"
# The convolution's geometry (conv_key): which choice of register tile applies to it.
CONV_KEY = "edgecomp.conv_key"
# The convolution lowerings: MEC read in place (the default), MEC with its lowered buffer
# materialized, and im2col (the baseline MEC is measured against).
CONV_KINDS = ("mec", "mec-buffer", "im2col")
# Activation layouts the kernels take: NHWC between layers on CPUs, NCHW on GPUs.
LAYOUTS = ("NCHW", "NHWC")


# ----------------------------------------------------------------------------- geometry
def conv_out_size(size: int, k: int, stride: int, pad_lo: int, pad_hi: int, dil: int) -> int:
    """Output extent of one spatial axis."""
    return (size + pad_lo + pad_hi - dil * (k - 1) - 1) // stride + 1


def nchw_dims(x: te.Tensor, layout: str) -> tuple[int, int, int, int]:
    """``(N, C, H, W)`` of an activation in ``layout``."""
    if layout == "NHWC":
        n, h, w, c = (int(v) for v in x.shape)
        return n, c, h, w
    n, c, h, w = (int(v) for v in x.shape)
    return n, c, h, w


def cast(value: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    """``value`` as ``dtype``; no cast node when it already is (a same-dtype cast would hide the
    multiply-add from TVM's op-pattern analysis)."""
    return value if str(value.dtype) == dtype else value.astype(dtype)


def tile_attrs(
    kind: str, tiles: tuple[int, int, int], layout: str, key: str = ""
) -> dict[str, object]:
    """The GEMM block's annotations: its lowering, the register tile of the schedule, the
    layout its output is cropped to and the convolution's :func:`conv_key`."""
    attrs: dict[str, object] = {CONV_GEMM: kind, TILE_W: tiles[0], TILE_VEC: tiles[1]}
    attrs.update({LANES: tiles[2], LAYOUT: layout})
    if key:
        attrs[CONV_KEY] = key
    return attrs


def conv_key(
    layout: str,
    data: Sequence[int],
    weight: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> str:
    """A convolution's geometry as text: what a tuned register tile is recorded under."""
    dims = (tuple(data), tuple(weight), tuple(strides), tuple(padding), tuple(dilation), groups)
    return f"{layout} " + " ".join(str(list(d)) if isinstance(d, tuple) else str(d) for d in dims)


# The register tiles legalization takes (:func:`tile_choice`): a table conv_key -> tile (the
# tuned choices ``compile --tuning-db`` applies; other convolutions take the cost model's
# pick), or the rank of the cost model's candidate every convolution takes (0: its pick;
# ``edgecomp tune`` legalizes the model once per rank to measure the runners-up too).
_TILE_CHOICE: ContextVar[dict[str, tuple[int, int, int]] | int] = ContextVar(
    "edgecomp_tile_choice", default=0
)
TILE_VARIANTS = 3  # the cost model's best candidates edgecomp tune measures per convolution


@contextmanager
def tile_choice(choice: dict[str, tuple[int, int, int]] | int | None) -> Iterator[None]:
    """Legalize convolutions with these register tiles (see ``_TILE_CHOICE``)."""
    token = _TILE_CHOICE.set(0 if choice is None else choice)
    try:
        yield
    finally:
        _TILE_CHOICE.reset(token)


# ----------------------------------------------------------------------------- tiling choice
def choose_tiles(
    out_w: int, k_per_group: int, info: CpuInfo, reduction: int = 0
) -> tuple[int, int, int]:
    """The cost model's pick of :func:`tile_candidates`."""
    return tile_candidates(out_w, k_per_group, info, reduction)[0]


def tile_candidates(
    out_w: int, k_per_group: int, info: CpuInfo, reduction: int = 0
) -> list[tuple[int, int, int]]:
    """The register tiles of the GEMM micro-kernel, ``(tile_w, n_vec, lanes)``, best first.

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
    ranked: list[tuple[tuple[float, int, float, int], int, int]] = []
    # Panel widths that divide the channels need no padding (and keep the write-back an
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
            ranked.append((key, tile_w, n_vec))
    ranked.sort()  # n_vec = 1, tile_w = 1 always fits: never empty
    return [(tile_w, n_vec, lanes) for _, tile_w, n_vec in ranked]


def tiles_for(
    out_w: int, k_per_group: int, target: Target | None, reduction: int = 0, key: str = ""
) -> tuple[int, int, int]:
    """The register tile for ``target``: on CPUs :func:`choose_tiles`, or what
    :func:`tile_choice` says for convolution ``key``; on GPUs one thread per 4 columns x 4
    channels (the schedule binds, it needs no padding beyond 4)."""
    if target is not None and is_gpu(target):
        return min(4, out_w), 1, 4
    choice = _TILE_CHOICE.get()
    if isinstance(choice, dict):
        if key in choice:
            return tuple(int(v) for v in choice[key])  # type: ignore[return-value]
        choice = 0
    ranked = tile_candidates(out_w, k_per_group, cpu_info(target), reduction)
    return ranked[min(choice, len(ranked) - 1)]


# ----------------------------------------------------------------------------- weights
def pack_weight(w: np.ndarray, groups: int, panel: int) -> np.ndarray:
    """OIHW ``[K, C/G, kh, kw]`` -> GEMM panels ``[G, Kp/panel, kh, kw, C/G, panel]`` (numpy).

    ``Kp`` is ``K/G`` rounded up to a multiple of ``panel``; the extra channels are zeros.
    Each panel is then one contiguous stream for the micro-kernel.
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


def gemm_weight_dims(wk: te.Tensor) -> tuple[int, int, int, int, int]:
    """``(groups, K/G padded, kh, kw, C/G)`` of a weight in :func:`pack_weight`'s layout."""
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


def emit_gemm_weight(weight: relax.Expr, groups: int, panel: int) -> tuple[relax.Expr, bool]:
    """The weight in GEMM layout: packed now when it is a constant, else at run time."""
    if isinstance(weight, tvm.ir.expr.Constant):
        return relax.const(pack_weight(weight.value.numpy(), groups, panel)), True
    return weight, False


# ----------------------------------------------------------------------------- layouts
def padded_nhwc(
    x: te.Tensor, rows: int, cols: int, pad_top: int, pad_left: int, layout: str = "NCHW"
) -> te.Tensor:
    """Zero-padded NHWC copy ``[N, rows, cols, C]`` of the input (block ``conv_pad``).

    From NCHW it is a transpose: lowering from it copies runs of ``C`` (for stride 1:
    ``kw * C``) contiguous floats with no bounds test, where lowering straight from NCHW
    gathers one float per input plane (which made VGG-19's first layers' lowering cost as much
    as their GEMM). From NHWC it is a plain copy with zero borders.
    """
    n, c, h, w = nchw_dims(x, layout)

    def pad(b, r, col, ch):
        iy, ix = r - pad_top, col - pad_left
        inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
        value = x[b, iy, ix, ch] if layout == "NHWC" else x[b, ch, iy, ix]
        return tirx.if_then_else(inside, value, tirx.const(0, x.dtype))

    return te.compute((n, rows, cols, c), pad, name="conv_pad")


def gemm_input(
    x: te.Tensor, layout: str, rows: int, cols: int, padding: Sequence[int], copy: bool
) -> te.Tensor | None:
    """What a GEMM lowering reads its windows from: a padded NHWC copy, or None when it can
    read an NHWC input in place (no padding, ``copy`` not asked for; columns past the input's
    width, from rounding the output width up to the tile, are clamped by :func:`read_nhwc`:
    they only feed padded outputs, which the crop drops)."""
    pt, pl, _, _ = (int(v) for v in padding)
    if layout == "NHWC" and not copy and not any(int(v) for v in padding):
        return None
    return padded_nhwc(x, rows, cols, pt, pl, layout)


def read_nhwc(
    x: te.Tensor,
    padded: te.Tensor | None,
    b: tirx.PrimExpr,
    r: tirx.PrimExpr,
    col: tirx.PrimExpr,
    ch: tirx.PrimExpr,
    cols: int,
) -> tirx.PrimExpr:
    """Element ``[b, r, col, ch]`` of the padded copy, or of the NHWC input read in place
    (``cols``: how many columns the windows span; clamped only where that passes the width)."""
    if padded is not None:
        return padded[b, r, col, ch]
    w = int(x.shape[2])
    return x[b, r, tirx.min(col, w - 1) if cols > w else col, ch]


def crop_output(
    conv: te.Tensor,
    groups: int,
    kg_pad: int,
    out_channels: int | None,
    ho: int,
    wo: int,
    layout: str = "NCHW",
) -> te.Tensor:
    """Block ``out``: ``conv[n, p, q, k_padded]`` -> ``[n, K, Ho, Wo]`` (NCHW) or
    ``[n, Ho, Wo, K]`` (NHWC), the width and channel padding dropped."""
    n = int(conv.shape[0])
    k_total = out_channels or groups * kg_pad
    kg = k_total // groups

    def channel(k: tirx.PrimExpr) -> tirx.PrimExpr:
        return k if kg == kg_pad or groups == 1 else k // kg * kg_pad + k % kg

    if layout == "NHWC":
        return te.compute(
            (n, ho, wo, k_total), lambda b, p, q, k: conv[b, p, q, channel(k)], name="out"
        )
    return te.compute(
        (n, k_total, ho, wo), lambda b, k, p, q: conv[b, p, q, channel(k)], name="out"
    )


def window_geometry(
    x: te.Tensor,
    layout: str,
    kh: int,
    kw: int,
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    tile_w: int,
) -> tuple[int, int, int, int, int]:
    """``(Ho, Wo, Wo padded to the tile, padded rows read, padded columns read)``."""
    _, _, h, w = nchw_dims(x, layout)
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    pt, pl, pb, pr = (int(v) for v in padding)
    ho = conv_out_size(h, kh, sh, pt, pb, dh)
    wo = conv_out_size(w, kw, sw, pl, pr, dw)
    wo_pad = math.ceil(wo / tile_w) * tile_w
    rows = (ho - 1) * sh + (kh - 1) * dh + 1  # padded input rows some window touches
    cols = (wo_pad - 1) * sw + (kw - 1) * dw + 1  # padded input columns some window touches
    return ho, wo, wo_pad, rows, cols
