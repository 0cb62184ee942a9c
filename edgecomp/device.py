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
from contextlib import contextmanager, suppress
from importlib.metadata import version
from pathlib import Path
from typing import Any

from edgecomp.errors import EdgecompError
from edgecomp.progress import console, step
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
    return start_emulated_devices(board, 1, host, port, tracker, key, timeout)[0]


def start_emulated_devices(
    board: Board,
    count: int,
    host: str = "127.0.0.1",
    port: int | None = 9090,
    tracker: str | None = None,
    key: str | None = None,
    timeout: float = READY_TIMEOUT,
) -> list[dict[str, Any]]:
    """Start ``count`` emulated devices at once; return their records when all are ready.

    They listen on ``port``, ``port + 1``, ... (all must be free), or on free ports when
    ``port`` is None; with ``tracker`` each registers there under ``key``. They start in
    parallel (each imports TVM under qemu for 20-40 s). When one fails to start within
    ``timeout`` seconds, all are stopped and the error says which one failed.
    """
    from edgecomp.rpc import free_port, list_devices, parse_address

    if count < 1:
        raise EdgecompError(f"--count {count}: start at least one device")
    if tracker is not None:
        parse_address(tracker, "--tracker")
        list_devices(tracker)  # an unreachable tracker is an error now, not after the start
    folder = prepare(board)
    ports = [] if port is None else [port + i for i in range(count)]
    while len(ports) < count:
        if (free := free_port(host)) not in ports:
            ports.append(free)
    for p in ports:
        if not _port_free(host, p):
            raise EdgecompError(
                f"cannot start the device on {host}:{p}: the port is in use (--port)"
            )
    key = key or board.rpc_key
    procs, infos = [], []
    try:
        for p in ports:
            proc, info = _launch(board, folder, host, p, tracker, key)
            procs.append(proc)
            infos.append(info)
        where = ", ".join(info["address"] for info in infos)
        what = (
            f"the emulated {board.name}" if count == 1 else f"{count} emulated {board.name} devices"
        )
        if tracker is not None:
            where += f", registering with the tracker {tracker} as {key!r}"
        with step(f"starting {what} on {where} (TVM under qemu-user)"):
            _wait_ready(board, procs, infos, tracker, key, timeout)
    except BaseException:
        for info in infos:
            stop_emulated_devices(info["port"])
        raise
    return infos


def _launch(
    board: Board, folder: Path, host: str, port: int, tracker: str | None, key: str
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start one device's RPC server in the background and record it; do not wait."""
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
            "tracker": tracker, "key": key,
            "address": f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"}  # fmt: skip
    (_state_dir() / f"{port}.json").write_text(json.dumps(info))
    return proc, info


def _wait_ready(
    board: Board,
    procs: list[subprocess.Popen[bytes]],
    infos: list[dict[str, Any]],
    tracker: str | None,
    key: str,
    timeout: float,
) -> None:
    """Wait until every device answers a session (or is registered at ``tracker``), within
    ``timeout`` seconds; raise naming the first one that exited or did not come up."""
    from edgecomp.rpc import connect, device_arch, list_devices

    start = time.monotonic()
    pending = list(range(len(infos)))
    also = f"; all {len(infos)} stopped" if len(infos) > 1 else ""
    last: dict[int, str] = {}

    def name(i: int) -> str:
        which = f" {i + 1} of {len(infos)}" if len(infos) > 1 else ""
        return f"the emulated {board.name}{which} on {infos[i]['address']}"

    while pending:
        for i in pending:
            if procs[i].poll() is not None:
                tail = "\n".join(Path(infos[i]["log"]).read_text().strip().splitlines()[-8:])
                raise EdgecompError(f"{name(i)} exited at start-up{also}:\n{tail}")
        registered: set[str] = set()
        if tracker is not None:
            try:
                registered = {
                    d["address"].rsplit(":", 1)[1] for d in list_devices(tracker) if d["key"] == key
                }
            except EdgecompError as err:
                last = dict.fromkeys(pending, str(err))
        for i in list(pending):
            if tracker is not None:
                ready = str(infos[i]["port"]) in registered
            else:
                try:
                    session = connect(rpc=infos[i]["address"], timeout=30)
                    infos[i]["arch"] = device_arch(session)
                    del session
                    ready = True
                except EdgecompError as err:
                    last[i], ready = str(err), False
            if ready:
                pending.remove(i)
                if len(infos) > 1:
                    console.print(f"  {name(i)} is ready ({time.monotonic() - start:.1f} s)")
        if pending and time.monotonic() - start > timeout:
            i = pending[0]
            what = (
                "did not answer" if tracker is None else f"did not register at {tracker} as {key!r}"
            )
            why = f" (last: {last[i]})" if i in last else ""
            raise EdgecompError(
                f"{name(i)} {what} within {timeout:g} s{why}{also}; see {infos[i]['log']}"
            )
        if pending:
            time.sleep(1.0)


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


def stop_emulated_devices(port: int | None = None, key: str | None = None) -> list[dict[str, Any]]:
    """Stop the emulated devices started here (all, the one on ``port``, or those registered
    under ``key``); return them."""
    stopped = []
    for info in running_devices():
        if (port is not None and info["port"] != port) or (key is not None and info["key"] != key):
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
            with suppress(ProcessLookupError):
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
