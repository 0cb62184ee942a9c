"""edgecomp tune: real MetaSchedule searches over edgecomp's kernels, measured on this machine
and on emulated devices under a tracker; the work dir, resume, faults, compile --tuning-db."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_clean_error, edgecomp

from edgecomp.device import start_emulated_devices, stop_emulated_devices
from edgecomp.reference import onnxruntime_outputs
from edgecomp.resources import zoo_path
from edgecomp.rpc import free_port, start_tracker
from edgecomp.runner import open_package, read_inputs
from edgecomp.targets import load_board
from edgecomp.tuning import open_database
from edgecomp.tuning.workdir import RECORDS_FILE, TRIALS_FILE

MODEL = str(zoo_path("digits_cnn.onnx"))


def _trials(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / TRIALS_FILE).read_text().splitlines()]


def _searched(work: Path) -> list[str]:
    return [row["candidate"] for row in _trials(work) if not row["default"]]


def _start_tune(log: Path, *args: str) -> subprocess.Popen:
    """``edgecomp tune`` in the background, its stdout and stderr in ``log`` (a pipe left
    unread could fill and stall it)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "edgecomp", "tune", MODEL, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def _finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"edgecomp tune did not finish within {timeout:g} s:\n{log.read_text()}")
    return log.read_text()


def _wait_for(what: str, check, proc: subprocess.Popen, log: Path, timeout: float) -> None:  # noqa: ANN001
    """Wait, bounded, until ``check()``; fail naming ``what`` if it times out or ``proc`` ends."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            pytest.fail(f"edgecomp tune ended before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.5)


def _interrupt_once_searched(log: Path, work: Path, count: int, *args: str) -> subprocess.Popen:
    """Start a run with a budget it cannot reach (400 trials) in ``work``; send it SIGINT
    once ``count`` searched candidates are recorded."""
    proc = _start_tune(log, *args, "--trials", "400", "--work-dir", str(work))
    _wait_for(
        f"{count} searched candidates measured",
        lambda: (work / TRIALS_FILE).is_file() and len(_searched(work)) >= count,
        proc,
        log,
        timeout=400,
    )
    proc.send_signal(signal.SIGINT)
    return proc


def test_tune_here_resume_and_compile_with_the_database(tmp_path):
    work = tmp_path / "work"
    first = edgecomp("tune", MODEL, "--target", "host", "--local", "--trials", "16",
                     "--work-dir", str(work))  # fmt: skip
    assert first.returncode == 0, first.stderr
    # 3 convolutions x their tile variants (some alike) + the matmul, each measured first.
    kernels = int(re.search(r"(\d+) kernels to tune on this machine", first.stderr).group(1))
    assert 4 < kernels <= 10, first.stderr
    assert "Expected end-to-end gain" in first.stdout
    defaults = [row for row in _trials(work) if row["default"]]
    assert len(defaults) == kernels and all(row["secs"] > 0 for row in defaults)
    tiles = json.loads((work / "tiles.json").read_text())
    assert len(tiles) == 3 and all(len(tile) == 3 for tile in tiles.values())
    done = len(_searched(work))
    assert 0 < done <= 16

    again = edgecomp("tune", MODEL, "--target", "host", "--local", "--trials", "32",
                     "--work-dir", str(work))  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"resuming: {done} trials and" in again.stderr
    searched = _searched(work)
    assert len(searched) > done
    assert len(searched) == len(set(searched)), "a candidate was measured twice"
    assert len([row for row in _trials(work) if row["default"]]) == kernels

    # A corrupt line is skipped with a warning; the rest of the database is applied.
    with open(work / RECORDS_FILE, "a") as out:
        out.write('[0, ["not a trace"\n')
    out_dir = tmp_path / "pkg"
    built = edgecomp("compile", MODEL, "--target", "host", "--tuning-db", str(work),
                     "-o", str(out_dir))  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert "corrupt record, skipped" in built.stderr
    assert "tuned schedules applied to 4 of" in built.stderr
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["options"]["tuning_db"]["applied"] == 4
    assert len(manifest["options"]["tuning_db"]["sha256"]) == 64
    checked = edgecomp("run", str(out_dir), "--local", "--check", MODEL)
    assert checked.returncode == 0 and "outputs match ONNX Runtime" in checked.stdout, (
        checked.stdout + checked.stderr
    )


def test_bad_work_dir_database_and_devices_are_one_line_errors(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "edgecomp-tune.json").write_text('{"board": "rasp4b", "target": "llvm"}')
    result = edgecomp("tune", MODEL, "--target", "host", "--local", "--trials", "8",
                      "--work-dir", str(other))  # fmt: skip
    assert_clean_error(result, "holds tuning for board 'rasp4b', not 'host'")

    result = edgecomp("compile", MODEL, "--target", "host", "--tuning-db",
                      str(tmp_path / "missing"), "-o", str(tmp_path / "pkg"))  # fmt: skip
    assert_clean_error(result, "no tuning database there")

    port = free_port()
    result = edgecomp("tune", MODEL, "--target", "rasp4b", "--tracker", f"127.0.0.1:{port}",
                      "--trials", "8", "--work-dir", str(tmp_path / "w1"))  # fmt: skip
    assert_clean_error(result, f"127.0.0.1:{port}")

    tracker_port = free_port()
    tracker = start_tracker(port=tracker_port)
    try:
        start = time.monotonic()
        result = edgecomp("tune", MODEL, "--target", "rasp4b", "--tracker",
                          f"127.0.0.1:{tracker_port}", "--key", "nobody", "--device-wait", "3",
                          "--trials", "8", "--work-dir", str(tmp_path / "w2"))  # fmt: skip
        assert_clean_error(result, "'nobody'")
        assert time.monotonic() - start < 60
    finally:
        tracker.terminate()


def test_tune_stops_after_the_batch_on_ctrl_c_and_at_once_on_a_second(tmp_path):
    work, log = tmp_path / "work", tmp_path / "tune.log"
    proc = _interrupt_once_searched(log, work, 1, "--target", "host", "--local")
    _wait_for("the Ctrl-C message", lambda: "Ctrl-C: stopping" in log.read_text(), proc, log, 60)
    proc.send_signal(signal.SIGINT)  # the batch may have ended first: stopped either way
    out = " ".join(_finish(proc, log, timeout=120).split())  # rich wraps long lines
    assert proc.returncode == 130, out
    assert "run the same command again to resume" in out, out
    database, _, _ = open_database(work, load_board("host"))
    assert len(database) >= len(_searched(work)) >= 1
    assert all(row["secs"] is not None for row in _trials(work)), out


@pytest.mark.device
def test_tune_on_two_emulated_devices_survives_sigint_and_a_dead_device(tmp_path):
    board = load_board("rasp4b")
    tracker_port = free_port()
    tracker = start_tracker(port=tracker_port)
    address, key = f"127.0.0.1:{tracker_port}", f"tune{os.getpid()}"
    devices = start_emulated_devices(board, 2, port=None, tracker=address, key=key)
    work = tmp_path / "work"
    command = ("--target", "rasp4b", "--tracker", address, "--key", key)  # fmt: skip
    log1, log2 = tmp_path / "tune1.log", tmp_path / "tune2.log"
    try:
        # SIGINT mid-run (a budget it cannot reach first): the batch in flight is recorded,
        # then it stops; a loadable database, and the rerun resumes.
        proc = _interrupt_once_searched(log1, work, 2, *command)
        out = " ".join(_finish(proc, log1, timeout=120).split())
        assert proc.returncode == 130 and "stopping after the batch" in out, out
        assert "records measured so far are kept" in out, out
        database, _, _ = open_database(work, board)
        assert len(database) >= 4  # the default schedules at least
        done = len(_searched(work))
        assert done >= 2 and all(row["secs"] is not None for row in _trials(work)), out

        # Rerun towards 40 more trials; one device dies mid-run: tuning ends on the other.
        proc = _start_tune(log2, *command, "--trials", str(done + 40), "--work-dir", str(work))
        _wait_for(
            "the resumed run measuring a new candidate",
            lambda: len(_searched(work)) > done + 1,
            proc,
            log2,
            timeout=400,
        )
        stop_emulated_devices(devices[1]["port"])
        out = _finish(proc, log2, timeout=600)
        assert proc.returncode == 0, out
        assert f"resuming: {done} trials" in out
        assert "Expected end-to-end gain" in out
        searched = _searched(work)
        assert len(searched) == len(set(searched)), "a candidate was measured twice"

        # The database builds a package that runs on the device and matches ONNX Runtime.
        package = tmp_path / "pkg"
        built = edgecomp("compile", MODEL, "--target", "rasp4b", "--tuning-db", str(work),
                         "-o", str(package))  # fmt: skip
        assert built.returncode == 0 and "tuned schedules applied to" in built.stderr, built.stderr
        remote = open_package(package, tracker=address, key=key, timeout=120)
        x = read_inputs(remote.package.inputs, None, seed=5)
        (got,) = remote.run(x)
        (want,) = onnxruntime_outputs(MODEL, {remote.package.inputs[0].name: x[0]})
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    finally:
        for device in devices:
            stop_emulated_devices(device["port"])
        tracker.terminate()
        shutil.rmtree(work, ignore_errors=True)
