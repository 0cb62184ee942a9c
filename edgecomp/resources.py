"""Where edgecomp's data folders (targets/, schedules/, deploy/) and bundled models live.

In a wheel they are shipped as ``edgecomp/_data/<name>``; in a source checkout (editable
install, tests) they are the top-level folders of the repository.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Return one of edgecomp's data folders: ``targets``, ``schedules`` or ``deploy``."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"edgecomp's data folder {name!r} is missing from {_PACKAGE}")


def zoo_path(filename: str) -> Path:
    """Return the path of a model bundled with edgecomp (``edgecomp/zoo``)."""
    return _PACKAGE / "zoo" / filename
