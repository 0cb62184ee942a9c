"""A disk cache of factorizations, so compiling the same model again does not factorize again.

Entries live in ``$EDGECOMP_CACHE/factors/`` (default ``~/.cache/edgecomp/factors``), one
``.npz`` file each, named by a SHA-256 over the weight's bytes, shape and dtype, the method, the
rank (and GKPD factor shapes) and the algorithm version. Each entry stores the digest of the
weight it was computed from and is used only when that digest and the request match, so it can
never return factors for a different weight; an entry that does not read back is recomputed
(with a warning) and rewritten. ``edgecomp cache clear`` (:func:`clear_factor_cache`) empties it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from edgecomp.device import cache_dir
from edgecomp.progress import console

F = TypeVar("F")
DISABLE_ENV = "EDGECOMP_NO_FACTOR_CACHE"  # set to 1 to neither read nor write the cache


def factor_cache_dir() -> Path:
    """The folder of cached factorizations: ``$EDGECOMP_CACHE/factors``."""
    return cache_dir() / "factors"


def weight_digest(weight: np.ndarray) -> str:
    """SHA-256 of a weight's shape, dtype and bytes (C order)."""
    h = hashlib.sha256()
    h.update(f"{weight.shape}|{weight.dtype.str}|".encode())
    h.update(np.ascontiguousarray(weight).tobytes())
    return h.hexdigest()


def cached_factorization(
    weight: np.ndarray, request: dict[str, Any], compute: Callable[[], F]
) -> F:
    """``compute()``'s factors for ``weight``, from the cache when an entry matches.

    Parameters
    ----------
    weight : np.ndarray
        The weight being factorized.
    request : dict
        What else determines the result (method, rank, factor shapes, algorithm version);
        JSON-serializable.
    compute : callable
        Computes the factors (a dataclass of arrays and an ``error`` float) on a miss.
    """
    if os.environ.get(DISABLE_ENV) == "1":
        return compute()
    digest = weight_digest(weight)
    meta = json.dumps({"weight": digest, **request}, sort_keys=True)
    key = hashlib.sha256(meta.encode()).hexdigest()
    path = factor_cache_dir() / f"{key}.npz"
    if path.is_file():
        try:
            found = _read(path, meta)
        except Exception as err:  # noqa: BLE001 - any unreadable entry is recomputed
            console.print(
                f"[yellow]warning:[/yellow] factor cache entry {path} is corrupt ({err}); "
                "recomputing it"
            )
        else:
            if found is not None:
                return found  # type: ignore[return-value]
    factors = compute()
    _write(path, meta, factors)
    return factors


def _read(path: Path, meta: str) -> object | None:
    """The factors stored at ``path`` if its metadata is ``meta`` exactly, else None."""
    from edgecomp.decompose import factor_types

    with np.load(path, allow_pickle=False) as z:
        if str(z["__meta__"]) != meta:  # another weight or request: never used
            return None
        cls = factor_types()[str(z["__type__"])]
        values = {f.name: z[f.name] for f in fields(cls)}
    values["error"] = float(values["error"])
    for name, value in values.items():
        if isinstance(value, np.ndarray) and not np.all(np.isfinite(value)):
            raise ValueError(f"non-finite values in {name}")
    return cls(**values)


def _write(path: Path, meta: str, factors: object) -> None:
    """Store ``factors`` atomically (a temporary file renamed into place); failures to write
    only cost the next compile the factorization."""
    if not is_dataclass(factors):
        return
    arrays: dict[str, Any] = {f.name: np.asarray(getattr(factors, f.name)) for f in fields(factors)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            np.savez(tmp, __meta__=meta, __type__=type(factors).__name__, **arrays)
        os.replace(tmp.name, path)
    except OSError as err:
        console.print(f"[yellow]warning:[/yellow] cannot write the factor cache ({err})")


def clear_factor_cache() -> tuple[int, int]:
    """Delete every cached factorization; return (entries, bytes) removed."""
    folder = factor_cache_dir()
    count = size = 0
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.suffix in (".npz", ".tmp") and entry.is_file():
                size += entry.stat().st_size
                entry.unlink()
                count += 1
    return count, size
