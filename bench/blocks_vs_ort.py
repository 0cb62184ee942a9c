"""Untuned edgecomp vs ONNX Runtime on the block forms people deploy, AlexNet and VGG-19.

The block models are ``edgecomp.zoo.blocks`` at the map sizes they have in their ImageNet
networks (seeded weights); AlexNet and VGG-19 are ``edgecomp.models.light_model``. Batch 1,
2 threads for both (ORT ``intra_op_num_threads=2``, ``TVM_NUM_THREADS=2``). Each contender is
timed in a block of runs after a pause, then the other (ORT's threads spin after each run and
slow whatever runs next); the best run over the blocks counts. Outputs are checked against ORT.

Goals (issue 9): edgecomp / ORT at most 1.0 on every model, at most 0.85 as the geometric
mean over the block models, VGG-19 at most 0.95.

Run:  PYTHONPATH=. .venv/bin/python bench/blocks_vs_ort.py [--models resnet_bottleneck ...]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")  # before the TVM runtime starts its thread pool

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from bench.end_to_end import best_of, ort_session  # noqa: E402
from edgecomp.frontend import import_onnx  # noqa: E402
from edgecomp.models import light_model  # noqa: E402
from edgecomp.pipeline import lower  # noqa: E402
from edgecomp.targets import load_board  # noqa: E402
from edgecomp.zoo.blocks import BLOCKS, block_model  # noqa: E402

DEPLOYED = [name for name in BLOCKS if name != "activations"]


def load(name: str) -> onnx.ModelProto:
    """A block model at its ImageNet size, or a light Model Zoo network."""
    return block_model(name) if name in BLOCKS else light_model(name, seed=0)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(name: str, target: tvm.target.Target, repeat: int) -> tuple[float, float, float, float]:
    """(edgecomp s, ORT s, max relative error, build s) for one model."""
    model = load(name)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    sess = ort_session(model)
    feed = {sess.get_inputs()[0].name: x}
    ref = sess.run(None, feed)[0]
    mod, _ = import_onnx(model)
    start = time.perf_counter()
    vm = relax.VirtualMachine(tvm.compile(lower(mod, target), target=target), tvm.cpu())
    build_s = time.perf_counter() - start
    data = tvm.runtime.tensor(x)
    out = vm["main"](data).numpy()
    err = float(np.max(np.abs(out - ref)) / max(1e-12, float(np.max(np.abs(ref)))))
    best = best_of(
        {
            "ort": functools.partial(sess.run, None, feed),
            "edgecomp": functools.partial(vm["main"], data),
        },
        repeat,
    )
    return best["edgecomp"], best["ort"], err, build_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=[*DEPLOYED, "alexnet", "vgg19"])
    parser.add_argument("--repeat", type=int, default=30, help="timed runs per contender")
    args = parser.parse_args()
    target = load_board("host").tvm_target()
    print(f"CPU: {cpu_model()}; target mcpu={target.attrs.get('mcpu')}")
    print(f"threads: ORT intra_op 2, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")
    rows = []
    for name in args.models:
        # AlexNet and VGG-19 take 15-250 ms a run: fewer runs, but at least 4 per block.
        repeat = max(12, args.repeat // 3) if name in ("alexnet", "vgg19") else args.repeat
        t_ec, t_ort, err, build_s = measure(name, target, repeat)
        rows.append((name, t_ec, t_ort, err))
        print(
            f"{name}: edgecomp {t_ec * 1e3:.3f} ms, ORT {t_ort * 1e3:.3f} ms, ratio"
            f" {t_ec / t_ort:.2f} (build {build_s:.1f} s, max rel err {err:.1e})",
            flush=True,
        )
    print()
    print("| model | edgecomp ms | ORT ms | edgecomp / ORT | max rel err |")
    print("|---|---|---|---|---|")
    for name, t_ec, t_ort, err in rows:
        print(f"| {name} | {t_ec * 1e3:.3f} | {t_ort * 1e3:.3f} | {t_ec / t_ort:.2f} | {err:.0e} |")
    ratios = [t_ec / t_ort for name, t_ec, t_ort, _ in rows if name in DEPLOYED]
    if ratios:
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        worst = max(ratios)
        print(
            f"\nblock models: geometric mean edgecomp / ORT {geo:.2f} (goal <= 0.85), worst"
            f" {worst:.2f} (goal <= 1.0 on every model)"
        )


if __name__ == "__main__":
    main()
