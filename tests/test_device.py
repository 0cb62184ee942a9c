"""The emulated device, the tracker and RPC: real qemu-user processes, real TVM sessions."""

from __future__ import annotations

import socket
import subprocess
import time

import numpy as np
import pytest
from helpers import assert_clean_error, edgecomp, tiny_cnn

from edgecomp.build import compile_model
from edgecomp.device import running_devices, start_emulated_device, stop_emulated_devices
from edgecomp.errors import EdgecompError
from edgecomp.reference import onnxruntime_outputs
from edgecomp.rpc import connect, device_arch, free_port
from edgecomp.targets import load_board


@pytest.mark.device
def test_emulated_device_is_an_aarch64_tvm_server_on_loopback(emulated_rasp4b):
    host, port = emulated_rasp4b.rsplit(":", 1)
    assert host == "127.0.0.1"
    session = connect(rpc=emulated_rasp4b, timeout=60)
    assert device_arch(session) == "aarch64"
    record = next(d for d in running_devices() if d["port"] == int(port))
    assert record["board"] == "rasp4b" and record["host"] == "127.0.0.1"
    with pytest.raises(EdgecompError, match=f"127.0.0.1:{port}: the port is in use"):
        start_emulated_device(load_board("rasp4b"), port=int(port))


@pytest.mark.device
def test_cli_emulate_then_stop(tmp_path):
    port = free_port()
    started = edgecomp("device", "emulate", "--target", "rasp4b", "--port", str(port))
    try:
        assert started.returncode == 0, started.stderr
        assert f"127.0.0.1:{port}" in started.stdout
        assert device_arch(connect(rpc=f"127.0.0.1:{port}", timeout=60)) == "aarch64"
    finally:
        stopped = edgecomp("device", "stop", "--port", str(port))
    assert stopped.returncode == 0 and f"127.0.0.1:{port}" in stopped.stdout
    with pytest.raises(EdgecompError, match=f"cannot reach the RPC server at 127.0.0.1:{port}"):
        connect(rpc=f"127.0.0.1:{port}", timeout=5)


def test_emulating_a_board_that_cannot_be_emulated_says_why():
    assert_clean_error(
        edgecomp("device", "emulate", "--target", "rasp3b"), "cannot be emulated here"
    )
    assert_clean_error(
        edgecomp("device", "emulate", "--target", "pi9"), "known boards: android-arm64, host"
    )


def test_refused_connection_names_the_address_at_once():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(EdgecompError, match=f"cannot reach the RPC server at 127.0.0.1:{port}"):
        connect(rpc=f"127.0.0.1:{port}", timeout=20)
    assert time.monotonic() - start < 5


def test_server_that_never_answers_gives_up_within_the_timeout():
    with socket.socket() as silent:  # accepts TCP connections (backlog), never speaks RPC
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(EdgecompError, match=f"RPC server at {address}: no answer within 2 s"):
            connect(rpc=address, timeout=2)
        assert time.monotonic() - start < 10


def test_unreachable_tracker_is_named():
    port = free_port()
    result = edgecomp("devices", "--tracker", f"127.0.0.1:{port}", "--timeout", "3")
    assert_clean_error(result, f"cannot reach the RPC tracker at 127.0.0.1:{port}")
    assert_clean_error(edgecomp("devices", "--tracker", "localhost"), "expected HOST:PORT")


@pytest.mark.device
def test_device_side_runner_needs_only_the_tvm_runtime(tmp_path):
    from edgecomp.device import prepare
    from edgecomp.resources import data_dir

    model = tiny_cnn(tmp_path / "tiny.onnx", seed=5)
    package = compile_model(model, "rasp4b", tmp_path / "pkg")
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    device_python = prepare(load_board("rasp4b")) / "python"
    result = subprocess.run(
        [str(device_python), str(data_dir("deploy") / "run_model.py"), str(package.path),
         "--input", f"x={tmp_path / 'x.npy'}", "-o", str(tmp_path / "y.npz"), "--repeat", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "latency: median" in result.stdout
    (want,) = onnxruntime_outputs(model, {"x": x})
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["logits"], want, rtol=1e-4, atol=1e-5)


@pytest.mark.device
def test_a_cache_filled_by_another_checkout_still_starts(tmp_path):
    """The device cache outlives the checkout that filled it (CI clones anew every run): a
    wrapper pointing into a deleted checkout, or a missing start-up hook, is rewritten."""
    from edgecomp.device import _device_dir, prepare

    board = load_board("rasp4b")
    folder = prepare(board)
    wrapper = folder / "python"
    good = wrapper.read_text()
    wrapper.write_text(good.replace(str(folder / "site"), "/gone/checkout/deploy"))
    (folder / "site" / "sitecustomize.py").unlink()
    assert prepare(board) == _device_dir(board) == folder
    assert wrapper.read_text() == good
    assert "EDGECOMP_DEVICE" in (folder / "site" / "sitecustomize.py").read_text()
    port = free_port()
    try:
        start_emulated_device(board, port=port)
        session = connect(rpc=f"127.0.0.1:{port}", timeout=60)
        assert device_arch(session) == "aarch64"
    finally:
        stop_emulated_devices(port)
