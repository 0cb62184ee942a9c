"""Tucker-2 factorization of a conv kernel on its two channel modes (Kim et al. 2016).

``W[k, c, i, j] ~= sum_{a, b} U_out[k, a] * G[a, b, i, j] * U_in[c, b]``: a 1x1 conv C -> R3
(``U_in``), the core conv R3 -> R4 with the original geometry, a 1x1 conv R4 -> K (``U_out``).
HOSVD start, then a few HOOI sweeps (each one cannot increase the error).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecomp.decompose.norms import relative_error
from edgecomp.errors import EdgecompError


@dataclass(frozen=True)
class TuckerFactors:
    """Tucker-2 factors: U_out [K, R4], core [R4, R3, kh, kw], U_in [C, R3]."""

    u_out: np.ndarray
    core: np.ndarray
    u_in: np.ndarray
    error: float

    @property
    def ranks(self) -> tuple[int, int]:
        """(R_out, R_in) = (R4, R3)."""
        return int(self.u_out.shape[1]), int(self.u_in.shape[1])

    def weight(self) -> np.ndarray:
        """The reconstructed OIHW kernel."""
        return np.einsum(
            "ka,abij,cb->kcij", self.u_out, self.core, self.u_in, optimize=True
        ).astype(np.float32)


def _leading(m: np.ndarray, r: int) -> np.ndarray:
    return np.linalg.svd(m, full_matrices=False)[0][:, :r]


def tucker2_decompose(weight: np.ndarray, ranks: tuple[int, int], n_iter: int = 5) -> TuckerFactors:
    """Tucker-2 of an OIHW kernel with ranks ``(R_out, R_in)``.

    Parameters
    ----------
    weight : np.ndarray
        Kernel ``[K, C, kh, kw]``.
    ranks : tuple of int
        ``(R_out, R_in)``, 1 <= R_out <= K and 1 <= R_in <= C.
    n_iter : int
        HOOI sweeps after the HOSVD start.

    Returns
    -------
    TuckerFactors
    """
    k, c = weight.shape[:2]
    r_out, r_in = ranks
    if not (1 <= r_out <= k and 1 <= r_in <= c):
        raise EdgecompError(
            f"--rank-policy: Tucker-2 ranks {ranks} are out of range for kernel {weight.shape}; "
            f"allowed (1..{k}, 1..{c})"
        )
    w = weight.astype(np.float64)
    u_in = _leading(w.transpose(1, 0, 2, 3).reshape(c, -1), r_in)
    u_out = _leading(w.reshape(k, -1), r_out)
    for _ in range(n_iter):  # HOOI: each factor from the kernel projected on the other
        u_in = _leading(np.einsum("kcij,ka->caij", w, u_out, optimize=True).reshape(c, -1), r_in)
        u_out = _leading(np.einsum("kcij,cb->kbij", w, u_in, optimize=True).reshape(k, -1), r_out)
    core = np.einsum("kcij,ka,cb->abij", w, u_out, u_in, optimize=True)
    u_out, core, u_in = (m.astype(np.float32) for m in (u_out, core, u_in))
    approx = np.einsum("ka,abij,cb->kcij", u_out, core, u_in, optimize=True)
    return TuckerFactors(u_out, core, u_in, relative_error(approx, w))
