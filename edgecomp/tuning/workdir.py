"""The tuning work dir and the databases compile applies (a work dir, or schedules/BOARD)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvm.s_tir import meta_schedule as ms

from edgecomp.errors import EdgecompError
from edgecomp.progress import console
from edgecomp.targets import Board

WORK_FILE = "edgecomp-tune.json"
TRIALS_FILE = "trials.jsonl"
COST_MODEL_FILE = "cost_model.tar"
WORKLOADS_FILE = "database_workload.json"
RECORDS_FILE = "database_tuning_record.json"
TILES_FILE = "tiles.json"  # per convolution (conv_key), the register tile chosen


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

    def save_tiles(self, tiles: dict[str, tuple[int, int, int]]) -> None:
        """Record the register tile chosen per convolution (replaced whole, atomically)."""
        tmp = self.path / f".{TILES_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps({k: list(v) for k, v in sorted(tiles.items())}, indent=1))
        tmp.replace(self.path / TILES_FILE)

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


def open_database(
    path: str | os.PathLike[str], board: Board
) -> tuple[Any, dict[str, Any], dict[str, tuple[int, int, int]]]:
    """A tuning database (``edgecomp tune``'s work dir, or a folder of shipped records) for
    ``compile``: loaded from a cleaned copy, corrupt lines skipped with a warning. Returns
    the database, what the manifest records of it (path, board, records, tiles, digest) and
    the register tile chosen per convolution (legalization takes them)."""
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
    tiles: dict[str, tuple[int, int, int]] = {}
    if (folder / TILES_FILE).is_file():
        try:
            raw = json.loads((folder / TILES_FILE).read_text())
            tiles = {str(k): (int(v[0]), int(v[1]), int(v[2])) for k, v in raw.items()}
            shutil.copyfile(folder / TILES_FILE, copy / TILES_FILE)
        except (ValueError, TypeError, IndexError, AttributeError):
            console.print(
                f"[yellow]warning[/yellow]: --tuning-db {folder}: {TILES_FILE} is corrupt,"
                " skipped (convolutions keep the cost model's register tiles)"
            )
    digest = hashlib.sha256()
    for name in (WORKLOADS_FILE, RECORDS_FILE, TILES_FILE):
        if (copy / name).is_file():
            digest.update((copy / name).read_bytes())
    database = ms.database.JSONDatabase(work_dir=str(copy), module_equality="structural")
    info = {"path": str(folder), "board": board.name, "records": records, "tiles": len(tiles)}
    info["sha256"] = digest.hexdigest()
    return database, info, tiles


def tuning_database(
    path: str | os.PathLike[str] | None, board: Board
) -> tuple[Any, dict[str, Any] | None, dict[str, tuple[int, int, int]] | None]:
    """The database ``compile`` applies: ``path`` when given, else the records shipped for
    the board in ``schedules/BOARD`` (measured on a real board), else none."""
    if path is None:
        from edgecomp.resources import data_dir

        shipped = data_dir("schedules") / board.name
        if not (shipped / WORKLOADS_FILE).is_file():
            return None, None, None
        path = shipped
    return open_database(path, board)
