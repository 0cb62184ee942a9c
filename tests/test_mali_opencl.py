"""Mali (OpenCL) kernels checked numerically: run on PoCL, compared with the host build and ORT.

The kernels are the real ones edgecomp generates for ``rk3399-mali`` (``edgecomp.pipeline``),
launched with the sizes TVM's runtime would use, on PoCL (a CPU OpenCL implementation).
Needs ``pip install pyopencl pocl-binary-distribution``.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import onnx
import pytest
from helpers import tiny_cnn
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from edgecomp import opencl_check
from edgecomp.errors import EdgecompError
from edgecomp.frontend import import_onnx
from edgecomp.opencl_check import (
    build_device_program,
    check_opencl_kernels,
    max_abs_error,
    outputs_match,
    random_arguments,
    run_device_program,
    run_host_reference,
    run_main_on_opencl,
    written_params,
)
from edgecomp.pipeline import lower
from edgecomp.reference import onnxruntime_outputs
from edgecomp.targets import load_board


@pytest.fixture(scope="module")
def mali():
    return load_board("rk3399-mali").tvm_target()


def one_node_model(
    node: onnx.NodeProto, x_shape: list[int], y_shape: list[int], weights: dict[str, np.ndarray]
) -> onnx.ModelProto:
    """A model of one node ``x -> y`` whose other inputs are the given initializers."""
    graph = helper.make_graph(
        [node],
        node.op_type.lower(),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        initializer=[numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def single_ops() -> dict[str, onnx.ModelProto]:
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    conv = {"w": w(16, 8, 3, 3), "b": w(16)}
    return {
        "conv3x3_s1": one_node_model(
            helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
            [1, 8, 14, 14], [1, 16, 14, 14], conv,
        ),
        "conv3x3_s2": one_node_model(
            helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2]),
            [1, 8, 15, 15], [1, 16, 8, 8], conv,
        ),
        "depthwise3x3": one_node_model(
            helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=8),
            [1, 8, 12, 12], [1, 8, 12, 12], {"w": w(8, 1, 3, 3)},
        ),
        "dense": one_node_model(
            helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1),
            [2, 64], [2, 32], {"w": w(32, 64), "b": w(32)},
        ),
        "softmax": one_node_model(
            helper.make_node("Softmax", ["x"], ["y"], axis=-1), [4, 100], [4, 100], {}
        ),
    }  # fmt: skip


def lowered(model: onnx.ModelProto, target):
    mod, _ = import_onnx(model)
    return lower(mod, target)


@pytest.mark.parametrize("op", sorted(single_ops()))
def test_single_op_kernels_match_host_and_onnxruntime(op, mali):
    model = single_ops()[op]
    mod = lowered(model, mali)
    checks = check_opencl_kernels(mod, mali)
    assert checks, "the lowered module has no kernels"
    for check in checks:
        assert check.kernels, f"{check.name} launched no kernel"
        assert check.ok, check
    x_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    (got,) = run_main_on_opencl(mod, mali, [x])
    (want,) = onnxruntime_outputs(model.SerializeToString(), {"x": x})
    assert got.shape == want.shape and got.dtype == want.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_tiny_cnn_kernels_and_model_match(tmp_path, mali):
    path = tiny_cnn(tmp_path / "tiny.onnx")
    mod = lowered(onnx.load(str(path)), mali)
    checks = check_opencl_kernels(mod, mali)
    # conv+bias+relu (MEC: pad, lower, gemm kernels), maxpool, flatten, gemm+bias
    assert len(checks) == 4
    assert all(c.ok for c in checks), checks
    assert sum(len(c.kernels) for c in checks) >= 4
    x = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    (got,) = run_main_on_opencl(mod, mali, [x])
    (want,) = onnxruntime_outputs(path, {"x": x})
    assert got.shape == want.shape == (1, 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def conv_func(mali):
    """The fused conv+bias PrimFunc of conv3x3_s2: several kernels and a workspace."""
    mod = lowered(single_ops()["conv3x3_s2"], mali)
    (name,) = [gv.name_hint for gv in mod.functions if "conv" in gv.name_hint]
    return name, mod[name]


def test_wrong_launch_size_is_caught(conv_func, mali):
    name, func = conv_func
    program = build_device_program(name, func, mali)
    arrays = random_arguments(func, np.random.default_rng(0))
    (out,) = written_params(func)
    want = [run_host_reference(name, func, arrays)[out]]
    assert outputs_match([run_device_program(program, arrays)[out]], want, 1e-4, 1e-5)
    # Half the work groups of the last kernel: the outputs it no longer writes stay NaN.
    last = program.launches[-1]
    grid = (max(1, last.grid[0] // 2), *last.grid[1:])
    short = dataclasses.replace(
        program, launches=(*program.launches[:-1], dataclasses.replace(last, grid=grid))
    )
    got = [run_device_program(short, arrays)[out]]
    assert not outputs_match(got, want, 1e-4, 1e-5)
    assert max_abs_error(got, want) == float("inf")


def test_perturbed_reference_is_caught(conv_func, mali):
    name, func = conv_func
    arrays = random_arguments(func, np.random.default_rng(0))
    (out,) = written_params(func)
    got = [run_device_program(build_device_program(name, func, mali), arrays)[out]]
    perturbed = [a.copy() for a in arrays]
    perturbed[0].flat[7] += 1e-2  # one input element, well above the tolerances
    want = [run_host_reference(name, func, perturbed)[out]]
    assert not outputs_match(got, want, 1e-4, 1e-5)
    assert 1e-4 < max_abs_error(got, want) < 1.0


def test_missing_pyopencl_names_the_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyopencl", None)  # makes `import pyopencl` fail
    with pytest.raises(EdgecompError, match="pip install pyopencl pocl-binary-distribution"):
        opencl_check.require_pyopencl()


def test_unscheduled_module_is_refused(mali):
    mod, _ = import_onnx(single_ops()["dense"])
    legalized = relax.transform.LegalizeOps()(mod)  # prim funcs without GPU thread bindings
    with pytest.raises(EdgecompError, match="not bound to GPU threads"):
        check_opencl_kernels(legalized, mali)
