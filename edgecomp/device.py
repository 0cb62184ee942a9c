"""An emulated board on this machine: a Debian sysroot, the board's TVM runtime, qemu-user.

`prepare` builds, once, a cached sysroot for the board's Debian architecture (debootstrap in
foreign mode, packages unpacked with ``dpkg -x``) and a site folder with the TVM runtime wheels
for that architecture from PyPI. `start_emulated_device` runs TVM's RPC server in it under
qemu-user, bound to loopback unless asked otherwise, in the background; `stop_emulated_devices`
ends what it started. Emulated timings show that the path works, not how fast the board is.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

from edgecomp.errors import EdgecompError
from edgecomp.progress import step
from edgecomp.resources import data_dir
from edgecomp.targets import Board

# The device side runs TVM's runtime only; these are what its RPC server and MetaSchedule's
# RPC runner import. Versions follow this machine's, so host and device speak the same RPC.
DEVICE_WHEELS = (
    "apache-tvm",
    "apache-tvm-ffi",
    "numpy",
    "ml_dtypes",
    "typing_extensions",
    "psutil",
    "cloudpickle",
    "tornado",
)
READY_TIMEOUT = 300.0  # seconds for the server to import TVM under qemu and answer


def cache_dir() -> Path:
    """Where sysroots and the state of running devices live (``$EDGECOMP_CACHE``)."""
    return Path(os.environ.get("EDGECOMP_CACHE") or Path.home() / ".cache" / "edgecomp")


def _run(cmd: list[str], what: str, **kwargs: Any) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise EdgecompError(f"{what} failed ({' '.join(cmd[:3])} ...):\n{tail}")


def debian_mirror(suite: str) -> str:
    """The Debian mirror this machine's apt uses for ``suite`` (never a hard-coded host)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.is_file():
        for stanza in sources.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines() if ":" in line and line[0] != "#"
            )
            if suite in fields.get("Suites", "").split() and "URIs" in fields:
                return fields["URIs"].split()[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
                return parts[1]
    return "http://deb.debian.org/debian"


def _device_dir(board: Board) -> Path:
    emu = board.emulate or {}
    tag = f"{emu['debian_arch']}-{emu['debian_suite']}-py{emu['python']}-tvm{version('apache-tvm')}"
    return cache_dir() / "devices" / tag


def _check_tools(board: Board) -> None:
    emu = board.emulate or {}
    for tool, package in ((emu["qemu"], emu["qemu_package"]), ("debootstrap", "debootstrap")):
        if shutil.which(tool) is None:
            raise EdgecompError(
                f"{tool} is not installed: emulating {board.name} needs it"
                f" (apt-get install {package}, or run make system)"
            )


@contextmanager
def _staged(final: Path) -> Iterator[Path]:
    """A temporary folder beside ``final`` that becomes ``final`` when the block completes
    (unless another process made it first); removed when the block fails or is interrupted,
    so the cache never holds a half-made folder."""
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        yield work
        if final.exists():  # another process finished first
            shutil.rmtree(work)
        else:
            work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def prepare(board: Board) -> Path:
    """Build the board's sysroot and runtime site folder once; return the cached folder.

    The folder holds ``root/`` (the Debian sysroot), ``site/`` (the TVM runtime wheels,
    unpacked) and ``python`` (a wrapper that runs the device's Python under qemu-user).
    An interrupted preparation leaves nothing behind; the next call starts over.
    """
    if board.emulate is None:
        raise EdgecompError(f"board {board.name!r} cannot be emulated here: {board.emulate_why}")
    final = _device_dir(board)
    if (final / "python").is_file():
        _install_hooks(board, final)
        return final
    _check_tools(board)
    emu = board.emulate
    with _staged(final) as work:
        root, site, wheels = work / "root", work / "site", work / "wheels"
        mirror = debian_mirror(emu["debian_suite"])
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        with step(
            f"downloading a Debian {emu['debian_suite']} {emu['debian_arch']} sysroot from {mirror}"
        ):
            _run(
                [*sudo, "debootstrap", f"--arch={emu['debian_arch']}", "--variant=minbase",
                 "--foreign", "--include=python3", emu["debian_suite"], str(root), mirror],
                "debootstrap",
            )  # fmt: skip
            if sudo:
                _run([*sudo, "chown", "-R", f"{os.getuid()}:{os.getgid()}", str(root)], "chown")
        debs = sorted((root / "var/cache/apt/archives").glob("*.deb"))
        with step(f"unpacking {len(debs)} packages into the sysroot"):
            for deb in debs:
                _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
                deb.unlink()
            # Debian's numpy needs BLAS alternatives that foreign mode never configures.
            for stale in (root / "usr/lib/python3/dist-packages").glob("numpy*"):
                shutil.rmtree(stale, ignore_errors=True)
        with step(f"downloading the {emu['debian_arch']} TVM runtime wheels from PyPI"):
            download_wheels(DEVICE_WHEELS, emu["python"], emu["wheel_platforms"], site, wheels)
        _install_hooks(board, work, final)
    return final


def _install_hooks(board: Board, folder: Path, final: Path | None = None) -> None:
    """Write the device's start-up hook and ``python`` wrapper into ``folder`` if they changed.

    Both live in the cache, never pointing into a checkout: a cache outlives the checkout that
    filled it (CI clones anew each run), and a stale hook leaves TVM's workers unable to start.
    """
    final = final or folder
    hook = (data_dir("deploy") / "sitecustomize.py").read_text()
    for path, text, mode in (
        (folder / "site" / "sitecustomize.py", hook, 0o644),
        (folder / "python", _wrapper(board, final), 0o755),
    ):
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(text)
            tmp.chmod(mode)
            tmp.replace(path)


def download_wheels(
    names: tuple[str, ...], python: str, platforms: list[str], site: Path, scratch: Path
) -> None:
    """Download the wheels ``names`` for another platform from PyPI and unpack them into ``site``.

    Versions follow this machine's (``_pin``), so host and device run the same TVM. TVM's
    compiler library is dropped: a board runs TVM's runtime only (``TVM_USE_RUNTIME_LIB=1``).
    """
    import zipfile

    _run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         f"--python-version={python}", *[f"--platform={p}" for p in platforms],
         "-d", str(scratch), *[_pin(name) for name in names]],
        "downloading the device wheels",
    )  # fmt: skip
    for wheel in sorted(scratch.glob("*.whl")):
        zipfile.ZipFile(wheel).extractall(site)
    shutil.rmtree(scratch)
    (site / "tvm" / "lib" / "libtvm_compiler.so").unlink(missing_ok=True)  # 240 MB, unused


def _pin(name: str) -> str:
    try:
        return f"{name}=={version(name)}"
    except Exception:  # noqa: BLE001 - not installed on the host: take PyPI's newest
        return name


def _wrapper(board: Board, folder: Path) -> str:
    """A shell script that behaves like the device's ``python`` (TVM's servers re-exec it)."""
    emu = board.emulate or {}
    root = folder / "root"
    return (
        "#!/bin/sh\n"
        f"# The {board.name} device's Python, run by qemu-user in its sysroot (edgecomp).\n"
        f"export PYTHONPATH='{folder / 'site'}'\n"
        "export TVM_USE_RUNTIME_LIB=1 EDGECOMP_DEVICE=1\n"
        f"export EDGECOMP_PYTHON='{folder / 'python'}'\n"
        f"exec {emu['qemu']} -L '{root}' '{root}/usr/bin/python{emu['python']}' \"$@\"\n"
    )


def _state_dir() -> Path:
    path = cache_dir() / "running"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child that has exited
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def start_emulated_device(
    board: Board,
    host: str = "127.0.0.1",
    port: int = 9090,
    tracker: str | None = None,
    key: str | None = None,
    timeout: float = READY_TIMEOUT,
) -> dict[str, Any]:
    """Start the board's RPC server under qemu-user in the background; return its record.

    Returns when the server answers an RPC session (and, with ``tracker``, is registered
    there under ``key``, default the board's RPC key). The record (board, host, port, pid,
    log file) is kept so that `stop_emulated_devices` can end it.
    """
    from edgecomp.rpc import connect, device_arch, list_devices, parse_address

    if tracker is not None:
        parse_address(tracker, "--tracker")
    folder = prepare(board)
    if not _port_free(host, port):
        raise EdgecompError(
            f"cannot start the device on {host}:{port}: the port is in use (--port)"
        )
    key = key or board.rpc_key
    log = _state_dir() / f"{port}.log"
    cmd = [str(folder / "python"), "-m", "tvm.exec.rpc_server", "--host", host,
           "--port", str(port), "--port-end", str(port + 1)]  # fmt: skip
    if tracker is not None:
        cmd += ["--tracker", tracker, "--key", key]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    info = {"board": board.name, "host": host, "port": port, "pid": proc.pid, "log": str(log),
            "tracker": tracker, "key": key}  # fmt: skip
    (_state_dir() / f"{port}.json").write_text(json.dumps(info))
    address = f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    with step(f"starting the emulated {board.name} on {address} (TVM under qemu-user)"):
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                _forget(port)
                tail = "\n".join(log.read_text().strip().splitlines()[-8:])
                raise EdgecompError(f"the emulated {board.name} exited at start-up:\n{tail}")
            if time.monotonic() > deadline:
                stop_emulated_devices(port)
                raise EdgecompError(
                    f"the emulated {board.name} did not answer on {address} within {timeout:g} s;"
                    f" see {log}"
                )
            try:
                if tracker is None:
                    session = connect(rpc=address, timeout=30)
                    info["arch"] = device_arch(session)
                    del session
                    break
                if any(d["key"] == key for d in list_devices(tracker, timeout=10)):
                    break
            except EdgecompError:
                pass
            time.sleep(1.0)
    return info


def _forget(port: int) -> None:
    (_state_dir() / f"{port}.json").unlink(missing_ok=True)


def running_devices() -> list[dict[str, Any]]:
    """Records of the emulated devices started here that are still running."""
    records = []
    for path in sorted(_state_dir().glob("*.json")):
        info = json.loads(path.read_text())
        if _alive(info["pid"]):
            records.append(info)
        else:
            path.unlink(missing_ok=True)
    return records


def stop_emulated_devices(port: int | None = None) -> list[dict[str, Any]]:
    """Stop the emulated devices started here (all, or the one on ``port``); return them."""
    stopped = []
    for info in running_devices():
        if port is not None and info["port"] != port:
            continue
        try:
            os.killpg(info["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
        for _ in range(50):
            if not _alive(info["pid"]):
                break
            time.sleep(0.1)
        else:
            os.killpg(info["pid"], signal.SIGKILL)
        _forget(info["port"])
        stopped.append(info)
    return stopped


RUNTIME_WHEELS = ("apache-tvm", "apache-tvm-ffi")


def runtime_site(board: Board) -> Path:
    """A folder with the board architecture's TVM runtime wheels unpacked (``tvm/lib``,
    ``tvm_ffi/lib``, their licences).

    The emulated device's own ``site/`` when it was prepared (byte-identical files), else
    the two wheels alone, downloaded once from PyPI into the cache.
    """
    if board.emulate is None:
        raise EdgecompError(f"board {board.name!r} has no PyPI runtime wheels: {board.emulate_why}")
    device_site = _device_dir(board) / "site"
    if (device_site / "tvm" / "lib" / "libtvm_runtime.so").is_file():
        return device_site
    emu = board.emulate
    final = cache_dir() / "runtimes" / f"{board.arch}-tvm{version('apache-tvm')}"
    if (final / "tvm" / "lib" / "libtvm_runtime.so").is_file():
        return final
    with _staged(final) as work:
        with step(f"downloading the {board.arch} TVM runtime wheels from PyPI"):
            download_wheels(
                RUNTIME_WHEELS, emu["python"], emu["wheel_platforms"], work, work / "wheels"
            )
    return final
