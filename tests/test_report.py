"""The memory report (edgecomp.report): its numbers against hand counts, plot and times.

Hand counts are float32 (4 bytes) on the test target, ``mcpu=haswell`` (AVX2, 8 lanes) with 2
cores: the MEC / im2col register tile for a 10-column output is 10 columns, so no width padding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tvm
from helpers import wait_for_rpc_server
from tvm import relax, rpc

from edgecomp import report as rp
from edgecomp.frontend import ModelSignature, TensorSpec
from edgecomp.kernels import chain_memory as cm
from edgecomp.kernels import chain_spec as cs
from edgecomp.package import read_package, write_package
from edgecomp.passes.factor_chains import chain_call
from edgecomp.pipeline import lower
from edgecomp.rpc import free_port
from edgecomp.runner import Loaded, open_package
from edgecomp.targets import load_board

HOST = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
F = 4  # bytes per float32


def _module(x_shape: tuple[int, ...], ops: list) -> tvm.IRModule:  # noqa: ANN401
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t: relax.Expr = x
            for op in ops:
                t = bb.emit(op(t))
            out = bb.emit_output(t)
        bb.emit_func_output(out)
    return bb.get()


def _cp_chain_module(
    x_shape: tuple[int, int, int, int], ws: list[np.ndarray], tail: list | None = None
) -> tvm.IRModule:
    """A CP chain of 3x3 padding 1 as DecomposeConv emits it (factors ``ws``), then ``tail``."""
    rank, k = ws[0].shape[0], ws[3].shape[0]
    geom = cs.ConvGeometry(padding=(1, 1, 1, 1))
    spec = cs.ChainSpec("cp", x_shape, k, (3, 3), (rank,), geom, False)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t = bb.emit(chain_call(bb, spec, x, [relax.const(w) for w in ws]))
            for op in tail or []:
                t = bb.emit(op(t))
            out = bb.emit_output(t)
        bb.emit_func_output(out)
    return bb.get()


def _conv(w: np.ndarray, **kw: object):  # noqa: ANN202 - a relax op builder
    return lambda t: relax.op.nn.conv2d(t, relax.const(w), **kw)


def _tiny(rng: np.random.Generator) -> tvm.IRModule:
    """conv 3x3 4->8 (pad 1) + ReLU on 1x4x10x10, then max-pool 2x2, conv 3x3 8->6 (pad 1)."""
    w1 = rng.standard_normal((8, 4, 3, 3)).astype("float32")
    w2 = rng.standard_normal((6, 8, 3, 3)).astype("float32")
    return _module(
        (1, 4, 10, 10),
        [
            _conv(w1, padding=(1, 1, 1, 1)),
            relax.op.nn.relu,
            lambda t: relax.op.nn.max_pool2d(t, (2, 2), (2, 2)),
            _conv(w2, padding=(1, 1, 1, 1)),
        ],
    )


def test_single_conv_by_hand() -> None:
    mod = _module(
        (1, 4, 10, 10),
        [_conv(np.ones((8, 4, 3, 3), "float32"), padding=(1, 1, 1, 1)), relax.op.nn.relu],
    )
    report = rp.memory_report(mod, HOST)
    rows = {v: report["variants"][v]["kernels"] for v in ("before", "after")}
    # Activations are NHWC between layers: the input is transposed in, the output back out.
    for kernels in rows.values():
        assert [row["kind"] for row in kernels] == ["other", "conv", "other"]
        assert [row["layer"] for row in kernels] == [None, 0, 0]
        assert kernels[0]["output_bytes"] == 4 * 10 * 10 * F  # x as NHWC
        assert kernels[2]["output_bytes"] == 8 * 10 * 10 * F and kernels[2]["model_output"]
    before, after = rows["before"][1], rows["after"][1]
    # Padded NHWC copy, both lowerings: 12 x 12 x 4.
    assert before["workspace"]["conv_pad"] == after["workspace"]["conv_pad"] == 12 * 12 * 4 * F
    # im2col matrix: (Ho*Wo) x (kh*kw*C) = 100 x 36.
    assert before["workspace"]["im2col_lower"] == 100 * 36 * F
    # MEC reads its lowered matrix in place from the padded copy, and writes its register
    # tiles straight into the NHWC output: nothing else.
    assert after["workspace"] == {"conv_pad": 12 * 12 * 4 * F}
    # Materialized (conv="mec-buffer"): Wo x (H_padded * kw * C) = 10 x (12 * 3 * 4), 3.33x
    # smaller than im2col's.
    buffered = rp.memory_report(mod, HOST, after=lower(mod, HOST, conv="mec-buffer"))
    copied = buffered["variants"]["after"]["kernels"][1]
    assert copied["workspace"]["mec_lower"] == 10 * 12 * 3 * 4 * F
    assert before["output_bytes"] == after["output_bytes"] == 8 * 10 * 10 * F
    assert report["variants"]["after"]["intermediate_bytes"] == (4 + 8) * 10 * 10 * F
    assert report["variants"]["after"]["weight_bytes"] == 8 * 4 * 9 * F  # 8 = one AVX2 panel


def test_cp_chain_unfused_vs_fused_matches_chain_memory() -> None:
    rng = np.random.default_rng(0)
    c, h, w, r, k = 16, 28, 28, 24, 16
    shapes = [(r, c, 1, 1), (r, 1, 3, 1), (r, 1, 1, 3), (k, r, 1, 1)]
    ws = [rng.standard_normal(s).astype("float32") for s in shapes]
    bias = rng.standard_normal((1, k, 1, 1)).astype("float32")
    mod = _cp_chain_module((1, c, h, w), ws, [lambda t: relax.op.add(t, relax.const(bias))])
    report = rp.memory_report(mod, HOST)
    before, after = (report["variants"][v]["kernels"] for v in ("before", "after"))
    # NHWC: the input is transposed in before the chain, its output back out after it.
    assert [row["layer"] for row in before] == [None, 0, 0, 0, 0, 0] and report["layers_matched"]
    before = before[1:-1]
    # The chain's flat output becomes NCHW by a reshape: a view when an op follows, a copy
    # here, where it is the model's output (TVM keeps outputs from aliasing).
    (fused,) = [row for row in after if row["kind"] == "chain:cp"]
    # Unfused: the three R-channel maps between the four convs (the bias is the last
    # conv's epilogue, so "before_bias" of unfused_intermediates is never materialised).
    assert [row["output_bytes"] for row in before[:3]] == [r * h * w * F] * 3
    lowered = lower(mod, HOST)
    prim = next(f for _, f in lowered.functions_items() if cs.ATTR_KIND in (f.attrs or {}))
    rows, rb = int(prim.attrs[cs.ATTR_TILE_ROWS]), int(prim.attrs[cs.ATTR_RANK_BLOCK])
    geom = cs.ConvGeometry((1, 1), (1, 1, 1, 1))
    spec = cs.ChainSpec("cp", (1, c, h, w), k, (3, 3), (r,), geom, True)
    mem = cm.chain_memory(spec, threads=2, rows=rows, rank_block=rb)
    assert fused["workspace_bytes"] == mem.fused_bytes
    # Hand count of one tile: t1 rb x (rows + 2) x W (one rank block of the input window's
    # projection), the depthwise result r x rows x W (every rank); two tiles at once.
    assert mem.fused_bytes == 2 * F * w * (rb * (rows + 2) + r * rows)
    assert fused["workspace_bytes"] < sum(row["output_bytes"] for row in before[:3]) / 5


def test_planned_peak_by_hand() -> None:
    report = rp.memory_report(_tiny(np.random.default_rng(1)), HOST)
    after = report["variants"]["after"]
    assert [row["kind"] for row in after["kernels"]] == ["other", "conv", "other", "conv", "other"]
    assert [row["layer"] for row in after["kernels"]] == [None, 0, 0, 1, 1]
    to_nhwc, conv1, pool, conv2, to_nchw = after["kernels"]
    # to_nhwc: x as NHWC, 4x10x10. conv1: its output 8x10x10 + its workspace (the padded
    # NHWC input 12x12x4, from which MEC reads its lowered matrix in place; register tiles are
    # no memory); pool: 8x10x10 in, 8x5x5 out; conv2: 8x5x5 in, 6x5x5 out + its workspace
    # (padded input 7x7x8); to_nchw: 6x5x5 in and out.
    assert conv1["workspace_bytes"] == F * 12 * 12 * 4
    assert conv2["workspace_bytes"] == F * 7 * 7 * 8
    assert pool["workspace_bytes"] == to_nhwc["workspace_bytes"] == 0
    at_conv1 = F * (400 + 800) + conv1["workspace_bytes"]
    at_pool = F * (800 + 200)
    at_conv2 = F * (200 + 150) + conv2["workspace_bytes"]
    at_out = F * (150 + 150)
    assert after["planned_peak_bytes"] == max(at_conv1, at_pool, at_conv2, at_out) == at_conv1
    assert after["intermediate_bytes"] == F * (400 + 800 + 200 + 150)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a Path
    """The tiny model compiled for the host board, with its report, as compile_model will."""
    board = load_board("host")
    target = board.tvm_target()
    mod = _tiny(np.random.default_rng(2))
    report = rp.memory_report(mod, target)
    signature = ModelSignature(
        (TensorSpec("x", (1, 4, 10, 10), "float32"),), (TensorSpec("y", (1, 6, 5, 5), "float32"),)
    )
    out = tmp_path_factory.mktemp("pkg") / "tiny"
    write_package(
        tvm.compile(lower(mod, target), target),
        board,
        signature,
        out,
        extra_files={rp.REPORT_FILE: json.dumps(report)},
    )
    return out


def test_local_times_cover_every_kernel_and_plot_is_png(package, tmp_path) -> None:  # noqa: ANN001
    loaded = open_package(package, local=True)
    times = rp.layer_times(loaded, repeat=3)
    report = rp.load_report(package)
    kernels = [row["kernel"] for row in report["variants"]["after"]["kernels"]]
    assert sorted(times) == sorted(kernels)
    assert all(ms > 0 for ms in times.values())
    png = tmp_path / "report.png"
    text = rp.run_report(package, loaded=loaded, plot=png)
    assert "planned peak" in text and "ms" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def rpc_server(tmp_path):  # noqa: ANN001, ANN201 - (host, port)
    """A TVM RPC server on this machine, in its own process: a stand-in for a remote device."""
    port = free_port()  # a port nobody else on this shared machine is using
    log = tmp_path / "rpc_server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tvm.exec.rpc_server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--port-end",
                str(port + 1),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TVM_NUM_THREADS": "1"},
            start_new_session=True,  # the server runs in a worker process of its own: stop both
        )
    try:
        wait_for_rpc_server(proc, "127.0.0.1", port, log)
        yield "127.0.0.1", port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_times_over_rpc_cover_every_kernel(package, rpc_server) -> None:  # noqa: ANN001
    session = rpc.connect(*rpc_server)
    pkg = read_package(package)
    session.upload(str(pkg.library))
    lib = session.load_module(pkg.library.name)
    loaded = Loaded(pkg, relax.VirtualMachine(lib, session.cpu()), session.cpu(), session)
    times = rp.layer_times(loaded, repeat=3)
    kernels = [row["kernel"] for row in rp.load_report(package)["variants"]["after"]["kernels"]]
    assert sorted(times) == sorted(kernels)
    assert all(ms > 0 for ms in times.values())


@pytest.mark.parametrize("refuse, chains", [("auto", 1), ("all", 1), ("none", 0)])
def test_layers_follow_the_refuse_mode(refuse: str, chains: int) -> None:
    """The report's layers are the chains the after-lowering fused: kernels map onto them."""
    rng = np.random.default_rng(3)
    shapes = [(8, 16, 1, 1), (8, 1, 3, 1), (8, 1, 1, 3), (16, 8, 1, 1)]
    ws = [rng.standard_normal(s).astype("float32") for s in shapes]
    mod = _cp_chain_module((1, 16, 16, 16), ws)
    report = rp.memory_report(mod, HOST, refuse=refuse)
    kinds = [layer["kind"] for layer in report["layers"]]
    assert kinds.count("chain:cp") == chains and len(kinds) == 1 + 3 * (1 - chains)
    assert report["layers_matched"]
