"""Boards: the data files in ``targets/`` and what edgecomp derives from them.

A board file names the TVM target (JSON form), the ELF architecture of the device, the cross
compiler that links for it, the default RPC key, and how to emulate the device where that is
possible. Users can pass a JSON file of their own wherever a board name is accepted.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm

from edgecomp.errors import EdgecompError
from edgecomp.resources import data_dir

# ELF e_machine values of the architectures edgecomp builds for.
ELF_MACHINES = {"x86_64": 62, "aarch64": 183, "arm": 40}
# ELF class (EI_CLASS): 1 = 32-bit, 2 = 64-bit.
ELF_CLASSES = {"x86_64": 2, "aarch64": 2, "arm": 1}


@dataclass(frozen=True)
class Board:
    """One device edgecomp can compile for, as described by its board file."""

    name: str
    description: str
    arch: str
    target: dict[str, Any]
    cross_compiler: dict[str, Any] | None
    rpc_key: str
    emulate: dict[str, Any] | None
    emulate_why: str = ""
    # Above this many MB of weights the board's linker cannot embed them in model.so (armv7's
    # 32-bit ld): ``--weights auto`` then writes them beside it. None: no limit.
    max_embedded_weights_mb: float | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def is_host(self) -> bool:
        """True when packages for this board run on this machine without a device."""
        return self.cross_compiler is None

    @property
    def is_gpu(self) -> bool:
        """True when the board's target is a GPU kind (kernels need thread bindings)."""
        return self.target.get("kind") in {"opencl", "vulkan", "cuda"}

    def tvm_target(self) -> tvm.target.Target:
        """The board's TVM target (with its host, for GPU boards)."""
        try:
            return tvm.target.Target(self.target)
        except Exception as err:  # TVM raises a mix of ValueError and FFI errors here
            raise EdgecompError(
                f"board {self.name!r}: invalid TVM target {self.target}: {err}"
            ) from err

    def fcompile(self) -> Callable[..., None] | None:
        """The function ``export_library`` links with, or None for the native compiler.

        Raises EdgecompError when the board's toolchain is not installed, naming what to install.
        """
        cc = self.cross_compiler
        if cc is None:
            return None
        if cc.get("ndk"):
            env = cc.get("env", "TVM_NDK_CC")
            if not os.environ.get(env):
                raise EdgecompError(
                    f"board {self.name!r} links with the Android NDK: install {cc['package']}"
                    f" and set {env}"
                )
            from tvm.support import ndk

            return ndk.create_shared
        if shutil.which(cc["cc"]) is None:
            raise EdgecompError(
                f"cross compiler {cc['cc']} for board {self.name!r} is not installed:"
                f" apt-get install {cc['package']}"
            )
        from tvm.support.cc import cross_compiler

        return cross_compiler(cc["cc"], options=list(cc.get("options", [])))


def _resolve_native(target: dict[str, Any]) -> dict[str, Any]:
    """Replace ``"native"`` values (``mcpu``, ``num-cores``) by what this machine has.

    The ``host`` board builds for the CPU it runs on (e.g. AVX-512 where there is one); the
    package's manifest records the resolved target.
    """
    out = dict(target)
    if out.get("mcpu") == "native":
        out["mcpu"] = str(tvm.target.codegen.llvm_get_system_cpu())
    if out.get("num-cores") == "native":
        out["num-cores"] = len(os.sched_getaffinity(0))
    if isinstance(out.get("host"), dict):
        out["host"] = _resolve_native(out["host"])
    return out


def _boards_dir() -> Path:
    return data_dir("targets")


def known_boards() -> list[str]:
    """Names of the boards shipped with edgecomp, sorted."""
    return sorted(p.stem for p in _boards_dir().glob("*.json"))


def load_board(name_or_path: str | os.PathLike[str]) -> Board:
    """Load a board by name (``rasp4b``) or from a JSON file of the user's.

    Raises EdgecompError listing the known boards when the name is unknown.
    """
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".json") or path.is_file()):
        path = _boards_dir() / f"{text}.json"
        if not path.is_file():
            raise EdgecompError(
                f"unknown board {text!r}; known boards: {', '.join(known_boards())}"
                " (or pass the path of a board JSON file)"
            )
    if not path.is_file():
        raise EdgecompError(f"board file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EdgecompError(f"board file {path} is not valid JSON: {err}") from err
    missing = [k for k in ("name", "arch", "target", "rpc_key") if k not in data]
    if missing:
        raise EdgecompError(f"board file {path} lacks the field(s) {', '.join(missing)}")
    if data["arch"] not in ELF_MACHINES:
        raise EdgecompError(
            f"board file {path}: arch {data['arch']!r} is not one of {', '.join(ELF_MACHINES)}"
        )
    return Board(
        name=data["name"],
        description=data.get("description", ""),
        arch=data["arch"],
        target=_resolve_native(data["target"]),
        cross_compiler=data.get("cross_compiler"),
        rpc_key=data["rpc_key"],
        emulate=data.get("emulate"),
        emulate_why=data.get("emulate_why", ""),
        max_embedded_weights_mb=data.get("max_embedded_weights_mb"),
        path=path,
    )


def elf_arch(path: str | os.PathLike[str]) -> str:
    """Read the architecture of an ELF file from its header (``x86_64``, ``aarch64``, ``arm``)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        raise EdgecompError(f"{path} is not an ELF file")
    little = head[5] == 1
    machine = int.from_bytes(head[18:20], "little" if little else "big")
    for arch, number in ELF_MACHINES.items():
        if number == machine and ELF_CLASSES[arch] == head[4]:
            return arch
    return f"unknown (e_machine={machine}, class={head[4]})"
