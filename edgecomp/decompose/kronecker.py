"""GKPD: a conv kernel as a sum of R Kronecker products (Hameed et al., AAAI 2022).

``W ~= sum_r A_r (x) B_r`` with ``A_r [K1, C1, kh1, kw1]``, ``B_r [K2, C2, kh2, kw2]`` and
``W[k1*K2 + k2, c1*C2 + c2, i1*kh2 + i2, j1*kw2 + j2] =
sum_r A_r[k1, c1, i1, j1] * B_r[k2, c2, i2, j2]``.

Factors (Van Loan-Pitsianis): rearrange W so each row is one B-shaped block, i.e. the matrix
``M[(k1, c1, i1, j1), (k2, c2, i2, j2)]``; its rank-R truncated SVD gives ``A_r = sigma_r u_r``,
``B_r = v_r``. Exact at R = min(|A|, |B|).

The two-convolution form used by :mod:`edgecomp.passes.decompose_conv` (stride s, padding p,
dilation d of the original conv; x padded by p is ``xp``)::

    z[c1, r, k2, h, w] = sum_{c2,i2,j2} B_r[k2, c2, i2, j2] xp[c1*C2 + c2, h + i2*dh, w + j2*dw]
    y[k1*K2 + k2, o]   = sum_{r,c1,i1,j1} A_r[k1, c1, i1, j1] z[c1, r, k2, o*s + i1*kh2*d]

Substituting z gives ``sum A_r B_r xp[c, o*s + (i1*kh2 + i2)*d]``, the original conv with
``W = sum_r A_r (x) B_r``. As Relax ops: conv(x, WB, groups=C1, padding=p, dilation=d) with
``WB [C1*R*K2, C2, kh2, kw2]`` (B stacked over r, repeated for each group), reshape to
``[N, C1, R, K2, Hz, Wz]``, permute ``(0, 3, 2, 1, 4, 5)``, reshape to ``[N, K2*R*C1, Hz, Wz]``,
conv(., WA, groups=K2, strides=s, padding=0, dilation=(kh2*dh, kw2*dw)) with
``WA[k2*K1 + k1, r*C1 + c1] = A_r[k1, c1]``, reshape ``[N, K2, K1, Ho, Wo]``, permute
``(0, 2, 1, 3, 4)``, reshape ``[N, K, Ho, Wo]``. The permutes are unavoidable with plain
grouped convs: the first conv groups input channels by c1, the second must group by k2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecomp.errors import EdgecompError

Shape4 = tuple[int, int, int, int]


@dataclass(frozen=True)
class KroneckerFactors:
    """GKPD factors: A [R, K1, C1, kh1, kw1], B [R, K2, C2, kh2, kw2]."""

    a: np.ndarray
    b: np.ndarray
    error: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shapes(self) -> tuple[Shape4, Shape4]:
        """(A shape, B shape) of one Kronecker term."""
        return tuple(self.a.shape[1:]), tuple(self.b.shape[1:])  # type: ignore[return-value]

    def weight(self) -> np.ndarray:
        """The reconstructed OIHW kernel, sum_r kron(A_r, B_r)."""
        terms = [np.kron(a, b) for a, b in zip(self.a, self.b, strict=True)]
        return np.sum(terms, axis=0).astype(np.float32)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_shapes(shape: Shape4) -> list[tuple[Shape4, Shape4]]:
    """The factor shapes worth trying for a kernel: every split of the spatial kernel between
    A and B, and for each channel count its 5 divisors nearest the square root, within a factor
    of 4 of it (balanced factors are the expressive ones; lopsided ones degenerate into a plain
    low-rank product). At most 25 channel splits times the spatial splits."""
    k, c, kh, kw = shape

    def near_sqrt(n: int) -> list[int]:
        near = [d for d in _divisors(n) if n**0.5 / 4 <= d <= n**0.5 * 4] or [1]
        return sorted(near, key=lambda d: abs(np.log(d * d / n)))[:5]

    shapes = []
    for k1 in near_sqrt(k):
        for c1 in near_sqrt(c):
            for kh1 in _divisors(kh):
                for kw1 in _divisors(kw):
                    a = (k1, c1, kh1, kw1)
                    b = (k // k1, c // c1, kh // kh1, kw // kw1)
                    if np.prod(a) > 1 and np.prod(b) > 1:
                        shapes.append((a, b))
    return shapes


def kronecker_max_rank(shape: Shape4, shapes: tuple[Shape4, Shape4]) -> int:
    """The rank at which GKPD with these factor shapes is exact: min(|A|, |B|)."""
    a, b = shapes
    return int(min(np.prod(a), np.prod(b)))


def kronecker_spectrum(weight: np.ndarray, shapes: tuple[Shape4, Shape4]) -> np.ndarray:
    """Relative reconstruction error at every rank 0..max for these factor shapes.

    Entry ``r`` is the error of the best rank-``r`` GKPD (Eckart-Young on the rearranged
    kernel), so choosing shapes and ranks needs one SVD per candidate, not one per rank.
    """
    s = np.linalg.svd(_rearrange(weight.astype(np.float64), *shapes), compute_uv=False)
    tail = np.sqrt(np.cumsum((s**2)[::-1])[::-1])  # tail[r] = ||s[r:]||
    return np.append(tail, 0.0) / max(float(tail[0]), 1e-30)


def _rearrange(w: np.ndarray, a: Shape4, b: Shape4) -> np.ndarray:
    k1, c1, h1, w1 = a
    k2, c2, h2, w2 = b
    t = w.reshape(k1, k2, c1, c2, h1, h2, w1, w2).transpose(0, 2, 4, 6, 1, 3, 5, 7)
    return t.reshape(k1 * c1 * h1 * w1, k2 * c2 * h2 * w2)


def kronecker_decompose(
    weight: np.ndarray, rank: int, shapes: tuple[Shape4, Shape4]
) -> KroneckerFactors:
    """Rank-``rank`` GKPD of an OIHW kernel.

    Parameters
    ----------
    weight : np.ndarray
        Kernel ``[K, C, kh, kw]``.
    rank : int
        Number of Kronecker terms, 1 <= R <= :func:`kronecker_max_rank`.
    shapes : tuple
        ``(A shape, B shape)``, each ``(K_i, C_i, kh_i, kw_i)`` with elementwise products equal
        to the kernel shape (see :func:`candidate_shapes`; the rank policy picks among them).

    Returns
    -------
    KroneckerFactors
    """
    shape: Shape4 = tuple(int(d) for d in weight.shape)  # type: ignore[assignment]
    a_shape, b_shape = shapes
    if tuple(x * y for x, y in zip(a_shape, b_shape, strict=True)) != shape:
        raise EdgecompError(
            f"--decompose kronecker: factor shapes {a_shape} x {b_shape} do not multiply to {shape}"
        )
    limit = kronecker_max_rank(shape, (a_shape, b_shape))
    if not 1 <= rank <= limit:
        raise EdgecompError(
            f"--rank-policy: GKPD rank {rank} is out of range for kernel {shape};"
            f" allowed 1..{limit}"
        )
    w = weight.astype(np.float64)
    u, s, vt = np.linalg.svd(_rearrange(w, a_shape, b_shape), full_matrices=False)
    a = (u[:, :rank] * s[:rank]).T.reshape(rank, *a_shape)
    b = vt[:rank].reshape(rank, *b_shape)
    err = float(np.sqrt(np.sum(s[rank:] ** 2)) / max(np.sqrt(np.sum(s**2)), 1e-30))
    return KroneckerFactors(a.astype(np.float32), b.astype(np.float32), err)
