"""exp / sigmoid / SiLU / tanh / GELU on CPUs: vectorizable approximations, checked against
numpy in float64 over float32's range, and no C-library call left in the kernels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm import relax

from edgecomp.pipeline import lower
from edgecomp.targets import load_board

HOST = load_board("host").tvm_target()


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# op, float64 reference, input range, absolute + relative tolerance
CASES = {
    "exp": (relax.op.exp, np.exp, (-87.0, 88.0), (0.0, 2e-6)),
    "sigmoid": (relax.op.sigmoid, _sigmoid, (-100.0, 100.0), (1e-7, 2e-6)),
    "silu": (relax.op.nn.silu, lambda x: x * _sigmoid(x), (-100.0, 100.0), (1e-6, 2e-6)),
    "tanh": (relax.op.tanh, np.tanh, (-20.0, 20.0), (1e-6, 2e-6)),
    "gelu": (
        relax.op.nn.gelu,
        lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
        (-20.0, 20.0),
        (1e-6, 2e-6),
    ),
}


def _module(op: object, shape: tuple[int, ...]) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(op(x))  # type: ignore[operator]
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_math_matches_float64_and_calls_no_libm(name: str) -> None:
    op, reference, (lo, hi), (atol, rtol) = CASES[name]
    x = np.concatenate(
        [
            np.linspace(lo, hi, 20001, dtype=np.float32),
            np.array([0.0, -0.0, 1e-6, -1e-6, 1e-30, 0.5, -0.5], dtype=np.float32),
        ]
    ).reshape(1, 8, 2501, 1)
    lowered = lower(_module(op, x.shape), HOST)
    text = lowered.script()
    for intrinsic in ("T.exp(", "T.tanh(", "T.erf(", "T.sigmoid("):
        assert intrinsic not in text, f"{name} still calls {intrinsic[2:-1]}"
    vm = relax.VirtualMachine(tvm.compile(lowered, target=HOST), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy().astype(np.float64)
    want = reference(x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def test_float16_keeps_the_stock_lowering() -> None:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 16), "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.sigmoid(x))
        bb.emit_func_output(y)
    assert "T.sigmoid(" in lower(bb.get(), HOST).script()
