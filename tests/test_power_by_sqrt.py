"""PowerBySqrt: constant powers as square roots, exact against numpy and ONNX Runtime's LRN."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from edgecomp.frontend import import_onnx
from edgecomp.passes.power_by_sqrt import PowerBySqrt
from edgecomp.pipeline import lower
from edgecomp.reference import onnxruntime_outputs
from edgecomp.targets import load_board

HOST = load_board("host").tvm_target()


def _ops(mod: tvm.IRModule) -> list[str]:
    names: list[str] = []
    relax.analysis.post_order_visit(
        mod["main"].body,
        lambda e: (
            names.append(e.op.name)
            if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)
            else None
        ),
    )
    return names


def _power_module(exponent: float) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 5, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.power(x, relax.const(exponent, "float32")))
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize("exponent", [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 0.3])
def test_constant_powers_become_square_roots_and_stay_exact(exponent: float) -> None:
    mod = _power_module(exponent)
    rewritten = PowerBySqrt()(mod)
    ops = _ops(rewritten)
    if exponent == 0.3:  # no square-root form: left as it was
        assert ops == ["relax.power"]
    else:
        assert "relax.power" not in ops
        assert ("relax.sqrt" in ops) == (exponent % 1 != 0), ops
    x = np.random.default_rng(3).uniform(0.01, 50.0, (2, 3, 5, 16)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(lower(mod, HOST), target=HOST), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, np.power(x, np.float32(exponent)), rtol=2e-6)


def test_lrn_runs_on_square_roots_and_matches_onnxruntime() -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((32, 3, 3, 3)) * 2).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("LRN", ["r"], ["y"], size=5, alpha=1e-2, beta=0.75, bias=1.0),
    ]
    graph = helper.make_graph(
        nodes,
        "lrn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 13, 13])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 13, 13])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    mod, _ = import_onnx(model)
    assert "relax.power" in _ops(mod)
    assert "relax.power" not in _ops(PowerBySqrt()(mod))
    lowered = lower(mod, HOST)
    assert "T.pow(" not in lowered.script() and "T.sqrt(" in lowered.script()
    x = rng.standard_normal((1, 3, 13, 13)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(lowered, target=HOST), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    (want,) = onnxruntime_outputs(model.SerializeToString(), {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
