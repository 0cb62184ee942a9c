"""The one error measure every factorization and rank policy reports."""

from __future__ import annotations

import numpy as np


def relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    """``||approx - exact|| / ||exact||`` (Frobenius), in float64; 0 for an all-zero ``exact``
    matched exactly."""
    diff = np.linalg.norm(np.asarray(approx, np.float64) - np.asarray(exact, np.float64))
    return float(diff / max(float(np.linalg.norm(exact)), 1e-30))
