"""TVM RPC with bounded waits: connect to a device or a tracker, list devices, run a tracker.

TVM's own calls can wait forever (a tracker queues a request until a device with the key
frees up; a busy server leaves a client in its backlog). Every call here gives up after
``timeout`` seconds and says which address did not answer.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from edgecomp.errors import EdgecompError

T = TypeVar("T")


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (as given to ``flag``) into its parts."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EdgecompError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9090")
    return host, int(port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _bounded(what: str, timeout: float, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a daemon thread; raise if it does not finish within ``timeout`` seconds."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = err

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise EdgecompError(f"{what}: no answer within {timeout:g} s (--timeout)")
    if "error" in result:
        err = result["error"]
        if isinstance(err, EdgecompError):
            raise err
        raise EdgecompError(f"{what}: {str(err).strip().splitlines()[-1]}") from err
    return result["value"]


def _reachable(host: str, port: int, what: str, timeout: float) -> None:
    """Fail fast, naming the address, when nothing accepts TCP connections there."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except TimeoutError as err:
        raise EdgecompError(
            f"cannot reach {what} at {host}:{port}: timed out after {timeout:g} s"
        ) from err
    except OSError as err:
        raise EdgecompError(
            f"cannot reach {what} at {host}:{port}: {err.strerror or err}"
            " (is it running? start one with edgecomp device emulate / edgecomp tracker)"
        ) from err


def tracker_summary(tracker: str, timeout: float = 10.0) -> dict[str, Any]:
    """The tracker's own summary: registered servers and per-key queues."""
    import tvm.rpc

    host, port = parse_address(tracker, "--tracker")
    _reachable(host, port, "the RPC tracker", timeout)

    def summary() -> dict[str, Any]:
        session = tvm.rpc.connect_tracker(host, port)
        try:
            return session.summary()
        finally:
            session.close()

    return _bounded(f"RPC tracker at {tracker}", timeout, summary)


def list_devices(tracker: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Devices registered with a tracker: key, address, and how many are free or queued."""
    summary = tracker_summary(tracker, timeout)
    queues = summary.get("queue_info", {})
    devices = []
    for server in summary.get("server_info", []):
        key = server["key"].split(":", 1)[-1]  # "server:rasp4b" -> "rasp4b"
        queue = queues.get(key, {})
        devices.append(
            {
                "key": key,
                "address": ":".join(map(str, server["addr"])),
                "free": queue.get("free", 0),
                "pending": queue.get("pending", 0),
            }
        )
    return sorted(devices, key=lambda d: (d["key"], d["address"]))


def wait_for_devices(
    tracker: str,
    key: str,
    timeout: float = 60.0,
    min_free: int = 1,
    tracker_timeout: float = 10.0,
) -> int:
    """Wait until devices with ``key`` are registered at ``tracker``, ``min_free`` of them free.

    Returns how many devices are registered under ``key``. Raises, naming the tracker, the key,
    the keys that are registered and the time waited, when none shows up (or too few are free)
    within ``timeout`` seconds; ``timeout=0`` checks once. An unreachable tracker is an error at
    once; each question to the tracker gives up after ``tracker_timeout`` seconds. TVM's own
    request for a key nobody registered waits forever: ask this first.
    """
    start = time.monotonic()
    while True:
        devices = list_devices(tracker, timeout=tracker_timeout)
        mine = [d for d in devices if d["key"] == key]
        free = mine[0]["free"] if mine else 0  # the tracker counts free devices per key
        if mine and free >= min_free:
            return len(mine)
        waited = time.monotonic() - start
        if waited >= timeout:
            after = f" after waiting {waited:.0f} s" if timeout > 0 else ""
            if mine:
                raise EdgecompError(
                    f"{free} of the {len(mine)} devices with key {key!r} at the tracker {tracker}"
                    f" are free, {min_free} needed{after}"
                )
            known = ", ".join(sorted({d["key"] for d in devices})) or "none"
            raise EdgecompError(
                f"no device with key {key!r} is registered at the tracker {tracker}"
                f" (registered keys: {known}){after}; see edgecomp devices --tracker {tracker}"
            )
        time.sleep(min(1.0, timeout - waited))


def connect(
    rpc: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
    timeout: float = 30.0,
    session_timeout: float = 0,
) -> Any:  # tvm.rpc.RPCSession
    """Open an RPC session on a device, directly (``rpc``) or through a tracker by ``key``.

    Gives up after ``timeout`` seconds with a message naming the address; through a tracker,
    a key that no device registered is refused at once with the keys that are registered.
    ``session_timeout`` (seconds, 0 for none): the server ends the session after that long.
    """
    import tvm.rpc

    if rpc is not None:
        host, port = parse_address(rpc, "--rpc")
        _reachable(host, port, "the RPC server", timeout)
        return _bounded(
            f"RPC server at {rpc}",
            timeout,
            lambda: tvm.rpc.connect(host, port, session_timeout=session_timeout),
        )
    if tracker is None or not key:
        raise EdgecompError(
            "say where the device is: --rpc HOST:PORT, or --tracker HOST:PORT --key KEY"
        )
    wait_for_devices(tracker, key, timeout=0, min_free=0, tracker_timeout=timeout)
    host, port = parse_address(tracker, "--tracker")

    def request() -> Any:
        tracker_session = tvm.rpc.connect_tracker(host, port)
        return tracker_session.request(key, max_retry=1, session_timeout=session_timeout)

    return _bounded(f"device {key!r} via the tracker at {tracker}", timeout, request)


def device_arch(session: Any) -> str | None:
    """The device's machine name (``aarch64``...) when its server runs edgecomp's start-up hook."""
    try:
        return str(session.get_function("edgecomp.device_arch")())
    except Exception:  # noqa: BLE001 - a plain TVM server does not have it
        return None


def start_tracker(host: str = "127.0.0.1", port: int = 9190) -> Any:  # tvm.rpc.tracker.Tracker
    """Start a TVM RPC tracker in a background process on exactly ``host:port``."""
    from tvm.rpc.tracker import Tracker

    try:
        with socket.socket() as probe:
            probe.bind((host, port))
    except OSError as err:
        raise EdgecompError(
            f"cannot start a tracker on {host}:{port}: {err.strerror or err}"
        ) from err
    tracker = Tracker(host=host, port=port, port_end=port + 1, silent=True)
    try:  # checked: it answers on exactly host:port
        tracker_summary(f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}", timeout=30)
    except EdgecompError as err:
        tracker.proc.kill()  # not terminate(): it asks the silent tracker to stop, and waits
        raise EdgecompError(f"the tracker on {host}:{port} did not start: {err}") from err
    return tracker


def serve_tracker(host: str = "127.0.0.1", port: int = 9190) -> None:
    """Run a tracker until Ctrl-C."""
    tracker = start_tracker(host, port)
    print(f"RPC tracker on {host}:{port}; Ctrl-C stops it")
    print(f"register a device: edgecomp device emulate --target rasp4b --tracker {host}:{port}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        tracker.terminate()
