"""The app kit: ``edgecomp package``, the native C++ runner built from the kit with its CMake
files (for aarch64 under qemu-user, and natively for the host), its checks, the Android sample.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_clean_error, edgecomp, tiny_cnn

from edgecomp.build import compile_model
from edgecomp.errors import EdgecompError
from edgecomp.kit import make_kit
from edgecomp.models import bundled_model_path
from edgecomp.reference import onnxruntime_outputs
from edgecomp.runner import open_package

QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]
BUILD_TIMEOUT = 300  # seconds for one CMake configure or build
RUN_TIMEOUT = 120  # seconds for one run of the runner (under qemu: a few seconds)


def unpack(kit: Path, where: Path) -> Path:
    """Unpack a kit archive; return its top folder."""
    with tarfile.open(kit) as tar:
        tar.extractall(where, filter="data")
    (top,) = [p for p in where.iterdir() if p.is_dir()]
    return top


def find_ffi_library() -> Path:
    import tvm_ffi

    return Path(tvm_ffi.__file__).parent / "lib" / "libtvm_ffi.so"


def cmake(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["cmake", *args], cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT
    )


def build_runner(kit: Path, toolchain: str | None = None) -> Path:
    """Configure and build the kit's runner with its own CMake files; return the binary."""
    configure = ["-S", "cpp", "-B", "build"]
    if toolchain is not None:
        configure.append(f"-DCMAKE_TOOLCHAIN_FILE={kit / 'cpp' / toolchain}")
    for args in (configure, ["--build", "build"]):
        result = cmake(args, kit)
        assert result.returncode == 0, result.stdout + result.stderr
    return kit / "build" / "edgecomp_run"


def run_native(
    runner: list[str], kit: Path, *args: str, out: Path | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [*runner, str(kit / "model"), *args]
    if out is not None:
        out.mkdir(exist_ok=True)
        cmd += ["-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def assert_runner_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    """The runner failed with one line ``edgecomp_run: error: ...`` containing ``message``."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgecomp_run: error: "), result.stderr
    assert message in lines[0], lines[0]


@pytest.fixture(scope="module")
def model_input(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """The bundled model, an input .npy for it, and that input."""
    model = bundled_model_path()
    x = np.random.default_rng(3).standard_normal((1, 1, 32, 32)).astype(np.float32)
    path = tmp_path_factory.mktemp("input") / "x.npy"
    np.save(path, x)
    return model, path, x


@pytest.fixture(scope="module")
def rasp4b_kits(tmp_path_factory, model_input) -> dict[str, Path]:
    """Unpacked rasp4b kits of the bundled model, weights embedded and external, with their
    runners built for aarch64 by the kits' CMake files and toolchain file."""
    model, _, _ = model_input
    kits = {}
    for weights in ("embedded", "external"):
        root = tmp_path_factory.mktemp(f"rasp4b-{weights}")
        package = compile_model(model, "rasp4b", root / "pkg", weights=weights)
        kit = unpack(make_kit(package.path, root / "kit.tar.gz"), root / "unpacked")
        build_runner(kit, "toolchain-aarch64.cmake")
        kits[weights] = kit
    return kits


@pytest.fixture(scope="module")
def host_kit(tmp_path_factory, model_input) -> tuple[Path, Path]:
    """A host kit of the bundled model (external weights) with its runner built natively,
    and its package folder."""
    model, _, _ = model_input
    root = tmp_path_factory.mktemp("host")
    package = compile_model(model, "host", root / "pkg", weights="external")
    kit = unpack(make_kit(package.path, root / "kit.tar.gz"), root / "unpacked")
    build_runner(kit)
    return kit, package.path


@pytest.mark.parametrize("weights", ["embedded", "external"])
def test_aarch64_runner_under_qemu_matches_the_host_reference(rasp4b_kits, model_input, weights):
    model, x_path, x = model_input
    kit = rasp4b_kits[weights]
    runner = kit / "build" / "edgecomp_run"
    assert runner.read_bytes()[18] == 183  # e_machine: AArch64
    result = run_native(
        [*QEMU, str(runner)], kit, "--input", f"input={x_path}", "--repeat", "3", "--threads", "2",
        out=kit / "out",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "logits: shape (1, 10) float32" in result.stdout
    assert "latency: median" in result.stdout and "over 3 runs" in result.stdout
    got = np.load(kit / "out" / "logits.npy")
    (want,) = onnxruntime_outputs(model, {"input": x})
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert (kit / "model" / "weights.params").is_file() == (weights == "external")


def test_kit_contents(rasp4b_kits):
    kit = rasp4b_kits["external"]
    record = json.loads((kit / "lib" / "runtime.json").read_text())
    manifest = json.loads((kit / "model" / "manifest.json").read_text())
    assert record["tvm"] == manifest["tvm"] and record["arch"] == "aarch64"
    assert set(record["files"]) == {"libtvm_runtime.so", "libtvm_ffi.so"}  # no tvm.contrib use
    for lib in record["files"]:
        assert (kit / "lib" / lib).read_bytes()[18] == 183
    assert manifest["weights"]["file"] == "weights.params"
    assert manifest["weights"]["sha256"] == manifest["files"]["weights.params"]["sha256"]
    assert (kit / "include" / "tvm" / "ffi" / "function.h").is_file()
    assert (kit / "include" / "dlpack" / "dlpack.h").is_file()
    licences = {p.name for p in (kit / "licenses").iterdir()}
    assert {"TVM-LICENSE", "TVM-NOTICE", "tvm-ffi-LICENSE", "tvm-ffi-NOTICE"} <= licences
    for f in ("edgecomp_run.cc", "edgecomp_model.h", "CMakeLists.txt", "toolchain-aarch64.cmake"):
        assert (kit / "cpp" / f).is_file()
    assert (kit / "android" / "build.sh").is_file()
    readme = (kit / "README.md").read_text()
    assert "toolchain-aarch64.cmake" in readme and "TVM_NUM_THREADS" in readme
    assert "glibc 2." in readme


def test_host_runner_equals_the_python_runner(host_kit, model_input, tmp_path):
    kit, package = host_kit
    _, x_path, x = model_input
    result = run_native([str(kit / "build" / "edgecomp_run")], kit, "--input", f"input={x_path}",
                        out=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (python,) = open_package(package, local=True).run([x])
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), python)


def test_runner_refuses_bad_input_and_altered_kits(host_kit, rasp4b_kits, model_input, tmp_path):
    kit, _ = host_kit
    runner = [str(kit / "build" / "edgecomp_run")]
    _, x_path, x = model_input
    given = ["--input", f"input={x_path}"]
    np.save(tmp_path / "shape.npy", x[:, :, :, :31])
    assert_runner_error(
        run_native(runner, kit, "--input", f"input={tmp_path / 'shape.npy'}"),
        "is (1, 1, 32, 31) float32; the model wants (1, 1, 32, 32) float32",
    )
    np.save(tmp_path / "dtype.npy", x.astype(np.float64))
    assert_runner_error(
        run_native(runner, kit, "--input", f"input={tmp_path / 'dtype.npy'}"),
        "is (1, 1, 32, 32) float64; the model wants (1, 1, 32, 32) float32",
    )
    # A model folder for another architecture.
    other = rasp4b_kits["embedded"]
    assert_runner_error(
        run_native(runner, other, *given), "was built for aarch64 (board rasp4b) but this"
    )
    # Altered, missing, or mismatched files: each on a copy, restored after.
    weights = kit / "model" / "weights.params"
    saved = weights.read_bytes()
    weights.write_bytes(saved + b"x")
    assert_runner_error(run_native(runner, kit, *given), "does not match its checksum")
    weights.unlink()
    assert_runner_error(run_native(runner, kit, *given), "weights.params is missing")
    weights.write_bytes(saved)
    lib = kit / "lib" / "libtvm_runtime.so"
    os.replace(lib, tmp_path / "rt.so")
    assert_runner_error(
        run_native(runner, kit, *given), "the TVM runtime library " + str(lib) + " is missing"
    )
    os.replace(tmp_path / "rt.so", lib)
    record = kit / "lib" / "runtime.json"
    text = record.read_text()
    version = json.loads(text)["tvm"]
    record.write_text(text.replace(f'"tvm": "{version}"', '"tvm": "0.26.0"'))
    assert_runner_error(
        run_native(runner, kit, *given),
        f"the model was compiled with TVM {version} but the runtime in",
    )
    record.write_text(text)
    assert run_native(runner, kit, *given).returncode == 0


def test_python_runner_refuses_another_tvm_version(host_kit, tmp_path):
    import sys

    from edgecomp.resources import data_dir

    _, package = host_kit
    copy = tmp_path / "pkg"
    shutil.copytree(package, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tvm"] = "0.26.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run(
        [sys.executable, str(data_dir("deploy") / "run_model.py"), str(copy)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "run_model: the model was compiled with TVM 0.26.0 but this device has TVM"
        f" {json.loads((package / 'manifest.json').read_text())['tvm']}: install"
        " apache-tvm==0.26.0 or compile it again"
    ]


def test_kit_cmake_refuses_to_build_for_another_architecture(rasp4b_kits, tmp_path):
    kit = tmp_path / "kit"
    shutil.copytree(rasp4b_kits["embedded"], kit, ignore=shutil.ignore_patterns("build", "out"))
    result = cmake(["-S", "cpp", "-B", "build-host"], kit)
    assert result.returncode != 0
    assert "this kit's TVM runtime is for aarch64" in result.stderr
    assert "toolchain-aarch64.cmake" in result.stderr


def test_package_errors(tmp_path):
    assert_clean_error(
        edgecomp("package", str(tmp_path), "-o", str(tmp_path / "k.tar.gz")),
        "is not an edgecomp package (no manifest.json)",
    )
    model = tiny_cnn(tmp_path / "m.onnx")
    rasp3b = compile_model(model, "rasp3b", tmp_path / "rasp3b")
    assert_clean_error(
        edgecomp("package", str(rasp3b.path), "-o", str(tmp_path / "k.tar.gz")),
        "PyPI has no arm TVM runtime (board rasp3b)",
    )
    empty = tmp_path / "runtime"
    empty.mkdir()
    assert_clean_error(
        edgecomp("package", str(rasp3b.path), "-o", str(tmp_path / "k.tar.gz"),
                 "--runtime", str(empty)),
        "the TVM runtime library libtvm_runtime.so is missing",
    )  # fmt: skip
    import tvm

    host_libs = tmp_path / "host-runtime"  # a runtime of the wrong architecture
    host_libs.mkdir()
    (host_libs / "libtvm_runtime.so").symlink_to(
        Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so"
    )
    (host_libs / "libtvm_ffi.so").symlink_to(find_ffi_library())
    assert_clean_error(
        edgecomp("package", str(rasp3b.path), "-o", str(tmp_path / "k.tar.gz"),
                 "--runtime", str(host_libs)),
        "is for x86_64 but the package is for arm (board rasp3b)",
    )  # fmt: skip
    (rasp3b.path / "model.so").write_bytes(b"altered")
    with pytest.raises(EdgecompError, match="does not match the checksum"):
        make_kit(rasp3b.path, tmp_path / "k.tar.gz")
    assert not (tmp_path / "k.tar.gz").exists()


def test_android_build_script_says_what_to_set(tmp_path):
    script = Path(__file__).resolve().parents[1] / "deploy" / "android" / "build.sh"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANDROID_", "TVM_ANDROID"))}
    result = subprocess.run(
        ["sh", str(script)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "set ANDROID_NDK_HOME (or ANDROID_NDK)" in result.stderr
    env["ANDROID_NDK_HOME"] = str(tmp_path)
    result = subprocess.run(
        ["sh", str(script)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "set TVM_ANDROID_RUNTIME" in result.stderr


@pytest.mark.device
def test_rpc_runner_loads_external_weights(emulated_rasp4b, rasp4b_kits, model_input):
    model, _, x = model_input
    # A kit's model/ folder is a package folder: the Python runners take it as it is.
    remote = open_package(rasp4b_kits["external"] / "model", rpc=emulated_rasp4b)
    assert len(remote.weights) == remote.package.manifest["weights"]["tensors"]
    (got,) = remote.run([x])
    (want,) = onnxruntime_outputs(model, {"input": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.device
def test_python_device_runner_equals_the_native_runner(rasp4b_kits, model_input):
    from edgecomp.device import prepare
    from edgecomp.resources import data_dir
    from edgecomp.targets import load_board

    python = prepare(load_board("rasp4b")) / "python"
    kit = rasp4b_kits["external"]
    _, x_path, _ = model_input
    native = run_native([*QEMU, str(kit / "build" / "edgecomp_run")], kit,
                        "--input", f"input={x_path}", out=kit / "native")  # fmt: skip
    assert native.returncode == 0, native.stderr
    result = subprocess.run(
        [str(python), str(data_dir("deploy") / "run_model.py"), str(kit / "model"),
         "--input", f"input={x_path}", "-o", str(kit / "python.npz")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(
        np.load(kit / "native" / "logits.npy"), np.load(kit / "python.npz")["logits"]
    )
