"""Several emulated devices under one tracker key, served by key, and bounded waits for them."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from helpers import assert_clean_error, edgecomp, tiny_cnn

from edgecomp.build import compile_model
from edgecomp.device import _port_free, running_devices, start_emulated_devices
from edgecomp.errors import EdgecompError
from edgecomp.reference import onnxruntime_outputs
from edgecomp.rpc import connect, free_port, list_devices, start_tracker, wait_for_devices
from edgecomp.runner import open_package, read_inputs
from edgecomp.targets import load_board


@pytest.fixture(scope="module")
def tracker():
    """``127.0.0.1:PORT`` of a TVM tracker for this module's tests."""
    port = free_port()
    server = start_tracker(port=port)
    yield f"127.0.0.1:{port}"
    server.terminate()


@pytest.mark.device
def test_count_2_registers_both_under_the_key_serves_by_key_and_stop_ends_both(tracker, tmp_path):
    model = tiny_cnn(tmp_path / "tiny.onnx")
    package = compile_model(model, "rasp4b", tmp_path / "pkg")
    key = f"farm{os.getpid()}"  # the device cache is shared: stop only this test's devices
    started = edgecomp("device", "emulate", "--count", "2", "--tracker", tracker, "--key", key)
    try:
        assert started.returncode == 0, started.stderr
        assert started.stdout.count(f"(key {key!r} at {tracker})") == 2, started.stdout
        devices = [d for d in list_devices(tracker) if d["key"] == key]
        assert len(devices) == 2 and all(d["free"] == 2 for d in devices), devices
        assert wait_for_devices(tracker, key, timeout=5, min_free=2) == 2
        with pytest.raises(EdgecompError, match=f"2 of the 2 devices with key '{key}'.*3 needed"):
            wait_for_devices(tracker, key, timeout=1, min_free=3)

        listed = edgecomp("devices", "--tracker", tracker)
        assert listed.returncode == 0 and key in listed.stdout, listed.stderr
        unknown = f"no device with key 'rasp3b'.*registered keys: {key}"
        with pytest.raises(EdgecompError, match=unknown):
            connect(tracker=tracker, key="rasp3b", timeout=10)
        remote = open_package(package.path, tracker=tracker, key=key, timeout=60)
        x = read_inputs(remote.package.inputs, None, seed=3)
        (got,) = remote.run(x)
        (want,) = onnxruntime_outputs(model, {"x": x[0]})
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    finally:
        stopped = edgecomp("device", "stop", "--key", key)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.count("stopped rasp4b on 127.0.0.1:") == 2, stopped.stdout
    assert not [d for d in running_devices() if d["key"] == key]


@pytest.mark.device
def test_a_device_that_does_not_come_up_stops_them_all():
    port = free_port()
    while not _port_free("127.0.0.1", port + 1):
        port = free_port()
    with pytest.raises(
        EdgecompError,
        match=f"rasp4b 1 of 2 on 127.0.0.1:{port} did not answer within 1 s.*all 2 stopped",
    ):
        start_emulated_devices(load_board("rasp4b"), 2, port=port, timeout=1)
    assert not [d for d in running_devices() if d["port"] in (port, port + 1)]
    assert _port_free("127.0.0.1", port) and _port_free("127.0.0.1", port + 1)


def test_cli_with_an_unreachable_tracker_fails_at_once():
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = edgecomp("device", "emulate", "--count", "2", "--tracker", address, timeout=60)
    assert_clean_error(result, f"cannot reach the RPC tracker at {address}")
    assert time.monotonic() - start < 30


def test_wait_for_devices_names_the_key_nobody_registered(tracker):
    start = time.monotonic()
    with pytest.raises(
        EdgecompError,
        match=f"no device with key 'nobody' is registered at the tracker {tracker}"
        r" \(registered keys: .*\) after waiting 2 s",
    ):
        wait_for_devices(tracker, "nobody", timeout=2)
    assert 2 <= time.monotonic() - start < 15
    unreachable = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(EdgecompError, match=f"cannot reach the RPC tracker at {unreachable}"):
        wait_for_devices(unreachable, "rasp4b", timeout=60)
    assert time.monotonic() - start < 5
