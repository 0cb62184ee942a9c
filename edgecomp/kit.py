"""The app kit: a package plus everything an app needs to load it without Python.

``edgecomp package OUTDIR -o KIT.tar.gz`` (:func:`make_kit`) writes one archive::

    KIT/README.md      for app developers: build, call the model, threads, what the board needs
    KIT/model/         the package: model.so, manifest.json [, weights.params, report.json]
    KIT/lib/           TVM's runtime for the board's architecture (libtvm_runtime.so,
                       libtvm_ffi.so [, libtvm_runtime_extra.so]) and runtime.json: its
                       version and checksums, which the runners compare with the model's
    KIT/include/       the headers an app compiles against (tvm/ffi, dlpack)
    KIT/licenses/      TVM's and tvm-ffi's licence and notice files
    KIT/cpp/           the native runner's source, CMakeLists.txt, toolchain files
    KIT/android/       the Android sample (JNI wrapper, Java class, Gradle/CMake files)

The runtime comes from the PyPI wheels of the board's architecture (x86-64: this machine's
installed TVM; aarch64: the manylinux wheels, as the emulated device uses), or, where PyPI has
none (armv7, Android, OpenCL boards), from ``--runtime DIR``, a runtime built from TVM's sources.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from string import Template
from typing import Any

from edgecomp.errors import EdgecompError
from edgecomp.package import LIBRARY, MANIFEST, Package, read_package, sha256
from edgecomp.resources import data_dir
from edgecomp.targets import elf_arch, known_boards, load_board

RUNTIME = "libtvm_runtime.so"
FFI = "libtvm_ffi.so"
EXTRA = "libtvm_runtime_extra.so"
RUNTIME_RECORD = "runtime.json"
# model.so calls into libtvm_runtime_extra.so only through these packed-function names.
EXTRA_MARKER = b"tvm.contrib."
TOOLCHAIN_FILES = {"aarch64": "toolchain-aarch64.cmake", "arm": "toolchain-armv7.cmake"}


def _tvm_version() -> str:
    return version("apache-tvm")


def _ffi_version() -> str:
    try:
        return version("apache-tvm-ffi")
    except PackageNotFoundError:
        return "unknown"


def _host_dirs() -> tuple[Path, Path]:
    """This machine's installed ``tvm`` and ``tvm_ffi`` package folders."""
    import tvm
    import tvm_ffi

    return Path(tvm.__file__).resolve().parent, Path(tvm_ffi.__file__).resolve().parent


def _ffi_abi(include: Path) -> str:
    """tvm-ffi's ABI version as its headers state it (what ``TVMFFIGetVersion`` returns)."""
    text = (include / "tvm" / "ffi" / "c_api.h").read_text()
    parts = [
        re.search(rf"#define TVM_FFI_VERSION_{p} (\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")
    ]
    if not all(parts):
        raise EdgecompError(f"cannot read tvm-ffi's version from {include}/tvm/ffi/c_api.h")
    return ".".join(m.group(1) for m in parts if m)


def _needs_extra(library: Path) -> bool:
    return EXTRA_MARKER in library.read_bytes()


def glibc_needed(files: list[Path]) -> str | None:
    """The newest ``GLIBC_x.y`` symbol version any of ``files`` asks for (None: no glibc)."""
    found = set()
    for f in files:
        found.update(re.findall(rb"GLIBC_(\d+)\.(\d+)(?:\.\d+)?\b", f.read_bytes()))
    if not found:
        return None
    major, minor = max((int(a), int(b)) for a, b in found)
    return f"{major}.{minor}"


def _runtime_source(package: Package, runtime_dir: Path | None) -> tuple[Path, Path, str]:
    """Folders holding the board's ``libtvm_runtime.so`` and ``libtvm_ffi.so``, and where from."""
    manifest = package.manifest
    target = manifest.get("target", {})
    host_target = target.get("host", target) if isinstance(target, dict) else {}
    if runtime_dir is not None:
        if not runtime_dir.is_dir():
            raise EdgecompError(f"--runtime {runtime_dir} is not a folder")
        return runtime_dir, runtime_dir, f"--runtime {runtime_dir}"
    board_name = manifest.get("board", "?")
    if "android" in str(host_target.get("mtriple", "")):
        raise EdgecompError(
            f"PyPI has no Android TVM runtime (board {board_name}): build libtvm_runtime.so and"
            " libtvm_ffi.so with the NDK from TVM's sources (deploy/android/README.md) and pass"
            " --runtime DIR"
        )
    if target.get("kind") != "llvm":
        raise EdgecompError(
            f"the PyPI TVM runtimes have no {target.get('kind')} support (board {board_name}):"
            f" build one with USE_{str(target.get('kind')).upper()}=ON from TVM's sources and"
            " pass --runtime DIR"
        )
    from edgecomp.runner import host_arch

    if package.arch == host_arch():
        tvm_dir, ffi_dir = _host_dirs()
        return tvm_dir / "lib", ffi_dir / "lib", "this machine's apache-tvm wheel"
    boards = [load_board(n) for n in known_boards()]
    wheel_boards = [b for b in boards if b.arch == package.arch and b.emulate is not None]
    if not wheel_boards:
        raise EdgecompError(
            f"PyPI has no {package.arch} TVM runtime (board {board_name}): build"
            f" libtvm_runtime.so and libtvm_ffi.so for {package.arch} from TVM v{_tvm_version()}'s"
            " sources (see the kit README) and pass --runtime DIR"
        )
    from edgecomp.device import runtime_site

    site = runtime_site(wheel_boards[0])
    return site / "tvm" / "lib", site / "tvm_ffi" / "lib", f"PyPI {package.arch} wheels"


def make_kit(
    package_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    runtime_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the app kit of a package folder as a ``.tar.gz``.

    Parameters
    ----------
    package_dir
        A package folder from ``edgecomp compile`` (its checksums are verified first).
    output
        The archive to write (``KIT.tar.gz``); its top folder is named after it.
    runtime_dir
        A folder with ``libtvm_runtime.so`` and ``libtvm_ffi.so`` built for the board, for
        boards PyPI has no runtime for (armv7, Android, OpenCL); default: the PyPI wheels.

    Returns
    -------
    Path
        The archive.

    Examples
    --------
    >>> make_kit("out/rasp4b", "rasp4b-kit.tar.gz")  # doctest: +SKIP
    """
    package = read_package(package_dir)
    out = Path(output)
    name = out.name.removesuffix(".gz").removesuffix(".tar").removesuffix(".tgz") or "kit"
    tvm_lib, ffi_lib, source = _runtime_source(
        package, Path(runtime_dir) if runtime_dir is not None else None
    )
    built_with = package.manifest.get("tvm")
    if runtime_dir is None and built_with != _tvm_version():
        raise EdgecompError(
            f"{package.path} was compiled with TVM {built_with} but this edgecomp has TVM"
            f" {_tvm_version()}: compile it again, or pass --runtime DIR with a TVM {built_with}"
            " runtime"
        )
    libs = {RUNTIME: tvm_lib / RUNTIME, FFI: ffi_lib / FFI}
    if _needs_extra(package.library):
        libs[EXTRA] = tvm_lib / EXTRA
    for lib, path in libs.items():
        if not path.is_file():
            raise EdgecompError(f"the TVM runtime library {lib} is missing from {path.parent}")
        arch = elf_arch(path)
        if arch != package.arch:
            raise EdgecompError(
                f"{path} is for {arch} but the package is for {package.arch}"
                f" (board {package.manifest.get('board')}): pass a runtime built for {package.arch}"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kit.", dir=out.parent) as tmp:
        root = Path(tmp) / name
        _write_tree(root, package, libs, source)
        partial = Path(tmp) / out.name
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(root, arcname=name)
        os.replace(partial, out)
    return out


def _write_tree(root: Path, package: Package, libs: dict[str, Path], source: str) -> None:
    tvm_dir, ffi_dir = _host_dirs()
    # model/: the package's files, as listed (and checksummed) in its manifest.
    (root / "model").mkdir(parents=True)
    for name in [*package.manifest["files"], MANIFEST]:
        shutil.copy2(package.path / name, root / "model" / name)
    # lib/: the runtime and its record.
    lib = root / "lib"
    lib.mkdir()
    for name, path in libs.items():
        shutil.copy2(path, lib / name)
    include = ffi_dir / "include"
    record: dict[str, Any] = {
        "tvm": package.manifest.get("tvm") if "--runtime" in source else _tvm_version(),
        "tvm_ffi": _ffi_version(),
        "tvm_ffi_abi": _ffi_abi(include),
        "arch": package.arch,
        "source": source,
        "load": [n for n in (RUNTIME, EXTRA) if n in libs],
        "files": {n: {"sha256": sha256(lib / n), "bytes": (lib / n).stat().st_size} for n in libs},
    }
    (lib / RUNTIME_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    # include/: tvm-ffi's self-contained C++ headers (TVM's own runtime headers need
    # tvm/support/*.h, which no wheel ships; the runner uses tvm/ffi only).
    for sub in ("tvm", "dlpack"):
        shutil.copytree(include / sub, root / "include" / sub)
    # licenses/
    lic = root / "licenses"
    lic.mkdir()
    for src, dst in (
        (tvm_dir / "LICENSE", "TVM-LICENSE"),
        (tvm_dir / "NOTICE", "TVM-NOTICE"),
        *((p, f"TVM-{p.name}") for p in sorted((tvm_dir / "licenses").glob("*"))),
        *((p, f"tvm-ffi-{p.name}") for p in _ffi_licences()),
    ):
        if Path(src).is_file():
            shutil.copy2(src, lic / dst)
    # cpp/ and android/: the sources, as shipped in deploy/.
    deploy = data_dir("deploy")
    shutil.copytree(deploy / "cpp", root / "cpp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        deploy / "android", root / "android", ignore=shutil.ignore_patterns("__pycache__")
    )
    glibc = glibc_needed([lib / n for n in libs] + [root / "model" / LIBRARY])
    (root / "README.md").write_text(_readme(package, record, glibc, sorted(libs)))


def _ffi_licences() -> list[Path]:
    from importlib.metadata import distribution

    try:
        dist = distribution("apache-tvm-ffi")
    except PackageNotFoundError:
        return []
    files = [Path(str(dist.locate_file(f))) for f in dist.files or []]
    return sorted(f for f in files if f.name in ("LICENSE", "NOTICE") and f.is_file())


def _readme(package: Package, record: dict[str, Any], glibc: str | None, libs: list[str]) -> str:
    manifest = package.manifest
    arch = package.arch
    toolchain = TOOLCHAIN_FILES.get(arch)
    configure = (
        f"cmake -S cpp -B build -DCMAKE_TOOLCHAIN_FILE=$PWD/cpp/{toolchain}"
        if toolchain
        else "cmake -S cpp -B build"
    )
    inputs = ", ".join(
        f"`{s['name']}` {tuple(s['shape'])} {s['dtype']}" for s in manifest["inputs"]
    )
    outputs = ", ".join(
        f"`{s['name']}` {tuple(s['shape'])} {s['dtype']}" for s in manifest["outputs"]
    )
    first = manifest["inputs"][0]["name"]
    weights_file = package.weights_file
    template = Template((data_dir("deploy") / "KIT_README.md").read_text())
    return template.substitute(
        board=manifest.get("board"),
        arch=arch,
        tvm=record["tvm"],
        tvm_ffi=record["tvm_ffi"],
        source=record["source"],
        libs=", ".join(f"`{n}`" for n in libs),
        glibc=glibc or "none (not a glibc build)",
        configure=configure,
        inputs=inputs,
        outputs=outputs,
        first=first,
        weights=(
            f"beside the library in `model/{weights_file.name}`, loaded by `edgecomp::Model`"
            if weights_file is not None
            else "embedded in `model/model.so`"
        ),
        threads=manifest.get("target", {}).get("num-cores", "all"),
    )
