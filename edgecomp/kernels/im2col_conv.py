"""im2col convolution: the lowering MEC is measured against.

im2col copies every window into its own row, a ``(Ho*Wo) x (kh*kw*C)`` matrix per image, then
runs one GEMM. The GEMM block has the same iteration space and annotations as MEC's, so the
same schedule (:func:`edgecomp.kernels.conv_gemm.schedule_conv_gemm_cpu`) runs both and a
comparison measures the lowering, not two different micro-kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import te

from edgecomp.kernels.conv_common import (
    cast,
    crop_output,
    gemm_weight,
    gemm_weight_dims,
    padded_nhwc,
    tile_attrs,
    window_geometry,
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
    layout: str = "NCHW",
    key: str = "",
) -> te.Tensor:
    """im2col + GEMM convolution; arguments as :func:`edgecomp.kernels.mec_conv.mec_conv2d`.

    Returns
    -------
    te.Tensor
        Output ``[N, K, Ho, Wo]`` or ``[N, Ho, Wo, K]`` (``layout``).
    """
    n = int(x.shape[0])
    c = int(x.shape[3] if layout == "NHWC" else x.shape[1])
    groups, kg, kh, kw, cg = gemm_weight_dims(wk)
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    pt, pl, _, _ = (int(v) for v in padding)
    ho, wo, wo_pad, rows, cols_read = window_geometry(
        x, layout, kh, kw, strides, padding, dilation, tiles[0]
    )
    xt = padded_nhwc(x, rows, cols_read, pt, pl, layout)
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
        return te.sum(cast(a, out_dtype) * cast(bw, out_dtype), axis=[ri, rj, rc])

    conv = te.compute(
        (n, ho, wo_pad, groups * kg),
        gemm,
        name="im2col_conv",
        attrs=tile_attrs("im2col", tiles, layout, key),
    )
    return crop_output(conv, groups, kg, out_channels, ho, wo, layout)
