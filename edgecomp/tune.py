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
saved after every batch) and ``edgecomp-tune.json`` (the board and target it belongs to).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from edgecomp.errors import EdgecompError
from edgecomp.progress import console, step
from edgecomp.targets import Board, load_board

WORK_FILE = "edgecomp-tune.json"
TRIALS_FILE = "trials.jsonl"
COST_MODEL_FILE = "cost_model.tar"
WORKLOADS_FILE = "database_workload.json"
RECORDS_FILE = "database_tuning_record.json"
BATCH = 16  # candidates per search iteration
BUILD_TIMEOUT = 120.0  # seconds for one candidate's build on this machine


# ----------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class Devices:
    """Where candidates run: ``rpc`` (HOST:PORT), ``tracker`` + ``key``, or ``local``."""

    rpc: str | None = None
    tracker: str | None = None
    key: str | None = None
    local: bool = False
    # Seconds a candidate may wait for a free device, and a measuring session may last.
    device_wait: float = 60.0
    session_timeout: float = 120.0

    def describe(self) -> str:
        """``this machine``, ``127.0.0.1:9090`` or ``key 'rasp4b' at 127.0.0.1:9190``."""
        if self.local:
            return "this machine"
        return self.rpc or f"key {self.key!r} at the tracker {self.tracker}"

    def count(self) -> int:
        """How many devices measure in parallel (those under the key, now)."""
        if self.tracker is None or self.key is None:
            return 1
        from edgecomp.rpc import wait_for_devices

        return wait_for_devices(self.tracker, self.key, timeout=0, min_free=0)

    def check(self, board: Board) -> None:
        """Fail now, with what to do, when the devices cannot run ``board``'s code."""
        if self.local:
            if not board.is_host:
                raise EdgecompError(
                    f"--local measures on this machine, which cannot run board {board.name!r}"
                    " code: use --target host, or reach the board with --rpc or --tracker/--key"
                )
            return
        if board.is_host:
            raise EdgecompError("board 'host' runs on this machine: tune it with --local")
        from edgecomp.rpc import connect, device_arch, wait_for_devices

        if self.tracker is not None and self.key is not None:
            wait_for_devices(self.tracker, self.key, timeout=self.device_wait)
        session = connect(
            rpc=self.rpc, tracker=self.tracker, key=self.key, timeout=self.device_wait
        )
        arch = device_arch(session)
        if arch is not None and arch != board.arch:
            raise EdgecompError(
                f"the device at {self.describe()} is {arch}, board {board.name!r} is {board.arch}"
            )


def _create_session(devices: Devices, _config: Any) -> Any:
    """The RPC runner's session factory: bounded in time, never a hang (see rpc.connect)."""
    from edgecomp.rpc import connect

    return connect(
        rpc=devices.rpc,
        tracker=devices.tracker,
        key=devices.key,
        timeout=devices.device_wait,
        session_timeout=devices.session_timeout,
    )


def _make_runner(devices: Devices, workers: int) -> ms.runner.Runner:
    evaluator = ms.runner.EvaluatorConfig(
        number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False
    )
    if devices.local:
        return ms.runner.LocalRunner(
            evaluator_config=evaluator, timeout_sec=devices.session_timeout
        )
    import functools

    from tvm.support.popen_pool import PopenPoolExecutor

    host, port = (devices.tracker or devices.rpc or ":0").rsplit(":", 1)
    config = ms.runner.RPCConfig(
        tracker_host=host,
        tracker_port=int(port),
        tracker_key=devices.key or "",
        session_timeout_sec=int(devices.session_timeout),
    )
    runner = ms.runner.RPCRunner(
        config,
        evaluator,
        f_create_session=functools.partial(_create_session, devices),
        max_workers=workers,
    )
    # The stock pool has no timeout: a device that stops answering would hang the run.
    runner.pool = PopenPoolExecutor(
        max_workers=workers, timeout=devices.device_wait + devices.session_timeout
    )
    return runner


# ----------------------------------------------------------------------------- builder
def _build_candidate(mod: tvm.IRModule, target: tvm.target.Target, fcompile: Any) -> str:
    """Build one candidate in a warm worker; return the path of its shared library."""
    from tvm.driver import build as tvm_build

    folder = tempfile.mkdtemp(prefix="edgecomp-candidate-")
    path = os.path.join(folder, "kernel.so")
    tvm_build(mod, target=target).export_library(path, fcompile=fcompile)
    return path


@derived_object
class WarmBuilder(ms.builder.PyBuilder):
    """Builds candidates in a pool whose workers live for the whole run: TVM is imported once
    per worker (about 3 s), not once per batch as ``LocalBuilder`` does; its build function
    also skips ``tvm.s_tir.tensor_intrin`` (45-63 s to import here, past the stock timeout).

    A candidate the ``memo`` already measured (an earlier run of the same work dir) is not
    built: its artifact is a marker the :class:`MemoRunner` answers from the memo.
    """

    def __init__(self, fcompile: Any, workers: int, memo: dict[int, float | None]) -> None:
        from tvm.support.popen_pool import PopenPoolExecutor

        super().__init__()
        self.fcompile = fcompile
        self.memo = memo
        self.pool = PopenPoolExecutor(max_workers=workers, timeout=BUILD_TIMEOUT)

    def build(self, build_inputs: list[ms.builder.BuilderInput]) -> list[ms.builder.BuilderResult]:
        from tvm.support.popen_pool import StatusKind

        results: list[ms.builder.BuilderResult | None] = [None] * len(build_inputs)
        todo = []
        for i, inp in enumerate(build_inputs):
            digest = candidate_hash(inp.mod)
            if digest in self.memo:
                # RemoveBuildArtifact deletes the artifact's folder: one folder per marker.
                marker = Path(tempfile.mkdtemp(prefix="edgecomp-memo-")) / f"{digest}.memo"
                marker.write_text(json.dumps(self.memo[digest]))
                results[i] = ms.builder.BuilderResult(str(marker), None)
            else:
                todo.append(i)
        args = [(build_inputs[i].mod, build_inputs[i].target, self.fcompile) for i in todo]
        for i, res in zip(
            todo,
            self.pool.map_with_error_catching(lambda a: _build_candidate(*a), args),
            strict=True,
        ):
            if res.status == StatusKind.COMPLETE:
                results[i] = ms.builder.BuilderResult(res.value, None)
            elif res.status == StatusKind.TIMEOUT:
                results[i] = ms.builder.BuilderResult(
                    None, f"build timed out after {BUILD_TIMEOUT:g} s"
                )
            else:
                results[i] = ms.builder.BuilderResult(None, f"build failed: {res.value}")
        return [r for r in results if r is not None]


@derived_object
class _Done(ms.runner.PyRunnerFuture):
    def __init__(self, result: ms.runner.RunnerResult) -> None:
        super().__init__()
        self.value = result

    def done(self) -> bool:
        return True

    def result(self) -> ms.runner.RunnerResult:
        return self.value


@derived_object
class MemoRunner(ms.runner.PyRunner):
    """Answers candidates measured in an earlier run from the memo; runs the others."""

    def __init__(self, inner: ms.runner.Runner) -> None:
        super().__init__()
        self.inner = inner

    def run(self, runner_inputs: list[ms.runner.RunnerInput]) -> list[ms.runner.RunnerFuture]:
        futures: list[Any] = [None] * len(runner_inputs)
        todo = []
        for i, inp in enumerate(runner_inputs):
            path = str(inp.artifact_path)
            if path.endswith(".memo"):
                secs = json.loads(Path(path).read_text())
                error = None if secs is not None else "failed in an earlier run (memo)"
                futures[i] = _Done(ms.runner.RunnerResult([secs] if secs else None, error))
            else:
                todo.append(i)
        if todo:
            for i, fut in zip(todo, self.inner.run([runner_inputs[i] for i in todo]), strict=True):
                futures[i] = fut
        return futures


# ----------------------------------------------------------------------------- search
@derived_object
class MutateCategorical(ms.mutator.PyMutator):
    """Changes one ``sample_categorical`` decision (MetaSchedule's mutators only change tile
    sizes); brings its own randomness (the seed from C++ does not advance)."""

    def __init__(self, seed: float = 0.0) -> None:
        super().__init__()
        self.rng = random.Random(seed)

    def _initialize_with_tune_context(self, context: ms.TuneContext) -> None:
        pass

    def apply(self, trace: Any, _seed: int) -> Any:
        insts = [i for i in trace.insts if i.kind.name == "SampleCategorical"]
        if not insts:
            return None
        inst = self.rng.choice(insts)
        old = int(trace.decisions[inst])
        others = [j for j in range(len(inst.attrs[0])) if j != old]
        if not others:
            return None
        return trace.with_decision(inst, self.rng.choice(others), remove_postproc=True)

    def clone(self) -> MutateCategorical:
        return MutateCategorical(self.rng.random())


def candidate_hash(mod: tvm.IRModule) -> int:
    """A candidate's identity across runs: the structural hash of its scheduled module."""
    return int(tvm_ffi.structural_hash(mod))


@dataclass
class Task:
    """One kernel to tune: a prim func of the lowered model and how often the model calls it."""

    name: str
    mod: tvm.IRModule
    calls: int
    key: int
    default_ms: float | None = None
    best_ms: float | None = None
    trials: int = 0
    budget: int = 0

    def space(self, target: tvm.target.Target) -> ms.space_generator.ScheduleFn:
        """The task's design space: its edgecomp rule with ``tunable=True``."""
        from edgecomp.kernels import default_rules

        rules = default_rules(target)

        def schedule(sch: tvm.s_tir.Schedule) -> tvm.s_tir.Schedule:
            func = sch.mod["main"]
            for rule in rules:
                tuned = rule.apply(func, target, True)
                if tuned is not None:
                    return tuned
            return sch

        return ms.space_generator.ScheduleFn(
            schedule,
            sch_rules=[],
            postprocs=[],
            mutator_probs={ms.mutator.MutateTileSize(): 0.7, MutateCategorical(): 0.3},
        )


def kernel_tasks(mod: tvm.IRModule, target: tvm.target.Target) -> list[Task]:
    """The tunable tasks of a lowered, unscheduled module: every prim func an edgecomp kernel
    rule owns (convolutions, depthwise, fused chains, matmuls), with its call count."""
    from edgecomp.kernels import tunable

    tasks = []
    for extracted in ms.relax_integration.extract_tasks(mod, target):
        task_mod = extracted.dispatched[0]
        if not tunable(task_mod["main"], target):
            continue
        key = int(tvm_ffi.structural_hash(task_mod))
        tasks.append(Task(str(extracted.task_name), task_mod, int(extracted.weight), key))
    return tasks


# ----------------------------------------------------------------------------- work dir
@dataclass
class WorkDir:
    """The tuning work dir: its database, measured candidates and cost model."""

    path: Path
    board: str
    memo: dict[int, float | None] = field(default_factory=dict)
    trials: dict[int, int] = field(default_factory=dict)  # task key -> search trials done
    defaults: dict[int, float | None] = field(default_factory=dict)  # task key -> default s
    best: dict[int, float] = field(default_factory=dict)  # task key -> best seconds so far

    @classmethod
    def open(cls, path: str | os.PathLike[str], board: Board) -> WorkDir:
        """Create the work dir for ``board``, or reopen it (refusing another board's)."""
        folder = Path(path)
        meta = folder / WORK_FILE
        target = str(board.tvm_target())
        if meta.is_file():
            info = json.loads(meta.read_text())
            if info.get("board") != board.name:
                raise EdgecompError(
                    f"work dir {folder} holds tuning for board {info.get('board')!r}, not"
                    f" {board.name!r}: use another --work-dir"
                )
        else:
            folder.mkdir(parents=True, exist_ok=True)
            if any(folder.iterdir()):
                raise EdgecompError(
                    f"--work-dir {folder} is not empty and was not made by edgecomp tune"
                )
            meta.write_text(json.dumps({"board": board.name, "target": target}, indent=1) + "\n")
        work = cls(folder, board.name)
        repair_database(folder)
        trials = folder / TRIALS_FILE
        if trials.is_file():
            for line in trials.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash: that candidate is measured again
                work._count(int(row["task"]), int(row["candidate"]), row["secs"], row["default"])
        return work

    def log(self, task: int, candidate: int, secs: float | None, default: bool = False) -> None:
        """Append one measured candidate (flushed: a crash loses at most the line in flight)."""
        row = {"task": str(task), "candidate": str(candidate), "secs": secs, "default": default}
        with open(self.path / TRIALS_FILE, "a") as out:
            out.write(json.dumps(row) + "\n")
            out.flush()
            os.fsync(out.fileno())
        self._count(task, candidate, secs, default)

    def _count(self, task: int, candidate: int, secs: float | None, default: bool) -> None:
        self.memo[candidate] = secs
        if default:
            self.defaults[task] = secs
        else:
            self.trials[task] = self.trials.get(task, 0) + 1
        if secs is not None and secs < self.best.get(task, math.inf):
            self.best[task] = secs


def repair_database(folder: Path) -> tuple[int, int, list[str]]:
    """Drop torn or corrupt lines from a JSON database in place; return (workloads, records,
    warnings). Records of a dropped workload go too; the others are re-indexed."""
    workloads_path, records_path = folder / WORKLOADS_FILE, folder / RECORDS_FILE
    if not workloads_path.is_file():
        return 0, 0, []
    warnings: list[str] = []
    index: dict[int, int] = {}
    workloads: list[str] = []
    for i, line in enumerate(workloads_path.read_text().splitlines()):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            warnings.append(f"{workloads_path.name} line {i + 1}: not JSON, skipped")
            continue
        index[i] = len(workloads)
        workloads.append(line)
    records: list[str] = []
    lines = records_path.read_text().splitlines() if records_path.is_file() else []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            row[0] = index[int(row[0])]
            assert isinstance(row[1], list) and len(row[1]) >= 2
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError, AssertionError):
            warnings.append(f"{records_path.name} line {i + 1}: corrupt record, skipped")
            continue
        records.append(json.dumps(row))
    if warnings:
        workloads_path.write_text("".join(w + "\n" for w in workloads))
        records_path.write_text("".join(r + "\n" for r in records))
    return len(workloads), len(records), warnings


def open_database(path: str | os.PathLike[str], board: Board) -> tuple[Any, dict[str, Any]]:
    """A tuning database (``edgecomp tune``'s work dir, or a folder of shipped records) for
    ``compile``: loaded from a cleaned copy, corrupt lines skipped with a warning. Returns
    the database and what the manifest records of it (path, board, records, digest)."""
    import shutil

    folder = Path(path)
    if not (folder / WORKLOADS_FILE).is_file():
        raise EdgecompError(
            f"--tuning-db {folder}: no tuning database there ({WORKLOADS_FILE} missing);"
            " give the --work-dir of an edgecomp tune run"
        )
    meta = folder / WORK_FILE
    if meta.is_file():
        made_for = json.loads(meta.read_text()).get("board")
        if made_for != board.name:
            raise EdgecompError(
                f"--tuning-db {folder} was tuned for board {made_for!r}, not {board.name!r}"
            )
    copy = Path(tempfile.mkdtemp(prefix="edgecomp-db-"))
    for name in (WORKLOADS_FILE, RECORDS_FILE):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, copy / name)
    _, records, warnings = repair_database(copy)
    for warning in warnings:
        console.print(f"[yellow]warning[/yellow]: --tuning-db {folder}: {warning}")
    digest = hashlib.sha256()
    for name in (WORKLOADS_FILE, RECORDS_FILE):
        if (copy / name).is_file():
            digest.update((copy / name).read_bytes())
    database = ms.database.JSONDatabase(work_dir=str(copy), module_equality="structural")
    info = {"path": str(folder), "board": board.name, "records": records}
    info["sha256"] = digest.hexdigest()
    return database, info


def tuning_database(
    path: str | os.PathLike[str] | None, board: Board
) -> tuple[Any, dict[str, Any] | None]:
    """The database ``compile`` applies: ``path`` when given, else the records shipped for
    the board in ``schedules/BOARD`` (measured on a real board), else none."""
    if path is None:
        from edgecomp.resources import data_dir

        shipped = data_dir("schedules") / board.name
        if not (shipped / WORKLOADS_FILE).is_file():
            return None, None
        path = shipped
    return open_database(path, board)


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
            measured += 1
            secs = _seconds(ran) if built.error_msg is None else None
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
        if not measured:
            return  # the search found nothing new this round
        task.best_ms = run.work.best[task.key] * 1e3 if task.key in run.work.best else None
        run.report(task, measured, device_errors)
        if device_errors and len(device_errors) == measured:
            run.check_devices_left()


def _seconds(result: ms.runner.RunnerResult) -> float | None:
    if result.error_msg is not None or not result.run_secs:
        return None
    secs = [float(s) for s in result.run_secs]
    return None if min(secs) >= 1e9 else min(secs)


class DevicesGone(EdgecompError):
    """Every device of the run stopped answering."""


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
        """Remember a Ctrl-C (MetaSchedule turns it into a bare RuntimeError) and raise it."""
        import signal

        def on_sigint(signum: int, frame: Any) -> None:
            self.interrupted = True
            raise KeyboardInterrupt

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


def _default_schedules(tasks: list[Task], target: tvm.target.Target) -> list[Any]:
    """Each task's schedule at its space's default point (= an untuned compile's)."""
    from edgecomp.kernels import default_rules

    rules = default_rules(target)
    schedules = []
    for task in tasks:
        func = task.mod["main"]
        sch = next(s for s in (r.apply(func, target, True) for r in rules) if s is not None)
        schedules.append(sch)
    return schedules


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
        schedules = _default_schedules(todo, run.target)
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
            secs = _seconds(result)
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
    """Trials per task in proportion to its share of the model's time (default x calls),
    in whole batches; tasks under a batch's worth of share get none."""
    weights = [(t.default_ms or 0.0) * t.calls for t in tasks]
    total = sum(weights) or 1.0
    for task, weight in zip(tasks, weights, strict=True):
        share = trials * weight / total
        task.budget = int(math.floor(share / BATCH + 0.5)) * BATCH
        task.trials = done.get(task.key, 0)
    left = trials - sum(t.budget for t in tasks)
    if left > 0:  # rounding: the rest to the heaviest task
        tasks[max(range(len(tasks)), key=lambda i: weights[i])].budget += left


@dataclass
class TuneResult:
    """What a run produced: the tasks with default and best times, and the work dir."""

    tasks: list[Task]
    work_dir: Path
    resumed: bool

    def expected_gain(self) -> float:
        """Model time in the tuned kernels, default / tuned (calls counted)."""
        default = sum(t.default_ms * t.calls for t in self.tasks if t.default_ms)
        tuned = sum(
            min(t.best_ms or t.default_ms, t.default_ms) * t.calls
            for t in self.tasks
            if t.default_ms
        )  # type: ignore[type-var]
        return default / tuned if tuned else 1.0


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
    from edgecomp.pipeline import lower_unscheduled

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
    with step("extracting the kernels to tune"):
        refuse = getattr(decompose, "refuse", "auto") if decompose is not None else "auto"
        tasks = kernel_tasks(lower_unscheduled(mod, target, refuse=refuse), target)
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
    runner = MemoRunner(_make_runner(devices, max(workers, 1)))
    database = ms.database.JSONDatabase(work_dir=str(work.path), module_equality="structural")
    console.print(
        f"{len(tasks)} kernels to tune on {devices.describe()} ({workers} device(s)),"
        f" {trials} trials, work dir {work.path}"
    )
    _measure_defaults(run, tasks, builder, runner, database)
    _share_budget(tasks, trials, work.trials)
    cost_model = ms.cost_model.XGBModel(num_tuning_cores=os.cpu_count() or 1)
    model_file = work.path / COST_MODEL_FILE
    if model_file.is_file():
        _load(cost_model, model_file)
    carry = 0  # trials a task's exhausted space left for the next task
    try:
        for task in sorted(tasks, key=lambda t: -(t.default_ms or 0) * t.calls):
            task.budget += carry
            try:
                with run.catching_sigint():
                    _search(run, task, builder, runner, database, cost_model)
            finally:
                _save(cost_model, work.path / COST_MODEL_FILE)
            carry = max(task.budget - task.trials, 0)
            task.budget = min(task.budget, task.trials)
    except KeyboardInterrupt:
        console.print(
            f"interrupted: the records measured so far are kept in {work.path};"
            " run the same command again to resume"
        )
        raise
    return TuneResult(tasks, work.path, resumed)


@contextmanager
def _no_tensor_intrinsics() -> Iterator[None]:
    """``TuneContext`` imports ``tvm.s_tir.tensor_intrin`` for stock rules that tensorize
    (20-60 s here: it parses hundreds of TVMScript functions); edgecomp's spaces tensorize
    nothing. A stand-in module while a context is made; a later real import still works."""
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    sys.modules[name] = types.ModuleType(name)
    try:
        yield
    finally:
        sys.modules.pop(name, None)
        if getattr(tvm.s_tir, "tensor_intrin", None) is not None:
            delattr(tvm.s_tir, "tensor_intrin")


def _search(
    run: TuneRun, task: Task, builder: Any, runner: Any, database: Any, cost_model: Any
) -> None:
    """Spend the task's budget with MetaSchedule's evolutionary search; again while a round
    measured something new (a resumed search first proposes what the memo answers)."""
    while task.trials < task.budget:
        before = task.trials
        left = task.budget - task.trials
        with _no_tensor_intrinsics():
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
            if run.interrupted:  # Ctrl-C inside TVM surfaces as a bare RuntimeError
                raise KeyboardInterrupt from None
            raise
        if task.trials == before:
            return  # its space is exhausted


def _load(cost_model: Any, path: Path) -> None:
    """Restore the cost model's training data (and its booster, once it has trained).

    TVM 0.27's ``XGBModel.load`` fails on a model saved before its first training (no booster
    file: an unbound local); its data is then read here."""
    import warnings
    from collections import OrderedDict

    import numpy as np
    from tvm.s_tir.meta_schedule.cost_model.xgb_model import FeatureGroup
    from tvm.support.tar import untar

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # xgboost guessing the format of its own file
        try:
            cost_model.load(str(path))
            return
        except Exception:  # noqa: BLE001 - the untrained case, read below
            pass
    data: OrderedDict[str, Any] = OrderedDict()
    with tempfile.TemporaryDirectory() as tmp:
        untar(str(path), tmp)
        rows = np.load(os.path.join(tmp, "data.npy"), allow_pickle=True)
        for group_hash, features, costs in rows:
            data[group_hash] = FeatureGroup(group_hash, list(features), costs)
    cost_model.data = data
    cost_model.data_size = sum(len(g.costs) for g in data.values())
    cost_model.booster = None


def _save(cost_model: Any, path: Path) -> None:
    """Save the cost model with what it learnt (nothing to save before its first batch)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # xgboost's note on its default file format
        try:
            cost_model.save(str(path))
        except Exception:  # noqa: BLE001 - an untrained model has no booster yet
            pass


def _devices_gone(err: BaseException) -> DevicesGone | None:
    text = str(err)
    if "every device at" in text and "is gone" in text:
        line = next(ln for ln in text.splitlines() if "is gone" in ln)
        return DevicesGone(line[line.index("every device at") :])
    return None


def format_table(result: TuneResult) -> str:
    """Per task: calls, default ms, tuned ms, speed-up; then the model's expected gain."""
    rows = [
        f"{'kernel':44} {'calls':>5} {'default ms':>11} {'tuned ms':>9} {'speed-up':>8}"
        f" {'trials':>6}"
    ]
    for t in sorted(result.tasks, key=lambda t: -(t.default_ms or 0) * t.calls):
        best = min(t.best_ms or t.default_ms or 0.0, t.default_ms or 0.0)
        speed = (t.default_ms or 0.0) / best if best else 1.0
        rows.append(
            f"{t.name[:44]:44} {t.calls:5d} {t.default_ms or 0:11.3f} {best:9.3f}"
            f" {speed:7.2f}x {t.trials:6d}"
        )
    rows.append(
        f"expected end-to-end gain in these kernels: {result.expected_gain():.2f}x"
        f" (apply with: edgecomp compile ... --tuning-db {result.work_dir})"
    )
    return "\n".join(rows)
