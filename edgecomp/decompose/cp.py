"""CP (canonical polyadic) factorization of a conv kernel, for the Lebedev/T1000 4-conv chain.

``W[k, c, i, j] ~= sum_r U[k, r] * S[c, r] * V[i, r] * H[j, r]`` with the CP weights folded into
``U`` (the last 1x1 conv), so the chain needs no separate scaling.

:func:`cp_decompose` is alternating least squares arranged for speed: every MTTKRP (the kernel
contracted with all factors but one) is one float32 GEMM against a Khatri-Rao product, the two
spatial modes share one contraction, the start is the leading singular vectors of each mode's
unfolding, and an extrapolation step (Bro's line search) is tried after every sweep and kept
only when it lowers the error. :func:`cp_als_reference` is the plain float64 ALS from a random
start that edgecomp used before; it stays as the reference the tests and ``bench/cp_speed.py``
compare against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from edgecomp.decompose.norms import relative_error
from edgecomp.errors import EdgecompError

# Bumped whenever cp_decompose's result for the same input can change (the factor cache's key).
ALGORITHM_VERSION = 2
# Up to this many kernel elements x rank, the ALS also runs from the old algorithm's seeded
# random start (with and without extrapolation) and the best result is kept: well under a
# second per layer, and it rules out an unlucky basin where it is cheap to.
SMALL_WORK = 20_000_000


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


def _check(weight: np.ndarray, rank: int) -> None:
    if weight.ndim != 4:
        raise EdgecompError(f"--decompose cp needs an OIHW kernel, got shape {weight.shape}")
    limit = cp_max_rank(weight.shape)
    if not 1 <= rank <= limit:
        raise EdgecompError(
            f"--rank-policy: CP rank {rank} is out of range for kernel {weight.shape}; "
            f"allowed 1..{limit}"
        )


def _khatri_rao(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column-wise Kronecker product: ``[a.shape[0] * b.shape[0], R]``, b's index fastest."""
    return (a[:, None, :] * b[None, :, :]).reshape(-1, a.shape[1])


def _solve(gram: np.ndarray, mttkrp: np.ndarray) -> np.ndarray:
    """``mttkrp @ inv(gram)`` for the symmetric PSD ``gram``, lightly regularized."""
    rank = gram.shape[0]
    reg = 1e-12 * max(float(np.trace(gram)) / rank, 1e-300)
    return np.linalg.solve(gram + reg * np.eye(rank), mttkrp.T).T


class _Sweeper:
    """One ALS sweep over (U, S, V, H) of a fixed kernel, the MTTKRPs as float32 GEMMs."""

    def __init__(self, w: np.ndarray, dtype: type = np.float32) -> None:
        k, c, kh, kw = w.shape
        self.shape = (k, c, kh, kw)
        self.dtype = dtype
        w32: np.ndarray = w.astype(dtype)
        self.w0 = np.ascontiguousarray(w32.reshape(k, c * kh * kw))  # mode 0 unfolding
        self.w1 = np.ascontiguousarray(w32.transpose(1, 0, 2, 3).reshape(c, k * kh * kw))
        self.norm2 = float(np.sum(w * w))

    def mttkrp_u(self, s: np.ndarray, v: np.ndarray, h: np.ndarray) -> np.ndarray:
        kr: np.ndarray = _khatri_rao(s, _khatri_rao(v, h)).astype(self.dtype)
        return (self.w0 @ kr).astype(np.float64)

    def sweep(
        self, f: list[np.ndarray], m0: np.ndarray | None = None
    ) -> tuple[list[np.ndarray], float]:
        """New factors and their relative error; ``m0``: U's MTTKRP for ``f``, when known."""
        u, s, v, h = f
        _, c, kh, kw = self.shape
        g = [x.T @ x for x in f]
        if m0 is None:
            m0 = self.mttkrp_u(s, v, h)
        u = _solve(g[1] * g[2] * g[3], m0)
        g[0] = u.T @ u
        kr: np.ndarray = _khatri_rao(u, _khatri_rao(v, h)).astype(self.dtype)
        s = _solve(g[0] * g[2] * g[3], (self.w1 @ kr).astype(np.float64))
        g[1] = s.T @ s
        # V and H share one contraction: q[r, i, j] = sum_kc U[k, r] S[c, r] W[k, c, i, j].
        p = (u.T.astype(self.dtype) @ self.w0).reshape(-1, c, kh * kw)
        q = np.einsum("rcx,cr->rx", p, s.astype(self.dtype)).astype(np.float64)
        q = q.reshape(-1, kh, kw)
        v = _solve(g[0] * g[1] * g[3], np.einsum("rij,jr->ir", q, h))
        g[2] = v.T @ v
        m3 = np.einsum("rij,ir->jr", q, v)
        h = _solve(g[0] * g[1] * g[2], m3)
        g[3] = h.T @ h
        return [u, s, v, h], self._error(np.sum(m3 * h), g)

    def error_of(self, f: list[np.ndarray]) -> tuple[float, np.ndarray]:
        """Relative error of arbitrary factors, and U's MTTKRP for the next sweep."""
        m0 = self.mttkrp_u(*f[1:])
        return self._error(np.sum(m0 * f[0]), [x.T @ x for x in f]), m0

    def _error(self, inner: float, g: list[np.ndarray]) -> float:
        # ||W - What||^2 = ||W||^2 - 2 <W, What> + ||What||^2, from the products at hand.
        residual = self.norm2 - 2.0 * float(inner) + float(np.sum(g[0] * g[1] * g[2] * g[3]))
        return float(np.sqrt(max(residual, 0.0) / max(self.norm2, 1e-300)))


def _svd_start(w: np.ndarray, rank: int, seed: int) -> list[np.ndarray]:
    """Leading left singular vectors of each mode's unfolding, scaled by their singular values;
    columns past a mode's size are small seeded random ones."""
    rng = np.random.default_rng(seed)
    out = []
    for mode, size in enumerate(w.shape):
        unfolded = np.moveaxis(w, mode, 0).reshape(size, -1)
        # Eigenvectors of the (size x size) Gram matrix: the SVD's left side, much cheaper.
        eig, left = np.linalg.eigh(unfolded @ unfolded.T)
        sing = np.sqrt(np.maximum(eig[::-1], 0.0))
        left = left[:, ::-1]
        n = min(rank, size)
        cols = left[:, :n] * (sing[:n] / max(sing[0], 1e-300))
        extra = rng.standard_normal((size, rank - n)) * (sing[-1] / max(sing[0], 1e-300) + 0.1)
        out.append(np.concatenate([cols, extra], axis=1))
    return out


def cp_decompose(
    weight: np.ndarray,
    rank: int,
    n_iter: int = 150,
    seed: int = 0,
    tol: float = 1e-6,
    init: CPFactors | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> CPFactors:
    """Rank-``rank`` CP of an OIHW kernel: fast alternating least squares.

    The MTTKRPs are float32 GEMMs (the kernel's unfoldings against Khatri-Rao products of the
    other factors); the small R x R solves, the factors and the error stay float64. The start is
    each mode's leading singular vectors (seeded random columns where the rank exceeds the
    mode's size), or ``init`` (a CP of the same kernel at another rank: the ranks a policy tries
    reuse each other's work); small problems (``K*C*kh*kw*R <= SMALL_WORK``) also run from the
    old ALS's seeded random start, with and without extrapolation, and keep the best, so they
    are never worse than the old ALS. After every sweep an extrapolation along the last step,
    ``F + s (F - F_prev)`` with ``s = sqrt(sweep)``, is kept when it lowers the error (Bro's
    line search). Against the old ALS (:func:`cp_als_reference`, 300 sweeps) a sweep costs
    about a seventh and reaches the same error in about half as many sweeps.

    Parameters
    ----------
    weight : np.ndarray
        Kernel ``[K, C, kh, kw]``.
    rank : int
        CP rank R, 1 <= R <= :func:`cp_max_rank`; at that rank the exact construction is used.
    n_iter : int
        Sweeps at most.
    seed : int
        Seed of the random start columns.
    tol : float
        Stop once a sweep lowers the relative error by less than ``tol`` (times the error).
    init : CPFactors, optional
        Factors to start from; columns are dropped or added (random) to reach ``rank``.
    progress : callable, optional
        Called after each sweep with (sweep, relative error).

    Returns
    -------
    CPFactors
        The factors and the relative reconstruction error.
    """
    _check(weight, rank)
    w = weight.astype(np.float64)
    if rank == cp_max_rank(weight.shape):
        return _exact(w)
    small = w.size * rank <= SMALL_WORK
    # One BLAS thread: the R x R solves and the small products gain nothing from more, and on
    # a busy 2-core machine OpenBLAS's spinning threads made a 64x64x3x3 layer take 270 s
    # instead of 3 s, and a sweep of a 384x256x3x3 one 0.81 s instead of 0.14 s.
    with threadpool_limits(1):
        factors, error = _cp(w, rank, n_iter, seed, tol, init, progress, small)
    return _with_error(factors, w)


def _cp(
    w: np.ndarray,
    rank: int,
    n_iter: int,
    seed: int,
    tol: float,
    init: CPFactors | None,
    progress: Callable[[int, float], None] | None,
    small: bool,
) -> tuple[list[np.ndarray], float]:
    start = _svd_start(w, rank, seed) if init is None else _resized(init, rank, seed)
    runs = [_als(_Sweeper(w), start, n_iter, tol, progress)]
    if small:  # cheap: also from the old ALS's random start, keep the best
        rng = np.random.default_rng(seed)
        old_start = [rng.standard_normal((d, rank)) for d in w.shape]
        sweeper64 = _Sweeper(w, np.float64)
        runs.append(_als(sweeper64, old_start, n_iter, tol, progress))
        # ... and plainly, as the old ALS did (300 sweeps, no extrapolation)
        runs.append(_als(sweeper64, old_start, 300, 2e-7, progress, extrapolate=False))
    factors, error = min(runs, key=lambda run: run[1])
    if error < 1e-2:  # near exact: float32 products cannot resolve the rest, float64 can
        factors, error = _als(_Sweeper(w, np.float64), factors, n_iter, tol, progress)
    return factors, error


def _als(
    sweeper: _Sweeper,
    factors: list[np.ndarray],
    n_iter: int,
    tol: float,
    progress: Callable[[int, float], None] | None,
    extrapolate: bool = True,
) -> tuple[list[np.ndarray], float]:
    """ALS sweeps (with extrapolation) from ``factors``; the best factors and their error."""
    factors, error = sweeper.sweep(factors)
    best = (error, factors)
    previous = factors
    for it in range(2, n_iter + 1):
        m0 = None
        if extrapolate and it > 2:  # along the last sweep's step; kept only if it helps
            jump = np.sqrt(it)
            trial = [f + jump * (f - p) for f, p in zip(factors, previous, strict=True)]
            trial_error, trial_m0 = sweeper.error_of(trial)
            if trial_error < error:
                factors, error, m0 = trial, trial_error, trial_m0
        previous = factors
        factors, new_error = sweeper.sweep(factors, m0)
        if new_error < best[0]:
            best = (new_error, factors)
        if progress is not None:
            progress(it, new_error)
        if error - new_error < tol * max(error, 1e-12) and it > 3:
            break
        error = new_error
    return best[1], best[0]


def _resized(init: CPFactors, rank: int, seed: int) -> list[np.ndarray]:
    """``init``'s factors with its weakest terms dropped, or small random terms added."""
    rng = np.random.default_rng(seed)
    f = [m.astype(np.float64) for m in (init.u, init.s, init.v, init.h)]
    if rank <= init.rank:
        strength = np.prod([np.linalg.norm(m, axis=0) for m in f], axis=0)
        keep = np.sort(np.argsort(-strength)[:rank])
        return [m[:, keep] for m in f]
    scale = [float(np.mean(np.abs(m))) for m in f]
    return [
        np.concatenate([m, 0.1 * sc * rng.standard_normal((m.shape[0], rank - m.shape[1]))], 1)
        for m, sc in zip(f, scale, strict=True)
    ]


def cp_als_reference(weight: np.ndarray, rank: int, n_iter: int = 300, seed: int = 0) -> CPFactors:
    """The plain CP-ALS edgecomp used before :func:`cp_decompose`: float64, seeded random
    start, ``einsum`` MTTKRPs, stop when a sweep lowers the error by less than 1e-7.

    Kept as the reference :func:`cp_decompose` is tested and benchmarked against (never worse
    error, much less time); the compiler does not call it.
    """
    _check(weight, rank)
    w = weight.astype(np.float64)
    if rank == cp_max_rank(weight.shape):
        return _exact(w)
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal((d, rank)) for d in w.shape]
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
        residual = (
            norm2 - 2 * np.sum(mttkrp * factors[3]) + np.sum(gram * (factors[3].T @ factors[3]))
        )
        error = float(np.sqrt(max(residual, 0.0) / max(norm2, 1e-300)))
        if previous - error < 1e-7:
            break
        previous = error
    return _with_error(factors, w)


def _with_error(factors: list[np.ndarray], w: np.ndarray) -> CPFactors:
    # Balance the three inner factors' column norms into U (the chain's last 1x1 conv keeps
    # the scale), so float32 factors lose nothing to badly scaled columns.
    s, v, h = factors[1:]
    norms = [np.maximum(np.linalg.norm(m, axis=0), 1e-300) for m in (s, v, h)]
    u = factors[0] * norms[0] * norms[1] * norms[2]
    u, s, v, h = (m.astype(np.float32) for m in (u, s / norms[0], v / norms[1], h / norms[2]))
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
