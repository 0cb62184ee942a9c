"""The command line: help with examples, and one-line errors with no traceback."""

from __future__ import annotations

import pytest
from helpers import assert_clean_error, edgecomp, tiny_cnn

SUBCOMMANDS = [
    ["targets"],
    ["compile"],
    ["package"],
    ["analyze"],
    ["run"],
    ["bench"],
    ["device"],
    ["device", "emulate"],
    ["device", "stop"],
    ["tracker"],
    ["devices"],
    ["report"],
    ["demo"],
]


def test_top_level_help_lists_commands_with_an_example():
    out = edgecomp("--help").stdout
    for cmd in (
        "compile",
        "package",
        "run",
        "bench",
        "device",
        "tracker",
        "devices",
        "targets",
        "analyze",
        "demo",
    ):
        assert f"    {cmd}" in out
    assert "example" in out


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_help_has_an_example(cmd):
    result = edgecomp(*cmd, "--help")
    assert result.returncode == 0
    assert "example:\n  edgecomp " + cmd[0] in result.stdout


def test_targets_lists_the_boards():
    out = edgecomp("targets").stdout
    for board in ("host", "rasp4b", "rasp3b", "rk3399", "rk3399-mali", "android-arm64"):
        assert board in out


def test_compile_errors(tmp_path):
    model = tiny_cnn(tmp_path / "m.onnx")
    assert_clean_error(
        edgecomp(
            "compile", str(tmp_path / "nope.onnx"), "--target", "host", "-o", str(tmp_path / "o")
        ),
        "nope.onnx does not exist",
    )
    assert_clean_error(
        edgecomp("compile", str(model), "--target", "pi9", "-o", str(tmp_path / "o")),
        "unknown board 'pi9'; known boards: android-arm64, host",
    )
    dyn = tiny_cnn(tmp_path / "dyn.onnx", batch="N")
    assert_clean_error(
        edgecomp("compile", str(dyn), "--target", "host", "-o", str(tmp_path / "o")),
        "--input-shape x:",
    )
    assert not (tmp_path / "o").exists()


def test_compile_then_run_locally(tmp_path):
    model = tiny_cnn(tmp_path / "m.onnx")
    result = edgecomp("compile", str(model), "--target", "host", "-o", str(tmp_path / "pkg"))
    assert result.returncode == 0, result.stderr
    result = edgecomp(
        "run",
        str(tmp_path / "pkg"),
        "--local",
        "--check",
        str(model),
        "-o",
        str(tmp_path / "y.npz"),
    )
    assert result.returncode == 0, result.stderr
    assert "outputs match ONNX Runtime" in result.stdout
    import numpy as np

    assert np.load(tmp_path / "y.npz")["logits"].shape == (1, 10)
    result = edgecomp("bench", str(tmp_path / "pkg"), "--local", "--repeat", "3")
    assert result.returncode == 0, result.stderr
    assert "median" in result.stdout and "over 3 runs" in result.stdout

    report = edgecomp("report", str(tmp_path / "pkg"))
    assert report.returncode == 0, report.stderr
    assert "planned peak" in report.stdout.lower(), report.stdout
    timed = edgecomp("report", str(tmp_path / "pkg"), "--local", "--plot", str(tmp_path / "m.png"))
    assert timed.returncode == 0, timed.stderr
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_needs_exactly_one_place(tmp_path):
    model = tiny_cnn(tmp_path / "m.onnx")
    edgecomp("compile", str(model), "--target", "host", "-o", str(tmp_path / "pkg"))
    assert_clean_error(edgecomp("run", str(tmp_path / "pkg")), "exactly one of --rpc")
    assert_clean_error(
        edgecomp("run", str(tmp_path / "nopkg"), "--local"), "is not an edgecomp package"
    )


def test_unreachable_rpc_address_is_named_and_bounded(tmp_path):
    import socket
    import time

    model = tiny_cnn(tmp_path / "m.onnx")
    edgecomp("compile", str(model), "--target", "rasp4b", "-o", str(tmp_path / "pkg"))
    with socket.socket() as s:  # a loopback port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    result = edgecomp("run", str(tmp_path / "pkg"), "--rpc", f"127.0.0.1:{port}", "--timeout", "5")
    assert_clean_error(result, f"127.0.0.1:{port}")
    assert time.monotonic() - start < 60
