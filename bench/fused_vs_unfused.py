"""Re-fused CP chains vs the same chains run as separate ops, per VGG-19 conv layer (T1000).

For each conv layer of VGG-19 (shapes from ``edgecomp.models.light_model("vgg19")``), the layer
is replaced by a CP chain (random factors) whose rank cuts the conv FLOPs about 3x, plus the
layer's bias. Both versions are compiled with TVM for the host:

- unfused: the chain inlined, its four ``conv2d`` ops and the bias add as separate ops,
  through edgecomp's lowering pipeline (``edgecomp.pipeline.lower``: MEC kernel for the 1x1
  convolutions, the direct depthwise kernel for the kh x 1 / 1 x kw ones, bias fused as the
  epilogue);
- fused: ``RefuseChains`` + ``FusedChainRule``, then the same pipeline. ``RefuseChains`` leaves
  a chain unfused when fusing measured slower and its intermediates are small
  (``edgecomp.passes.refuse_chains.fusing_pays``); such layers are marked ``kept`` and their
  fused kernel (forced with ``refuse="all"``) is timed too, in ``forced ms``.

Reported per layer: intermediate memory (``edgecomp.kernels.fused_chain.chain_memory``; the
fused figure is also checked against the buffers the scheduled TIR allocates), time of each
(best of ``--repeat`` rounds of >= 100 ms, the two versions taking turns, because the cores are
shared), speed-up, and the max difference between the two outputs relative to the output's
largest value. Layers with the same shape are timed once. Run with 2 threads::

    TVM_NUM_THREADS=2 PYTHONPATH=. python bench/fused_vs_unfused.py [--layers 3] [--reduction 3]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import tvm
from onnx import numpy_helper, shape_inference
from tvm import relax

from edgecomp.kernels.chain_memory import chain_memory
from edgecomp.kernels.chain_spec import ChainSpec, ConvGeometry, padded_rank
from edgecomp.kernels.fused_chain import allocated_buffers
from edgecomp.models import light_model
from edgecomp.passes.factor_chains import chain_call
from edgecomp.pipeline import lower
from edgecomp.targets import load_board


def vgg_conv_layers() -> list[tuple[str, int, int, int, int, int, int]]:
    """(name, C, H, W, K, kh, kw) of every Conv of VGG-19 (all stride 1, padding 1)."""
    model = shape_inference.infer_shapes(light_model("vgg19"))
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.value_info, *model.graph.input]
    }
    weights = {t.name: numpy_helper.to_array(t).shape for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        _, c, h, w = shapes[node.input[0]]
        k, _, kh, kw = weights[node.input[1]]
        attrs = {a.name: list(a.ints) for a in node.attribute}
        if attrs.get("strides", [1, 1]) != [1, 1] or attrs.get("pads") != [1, 1, 1, 1]:
            raise SystemExit(f"{node.name}: unexpected stride/padding {attrs}")
        layers.append((node.name, c, h, w, k, kh, kw))
    return layers


def cp_rank(c: int, k: int, kh: int, kw: int, reduction: float) -> int:
    """The CP rank whose chain has ``1/reduction`` of the dense conv's FLOPs (per pixel)."""
    return max(1, round(k * c * kh * kw / reduction / (c + kh + kw + k)))


def cp_chain_module(
    c: int, h: int, w: int, k: int, kh: int, kw: int, rank: int, rng: np.random.Generator
) -> tvm.IRModule:
    """A Relax module: the CP chain of one padded 'same' conv layer, random factors, + bias."""
    shapes = [(rank, c, 1, 1), (rank, 1, kh, 1), (rank, 1, 1, kw), (k, rank, 1, 1)]
    ws = [(rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype("float32") for s in shapes]
    bias = rng.uniform(-0.1, 0.1, (1, k, 1, 1)).astype("float32")
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    geom = ConvGeometry(padding=(ph, pw, ph, pw))
    spec = ChainSpec("cp", (1, c, h, w), k, (kh, kw), (rank,), geom, False)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, h, w), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t = bb.emit(chain_call(bb, spec, x, [relax.const(w_) for w_ in ws]))
            out = bb.emit_output(relax.op.add(t, relax.const(bias)))
        bb.emit_func_output(out)
    return bb.get()


def build_unfused(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.runtime.Executable:
    """The chain as separate ops, with edgecomp's conv kernels (MEC / depthwise)."""
    return tvm.compile(lower(mod, target, refuse="none"), target=target)


def build_fused(
    mod: tvm.IRModule, target: tvm.target.Target, always: bool = False
) -> tuple[tvm.runtime.Executable, tvm.IRModule]:
    """The chain re-fused (RefuseChains in phase 2) and scheduled by FusedChainRule.

    ``always``: fuse even where ``RefuseChains``' rule would keep the chain unfused.
    """
    lowered = lower(mod, target, refuse="all" if always else "auto")
    return tvm.compile(lowered, target=target), lowered


def fused_prim(mod: tvm.IRModule) -> tvm.tirx.PrimFunc | None:
    """The fused-chain PrimFunc of ``mod``, None if the chain was left unfused."""
    prims = [
        f
        for _, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and "edgecomp.fused_chain" in (f.attrs or {})
    ]
    assert len(prims) <= 1, prims
    return prims[0] if prims else None


def make_runner(
    ex: tvm.runtime.Executable, x: np.ndarray
) -> tuple[Callable[[], float], np.ndarray]:
    """A timer of one call batch (ms per call) and the output for ``x``."""
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    arg = tvm.runtime.tensor(x, dev)
    out = vm["main"](arg).numpy()
    timer = vm.time_evaluator("main", dev, number=1, repeat=1, min_repeat_ms=100)
    return lambda: timer(arg).mean * 1e3, out


def interleaved_min_ms(runners: list[Callable[[], float]], repeat: int) -> list[float]:
    """Best time of each runner over ``repeat`` rounds, the runners taking turns.

    The 2 cores are shared with other jobs: taking turns exposes both versions to the same load,
    and the minimum is the run least disturbed by it.
    """
    best = [float("inf")] * len(runners)
    for _ in range(repeat):
        for i, run in enumerate(runners):
            best[i] = min(best[i], run())
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=0, help="only the first N distinct shapes")
    parser.add_argument(
        "--reduction", type=float, default=3.0, help="conv FLOP reduction of the CP rank"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--stock",
        action="store_true",
        help="also time the separate ops with stock TVM (default legalization, no schedule)",
    )
    args = parser.parse_args()
    threads = int(os.environ.get("TVM_NUM_THREADS", "0") or 0)
    if threads != 2:
        print(f"note: TVM_NUM_THREADS={threads or 'unset'}; the reported setting is 2")
    target = load_board("host").tvm_target()
    rng = np.random.default_rng(0)
    layers = vgg_conv_layers()
    distinct: dict[tuple, list[str]] = {}
    for name, *shape in layers:
        distinct.setdefault(tuple(shape), []).append(name)
    items = list(distinct.items())[: args.layers or None]
    header = (
        f"{'layers':<14}{'C>K':>10}{'HxW':>8}{'R':>5}{'tile':>9}"
        f"{'unfused MB':>11}{'fused KB':>9}{'mem -%':>7}"
        f"{'unf ms':>8}{'fused ms':>9}{'x':>6}{'maxdiff':>9}{'forced ms':>10}"
    )
    print(header)
    tot_unf = tot_fus = tot_stock = 0.0
    mem_unf = mem_fus = 0
    for (c, h, w, k, kh, kw), names in items:
        rank = cp_rank(c, k, kh, kw, args.reduction)
        mod = cp_chain_module(c, h, w, k, kh, kw, rank, rng)
        t0 = time.time()
        ex_u = build_unfused(mod, target)
        ex_f, fused_mod = build_fused(mod, target)
        prim = fused_prim(fused_mod)
        ex_forced, forced_mod = (
            (ex_f, fused_mod) if prim is not None else build_fused(mod, target, True)
        )
        build_s = time.time() - t0
        forced = fused_prim(forced_mod)
        assert forced is not None
        rows, rb = int(forced.attrs["edgecomp.tile_rows"]), int(forced.attrs["edgecomp.rank_block"])
        spec = ChainSpec(
            "cp", (1, c, h, w), k, (kh, kw), (rank,), ConvGeometry(padding=(1, 1, 1, 1)), True
        )
        # The kernel pads the rank with zero ranks (padded_rank); the unfused chain does not.
        mem = chain_memory(replace(spec, ranks=(padded_rank(rank),)), 2, rows, rb)
        mem = replace(mem, unfused_bytes=chain_memory(spec, 2, rows, rb).unfused_bytes)
        measured = sum(4 * int(np.prod(s)) for s in allocated_buffers(forced).values())
        assert measured * mem.concurrent_tiles == mem.fused_bytes, (measured, mem)
        fused_bytes = mem.fused_bytes if prim is not None else mem.unfused_bytes
        x = rng.standard_normal((1, c, h, w)).astype("float32")
        run_u, y_u = make_runner(ex_u, x)
        run_f, y_f = make_runner(ex_f, x)
        runners = [run_u, run_f]
        if prim is None:
            run_forced, y_forced = make_runner(ex_forced, x)
            runners.append(run_forced)
            y_f = y_forced  # the fused kernel's numerics, also for the kept layers
        times = interleaved_min_ms(runners, args.repeat)
        t_u, t_f = times[:2]
        forced_col = f"{times[2]:>10.2f}" if prim is None else f"{'':>10}"
        diff = float(np.abs(y_u - y_f).max() / (np.abs(y_u).max() + 1e-12))
        n = len(names)
        tot_unf += n * t_u
        tot_fus += n * t_f
        mem_unf += n * mem.unfused_bytes
        mem_fus += n * fused_bytes
        label = names[0] + (f" (x{n})" if n > 1 else "")
        stock = f"{forced_col}   (built in {build_s:.1f} s)"
        if args.stock:  # one run: unscheduled TVM kernels take seconds on the big layers
            run_s, y_s = make_runner(tvm.compile(mod, target=target), x)
            t_s = run_s()
            tot_stock += n * t_s
            stock = f"{forced_col}   stock TVM {t_s:.0f} ms (fused x{t_s / t_f:.1f})"
        print(
            f"{label:<14}{f'{c}>{k}':>10}{f'{h}x{w}':>8}{rank:>5}"
            f"{f'{rows}r/{rb}' if prim is not None else 'kept':>9}"
            f"{mem.unfused_bytes / 1e6:>11.2f}{fused_bytes / 1e3:>9.1f}"
            f"{100 * (1 - fused_bytes / mem.unfused_bytes):>7.1f}"
            f"{t_u:>8.2f}{t_f:>9.2f}{t_u / t_f:>6.2f}{diff:>9.1e}{stock}",
            flush=True,
        )
    print(
        f"{'all layers':<46}{mem_unf / 1e6:>11.2f}{mem_fus / 1e3:>9.1f}"
        f"{100 * (1 - mem_fus / mem_unf):>7.1f}{tot_unf:>8.1f}{tot_fus:>9.1f}"
        f"{tot_unf / tot_fus:>6.2f}"
        + (
            f"{'':>9}   stock TVM {tot_stock:.0f} ms (fused x{tot_stock / tot_fus:.1f})"
            if args.stock
            else ""
        )
    )
    print(
        "memory: intermediate tensors between the separate ops (lower bound: op workspaces not"
        " counted) vs the fused kernel's per-tile buffers x tiles in flight (2, or 1 when the"
        " whole map is one tile); 'tile' = output rows / rank block, 'kept' = left unfused by"
        " RefuseChains' rule (fused ms is then the unfused chain's, forced ms the fused kernel's)"
    )


if __name__ == "__main__":
    main()
