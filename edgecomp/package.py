"""The deployable package: ``model.so`` (weights inside, or beside it in ``weights.params``)
and ``manifest.json`` in one folder.

A package is written to a temporary sibling folder and moved into place only when complete,
so a failed compile never leaves a half-written package behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm

import edgecomp
from edgecomp.errors import EdgecompError
from edgecomp.frontend import ModelSignature, TensorSpec
from edgecomp.targets import Board, elf_arch

LIBRARY = "model.so"
MANIFEST = "manifest.json"
WEIGHTS = "weights.params"


def sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Package:
    """A package folder read back from disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def library(self) -> Path:
        """The linked model library."""
        return self.path / LIBRARY

    @property
    def arch(self) -> str:
        """ELF architecture the library was linked for."""
        return str(self.manifest["arch"])

    @property
    def weights_file(self) -> Path | None:
        """The external weights file (``--weights external``), or None when embedded."""
        weights = self.manifest.get("weights")
        if isinstance(weights, dict) and weights.get("file"):
            return self.path / str(weights["file"])
        return None

    @property
    def inputs(self) -> list[TensorSpec]:
        """Model inputs in call order."""
        return [TensorSpec.from_json(d) for d in self.manifest["inputs"]]

    @property
    def outputs(self) -> list[TensorSpec]:
        """Model outputs in return order."""
        return [TensorSpec.from_json(d) for d in self.manifest["outputs"]]


@contextmanager
def _staging(outdir: Path, names: tuple[str, ...]) -> Iterator[Path]:
    """A temporary folder beside ``outdir`` whose package files replace ``outdir``'s on success."""
    outdir.parent.mkdir(parents=True, exist_ok=True)
    if outdir.exists() and not outdir.is_dir():
        raise EdgecompError(f"output {outdir} exists and is not a folder")
    stage = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    try:
        yield stage
        outdir.mkdir(exist_ok=True)
        # The manifest goes last: a package folder with a manifest is always complete.
        (outdir / MANIFEST).unlink(missing_ok=True)
        for name in names:
            os.replace(stage / name, outdir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_package(
    executable: tvm.runtime.Executable,
    board: Board,
    signature: ModelSignature,
    outdir: str | os.PathLike[str],
    source: str | os.PathLike[str] | None = None,
    options: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
    weights: dict[str, tvm.runtime.Tensor] | None = None,
) -> Package:
    """Link ``executable`` for ``board`` and write the package folder.

    Parameters
    ----------
    executable
        What ``tvm.compile`` returned.
    board
        The board it was compiled for; its cross compiler links the library.
    signature
        Inputs and outputs, recorded in the manifest.
    outdir
        The package folder; created, or its package files replaced, only on success.
    source
        The ONNX file the package was compiled from (its checksum is recorded).
    options
        Compile options worth recording (decomposition, rank policy ...).
    extra_files
        More text files for the package, by name (e.g. ``report.json``); checksummed too.
    weights
        Weights lifted out of the library (:func:`edgecomp.weights.lift_weights`): written to
        ``weights.params``, which every runner passes to ``main`` after the inputs. None:
        the weights are embedded in ``model.so``.
    """
    outdir = Path(outdir)
    fcompile: Callable[..., None] | None = board.fcompile()
    names = (LIBRARY, *([WEIGHTS] if weights is not None else []), *(extra_files or {}), MANIFEST)
    with _staging(outdir, names) as stage:
        lib = stage / LIBRARY
        try:
            if fcompile is None:
                executable.export_library(str(lib))
            else:
                executable.export_library(str(lib), fcompile=fcompile)
        except Exception as err:  # the linker's message is what the user needs
            raise EdgecompError(f"linking {LIBRARY} for {board.name} failed: {err}") from err
        files = {LIBRARY: lib}
        weights_entry: dict[str, Any] = {"mode": "embedded", "file": None}
        if weights is not None:
            from edgecomp.weights import save_weights

            save_weights(weights, stage / WEIGHTS)
            files[WEIGHTS] = stage / WEIGHTS
            weights_entry = {
                "mode": "external",
                "file": WEIGHTS,
                "sha256": None,  # filled in below with the other checksums
                "tensors": len(weights),
                "order": "main(*inputs, *weights by sorted name)",
            }
        for name, text in (extra_files or {}).items():
            (stage / name).write_text(text)
            files[name] = stage / name
        arch = elf_arch(lib)
        if arch != board.arch:
            raise EdgecompError(
                f"the linker produced a {arch} library for board {board.name} ({board.arch});"
                " check the board file's cross_compiler"
            )
        manifest = {
            "edgecomp": edgecomp.__version__,
            "tvm": tvm.__version__,
            "tvm_ffi": _version("apache-tvm-ffi"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "board": board.name,
            "arch": arch,
            "target": board.target,
            "tvm_target": _plain(board.tvm_target().export()),
            "rpc_key": board.rpc_key,
            "weights": weights_entry,
            "entry": "main",
            "inputs": [s.to_json() for s in signature.inputs],
            "outputs": [s.to_json() for s in signature.outputs],
            "options": options or {},
            "source": (
                {"file": Path(source).name, "sha256": sha256(source)}
                if source is not None
                else None
            ),
            "files": {
                n: {"sha256": sha256(f), "bytes": f.stat().st_size} for n, f in files.items()
            },
        }
        if weights is not None:
            weights_entry["sha256"] = manifest["files"][WEIGHTS]["sha256"]
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Package(outdir, manifest)


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _plain(value: Any) -> Any:
    """TVM FFI containers (Map, Array) as JSON-ready dicts and lists."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        return [_plain(v) for v in value]
    return value


def read_package(path: str | os.PathLike[str], verify: bool = True) -> Package:
    """Read a package folder; with ``verify``, check the library against its checksum."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise EdgecompError(
            f"{folder} is not an edgecomp package (no {MANIFEST}); make one with edgecomp compile"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise EdgecompError(f"{manifest_path} is not valid JSON: {err}") from err
    package = Package(folder, manifest)
    for name, info in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise EdgecompError(f"package {folder} lacks {name}; compile it again")
        if verify and sha256(file) != info["sha256"]:
            raise EdgecompError(
                f"{file} does not match the checksum in {MANIFEST}; the package was altered,"
                " compile it again"
            )
    return package
