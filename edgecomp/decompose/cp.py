"""CP (canonical polyadic) factorization of a conv kernel, for the Lebedev/T1000 4-conv chain.

``W[k, c, i, j] ~= sum_r U[k, r] * S[c, r] * V[i, r] * H[j, r]`` with the CP weights folded into
``U`` (the last 1x1 conv), so the chain needs no separate scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecomp.decompose.norms import relative_error
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


def cp_decompose(weight: np.ndarray, rank: int, n_iter: int = 300, seed: int = 0) -> CPFactors:
    """Rank-``rank`` CP of an OIHW kernel by alternating least squares from a seeded random start.

    Each ALS step contracts the kernel with the other three factors in one ``einsum`` (BLAS)
    and solves an R x R system. tensorly's ``parafac`` does the same maths through explicit
    Khatri-Rao products, which made a 384x256x3x3 layer at rank 456 take 5 s per iteration
    here, against 0.07 s; on the bundled CNN's 64x64x3x3 layer at rank 137 this reaches 0.367
    in 0.3 s, where tensorly (line search) took 2.8 s. Kernels of known rank are recovered.

    Parameters
    ----------
    weight : np.ndarray
        Kernel ``[K, C, kh, kw]``.
    rank : int
        CP rank R, 1 <= R <= :func:`cp_max_rank`; at that rank the exact construction is used.
    n_iter, seed : int
        ALS sweeps at most (it stops earlier once the error stops falling), and the seed.

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
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal((d, rank)) for d in w.shape]
    # MTTKRP of mode m: the kernel contracted with every other factor, e.g. "abcd,br,cr,dr->ar".
    specs = ["abcd," + ",".join(f"{x}r" for x in "abcd" if x != m) + f"->{m}r" for m in "abcd"]
    paths = [
        np.einsum_path(spec, w, *(f for j, f in enumerate(factors) if j != i), optimize="optimal")[
            0
        ]
        for i, spec in enumerate(specs)
    ]
    norm2 = float(np.sum(w * w))
    error, previous = 1.0, np.inf
    for _ in range(n_iter):
        for i in range(4):
            others = [f for j, f in enumerate(factors) if j != i]
            gram = np.prod([f.T @ f for f in others], axis=0)
            mttkrp = np.einsum(specs[i], w, *others, optimize=paths[i])
            factors[i] = np.linalg.solve(gram + 1e-12 * np.eye(rank), mttkrp.T).T
        # ||W - What||^2 = ||W||^2 - 2 <W, What> + ||What||^2, from the last step's products.
        residual = (
            norm2 - 2 * np.sum(mttkrp * factors[3]) + np.sum(gram * (factors[3].T @ factors[3]))
        )
        error = float(np.sqrt(max(residual, 0.0) / max(norm2, 1e-300)))
        if previous - error < 1e-7:
            break
        previous = error
    return _with_error(factors, w)


def _with_error(factors: list[np.ndarray], w: np.ndarray) -> CPFactors:
    u, s, v, h = (m.astype(np.float32) for m in factors)
    approx = np.einsum("kr,cr,ir,jr->kcij", u, s, v, h, optimize=True)
    return CPFactors(u, s, v, h, relative_error(approx, w))


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
    return _with_error(factors, w)
