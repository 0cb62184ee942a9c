"""Weights beside the library (``--weights external``): lifting, packages, and VGG-19 on armv7."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from helpers import tiny_cnn
from tvm import relax

from edgecomp.build import compile_model
from edgecomp.errors import EdgecompError
from edgecomp.frontend import import_onnx
from edgecomp.models import light_model, load_onnx
from edgecomp.package import read_package
from edgecomp.pipeline import lower
from edgecomp.reference import onnxruntime_outputs
from edgecomp.runner import open_package
from edgecomp.targets import elf_arch, load_board
from edgecomp.weights import MIN_LIFTED_BYTES, choose_mode, constant_bytes, lift_weights


def _run(ex: tvm.runtime.Executable, *args: tvm.runtime.Tensor) -> np.ndarray:
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*args)
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy()


def test_lifted_module_computes_the_same_with_the_weights_as_arguments(tmp_path):
    mod, signature = import_onnx(load_onnx(tiny_cnn(tmp_path / "m.onnx")), None)
    target = load_board("host").tvm_target()
    lowered = lower(mod, target)
    lifted, params = lift_weights(lowered)
    assert sorted(params) == [f"p{i:04d}" for i in range(len(params))] and params
    # Everything large left the module; what stays is below the threshold.
    assert constant_bytes(lifted) < MIN_LIFTED_BYTES * max(1, len(params))
    assert constant_bytes(lowered) - constant_bytes(lifted) == sum(
        p.numpy().nbytes for p in params.values()
    )
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype("float32"))
    embedded = _run(tvm.compile(lowered, target=target), x)
    external = _run(tvm.compile(lifted, target=target), x, *[params[k] for k in sorted(params)])
    np.testing.assert_array_equal(external, embedded)


def test_auto_chooses_external_only_above_the_board_limit():
    assert choose_mode("auto", 256, 548_000_000) == "external"
    assert choose_mode("auto", 256, 100_000_000) == "embedded"
    assert choose_mode("auto", None, 548_000_000) == "embedded"
    assert choose_mode("embedded", 256, 548_000_000) == "embedded"
    assert load_board("rasp3b").max_embedded_weights_mb == 256
    assert load_board("rasp4b").max_embedded_weights_mb is None
    with pytest.raises(EdgecompError, match="choose one of auto, embedded, external"):
        choose_mode("inside", None, 0)


def test_external_package_runs_and_records_its_weights(tmp_path):
    model = tiny_cnn(tmp_path / "m.onnx")
    package = compile_model(model, "host", tmp_path / "pkg", weights="external")
    entry = package.manifest["weights"]
    assert entry["mode"] == "external" and entry["file"] == "weights.params"
    assert entry["sha256"] == package.manifest["files"]["weights.params"]["sha256"]
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    loaded = open_package(package.path, local=True)
    assert len(loaded.weights) == entry["tensors"]
    (got,) = loaded.run([x])
    (want,) = onnxruntime_outputs(model, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    stats = loaded.bench([x], repeat=2, warmup=1)
    assert stats["min_ms"] > 0
    embedded = compile_model(model, "host", tmp_path / "emb")
    assert embedded.manifest["weights"] == {"mode": "embedded", "file": None}
    (package.path / "weights.params").unlink()
    with pytest.raises(EdgecompError, match="lacks weights.params"):
        read_package(package.path)


def test_vgg19_compiles_for_rasp3b_with_external_weights(tmp_path):
    """Embedded, VGG-19's 548 MB of weights do not link for armv7; ``auto`` puts them beside."""
    path = tmp_path / "vgg19.onnx"
    onnx.save(light_model("vgg19", seed=0), str(path))
    package = compile_model(path, "rasp3b", tmp_path / "rasp3b")
    assert package.manifest["weights"]["mode"] == "external"
    library = package.path / "model.so"
    assert elf_arch(library) == "arm" and library.read_bytes()[4] == 1  # 32-bit ARM ELF
    assert library.stat().st_size < 10e6
    assert (package.path / "weights.params").stat().st_size > 500e6
