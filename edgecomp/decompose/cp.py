"""CP (canonical polyadic) factorization of a conv kernel, for the Lebedev/T1000 4-conv chain.

``W[k, c, i, j] ~= sum_r U[k, r] * S[c, r] * V[i, r] * H[j, r]`` with the CP weights folded into
``U`` (the last 1x1 conv), so the chain needs no separate scaling.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import tensorly as tl
from tensorly.decomposition import parafac

from edgecomp.errors import EdgecompError


@dataclass(frozen=True)
class CPFactors:
    """Factors of a rank-R CP kernel: U [K, R], S [C, R], V [kh, R], H [kw, R]."""

    u: np.ndarray
    s: np.ndarray
    v: np.ndarray
    h: np.ndarray
    error: float  # relative Frobenius reconstruction error

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    def weight(self) -> np.ndarray:
        """The reconstructed OIHW kernel."""
        return np.einsum("kr,cr,ir,jr->kcij", self.u, self.s, self.v, self.h, optimize=True).astype(
            np.float32
        )


def cp_max_rank(shape: tuple[int, ...]) -> int:
    """A rank at which a CP of ``shape`` is always exact: product of all modes but the largest."""
    return int(np.prod(shape) // max(shape))


def cp_decompose(weight: np.ndarray, rank: int, n_iter: int = 100, seed: int = 0) -> CPFactors:
    """Rank-``rank`` CP of an OIHW kernel by ALS (tensorly ``parafac``, seeded random start,
    line search).

    A random start with line search reached a lower error than tensorly's SVD start in a
    sixth of the time on the bundled CNN's layers (64x64x3x3 at rank 137: 0.367 in 2.8 s
    against 0.378 in 16 s), and recovers kernels of known rank exactly.

    Parameters
    ----------
    weight : np.ndarray
        Kernel ``[K, C, kh, kw]``.
    rank : int
        CP rank R, 1 <= R <= :func:`cp_max_rank`.
    n_iter, seed : int
        ALS iterations at most, and the seed of the random start.

    Returns
    -------
    CPFactors
        The factors and the relative reconstruction error.
    """
    if weight.ndim != 4:
        raise EdgecompError(f"--decompose cp needs an OIHW kernel, got shape {weight.shape}")
    limit = cp_max_rank(weight.shape)
    if not 1 <= rank <= limit:
        raise EdgecompError(
            f"--rank-policy: CP rank {rank} is out of range for kernel {weight.shape}; "
            f"allowed 1..{limit}"
        )
    w = weight.astype(np.float64)
    if rank == limit:
        return _exact(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cp = parafac(
            tl.tensor(w),
            rank,
            n_iter_max=n_iter,
            init="random",
            tol=1e-8,
            random_state=seed,
            normalize_factors=True,
            linesearch=True,
        )
    weights, (u, s, v, h) = cp
    u = u * weights[None, :]
    f = CPFactors(*(np.asarray(m, dtype=np.float32) for m in (u, s, v, h)), error=0.0)
    err = float(np.linalg.norm(f.weight() - w) / max(np.linalg.norm(w), 1e-30))
    return CPFactors(f.u, f.s, f.v, f.h, err)


def _exact(w: np.ndarray) -> CPFactors:
    """The exact CP at :func:`cp_max_rank`: one term per index of the three smaller modes,
    unit vectors there and the matching fibre of the largest mode."""
    big = int(np.argmax(w.shape))
    others = [m for m in range(4) if m != big]
    index = np.indices([w.shape[m] for m in others]).reshape(3, -1)
    factors: list[np.ndarray] = [np.empty(0)] * 4
    for row, m in enumerate(others):
        factors[m] = np.eye(w.shape[m])[index[row]].T  # [size of mode m, R]
    factors[big] = np.moveaxis(w, big, 0).reshape(w.shape[big], -1)
    f = CPFactors(*(m.astype(np.float32) for m in factors), error=0.0)
    err = float(np.linalg.norm(f.weight() - w) / max(np.linalg.norm(w), 1e-30))
    return CPFactors(f.u, f.s, f.v, f.h, err)
