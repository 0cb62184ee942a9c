"""Shared fixtures: the emulated Raspberry Pi 4 (qemu-user + TVM RPC server on loopback)."""

from __future__ import annotations

import pytest

from edgecomp.device import start_emulated_device, stop_emulated_devices
from edgecomp.rpc import free_port
from edgecomp.targets import load_board


@pytest.fixture(scope="session")
def emulated_rasp4b():
    """``127.0.0.1:PORT`` of an emulated rasp4b RPC server, for the whole test session.

    The first use prepares the sysroot (debootstrap + aarch64 TVM wheels, cached in
    $EDGECOMP_CACHE); a failure there is an error, never a skip.
    """
    port = free_port()
    start_emulated_device(load_board("rasp4b"), port=port)
    yield f"127.0.0.1:{port}"
    stop_emulated_devices(port)


@pytest.fixture(autouse=True)
def _no_factor_cache(monkeypatch):
    """Tests factorize afresh: the factor cache (``$EDGECOMP_CACHE/factors``) stays out of them,
    but for the cache's own tests, which point ``EDGECOMP_CACHE`` at a temporary folder."""
    monkeypatch.setenv("EDGECOMP_NO_FACTOR_CACHE", "1")
