"""Compile and package: numerics on the host, ELF files for the boards, and the failure cases."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from helpers import tiny_cnn
from onnx import helper

from edgecomp.build import compile_model
from edgecomp.errors import EdgecompError
from edgecomp.models import light_model
from edgecomp.package import read_package
from edgecomp.reference import onnxruntime_outputs
from edgecomp.runner import open_package, read_inputs
from edgecomp.targets import elf_arch, load_board


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_cnn(tmp_path_factory.mktemp("model") / "tiny.onnx")


def test_alexnet_on_host_matches_onnxruntime(tmp_path):
    path = tmp_path / "alexnet.onnx"
    onnx.save(light_model("alexnet", seed=0), str(path))
    package = compile_model(path, "host", tmp_path / "out")
    loaded = open_package(package.path, local=True)
    x = read_inputs(loaded.package.inputs, None, seed=1)
    (got,) = loaded.run(x)
    (want,) = onnxruntime_outputs(path, {"data_0": x[0]})
    assert got.shape == want.shape == (1, 1000)
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_tiny_model_on_host_matches_onnxruntime(tiny, tmp_path):
    loaded = open_package(compile_model(tiny, "host", tmp_path / "out").path, local=True)
    x = read_inputs(loaded.package.inputs, None, seed=3)
    np.testing.assert_allclose(
        loaded.run(x)[0], onnxruntime_outputs(tiny, {"x": x[0]})[0], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    ("board", "arch"), [("rasp4b", "aarch64"), ("rasp3b", "arm"), ("rk3399", "aarch64")]
)
def test_package_is_an_elf_for_the_board(tiny, tmp_path, board, arch):
    package = compile_model(tiny, board, tmp_path / board)
    lib = package.path / "model.so"
    assert elf_arch(lib) == arch
    header = lib.read_bytes()[:20]
    assert header[4] == (1 if arch == "arm" else 2)  # ELFCLASS32 / ELFCLASS64
    assert sorted(os.listdir(package.path)) == ["manifest.json", "model.so", "report.json"]


def test_mali_package_carries_opencl_kernels(tiny, tmp_path):
    package = compile_model(tiny, "rk3399-mali", tmp_path / "mali")
    lib = (package.path / "model.so").read_bytes()
    assert elf_arch(package.path / "model.so") == "aarch64"
    assert b"__kernel" in lib  # the OpenCL C source of the kernels is embedded in the library


def test_manifest_describes_the_package(tiny, tmp_path):
    import tvm

    import edgecomp

    package = compile_model(tiny, "rasp4b", tmp_path / "out")
    manifest = json.loads((package.path / "manifest.json").read_text())
    assert manifest["edgecomp"] == edgecomp.__version__
    assert manifest["tvm"] == tvm.__version__
    assert manifest["board"] == "rasp4b" and manifest["arch"] == "aarch64"
    assert manifest["target"] == load_board("rasp4b").target
    assert manifest["tvm_target"]["mtriple"] == "aarch64-linux-gnu"
    assert manifest["inputs"] == [{"name": "x", "shape": [1, 4, 8, 8], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "logits", "shape": [1, 10], "dtype": "float32"}]
    import hashlib

    lib = package.path / "model.so"
    assert manifest["files"]["model.so"]["sha256"] == hashlib.sha256(lib.read_bytes()).hexdigest()
    assert manifest["files"]["model.so"]["bytes"] == lib.stat().st_size
    assert manifest["source"]["sha256"] == hashlib.sha256(tiny.read_bytes()).hexdigest()


def test_altered_package_is_refused(tiny, tmp_path):
    package = compile_model(tiny, "host", tmp_path / "out")
    with open(package.path / "model.so", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EdgecompError, match="does not match the checksum"):
        read_package(package.path)


def test_arm_package_does_not_run_here(tiny, tmp_path):
    package = compile_model(tiny, "rasp4b", tmp_path / "out")
    with pytest.raises(
        EdgecompError, match=r"built for rasp4b \(aarch64\) and cannot run on this x86_64 machine"
    ):
        open_package(package.path, local=True)


def _board_file(tmp_path, cc: str, package: str = "g++-imaginary"):
    data = json.loads(load_board("rasp4b").path.read_text())
    data["name"] = "myboard"
    data["cross_compiler"] = {"cc": cc, "options": [], "package": package}
    path = tmp_path / "myboard.json"
    path.write_text(json.dumps(data))
    return path


def test_missing_cross_compiler_names_the_package(tiny, tmp_path):
    board = _board_file(tmp_path, "aarch64-imaginary-g++")
    with pytest.raises(
        EdgecompError,
        match=r"cross compiler aarch64-imaginary-g\+\+ .* apt-get install g\+\+-imaginary",
    ):
        compile_model(tiny, board, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_android_needs_the_ndk(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    with pytest.raises(EdgecompError, match=r"Android NDK.*set TVM_NDK_CC"):
        compile_model(tiny, "android-arm64", tmp_path / "out")


def test_unknown_board_lists_the_known_ones(tiny, tmp_path):
    with pytest.raises(
        EdgecompError,
        match=r"unknown board 'pi9'; known boards: android-arm64, host, rasp3b, rasp4b, rk3399,"
        r" rk3399-mali",
    ):
        compile_model(tiny, "pi9", tmp_path / "out")


def test_failed_link_leaves_the_previous_package_whole(tiny, tmp_path):
    out = tmp_path / "out"
    before = compile_model(tiny, "rasp4b", out)
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = _board_file(tmp_path, "false")  # a "compiler" that always fails
    with pytest.raises(EdgecompError, match="linking model.so for myboard failed"):
        compile_model(tiny, broken, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []
    read_package(before.path)


def test_failed_import_writes_nothing(tmp_path):
    det = helper.make_node("Det", ["logits"], ["out"], name="d")
    model = tiny_cnn(tmp_path / "m.onnx", extra_node=det)
    with pytest.raises(EdgecompError, match="unsupported ONNX op Det"):
        compile_model(model, "rasp4b", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
