"""Rank policies: which rank each convolution gets, and what it costs.

Policies (``--rank-policy``):

- ``rank=R``: the same rank everywhere (Tucker-2: ``(min(R, K), min(R, C))``); ``rank=full``:
  each layer at the rank where its decomposition is exact (to check a chain, not to save).
- ``params=3x`` / ``flops=2x``: per layer, the largest rank whose factor chain has at least
  that many times fewer parameters / multiply-adds than the dense conv.
- ``error=0.05``: per layer, the smallest rank whose relative weight error is <= 0.05.
- ``output=0.05``: per layer, the smallest rank whose relative error of the conv's output
  (before bias) on the calibration inputs is <= 0.05; needs ``--calib``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgecomp.decompose.cache import cached_factorization
from edgecomp.decompose.cp import ALGORITHM_VERSION, cp_decompose, cp_max_rank
from edgecomp.decompose.kronecker import (
    Shape4,
    candidate_shapes,
    kronecker_decompose,
    kronecker_max_rank,
    kronecker_spectrum,
)
from edgecomp.decompose.norms import relative_error
from edgecomp.decompose.svd import LowRankFactors, fc_max_rank, svd_decompose, svd_spectrum
from edgecomp.decompose.tucker import tucker2_decompose
from edgecomp.errors import EdgecompError

METHODS = {
    "cp": "cp",
    "tucker": "tucker",
    "tucker2": "tucker",
    "kronecker": "kronecker",
    "gkpd": "kronecker",
}
POLICY_HELP = "rank=R | rank=full | params=3x | flops=2x | error=0.05 | output=0.05"


@dataclass(frozen=True)
class RankPolicy:
    """A parsed ``--rank-policy``: ``kind`` in rank/params/flops/error/output and its value."""

    kind: str
    value: float

    def __str__(self) -> str:
        if self.kind == "rank" and self.value == float("inf"):
            return "rank=full"
        if self.kind == "rank":
            return f"rank={int(self.value)}"
        if self.kind in ("params", "flops"):
            return f"{self.kind}={self.value:g}x"
        return f"{self.kind}={self.value:g}"


def canonical_method(method: str) -> str:
    """``cp`` / ``tucker`` / ``kronecker`` (``tucker2`` and ``gkpd`` are aliases)."""
    try:
        return METHODS[method.lower()]
    except KeyError:
        raise EdgecompError(
            f"--decompose {method!r} is not a method; allowed: cp, tucker, kronecker (gkpd)"
        ) from None


def parse_policy(text: str | RankPolicy) -> RankPolicy:
    """Parse a ``--rank-policy`` string; raise EdgecompError saying what is allowed."""
    if isinstance(text, RankPolicy):
        return text
    if text.strip().replace(" ", "") == "rank=full":
        return RankPolicy("rank", float("inf"))
    m = re.fullmatch(r"\s*(rank|params|flops|error|output)\s*=\s*([0-9.eE+-]+?)\s*(x?)\s*", text)
    bad = EdgecompError(f"--rank-policy {text!r} does not parse; allowed: {POLICY_HELP}")
    if not m:
        raise bad
    kind, num, x = m.groups()
    try:
        value = float(num)
    except ValueError:
        raise bad from None
    if kind == "rank" and (x or value != int(value) or value < 1):
        raise EdgecompError(f"--rank-policy {text!r}: rank must be an integer >= 1")
    if kind in ("params", "flops") and not value > 1:
        raise EdgecompError(f"--rank-policy {text!r}: {kind} reduction must be > 1, e.g. {kind}=2x")
    if kind in ("error", "output") and (x or not 0 < value < 1):
        raise EdgecompError(
            f"--rank-policy {text!r}: {kind} budget must be in (0, 1), e.g. {kind}=0.05"
        )
    return RankPolicy(kind, value)


@dataclass(frozen=True)
class ConvGeom:
    """One NCHW/OIHW conv: input [C, H, W], kernel [K, C, kh, kw], stride, padding (t, l, b, r),
    dilation."""

    in_shape: tuple[int, int, int]
    w_shape: Shape4
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]

    @property
    def out_hw(self) -> tuple[int, int]:
        _, h, w = self.in_shape
        _, _, kh, kw = self.w_shape
        pt, pl, pb, pr = self.padding
        ho = (h + pt + pb - self.dilation[0] * (kh - 1) - 1) // self.strides[0] + 1
        wo = (w + pl + pr - self.dilation[1] * (kw - 1) - 1) // self.strides[1] + 1
        return ho, wo


def dense_cost(g: ConvGeom) -> tuple[int, int]:
    """(params, multiply-adds) of the dense conv, bias excluded."""
    k, c, kh, kw = g.w_shape
    ho, wo = g.out_hw
    return k * c * kh * kw, k * c * kh * kw * ho * wo


def chain_cost(
    method: str, g: ConvGeom, rank: int, shapes: tuple[Shape4, Shape4] | None = None
) -> tuple[int, int]:
    """(params, multiply-adds) of the factor chain :mod:`edgecomp.passes.decompose_conv` emits.

    GKPD needs its factor ``shapes``; its params count each factor once (``R * (|A| + |B|)``),
    as the re-fused kernel stores them; the unfused chain repeats them per channel group.
    """
    k, c, kh, kw = g.w_shape
    _, h, w = g.in_shape
    ho, wo = g.out_hw
    pt, _, pb, _ = g.padding
    if method == "cp":
        # 1x1 on H x W, vertical on Ho x W (no horizontal padding/stride yet), horizontal, 1x1.
        macs = rank * (c * h * w + kh * ho * w + kw * ho * wo + k * ho * wo)
        return rank * (c + kh + kw + k), macs
    if method == "tucker":
        r_out, r_in = tucker_ranks(g.w_shape, rank)
        macs = c * r_in * h * w + r_in * r_out * kh * kw * ho * wo + r_out * k * ho * wo
        return c * r_in + r_in * r_out * kh * kw + r_out * k, macs
    if shapes is None:
        raise ValueError("chain_cost('kronecker', ...) needs the factor shapes")
    (k1, c1, kh1, kw1), (k2, c2, kh2, kw2) = shapes
    hz = h + pt + pb - g.dilation[0] * (kh2 - 1)
    wz = w + g.padding[1] + g.padding[3] - g.dilation[1] * (kw2 - 1)
    macs = c1 * rank * k2 * c2 * kh2 * kw2 * hz * wz + k * rank * c1 * kh1 * kw1 * ho * wo
    return rank * (k1 * c1 * kh1 * kw1 + k2 * c2 * kh2 * kw2), macs


def tucker_ranks(w_shape: Shape4, rank: int) -> tuple[int, int]:
    """(R_out, R_in) for a scalar Tucker-2 rank: each clipped to its channel count."""
    return min(rank, w_shape[0]), min(rank, w_shape[1])


def max_rank(method: str, w_shape: Shape4) -> int:
    """The largest meaningful rank: the decomposition is exact there (GKPD: for its best
    factor shapes)."""
    if method == "cp":
        return cp_max_rank(w_shape)
    if method == "tucker":
        return max(w_shape[0], w_shape[1])
    return max(kronecker_max_rank(w_shape, sh) for sh in candidate_shapes(w_shape))


def factorize(method: str, weight: np.ndarray, rank: int, shapes=None):  # noqa: ANN001, ANN201
    """The factors of ``weight`` at ``rank`` (CPFactors, TuckerFactors, KroneckerFactors, or
    LowRankFactors for ``method="svd"`` on a fully connected weight; GKPD also needs its factor
    ``shapes``), from the factor cache when it has them (:mod:`edgecomp.decompose.cache`)."""
    request = {
        "method": method,
        "rank": int(rank),
        "shapes": None if shapes is None else [list(map(int, s)) for s in shapes],
        "version": ALGORITHM_VERSION if method == "cp" else 1,
    }

    def compute():  # noqa: ANN202
        if method == "cp":
            return cp_decompose(weight, rank)
        if method == "svd":
            return svd_decompose(weight, rank)
        if method == "tucker":
            return tucker2_decompose(weight, tucker_ranks(weight.shape, rank))  # type: ignore[arg-type]
        return kronecker_decompose(weight, rank, shapes)

    return cached_factorization(weight, request, compute)


def fc_cost(shape: tuple[int, int], rank: int | None = None) -> tuple[int, int]:
    """(params, multiply-adds per input row) of a ``[N_in, N_out]`` fully connected layer,
    dense (``rank=None``) or as two thinner layers of rank R; bias excluded."""
    n_in, n_out = shape
    cost = n_in * n_out if rank is None else rank * (n_in + n_out)
    return cost, cost


def choose_fc_rank(
    policy: RankPolicy, weight: np.ndarray, calib_inputs: np.ndarray | None = None
) -> tuple[int, LowRankFactors | None]:
    """The rank ``policy`` gives a fully connected weight ``[N_in, N_out]``, and its factors.

    ``(0, None)`` when no rank meets the policy with a saving. The error policies read the
    error at every rank off one spectrum; ``output=e`` measures ``x @ W`` on the layer's
    calibration inputs ``x [N, N_in]`` (the spectrum of ``x @ W`` bounds it from below).
    """
    top = fc_max_rank(weight.shape)
    dense = fc_cost(weight.shape)[0]
    if policy.kind == "rank":
        if policy.value == float("inf"):
            return top, factorize("svd", weight, top)
        if policy.value > top:
            raise EdgecompError(
                f"--rank-policy rank={int(policy.value)} exceeds the full rank {top} of the "
                f"fully connected weight {weight.shape}; allowed 1..{top}"
            )
        return int(policy.value), factorize("svd", weight, int(policy.value))
    useful = [r for r in range(1, top + 1) if fc_cost(weight.shape, r)[0] < dense]
    if not useful:
        return 0, None
    if policy.kind in ("params", "flops"):
        ok = [r for r in useful if fc_cost(weight.shape, r)[0] * policy.value <= dense]
        return (ok[-1], factorize("svd", weight, ok[-1])) if ok else (0, None)
    if policy.kind == "error":
        spectrum = svd_spectrum(weight)
        under = [r for r in useful if spectrum[r] <= policy.value]
        return (under[0], factorize("svd", weight, under[0])) if under else (0, None)
    if calib_inputs is None:
        raise EdgecompError("--rank-policy output=... needs calibration inputs (--calib FILE.npy)")
    x = calib_inputs.reshape(-1, weight.shape[0]).astype(np.float64)
    ref = x @ weight

    def measure(f) -> float:  # noqa: ANN001
        return relative_error(x @ f.weight(), ref)

    return _smallest_rank(lambda r: factorize("svd", weight, r), measure, policy.value, useful[-1])


def conv2d_nchw(
    x: np.ndarray, w: np.ndarray, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)
) -> np.ndarray:  # noqa: ANN001
    """Reference dense conv in numpy: x [N, C, H, W], w [K, C, kh, kw], padding (t, l, b, r)."""
    k, c, kh, kw = w.shape
    pt, pl, pb, pr = padding
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    g = ConvGeom(x.shape[1:], w.shape, tuple(strides), tuple(padding), tuple(dilation))  # type: ignore[arg-type]
    ho, wo = g.out_hw
    sh, sw = strides
    dh, dw = dilation
    out = np.zeros((x.shape[0], k, ho, wo), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[
                :,
                :,
                i * dh : i * dh + sh * (ho - 1) + 1 : sh,
                j * dw : j * dw + sw * (wo - 1) + 1 : sw,
            ]
            out += np.einsum("nchw,kc->nkhw", patch, w[:, :, i, j], optimize=True)
    return out


def choose_rank(
    method: str,
    policy: RankPolicy,
    weight: np.ndarray,
    geom: ConvGeom,
    calib_inputs: np.ndarray | None = None,
):  # noqa: ANN201 - (rank, factors)
    """The rank ``policy`` gives this layer, and the factors at that rank.

    Returns ``(rank, factors)``; ``(0, None)`` when no rank meets the policy at a FLOP saving.
    GKPD tries every candidate factor shape (:func:`candidate_shapes`) and keeps the one that
    meets the policy best: the lowest error for ``rank``/``params``/``flops``, the fewest FLOPs
    for ``error``/``output``.
    """
    top = max_rank(method, geom.w_shape)
    if policy.kind == "rank" and top < policy.value < float("inf"):
        raise EdgecompError(
            f"--rank-policy rank={int(policy.value)} exceeds the full rank {top} of a {method} "
            f"decomposition of kernel {geom.w_shape}; allowed 1..{top}"
        )
    if policy.kind == "output" and calib_inputs is None:
        raise EdgecompError("--rank-policy output=... needs calibration inputs (--calib FILE.npy)")
    if method != "kronecker":
        return _rank_for(policy, method, weight, geom, calib_inputs, None)
    if policy.kind == "output":  # measured per candidate shape: slow, but only with --calib
        best = (0, None, (float("inf"), float("inf")))
        for shapes in candidate_shapes(geom.w_shape):
            rank, factors = _rank_for(policy, method, weight, geom, calib_inputs, shapes)
            if factors is not None:
                score = (chain_cost(method, geom, rank, shapes)[1], factors.error)
                best = min(best, (rank, factors, score), key=lambda b: b[2])
        return best[0], best[1]
    return _choose_kronecker(policy, weight, geom)


def _choose_kronecker(policy: RankPolicy, weight: np.ndarray, geom: ConvGeom):  # noqa: ANN202
    """GKPD under a rank, params, flops or error policy: one SVD (singular values only) per
    candidate shape gives the error at every rank; only the winner is factorized."""
    dense = dense_cost(geom)
    best: tuple[tuple[float, float], int, tuple[Shape4, Shape4]] | None = None
    for shapes in candidate_shapes(geom.w_shape):
        top = kronecker_max_rank(geom.w_shape, shapes)

        def cost(r: int, shapes=shapes) -> tuple[int, int]:  # noqa: ANN001
            return chain_cost("kronecker", geom, r, shapes)

        full = policy.kind == "rank" and policy.value == float("inf")
        spectrum = None if full else kronecker_spectrum(weight, shapes)
        if policy.kind == "rank":
            ranks = [top] if full else [int(policy.value)] if policy.value <= top else []
        elif policy.kind in ("params", "flops"):
            pick = 0 if policy.kind == "params" else 1
            within = [r for r in range(1, top + 1) if cost(r)[pick] * policy.value <= dense[pick]]
            ranks = within[-1:]  # the largest
        else:  # error budget: the smallest rank under it, among those that save FLOPs
            assert spectrum is not None  # computed for every policy but rank=full
            ranks = [
                r
                for r in range(1, top + 1)
                if cost(r)[1] < dense[1] and spectrum[r] <= policy.value
            ][:1]  # the smallest
        if not ranks:
            continue
        rank = ranks[0]
        error = 0.0 if spectrum is None else float(spectrum[rank])
        score = (cost(rank)[1], error) if policy.kind == "error" or full else (error, cost(rank)[1])
        if best is None or score < best[0]:
            best = (score, rank, shapes)
    if best is None:
        return 0, None
    _, rank, shapes = best
    return rank, factorize("kronecker", weight, rank, shapes)


def _rank_for(policy, method, weight, geom, calib_inputs, shapes):  # noqa: ANN001, ANN202
    """(rank, factors) for one method (and GKPD factor shapes) under ``policy``."""
    top = (
        max_rank(method, geom.w_shape)
        if shapes is None
        else kronecker_max_rank(geom.w_shape, shapes)
    )
    if policy.kind == "rank":
        rank = top if policy.value == float("inf") else int(policy.value)
        return (rank, factorize(method, weight, rank, shapes)) if rank <= top else (0, None)
    dense = dense_cost(geom)
    if policy.kind in ("params", "flops"):
        pick = 0 if policy.kind == "params" else 1
        ok = [
            r
            for r in range(1, top + 1)
            if chain_cost(method, geom, r, shapes)[pick] * policy.value <= dense[pick]
        ]
        return (max(ok), factorize(method, weight, max(ok), shapes)) if ok else (0, None)
    # Past the FLOP break-even a chain never pays, so the search stops there (and CP's exact
    # rank is far beyond it: ALS at that size would be slow for nothing).
    useful = [r for r in range(1, top + 1) if chain_cost(method, geom, r, shapes)[1] < dense[1]]
    if not useful:
        return 0, None
    if policy.kind == "output":
        conv = (geom.strides, geom.padding, geom.dilation)
        ref = conv2d_nchw(calib_inputs, weight, *conv)

        def measure(f) -> float:  # noqa: ANN001
            return relative_error(conv2d_nchw(calib_inputs, f.weight(), *conv), ref)
    else:

        def measure(f) -> float:  # noqa: ANN001
            return float(f.error)

    return _smallest_rank(
        lambda r: factorize(method, weight, r, shapes), measure, policy.value, max(useful)
    )


def _smallest_rank(fact: Callable, measure: Callable, budget: float, top: int):  # noqa: ANN202
    """Binary search of the smallest rank <= top with ``measure <= budget`` (errors fall with
    rank); ``(0, None)`` when even ``top`` misses the budget."""
    lo, hi = 1, top
    best_rank, best = 0, None
    while lo <= hi:
        mid = (lo + hi) // 2
        f = fact(mid)
        if measure(f) <= budget:
            best, best_rank, hi = f, mid, mid - 1
        else:
            lo = mid + 1
    return best_rank, best
