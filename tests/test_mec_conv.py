"""MEC convolution, its schedule rules and ``edgecomp.pipeline.lower``, against ONNX Runtime.

Every numeric check builds an ONNX model, runs it in ONNX Runtime (the independent reference),
imports it into Relax, lowers it with edgecomp's pipeline, builds it for the host and runs it on
the Relax VM. Cross-compilation checks build for aarch64, armv7 and Mali and read the ELF header.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, te
from tvm.relax.frontend.onnx import from_onnx

from edgecomp.kernels.conv2d import ConvSchedule
from edgecomp.kernels.conv_common import CONV_GEMM, choose_tiles, pack_weight
from edgecomp.kernels.mec_conv import mec_conv2d
from edgecomp.kernels.target_info import CpuInfo
from edgecomp.models import light_model
from edgecomp.pipeline import lower
from edgecomp.targets import elf_arch, load_board

ort = pytest.importorskip("onnxruntime")

HOST = load_board("host").tvm_target()


def conv_model(
    c: int,
    k: int,
    size: tuple[int, int],
    kernel: int,
    stride: int,
    pads: tuple[int, int, int, int],
    dilation: int = 1,
    group: int = 1,
    relu: bool = True,
    seed: int = 0,
) -> onnx.ModelProto:
    """One Conv (+ bias, + optional Relu) ONNX model with seeded weights."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, c // group, kernel, kernel)) * 0.2).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w", "b"],
            ["conv" if relu else "y"],
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=list(pads),
            dilations=[dilation, dilation],
            group=group,
        )
    ]
    if relu:
        nodes.append(helper.make_node("Relu", ["conv"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, *size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def small_cnn() -> onnx.ModelProto:
    """conv 3x3 -> relu -> maxpool -> depthwise 3x3 -> conv 1x1 -> flatten -> gemm -> softmax."""
    rng = np.random.default_rng(3)

    def init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4, group=16),
        helper.make_node("Conv", ["c2", "w3", "b3"], ["c3"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Flatten", ["r3"], ["f"]),
        helper.make_node("Gemm", ["f", "w4", "b4"], ["g"], transB=1),
        helper.make_node("Softmax", ["g"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[
            init("w1", (16, 3, 3, 3)),
            init("b1", (16,)),
            init("w2", (16, 1, 3, 3)),
            init("w3", (32, 16, 1, 1)),
            init("b3", (32,)),
            init("w4", (10, 32 * 8 * 8)),
            init("b4", (10,)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    sess = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def run_edgecomp(model: onnx.ModelProto, x: np.ndarray, conv: str = "mec") -> np.ndarray:
    mod = from_onnx(model, keep_params_in_input=False)
    ex = tvm.compile(lower(mod, HOST, conv=conv), target=HOST)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return out.numpy()


# (kernel, stride, pads [top, left, bottom, right], dilation, channels in, channels out, size)
CASES = [
    (1, 1, (0, 0, 0, 0), 1, 8, 16, (9, 11)),
    (1, 2, (0, 0, 0, 0), 1, 5, 24, (10, 10)),
    (3, 1, (1, 1, 1, 1), 1, 6, 16, (13, 13)),
    (3, 1, (0, 0, 0, 0), 1, 4, 8, (12, 15)),
    (3, 2, (1, 1, 1, 1), 1, 7, 32, (17, 17)),
    (3, 4, (1, 0, 2, 1), 1, 3, 16, (23, 21)),
    (3, 1, (2, 2, 2, 2), 2, 6, 16, (14, 14)),
    (5, 1, (2, 2, 2, 2), 1, 6, 16, (15, 15)),
    (5, 2, (0, 0, 0, 0), 1, 3, 12, (19, 19)),
    (7, 2, (3, 3, 3, 3), 1, 3, 16, (21, 21)),
    (7, 1, (0, 1, 2, 3), 1, 4, 8, (16, 16)),
    (11, 4, (2, 2, 2, 2), 1, 3, 16, (35, 35)),
    (11, 1, (5, 5, 5, 5), 1, 2, 8, (13, 13)),
    # Output channels that are not a multiple of the vector width (decomposition ranks):
    # the packed weight is zero-padded to whole panels and the padding dropped again.
    (3, 1, (1, 1, 1, 1), 1, 5, 17, (11, 11)),
    (1, 1, (0, 0, 0, 0), 1, 16, 50, (9, 9)),
    (3, 2, (1, 1, 1, 1), 1, 4, 3, (10, 10)),
]


def _case_id(case: tuple) -> str:
    k, s, p, d, c, o, size = case
    return f"k{k}s{s}p{''.join(map(str, p))}d{d}K{o}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_mec_conv_matches_onnxruntime(case: tuple) -> None:
    kernel, stride, pads, dilation, c, k, size = case
    model = conv_model(c, k, size, kernel, stride, pads, dilation)
    x = np.random.default_rng(1).standard_normal((1, c, *size)).astype(np.float32)
    ref = run_ort(model, x)
    out = run_edgecomp(model, x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("conv", ["mec-buffer", "im2col"])
@pytest.mark.parametrize("case", CASES[2::3], ids=[_case_id(c) for c in CASES[2::3]])
def test_other_lowerings_match_onnxruntime(case: tuple, conv: str) -> None:
    """MEC with its lowered buffer materialized, and im2col, the two it is measured against."""
    kernel, stride, pads, dilation, c, k, size = case
    model = conv_model(c, k, size, kernel, stride, pads, dilation, relu=False)
    x = np.random.default_rng(2).standard_normal((1, c, *size)).astype(np.float32)
    np.testing.assert_allclose(
        run_edgecomp(model, x, conv=conv), run_ort(model, x), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    "c, k, group", [(8, 16, 2), (12, 18, 3), (8, 16, 8)], ids=["grouped", "grouped-k6", "depthwise"]
)
def test_grouped_and_depthwise_conv_match_onnxruntime(c: int, k: int, group: int) -> None:
    model = conv_model(c, k, (12, 12), 3, 1, (1, 1, 1, 1), group=group)
    x = np.random.default_rng(4).standard_normal((1, c, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(run_edgecomp(model, x), run_ort(model, x), rtol=1e-4, atol=1e-4)


def test_schedule_rule_applied_to_conv() -> None:
    """The conv prim func is scheduled: parallel, vectorized, unrolled; epilogue fused in."""
    model = conv_model(16, 32, (14, 14), 3, 1, (1, 1, 1, 1))
    lowered = lower(from_onnx(model, keep_params_in_input=False), HOST)
    convs = [
        f
        for _, f in lowered.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and CONV_GEMM in f.script()
    ]
    assert len(convs) == 1
    func = convs[0]
    assert func.attrs["tirx.is_scheduled"]
    script = func.script()
    assert "T.parallel(" in script
    assert "T.vectorized(" in script
    assert "T.unroll(" in script
    # bias + relu became the convolution's epilogue: one fused function, ReLU's max inside.
    assert "T.max(" in script
    assert "mec_conv_local" in script  # accumulators live in a local (register) tile
    # The GEMM reads the lowered matrix in place from the padded copy: no lowered buffer.
    assert 'T.sblock("mec_lower")' not in script and 'T.sblock("conv_pad")' in script


def numpy_conv(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """Direct stride-1 NCHW convolution in numpy (an independent reference)."""
    k, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
    out = np.zeros((x.shape[0], k, ho, wo), np.float64)
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,kc->nkhw", xp[:, :, i : i + ho, j : j + wo], w[:, :, i, j])
    return out.astype(np.float32)


def test_tunable_schedule_samples_tiles_and_stays_correct() -> None:
    """``tunable=True`` samples the register tile; the sampled schedule still convolves."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 8, 10, 10)).astype(np.float32)
    w = rng.standard_normal((32, 8, 3, 3)).astype(np.float32)
    tiles = choose_tiles(10, 32, CpuInfo(lanes=8, registers=16))
    panel = tiles[1] * tiles[2]
    xt = te.placeholder(x.shape, name="x")
    wt = te.placeholder(pack_weight(w, 1, panel).shape, name="w")
    y = mec_conv2d(xt, wt, (1, 1), (1, 1, 1, 1), (1, 1), tiles)
    sch = ConvSchedule().apply(te.create_prim_func([xt, wt, y]), HOST, True)
    assert sch is not None and "sample_perfect_tile" in str(sch.trace)
    lib = tvm.compile(sch.mod, target=HOST).jit()
    out = tvm.runtime.tensor(np.zeros((1, 32, 10, 10), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(pack_weight(w, 1, panel)), out)
    np.testing.assert_allclose(out.numpy(), numpy_conv(x, w, 1), rtol=1e-4, atol=1e-4)


def test_choose_tiles_fits_registers_and_wastes_little() -> None:
    for info in (CpuInfo(lanes=8, registers=16), CpuInfo(lanes=16, registers=32)):
        for out_w in (13, 14, 26, 54, 56, 224):
            for k in (16, 96, 256, 384):
                tile_w, n_vec, lanes = choose_tiles(out_w, k, info)
                assert tile_w * n_vec + n_vec + 1 <= info.registers
                assert lanes == info.lanes
                assert k % (n_vec * lanes) == 0  # these widths need no channel padding
                assert -(-out_w // tile_w) * tile_w <= out_w * 1.25


def test_alexnet_matches_onnxruntime() -> None:
    model = light_model("alexnet", seed=0)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    ref = run_ort(model, x)
    out = run_edgecomp(model, x)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)


def test_small_cnn_matches_onnxruntime() -> None:
    model = small_cnn()
    x = np.random.default_rng(5).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run_edgecomp(model, x), run_ort(model, x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("board", ["rasp4b", "rasp3b"])
def test_cross_compile_gives_arm_elf(board: str, tmp_path) -> None:
    spec = load_board(board)
    if shutil.which(spec.cross_compiler["cc"]) is None:
        pytest.skip(f"{spec.cross_compiler['cc']} not installed")
    target = spec.tvm_target()
    lowered = lower(from_onnx(small_cnn(), keep_params_in_input=False), target)
    ex = tvm.compile(lowered, target=target)
    path = tmp_path / f"{board}.so"
    ex.export_library(str(path), fcompile=spec.fcompile())
    assert elf_arch(path) == spec.arch


def _modules(mod: tvm.runtime.Module) -> list[tvm.runtime.Module]:
    found = [mod]
    for sub in mod.imports:
        found += _modules(sub)
    return found


def test_mali_build(tmp_path) -> None:
    """Mali (OpenCL) kernels build, conv with its own thread binding, into an aarch64 .so."""
    spec = load_board("rk3399-mali")
    target = spec.tvm_target()
    lowered = lower(from_onnx(small_cnn(), keep_params_in_input=False), target)
    ex = tvm.compile(lowered, target=target)
    source = "\n".join(m.inspect_source() for m in _modules(ex.mod) if m.kind == "opencl")
    assert "__kernel" in source and "get_group_id" in source
    assert "mec_conv2d" in source  # the MEC kernel itself, bound by edgecomp's GPU schedule
    if shutil.which(spec.cross_compiler["cc"]) is not None:
        path = tmp_path / "mali.so"
        ex.export_library(str(path), fcompile=spec.fcompile())
        assert elf_arch(path) == "aarch64"
