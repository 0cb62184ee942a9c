"""DecomposeConv (edgecomp.passes.decompose_conv): the chains it emits, their numerics, the CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from helpers import assert_clean_error, edgecomp
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from edgecomp.build import DecomposeOptions, build, compile_model
from edgecomp.frontend import import_onnx
from edgecomp.kernels.chain_spec import ChainSpec
from edgecomp.models import light_model
from edgecomp.passes.decompose_conv import DecomposeConv, decompose_conv
from edgecomp.passes.refuse_chains import RefuseChains
from edgecomp.pipeline import lower
from edgecomp.reference import onnxruntime_outputs
from edgecomp.runner import load_local, open_package, read_inputs
from edgecomp.targets import load_board

HOST = load_board("host")
BIAS = ["add"]  # the bias: the importer reshapes it to [1, K, 1, 1], import folds that


def conv_model(
    c: int = 16,
    k: int = 24,
    kernel: tuple[int, int] = (3, 3),
    strides: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (1, 1, 1, 1),
    dilations: tuple[int, int] = (1, 1),
    bias: bool = True,
    size: int = 12,
    seed: int = 0,
    groups: int = 1,
) -> onnx.ModelProto:
    """One ONNX Conv (pads in ONNX order: top, left, bottom, right) on 1 x c x size x size."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(
            rng.standard_normal((k, c // groups, *kernel)).astype(np.float32), "w"
        )
    ]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "b"))
    node = helper.make_node(
        "Conv",
        ["x", "w"] + (["b"] if bias else []),
        ["y"],
        name="conv",
        strides=list(strides),
        pads=[pads[0], pads[1], pads[2], pads[3]],
        dilations=list(dilations),
        group=groups,
    )
    out = [
        (size + pads[i] + pads[i + 2] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        for i in (0, 1)
    ]
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k, *out])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def main_ops(mod: tvm.IRModule) -> list[tuple[str, dict]]:
    """The Relax ops ``main`` itself calls (a chain is a call of its function, no op)."""
    return [
        (v.op.name.removeprefix("relax."), {})
        for v in relax.analysis.get_var2val(mod["main"]).values()
        if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op)
    ]


def ops(mod: tvm.IRModule) -> list[tuple[str, dict]]:
    """The Relax ops of ``main`` in order, each chain's plain ops in its place (inlined, their
    repeated factors folded), each op with the attributes that define a conv."""
    with HOST.tvm_target():
        mod = relax.transform.FoldConstant()(RefuseChains(mode="none")(mod))
    found = []

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            attrs = {}
            if expr.op.name == "relax.nn.conv2d":
                a = expr.attrs
                attrs = {
                    "weight": tuple(expr.args[1].value.shape),
                    "strides": tuple(int(v) for v in a.strides),
                    "padding": tuple(int(v) for v in a.padding),
                    "dilation": tuple(int(v) for v in a.dilation),
                    "groups": int(a.groups),
                }
            found.append((expr.op.name.removeprefix("relax."), attrs))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def conv(weight, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1) -> dict:  # noqa: ANN001
    """The attributes :func:`ops` reports for one conv2d."""
    return {
        "weight": weight,
        "strides": strides,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
    }


def run_host(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    """Build with edgecomp's pipeline for the host and run once."""
    vm = relax.VirtualMachine(build(mod, HOST), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- structure
def test_cp_chain_is_1x1_vertical_horizontal_1x1():
    model = conv_model(strides=(2, 1), pads=(1, 2, 1, 2), dilations=(1, 2), size=13)
    mod, _ = import_onnx(model)
    new, (record,) = decompose_conv(mod, "cp", "rank=6")
    assert record.rank == 6 and record.skipped is None
    convs = [a for name, a in ops(new) if name == "nn.conv2d"]
    assert [name for name, _ in ops(new)] == ["nn.conv2d"] * 4 + BIAS
    assert convs == [
        conv((6, 16, 1, 1)),
        conv((6, 1, 3, 1), strides=(2, 1), padding=(1, 0, 1, 0), groups=6),
        conv((6, 1, 1, 3), padding=(0, 2, 0, 2), dilation=(1, 2), groups=6),
        conv((24, 6, 1, 1)),
    ]


def test_tucker2_chain_is_1x1_core_1x1():
    mod, _ = import_onnx(conv_model(strides=(2, 2), bias=False))
    new, (record,) = decompose_conv(mod, "tucker", "rank=5")
    assert record.rank == (5, 5)
    assert ops(new) == [
        ("nn.conv2d", conv((5, 16, 1, 1))),
        ("nn.conv2d", conv((5, 5, 3, 3), strides=(2, 2), padding=(1, 1, 1, 1))),
        ("nn.conv2d", conv((24, 5, 1, 1))),
    ]


def test_gkpd_chain_is_two_convs_the_second_dilated_by_b():
    mod, _ = import_onnx(conv_model(k=16, c=16, size=10))
    new, (record,) = decompose_conv(mod, "kronecker", "flops=2x")
    (k1, c1, kh1, kw1), (k2, c2, kh2, kw2) = record.factor_shapes
    r = record.rank
    names = [name for name, _ in ops(new)]
    assert names == [
        "nn.conv2d",
        "reshape",
        "permute_dims",
        "reshape",
        "nn.conv2d",
        "reshape",
        "permute_dims",
        "reshape",
        *BIAS,
    ]
    first, second = (a for name, a in ops(new) if name == "nn.conv2d")
    assert first == conv((c1 * r * k2, c2, kh2, kw2), padding=(1, 1, 1, 1), groups=c1)
    assert second == conv((k2 * k1, r * c1, kh1, kw1), dilation=(kh2, kw2), groups=k2)
    assert (k1 * k2, c1 * c2, kh1 * kh2, kw1 * kw2) == (16, 16, 3, 3)


def test_layers_that_do_not_pay_stay_dense_with_the_reason():
    for model, policy, reason in [
        (conv_model(kernel=(1, 1), pads=(0, 0, 0, 0), groups=2), "flops=2x", "grouped 1x1 conv"),
        (conv_model(c=3), "flops=2x", "tiny channel count (K=24, C=3 < 8)"),
        (conv_model(), "rank=full", "no FLOP saving at rank"),
    ]:
        mod, _ = import_onnx(model)
        new, (record,) = decompose_conv(mod, "cp", policy)
        assert record.skipped.startswith(reason), record.skipped
        assert [n for n, _ in ops(new)] == ["nn.conv2d", *BIAS]


@pytest.mark.parametrize("method", ["cp", "tucker", "kronecker"])
def test_each_chain_is_one_call_of_its_composite_function(method):
    """The unit re-fusion consumes: the factors as constant arguments, the spec as attributes."""
    mod, _ = import_onnx(conv_model(k=16, size=10, strides=(2, 1)))
    new, (record,) = decompose_conv(mod, method, "flops=2x")
    calls = [
        v
        for v in relax.analysis.get_var2val(new["main"]).values()
        if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.GlobalVar)
    ]
    assert len(calls) == 1 and "nn.conv2d" not in [n for n, _ in main_ops(new)]
    func = new[calls[0].op]
    kind = {"cp": "cp", "tucker": "tucker2", "kronecker": "gkpd"}[method]
    assert func.attrs["Composite"] == f"edgecomp.chain.{kind}"
    spec = ChainSpec.from_json(str(func.attrs["edgecomp.chain_spec"]))
    assert (spec.kind, spec.in_shape, spec.out_channels, spec.kernel) == (
        kind,
        (1, 16, 10, 10),
        16,
        (3, 3),
    )
    assert spec.geom.strides == (2, 1) and spec.groups == 1
    factors = [a.value.numpy() for a in calls[0].args[1:]]
    assert sum(f.size for f in factors) == record.params_after  # the factors themselves


def test_decomposition_is_phase_1_of_lower(tmp_path):
    mod, _ = import_onnx(conv_model())
    transform = DecomposeConv("cp", "rank=6")
    lowered = lower(mod, HOST.tvm_target(), decompose=transform, dump_dir=tmp_path)
    (record,) = transform.report
    assert record.rank == 6 and record.skipped is None
    phases = ["1_decompose", "2_graph", "3_legalize", "4_fuse", "5_schedule"]
    assert sorted(p.stem for p in tmp_path.iterdir()) == phases
    assert '"Composite": "edgecomp.chain.cp"' in (tmp_path / "1_decompose.py").read_text()
    assert "edgecomp.chain" not in (tmp_path / "3_legalize.py").read_text()  # fused or inlined
    x = np.random.default_rng(8).standard_normal((1, 16, 12, 12)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(lowered, target=HOST.tvm_target()), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, run_host(decompose_conv(mod, "cp", "rank=6")[0], x), rtol=1e-5)


def test_1x1_conv_becomes_two_thinner_1x1_convs():
    model = conv_model(c=16, k=24, kernel=(1, 1), pads=(0, 0, 0, 0), strides=(2, 2), size=11)
    mod, _ = import_onnx(model)
    new, (record,) = decompose_conv(mod, "cp", "flops=2x")
    assert (record.method, record.rank, record.skipped) == ("svd", 4, None)
    assert record.params_after == 4 * (16 + 24) and record.flops_after == 160 * 36
    assert [a for n, a in ops(new) if n == "nn.conv2d"] == [
        conv((4, 16, 1, 1), strides=(2, 2)),
        conv((24, 4, 1, 1)),
    ]
    x = np.random.default_rng(7).standard_normal((1, 16, 11, 11)).astype(np.float32)
    (want,) = onnxruntime_outputs(model.SerializeToString(), {"x": x})
    full, (record,) = decompose_conv(mod, "tucker", "rank=full", force=True)
    assert record.rank == 16 and rel(run_host(full, x), want) < 1e-4
    assert 0.2 < rel(run_host(new, x), want) < 1  # rank 4 of 16: an approximation


def test_1x1_conv_refit_lowers_its_output_error():
    model = conv_model(c=32, k=48, kernel=(1, 1), pads=(0, 0, 0, 0), strides=(2, 2), size=11)
    mod, _ = import_onnx(model)
    calib = np.random.default_rng(9).standard_normal((6, 32, 11, 11)).astype(np.float32)
    new, (record,) = decompose_conv(mod, "cp", "flops=3x", calib=calib, refit=True)
    before, after = record.refit_error
    assert record.method == "svd" and after < before
    x = calib[:1]
    (want,) = onnxruntime_outputs(model.SerializeToString(), {"x": x})
    plain, _ = decompose_conv(mod, "cp", "flops=3x")
    assert rel(run_host(new, x), want) < rel(run_host(plain, x), want)


@pytest.mark.parametrize("method", ["cp", "tucker", "kronecker"])
def test_refusion_fuses_the_chain_the_pass_emits(method):
    mod, _ = import_onnx(conv_model(k=16, size=10))
    new, _ = decompose_conv(mod, method, "flops=2x")
    fused = RefuseChains(HOST.tvm_target(), mode="all")(new)
    names = [gv.name_hint for gv in fused.get_global_vars()]
    kernel = {
        "cp": "cp_chain_fused",
        "tucker": "tucker2_chain_fused",
        "kronecker": "gkpd_chain_fused",
    }
    assert kernel[method] in names, names
    assert not any(n == "nn.conv2d" for n, _ in ops(fused))


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("method", ["cp", "tucker", "kronecker"])
@pytest.mark.parametrize(
    "geometry",
    [
        {},
        {"strides": (2, 2), "bias": False},
        {"strides": (2, 1), "pads": (0, 1, 2, 1), "dilations": (2, 1)},
        {"kernel": (5, 3), "pads": (2, 1, 2, 1)},
    ],
    ids=["s1-pad1-bias", "s2-nobias", "s2x1-asym-dil", "5x3"],
)
def test_full_rank_chain_reproduces_the_conv(method, geometry):
    model = conv_model(c=8, k=12, size=11, **geometry)
    mod, _ = import_onnx(model)
    new, (record,) = decompose_conv(mod, method, "rank=full", force=True)
    assert record.skipped is None
    x = np.random.default_rng(1).standard_normal((1, 8, 11, 11)).astype(np.float32)
    (want,) = onnxruntime_outputs(model.SerializeToString(), {"x": x})
    assert rel(run_host(new, x), want) < 1e-4


def test_grouped_conv_is_decomposed_group_by_group():
    model = conv_model(c=16, k=24, groups=2, strides=(2, 2), size=11)
    mod, _ = import_onnx(model)
    x = np.random.default_rng(6).standard_normal((1, 16, 11, 11)).astype(np.float32)
    (want,) = onnxruntime_outputs(model.SerializeToString(), {"x": x})
    for method in ("cp", "tucker"):
        new, (record,) = decompose_conv(mod, method, "rank=full", force=True)
        assert [a["groups"] for n, a in ops(new) if n == "nn.conv2d"][0] == 2
        assert rel(run_host(new, x), want) < 1e-4, method
    new, (record,) = decompose_conv(mod, "tucker", "rank=3")
    assert record.rank == (3, 3) and 0 < record.weight_error < 1
    assert [a["weight"] for n, a in ops(new) if n == "nn.conv2d"] == [
        (6, 8, 1, 1),
        (6, 3, 3, 3),
        (24, 3, 1, 1),
    ]
    _, (record,) = decompose_conv(mod, "kronecker", "flops=2x")
    assert record.skipped == "grouped conv (groups=2; GKPD takes groups=1 only)"


# Tucker-2 at full rank on AlexNet took 150 s of the suite; its grouped and geometric cases are
# covered by test_grouped_conv_is_decomposed_group_by_group and test_full_rank_chain_...
@pytest.mark.parametrize("method", ["cp", "kronecker"])
def test_full_rank_alexnet_matches_the_original(method, tmp_path):
    model = light_model("alexnet", seed=0)
    mod, signature = import_onnx(model)
    new, report = decompose_conv(mod, method, "rank=full", force=True)
    # The ONNX AlexNet is Caffe's: conv2, conv4 and conv5 are grouped (groups=2), which CP and
    # Tucker-2 decompose group by group and GKPD leaves; conv1 sees 3 channels.
    grouped = "grouped conv" if method == "kronecker" else None
    assert [r.skipped and r.skipped.split(" (")[0] for r in report] == [
        "tiny channel count",
        grouped,
        None,
        grouped,
        grouped,
    ]
    x = np.random.default_rng(2).standard_normal(signature.inputs[0].shape).astype(np.float32)
    (want,) = onnxruntime_outputs(model.SerializeToString(), {signature.inputs[0].name: x})
    assert rel(run_host(new, x), want) < 1e-4


def test_compile_records_the_decomposition_in_the_manifest(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(), str(path))
    package = compile_model(
        path, "host", tmp_path / "pkg", decompose=DecomposeOptions("tucker", "rank=4")
    )
    options = package.manifest["options"]
    assert options["decompose"] == "tucker" and options["rank_policy"] == "rank=4"
    assert tuple(options["layers"][0]["rank"]) == (4, 4)
    x = np.random.default_rng(3).standard_normal((1, 16, 12, 12)).astype(np.float32)
    (got,) = load_local(package).run([x])
    new, _ = decompose_conv(import_onnx(conv_model())[0], "tucker", "rank=4")
    np.testing.assert_allclose(got, run_host(new, x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- CLI
def test_analyze_prints_the_table_with_output_errors(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(), str(path))
    np.save(
        tmp_path / "calib.npy",
        np.random.default_rng(4).standard_normal((3, 1, 16, 12, 12)).astype(np.float32),
    )
    result = edgecomp(
        "analyze",
        str(path),
        "--decompose",
        "tucker",
        "--rank-policy",
        "flops=2x",
        "--calib",
        str(tmp_path / "calib.npy"),
    )
    assert result.returncode == 0, result.stderr
    header, _, row, total, weights = result.stdout.strip().splitlines()
    assert header.split()[:4] == ["layer", "kernel", "input", "rank"] and "output" in header
    assert row.startswith("conv0  24x16x3x3  16x12x12")
    weight_err, output_err, refit_err = (float(v) for v in row.split()[-3:])
    assert 0 < output_err < 1 and 0 < weight_err < 1 and refit_err <= output_err
    assert total.startswith("tucker: 1 of 1 convolutions decomposed") and "(2.26x)" in total
    assert weights.startswith("model weights: ") and "x smaller" in weights
    assert "[1/1] conv0" in result.stderr  # the per-layer progress line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank-policy", "rank=999"], "--rank-policy rank=999 exceeds the full rank 144"),
        (["--rank-policy", "flops=fast"], "--rank-policy 'flops=fast' does not parse; allowed:"),
        (["--rank-policy", "output=0.1"], "needs calibration inputs"),
        (
            ["--calib", "CALIB"],
            "--calib data of shape (2, 2) (float32) does not fit the model input 1x16x12x12",
        ),
    ],
)
def test_analyze_bad_input_is_one_line(tmp_path, args, message):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(), str(path))
    np.save(tmp_path / "calib.npy", np.zeros((2, 2), np.float32))
    args = [str(tmp_path / "calib.npy") if a == "CALIB" else a for a in args]
    assert_clean_error(edgecomp("analyze", str(path), "--decompose", "cp", *args), message)


def test_unknown_method_is_refused_by_the_cli(tmp_path):
    result = edgecomp("analyze", "model.onnx", "--decompose", "svd")
    assert result.returncode == 2 and "argument --decompose: invalid choice: 'svd'" in result.stderr


# ----------------------------------------------------------------------------- device
@pytest.mark.device
def test_decomposed_model_runs_on_the_emulated_rasp4b(emulated_rasp4b, tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(), str(path))
    options = DecomposeOptions("cp", "flops=2x")
    device = compile_model(path, "rasp4b", tmp_path / "rasp4b", decompose=options)
    host = compile_model(path, "host", tmp_path / "host", decompose=options)
    remote = open_package(device.path, rpc=emulated_rasp4b)
    x = read_inputs(remote.package.inputs, None, seed=5)
    np.testing.assert_allclose(remote.run(x)[0], load_local(host).run(x)[0], rtol=1e-4, atol=1e-4)


def test_refuse_none_keeps_the_chain_as_separate_ops(tmp_path):
    import json

    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(c=32, k=32, size=32), str(path))
    fused = compile_model(
        path, "host", tmp_path / "f", decompose=DecomposeOptions("cp", "flops=2x")
    )
    apart = compile_model(
        path, "host", tmp_path / "u", decompose=DecomposeOptions("cp", "flops=2x", refuse="none")
    )

    def kernels(package) -> list[str]:  # noqa: ANN001
        report = json.loads((package.path / "report.json").read_text())
        return [k["prim_func"] for k in report["variants"]["after"]["kernels"]]

    assert "fused_cp_chain" in kernels(fused)
    assert "fused_cp_chain" not in kernels(apart) and len(kernels(apart)) >= 4
    assert apart.manifest["options"]["refuse"] == "none"
    assert fused.manifest["options"]["refuse"] == "auto"
    assert apart.manifest["options"]["fused_chains"] == {"fused": 0, "chains": 1}
    assert fused.manifest["options"]["fused_chains"] == {"fused": 1, "chains": 1}
    x = np.random.default_rng(7).standard_normal((1, 32, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(
        load_local(apart).run([x])[0], load_local(fused).run([x])[0], rtol=1e-4, atol=1e-4
    )


def test_decomposition_flags_need_decompose(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(), str(path))
    result = edgecomp(
        "compile", str(path), "--target", "host", "-o", str(tmp_path / "p"), "--refuse", "all"
    )
    assert_clean_error(result, "need --decompose {cp,tucker,kronecker}")
    assert not (tmp_path / "p").exists()
