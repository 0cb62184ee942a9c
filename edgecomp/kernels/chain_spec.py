"""What a factor chain is: its kind, shapes, geometry and the names its kernel uses.

:class:`ChainSpec` describes one CP / Tucker-2 / GKPD chain (input shape, output channels,
kernel, ranks, convolution geometry, groups, bias and ReLU). ``DecomposeConv`` records it on
the chain's composite function (:data:`SPEC_ATTR`, see :mod:`edgecomp.passes.factor_chains`);
``RefuseChains``, the memory model (:mod:`.chain_memory`), the TE computes and the schedule
(:mod:`.fused_chain`) all read it. Ranks are padded to whole vectors here (:func:`pad_ranks`)
with zero factors, which changes no result.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import numpy as np

ATTR_KIND = "edgecomp.fused_chain"
# The composite Relax function of a chain: ``Composite`` = CHAIN + kind (as DecomposeConv emits
# it) or FUSED + kind (a chain RefuseChains fuses, bias and ReLU taken in), and the spec as JSON.
COMPOSITE = "Composite"
CHAIN = "edgecomp.chain."
FUSED = "edgecomp.fused_chain."
SPEC_ATTR = "edgecomp.chain_spec"
ATTR_TILE_ROWS = "edgecomp.tile_rows"
ATTR_RANK_BLOCK = "edgecomp.rank_block"
FLOAT_BYTES = 4

# Block names of the stages, shared by the TE computes and the schedule.
PROJ_IN = "fc_proj_in"  # 1x1 C -> R (CP, Tucker-2) / the B-factor conv (GKPD)
MID = ("fc_dw", "fc_core")  # spatial stage between the projections: CP, Tucker-2
PROJ_OUT = "fc_proj_out"  # 1x1 R -> K (CP, Tucker-2) / the A-factor conv (GKPD)
BIAS = "fc_bias"  # CP, Tucker-2: the bias added to the projection's register tile


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
    relu : bool
        Whether a ReLU follows the bias add (CP, Tucker-2; folded into the kernel too, so the
        chain's output is written once, already rectified).
    groups : int
        The dense convolution's groups: CP and Tucker-2 chains of a grouped convolution run
        every op grouped as many ways (their factors, one set per group, concatenated). Only
        chains with one group are fused.
    """

    kind: str
    in_shape: tuple[int, int, int, int]
    out_channels: int
    kernel: tuple[int, int]
    ranks: tuple[int, ...]
    geom: ConvGeometry
    bias: bool
    relu: bool = False
    groups: int = 1

    def to_json(self) -> str:
        """The spec as the JSON text :data:`SPEC_ATTR` holds."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ChainSpec:
        """The spec :meth:`to_json` wrote."""
        d = json.loads(text)
        d["geom"] = ConvGeometry(**{k: tuple(v) for k, v in d["geom"].items()})
        for key in ("in_shape", "kernel", "ranks"):
            d[key] = tuple(d[key])
        return cls(**d)

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
            return {"proj_in": r * c * sh * sw, "mid": r * kh * kw, "proj_out": r * k}
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


# CP / Tucker-2 ranks above this are padded with zero ranks to a multiple of it, so that rank
# blocks and register tiles divide them (a rank like 137 would otherwise leave a 1-wide tile).
RANK_ALIGN = 8


def padded_rank(r: int) -> int:
    """``r`` rounded up to a multiple of :data:`RANK_ALIGN` (unchanged up to ``RANK_ALIGN``)."""
    return r if r <= RANK_ALIGN else -(-r // RANK_ALIGN) * RANK_ALIGN


def pad_ranks(spec: ChainSpec, weights: list[np.ndarray]) -> tuple[ChainSpec, list[np.ndarray]]:
    """Zero-pad a CP / Tucker-2 chain's ranks to a multiple of :data:`RANK_ALIGN`.

    Exact: a zero rank adds nothing to the output. Ranks up to ``RANK_ALIGN``, and GKPD chains,
    are returned unchanged.
    """
    if spec.kind == "gkpd":
        return spec, weights
    up = padded_rank

    def pad(w: np.ndarray, axis: int, to: int) -> np.ndarray:
        widths = [(0, 0)] * w.ndim
        widths[axis] = (0, to - w.shape[axis])
        return np.pad(w, widths)

    if spec.kind == "cp":
        r = up(spec.ranks[0])
        w_in, w_v, w_h, w_out = weights
        padded = [pad(w_in, 0, r), pad(w_v, 0, r), pad(w_h, 0, r), pad(w_out, 1, r)]
        return replace(spec, ranks=(r,)), padded
    r3, r4 = (up(r) for r in spec.ranks)
    w_in, w_core, w_out = weights
    padded = [pad(w_in, 0, r3), pad(pad(w_core, 0, r4), 1, r3), pad(w_out, 1, r4)]
    return replace(spec, ranks=(r3, r4)), padded
