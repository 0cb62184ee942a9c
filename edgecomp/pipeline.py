"""edgecomp's lowering pipeline: imported Relax module -> module ready for ``tvm.compile``.

Phases (numbered as the comments in :func:`lower_unscheduled` and :func:`schedule`):

1. Decompose (when asked): ``DecomposeConv`` replaces dense convolutions (and fully connected
   layers) by factor chains, each a call of the chain's composite function
   (:mod:`edgecomp.passes.factor_chains`).
2. Graph: ``RefuseChains`` picks the chains that run as one fused kernel (T1000) and inlines
   the others. Then, on CPU targets, activations become NHWC between layers
   (``ConvertLayout``, helped by :mod:`edgecomp.passes.layout_transposes` where an op follows
   an NCHW first input): the transposes stay only at the model's inputs and outputs and around
   ops that have no NHWC form (a flatten, a channel shuffle's reshape, a fused chain).
3. Legalize: constants folded first (weight transposes, bias reshapes), then each fused chain
   becomes its kernel (``LegalizeFusedChains``) and every Relax op a TE prim func,
   convolutions through edgecomp's MEC / depthwise kernels.
4. Fuse: TVM's ``AnnotateTIROpPattern`` + ``FuseOps`` + ``FuseTIR``, so bias and ReLU become
   the epilogue of the convolution / matmul they follow.
5. Schedule: tuned records where a database has them, edgecomp's default rules
   (``edgecomp.kernels.default_rules``) on every other prim func.
6. Finish for ``tvm.compile``: ``tvm.compile``'s own default pipeline then only does the
   dataflow lowering and memory planning (it re-runs ``LegalizeOps``, which finds nothing left,
   and on GPU targets dlight, which skips functions already marked scheduled).

Set ``EDGECOMP_DUMP_IR=<dir>`` (or pass ``dump_dir``) to write the module after each phase.
"""

from __future__ import annotations

import os
from pathlib import Path

import tvm
from tvm import relax
from tvm.s_tir import dlight

from edgecomp.errors import EdgecompError
from edgecomp.kernels import default_rules
from edgecomp.kernels.conv2d import conv_legalizer
from edgecomp.kernels.conv_common import CONV_KINDS, tile_choice
from edgecomp.kernels.fast_math import fast_math_legalizers
from edgecomp.kernels.fused_chain import LegalizeFusedChains
from edgecomp.kernels.target_info import is_gpu
from edgecomp.passes.decompose_conv import DecomposeConv
from edgecomp.passes.layout_transposes import PoolsInLayout, SinkTransposes
from edgecomp.passes.min_max_activations import MinMaxActivations
from edgecomp.passes.power_by_sqrt import PowerBySqrt
from edgecomp.passes.refuse_chains import REFUSE_MODES, RefuseChains
from edgecomp.passes.remove_dropout import RemoveDropout
from edgecomp.passes.split_concat_convs import SplitConcatConvs

DUMP_ENV = "EDGECOMP_DUMP_IR"


def graph_passes(target: tvm.target.Target, refuse: str = "auto") -> list[tvm.transform.Pass]:
    """edgecomp's own Relax graph passes (phase 2): re-fusion picks the factor chains that run
    as one kernel each (T1000): where that lowers the planned peak (``refuse="auto"``), every
    chain (``"all"``), or none; the other chains become their plain ops. Constant powers
    (LRN's ``** 0.75``) become square roots, which vectorize where ``powf`` does not.
    """
    return [RefuseChains(target, mode=refuse), PowerBySqrt()]


def layout_passes(target: tvm.target.Target, layout: str = "NHWC") -> list[tvm.transform.Pass]:
    """Activations in ``layout`` between layers (phase 2, after the graph passes).

    On CPUs edgecomp's convolution, depthwise and pooling kernels vectorize over channels:
    NHWC activations spare every convolution the transposes of its input and output (1.8 ms
    of VGG-19 conv1_2's 11.4 when each conv converted NCHW itself). GPU kernels stay NCHW.
    ``FoldConstant`` after ``ConvertLayout`` folds the layout changes of constants (biases).
    """
    if layout == "NCHW" or is_gpu(target):
        return []
    return [
        RemoveDropout(),  # its tuple output stops ConvertLayout
        MinMaxActivations(),  # clip, leakyrelu: no layout rule, they would stay NCHW
        relax.transform.CanonicalizeBindings(),  # BatchNormalization's tuple: SinkTransposes passes
        SplitConcatConvs(),  # an NHWC concatenation is a copy that interleaves
        relax.transform.ConvertLayout({"relax.nn.conv2d": [layout, "OIHW"]}),
        PoolsInLayout(layout),  # pools follow their input: on NCHW ones they stayed NCHW
        SinkTransposes(),  # and concatenations their first input, with all that follows them
        relax.transform.FoldConstant(),
        # An input used twice (a residual's shortcut) is transposed once.
        relax.transform.EliminateCommonSubexpr(),
    ]


def lower(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    *,
    decompose: DecomposeConv | None = None,
    conv: str = "mec",
    refuse: str = "auto",
    layout: str = "NHWC",
    dump_dir: str | os.PathLike[str] | None = None,
    database: object | None = None,
) -> tvm.IRModule:
    """Turn an imported Relax module (weights as constants) into one ready for ``tvm.compile``.

    Parameters
    ----------
    mod : tvm.IRModule
        Relax module, e.g. from ``tvm.relax.frontend.onnx.from_onnx(model,
        keep_params_in_input=False)``.
    target : tvm.target.Target
        CPU (llvm: x86, aarch64, armv7) or GPU (``opencl`` Mali, with an llvm host) target.
    decompose : DecomposeConv, optional
        Phase 1: the decomposition pass, configured with the method and rank policy; its
        ``report`` holds the per-layer records afterwards.
    conv : {"mec", "mec-buffer", "im2col"}
        Convolution lowering: MEC reading its lowered matrix in place from the padded input
        (default), MEC with the lowered buffer materialized, or im2col; the last two exist to
        measure the first against.
    refuse : {"auto", "all", "none"}
        Re-fuse decomposed factor chains into one kernel each (phase 2): those whose fusing
        can lower the planned peak (default; see :class:`RefuseChains`), all of them (the
        least memory), or none (every chain as separate ops).
    layout : {"NHWC", "NCHW"}
        Activation layout between layers on CPU targets (GPU targets keep NCHW). ``"NCHW"``
        keeps the model's layout, each convolution transposing its input and output itself.
    dump_dir : path, optional
        Write the module's script after each phase here (default: ``$EDGECOMP_DUMP_IR``).
    database : tvm.s_tir.meta_schedule.Database, optional
        Tuning records (``edgecomp tune``): a prim func with a record takes its best schedule,
        the others edgecomp's default (see :func:`schedule`).

    Returns
    -------
    tvm.IRModule
        Module whose prim funcs are all scheduled; build it with ``tvm.compile(mod, target)``.
    """
    fused = lower_unscheduled(
        mod, target, decompose=decompose, conv=conv, refuse=refuse, layout=layout, dump_dir=dump_dir
    )
    return schedule(fused, target, database, dump_dir)[0]


def _dumper(dump_dir: str | os.PathLike[str] | None):  # noqa: ANN202
    dump_to = dump_dir or os.environ.get(DUMP_ENV)
    dump = Path(dump_to) if dump_to else None

    def phase(name: str, passes: list[tvm.transform.Pass], module: tvm.IRModule) -> tvm.IRModule:
        module = tvm.transform.Sequential(passes, name=f"edgecomp.{name}")(module)
        if dump is not None:
            dump.mkdir(parents=True, exist_ok=True)
            (dump / f"{name}.py").write_text(module.script(show_meta=False))
        return module

    return phase


def decompose_phase(
    mod: tvm.IRModule, transform: DecomposeConv, dump_dir: str | os.PathLike[str] | None = None
) -> tvm.IRModule:
    """Phase 1 of :func:`lower`: run the decomposition pass ``transform`` (its ``report`` then
    holds the per-layer records). ``compile`` runs it on its own and lowers the result, because
    its memory report compares two lowerings of the decomposed module; ``tune`` does too, to
    decompose once for its three tile variants."""
    # Called directly, not through TVM's pass machinery: an EdgecompError keeps its type.
    new = transform.transform_module(mod, tvm.transform.PassContext.current())
    return _dumper(dump_dir)("1_decompose", [], new)


def lower_unscheduled(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    *,
    decompose: DecomposeConv | None = None,
    conv: str = "mec",
    refuse: str = "auto",
    layout: str = "NHWC",
    dump_dir: str | os.PathLike[str] | None = None,
    tiles: dict[str, tuple[int, int, int]] | int | None = None,
) -> tvm.IRModule:
    """Phases 1-4 of :func:`lower`: the module whose prim funcs are edgecomp's kernels, fused
    with their epilogues, not yet scheduled: what ``edgecomp tune`` extracts its tasks from.

    ``tiles``: the convolutions' register tiles, when not the cost model's picks (tuned
    choices per convolution, or a runner-up rank for all; see ``conv_common.tile_choice``).
    """
    if refuse not in REFUSE_MODES:
        raise EdgecompError(
            f"unknown re-fusion mode {refuse!r}; use one of {', '.join(REFUSE_MODES)}"
        )
    if conv not in CONV_KINDS:
        raise EdgecompError(
            f"unknown convolution lowering {conv!r}; use one of {', '.join(CONV_KINDS)}"
        )
    if layout not in ("NHWC", "NCHW"):
        raise EdgecompError(f"unknown activation layout {layout!r}; use NHWC or NCHW")
    phase = _dumper(dump_dir)
    with target, tile_choice(tiles):
        # (1) decompose: each dense conv (fc layer) the user asked for becomes a factor chain.
        if decompose is not None:
            mod = decompose_phase(mod, decompose, dump_dir)
        # (2) edgecomp graph passes: fuse the factor chains worth it, inline the others.
        #     Then activations NHWC between layers (CPU targets).
        mod = phase("2_graph", graph_passes(target, refuse) + layout_passes(target, layout), mod)
        # (3) legalize with edgecomp kernels. Fold constants first so that weight transposes
        #     (Gemm's transB), bias reshapes and GKPD's repeated factors are done at compile
        #     time, not per inference.
        mod = phase(
            "3_legalize",
            [
                relax.transform.FoldConstant(),
                LegalizeFusedChains(target),
                relax.transform.LegalizeOps(
                    customize_legalize_map={
                        "relax.nn.conv2d": conv_legalizer(conv),
                        **({} if is_gpu(target) else fast_math_legalizers()),
                    }
                ),
            ],
            mod,
        )
        # (4) fuse: op patterns let FuseOps put elementwise epilogues behind conv / matmul;
        #     FoldConstant after legalization folds what only became constant as a prim func.
        return phase(
            "4_fuse",
            [
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination(),
            ],
            mod,
        )


def schedule(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    database: object | None = None,
    dump_dir: str | os.PathLike[str] | None = None,
) -> tuple[tvm.IRModule, int]:
    """Phase 5 of :func:`lower`: schedule every prim func of ``mod``; return it and how many
    took a tuned schedule from ``database``.

    With a database, ``MetaScheduleApplyDatabase`` first replaces each prim func that has a
    record with its best schedule and marks it scheduled; edgecomp's rules then schedule the
    rest (dlight skips functions already scheduled).
    """
    phase = _dumper(dump_dir)
    applied = 0
    with target:
        if database is not None:
            with database:  # type: ignore[attr-defined]
                mod = phase("5_tuned", [relax.transform.MetaScheduleApplyDatabase()], mod)
            applied = sum(
                1
                for f in mod.functions.values()
                if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and f.attrs.get("tirx.is_scheduled")
            )
        # (5) schedule every prim func with edgecomp's default rules.
        mod = phase("5_schedule", [dlight.ApplyDefaultSchedule(*default_rules(target))], mod)
    # (6) nothing else is needed: tvm.compile's default relax pipeline does the dataflow
    #     lowering (ToNonDataflow, CallTIRRewrite, StaticPlanBlockMemory, VMShapeLower ...).
    return mod, applied
