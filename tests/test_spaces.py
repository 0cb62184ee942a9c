"""The CPU schedule rules as MetaSchedule design spaces (``apply(..., tunable=True)``).

Each kernel (MEC 3x3, in-place 1x1 GEMM, grouped, im2col, NCHW variants, depthwise, fused
CP / Tucker-2 / GKPD chains, GEMV, matmul) is lowered the way ``edgecomp compile`` lowers
it, up to the schedule phase, and its task taken by ``extract_tasks``. Then: the space's
default point is the untuned schedule; the trace replayed with fresh decisions gives
schedules that differ from it and still compute the same numbers; MetaSchedule's own
ReplayTrace draws candidates from every space without crashing.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tvm
import tvm_ffi
from test_refuse_chains import GEOMS, gkpd_chain_module
from tvm import relax, s_tir
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.schedule import Trace

from edgecomp.kernels import ConvSchedule, CpuFallback, FusedChainRule, Guarded, Matmul
from edgecomp.kernels.chain_spec import ChainSpec, ConvGeometry
from edgecomp.passes.factor_chains import chain_call
from edgecomp.pipeline import lower_unscheduled
from edgecomp.targets import load_board

HOST = load_board("host").tvm_target()
SAMPLES = 24
SAMPLING = ("SamplePerfectTile", "SampleCategorical")


# ----------------------------------------------------------------------------- models
def _module(x_shape: tuple[int, ...], body) -> tvm.IRModule:  # noqa: ANN001 - a builder callback
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def _const(rng: np.random.Generator, *shape: int) -> relax.Constant:
    return relax.const(rng.standard_normal(shape).astype("float32"))


def conv(c: int, k: int, hw: int, kh: int, pad: int, groups: int = 1) -> tvm.IRModule:
    """Conv + bias + ReLU on ``1 x c x hw x hw``."""
    rng = np.random.default_rng(c * k + kh + groups)

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        w = _const(rng, k, c // groups, kh, kh)
        y = bb.emit(relax.op.nn.conv2d(x, w, padding=pad, groups=groups))
        return relax.op.nn.relu(bb.emit(relax.op.add(y, _const(rng, 1, k, 1, 1))))

    return _module((1, c, hw, hw), body)


def dense(rows: int, n_in: int, n_out: int) -> tvm.IRModule:
    """Matmul with an ``[in, out]`` weight + bias + ReLU."""
    rng = np.random.default_rng(n_in + n_out)

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        y = bb.emit(relax.op.matmul(x, _const(rng, n_in, n_out)))
        return relax.op.nn.relu(relax.op.add(y, _const(rng, n_out)))

    return _module((rows, n_in), body)


def cp_chain(c: int, hw: int, r: int, k: int) -> tvm.IRModule:
    """A CP rank-r chain as DecomposeConv emits it (its composite function's call) + bias."""
    rng = np.random.default_rng(r)
    spec = ChainSpec(
        "cp", (1, c, hw, hw), k, (3, 3), (r,), ConvGeometry(padding=(1, 1, 1, 1)), False
    )
    shapes = [(r, c, 1, 1), (r, 1, 3, 1), (r, 1, 1, 3), (k, r, 1, 1)]

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        t = bb.emit(chain_call(bb, spec, x, [_const(rng, *sh) for sh in shapes]))
        return relax.op.add(t, _const(rng, 1, k, 1, 1))

    return _module((1, c, hw, hw), body)


def tucker2_chain(c: int, hw: int, r3: int, r4: int, k: int) -> tvm.IRModule:
    """A Tucker-2 chain (1x1 C->R3, 3x3 core R3->R4, 1x1 R4->K) + bias."""
    rng = np.random.default_rng(r3 * r4)
    geom = ConvGeometry(padding=(1, 1, 1, 1))
    spec = ChainSpec("tucker2", (1, c, hw, hw), k, (3, 3), (r3, r4), geom, False)
    shapes = [(r3, c, 1, 1), (r4, r3, 3, 3), (k, r4, 1, 1)]

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        t = bb.emit(chain_call(bb, spec, x, [_const(rng, *sh) for sh in shapes]))
        return relax.op.add(t, _const(rng, 1, k, 1, 1))

    return _module((1, c, hw, hw), body)


def before_schedule(
    mod: tvm.IRModule, refuse: str = "none", layout: str = "NHWC", conv: str = "mec"
) -> tvm.IRModule:
    """Phases 1-4 of :func:`edgecomp.pipeline.lower` (graph, legalize, fuse): what the
    schedule phase and MetaSchedule's task extraction see."""
    return lower_unscheduled(mod, HOST, refuse=refuse, layout=layout, conv=conv)


CONV, CHAIN, MATMUL = ConvSchedule(), FusedChainRule(), Matmul()
# name: (model, the rule, a substring of the task's name, options of before_schedule)
KERNELS = {
    "mec_3x3": (lambda: conv(8, 16, 10, 3, 1), CONV, "conv2d", {}),
    "gemm_1x1": (lambda: conv(16, 32, 8, 1, 0), CONV, "conv2d", {}),
    "grouped": (lambda: conv(8, 16, 10, 3, 1, groups=2), CONV, "conv2d", {}),
    "mec_nchw": (lambda: conv(8, 16, 10, 3, 1), CONV, "conv2d", {"layout": "NCHW"}),
    "im2col": (lambda: conv(8, 16, 10, 3, 1), CONV, "conv2d", {"conv": "im2col"}),
    "mec_buffer_nchw": (
        lambda: conv(8, 16, 10, 3, 1),
        CONV,
        "conv2d",
        {"conv": "mec-buffer", "layout": "NCHW"},
    ),
    "depthwise": (lambda: conv(16, 16, 9, 3, 1, groups=16), CONV, "depthwise", {}),
    "depthwise_nchw": (
        lambda: conv(16, 16, 16, 3, 1, groups=16),
        CONV,
        "depthwise",
        {"layout": "NCHW"},
    ),
    "cp_chain": (lambda: cp_chain(8, 12, 6, 16), CHAIN, "fused_cp", {"refuse": "all"}),
    "tucker2_chain": (
        lambda: tucker2_chain(8, 12, 6, 4, 16),
        CHAIN,
        "fused_tucker2",
        {"refuse": "all"},
    ),
    "gkpd_chain": (
        lambda: (
            gkpd_chain_module(
                np.random.default_rng(3), (2, 2, 2, 3, 1), (2, 4, 3, 1, 3), (12, 11), GEOMS["s1p1"]
            ).mod
        ),
        CHAIN,
        "fused_gkpd",
        {"refuse": "all"},
    ),
    "gemv": (lambda: dense(1, 256, 32), MATMUL, "matmul", {}),
    # 128 columns: 16-lane AVX-512 vectors still leave several column chunks (48 left one).
    "matmul": (lambda: dense(8, 64, 128), MATMUL, "matmul", {}),
}


def task_func(name: str) -> tvm.tirx.PrimFunc:
    """The prim func of kernel ``name``'s MetaSchedule task."""
    make, _, key, options = KERNELS[name]
    tasks = ms.relax_integration.extract_tasks(before_schedule(make(), **options), HOST)
    (task,) = [t for t in tasks if key in t.task_name]
    return task.dispatched[0]["main"]


# ----------------------------------------------------------------------------- helpers
def resampled(func: tvm.tirx.PrimFunc, trace: Trace, seed: int) -> s_tir.Schedule:
    """``trace`` replayed on a fresh schedule of ``func`` with every decision drawn anew."""
    for inst in trace.insts:
        if inst.kind.name in SAMPLING:
            trace = trace.with_decision(inst, None, remove_postproc=True)
    sch = s_tir.Schedule(func, seed=seed)
    trace.apply_to_schedule(sch, remove_postproc=True)
    return sch


def decisions(sch: s_tir.Schedule) -> tuple:
    trace = sch.trace
    return tuple(
        tuple(int(v) for v in d) if isinstance(d, (list, tvm_ffi.Array)) else int(d)
        for inst, d in trace.decisions.items()
        if inst.kind.name in SAMPLING
    )


def run(mod: tvm.IRModule, args: list[np.ndarray]) -> np.ndarray:
    """Build ``mod``'s ``main`` for the host and run it; the output is its last argument."""
    lib = tvm.compile(mod, target=HOST)
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def random_args(func: tvm.tirx.PrimFunc) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = [[int(d) for d in p.ty.shape] for p in func.params]
    return [rng.standard_normal(s).astype("float32") for s in shapes]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_space_default_is_untuned_schedule_and_samples_compute_the_same(name: str) -> None:
    rule = KERNELS[name][1]
    func = task_func(name)
    space = rule.apply(func, HOST, True)
    untuned = rule.apply(func, HOST, False)
    assert space is not None and untuned is not None
    assert tvm_ffi.structural_equal(space.mod, untuned.mod)
    default = decisions(space)
    assert default, "the space has no knob"
    args = random_args(func)
    want = run(tvm.IRModule({"main": func}), args)
    np.testing.assert_allclose(run(untuned.mod, args), want, rtol=1e-4, atol=1e-4)
    seen, differs = {default}, 0
    # Consecutive seeds draw alike from TVM's linear congruential engine: spread them.
    for seed in np.random.default_rng(1).integers(1, 2**31 - 1, SAMPLES):
        sch = resampled(func, space.trace, int(seed))
        point = decisions(sch)
        if point in seen:
            continue
        seen.add(point)
        # Blocks of a fused loop nest can lower alike (rows x 1 panel in any split).
        differs += not tvm_ffi.structural_equal(sch.mod, untuned.mod)
        got = run(sch.mod, args)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=str(point))
    assert differs, "no sampled point gives another schedule than the default"


def test_guarded_rule_falls_back_when_its_tunable_path_fails() -> None:
    class Broken(ConvSchedule):
        def apply(self, func, target, tunable):  # noqa: ANN001, ANN202
            if tunable:
                raise RuntimeError("tunable path broke")
            return super().apply(func, target, tunable)

    func = task_func("mec_3x3")
    got = Guarded(Broken(), CpuFallback()).apply(func, HOST, True)
    want = CpuFallback().apply(func, HOST, False)
    assert tvm_ffi.structural_equal(got.mod, want.mod)


_REPLAY = """
import sys
import types

# TuneContext imports tvm.s_tir.tensor_intrin (a minute here: TVMScript's decorator calls
# inspect.stack()); these spaces tensorize nothing.
sys.modules["tvm.s_tir.tensor_intrin"] = types.ModuleType("tvm.s_tir.tensor_intrin")
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.space_generator import ScheduleFn

sys.path.insert(0, {tests!r})
from test_spaces import HOST, KERNELS, task_func

for name in sorted(KERNELS):
    rule = KERNELS[name][1]
    ctx = ms.TuneContext(
        mod=tvm.IRModule({{"main": task_func(name)}}),
        target=HOST,
        space_generator=ScheduleFn(
            lambda sch, rule=rule: rule.apply(sch.mod["main"], HOST, True),
            sch_rules=[],
            postprocs=[],
            mutator_probs={{}},
        ),
        search_strategy=ms.search_strategy.ReplayTrace(),
        rand_state=7,
        num_threads=1,
    )
    spaces = ctx.generate_design_space()
    ctx.pre_tuning(max_trials=16, num_trials_per_iter=16, design_spaces=spaces)
    candidates = ctx.search_strategy.generate_measure_candidates()
    print(name, len(candidates), flush=True)
"""


def test_metaschedule_replays_every_space() -> None:
    """MetaSchedule's ReplayTrace draws 16 candidates from each kernel's space (TVM aborts
    the process on a replay error: it runs in a subprocess)."""
    tests = str(Path(__file__).parent)
    code = textwrap.dedent(_REPLAY.format(tests=tests))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    got = dict(line.split() for line in result.stdout.splitlines())
    assert got == {name: "16" for name in KERNELS}, result.stdout + result.stderr
