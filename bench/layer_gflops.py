"""GFLOP/s per layer kind: edgecomp's NHWC kernels against this CPU's fp32 peak and ONNX Runtime.

Layers as they occur in ResNet, MobileNet v2/v3, ShuffleNet and SqueezeNet: 1x1 convolutions
from 56 x 56 down to 7 x 7 (strided too), 3x3 convolutions on small maps, depthwise 3x3 / 5x5
at stride 1 and 2, grouped 1x1. Each edgecomp layer is one convolution + bias + ReLU on an
NHWC activation (how layers meet inside a model; the transposes sit at the model's ends), on
2 threads; ORT runs the same layer from an NCHW ONNX model on 2 threads (its own layout
changes included). Each contender in blocks, paused between them; best run counts.

Peak = what one multiply-add loop per core on the target's vectors does, all cores at once
(``bench/mec_vs_im2col.measured_peak``: FMA pipes, and the clock under vector load and
turbo, as they are).

Goal (issue 9): the best 1x1 and the best 3x3 layer at 70% of peak or more. 3x3 stride-1
layers run Winograd F(2x2, 3x3) (2.25x fewer multiply-adds): their GFLOP/s are effective ones,
a direct convolution's FLOPs / time, and can pass the peak; the 3x3 kind is the direct GEMM.

Run:  PYTHONPATH=. .venv/bin/python bench/layer_gflops.py
"""

from __future__ import annotations

import argparse
import functools
import os

os.environ.setdefault("TVM_NUM_THREADS", "2")  # before the TVM runtime starts its thread pool

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from bench.blocks_vs_ort import cpu_model  # noqa: E402
from bench.end_to_end import best_of, ort_session  # noqa: E402
from bench.mec_vs_im2col import cpu_ghz, measured_peak  # noqa: E402
from edgecomp.kernels.target_info import cpu_info  # noqa: E402
from edgecomp.pipeline import lower  # noqa: E402
from edgecomp.targets import load_board  # noqa: E402
from edgecomp.zoo.blocks import GraphBuilder  # noqa: E402

# name: (kind, C, K, kernel, stride, groups, map size)
LAYERS: dict[str, tuple[str, int, int, int, int, int, int]] = {
    "1x1 64->256 @56": ("1x1", 64, 256, 1, 1, 1, 56),
    "1x1 256->64 @56": ("1x1", 256, 64, 1, 1, 1, 56),
    "1x1 128->512 @28": ("1x1", 128, 512, 1, 1, 1, 28),
    "1x1 256->1024 @14": ("1x1", 256, 1024, 1, 1, 1, 14),
    "1x1 512->2048 @7": ("1x1", 512, 2048, 1, 1, 1, 7),
    "1x1 s2 256->512 @56": ("1x1", 256, 512, 1, 2, 1, 56),
    "3x3 128->128 @28": ("3x3 Winograd", 128, 128, 3, 1, 1, 28),
    "3x3 256->256 @14": ("3x3 Winograd", 256, 256, 3, 1, 1, 14),
    "3x3 512->512 @7": ("3x3 Winograd", 512, 512, 3, 1, 1, 7),
    "3x3 s2 128->128 @56": ("3x3", 128, 128, 3, 2, 1, 56),
    "3x3 s2 256->256 @28": ("3x3", 256, 256, 3, 2, 1, 28),
    "dw 3x3 144 @56": ("depthwise", 144, 144, 3, 1, 144, 56),
    "dw 3x3 s2 144 @56": ("depthwise", 144, 144, 3, 2, 144, 56),
    "dw 5x5 240 @28": ("depthwise", 240, 240, 5, 1, 240, 28),
    "dw 5x5 s2 240 @28": ("depthwise", 240, 240, 5, 2, 240, 28),
    "g3 1x1 240->60 @28": ("grouped", 240, 60, 1, 1, 3, 28),
    "g3 1x1 60->240 @28": ("grouped", 60, 240, 1, 1, 3, 28),
}


def nhwc_layer(c: int, k: int, ks: int, stride: int, groups: int, hw: int) -> tvm.IRModule:
    """conv + bias + ReLU on an NHWC input, OIHW weights (as inside an edgecomp model)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, c // groups, ks, ks)) * 0.1).astype("float32")
    b = rng.standard_normal((1, 1, 1, k)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, hw, hw, c), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(
                relax.op.nn.conv2d(
                    x,
                    relax.const(w),
                    strides=stride,
                    padding=ks // 2,
                    groups=groups,
                    data_layout="NHWC",
                    out_layout="NHWC",
                )
            )
            y = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(b))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument(
        "--peak", type=float, default=0.0, help="fp32 GFLOP/s of the cores (default: measured)"
    )
    args = parser.parse_args()
    target = load_board("host").tvm_target()
    lanes = cpu_info(target).lanes
    cores = int(os.environ["TVM_NUM_THREADS"])
    nominal = cores * cpu_ghz() * 2 * lanes * 2
    peak = args.peak or measured_peak(lanes, cores) or nominal
    print(f"CPU: {cpu_model()}; target mcpu={target.attrs.get('mcpu')}, {lanes} fp32 lanes")
    print(
        f"peak {peak:.0f} GFLOP/s ({cores} multiply-add loops at once; nominal {cpu_ghz():.2f}"
        f" GHz x 2 FMA x {lanes} lanes x 2 x {cores} cores = {nominal:.0f})"
    )
    rows = []
    for name, (kind, c, k, ks, stride, groups, hw) in LAYERS.items():
        vm = relax.VirtualMachine(
            tvm.compile(lower(nhwc_layer(c, k, ks, stride, groups, hw), target), target=target),
            tvm.cpu(),
        )
        x = np.random.default_rng(1).standard_normal((1, c, hw, hw)).astype("float32")
        data = tvm.runtime.tensor(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        g = GraphBuilder("layer", (1, c, hw, hw))
        g.rng = np.random.default_rng(0)
        model = g.model(g.act(g.conv("x", k, ks, stride, groups, bn=False, bias=True), "relu"))
        sess = ort_session(model)
        feed = {"x": x}
        best = best_of(
            {
                "ort": functools.partial(sess.run, None, feed),
                "edgecomp": functools.partial(vm["main"], data),
            },
            args.repeat,
        )
        ho = (hw + 2 * (ks // 2) - ks) // stride + 1
        flops = 2.0 * ho * ho * k * (c // groups) * ks * ks
        ec, ort = flops / best["edgecomp"] / 1e9, flops / best["ort"] / 1e9
        rows.append((name, kind, ec, ort))
        print(
            f"{name}: edgecomp {ec:.1f} GFLOP/s ({ec / peak:.0%} of peak), ORT {ort:.1f}",
            flush=True,
        )
    print()
    print("| layer | kind | edgecomp GFLOP/s | % of peak | ORT GFLOP/s | edgecomp / ORT speed |")
    print("|---|---|---|---|---|---|")
    for name, kind, ec, ort in rows:
        print(f"| {name} | {kind} | {ec:.1f} | {ec / peak:.0%} | {ort:.1f} | {ec / ort:.2f} |")
    for kind in ("1x1", "3x3", "3x3 Winograd", "depthwise", "grouped"):
        best_row = max((r for r in rows if r[1] == kind), key=lambda r: r[2])
        print(
            f"best {kind}: {best_row[0]} {best_row[2]:.1f} GFLOP/s"
            f" = {best_row[2] / peak:.0%} of peak"
        )


if __name__ == "__main__":
    main()
