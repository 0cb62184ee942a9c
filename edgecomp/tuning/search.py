"""The search: each kernel task's design space (its edgecomp rule), MetaSchedule's mutators
and cost model, and the default schedules."""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from edgecomp.kernels import schedules


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
    # A convolution GEMM's conv_key and register tile (a legalization variant), else None.
    conv: str | None = None
    tiles: tuple[int, int, int] | None = None
    rank: int = 0  # the first tile rank (legalization variant) this function appeared in

    def cost(self) -> float:
        """The task's share of model time now: best (else default) ms x calls; unknown
        (never measured) is infinite."""
        ms_ = self.best_ms or self.default_ms
        return ms_ * self.calls if ms_ else math.inf

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
    from edgecomp.kernels.conv_common import CONV_KEY, LANES, TILE_VEC, TILE_W

    tasks = []
    for extracted in ms.relax_integration.extract_tasks(mod, target):
        task_mod = extracted.dispatched[0]
        if not tunable(task_mod["main"], target):
            continue
        key = int(tvm_ffi.structural_hash(task_mod))
        task = Task(str(extracted.task_name), task_mod, int(extracted.weight), key)
        sch = tvm.s_tir.Schedule(task_mod)
        for block in schedules.all_blocks(sch):
            ann = sch.get(block).annotations
            if CONV_KEY in ann:
                task.conv = str(ann[CONV_KEY])
                task.tiles = (int(ann[TILE_W]), int(ann[TILE_VEC]), int(ann[LANES]))
                panel = task.tiles[1] * task.tiles[2]
                task.name += f" [tile {task.tiles[0]}x{panel}]"
        tasks.append(task)
    return tasks


def variant_tasks(mod: tvm.IRModule, target: tvm.target.Target, refuse: str) -> list[Task]:
    """The tasks of every legalization variant: the model lowered once per rank of the cost
    model's register tiles (``TILE_VARIANTS``: its pick and the runners-up), since a tile is
    baked into the convolution's compute (width padding, weight panel). Functions alike in
    several variants are one task."""
    from edgecomp.kernels.conv_common import TILE_VARIANTS
    from edgecomp.pipeline import lower_unscheduled

    tasks: dict[int, Task] = {}
    for rank in range(TILE_VARIANTS):
        fused = lower_unscheduled(mod, target, refuse=refuse, tiles=rank)
        for task in kernel_tasks(fused, target):
            task.rank = rank
            tasks.setdefault(task.key, task)
    return list(tasks.values())


def model_ms(tasks: list[Task], tiles: dict[str, tuple[int, int, int]] | None) -> float:
    """Model time in these kernels: with the cost model's tiles and default schedules
    (``tiles`` None), or with ``tiles`` and the best schedules measured."""
    total = 0.0
    for t in tasks:
        if t.default_ms is None:
            continue
        chosen = t.conv is None or (
            t.rank == 0 if tiles is None else tiles.get(t.conv, t.tiles) == t.tiles
        )
        if chosen:
            best = t.default_ms if tiles is None else min(t.best_ms or t.default_ms, t.default_ms)
            total += best * t.calls
    return total


def budget_weight(task: Task, tasks: list[Task]) -> float:
    """A task's claim on the trial budget: its share of model time; a convolution's tile
    variants split their convolution's share, and one more than 1.5x slower than the
    convolution's fastest variant (by default schedules) gets none."""
    if task.default_ms is None:
        return 0.0
    if task.conv is None:
        return task.default_ms * task.calls
    siblings = [t for t in tasks if t.conv == task.conv and t.default_ms is not None]
    fastest = min(t.default_ms * t.calls for t in siblings)  # type: ignore[operator]
    if task.default_ms * task.calls > 1.5 * fastest:
        return 0.0
    return fastest / len(siblings)


def best_tiles(tasks: list[Task]) -> dict[str, tuple[int, int, int]]:
    """Per convolution, the register tile whose tasks take the least model time (measured)."""
    cost: dict[str, dict[tuple[int, int, int], float]] = {}
    for task in tasks:
        if task.conv is not None and task.tiles is not None:
            per_tile = cost.setdefault(task.conv, {})
            per_tile[task.tiles] = per_tile.get(task.tiles, 0.0) + task.cost()
    return {conv: min(per_tile, key=per_tile.__getitem__) for conv, per_tile in cost.items()}


def default_schedules(tasks: list[Task], target: tvm.target.Target) -> list[Any]:
    """Each task's schedule at its space's default point (= an untuned compile's)."""
    from edgecomp.kernels import default_rules

    rules = default_rules(target)
    schedules = []
    for task in tasks:
        func = task.mod["main"]
        sch = next(s for s in (r.apply(func, target, True) for r in rules) if s is not None)
        schedules.append(sch)
    return schedules


@contextmanager
def no_tensor_intrinsics() -> Iterator[None]:
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


def load_cost_model(cost_model: Any, path: Path) -> None:
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


def save_cost_model(cost_model: Any, path: Path) -> None:
    """Save the cost model with what it learnt (nothing to save before its first batch)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # xgboost's note on its default file format
        try:
            cost_model.save(str(path))
        except Exception:  # noqa: BLE001 - an untrained model has no booster yet
            pass
