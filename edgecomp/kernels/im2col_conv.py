"""im2col convolution: the lowering MEC is measured against.

im2col copies every window into its own row, a ``(Ho*Wo) x (kh*kw*C)`` matrix per image, then
runs one GEMM. The GEMM block has the same iteration space and annotations as MEC's, so the
same schedule (:func:`edgecomp.kernels.mec_conv.schedule_conv_gemm_cpu`) runs both and a
comparison measures the lowering, not two different micro-kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tvm import te

from edgecomp.kernels.mec_conv import (
    _cast,
    _gemm_weight_dims,
    _tile_attrs,
    conv_out_size,
    gemm_weight,
    padded_nhwc,
    to_nchw,
)


def im2col_conv2d(
    x: te.Tensor,
    wk: te.Tensor,
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    tiles: tuple[int, int, int],
    out_dtype: str = "float32",
    out_channels: int | None = None,
) -> te.Tensor:
    """im2col + GEMM convolution; arguments as :func:`edgecomp.kernels.mec_conv.mec_conv2d`.

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
    wo_pad = math.ceil(wo / tiles[0]) * tiles[0]

    rows = (ho - 1) * sh + (kh - 1) * dh + 1
    xt = padded_nhwc(x, rows, (wo_pad - 1) * sw + (kw - 1) * dw + 1, pt, pl)
    cols = te.compute(
        (n, ho, wo_pad, kh, kw, c),
        lambda b, p, q, i, j, ch: xt[b, p * sh + i * dh, q * sw + j * dw, ch],
        name="im2col_lower",
    )
    ri = te.reduce_axis((0, kh), "ri")
    rj = te.reduce_axis((0, kw), "rj")
    rc = te.reduce_axis((0, cg), "rc")

    def gemm(b, p, q, k):
        g = k // kg if groups > 1 else 0
        a = cols[b, p, q, ri, rj, g * cg + rc if groups > 1 else rc]
        bw = gemm_weight(wk, g, k % kg if groups > 1 else k, ri, rj, rc)
        return te.sum(_cast(a, out_dtype) * _cast(bw, out_dtype), axis=[ri, rj, rc])

    conv = te.compute(
        (n, ho, wo_pad, groups * kg), gemm, name="im2col_conv", attrs=_tile_attrs("im2col", tiles)
    )
    return to_nchw(conv, groups, kg, out_channels, ho, wo)
