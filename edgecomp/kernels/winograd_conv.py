"""Winograd F(2x2, 3x3) convolution (Lavin and Gray, CVPR 2016) for NHWC on CPUs: the TE
compute, the weight transform and the schedules of its two transforms.

Each 2 x 2 output tile comes from a 4 x 4 input tile ``d`` (stride 2, overlapping by 2) as
``Y = A^T [ (G g G^T) . (B^T d B) ] A``: 16 products per tile and channel pair instead of 36,
so 2.25x fewer multiply-adds than a direct 3 x 3 convolution. The 16 elementwise products,
summed over input channels, are 16 independent GEMMs ``tiles x C . C x K``; here they are one
grouped 1 x 1 convolution with 16 groups over the transformed input, so the register-tiled
GEMM of :mod:`.mec_conv` / :mod:`.conv_gemm` computes them unchanged. Blocks:

- ``winograd_input``: ``V[n, ti, tj, nu*C + c] = (B^T d B)[nu]`` for the tile at ``(ti, tj)``
  (the padding read as zeros), ``nu = 4a + b``;
- the grouped GEMM (``mec_conv``, ``out``) over ``V`` with the transformed weight
  ``U[nu] = G g G^T`` packed at compile time (constant weights only);
- ``winograd_output``: ``y[n, h, w, k] = (A^T M A)[h % 2, w % 2]`` from the 16 products of
  the tile at ``(h // 2, w // 2)``; bias, ReLU and the other fused epilogues are inlined in it.

F(2x2, 3x3)'s transforms hold only 0, +-1 and 1/2 (the latter in the weight's, done once in
float64), so its error stays near a direct convolution's (VGG-19 end to end against ONNX
Runtime: 1.4e-5 relative, 6e-6 without); F(4x4, 3x3) would save more multiply-adds at a larger
error. The transformed weight is 16/9 of the original's size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tvm import s_tir, te, tirx
from tvm.target import Target

from edgecomp.kernels import schedules
from edgecomp.kernels.conv_common import LANES, pack_weight
from edgecomp.kernels.conv_gemm import schedule_conv_gemm_cpu
from edgecomp.kernels.mec_conv import mec_conv2d
from edgecomp.kernels.target_info import cpu_info

TILE = 2  # output tile m of F(m x m, 3 x 3)
ALPHA = 4  # input tile m + 2
WINOGRAD_INPUT = "winograd_input"
WINOGRAD_OUTPUT = "winograd_output"
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])


def winograd_applies(
    layout: str,
    weight_shape: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    out_hw: tuple[int, int],
    constant_weight: bool,
    lanes: int,
) -> bool:
    """Where Winograd pays on a CPU: a dense NHWC 3 x 3 convolution, stride and dilation 1,
    with a constant weight, channels in whole vectors and enough of them that the 16 GEMMs,
    not the transforms, take the time (at least 32 in and out), on maps of at least 7 x 7.
    (On the AVX-512 host, per layer: 16 -> 16 @56 1.5x slower, 24 -> 24 @28 2.3x slower in
    scalar transforms; 32 -> 32 @80 1.6x, 64 -> 64 @224 1.7x, 512 -> 512 @7 1.2x faster.)"""
    k, c, kh, kw = (int(v) for v in weight_shape)
    return (
        layout == "NHWC"
        and constant_weight
        and groups == 1
        and (kh, kw) == (3, 3)
        and all(int(v) == 1 for v in (*strides, *dilation))
        and min(c, k) >= 32
        and c % lanes == 0
        and k % lanes == 0
        and min(out_hw) >= 7
    )


def winograd_weight(w: np.ndarray, panel: int) -> np.ndarray:
    """OIHW ``[K, C, 3, 3]`` -> ``U[nu] = G g G^T`` as the weight of a 16-group 1 x 1
    convolution (``[16K, C, 1, 1]``), packed into GEMM panels (:func:`pack_weight`)."""
    k, c = w.shape[:2]
    u = np.einsum("ai,kcij,bj->abkc", _G, w.astype(np.float64), _G)  # [4, 4, K, C]
    grouped = u.reshape(ALPHA * ALPHA * k, c, 1, 1).astype(w.dtype)
    return pack_weight(grouped, ALPHA * ALPHA, panel)


def _input_row(t: tirx.PrimExpr, f: Callable[[int], tirx.PrimExpr]) -> tirx.PrimExpr:
    """Row ``t`` of ``B^T`` applied to ``f(0..3)``."""
    return tirx.Select(
        t == 0,
        f(0) - f(2),
        tirx.Select(t == 1, f(1) + f(2), tirx.Select(t == 2, f(2) - f(1), f(1) - f(3))),
    )


def _output_row(s: tirx.PrimExpr, f: Callable[[int], tirx.PrimExpr]) -> tirx.PrimExpr:
    """Row ``s`` of ``A^T`` applied to ``f(0..3)``."""
    return tirx.Select(s == 0, f(0) + f(1) + f(2), f(1) - f(2) - f(3))


def winograd_conv2d(
    x: te.Tensor,
    wk: te.Tensor,
    padding: Sequence[int],
    tiles: tuple[int, int, int],
    out_channels: int,
    out_dtype: str = "float32",
    key: str = "",
) -> te.Tensor:
    """3 x 3 stride-1 convolution of an NHWC input by Winograd F(2x2, 3x3).

    ``wk`` is :func:`winograd_weight`'s packed ``U``; ``tiles`` the register tile of the
    grouped GEMM (its width is in tiles of 2 output columns); returns ``[N, Ho, Wo, K]``.
    """
    n, h, w, c = (int(v) for v in x.shape)
    pt, pl, pb, pr = (int(v) for v in padding)
    ho, wo = h + pt + pb - 2, w + pl + pr - 2
    th, tw = -(-ho // TILE), -(-wo // TILE)

    def transformed(b, ti, tj, ch):  # noqa: ANN001, ANN202
        nu, cc = ch // c, ch % c

        def d(i: int, j: int) -> tirx.PrimExpr:
            r, q = ti * TILE + i - pt, tj * TILE + j - pl
            inside = tirx.all(r >= 0, r < h, q >= 0, q < w)
            return tirx.if_then_else(inside, x[b, r, q, cc], tirx.const(0, x.dtype))

        return _input_row(nu // ALPHA, lambda i: _input_row(nu % ALPHA, lambda j: d(i, j)))

    v = te.compute((n, th, tw, ALPHA * ALPHA * c), transformed, name=WINOGRAD_INPUT)
    products = mec_conv2d(
        v, wk, (1, 1), (0, 0, 0, 0), (1, 1), tiles, out_dtype, ALPHA * ALPHA * out_channels,
        layout="NHWC", key=key,
    )  # fmt: skip

    def untransformed(b, p, q, k):  # noqa: ANN001, ANN202
        def m(a: int, e: int) -> tirx.PrimExpr:
            return products[b, p // TILE, q // TILE, (a * ALPHA + e) * out_channels + k]

        return _output_row(p % TILE, lambda a: _output_row(q % TILE, lambda e: m(a, e)))

    return te.compute((n, ho, wo, out_channels), untransformed, name=WINOGRAD_OUTPUT)


def is_winograd(sch: s_tir.Schedule) -> bool:
    """Whether the function's convolution GEMM is the grouped GEMM of a Winograd kernel."""
    return any(_named(sch, b, WINOGRAD_INPUT) for b in schedules.all_blocks(sch))


def _named(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, name: str) -> bool:
    return str(sch.get(block).name_hint) == name


def schedule_winograd_cpu(
    sch: s_tir.Schedule, gemm: s_tir.schedule.SBlockRV, target: Target, tunable: bool
) -> None:
    """The grouped GEMM as any convolution's (:func:`schedule_conv_gemm_cpu`). Where its
    weight fits the target's cache budget, by bands: each parallel iteration transforms one
    row of input tiles, multiplies it and transforms it back, so that ``V`` and the products
    stay in cache (on VGG's 224 x 224 x 64 maps they are 51 MB each); else (the weight read
    once per band would cost more) each transform is a parallel pass of its own."""
    lanes = int(sch.get(gemm).annotations[LANES])
    (transform,) = (b for b in schedules.all_blocks(sch) if _named(sch, b, WINOGRAD_INPUT))
    (untransform,) = (b for b in schedules.all_blocks(sch) if _named(sch, b, WINOGRAD_OUTPUT))
    untransform = schedules.inline_epilogues(sch, untransform)
    weight = sch.get(gemm).reads[1].source
    weight_bytes = 4 * int(np.prod([int(d) for d in weight.shape]))
    banded = weight_bytes <= cpu_info(target).panel_bytes
    band = _schedule_output(sch, untransform, lanes)
    if banded:
        sch.parallel(band)
        (crop,) = sch.get_producers(untransform)
        sch.compute_at(crop, band, preserve_unit_loops=True)
        sch.compute_at(gemm, band, preserve_unit_loops=True)
        for lowering in sch.get_producers(gemm):
            if _named(sch, lowering, "mec_lower"):
                sch.compute_inline(lowering)  # V's consumer must be under the band too
        sch.compute_at(transform, band, preserve_unit_loops=True)
    schedule_conv_gemm_cpu(sch, gemm, target, tunable, nested=banded)
    _schedule_input(sch, transform, lanes, parallel=not banded)
    if not banded:
        sch.parallel(band)


def _schedule_input(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int, parallel: bool
) -> None:
    """Per tile and channel vector the 16 transforms unrolled (their row selections fold into
    constants), so the 4 x 4 input vectors are read once; parallel over tile rows when it
    is a pass of its own."""
    *outer, tj, ch = sch.get_loops(block)[-4:]
    channels = int(sch.get(ch).extent) // (ALPHA * ALPHA)
    nu, c = sch.split(ch, [ALPHA * ALPHA, channels])
    vec = lanes if channels % lanes == 0 else 1
    c_o, c_i = sch.split(c, [None, vec])
    sch.reorder(tj, c_o, nu, c_i)
    if parallel:
        sch.parallel(sch.fuse(*outer))
    sch.unroll(nu)
    if vec > 1:
        sch.vectorize(c_i)


def _schedule_output(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int
) -> s_tir.schedule.LoopRV:
    """Per 2 x 2 tile and channel vector, unrolled (the selections of ``A^T`` fold), the
    epilogue included; returns the loop over tile rows (the caller parallelizes it)."""
    b, p, q, k = sch.get_loops(block)
    channels = int(sch.get(k).extent)
    p_o, p_i = sch.split(p, [None, TILE])
    q_o, q_i = sch.split(q, [None, TILE])
    vec = lanes if channels % lanes == 0 else 1
    k_o, k_i = sch.split(k, [None, vec])
    sch.reorder(b, p_o, q_o, k_o, p_i, q_i, k_i)
    sch.unroll(p_i)
    sch.unroll(q_i)
    if vec > 1:
        sch.vectorize(k_i)
    return sch.fuse(b, p_o)
