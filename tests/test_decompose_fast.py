"""Issue 12: fast CP against the old ALS, the factor cache, low-rank fully connected layers,
the calibrated refit, weight bytes, progress lines and the errors users can cause."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import tvm
from helpers import assert_clean_error, edgecomp
from onnx import TensorProto, helper, numpy_helper

from edgecomp.analyze import weight_bytes
from edgecomp.build import build
from edgecomp.decompose import conv2d_nchw, cp_decompose, factorize, svd_decompose
from edgecomp.decompose.cache import clear_factor_cache, factor_cache_dir
from edgecomp.decompose.cp import cp_als_reference
from edgecomp.frontend import import_onnx
from edgecomp.passes.decompose_conv import decompose_conv
from edgecomp.reference import onnxruntime_outputs
from edgecomp.targets import load_board

RNG = np.random.default_rng(12)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def kernels() -> list[tuple[str, np.ndarray, int]]:
    """Random (He-normal, as the light models' weights) and structured kernels, with ranks."""
    out = []
    for shape, rank in [((16, 8, 3, 3), 12), ((32, 16, 3, 3), 40), ((24, 12, 5, 5), 30)]:
        w = RNG.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
        out.append((f"random {shape}", w.astype(np.float32), rank))
    # Structured: smooth spatial profiles (what trained kernels look like) plus a little noise.
    grid = np.linspace(-1, 1, 3)
    blobs = np.exp(-((grid[:, None] - RNG.uniform(-1, 1, 20)) ** 2))  # [3, 20]
    factors = [RNG.standard_normal((32, 20)), RNG.standard_normal((16, 20)), blobs, blobs[::-1]]
    w = np.einsum("kr,cr,ir,jr->kcij", *factors)
    w += 0.05 * np.linalg.norm(w) / np.sqrt(w.size) * RNG.standard_normal(w.shape)
    out.append(("smooth rank-20 + noise", w.astype(np.float32), 12))
    return out


@pytest.mark.parametrize("name, weight, rank", kernels(), ids=lambda v: str(v)[:24])
def test_fast_cp_is_never_worse_than_the_old_als(name, weight, rank):
    fast, old = cp_decompose(weight, rank), cp_als_reference(weight, rank)
    assert fast.error <= old.error + 1e-4, (name, fast.error, old.error)
    assert fast.error == pytest.approx(rel(fast.weight(), weight), abs=1e-5)


@pytest.mark.parametrize("shape, rank", [((24, 16, 3, 3), 5), ((64, 32, 3, 3), 24)])
def test_fast_cp_recovers_kernels_of_known_rank(shape, rank):
    factors = [RNG.standard_normal((d, rank)) for d in shape]
    w = np.einsum("kr,cr,ir,jr->kcij", *factors).astype(np.float32)
    f = cp_decompose(w, rank)
    assert f.error < 1e-4 and rel(f.weight(), w) < 1e-4


def test_fast_cp_reports_progress_per_sweep_and_warm_starts():
    w = kernels()[1][1]
    seen: list[tuple[int, float]] = []
    f = cp_decompose(w, 40, progress=lambda it, err: seen.append((it, err)))
    assert seen[0][0] == 2 and f.error == pytest.approx(min(e for _, e in seen), abs=1e-4)
    warm = cp_decompose(w, 44, init=f)
    assert warm.rank == 44 and warm.error <= f.error


# ----------------------------------------------------------------------------- cache
@pytest.fixture
def factor_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGECOMP_NO_FACTOR_CACHE")
    monkeypatch.setenv("EDGECOMP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "factors"


def test_cache_returns_the_same_factors_without_factorizing_again(factor_cache, monkeypatch):
    w = kernels()[0][1]
    first = factorize("cp", w, 10)
    assert factor_cache_dir() == factor_cache and len(list(factor_cache.glob("*.npz"))) == 1

    def boom(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("factorized again")

    monkeypatch.setattr("edgecomp.decompose.rank.cp_decompose", boom)
    again = factorize("cp", w, 10)
    for a, b in zip(
        (first.u, first.s, first.v, first.h), (again.u, again.s, again.v, again.h), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert again.error == first.error
    assert clear_factor_cache()[0] == 1 and not list(factor_cache.glob("*.npz"))


def test_cache_never_matches_a_changed_weight(factor_cache):
    w = kernels()[0][1]
    first = factorize("cp", w, 10)
    changed = w.copy()
    changed[0, 0, 0, 0] += 1e-3
    other = factorize("cp", changed, 10)
    assert len(list(factor_cache.glob("*.npz"))) == 2
    assert not np.array_equal(first.u, other.u)
    # An entry copied under another weight's name is refused: its stored digest differs.
    (a, b) = sorted(factor_cache.glob("*.npz"), key=lambda p: p.stat().st_mtime)
    b.write_bytes(a.read_bytes())
    again = factorize("cp", changed, 10)
    assert rel(again.weight(), changed) == pytest.approx(other.error, abs=1e-5)


def test_corrupt_cache_entry_is_recomputed_with_a_warning(factor_cache, capsys):
    w = kernels()[0][1]
    first = factorize("svd", w.reshape(16, -1), 6)
    (entry,) = factor_cache.glob("*.npz")
    entry.write_bytes(b"not a zip file")
    again = factorize("svd", w.reshape(16, -1), 6)
    np.testing.assert_allclose(again.a @ again.b, first.a @ first.b, rtol=1e-5, atol=1e-6)
    assert "is corrupt" in capsys.readouterr().err
    assert entry.stat().st_size > 100  # rewritten


def test_cache_clear_command(factor_cache):
    factorize("cp", kernels()[0][1], 8)
    result = edgecomp("cache", "clear")
    assert result.returncode == 0 and "removed 1 cached factorizations" in result.stdout


# ----------------------------------------------------------------------------- fc layers
def fc_model(n_in: int = 96, hidden: int = 64, n_out: int = 40, seed: int = 0) -> onnx.ModelProto:
    """Gemm (transB) -> Relu -> MatMul + Add on 1 x n_in: both kinds of fully connected layer."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((hidden, n_in)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((hidden, n_out)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["m"]),
        helper.make_node("Add", ["m", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_svd_of_fc_layers_is_exact_at_full_rank_through_the_pipeline():
    model = fc_model()
    mod, _ = import_onnx(model)
    new, report = decompose_conv(mod, "cp", "rank=full", fc=True, force=True)
    assert [(r.kind, r.rank, r.weight_shape) for r in report] == [
        ("fc", 64, (96, 64)),
        ("fc", 40, (64, 40)),
    ]
    x = np.random.default_rng(1).standard_normal((1, 96)).astype(np.float32)
    (want,) = onnxruntime_outputs(model.SerializeToString(), {"x": x})
    vm = tvm.relax.VirtualMachine(build(new, load_board("host")), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert rel(got, want) < 1e-5


def test_fc_policy_counts_params_and_flops_and_shrinks_the_weights():
    mod, _ = import_onnx(fc_model(n_in=256, hidden=128, n_out=64))
    new, report = decompose_conv(mod, "tucker", "flops=2x", fc=True)
    first = report[0]
    assert first.kind == "fc" and first.params_before == 256 * 128
    assert first.params_after == first.rank * (256 + 128) and first.params_after * 2 <= 256 * 128
    assert first.flops_after == first.params_after  # one row
    assert weight_bytes(new) < weight_bytes(mod)
    assert decompose_conv(mod, "tucker", "flops=2x")[1] == []  # fc off: not even looked at


def test_svd_factors_match_numpy():
    w = RNG.standard_normal((300, 20000 // 100)).astype(np.float32)
    f = svd_decompose(w, 7)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert f.error == pytest.approx(np.sqrt(np.sum(s[7:] ** 2) / np.sum(s**2)), rel=1e-5)


# ----------------------------------------------------------------------------- refit
def two_conv_model(seed: int = 0) -> onnx.ModelProto:
    """Conv 16->24 (3x3) -> Relu -> Conv 24->24 (3x3) on 1 x 16 x 10 x 10, both with bias."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((24, 16, 3, 3)) * 0.1).astype("f4"), "w1"),
        numpy_helper.from_array(rng.standard_normal(24).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array((rng.standard_normal((24, 24, 3, 3)) * 0.1).astype("f4"), "w2"),
        numpy_helper.from_array(rng.standard_normal(24).astype(np.float32) * 0.1, "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "two_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 24, 10, 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("method", ["cp", "tucker", "kronecker"])
def test_refit_lowers_every_layer_output_error_and_never_raises_it(method):
    model = two_conv_model()
    mod, _ = import_onnx(model)
    calib = np.random.default_rng(5).standard_normal((6, 16, 10, 10)).astype(np.float32)
    new, report = decompose_conv(mod, method, "flops=3x", calib=calib, refit=True)
    assert all(r.refit_error is not None for r in report)
    for r in report:
        before, after = r.refit_error
        assert after <= before + 1e-9, r
    assert sum(r.refit_error[1] < 0.9 * r.refit_error[0] for r in report) >= 1
    # The network output on held-out inputs is closer to the dense one after the refit.
    plain, _ = decompose_conv(mod, method, "flops=3x")
    x = np.random.default_rng(6).standard_normal((1, 16, 10, 10)).astype(np.float32)
    (want,) = onnxruntime_outputs(model.SerializeToString(), {"x": x})

    def run(m):  # noqa: ANN001, ANN202
        vm = tvm.relax.VirtualMachine(build(m, load_board("host")), tvm.cpu())
        return vm["main"](tvm.runtime.tensor(x)).numpy()

    assert rel(run(new), want) < rel(run(plain), want)


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_gkpd_refit_recovers_a_shared_factor_and_per_channel_bias(strides):
    """A target made by the same B and another A (plus a bias) is matched exactly: the K2
    output groups' rows stacked in one problem, each output channel with its own bias."""
    from edgecomp.decompose import ConvGeom
    from edgecomp.decompose.kronecker import KroneckerFactors
    from edgecomp.passes.decompose_conv import _Plan
    from edgecomp.passes.refit import _refit_gkpd

    (k1, c1, kh1, kw1), (k2, c2, kh2, kw2), r = (4, 2, 3, 1), (3, 4, 1, 3), 2
    b = RNG.standard_normal((r, k2, c2, kh2, kw2)).astype(np.float32)
    a_true = RNG.standard_normal((r, k1, c1, kh1, kw1)).astype(np.float32)
    a_start = a_true + RNG.standard_normal(a_true.shape).astype(np.float32)
    true = KroneckerFactors(a_true, b, 0.0)
    geom = ConvGeom((8, 9, 9), (12, 8, 3, 3), strides, (1, 1, 1, 1), (1, 1))
    x = RNG.standard_normal((5, 8, 9, 9)).astype(np.float32)
    bias = RNG.standard_normal(12)
    target = conv2d_nchw(x, true.weight(), strides, (1, 1, 1, 1)) + bias[None, :, None, None]
    plan = _Plan("conv", "kronecker", geom, [KroneckerFactors(a_start, b, 0.0)])
    new, (before, after) = _refit_gkpd(plan, x, target, has_bias=True, chunk=2)
    assert before > 0.1 and after < 1e-5
    np.testing.assert_allclose(new.factors[0].a, a_true, atol=1e-4)
    np.testing.assert_allclose(new.bias_delta, bias, atol=1e-4)


# ----------------------------------------------------------------------------- CLI
def test_compile_prints_progress_per_layer_and_records_weight_bytes(tmp_path):
    path = tmp_path / "fc.onnx"
    onnx.save(fc_model(n_in=256, hidden=128, n_out=64), str(path))
    out = tmp_path / "pkg"
    result = edgecomp(
        "compile", str(path), "--target", "host", "-o", str(out), "--decompose", "cp",
        "--rank-policy", "params=2x",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "[1/2] fc0" in result.stderr and "[2/2] fc1" in result.stderr
    assert "weights: " in result.stderr and "x smaller" in result.stderr
    weights = json.loads((out / "manifest.json").read_text())["options"]["weight_bytes"]
    assert weights["after"] * 1.9 < weights["before"]
    dense = edgecomp(
        "compile", str(path), "--target", "host", "-o", str(tmp_path / "d"), "--decompose", "cp",
        "--rank-policy", "params=2x", "--no-decompose-fc",
    )  # fmt: skip
    assert_clean_error(dense, "has no convolution with a constant weight to decompose")


def test_policy_no_layer_meets_says_which_layers_stay_dense_and_why(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(two_conv_model(), str(path))
    result = edgecomp(
        "compile", str(path), "--target", "host", "-o", str(tmp_path / "p"), "--decompose",
        "tucker", "--rank-policy", "error=0.001",
    )  # fmt: skip
    assert_clean_error(result, "--rank-policy error=0.001: no layer can meet it, all stay dense")
    assert "conv0: no rank meets error=0.001" in result.stderr
    assert not (tmp_path / "p").exists()


def test_calib_of_the_wrong_shape_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(two_conv_model(), str(path))
    np.save(tmp_path / "calib.npy", np.zeros((4, 3, 10, 10), np.float32))
    result = edgecomp(
        "compile", str(path), "--target", "host", "-o", str(tmp_path / "p"), "--decompose",
        "cp", "--calib", str(tmp_path / "calib.npy"),
    )  # fmt: skip
    assert_clean_error(result, "--calib data of shape (4, 3, 10, 10) (float32) does not fit")
