"""Tuned edgecomp against untuned edgecomp and ONNX Runtime, end to end on this machine.

Models: the block models (``edgecomp.zoo.blocks`` at their ImageNet sizes), AlexNet, VGG-19,
and VGG-19 with CP at a 3x conv-FLOP reduction (``vgg19-cp``; ORT runs the dense VGG-19, the
model a user would otherwise ship). Each model's kernels are tuned with ``edgecomp tune``'s
engine on this machine (``--local``; ``--trials`` per model, scaled by its kernel count), then
the untuned and the tuned builds and ORT are timed side by side: each contender in a block of
runs after a pause, best run over the blocks (bench/end_to_end.best_of). Batch 1, 2 threads.

Goals (issue 10): tuned at most 0.8 of ORT on VGG-19 dense and as a geometric mean over the
block models; tuned VGG-19 CP at most 0.55 of ORT.

Run:  PYTHONPATH=. .venv/bin/python bench/tune_end_to_end.py [--models resnet_bottleneck ...]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import tempfile
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from bench.blocks_vs_ort import DEPLOYED, cpu_model, load  # noqa: E402
from bench.end_to_end import best_of, ort_session  # noqa: E402
from edgecomp.build import DecomposeOptions, decompose_model  # noqa: E402
from edgecomp.frontend import import_onnx  # noqa: E402
from edgecomp.pipeline import lower_unscheduled, schedule  # noqa: E402
from edgecomp.targets import load_board  # noqa: E402
from edgecomp.tuning import Devices, WorkDir, open_database, tune_kernels  # noqa: E402
from edgecomp.tuning.search import variant_tasks  # noqa: E402


def measure(name: str, trials_per_kernel: int, repeat: int) -> dict[str, float]:
    """Tune one model here; time untuned, tuned and ORT side by side."""
    board = load_board("host")
    target = board.tvm_target()
    dense = load(name.removesuffix("-cp"))
    dims = [d.dim_value for d in dense.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    sess = ort_session(dense)
    feed = {sess.get_inputs()[0].name: x}
    ref = sess.run(None, feed)[0]
    mod, _ = import_onnx(dense)
    if name.endswith("-cp"):
        mod, _ = decompose_model(mod, DecomposeOptions("cp", "flops=3x"))
    tasks = variant_tasks(mod, target, "auto")
    trials = trials_per_kernel * len({t.conv or t.key for t in tasks})
    work = WorkDir.open(tempfile.mkdtemp(prefix=f"bench-{name}-"), board)
    start = time.perf_counter()
    tune_kernels(tasks, board, work, trials, Devices(local=True))
    tuning_s = time.perf_counter() - start
    database, _, tiles = open_database(work.path, board)
    vms = {}
    for label, db, chosen in (("untuned", None, None), ("tuned", database, tiles)):
        fused = lower_unscheduled(mod, target, tiles=chosen)
        scheduled, _ = schedule(fused, target, db)
        vms[label] = relax.VirtualMachine(tvm.compile(scheduled, target=target), tvm.cpu())
    data = tvm.runtime.tensor(x)
    untuned_out = vms["untuned"]["main"](data).numpy()
    tuned_out = vms["tuned"]["main"](data).numpy()
    scale = max(1e-12, float(np.max(np.abs(ref))))
    best = best_of(
        {
            "ort": functools.partial(sess.run, None, feed),
            "untuned": functools.partial(vms["untuned"]["main"], data),
            "tuned": functools.partial(vms["tuned"]["main"], data),
        },
        repeat,
    )
    return {
        **best,
        "trials": sum(work.trials.values()),
        "tuning_s": tuning_s,
        "tuned_vs_untuned_err": float(np.max(np.abs(tuned_out - untuned_out)) / scale),
        "vs_ort_err": float(np.max(np.abs(tuned_out - ref)) / scale),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=[*DEPLOYED, "alexnet", "vgg19", "vgg19-cp"])
    parser.add_argument("--trials", type=int, default=16, help="trials per kernel of a model")
    parser.add_argument("--repeat", type=int, default=30, help="timed runs per contender")
    args = parser.parse_args()
    target = load_board("host").tvm_target()
    print(f"CPU: {cpu_model()}; target mcpu={target.attrs.get('mcpu')}")
    print(f"threads: ORT intra_op 2, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")
    rows = []
    for name in args.models:
        big = name.startswith(("alexnet", "vgg19"))
        r = measure(name, args.trials, max(6, args.repeat // 5) if big else args.repeat)
        rows.append((name, r))
        print(
            f"{name}: {r['trials']} trials in {r['tuning_s']:.0f} s; untuned"
            f" {r['untuned'] * 1e3:.3f} ms, tuned {r['tuned'] * 1e3:.3f} ms, ORT"
            f" {r['ort'] * 1e3:.3f} ms; tuned / ORT {r['tuned'] / r['ort']:.2f}"
            f" (tuned vs untuned rel err {r['tuned_vs_untuned_err']:.0e}, vs ORT"
            f" {r['vs_ort_err']:.0e})",
            flush=True,
        )
    print()
    print("| model | trials | tuning s | untuned ms | tuned ms | ORT ms | tuned / untuned"
          " | tuned / ORT |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['trials']} | {r['tuning_s']:.0f} | {r['untuned'] * 1e3:.3f} |"
            f" {r['tuned'] * 1e3:.3f} | {r['ort'] * 1e3:.3f} | {r['tuned'] / r['untuned']:.2f} |"
            f" {r['tuned'] / r['ort']:.2f} |"
        )
    blocks = [r["tuned"] / r["ort"] for name, r in rows if name in DEPLOYED]
    if blocks:
        geo = math.exp(sum(math.log(v) for v in blocks) / len(blocks))
        print(f"\nblock models: geometric mean tuned / ORT {geo:.2f} (goal <= 0.8)")


if __name__ == "__main__":
    main()
