"""MEC convolution (Cho and Brand, ICML 2017): the TE compute, in NCHW and NHWC.

MEC lowers the input along one spatial axis only. For output column ``q`` the lowered buffer
holds every padded input row, each with the ``kw`` input columns the window at ``q`` covers::

    L[n, q, r, j, c] = xpad[n, r, q * sw + j * dw, c]          # shape Wo x (H * kw * C) per image

so the window of output pixel ``(p, q)`` is the contiguous slice ``L[n, q, p*sh : p*sh + kh]``
(for dh = 1), and output row ``p`` is one small GEMM ``Wo x (kh*kw*C) . (kh*kw*C) x K`` whose
A operand is a window of ``L`` with leading dimension ``H*kw*C``; consecutive rows' windows
overlap by ``(kh - sh) * kw * C``. The lowered buffer is ``kh / sh`` times smaller than im2col's.

Blocks of the compute (the schedule in :mod:`edgecomp.kernels.conv_gemm` finds them by name /
annotation):

- ``conv_pad``: zero-padded NHWC copy of the input. From NCHW it is a transpose, so that
  building ``L`` copies runs of contiguous channels; from NHWC (activations stay NHWC between
  layers on CPUs) it is a copy with zero borders, and it is left out altogether when the
  convolution has no padding (1x1 convolutions above all: a plain GEMM on the input);
- ``mec_lower``: the lowered buffer ``L`` above (output width padded to the register tile).
  Each of its rows ``L[n, q, r]`` (``kw * C`` floats) is, for dilation 1, the contiguous run
  ``xpad[n, r, q*sw : q*sw + kw, :]``: ``L`` is a strided view of the padded input. By default
  (lowering ``"mec"``) the schedule inlines it and the GEMM reads its overlapping windows in
  place: no lowered buffer at all (on the x86 host 3-15% faster per VGG-19 layer than copying
  it first). Lowering ``"mec-buffer"`` materializes ``L`` as in the paper;
- ``mec_conv``: the GEMMs, writing ``conv[n, p, q, k]`` (channels innermost, so that the
  micro-kernel vectorizes over output channels whatever the image width), annotated
  ``edgecomp.conv_gemm`` with the tile chosen at legalization;
- ``out``: the crop of the padded width and channels, in the model's layout (a transpose for
  NCHW); bias, ReLU, residual additions and other elementwise epilogues fused by ``FuseOps``
  are inlined into it.

Grouped convolutions with more than one input channel per group use the same kernel (the group
picks a channel slice of ``L``).
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import te

from edgecomp.kernels.conv_common import (
    cast,
    crop_output,
    gemm_input,
    gemm_weight,
    gemm_weight_dims,
    read_nhwc,
    tile_attrs,
    window_geometry,
)


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
    layout: str = "NCHW",
    key: str = "",
) -> te.Tensor:
    """MEC convolution of an NCHW or NHWC input with a weight in GEMM layout.

    Parameters
    ----------
    x : te.Tensor
        Input ``[N, C, H, W]`` (``layout="NCHW"``) or ``[N, H, W, C]`` (``"NHWC"``).
    wk : te.Tensor
        Weight ``[G, K/G/kv, kh, kw, C/G, kv]`` with ``kv = n_vec * lanes``: for each group the
        ``(kh*kw*C/G) x (K/G)`` B operand of the GEMM, cut into column panels of the
        micro-kernel's width so that each panel is one contiguous stream (see
        :func:`edgecomp.kernels.conv_common.pack_weight`).
    strides, dilation : sequence of int
        ``(sh, sw)`` and ``(dh, dw)``.
    padding : sequence of int
        ``(top, left, bottom, right)`` as in ``relax.nn.conv2d``.
    tiles : (tile_w, n_vec, lanes)
        Register tile from :func:`~edgecomp.kernels.conv_common.choose_tiles`; the output
        width is padded to ``tile_w``.
    out_dtype : str
        Accumulation and output dtype.
    out_channels : int, optional
        ``K`` when the packed weight carries zero-padded channels (default: no padding).
    buffered : bool
        Mark the GEMM ``"mec-buffer"``: the schedule then materializes the lowered buffer
        instead of reading it in place from the padded copy (see the module docstring).
    layout : {"NCHW", "NHWC"}
        Layout of the input and of the output.
    key : str
        The convolution's :func:`~edgecomp.kernels.conv_common.conv_key`, annotated on the
        GEMM block (``edgecomp tune`` records the tile it chose under it).

    Returns
    -------
    te.Tensor
        Output ``[N, K, Ho, Wo]`` or ``[N, Ho, Wo, K]``.
    """
    n = int(x.shape[0])
    c = int(x.shape[3] if layout == "NHWC" else x.shape[1])
    groups, kg, kh, kw, cg = gemm_weight_dims(wk)
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    ho, wo, wo_pad, rows, cols = window_geometry(
        x, layout, kh, kw, strides, padding, dilation, tiles[0]
    )
    xt = gemm_input(x, layout, rows, cols, padding, copy=buffered)
    lowered = te.compute(
        (n, wo_pad, rows, kw, c),
        lambda b, q, r, j, ch: read_nhwc(x, xt, b, r, q * sw + j * dw, ch, cols),
        name="mec_lower",
    )
    ri = te.reduce_axis((0, kh), "ri")
    rj = te.reduce_axis((0, kw), "rj")
    rc = te.reduce_axis((0, cg), "rc")

    def gemm(b, p, q, k):
        g = k // kg if groups > 1 else 0
        a = lowered[b, q, p * sh + ri * dh, rj, g * cg + rc if groups > 1 else rc]
        bw = gemm_weight(wk, g, k % kg if groups > 1 else k, ri, rj, rc)
        return te.sum(cast(a, out_dtype) * cast(bw, out_dtype), axis=[ri, rj, rc])

    conv = te.compute(
        (n, ho, wo_pad, groups * kg),
        gemm,
        name="mec_conv",
        attrs=tile_attrs("mec-buffer" if buffered else "mec", tiles, layout, key),
    )
    return crop_output(conv, groups, kg, out_channels, ho, wo, layout)
