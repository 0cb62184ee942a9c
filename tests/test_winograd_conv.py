"""Winograd F(2x2, 3x3) convolution: where it applies, its banded and unbanded schedules, odd
and padded shapes and its tunable space, against ONNX Runtime and a float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from test_mec_conv import HOST, conv_model, numpy_conv, run_edgecomp, run_ort
from tvm import te
from tvm.relax.frontend.onnx import from_onnx

from edgecomp.kernels.conv2d import ConvSchedule
from edgecomp.kernels.conv_common import tiles_for
from edgecomp.kernels.winograd_conv import winograd_conv2d, winograd_weight
from edgecomp.pipeline import lower


def _conv_scripts(model) -> list[str]:  # noqa: ANN001
    lowered = lower(from_onnx(model, keep_params_in_input=False), HOST)
    return [
        f.script()
        for _, f in lowered.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and "edgecomp.conv_gemm" in f.script()
    ]


# (channels in, out, input size, pads [top, left, bottom, right], banded on the x86 host)
CASES = [
    (32, 48, (14, 14), (1, 1, 1, 1), True),
    (64, 32, (9, 11), (1, 1, 1, 1), True),  # odd output sizes: half-empty tiles
    (32, 32, (12, 15), (0, 0, 0, 0), True),  # no padding: 10 x 13 output
    (32, 64, (10, 10), (1, 0, 2, 1), True),  # asymmetric padding
    (128, 128, (8, 8), (1, 1, 1, 1), False),  # weight 1 MB: transforms as passes of their own
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}@{c[2][0]}x{c[2][1]}" for c in CASES])
def test_winograd_matches_onnxruntime(case: tuple) -> None:
    c, k, size, pads, banded = case
    model = conv_model(c, k, size, 3, 1, pads)
    (script,) = _conv_scripts(model)
    assert 'T.sblock("winograd_input")' in script and 'T.sblock("winograd_output")' in script
    # Banded: one parallel loop holds both transforms and the GEMM; else three passes.
    assert script.count("T.parallel(") == (1 if banded else 3), script
    assert "T.max(" in script  # the ReLU is in the output transform
    x = np.random.default_rng(2).standard_normal((1, c, *size)).astype(np.float32)
    np.testing.assert_allclose(run_edgecomp(model, x), run_ort(model, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("c", "k", "kernel", "stride"), [(16, 16, 3, 1), (24, 32, 3, 1), (32, 32, 3, 2), (32, 32, 5, 1)]
)
def test_other_convolutions_stay_mec(c: int, k: int, kernel: int, stride: int) -> None:
    """Few channels, channels in part vectors, strides and other kernels keep the direct GEMM."""
    model = conv_model(c, k, (16, 16), kernel, stride, (1, 1, 1, 1))
    (script,) = _conv_scripts(model)
    assert "winograd" not in script


def test_tunable_winograd_samples_tiles_and_stays_correct() -> None:
    rng = np.random.default_rng(7)
    c, k, h = 32, 32, 10
    x = rng.standard_normal((1, h, h, c)).astype(np.float32)
    w = rng.standard_normal((k, c, 3, 3)).astype(np.float32)
    tiles = tiles_for(h // 2, k, HOST, c)
    u = winograd_weight(w, tiles[1] * tiles[2])
    xt, ut = te.placeholder(x.shape, name="x"), te.placeholder(u.shape, name="u")
    y = winograd_conv2d(xt, ut, (1, 1, 1, 1), tiles, k)
    sch = ConvSchedule().apply(te.create_prim_func([xt, ut, y]), HOST, True)
    assert sch is not None and "sample_perfect_tile" in str(sch.trace)
    lib = tvm.compile(sch.mod, target=HOST).jit()
    out = tvm.runtime.tensor(np.zeros((1, h, h, k), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(u), out)
    want = numpy_conv(x.transpose(0, 3, 1, 2).astype(np.float64), w, 1).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)
