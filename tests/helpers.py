"""Small ONNX models built in the tests, so each test says exactly what it feeds edgecomp."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_cnn(
    path: Path, seed: int = 0, batch: int | str = 1, extra_node: onnx.NodeProto | None = None
) -> Path:
    """Conv(3x3, 4->8, pad 1) -> Relu -> MaxPool(2) -> Flatten -> Gemm(8*4*4 -> 10) on 1x4x8x8.

    ``batch`` may be a symbol (``"N"``) to make the input dynamic; ``extra_node`` is appended
    after the Gemm and must map ``logits`` to ``out``.
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((10, 128)) * 0.1).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        helper.make_node(
            "MaxPool", ["r"], ["p"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], name="fc", transB=1),
    ]
    output, out_shape = "logits", [batch, 10]
    if extra_node is not None:
        nodes.append(extra_node)
        output, out_shape = "out", []
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 8, 8])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def edgecomp(*args: str, timeout: float = 420) -> subprocess.CompletedProcess[str]:
    """Run the ``edgecomp`` command in a fresh process, capturing its output.

    Bounded: fails the test, naming the command and showing its output so far, when it does
    not finish within ``timeout`` seconds (above the 300 s an emulated device may take).
    """
    import pytest

    try:
        return subprocess.run(
            [sys.executable, "-m", "edgecomp", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        out = err.stderr.decode() if isinstance(err.stderr, bytes) else err.stderr or ""
        pytest.fail(f"edgecomp {' '.join(args)} did not finish within {timeout:g} s:\n{out}")


def assert_clean_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    """The command failed with exit 1 and a one-line error containing ``message``."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("edgecomp: error: "), result.stderr
    assert message in lines[-1]


def wait_for_rpc_server(
    proc: subprocess.Popen[bytes], host: str, port: int, log: Path, timeout: float = 120.0
) -> None:
    """Wait until the RPC server ``proc`` (its output in ``log``) answers on ``host:port``.

    Bounded and checked: fails the test, saying what did not start and with the end of its
    log, when the process exits or no session opens within ``timeout`` seconds (generous: the
    machine may be loaded). Each attempt is bounded too: a server that accepts the connection
    but never answers would hold TVM's own ``rpc.connect`` forever.
    """
    import pytest

    from edgecomp.errors import EdgecompError
    from edgecomp.rpc import connect

    start = time.monotonic()
    last = "no attempt"
    while True:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text().strip().splitlines()[-8:])
            pytest.fail(f"the RPC server for {host}:{port} exited with {proc.returncode}:\n{tail}")
        left = timeout - (time.monotonic() - start)
        if left <= 0:
            pytest.fail(
                f"the RPC server on {host}:{port} did not answer within {timeout:g} s ({last});"
                f" see {log}"
            )
        try:
            connect(rpc=f"{host}:{port}", timeout=max(1.0, min(left, 30.0)))
            return
        except EdgecompError as err:  # not listening yet
            last = str(err)
            time.sleep(0.2)
