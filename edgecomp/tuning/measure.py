"""Where and how candidates are built and measured: the devices, a build pool whose workers
stay warm, and a runner that answers what an earlier run measured from its memo."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from edgecomp.errors import EdgecompError
from edgecomp.targets import Board

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


def make_runner(devices: Devices, workers: int) -> ms.runner.Runner:
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


def candidate_hash(mod: tvm.IRModule) -> int:
    """A candidate's identity across runs: the structural hash of its scheduled module."""
    return int(tvm_ffi.structural_hash(mod))


def seconds(result: ms.runner.RunnerResult) -> float | None:
    if result.error_msg is not None or not result.run_secs:
        return None
    secs = [float(s) for s in result.run_secs]
    return None if min(secs) >= 1e9 else min(secs)
