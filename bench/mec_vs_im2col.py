"""MEC vs im2col on every VGG-19 convolution: lowered-buffer bytes and latency, side by side.

Each layer is built as a one-conv Relax module (seeded weights as constants), lowered three
times by ``edgecomp.pipeline.lower`` (``conv="mec"``: MEC reading its lowered matrix in place
from the padded input, edgecomp's default; ``"mec-buffer"``: MEC with the lowered buffer
materialized, as in the paper; ``"im2col"``; the same GEMM schedule for all three, so the
difference is the lowering) and timed on the Relax VM, interleaved with ONNX Runtime running
the same convolution. The best layer's GFLOP/s is also given as a fraction of the CPU's fp32
peak, measured: one multiply-add loop per core, all at once (:func:`measured_peak`).

Run:  PYTHONPATH=. .venv/bin/python bench/mec_vs_im2col.py
Timings on a shared 2-core machine are noisy; compare columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("TVM_NUM_THREADS", "2")  # before the TVM runtime starts its thread pool

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tvm  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tvm import relax  # noqa: E402

from edgecomp.kernels.conv_common import conv_out_size, tiles_for  # noqa: E402
from edgecomp.kernels.target_info import cpu_info  # noqa: E402
from edgecomp.pipeline import lower  # noqa: E402
from edgecomp.targets import load_board  # noqa: E402

# VGG-19's convolutions: (name, C, K, H=W); all 3x3, stride 1, pad 1.
VGG19_CONVS = [
    ("conv1_1", 3, 64, 224),
    ("conv1_2", 64, 64, 224),
    ("conv2_1", 64, 128, 112),
    ("conv2_2", 128, 128, 112),
    ("conv3_1", 128, 256, 56),
    ("conv3_2-4", 256, 256, 56),
    ("conv4_1", 256, 512, 28),
    ("conv4_2-4", 512, 512, 28),
    ("conv5_1-4", 512, 512, 14),
]


def conv_module(c: int, k: int, size: int, seed: int = 0) -> tvm.IRModule:
    """A Relax module with one 3x3/s1/p1 conv2d whose weight is a seeded constant."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, c, 3, 3)) * math.sqrt(2.0 / (9 * c))).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, size, size), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=[1, 1, 1, 1]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def lowered_bytes(kind: str, c: int, size: int, target: tvm.target.Target, k: int) -> int:
    """Bytes of the lowered buffer as edgecomp allocates it (output width padded to the tile).

    Both lowerings also keep one zero-padded NHWC copy of the input (``conv_pad``, the same
    size for both); it is not counted here.
    """
    wo = conv_out_size(size, 3, 1, 1, 1, 1)
    tile_w = tiles_for(wo, k, target, 9 * c)[0]
    wo_pad = math.ceil(wo / tile_w) * tile_w
    rows = size + 2  # padded input rows the windows touch (3x3, stride 1, pad 1)
    if kind == "mec-buffer":
        return wo_pad * rows * 3 * c * 4  # L: Wo x (H * kw * C)
    return wo * wo_pad * 9 * c * 4  # im2col: (Ho * Wo) x (kh * kw * C)


def layer_runner(
    mod: tvm.IRModule, target: tvm.target.Target, kind: str, x: np.ndarray
) -> tuple[Callable[[], float], np.ndarray]:
    """A callable timing one run of the layer built with ``kind`` (seconds), and its output."""
    ex = tvm.compile(lower(mod, target, conv=kind), target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    data = tvm.runtime.tensor(x)
    timer = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=1, min_repeat_ms=0)
    return (lambda: float(timer(data).results[0])), vm["main"](data).numpy()


def ort_runner(mod: tvm.IRModule, x: np.ndarray) -> tuple[Callable[[], float], np.ndarray]:
    """The same convolution in ONNX Runtime (2 threads), as a callable timing one run."""
    weight = mod["main"].body.blocks[0].bindings[0].value.args[1].value.numpy()
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    sess = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )

    def run() -> float:
        start = time.perf_counter()
        sess.run(None, {"x": x})
        return time.perf_counter() - start

    return run, sess.run(None, {"x": x})[0]


def best_interleaved(
    runs: dict[str, Callable[[], float]], repeat: int, block: int = 3
) -> dict[str, float]:
    """Best seconds of each runner over ``repeat`` rounds of one block of runs each.

    Blocks after a pause and a warm-up run, as in ``bench/end_to_end.py``: ORT's and TVM's
    thread pools spin after a run and would otherwise steal the cores from the next runner.
    """
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for name, run in runs.items():
            time.sleep(0.1)
            run()
            best[name] = min([best[name]] + [run() for _ in range(block)])
    return best


_FMA_C = r"""
#include <stdio.h>
#include <time.h>
/* ten independent multiply-add chains of LANES floats: more than FMA latency x pipes */
typedef float v __attribute__((vector_size(LANES * 4)));
#define STEP(x) x = x * b + c;
int main(void) {
    v b, c;
    for (int i = 0; i < LANES; i++) { b[i] = 1.0f - 1e-7f; c[i] = 1e-7f; }
    v a0 = b, a1 = b, a2 = b, a3 = b, a4 = b, a5 = b, a6 = b, a7 = b, a8 = b, a9 = b;
    long n = 400000000L / LANES;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++) {
        STEP(a0) STEP(a1) STEP(a2) STEP(a3) STEP(a4) STEP(a5) STEP(a6) STEP(a7) STEP(a8) STEP(a9)
        __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5),
                         "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9));
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    v s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9;
    double sec = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    printf("%f %f\n", 2.0 * 10 * LANES * n / sec / 1e9, s[0]);
    return 0;
}
"""


def measured_peak(lanes: int, cores: int) -> float:
    """fp32 GFLOP/s of ``cores`` copies of a multiply-add loop on ``lanes``-float vectors run at
    once: the peak the cores really reach (FMA pipes, clock under vector load and turbo
    included, which a clock times a nominal FMA count misses: 1.32 GHz from a 1-cycle loop on
    an AVX-512 Xeon VM whose cores do 132 GFLOP/s each, 2 pipes at 2.06 GHz).

    x86-64 only, needs a C compiler; 0 when either is missing.
    """
    if platform.machine() != "x86_64" or shutil.which("cc") is None:
        return 0.0
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "fma.c"), os.path.join(tmp, "fma")
        with open(src, "w") as f:
            f.write(_FMA_C)
        subprocess.run(
            ["cc", "-O2", "-march=native", f"-DLANES={lanes}", src, "-o", exe], check=True
        )
        best = 0.0
        for _ in range(3):  # the best of three: a shared machine's other load only lowers it
            runs = [
                subprocess.Popen([exe], stdout=subprocess.PIPE, text=True) for _ in range(cores)
            ]
            outs = [run.communicate(timeout=60)[0] for run in runs]
            best = max(best, sum(float(out.split()[0]) for out in outs))
    return best


def cpu_ghz() -> float:
    """Nominal clock from /proc/cpuinfo (the first ``cpu MHz``), 0 when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) / 1000.0
    except OSError:
        pass
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--board", default="host", help="board name or file, or a JSON target dict")
    parser.add_argument("--repeat", type=int, default=4, help="timed rounds per layer")
    parser.add_argument(
        "--peak", type=float, default=0.0, help="fp32 GFLOP/s of the cores (default: measured)"
    )
    args = parser.parse_args()
    if args.board.lstrip().startswith("{"):
        target = tvm.target.Target(json.loads(args.board))
    else:
        target = load_board(args.board).tvm_target()
    cores = int(os.environ["TVM_NUM_THREADS"])
    lanes = cpu_info(target).lanes
    peak = args.peak or measured_peak(lanes, cores) or cores * cpu_ghz() * 2 * lanes * 2
    print(
        f"target {target.kind.name} {target.attrs.get('mcpu', '')}, {cores} threads, "
        f"{lanes} fp32 lanes; peak {peak:.0f} GFLOP/s ({cores} multiply-add loops at once;"
        f" nominal {cpu_ghz():.2f} GHz x 2 FMA x {lanes} lanes x 2 x {cores} ="
        f" {cores * cpu_ghz() * 2 * lanes * 2:.0f})"
    )
    head = (
        f"{'layer':10} {'C':>4} {'K':>4} {'HxW':>7} | {'MEC MiB':>7} {'im2col MiB':>10} "
        f"{'ratio':>5} | {'MEC ms':>6} {'buffer ms':>9} {'im2col ms':>9} {'vs buffer':>9} "
        f"{'vs im2col':>9} | {'GF/s':>5} | {'ORT ms':>6} {'/ ORT':>5}"
    )
    print(head)
    print("-" * len(head))
    best = (0.0, "")
    totals = dict.fromkeys(["mec", "mec-buffer", "im2col", "ort"], 0.0)
    rng = np.random.default_rng(1)
    for name, c, k, size in VGG19_CONVS:
        mod = conv_module(c, k, size)
        x = rng.standard_normal((1, c, size, size)).astype(np.float32)
        mec_b, col_b = (
            lowered_bytes(kind, c, size, target, k) for kind in ("mec-buffer", "im2col")
        )
        runs, outs = {}, {}
        for kind in ("mec", "mec-buffer", "im2col"):
            runs[kind], outs[kind] = layer_runner(mod, target, kind, x)
        runs["ort"], outs["ort"] = ort_runner(mod, x)
        for kind, out in outs.items():
            np.testing.assert_allclose(out, outs["ort"], rtol=1e-4, atol=1e-4, err_msg=kind)
        t = best_interleaved(runs, args.repeat)
        copies = 4 if name.startswith("conv5") else 3 if "-" in name else 1
        for kind in totals:
            totals[kind] += t[kind] * copies
        gflops = 2.0 * k * c * 9 * size * size / t["mec"] / 1e9
        best = max(best, (gflops, name))
        print(
            f"{name:10} {c:4} {k:4} {size:3}x{size:<3} | {mec_b / 2**20:7.2f} "
            f"{col_b / 2**20:10.2f} {col_b / mec_b:5.2f} | {t['mec'] * 1e3:6.2f} "
            f"{t['mec-buffer'] * 1e3:9.2f} {t['im2col'] * 1e3:9.2f} "
            f"{t['mec-buffer'] / t['mec']:9.2f} {t['im2col'] / t['mec']:9.2f} | {gflops:5.0f} | "
            f"{t['ort'] * 1e3:6.2f} {t['mec'] / t['ort']:5.2f}",
            flush=True,
        )
    print(
        f"all 16 convs: MEC {totals['mec'] * 1e3:.1f} ms, MEC buffer "
        f"{totals['mec-buffer'] * 1e3:.1f}, im2col {totals['im2col'] * 1e3:.1f}, ORT "
        f"{totals['ort'] * 1e3:.1f}: MEC / ORT {totals['mec'] / totals['ort']:.2f}, buffer / MEC "
        f"{totals['mec-buffer'] / totals['mec']:.2f}, im2col / MEC "
        f"{totals['im2col'] / totals['mec']:.2f}"
    )
    print(
        "MEC MiB: the lowered buffer MEC as in the paper materializes (mec-buffer); edgecomp's "
        "default reads it in place from the padded input, which both lowerings allocate, so it "
        "allocates none"
    )
    print(
        f"best MEC layer {best[1]}: {best[0]:.1f} GFLOP/s = {best[0] / peak:.0%} of the "
        f"{peak:.0f} GFLOP/s fp32 peak of this target's vector ISA"
    )


if __name__ == "__main__":
    main()
