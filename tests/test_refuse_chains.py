"""RefuseChains and the fused chain kernels (edgecomp.passes.refuse_chains, kernels.fused_chain).

Numeric tests compare, on the host, the fused chain with the same chain compiled op by op by
stock TVM, with a numpy reference of the chain, and with the dense convolution the factors
stand for. Structural tests check what the pass rewrites and what it leaves alone; the TIR test
checks that the scheduled kernel allocates its intermediates at tile size; the last tests build
for aarch64 / armv7 and check GPU targets are left unfused.

Chains are built here as ``DecomposeConv`` emits them: a call of the chain's composite function
(:func:`edgecomp.passes.factor_chains.chain_call`), with numpy references of their own.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.s_tir import dlight

from edgecomp.errors import EdgecompError
from edgecomp.kernels import chain_memory as cm
from edgecomp.kernels import chain_spec as cs
from edgecomp.kernels import fused_chain as fc
from edgecomp.passes.factor_chains import chain_call
from edgecomp.passes.refuse_chains import REFUSE_MODES, RefuseChains, fusing_pays
from edgecomp.pipeline import lower
from edgecomp.targets import elf_arch, load_board

HOST = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})


# ----------------------------------------------------------------------------- references
def np_conv2d(
    x: np.ndarray,
    w: np.ndarray,
    strides: tuple[int, int] = (1, 1),
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> np.ndarray:
    """NCHW / OIHW grouped convolution in float64 numpy: the independent reference."""
    n, _, h, wd = x.shape
    k, cg, kh, kw = w.shape
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = strides, padding, dilation
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, k, ho, wo))
    kg = k // groups
    for g in range(groups):
        xs, ws = xp[:, g * cg : (g + 1) * cg], w[g * kg : (g + 1) * kg].astype(np.float64)
        for i in range(kh):
            for j in range(kw):
                patch = xs[
                    :,
                    :,
                    i * dh : i * dh + sh * (ho - 1) + 1 : sh,
                    j * dw : j * dw + sw * (wo - 1) + 1 : sw,
                ]
                out[:, g * kg : (g + 1) * kg] += np.einsum("nchw,kc->nkhw", patch, ws[:, :, i, j])
    return out


class Chain:
    """One hand-built factor chain: its Relax module and three ways to compute it in numpy."""

    def __init__(
        self,
        mod: tvm.IRModule,
        chain_ref: Callable[[np.ndarray], np.ndarray],
        dense: np.ndarray,
        geom: cs.ConvGeometry,
        bias: np.ndarray,
    ) -> None:
        self.mod, self.chain_ref, self.dense, self.geom, self.bias = (
            mod,
            chain_ref,
            dense,
            geom,
            bias,
        )

    def dense_ref(self, x: np.ndarray) -> np.ndarray:
        g = self.geom
        return np_conv2d(x, self.dense, g.strides, g.padding, g.dilation) + self.bias


def _module(
    x_shape: tuple[int, ...], body: Callable[[relax.BlockBuilder, relax.Var], relax.Expr]
) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def _conv(bb: relax.BlockBuilder, x: relax.Expr, w: np.ndarray, **kw: object) -> relax.Var:
    return bb.emit(relax.op.nn.conv2d(x, relax.const(w), **kw))


def _chain(
    bb: relax.BlockBuilder, spec: cs.ChainSpec, x: relax.Expr, factors: list[np.ndarray]
) -> relax.Var:
    """The chain as DecomposeConv emits it: a call of its composite function."""
    return bb.emit(chain_call(bb, spec, x, [relax.const(f) for f in factors]))


def cp_chain_module(
    rng: np.random.Generator,
    c: int,
    hw: tuple[int, int],
    r: int,
    k: int,
    kh: int,
    kw: int,
    geom: cs.ConvGeometry,
    batch: int = 1,
) -> Chain:
    """CP rank r in the DecomposeConv contract (1x1, kh x 1 dw, 1 x kw dw, 1x1) + bias."""
    w1, wv = rng.standard_normal((r, c, 1, 1)), rng.standard_normal((r, 1, kh, 1))
    wh, w4 = rng.standard_normal((r, 1, 1, kw)), rng.standard_normal((k, r, 1, 1))
    w1, wv, wh, w4 = (a.astype("float32") for a in (w1, wv, wh, w4))
    bias = rng.standard_normal((1, k, 1, 1)).astype("float32")
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = geom.strides, geom.padding, geom.dilation
    vert = dict(strides=(sh, 1), padding=(pt, 0, pb, 0), dilation=(dh, 1), groups=r)
    horiz = dict(strides=(1, sw), padding=(0, pl, 0, pr), dilation=(1, dw), groups=r)

    spec = cs.ChainSpec("cp", (batch, c, *hw), k, (kh, kw), (r,), geom, False)

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        return relax.op.add(_chain(bb, spec, x, [w1, wv, wh, w4]), relax.const(bias))

    def chain_ref(x: np.ndarray) -> np.ndarray:
        t = np_conv2d(np_conv2d(np_conv2d(x, w1), wv, **vert), wh, **horiz)  # type: ignore[arg-type]
        return np_conv2d(t, w4) + bias

    dense = np.einsum(
        "rc,ri,rj,kr->kcij", w1[:, :, 0, 0], wv[:, 0, :, 0], wh[:, 0, 0, :], w4[:, :, 0, 0]
    )
    return Chain(_module((batch, c, *hw), body), chain_ref, dense, geom, bias)


def tucker2_chain_module(
    rng: np.random.Generator,
    c: int,
    hw: tuple[int, int],
    r3: int,
    r4: int,
    k: int,
    kh: int,
    kw: int,
    geom: cs.ConvGeometry,
) -> Chain:
    """Tucker-2 (1x1 C->R3, kh x kw R3->R4 with the conv's stride/padding/dilation, 1x1) + bias."""
    w1 = rng.standard_normal((r3, c, 1, 1)).astype("float32")
    core = rng.standard_normal((r4, r3, kh, kw)).astype("float32")
    w3 = rng.standard_normal((k, r4, 1, 1)).astype("float32")
    bias = rng.standard_normal((1, k, 1, 1)).astype("float32")
    attrs = dict(strides=geom.strides, padding=geom.padding, dilation=geom.dilation)

    spec = cs.ChainSpec("tucker2", (1, c, *hw), k, (kh, kw), (r3, r4), geom, False)

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        return relax.op.add(_chain(bb, spec, x, [w1, core, w3]), relax.const(bias))

    def chain_ref(x: np.ndarray) -> np.ndarray:
        return np_conv2d(np_conv2d(np_conv2d(x, w1), core, **attrs), w3) + bias  # type: ignore[arg-type]

    dense = np.einsum("kq,qpij,pc->kcij", w3[:, :, 0, 0], core, w1[:, :, 0, 0])
    return Chain(_module((1, c, *hw), body), chain_ref, dense, geom, bias)


def gkpd_chain_module(
    rng: np.random.Generator,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    hw: tuple[int, int],
    geom: cs.ConvGeometry,
) -> Chain:
    """GKPD ``sum_r A_r (x) B_r`` as plain ops: B conv (grouped over C1) -> regroup -> A conv
    (grouped over K2, dilation = B's spatial size x the conv's) -> reorder channels; + bias."""
    a = rng.standard_normal(a_shape).astype("float32")  # [R, K1, C1, kh1, kw1]
    b = rng.standard_normal(b_shape).astype("float32")  # [R, K2, C2, kh2, kw2]
    rank, k1, c1, kh1, kw1 = a_shape
    _, k2, c2, kh2, kw2 = b_shape
    (dh, dw) = geom.dilation
    # B repeated for each input channel group c1 -> out channels (c1, r, k2).
    wb = np.broadcast_to(b.reshape(1, rank * k2, c2, kh2, kw2), (c1, rank * k2, c2, kh2, kw2))
    wb = np.ascontiguousarray(wb.reshape(c1 * rank * k2, c2, kh2, kw2))
    # A repeated for each k2 group: in channels (r, c1), out channels (k2, k1).
    wa = np.broadcast_to(a.transpose(1, 0, 2, 3, 4)[None], (k2, k1, rank, c1, kh1, kw1))
    wa = np.ascontiguousarray(wa.reshape(k2 * k1, rank * c1, kh1, kw1))
    bias = rng.standard_normal((1, k1 * k2, 1, 1)).astype("float32")
    h, w = hw
    hz = h + geom.padding[0] + geom.padding[2] - dh * (kh2 - 1)
    wz = w + geom.padding[1] + geom.padding[3] - dw * (kw2 - 1)
    a_attrs = dict(strides=geom.strides, dilation=(kh2 * dh, kw2 * dw), groups=k2)
    b_attrs = dict(padding=geom.padding, dilation=geom.dilation, groups=c1)

    ranks = (rank, k1, c1, kh1, kw1, k2, c2, kh2, kw2)
    spec = cs.ChainSpec(
        "gkpd", (1, c1 * c2, *hw), k1 * k2, (kh1 * kh2, kw1 * kw2), ranks, geom, False
    )

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        return relax.op.add(_chain(bb, spec, x, [a, b]), relax.const(bias))

    def chain_ref(x: np.ndarray) -> np.ndarray:
        z = np_conv2d(x, wb, **b_attrs)  # type: ignore[arg-type]
        z = z.reshape(1, c1, rank, k2, hz, wz).transpose(0, 3, 2, 1, 4, 5).reshape(1, -1, hz, wz)
        y = np_conv2d(z, wa, **a_attrs)  # type: ignore[arg-type]
        ho, wo = y.shape[2:]
        return y.reshape(1, k2, k1, ho, wo).transpose(0, 2, 1, 3, 4).reshape(1, -1, ho, wo) + bias

    dense = sum(np.kron(a[r], b[r]) for r in range(rank))
    return Chain(_module((1, c1 * c2, *hw), body), chain_ref, dense, geom, bias)


# ----------------------------------------------------------------------------- helpers
def refuse(mod: tvm.IRModule, target: tvm.target.Target = HOST) -> tvm.IRModule:
    """RefuseChains, the fused chains' legalization, then FusedChainRule, as a pipeline would
    run them. Mode ``all``: these chains are small enough for the speed rule (``fusing_pays``)
    to keep them unfused; the tests here are about the fused kernel, so they force it.
    """
    mod = fuse(mod, target)
    with target:
        return dlight.ApplyDefaultSchedule(fc.FusedChainRule())(mod)


def fuse(mod: tvm.IRModule, target: tvm.target.Target = HOST, mode: str = "all") -> tvm.IRModule:
    """RefuseChains, then the fused chains legalized into their kernels (phases 2 and 3)."""
    return fc.LegalizeFusedChains(target)(RefuseChains(target, mode=mode)(mod))


def run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target=HOST), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def ops_of(mod: tvm.IRModule) -> list[str]:
    """Names of the ops called in ``main``, in order (``call_tir`` for fused kernels)."""
    names: list[str] = []

    def visit(e: relax.Expr) -> None:
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            names.append(e.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


def fused_prims(mod: tvm.IRModule) -> list[tvm.tirx.PrimFunc]:
    return [
        f
        for _, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and cs.ATTR_KIND in f.attrs
    ]


GEOMS = {
    "s1p1": cs.ConvGeometry((1, 1), (1, 1, 1, 1), (1, 1)),
    "s2p1": cs.ConvGeometry((2, 2), (1, 1, 1, 1), (1, 1)),
}

CASES: dict[str, Callable[[np.random.Generator, cs.ConvGeometry], Chain]] = {
    "cp": lambda rng, g: cp_chain_module(rng, 6, (12, 11), 5, 7, 3, 3, g),
    "tucker2": lambda rng, g: tucker2_chain_module(rng, 6, (12, 11), 4, 5, 7, 3, 3, g),
    # A 3x1 / B 1x3 spatial split, C = 2*3, K = 2*4: every factor dimension is non-trivial.
    "gkpd": lambda rng, g: gkpd_chain_module(rng, (2, 2, 2, 3, 1), (2, 4, 3, 1, 3), (12, 11), g),
}


# ----------------------------------------------------------------------------- numerics
# Tile choices to force: (rows, rank block), rows None = the whole map (no row tiling).
TILINGS = {"auto": None, "rows2_rb2": (2, 2), "whole_rb3": (None, 3)}


@pytest.mark.parametrize("tiling", list(TILINGS))
@pytest.mark.parametrize("geom", list(GEOMS), ids=list(GEOMS))
@pytest.mark.parametrize("kind", list(CASES))
def test_fused_equals_unfused_and_dense(
    kind: str, geom: str, tiling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    forced = TILINGS[tiling]
    if forced is not None:
        rows, rb = forced
        monkeypatch.setattr(
            fc,
            "choose_tiles",
            lambda spec, threads, lanes, budget: (rows or spec.out_hw[0], rb),
        )
    rng = np.random.default_rng(0)
    chain = CASES[kind](rng, GEOMS[geom])
    x_shape = tuple(int(d) for d in chain.mod["main"].params[0].ty.shape.values)
    x = rng.standard_normal(x_shape).astype("float32")
    fused_mod = refuse(chain.mod)
    assert ops_of(fused_mod).count("relax.call_tir") == 1
    assert "relax.nn.conv2d" not in ops_of(fused_mod)
    want = chain.chain_ref(x)
    scale = np.abs(want).max()
    np.testing.assert_allclose(
        chain.dense_ref(x), want, rtol=1e-5, atol=1e-5 * scale
    )  # test's maths
    fused = run(fused_mod, x)
    unfused = run(chain.mod, x)  # stock TVM, op by op
    assert fused.shape == want.shape and fused.dtype == np.float32
    np.testing.assert_allclose(unfused, want, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(fused, want, rtol=1e-4, atol=1e-4 * scale)


def test_cp_asymmetric_padding_stride_dilation_batch2() -> None:
    """Each depthwise keeps its own axis' stride, padding and dilation; batches tile too."""
    rng = np.random.default_rng(1)
    geom = cs.ConvGeometry((2, 1), (2, 0, 1, 1), (2, 1))
    chain = cp_chain_module(rng, 5, (13, 12), 6, 4, 5, 3, geom, batch=2)
    x = rng.standard_normal((2, 5, 13, 12)).astype("float32")
    want = chain.chain_ref(x)
    got = run(refuse(chain.mod), x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ----------------------------------------------------------------------------- structure
CP_SHAPES = [(3, 4, 1, 1), (3, 1, 3, 1), (3, 1, 1, 3), (4, 3, 1, 1)]  # rank 3, 4 -> 4 channels
CP_SPEC = cs.ChainSpec("cp", (1, 4, 8, 8), 4, (3, 3), (3,), GEOMS["s1p1"], False)


def test_one_call_tir_replaces_the_chain_and_other_convs_stay() -> None:
    rng = np.random.default_rng(2)
    dense_w = rng.standard_normal((4, 4, 3, 3)).astype("float32")
    ws = [rng.standard_normal(s).astype("float32") for s in CP_SHAPES]
    bias = rng.standard_normal((1, 4, 1, 1)).astype("float32")

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        y = bb.emit(relax.op.nn.relu(_conv(bb, x, dense_w, padding=(1, 1, 1, 1))))
        t = bb.emit(relax.op.add(_chain(bb, CP_SPEC, y, ws), relax.const(bias)))
        return relax.op.nn.relu(t)

    mod = _module((1, 4, 8, 8), body)
    after_mod = fuse(mod)
    # The kernel writes [N, K, Ho*Wo], bias and ReLU included; the reshape to NCHW is a view
    # once built.
    assert ops_of(after_mod) == [
        "relax.nn.conv2d",
        "relax.nn.relu",
        "relax.call_tir",
        "relax.reshape",
    ]
    # The dense conv is the very same call, weight and attributes included.
    first_conv = after_mod["main"].body.blocks[0].bindings[0].value
    orig_conv = mod["main"].body.blocks[0].bindings[0].value
    tvm.ir.assert_structural_equal(first_conv, orig_conv, map_free_vars=True)
    assert len(fused_prims(after_mod)) == 1
    # No composite function is left: the fused one became the kernel, the chain's went unused.
    assert [
        gv.name_hint for gv, f in after_mod.functions_items() if isinstance(f, relax.Function)
    ] == ["main"]


def test_bias_behind_a_reshape_is_folded_in() -> None:
    """ONNX import leaves ``add(conv, reshape(bias[K]))`` until constants are folded."""
    rng = np.random.default_rng(8)
    ws = [rng.standard_normal(s).astype("float32") for s in CP_SHAPES]
    bias = rng.standard_normal(4).astype("float32")

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        b = bb.emit(relax.op.reshape(relax.const(bias), (1, 4, 1, 1)))
        return relax.op.add(_chain(bb, CP_SPEC, x, ws), b)

    mod = _module((1, 4, 8, 8), body)
    fused = refuse(mod)
    assert ops_of(fused) == ["relax.call_tir", "relax.reshape"]
    x = rng.standard_normal((1, 4, 8, 8)).astype("float32")
    want = run(mod, x)
    np.testing.assert_allclose(run(fused, x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_plain_convs_are_never_taken_for_a_chain() -> None:
    """Only the composite functions DecomposeConv emits are chains: the same four convs written
    as plain ops (a model that has them itself) are not matched."""
    rng = np.random.default_rng(3)
    ws = [rng.standard_normal(s).astype("float32") for s in CP_SHAPES]

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        t = _conv(bb, x, ws[0])
        t = _conv(bb, t, ws[1], padding=(1, 0, 1, 0), groups=3)
        return _conv(bb, _conv(bb, t, ws[2], padding=(0, 1, 0, 1), groups=3), ws[3])

    mod = _module((1, 4, 8, 8), body)
    tvm.ir.assert_structural_equal(RefuseChains(HOST, mode="all")(mod), mod)


def fused_calls(mod: tvm.IRModule) -> list[str]:
    """The fused chains' composite functions ``main`` calls (after RefuseChains)."""
    return [
        str(mod[v.op].attrs["Composite"])
        for v in relax.analysis.get_var2val(mod["main"]).values()
        if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.GlobalVar)
    ]


def test_chains_not_fused_are_inlined_and_gpu_targets_fuse_none() -> None:
    rng = np.random.default_rng(4)
    chain = cp_chain_module(rng, 4, (8, 8), 3, 4, 3, 3, GEOMS["s1p1"])
    mali = load_board("rk3399-mali").tvm_target()
    for mod in (
        RefuseChains(mali, mode="all")(chain.mod),
        RefuseChains(HOST, mode="none")(chain.mod),
    ):
        assert fused_calls(mod) == []
        assert ops_of(mod) == ["relax.nn.conv2d"] * 4 + ["relax.add"]
        assert [gv.name_hint for gv in mod.get_global_vars()] == ["main"]
        x = rng.standard_normal((1, 4, 8, 8)).astype("float32")
        want = chain.chain_ref(x)
        np.testing.assert_allclose(run(mod, x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert fused_calls(RefuseChains(HOST, mode="all")(chain.mod)) == ["edgecomp.fused_chain.cp"]


def test_rule_only_takes_fused_chains_on_cpus() -> None:
    chain = cp_chain_module(np.random.default_rng(5), 4, (8, 8), 3, 4, 3, 3, GEOMS["s1p1"])
    (prim,) = fused_prims(fuse(chain.mod))
    rule = fc.FusedChainRule()
    assert rule.apply(prim, HOST, False) is not None
    assert rule.apply(prim.without_attr(cs.ATTR_KIND), HOST, False) is None
    assert rule.apply(prim, load_board("rk3399-mali").tvm_target(), False) is None


def test_speed_rule_keeps_small_narrow_chains_unfused() -> None:
    # 8 x 8 = 64 pixels fill AVX-512's 16 lanes, so the rule is exercised with AVX2-sized and
    # wider maps through fusing_pays directly, and end to end on a chain whose 6 x 6 map (36
    # pixels: 4-lane vectors) cannot fill a vector and whose intermediates are tiny.
    chain = cp_chain_module(np.random.default_rng(8), 4, (6, 6), 3, 4, 3, 3, GEOMS["s1p1"])
    assert fused_calls(RefuseChains(HOST)(chain.mod)) == []
    assert len(fused_prims(fuse(chain.mod))) == 1

    def vgg(c: int, hw: int, k: int) -> cs.ChainSpec:
        rank = round(k * c * 9 / 3 / (c + 6 + k))  # the benchmark's 3x FLOP reduction
        return cs.ChainSpec("cp", (1, c, hw, hw), k, (3, 3), (rank,), GEOMS["s1p1"], True)

    # VGG-19 conv5 (14 x 14: 196 pixels = 4-lane vectors; largest intermediate 0.6 MB): kept
    # unfused on AVX-512 (16 lanes) and AVX2 (8), fused on NEON (4 lanes fill).
    assert not fusing_pays(vgg(512, 14, 512), 16)
    assert not fusing_pays(vgg(512, 14, 512), 8)
    assert fusing_pays(vgg(512, 14, 512), 4)
    # 28 x 28 and wider fill 16 lanes: fused. So is a narrow map whose intermediates are large.
    assert fusing_pays(vgg(512, 28, 512), 16)
    assert fusing_pays(vgg(64, 224, 64), 16)
    assert fusing_pays(vgg(4096, 14, 4096), 16)


# ----------------------------------------------------------------------------- memory
def test_intermediates_are_allocated_at_tile_size() -> None:
    rng = np.random.default_rng(6)
    chain = cp_chain_module(rng, 16, (28, 28), 24, 16, 3, 3, GEOMS["s1p1"])
    (prim,) = fused_prims(refuse(chain.mod))
    rows, rb = int(prim.attrs[cs.ATTR_TILE_ROWS]), int(prim.attrs[cs.ATTR_RANK_BLOCK])
    assert rows < 28 and rb < 24  # this layer is big enough to be tiled both ways
    allocs = fc.allocated_buffers(prim)
    rows_in = rows + 2  # 3x1 kernel, stride 1: one halo row above and below
    # One tile of each: the input window's projection for one rank block (its rows_in x 28
    # pixels flat), the depthwise result for all 24 ranks.
    assert allocs == {
        cs.PROJ_IN: (1, 1, rb, rows_in * 28),
        cs.MID[0]: (1, 1, 24, rows, 28),
    }
    spec = cs.ChainSpec("cp", (1, 16, 28, 28), 16, (3, 3), (24,), GEOMS["s1p1"], True)
    assert {k: 4 * int(np.prod(v)) for k, v in allocs.items()} == cm.fused_buffers(spec, rows, rb)
    full = 24 * 28 * 28
    assert all(np.prod(shape) < full / 2 for shape in allocs.values())


def test_memory_accounting_by_hand() -> None:
    spec = cs.ChainSpec("cp", (1, 8, 10, 10), 6, (3, 3), (4,), GEOMS["s1p1"], True)
    # Unfused: R*H*W + R*Ho*W + R*Ho*Wo + K*Ho*Wo (before the bias add) = 400+400+400+600 floats.
    assert sum(cm.unfused_intermediates(spec).values()) == 4 * 1800
    # Fused, 2 rows, rank block 2: t1 rb*rows_in*W = 2*4*10 + dw R*rows*Wo = 4*2*10 = 160
    # floats per tile.
    assert sum(cm.fused_buffers(spec, 2, 2).values()) == 4 * 160
    mem = cm.chain_memory(spec, threads=2, rows=2, rank_block=2)
    assert (mem.unfused_bytes, mem.fused_bytes, mem.concurrent_tiles) == (7200, 1280, 2)
    assert mem.reduction == pytest.approx(1 - 1280 / 7200)
    tucker = cs.ChainSpec("tucker2", (1, 8, 10, 10), 6, (3, 3), (3, 5), GEOMS["s2p1"], False)
    # Ho = Wo = 5: R3*H*W + R4*Ho*Wo = 300 + 125; tile: R3*rows_in*W + R4*rows*Wo, rows_in = 3.
    assert sum(cm.unfused_intermediates(tucker).values()) == 4 * 425
    assert cm.fused_buffers(tucker, 1, 5) == {cs.PROJ_IN: 4 * 90, cs.MID[1]: 4 * 25}


# ----------------------------------------------------------------------------- other targets
@pytest.mark.parametrize("board", ["rasp4b", "rasp3b"])
def test_cross_compiles_for_arm(board: str, tmp_path) -> None:  # noqa: ANN001 - pytest fixture
    brd = load_board(board)
    cc = brd.cross_compiler["cc"] if brd.cross_compiler else ""
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} not installed")
    target = brd.tvm_target()
    chain = cp_chain_module(np.random.default_rng(7), 4, (8, 8), 4, 4, 3, 3, GEOMS["s2p1"])
    mod = refuse(chain.mod, target)
    assert len(fused_prims(mod)) == 1
    ex = tvm.compile(mod, target=target)
    path = tmp_path / "chain.so"
    ex.export_library(str(path), fcompile=brd.fcompile())
    assert elf_arch(path) == brd.arch


def test_peak_rule_fuses_only_chains_that_hold_the_most_memory() -> None:
    """A chain whose ops hold less at once than another op of the model stays unfused.

    Hand count (float32): the dense conv 4 -> 128 on 32 x 32 holds its input 4x32x32 and output
    128x32x32, 16 + 512 KiB; the chain's largest op (its input 128x16x16 -> rank 8) holds
    128 + 8 KiB. Fusing it would not lower the planned peak, so it stays as separate ops;
    without the bigger op in front, the same chain is fused.
    """
    rng = np.random.default_rng(9)
    w1, wv = rng.standard_normal((8, 128, 1, 1)), rng.standard_normal((8, 1, 3, 1))
    wh, w4 = rng.standard_normal((8, 1, 1, 3)), rng.standard_normal((16, 8, 1, 1))
    dense = rng.standard_normal((128, 4, 3, 3))
    w1, wv, wh, w4, dense = (a.astype("float32") for a in (w1, wv, wh, w4, dense))

    spec = cs.ChainSpec("cp", (1, 128, 16, 16), 16, (3, 3), (8,), GEOMS["s1p1"], False)

    def chain(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
        return _chain(bb, spec, x, [w1, wv, wh, w4])

    def with_dense(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        y = _conv(bb, x, dense, padding=(1, 1, 1, 1))
        return chain(bb, bb.emit(relax.op.nn.max_pool2d(y, (2, 2), (2, 2))))

    mod = _module((1, 4, 32, 32), with_dense)
    assert fused_calls(RefuseChains(HOST)(mod)) == []
    assert len(fused_prims(fuse(mod))) == 1
    alone = _module((1, 128, 16, 16), chain)
    assert len(fused_prims(fuse(alone, mode="auto"))) == 1
    # The pipeline's modes: auto (this rule), all, none.
    assert [len(fused_prims(lower(mod, HOST, refuse=m))) for m in REFUSE_MODES] == [0, 1, 0]
    assert len(fused_prims(lower(alone, HOST, refuse="none"))) == 0
    with pytest.raises(EdgecompError, match="unknown re-fusion mode 'some'; use one of auto"):
        lower(mod, HOST, refuse="some")


@pytest.mark.parametrize("kind", ["cp", "tucker2"])
def test_relu_after_the_bias_is_folded_in(kind: str) -> None:
    """Chain + bias + ReLU: one kernel writes the rectified output (no ReLU kernel after it)."""
    rng = np.random.default_rng(11)
    r, k = 6, 8
    if kind == "cp":
        shapes = [(r, 8, 1, 1), (r, 1, 3, 1), (r, 1, 1, 3), (k, r, 1, 1)]
        extra = [{}, dict(padding=(1, 0, 1, 0), groups=r), dict(padding=(0, 1, 0, 1), groups=r), {}]
    else:
        shapes = [(r, 8, 1, 1), (r, r, 3, 3), (k, r, 1, 1)]
        extra = [{}, dict(padding=(1, 1, 1, 1)), {}]
    ws = [rng.standard_normal(sh).astype("float32") for sh in shapes]
    bias = rng.standard_normal((1, k, 1, 1)).astype("float32")

    ranks = (r,) if kind == "cp" else (r, r)
    spec = cs.ChainSpec(kind, (1, 8, 12, 12), k, (3, 3), ranks, GEOMS["s1p1"], False)

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        t = _chain(bb, spec, x, ws)
        return relax.op.nn.relu(bb.emit(relax.op.add(t, relax.const(bias))))

    def ref(x: np.ndarray) -> np.ndarray:
        t = x
        for w, kw in zip(ws, extra, strict=True):
            t = np_conv2d(t, w, **kw)  # type: ignore[arg-type]
        return np.maximum(t + bias, 0)

    mod = _module((1, 8, 12, 12), body)
    fused = refuse(mod)
    assert ops_of(fused) == ["relax.call_tir", "relax.reshape"]
    (prim,) = fused_prims(fused)
    assert prim.attrs[cs.ATTR_KIND] == kind and "T.max(" in prim.script()
    x = rng.standard_normal((1, 8, 12, 12)).astype("float32")
    want = ref(x)
    np.testing.assert_allclose(run(fused, x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
