"""Factorizations of OIHW conv kernels (CP, Tucker-2, GKPD) and of fully connected weights
(truncated SVD), the rank policies that size them, and the cache that keeps them."""

from edgecomp.decompose.cp import CPFactors, cp_decompose, cp_max_rank
from edgecomp.decompose.kronecker import (
    KroneckerFactors,
    candidate_shapes,
    kronecker_decompose,
    kronecker_max_rank,
)
from edgecomp.decompose.rank import (
    ConvGeom,
    RankPolicy,
    canonical_method,
    chain_cost,
    choose_rank,
    conv2d_nchw,
    dense_cost,
    factorize,
    max_rank,
    parse_policy,
)
from edgecomp.decompose.svd import LowRankFactors, svd_decompose
from edgecomp.decompose.tucker import TuckerFactors, tucker2_decompose


def factor_types() -> dict[str, type]:
    """The factor classes by name (what the factor cache stores)."""
    return {
        cls.__name__: cls for cls in (CPFactors, TuckerFactors, KroneckerFactors, LowRankFactors)
    }


__all__ = [
    "CPFactors",
    "ConvGeom",
    "KroneckerFactors",
    "LowRankFactors",
    "RankPolicy",
    "TuckerFactors",
    "candidate_shapes",
    "canonical_method",
    "chain_cost",
    "choose_rank",
    "conv2d_nchw",
    "cp_decompose",
    "cp_max_rank",
    "dense_cost",
    "factor_types",
    "factorize",
    "kronecker_decompose",
    "kronecker_max_rank",
    "max_rank",
    "parse_policy",
    "svd_decompose",
    "tucker2_decompose",
]
