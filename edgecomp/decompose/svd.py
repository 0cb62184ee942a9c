"""Truncated SVD of a fully connected (``Gemm`` / ``MatMul``) weight into two thinner layers.

``y = x @ W`` with ``W [N_in, N_out]`` becomes ``y = (x @ A) @ B`` with ``A [N_in, R]`` and
``B [R, N_out]``: ``R * (N_in + N_out)`` parameters and multiply-adds per row instead of
``N_in * N_out``. The singular values are split evenly (``A = U sqrt(S)``, ``B = sqrt(S) V^T``)
so both factors are equally scaled in float32. Exact at ``R = min(N_in, N_out)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from edgecomp.decompose.norms import relative_error
from edgecomp.errors import EdgecompError

SMALL = 1 << 20  # weights up to this many elements get an exact float64 SVD


@dataclass(frozen=True)
class LowRankFactors:
    """Factors of a rank-R fully connected weight: A [N_in, R], B [R, N_out]."""

    a: np.ndarray
    b: np.ndarray
    error: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def weight(self) -> np.ndarray:
        """The reconstructed ``[N_in, N_out]`` weight."""
        return (self.a @ self.b).astype(np.float32)


def fc_max_rank(shape: tuple[int, ...]) -> int:
    """The rank at which the SVD of a ``[N_in, N_out]`` weight is exact."""
    return int(min(shape))


def svd_spectrum(weight: np.ndarray) -> np.ndarray:
    """Relative error at every rank ``0..min(shape)``, from the singular values alone."""
    w32 = np.asarray(weight, dtype=np.float32)
    with threadpool_limits(1):
        small = w32.T @ w32 if w32.shape[0] >= w32.shape[1] else w32 @ w32.T
        energy = np.sort(np.maximum(np.linalg.eigvalsh(small.astype(np.float64)), 0.0))[::-1]
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    return np.sqrt(tail / max(float(tail[0]), 1e-300))


def svd_decompose(weight: np.ndarray, rank: int) -> LowRankFactors:
    """Rank-``rank`` truncated SVD of a ``[N_in, N_out]`` weight.

    Parameters
    ----------
    weight : np.ndarray
        The matmul's constant right operand.
    rank : int
        1 <= R <= min(N_in, N_out).

    Returns
    -------
    LowRankFactors
    """
    if weight.ndim != 2:
        raise EdgecompError(
            f"a low-rank fully connected layer needs a 2-D weight, got {weight.shape}"
        )
    top = fc_max_rank(weight.shape)
    if not 1 <= rank <= top:
        raise EdgecompError(
            f"--rank-policy: rank {rank} is out of range for the fully connected weight "
            f"{weight.shape}; allowed 1..{top}"
        )
    if weight.size <= SMALL:
        w = weight.astype(np.float64)
        with threadpool_limits(1):
            left, sing, right = np.linalg.svd(w, full_matrices=False)
        root = np.sqrt(sing[:rank])
        a = (left[:, :rank] * root).astype(np.float32)
        b = (root[:, None] * right[:rank]).astype(np.float32)
        return LowRankFactors(a, b, relative_error(a @ b, w))
    # Large layers (AlexNet's fc6 is 9216 x 4096): the eigenvectors of the smaller Gram
    # matrix (a float32 GEMM and eigh, one BLAS thread) instead of a full SVD, about 10x
    # faster; the error follows from the eigenvalues.
    w32 = np.ascontiguousarray(weight, dtype=np.float32)
    tall = w32.shape[0] >= w32.shape[1]
    with threadpool_limits(1):  # spinning BLAS threads on a busy machine cost 2x here
        gram = w32.T @ w32 if tall else w32 @ w32.T
        eig32, vecs = np.linalg.eigh(gram)  # float32: 2x faster, the subspace is what matters
    eig = eig32.astype(np.float64)
    eig, vecs = np.maximum(eig[::-1], 0.0), vecs[:, ::-1]
    root = np.sqrt(np.sqrt(np.maximum(eig[:rank], 1e-300)))  # sqrt of the singular values
    top_vecs = vecs[:, :rank].astype(np.float32)
    if tall:  # W ~= (W V) V^T: A = W V / sqrt(s), B = sqrt(s) V^T
        a = (w32 @ top_vecs) / root.astype(np.float32)
        b = (top_vecs.T * root[:, None]).astype(np.float32)
    else:  # W ~= U (U^T W): A = U sqrt(s), B = U^T W / sqrt(s)
        a = (top_vecs * root).astype(np.float32)
        b = (top_vecs.T @ w32) / root[:, None].astype(np.float32)
    error = float(np.sqrt(np.sum(eig[rank:]) / max(float(np.sum(eig)), 1e-300)))
    return LowRankFactors(np.ascontiguousarray(a), np.ascontiguousarray(b), error)
