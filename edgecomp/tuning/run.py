"""``edgecomp tune``: search edgecomp's kernel schedules with MetaSchedule, measured on a device.

The tasks are exactly the kernels ``edgecomp compile`` builds: the prim funcs of the lowered
module before scheduling (:func:`edgecomp.pipeline.lower_unscheduled`). Each task's design
space is its edgecomp rule run with ``tunable=True`` (the knobs sit beside each kernel's
compute and rule; their defaults are today's cost model), searched by MetaSchedule's
evolutionary search with its XGBoost cost model.

How a run goes:

1. every task's default schedule is measured first and committed as a record, so the search
   starts from it and ``compile --tuning-db`` never picks anything slower;
2. the trial budget is shared out by each task's share of the model's time (default time x
   calls), then spent task by task in batches;
3. candidates are built on this machine by a pool of warm workers (TVM imported once per
   worker), cross-linked for the board, and measured on the device(s): directly (``--rpc``),
   through a tracker by key (``--tracker --key``, every free device measuring in parallel) or
   on this machine (``--local``).

The work dir is append-only and safe to interrupt: ``database_*.json`` (MetaSchedule's JSON
database, one flushed line per record), ``trials.jsonl`` (one line per measured candidate,
which a rerun replays instead of measuring again), ``cost_model.tar`` (the XGBoost model,
saved after every task and on Ctrl-C) and ``edgecomp-tune.json`` (the board and target it
belongs to). Ctrl-C stops after the batch in flight, a second one at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from edgecomp.errors import EdgecompError
from edgecomp.progress import console, step
from edgecomp.targets import Board, load_board
from edgecomp.tuning.measure import (
    Devices,
    MemoRunner,
    WarmBuilder,
    candidate_hash,
    make_runner,
    seconds,
)
from edgecomp.tuning.search import (
    Task,
    best_tiles,
    budget_weight,
    default_schedules,
    load_cost_model,
    model_ms,
    no_tensor_intrinsics,
    save_cost_model,
    variant_tasks,
)
from edgecomp.tuning.workdir import COST_MODEL_FILE, RECORDS_FILE, WorkDir

BATCH = 16  # candidates per search iteration


# ----------------------------------------------------------------------------- tuning
@derived_object
class Progress(ms.measure_callback.PyMeasureCallback):
    """Records every newly measured candidate (trials log, and the database when it ran),
    prints a line per batch, and stops the run when no device is left. Candidates an earlier
    run measured (answered from the memo) are neither counted nor recorded again."""

    def __init__(self, run: TuneRun, task: Task, database: Any) -> None:
        super().__init__()
        self.run = run
        self.task = task
        self.database = database

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):  # noqa: ANN001, ANN201
        run, task = self.run, self.task
        device_errors, measured = [], 0
        for cand, built, ran in zip(
            measure_candidates, builder_results, runner_results, strict=True
        ):
            digest = candidate_hash(cand.sch.mod)
            if digest in run.work.memo:
                continue
            secs = seconds(ran) if built.error_msg is None else None
            if secs is None and run.interrupted:
                continue  # maybe killed by the Ctrl-C (a terminal's reaches the workers)
            measured += 1
            if built.error_msg is None and ran.error_msg is not None:
                device_errors.append(str(ran.error_msg).strip().splitlines()[-1])
            if secs is not None:
                workload = self.database.commit_workload(task.mod)
                self.database.commit_tuning_record(
                    ms.database.TuningRecord(
                        cand.sch.trace, workload, [secs], run.target, cand.args_info
                    )
                )
            run.work.log(task.key, digest, secs)
        if measured:
            task.best_ms = run.work.best[task.key] * 1e3 if task.key in run.work.best else None
            run.report(task, measured, device_errors)
        if run.interrupted:
            raise Interrupted("interrupted")  # this batch's records are kept: a safe point
        if device_errors and len(device_errors) == measured:
            run.check_devices_left()


class DevicesGone(EdgecompError):
    """Every device of the run stopped answering."""


class Interrupted(Exception):  # noqa: N818 - raised through MetaSchedule, read as Ctrl-C
    """Raised after the batch in flight when Ctrl-C was pressed during it."""


class TuneRun:
    """One ``edgecomp tune`` run (see the module's docstring)."""

    def __init__(self, board: Board, work: WorkDir, devices: Devices, trials: int) -> None:
        self.board, self.work, self.devices, self.trials = board, work, devices, trials
        self.target = board.tvm_target()
        self.start = time.monotonic()
        self.done_here = 0
        self.done_before = sum(work.trials.values())
        self.interrupted = False

    @contextmanager
    def catching_sigint(self) -> Iterator[None]:
        """A first Ctrl-C stops the search after the batch in flight (:class:`Progress`
        records it, then raises); a second one exits at once. A KeyboardInterrupt raised
        wherever the main thread is inside MetaSchedule's C++ can be swallowed (as a failed
        mutation) or crash the process, so neither raises there."""
        import signal

        def on_sigint(signum: int, frame: Any) -> None:
            if self.interrupted:  # records are flushed line by line: nothing to tidy up
                console.print(
                    f"interrupted again: stopped now; the records measured so far are kept"
                    f" in {self.work.path}: run the same command again to resume"
                )
                os._exit(130)
            self.interrupted = True
            console.print(
                "Ctrl-C: stopping after the batch being measured, to keep its records"
                " (Ctrl-C again to stop now)"
            )

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def report(self, task: Task, measured: int, device_errors: list[str]) -> None:
        """One line per batch: trials of N, the task's best against its default, time."""
        task.trials += measured
        self.done_here += measured
        done = self.done_before + self.done_here
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done_here * max(self.trials - done, 0)
        best = f"{task.best_ms:.3f} ms" if task.best_ms is not None else "-"
        default = f"{task.default_ms:.3f} ms" if task.default_ms else "-"
        speedup = (
            f" ({task.default_ms / task.best_ms:.2f}x)" if task.default_ms and task.best_ms else ""
        )
        console.print(
            f"trials {done}/{self.trials}  {task.name}: {task.trials}/{task.budget},"
            f" best {best} vs default {default}{speedup}"
            f"  [{elapsed:.0f} s spent, ~{left:.0f} s left]"
        )
        if device_errors:
            console.print(
                f"[yellow]{len(device_errors)} of {measured} candidates failed on the device:"
                f"[/yellow] {device_errors[0]}"
            )

    def check_devices_left(self) -> None:
        """Stop the run, keeping every record, when no device answers any more."""
        if self.devices.local:
            return
        from edgecomp.rpc import connect, list_devices

        try:
            if self.devices.tracker is not None:
                left = [
                    d for d in list_devices(self.devices.tracker) if d["key"] == self.devices.key
                ]
                if left:
                    return
            else:
                connect(rpc=self.devices.rpc, timeout=10).get_function("runtime.GetDeviceAttr")
                return
        except EdgecompError:
            pass
        raise DevicesGone(
            f"every device at {self.devices.describe()} is gone; the records measured so far"
            f" are kept in {self.work.path}: run the same command again to resume"
        )


def _measure_defaults(
    run: TuneRun, tasks: list[Task], builder: Any, runner: Any, database: Any
) -> None:
    todo = [t for t in tasks if t.key not in run.work.defaults]
    for task in tasks:
        if run.work.defaults.get(task.key) is not None:
            task.default_ms = run.work.defaults[task.key] * 1e3  # type: ignore[operator]
        if task.key in run.work.best:
            task.best_ms = run.work.best[task.key] * 1e3
    if not todo:
        return
    with step(f"measuring the default schedules of {len(todo)} tasks on {run.devices.describe()}"):
        schedules = default_schedules(todo, run.target)
        inputs = [ms.builder.BuilderInput(s.mod, run.target) for s in schedules]
        built = builder.build(inputs)
        args = [ms.arg_info.ArgInfo.from_entry_func(s.mod) for s in schedules]
        runnable = [
            ms.runner.RunnerInput(b.artifact_path, "cpu", a)
            for b, a in zip(built, args, strict=True)
            if b.error_msg is None
        ]
        results = iter(f.result() for f in runner.run(runnable))
        for task, sch, b, a in zip(todo, schedules, built, args, strict=True):
            if b.error_msg is not None:
                raise RuntimeError(
                    f"the default schedule of {task.name} does not build: {b.error_msg}"
                )
            result = next(results)
            secs = seconds(result)
            if secs is None:
                raise EdgecompError(
                    f"measuring {task.name} on {run.devices.describe()} failed:"
                    f" {str(result.error_msg).strip().splitlines()[-1]}"
                )
            workload = database.commit_workload(task.mod)
            database.commit_tuning_record(
                ms.database.TuningRecord(sch.trace, workload, [secs], run.target, a)
            )
            run.work.log(task.key, candidate_hash(sch.mod), secs, default=True)
            task.default_ms = task.best_ms = secs * 1e3


def _share_budget(tasks: list[Task], trials: int, done: dict[int, int]) -> None:
    """Trials per task in proportion to its claim (:func:`budget_weight`: its share of the
    model's time), in whole batches, heaviest first; the rounding's rest to the heaviest."""
    weights = [budget_weight(t, tasks) for t in tasks]
    total = sum(weights) or 1.0
    left = trials
    # Equal claims (a convolution's tile variants): the fastest by default first.
    order = sorted(range(len(tasks)), key=lambda i: (-weights[i], tasks[i].default_ms or 0.0))
    for i in order:
        share = trials * weights[i] / total
        tasks[i].budget = min(left, int(share / BATCH + 0.5) * BATCH)
        tasks[i].trials = done.get(tasks[i].key, 0)
        left -= tasks[i].budget
    tasks[order[0]].budget += left


@dataclass
class TuneResult:
    """What a run produced: the tasks with default and best times, and the work dir."""

    tasks: list[Task]
    work_dir: Path
    resumed: bool

    def expected_gain(self) -> float:
        """Model time in these kernels: the cost model's tiles and default schedules / the
        chosen tiles and best schedules (calls counted)."""
        tuned = model_ms(self.tasks, best_tiles(self.tasks))
        return model_ms(self.tasks, None) / tuned if tuned else 1.0


def tune(
    model_path: str | os.PathLike[str],
    board: str | Board,
    work_dir: str | os.PathLike[str],
    trials: int,
    devices: Devices,
    *,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    decompose: Any = None,
    builders: int | None = None,
) -> TuneResult:
    """Tune the kernels ``edgecomp compile`` would build for ``model_path`` on ``board``.

    Parameters
    ----------
    trials
        The total trial budget of the work dir (a rerun continues towards it).
    devices
        Where to measure (:class:`Devices`).
    decompose
        :class:`edgecomp.build.DecomposeOptions`, as for compile: the tasks are its kernels.
    builders
        Build workers (default: this machine's cores).
    """
    from edgecomp.build import import_model

    board = board if isinstance(board, Board) else load_board(board)
    if trials < 1:
        raise EdgecompError("--trials must be at least 1")
    work = WorkDir.open(work_dir, board)
    if work.memo:
        records = (
            len((work.path / RECORDS_FILE).read_text().splitlines())
            if (work.path / RECORDS_FILE).is_file()
            else 0
        )
        console.print(
            f"resuming: {sum(work.trials.values())} trials and {records} records found"
            f" in {work.path}"
        )
    board.fcompile()  # a missing toolchain fails before the long work
    devices.check(board)
    mod, _, _ = import_model(model_path, input_shapes, decompose)
    target = board.tvm_target()
    with step("extracting the kernels to tune (the convolutions with their best register tiles)"):
        refuse = getattr(decompose, "refuse", "auto") if decompose is not None else "auto"
        tasks = variant_tasks(mod, target, refuse)
    if not tasks:
        raise EdgecompError(f"{model_path}: no kernel of edgecomp's to tune in this model")
    return tune_kernels(tasks, board, work, trials, devices, builders)


def tune_kernels(
    tasks: list[Task],
    board: Board,
    work: WorkDir,
    trials: int,
    devices: Devices,
    builders: int | None = None,
) -> TuneResult:
    """Measure the tasks' defaults, then spend ``trials`` on them (see the module docstring)."""
    resumed = bool(work.memo)
    fcompile = board.fcompile()
    run = TuneRun(board, work, devices, trials)
    workers = devices.count()
    builder = WarmBuilder(fcompile, builders or os.cpu_count() or 1, work.memo)
    runner = MemoRunner(make_runner(devices, max(workers, 1)))
    database = ms.database.JSONDatabase(work_dir=str(work.path), module_equality="structural")
    console.print(
        f"{len(tasks)} kernels to tune on {devices.describe()} ({workers} device(s)),"
        f" {trials} trials, work dir {work.path}"
    )
    _measure_defaults(run, tasks, builder, runner, database)
    work.save_tiles(best_tiles(tasks))
    _share_budget(tasks, trials, work.trials)
    cost_model = ms.cost_model.XGBModel(num_tuning_cores=os.cpu_count() or 1)
    model_file = work.path / COST_MODEL_FILE
    if model_file.is_file():
        load_cost_model(cost_model, model_file)
    carry = 0  # trials a task's exhausted space left for the next task
    try:
        for task in sorted(tasks, key=lambda t: (-budget_weight(t, tasks), t.default_ms or 0.0)):
            task.budget += carry
            try:
                with run.catching_sigint():
                    _search(run, task, builder, runner, database, cost_model)
            finally:
                save_cost_model(cost_model, work.path / COST_MODEL_FILE)
                work.save_tiles(best_tiles(tasks))
            if run.interrupted:
                raise KeyboardInterrupt
            carry = max(task.budget - task.trials, 0)
            task.budget = min(task.budget, task.trials)
    except KeyboardInterrupt:
        console.print(
            f"interrupted: the records measured so far are kept in {work.path};"
            " run the same command again to resume"
        )
        raise
    return TuneResult(tasks, work.path, resumed)


def _search(
    run: TuneRun, task: Task, builder: Any, runner: Any, database: Any, cost_model: Any
) -> None:
    """Spend the task's budget with MetaSchedule's evolutionary search; again while a round
    measured something new (a resumed search first proposes what the memo answers)."""
    while task.trials < task.budget:
        before = task.trials
        left = task.budget - task.trials
        with no_tensor_intrinsics():
            context = ms.TuneContext(
                mod=task.mod,
                target=run.target,
                space_generator=task.space(run.target),
                search_strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=64, init_min_unmeasured=16, genetic_num_iters=2
                ),
                task_name=task.name,
                num_threads=os.cpu_count() or 1,
            )
        try:
            ms.tune_tasks(
                tasks=[context],
                task_weights=[1.0],
                work_dir=str(run.work.path),
                max_trials_global=left,
                num_trials_per_iter=min(BATCH, left),
                builder=builder,
                runner=runner,
                database=database,
                cost_model=cost_model,
                measure_callbacks=[
                    Progress(run, task, database),
                    ms.measure_callback.RemoveBuildArtifact(),
                    ms.measure_callback.UpdateCostModel(),
                ],
                task_scheduler="round-robin",
            )
        except Exception as err:  # noqa: BLE001 - MetaSchedule wraps what a callback raises
            gone = _devices_gone(err)
            if gone is not None:
                raise gone from None
            if run.interrupted:  # Interrupted, or a second Ctrl-C, surfaces as a TVM error
                raise KeyboardInterrupt from None
            raise
        if task.trials == before:
            return  # its space is exhausted


def _devices_gone(err: BaseException) -> DevicesGone | None:
    text = str(err)
    if "every device at" in text and "is gone" in text:
        line = next(ln for ln in text.splitlines() if "is gone" in ln)
        return DevicesGone(line[line.index("every device at") :])
    return None


def format_table(result: TuneResult) -> str:
    """Per task: calls, default ms, tuned ms, speed-up (``*``: the register tile chosen for
    its convolution); then the model's expected gain in these kernels."""
    chosen = best_tiles(result.tasks)
    rows = [
        f"{'kernel':50} {'calls':>5} {'default ms':>11} {'tuned ms':>9} {'speed-up':>8}"
        f" {'trials':>6}"
    ]
    for t in sorted(result.tasks, key=lambda t: (t.conv or "", -(t.default_ms or 0) * t.calls)):
        best = min(t.best_ms or t.default_ms or 0.0, t.default_ms or 0.0)
        speed = (t.default_ms or 0.0) / best if best else 1.0
        mark = "*" if t.conv is not None and chosen.get(t.conv) == t.tiles else " "
        rows.append(
            f"{mark}{t.name[:49]:49} {t.calls:5d} {t.default_ms or 0:11.3f} {best:9.3f}"
            f" {speed:7.2f}x {t.trials:6d}"
        )
    rows.append(
        f"* the register tile chosen for the convolution. Expected end-to-end gain in these"
        f" kernels: {result.expected_gain():.2f}x (apply with: edgecomp compile ..."
        f" --tuning-db {result.work_dir})"
    )
    return "\n".join(rows)
