"""The block forms people deploy (edgecomp.zoo.blocks) against ONNX Runtime, on every board.

Each block model (ResNet bottleneck, MobileNet v2 / v3 with squeeze-and-excitation,
EfficientNet MBConv, YOLO C3, inception, fire, ShuffleNet, DenseNet, the other activations) is
compiled for the host, rasp4b and rasp3b; host and emulated-rasp4b outputs are checked against
ONNX Runtime, and each decomposition at full rank stays exact. Also: activations stay NHWC
between convolutions (pools on the model's input too), a schedule rule that fails falls back to
one that builds, BatchNormalization in training mode is refused.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, s_tir
from tvm.s_tir import dlight
from tvm.s_tir.dlight.base import ScheduleRule

from edgecomp.build import compile_model
from edgecomp.errors import EdgecompError
from edgecomp.frontend import import_onnx
from edgecomp.kernels import CpuFallback, Guarded
from edgecomp.kernels.conv2d import conv_legalizer
from edgecomp.passes.decompose_conv import decompose_conv
from edgecomp.pipeline import lower
from edgecomp.reference import onnxruntime_outputs
from edgecomp.runner import open_package
from edgecomp.targets import elf_arch, load_board
from edgecomp.zoo.blocks import BLOCKS, GraphBuilder, block_model, densenet

HOST = load_board("host").tvm_target()
NAMES = sorted(BLOCKS)


def _input(model: onnx.ModelProto, batch: int = 1) -> np.ndarray:
    dims = [d.dim_value or batch for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(11).standard_normal(dims).astype(np.float32)


def _run_host(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(lower(mod, HOST), target=HOST), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.fixture(scope="module")
def block_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("blocks")
    paths = {}
    for name in NAMES:
        paths[name] = str(folder / f"{name}.onnx")
        onnx.save(block_model(name, test_size=True), paths[name])
    return paths


@pytest.mark.parametrize("name", NAMES)
def test_block_on_host_matches_onnxruntime(name: str, block_files, tmp_path) -> None:  # noqa: ANN001
    package = compile_model(block_files[name], "host", tmp_path / "host")
    x = _input(onnx.load(block_files[name]))
    (got,) = open_package(package.path, local=True).run([x])
    (want,) = onnxruntime_outputs(block_files[name], {"x": x})
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.device
@pytest.mark.parametrize("name", NAMES)
def test_block_on_emulated_rasp4b_matches_onnxruntime(
    name: str,
    block_files,
    emulated_rasp4b,
    tmp_path,  # noqa: ANN001
) -> None:
    package = compile_model(block_files[name], "rasp4b", tmp_path / "rasp4b")
    assert elf_arch(package.library) == "aarch64"
    x = _input(onnx.load(block_files[name]))
    (got,) = open_package(package.path, rpc=emulated_rasp4b).run([x])
    (want,) = onnxruntime_outputs(block_files[name], {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_block_compiles_for_rasp3b(name: str, block_files, tmp_path) -> None:  # noqa: ANN001
    package = compile_model(block_files[name], "rasp3b", tmp_path / "rasp3b")
    assert elf_arch(package.library) == "arm"


@pytest.mark.parametrize("method", ["cp", "tucker", "kronecker"])
@pytest.mark.parametrize("name", NAMES)
def test_full_rank_decomposition_is_exact(name: str, method: str) -> None:
    model = block_model(name, test_size=True)
    mod, _ = import_onnx(model)
    decomposed, layers = decompose_conv(mod, method, "rank=full")
    x = _input(model)
    (want,) = onnxruntime_outputs(model.SerializeToString(), {"x": x})
    got = _run_host(decomposed, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_dynamic_batch_through_input_shape(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "v3.onnx"
    model = block_model("mobilenet_v3", test_size=True)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(model, str(path))
    with pytest.raises(EdgecompError, match=r"dynamic shape .*--input-shape x:"):
        compile_model(path, "host", tmp_path / "none")
    package = compile_model(path, "host", tmp_path / "b2", input_shapes={"x": (2, 16, 8, 8)})
    x = _input(model, batch=2)
    (got,) = open_package(package.path, local=True).run([x])
    (want,) = onnxruntime_outputs(path, {"x": x})
    assert got.shape[0] == 2
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _two_convs() -> onnx.ModelProto:
    g = GraphBuilder("two_convs", (1, 8, 12, 12))
    t = g.act(g.conv("x", 16, 3, bn=False, bias=True), "relu")
    return g.model(g.conv(t, 8, 1, bn=False, bias=True))


def _kernels(lowered: tvm.IRModule) -> list[str]:
    """Names of the prim funcs ``main`` calls, in order."""
    names = []
    for block in lowered["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.call_tir"):
                names.append(value.args[0].name_hint)
    return names


def test_no_transpose_between_nhwc_convolutions() -> None:
    mod, _ = import_onnx(_two_convs())
    kernels = _kernels(lower(mod, HOST))
    convs = [i for i, k in enumerate(kernels) if "conv2d" in k]
    assert len(convs) == 2, kernels
    between = kernels[convs[0] + 1 : convs[1]]
    assert not [k for k in between if "transpose" in k], kernels
    # Transposes only at the model's input and output.
    assert "transpose" in kernels[0] and "transpose" in kernels[-1]
    # The NCHW layout (each conv converting itself) has none of those separate kernels.
    assert not [k for k in _kernels(lower(mod, HOST, layout="NCHW")) if "transpose" in k]


def _pools_on_the_input() -> onnx.ModelProto:
    """Max and average pools (padded, with and without the padding counted) on the model's
    input, each before a 1x1 convolution, next to a convolution of the input itself."""
    g = GraphBuilder("pools", (1, 16, 9, 9))
    pooled = [g.maxpool("x", 3, 1, 1)]
    for count_pad in (0, 1):
        pooled.append(
            g.node(
                "AveragePool",
                ["x"],
                "x",
                kernel_shape=[3, 3],
                strides=[1, 1],
                pads=[1, 1, 1, 1],
                count_include_pad=count_pad,
            )
        )
    convs = [g.conv(p, 8, bn=False, bias=True) for p in pooled]
    return g.model(g.concat([g.conv("x", 8, bn=False, bias=True), *convs]))


def test_pools_on_the_input_run_nhwc_after_its_one_transpose(tmp_path) -> None:  # noqa: ANN001
    # ConvertLayout has no desired layout for pools: they follow their input, and a pool on
    # the model's (NCHW) input ran NCHW before a transpose of its own (1.3 ms of 3.5 in the
    # inception block). PoolsInLayout + CancelTransposes: one input transpose, NHWC pools.
    model = _pools_on_the_input()
    mod, _ = import_onnx(model)
    kernels = _kernels(lower(mod, HOST))
    transposes = [k for k in kernels if "transpose" in k]
    assert transposes == [kernels[0], kernels[-1]], kernels
    path = tmp_path / "pools.onnx"
    onnx.save(model, str(path))
    package = compile_model(path, "host", tmp_path / "host")
    x = _input(model)
    (got,) = open_package(package.path, local=True).run([x])
    (want,) = onnxruntime_outputs(path, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_pool_between_convolutions_adds_no_kernel() -> None:
    # VGG's conv -> max-pool -> conv: the pool follows the convolution's NHWC, with no copy
    # (an identity permutation ConvertLayout leaves) fused into the first convolution.
    g = GraphBuilder("conv_pool_conv", (1, 8, 12, 12))
    t = g.maxpool(g.act(g.conv("x", 16, 3, bn=False, bias=True), "relu"), 2, 2, 0)
    mod, _ = import_onnx(g.model(g.conv(t, 8, 3, bn=False, bias=True)))
    kernels = _kernels(lower(mod, HOST))
    assert len(kernels) == 5 and kernels[0] == "transpose", kernels
    assert "max_pool2d" in kernels[2] and not [k for k in kernels[1:-1] if "transpose" in k]


@pytest.mark.parametrize("layers", [2, 4])
def test_densenet_concatenations_stay_nhwc(layers: int) -> None:
    # concat(input, features) followed its first input, the NCHW model input, and so did each
    # later concatenation and the BatchNormalization + ReLU after it: two transposes per
    # layer. SinkTransposes: the input's BN-ReLU, the input into the first concatenation and
    # the output, whatever the depth.
    model = densenet(c=16, hw=8, growth=8, layers=layers)
    mod, _ = import_onnx(model)
    kernels = _kernels(lower(mod, HOST))
    transposes = [k for k in kernels if "transpose" in k]
    assert len(transposes) == 3 and transposes[-1] == kernels[-1], kernels
    x = _input(model)
    (want,) = onnxruntime_outputs(model.SerializeToString(), {"x": x})
    np.testing.assert_allclose(_run_host(mod, x), want, rtol=1e-4, atol=1e-5)


def _concat_read_by_convs() -> onnx.ModelProto:
    g = GraphBuilder("concat_convs", (1, 8, 10, 10))
    parts = [g.act(g.conv("x", c, bn=False, bias=True), "relu") for c in (8, 16, 24)]
    joined = g.concat(parts)  # read by two convolutions only: split into partial sums
    a = g.act(g.conv(joined, 4, 3, stride=2, bn=False, bias=True), "relu")
    b = g.conv(joined, 4, 1, stride=2, bn=True)
    return g.model(g.concat([a, b]))  # read by the output: stays


def test_concatenation_read_by_convolutions_becomes_partial_sums() -> None:
    # SplitConcatConvs: conv(concat(a, b, c), W) = conv(a, W_a) + conv(b, W_b) + conv(c, W_c),
    # no NHWC interleaving copy; the model's last concatenation stays (the output reads it).
    model = _concat_read_by_convs()
    mod, _ = import_onnx(model)
    kernels = _kernels(lower(mod, HOST))
    assert [k for k in kernels if "concatenate" in k] == [kernels[-1]], kernels
    assert sum("conv2d" in k for k in kernels) == 3 + 2 * 3, kernels
    x = _input(model)
    (want,) = onnxruntime_outputs(model.SerializeToString(), {"x": x})
    np.testing.assert_allclose(_run_host(mod, x), want, rtol=1e-4, atol=1e-5)
    # In SqueezeNet's fire modules the first module's concatenation feeds the second's squeeze.
    fire = _kernels(lower(import_onnx(block_model("fire", test_size=True))[0], HOST))
    assert [k for k in fire if "concatenate" in k] == [fire[-1]], fire


def test_every_activation_joins_its_convolution_in_nhwc() -> None:
    # LeakyReLU, PRelu, SiLU, Sigmoid after 3x3 convolutions: each activation is in the
    # convolution's kernel, and the only transposes are the model's input and output.
    mod, _ = import_onnx(block_model("activations", test_size=True))
    kernels = _kernels(lower(mod, HOST))
    transposes = [k for k in kernels if "transpose" in k]
    assert transposes == [kernels[0], kernels[-1]], kernels
    assert all("conv2d" in k for k in kernels[1:-1]), kernels
    assert len(kernels) == 2 + 4, kernels


@pytest.mark.parametrize("alpha", [0.1, 1.5])
def test_leaky_relu_as_max_or_min_matches_numpy(alpha: float) -> None:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8, 5, 5), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.leakyrelu(x, alpha))
        bb.emit_func_output(y)
    data = np.random.default_rng(2).standard_normal((2, 8, 5, 5)).astype(np.float32)
    got = _run_host(bb.get(), data)
    np.testing.assert_allclose(got, np.where(data >= 0, data, alpha * data), rtol=1e-6)


class _Broken(ScheduleRule):
    """A rule whose schedule primitive fails: it vectorizes a reduction loop."""

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool):  # noqa: ANN201
        sch = s_tir.Schedule(func)
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            sch.vectorize(sch.get_loops(block)[-1])
        return sch


def test_failing_rule_falls_back_to_a_schedule_that_builds(caplog) -> None:  # noqa: ANN001
    model = _two_convs()
    mod, _ = import_onnx(model)
    with HOST:  # edgecomp's phases 2-3: legalized with its kernels, fused, not scheduled
        legal = relax.transform.LegalizeOps(
            customize_legalize_map={"relax.nn.conv2d": conv_legalizer("mec")}
        )(mod)
        legal = relax.transform.FuseTIR()(
            relax.transform.FuseOps()(relax.transform.AnnotateTIROpPattern()(legal))
        )
        with pytest.raises(Exception):  # noqa: B017 - the rule alone does fail
            dlight.ApplyDefaultSchedule(_Broken())(legal)
        with caplog.at_level(logging.DEBUG, logger="edgecomp.schedule"):
            scheduled = dlight.ApplyDefaultSchedule(Guarded(_Broken(), CpuFallback()))(legal)
    assert "using the fallback schedule" in caplog.text
    x = _input(model)
    vm = relax.VirtualMachine(tvm.compile(scheduled, target=HOST), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    (want,) = onnxruntime_outputs(model.SerializeToString(), {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_batchnorm_in_training_mode_is_refused() -> None:
    """As ONNX's conformance case test_batchnorm_example_training_mode: refused, node named."""
    c = 3
    stats = [numpy_helper.from_array(np.ones(c, np.float32), n) for n in ("s", "b", "m", "v")]
    node = helper.make_node(
        "BatchNormalization",
        ["x", "s", "b", "m", "v"],
        ["y", "running_mean", "running_var"],
        name="bn_train",
        training_mode=1,
    )
    graph = helper.make_graph(
        [node],
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, 4, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c, 4, 4]),
            helper.make_tensor_value_info("running_mean", TensorProto.FLOAT, [c]),
            helper.make_tensor_value_info("running_var", TensorProto.FLOAT, [c]),
        ],
        initializer=stats,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    with pytest.raises(
        EdgecompError, match=r"BatchNormalization at node 'bn_train' is in training"
    ):
        import_onnx(model)
