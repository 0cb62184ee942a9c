"""edgecomp tune against stock MetaSchedule on this machine: throughput and search quality.

- Throughput: measured trials per minute of edgecomp's tuner (``tune_kernels``, warm build
  pool, ``--local``) against stock ``ms.tune_tir`` with its default ``LocalBuilder`` (its
  timeout raised to ``--stock-build-timeout`` seconds: at the stock 30 s it builds nothing
  here, importing ``tvm.s_tir.tensor_intrin`` in every new worker takes 45-63 s) on the same
  task and trial count. Goal (issue 10): at least 5x.
- Search quality: VGG-19 conv1_2, conv3_1 and conv5_1 (conv + bias + ReLU, NHWC, as inside an
  edgecomp model), ``--trials`` each in edgecomp's space and in stock MetaSchedule's space
  (its default CPU rules) on the same TE compute. The best schedule of each, and edgecomp's
  default, are then built and timed side by side (blocks, best of blocks). Goals: edgecomp at
  least 1.2x faster than stock at equal trials, and at least 1.1x faster than its default.

Run:  PYTHONPATH=. .venv/bin/python bench/tune_search.py [--part throughput|quality]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402

from bench.blocks_vs_ort import cpu_model  # noqa: E402
from bench.layer_gflops import nhwc_layer  # noqa: E402
from edgecomp.pipeline import lower_unscheduled  # noqa: E402
from edgecomp.targets import load_board  # noqa: E402
from edgecomp.tuning import Devices, WorkDir, kernel_tasks, tune_kernels  # noqa: E402
from edgecomp.tuning.search import default_schedules  # noqa: E402

# name: (C, K, map size) of VGG-19 3x3 convolutions
VGG = {"conv1_2": (64, 64, 224), "conv3_1": (128, 256, 56), "conv5_1": (512, 512, 14)}
EVALUATOR = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50)


def conv_task(c: int, k: int, hw: int, target: tvm.target.Target):  # noqa: ANN201
    """The edgecomp task of one conv + bias + ReLU layer."""
    (task,) = kernel_tasks(lower_unscheduled(nhwc_layer(c, k, 3, 1, 1, hw), target), target)
    return task


def run_edgecomp(task, trials: int) -> tuple[float, int, tvm.s_tir.Schedule | None]:  # noqa: ANN001
    """Wall seconds, measured trials, best schedule of edgecomp's tuner on ``task``."""
    board = load_board("host")
    work = WorkDir.open(tempfile.mkdtemp(prefix="bench-edgecomp-"), board)
    start = time.perf_counter()
    tune_kernels([task], board, work, trials, Devices(local=True))
    wall = time.perf_counter() - start
    db = ms.database.JSONDatabase(work_dir=str(work.path))
    with board.tvm_target():
        best = db.query_schedule(task.mod, board.tvm_target(), "main")
    return wall, sum(work.trials.values()), best


def run_stock(
    task, trials: int, build_timeout: float
) -> tuple[float, int, tvm.s_tir.Schedule | None]:  # noqa: ANN001
    """Wall seconds, measured trials, best schedule of stock ``ms.tune_tir`` on ``task``."""
    target = load_board("host").tvm_target()
    work = tempfile.mkdtemp(prefix="bench-stock-")
    start = time.perf_counter()
    db = ms.tune_tir(
        mod=task.mod,
        target=target,
        work_dir=work,
        max_trials_global=trials,
        num_trials_per_iter=16,
        builder=ms.builder.LocalBuilder(timeout_sec=build_timeout),
        runner=ms.runner.LocalRunner(evaluator_config=EVALUATOR),
    )
    wall = time.perf_counter() - start
    records = db.get_all_tuning_records()
    best = db.query_schedule(task.mod, target, "main")
    return wall, len(records), best


def time_schedule(sch: tvm.s_tir.Schedule, blocks: int = 5) -> float:
    """Best-of-blocks milliseconds of a scheduled prim func on this machine."""
    target = load_board("host").tvm_target()
    lib = tvm.compile(sch.mod, target=target)
    dev = tvm.cpu()
    func = sch.mod["main"]
    args = []
    for param in func.params:
        shape = [int(d) for d in param.ty.shape]
        args.append(tvm.runtime.tensor(np.random.rand(*shape).astype(str(param.ty.dtype)), dev))
    timer = lib.mod.time_evaluator("main", dev, number=10, repeat=blocks)
    return float(min(timer(*args).results)) * 1e3


def throughput(trials: int, build_timeout: float) -> None:
    target = load_board("host").tvm_target()
    task = conv_task(*VGG["conv5_1"], target)
    print(f"\nthroughput: VGG-19 conv5_1, {trials} trials each")
    ours_wall, ours_trials, _ = run_edgecomp(task, trials)
    time.sleep(2)
    stock_wall, stock_trials, _ = run_stock(task, trials, build_timeout)
    ours = ours_trials / ours_wall * 60
    stock = stock_trials / stock_wall * 60
    print(f"  edgecomp tune --local: {ours_trials} trials in {ours_wall:.0f} s = {ours:.1f}/min")
    print(
        f"  stock ms.tune_tir (LocalBuilder timeout {build_timeout:g} s): {stock_trials} trials"
        f" in {stock_wall:.0f} s = {stock:.1f}/min"
    )
    print(f"  ratio {ours / stock:.2f}x (goal >= 5x)")


def quality(trials: int, build_timeout: float) -> None:
    target = load_board("host").tvm_target()
    print(f"\nsearch quality: {trials} trials per layer and space; ms, best of 5 blocks")
    print(
        f"  {'layer':8} {'default':>8} {'edgecomp':>9} {'stock':>8} {'vs stock':>9}"
        f" {'vs default':>11}"
    )
    for name, (c, k, hw) in VGG.items():
        task = conv_task(c, k, hw, target)
        (default,) = default_schedules([task], target)
        _, _, ours = run_edgecomp(task, trials)
        _, _, stock = run_stock(task, trials, build_timeout)
        time.sleep(2)
        t_default = time_schedule(default)
        time.sleep(1)
        t_ours = time_schedule(ours) if ours is not None else float("nan")
        time.sleep(1)
        t_stock = time_schedule(stock) if stock is not None else float("nan")
        print(
            f"  {name:8} {t_default:8.3f} {t_ours:9.3f} {t_stock:8.3f} {t_stock / t_ours:8.2f}x"
            f" {t_default / t_ours:10.2f}x"
        )
    print("  goals: edgecomp >= 1.2x faster than stock, >= 1.1x faster than its default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["throughput", "quality", "all"], default="all")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--stock-build-timeout", type=float, default=120.0)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; {os.environ['TVM_NUM_THREADS']} threads")
    if args.part in ("throughput", "all"):
        throughput(args.trials, args.stock_build_timeout)
    if args.part in ("quality", "all"):
        quality(args.trials, args.stock_build_timeout)


if __name__ == "__main__":
    main()
