"""Packages on the emulated Raspberry Pi 4 over real TVM RPC: numerics, timing, wrong arch."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny_cnn

from edgecomp.build import compile_model
from edgecomp.errors import EdgecompError
from edgecomp.models import bundled_model_path
from edgecomp.reference import onnxruntime_outputs
from edgecomp.runner import open_package, read_inputs

pytestmark = pytest.mark.device


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_cnn(tmp_path_factory.mktemp("model") / "tiny.onnx")


def test_rasp4b_package_matches_host_on_the_device(emulated_rasp4b, tiny, tmp_path):
    device_pkg = compile_model(tiny, "rasp4b", tmp_path / "rasp4b")
    host_pkg = compile_model(tiny, "host", tmp_path / "host")
    remote = open_package(device_pkg.path, rpc=emulated_rasp4b)
    x = read_inputs(remote.package.inputs, None, seed=7)
    (on_device,) = remote.run(x)
    (on_host,) = open_package(host_pkg.path, local=True).run(x)
    (reference,) = onnxruntime_outputs(tiny, {"x": x[0]})
    assert on_device.shape == (1, 10) and on_device.dtype == np.float32
    np.testing.assert_allclose(on_device, on_host, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(on_device, reference, rtol=1e-4, atol=1e-5)
    stats = remote.bench(x, repeat=3, warmup=1)
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]


def test_bundled_model_runs_on_the_device(emulated_rasp4b, tmp_path):
    model = bundled_model_path()
    remote = open_package(
        compile_model(model, "rasp4b", tmp_path / "pkg").path, rpc=emulated_rasp4b
    )
    x = read_inputs(remote.package.inputs, None, seed=0)
    got = remote.run(x)
    want = onnxruntime_outputs(model, {remote.package.inputs[0].name: x[0]})
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)


def test_package_for_another_architecture_is_refused(emulated_rasp4b, tiny, tmp_path):
    package = compile_model(tiny, "rasp3b", tmp_path / "rasp3b")
    with pytest.raises(EdgecompError, match=r"built for arm \(rasp3b\) but the device is aarch64"):
        open_package(package.path, rpc=emulated_rasp4b)
