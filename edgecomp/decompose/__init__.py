"""Factorizations of OIHW conv kernels (CP, Tucker-2, GKPD) and the rank policies that size them."""

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
from edgecomp.decompose.tucker import TuckerFactors, tucker2_decompose

__all__ = [
    "CPFactors",
    "ConvGeom",
    "KroneckerFactors",
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
    "factorize",
    "kronecker_decompose",
    "kronecker_max_rank",
    "max_rank",
    "parse_policy",
    "tucker2_decompose",
]
