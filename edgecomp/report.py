"""Memory report: per-layer intermediate tensors and kernel workspaces, before and after edgecomp.

The report compares two lowerings of the same imported (possibly decomposed) Relax module:

- ``before``: :func:`edgecomp.pipeline.lower` with ``conv="im2col", refuse="none"``: factor chains
  run as separate ops, convolutions lowered through im2col;
- ``after``: ``lower(mod, target, refuse=...)``: chains re-fused into one tiled kernel (T1000)
  as the ``--refuse`` mode says, MEC.

It is computed at compile time (no build, no device) and stored in the package as
``report.json``; ``edgecomp report OUTDIR`` prints it (:func:`format_report`), plots it
(:func:`plot_report`) and, given a device, adds per-kernel times (:func:`layer_times`).

Definitions (bytes; the same words in the JSON, the table and the plot):

- **kernel**: one call of a prim func from ``main`` after TVM's dataflow lowering (reshapes
  that became views are not kernels), named by its prim func; a prim func called again is
  ``name#2``, ``name#3`` ... in call order.
- **output**: the tensors the kernel writes for its consumers (intermediate tensors between
  kernels; the model's outputs are counted per kernel but not in the intermediate total).
- **workspace**: every buffer the scheduled kernel allocates inside itself (MEC lowered buffer,
  im2col matrix, padded copies, fused per-tile buffers; register tiles, scope ``local``, live
  in registers and are not counted), at the size TVM
  allocates it (:func:`edgecomp.kernels.fused_chain.allocated_buffers`), times the number of
  threads that hold one at the same time when it is allocated inside a parallel loop:
  ``min(num-cores of the target, parallel iterations)``.
- **weights**: constants ``main`` passes to kernels (packed weights, biases), not intermediates.
- **planned peak**: TVM's own memory plan of ``main`` (``StaticPlanBlockMemory``,
  ``LowerAllocTensor``, ``KillAfterLastUse``, as ``tvm.compile`` runs them), walked in call
  order: at each kernel call, the storage allocated and not yet killed (the model's output
  included; the input and the weights not) plus that kernel's workspace; the peak is the
  largest such sum. ``planned storage`` is the sum of all the plan's storage allocations (what
  the VM's pooled allocator holds when it never returns a block).
- **layer**: the model layers are the ``conv2d`` / ``matmul`` ops and the re-fusable factor
  chains (:class:`~edgecomp.passes.refuse_chains.RefuseChains` run on the input module), in
  program order. A conv / matmul / fused-chain kernel takes the next layer (in ``before`` a
  chain's layer takes as many conv kernels as the chain has convolutions); every other kernel
  (ReLU, pooling, reshape copies) belongs to the layer of the kernel before it. When a
  lowering does not follow that order, the remaining kernels get no layer (``null``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.s_tir.analysis import detect_buffer_access_lca
from tvm.target import Target

from edgecomp.errors import EdgecompError
from edgecomp.kernels.chain_spec import ATTR_KIND
from edgecomp.kernels.conv_common import CONV_GEMM, DEPTHWISE
from edgecomp.kernels.fused_chain import allocated_buffers
from edgecomp.kernels.target_info import num_cores
from edgecomp.passes.factor_chains import chain_of
from edgecomp.passes.refuse_chains import tensor_bytes

REPORT_FILE = "report.json"
REPORT_VERSION = 1
VARIANTS = {
    "before": "separate ops, im2col",
    "after": "edgecomp: re-fused chains, MEC",
}
# Convolutions in each chain's plain form (edgecomp.passes.factor_chains): the ``before``
# lowering runs them as that many conv kernels.
CHAIN_CONVS = {"cp": 4, "tucker2": 3, "gkpd": 2}

FOOTER = (
    "output: tensors a kernel writes for the next ones; workspace: buffers allocated inside"
    " the kernel (x threads holding one at once); weights: constants, reported apart.\n"
    "planned peak: max over kernel calls of the storage TVM's memory plan has allocated and"
    " not yet freed (output included, input and weights not) + that kernel's workspace."
)


# ----------------------------------------------------------------------------- workspaces
def _dtype_bytes(dtype: str) -> int:
    return max(1, tvm.runtime.DataType(dtype).bits // 8)


_CHILDREN = ("body", "block", "then_case", "else_case", "init")


def _stmts(node: object) -> Iterable[object]:
    """Every statement under ``node`` (TVM 0.27 has no Python ``post_order_visit`` for TIR)."""
    todo = [node]
    while todo:
        stmt = todo.pop()
        yield stmt
        todo.extend(c for c in (getattr(stmt, f, None) for f in _CHILDREN) if c is not None)
        todo.extend(getattr(stmt, "seq", None) or [])


def _parallel_share(func: tirx.PrimFunc) -> dict[str, int]:
    """For each buffer allocated in ``func``: parallel iterations around where it is allocated.

    TVM allocates a buffer at the lowest common ancestor of its accesses
    (``PlanAndUpdateBufferAllocationLocation``); under a parallel loop every worker thread then
    has its own copy.
    """
    lca = {buf.name: stmt for buf, stmt in detect_buffer_access_lca(func).items() if stmt}
    found: dict[str, int] = {}

    def walk(node: object, parallel: int) -> None:
        if isinstance(node, tirx.For) and node.kind == tirx.ForKind.PARALLEL:
            parallel *= int(node.extent)  # a buffer whose LCA is this loop lives in its body
        for name, stmt in lca.items():
            if stmt.same_as(node):
                found[name] = parallel
        for field in _CHILDREN:
            child = getattr(node, field, None)
            if child is not None:
                walk(child, parallel)
        for child in getattr(node, "seq", None) or []:
            walk(child, parallel)

    walk(func.body, 1)
    return found


def kernel_workspace(func: tirx.PrimFunc, threads: int) -> dict[str, int]:
    """Bytes of each buffer a scheduled prim func allocates, with its per-thread copies.

    Parameters
    ----------
    func : tirx.PrimFunc
        A scheduled kernel (from :func:`edgecomp.pipeline.lower`).
    threads : int
        Worker threads (the target's ``num-cores``).

    Returns
    -------
    dict of str to int
        Buffer name -> bytes: the shape TVM allocates (after ``CompactBufferAllocation``) x
        the dtype's size x ``min(threads, parallel iterations around the allocation)``.
    """
    dtypes = {
        buf.name: str(buf.dtype)
        for node in _stmts(func.body)
        if isinstance(node, tvm.s_tir.SBlock)
        for buf in node.alloc_buffers
    }
    share = _parallel_share(func)
    out = {}
    for name, shape in allocated_buffers(func).items():
        copies = max(1, min(threads, share.get(name, 1)))
        out[name] = math.prod(shape) * _dtype_bytes(dtypes.get(name, "float32")) * copies
    return out


# ----------------------------------------------------------------------------- main's calls
def _plan(lowered: tvm.IRModule, target: Target) -> tvm.IRModule:
    """``lowered`` after the dataflow lowering and memory planning ``tvm.compile`` runs."""
    with target:
        return tvm.transform.Sequential(
            [
                relax.transform.RewriteDataflowReshape(),  # reshapes become views
                relax.transform.ToNonDataflow(),
                relax.transform.RemovePurityChecking(),
                relax.transform.CallTIRRewrite(),  # outputs become explicit allocations
                relax.transform.StaticPlanBlockMemory(),
                relax.transform.LowerAllocTensor(),  # unplanned tensors get their own storage
                relax.transform.KillAfterLastUse(),  # where each storage is freed
            ]
        )(lowered)


def _bindings(func: relax.Function) -> Iterable[relax.Binding]:
    body = func.body
    for block in body.blocks:
        yield from block.bindings


def _op_name(call: relax.Call) -> str:
    return call.op.name if isinstance(call.op, tvm.ir.Op) else ""


def _kernel_kind(func: tirx.PrimFunc, name: str) -> str:
    """``chain``, ``conv``, ``matmul`` or ``other``: what a kernel does, for layer grouping."""
    if func.attrs is not None and ATTR_KIND in func.attrs:
        return "chain:" + str(func.attrs[ATTR_KIND])
    annotated = any(
        isinstance(node, tvm.s_tir.SBlock)
        and (CONV_GEMM in node.annotations or DEPTHWISE in node.annotations)
        for node in _stmts(func.body)
    )
    if annotated or "conv2d" in name:  # "conv2d": TVM's own lowering of unusual convolutions
        return "conv"
    # FuseOps names a fused function after its ops; Gemm / MatMul import as relax matmul.
    return "matmul" if "matmul" in name else "other"


def _kernel_rows(
    lowered: tvm.IRModule, target: Target
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One row per kernel call of ``main``, and the planned peak / storage / weights of main."""
    planned = _plan(lowered, target)
    main = planned["main"]
    threads = max(1, num_cores(target))
    alloc_bytes: dict[relax.Var, int] = {}  # alloc_tensor results: the kernels' outputs
    # Storage stays allocated while its variable or a tensor made from it is alive:
    # KillAfterLastUse kills a storage variable right after its last alloc_tensor.
    storage_bytes: dict[relax.Var, int] = {}
    holders: dict[relax.Var, set[relax.Var]] = {}
    root: dict[relax.Var, relax.Var] = {}  # tensor variable or alias -> its alloc_tensor var
    made_from: dict[relax.Var, relax.Var] = {}  # alloc_tensor var -> storage var
    unwritten: set[relax.Var] = set()  # allocated, not passed to a kernel yet: its next output
    storage_total = peak = 0
    weights: dict[tvm.ir.expr.Constant, int] = {}  # keyed by the constant: shared ones once
    returned = set(_returned_vars(main))
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    workspace_cache: dict[str, dict[str, int]] = {}

    def release(storage: relax.Var, holder: relax.Var) -> None:
        holders.get(storage, set()).discard(holder)

    for binding in _bindings(main):
        value = binding.value
        if isinstance(value, relax.Var) and value in root:
            root[binding.var] = root[value]
            continue
        if not isinstance(value, relax.Call):
            continue
        op = _op_name(value)
        if op == "relax.memory.alloc_storage":
            size = int(value.args[0].values[0])
            storage_bytes[binding.var] = size
            holders[binding.var] = {binding.var}
            storage_total += size
            continue
        if op == "relax.memory.kill_storage":
            release(value.args[0], value.args[0])
            continue
        if op == "relax.memory.alloc_tensor":
            storage = value.args[0]
            alloc_bytes[binding.var] = tensor_bytes(binding.var.ty)
            root[binding.var] = binding.var
            made_from[binding.var] = storage
            unwritten.add(binding.var)
            holders[storage].add(binding.var)
            continue
        if op == "relax.memory.kill_tensor":
            tensor = root.get(value.args[0])
            if tensor is not None:
                release(made_from[tensor], tensor)
            continue
        if not isinstance(value.op, tvm.ir.GlobalVar):
            continue
        func = planned[value.op]
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = value.op.name_hint
        seen[name] = seen.get(name, 0) + 1
        if name not in workspace_cache:
            workspace_cache[name] = kernel_workspace(func, threads)
        workspace = workspace_cache[name]
        outputs = [a for a in value.args if isinstance(a, relax.Var) and a in unwritten]
        unwritten.difference_update(outputs)
        for arg in value.args:
            if isinstance(arg, tvm.ir.expr.Constant):
                weights[arg] = math.prod(arg.value.shape) * _dtype_bytes(str(arg.value.dtype))
        ws = sum(workspace.values())
        live = sum(storage_bytes[st] for st, held in holders.items() if held)
        peak = max(peak, live + ws)
        rows.append(
            {
                "kernel": name if seen[name] == 1 else f"{name}#{seen[name]}",
                "prim_func": name,
                "kind": _kernel_kind(func, name),
                "output_bytes": sum(alloc_bytes[a] for a in outputs),
                "model_output": any(a in returned for a in outputs),
                "workspace_bytes": ws,
                "workspace": workspace,
                # What timing the kernel alone on a remote device needs (see _remote_times).
                "args": [
                    [[int(d) for d in a.ty.shape.values], str(a.ty.dtype)]
                    for a in value.args
                    if isinstance(a.ty, relax.TensorType) and a.ty.shape is not None
                ],
            }
        )
    totals = {
        "planned_peak_bytes": peak,
        "planned_storage_bytes": storage_total,
        "weight_bytes": sum(weights.values()),
    }
    return rows, totals


def _returned_vars(main: relax.Function) -> list[relax.Var]:
    """Variables whose tensors ``main`` returns (through the aliases the lowering binds)."""
    alias = {b.var: b.value for b in _bindings(main) if isinstance(b.value, relax.Var)}
    result = main.body.body
    todo = list(result.fields) if isinstance(result, relax.Tuple) else [result]
    out = []
    while todo:
        var = todo.pop()
        if isinstance(var, relax.Var):
            out.append(var)
            if var in alias:
                todo.append(alias[var])
    return out


# ----------------------------------------------------------------------------- layers
def model_layers(mod: tvm.IRModule, target: Target, refuse: str = "auto") -> list[dict[str, Any]]:
    """The model's layers in program order: ``conv2d`` / ``matmul`` ops and re-fused chains.

    Chains are what :class:`~edgecomp.passes.refuse_chains.RefuseChains` fuses for ``target``
    with the re-fusion mode ``refuse`` (none on GPU targets, none for ``"none"``); each layer
    records the kernels it stands for in each lowering.
    """
    from edgecomp.pipeline import graph_passes

    refused = tvm.transform.Sequential(graph_passes(target, refuse))(mod)
    layers: list[dict[str, Any]] = []
    for binding in _bindings(refused["main"]):
        value = binding.value
        if not isinstance(value, relax.Call):
            continue
        op = _op_name(value)
        out_ty = binding.var.ty
        if op == "relax.nn.conv2d":
            n, c, h, w = (int(d) for d in value.args[0].ty.shape.values)
            k, _, kh, kw = (int(d) for d in value.args[1].ty.shape.values)
            groups = int(value.attrs.groups)
            kind = " dw" if groups > 1 and groups == c else f" g{groups}" if groups > 1 else ""
            name = f"conv{kind} {kh}x{kw} {c}->{k} @{h}x{w}"
            layers.append({"name": name, "kind": "conv", "convs": 1})
        elif op == "relax.matmul":
            shape = [int(d) for d in value.args[1].ty.shape.values]
            layers.append({"name": f"matmul {shape[0]}->{shape[-1]}", "kind": "matmul"})
        elif (unit := chain_of(refused, value)) is not None:  # a fused chain
            kind = unit[0].kind
            n, c, h, w = (int(d) for d in value.args[0].ty.shape.values)
            k = int(out_ty.shape.values[1])
            layers.append(
                {
                    "name": f"{kind} chain {c}->{k} @{h}x{w}",
                    "kind": "chain:" + kind,
                    "convs": CHAIN_CONVS.get(kind, 1),
                }
            )
    return layers


def _assign_layers(rows: list[dict[str, Any]], layers: list[dict[str, Any]], fused: bool) -> bool:
    """Set each row's ``layer`` (index into ``layers``); False when the order did not match."""
    index, left = -1, 0  # current layer, conv kernels it still takes (before: chain ops)
    ok = True
    for row in rows:
        kind = row["kind"]
        if ok and kind != "other":
            if left > 0 and kind == "conv":
                left -= 1
            else:
                index += 1
                layer = layers[index] if index < len(layers) else None
                if layer is None or not _same_kind(layer["kind"], kind, fused):
                    ok = False
                else:
                    left = layer.get("convs", 1) - 1 if not fused else 0
        row["layer"] = index if ok and index >= 0 else None
    return ok


def _same_kind(layer_kind: str, kernel_kind: str, fused: bool) -> bool:
    if layer_kind.startswith("chain:"):
        return kernel_kind == (layer_kind if fused else "conv")
    return layer_kind == kernel_kind


# ----------------------------------------------------------------------------- the report
def _variant(rows: list[dict[str, Any]], totals: dict[str, int], label: str) -> dict[str, Any]:
    return {
        "label": label,
        "kernels": rows,
        "intermediate_bytes": sum(r["output_bytes"] for r in rows if not r["model_output"]),
        "workspace_bytes": sum(r["workspace_bytes"] for r in rows),
        "max_workspace_bytes": max((r["workspace_bytes"] for r in rows), default=0),
        **totals,
    }


def memory_report(
    mod: tvm.IRModule, target: Target, after: tvm.IRModule | None = None, refuse: str = "auto"
) -> dict[str, Any]:
    """Per-layer memory of ``mod`` lowered without and with edgecomp's techniques (JSON-ready).

    Parameters
    ----------
    mod : tvm.IRModule
        The imported (possibly decomposed) Relax module, weights as constants.
    target : Target
        The compilation target (its ``num-cores`` sets the per-thread workspace copies).
    after : tvm.IRModule, optional
        ``lower(mod, target, refuse=refuse)`` when the caller already has it (saves lowering
        twice).
    refuse : {"auto", "all", "none"}
        The re-fusion mode of the ``after`` lowering (see :func:`edgecomp.pipeline.lower`).

    Returns
    -------
    dict
        ``layers`` (name, kind), ``variants["before" | "after"]`` with ``kernels`` (one row per
        kernel call: ``kernel``, ``prim_func``, ``kind``, ``layer``, ``output_bytes``,
        ``workspace_bytes``, ``workspace`` per buffer) and the totals ``intermediate_bytes``,
        ``workspace_bytes``, ``max_workspace_bytes``, ``planned_peak_bytes``,
        ``planned_storage_bytes``, ``weight_bytes``. Definitions: this module's docstring.
    """
    from edgecomp.pipeline import lower

    started = time.perf_counter()
    lowered = {
        "before": lower(mod, target, conv="im2col", refuse="none"),
        "after": after if after is not None else lower(mod, target, refuse=refuse),
    }
    layers = model_layers(mod, target, refuse)
    variants = {}
    grouped = True
    for key, low in lowered.items():
        rows, totals = _kernel_rows(low, target)
        grouped &= _assign_layers(rows, layers, fused=key == "after")
        variants[key] = _variant(rows, totals, VARIANTS[key])
    return {
        "version": REPORT_VERSION,
        "target": str(target),
        "threads": max(1, num_cores(target)),
        "layers": layers,
        "layers_matched": grouped,
        "variants": variants,
        "seconds": round(time.perf_counter() - started, 2),
    }


# ----------------------------------------------------------------------------- times
def layer_times(
    loaded: Any,
    repeat: int = 5,
    inputs: list[np.ndarray] | None = None,
    report: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Milliseconds of each kernel call of ``main``, measured where the package is loaded.

    TVM 0.27's Relax VM has no profiler (no ``profile=True`` / ``vm.profile``). In this
    process the VM's instrument hook times each call in the running model: a clock read before
    and after every kernel it calls (CPU kernels return when done); the median over ``repeat``
    runs, after one warm-up. Over RPC the hook cannot be installed (a local function cannot be
    passed to the remote VM), so each kernel is called alone on the device instead (see
    :func:`_remote_times`).

    Parameters
    ----------
    loaded : edgecomp.runner.Loaded
        A package opened with ``open_package``.
    repeat : int
        Runs to take the median of.
    inputs : list of numpy arrays, optional
        Model inputs (default: seeded random data of the manifest's shapes).
    report : dict, optional
        The package's report (read from it when not given); remote timing needs its rows.

    Returns
    -------
    dict of str to float
        Kernel label (as in the report's rows: ``name``, ``name#2`` ...) -> ms.
    """
    from edgecomp.runner import read_inputs

    if loaded.session is not None:
        rows = (report or load_report(loaded.package.path))["variants"]["after"]["kernels"]
        return _remote_times(loaded, rows, repeat)
    arrays = inputs if inputs is not None else read_inputs(loaded.package.inputs, None)
    args = [tvm.runtime.tensor(a, loaded.device) for a in arrays] + loaded.weights
    runs: list[list[tuple[str, float]]] = []
    current: list[tuple[str, float]] = []
    started: list[float] = []

    def instrument(func: object, symbol: str, before: bool, ret: object, *rest: object) -> int:
        if symbol.startswith("vm.builtin.") or symbol.startswith("relax."):
            return 0  # allocation and shape bookkeeping, not kernels
        if before:
            started.append(time.perf_counter())
        else:
            current.append((symbol, (time.perf_counter() - started.pop()) * 1e3))
        return 0

    vm = loaded.vm
    vm["main"](*args)  # warm-up: first-touch page faults, thread pool start
    vm.set_instrument(tvm.runtime.convert(instrument))
    try:
        for _ in range(repeat):
            current = []
            vm["main"](*args)
            runs.append(current)
    finally:
        vm.set_instrument(tvm.runtime.convert(lambda *a: 0))
    times: dict[str, list[float]] = {}
    for run in runs:
        seen: dict[str, int] = {}
        for symbol, ms in run:
            seen[symbol] = seen.get(symbol, 0) + 1
            label = symbol if seen[symbol] == 1 else f"{symbol}#{seen[symbol]}"
            times.setdefault(label, []).append(ms)
    return {label: float(np.median(v)) for label, v in times.items()}


def _remote_times(loaded: Any, rows: list[dict[str, Any]], repeat: int) -> dict[str, float]:
    """Per-kernel ms on a remote device: each kernel called alone on zero-filled arguments.

    The kernels live in the library's imported module, which the remote ``time_evaluator``
    does not search, so each one is called through its remote handle: the median over
    ``repeat`` rounds of ``number`` calls and a device sync, minus one RPC round trip per call
    (measured the same way with device syncs). Kernels run with warm caches and without the
    other kernels' memory traffic, so their sum is below the model's latency.
    """
    lib = loaded.session.load_module(loaded.package.library.name)  # uploaded by load_remote
    dev = loaded.device

    def per_call(call: Any, number: int) -> float:
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                call()
            dev.sync()
            samples.append((time.perf_counter() - start) * 1e3 / number)
        return float(np.median(samples))

    round_trip = per_call(dev.sync, 10)
    times: dict[str, float] = {}
    for row in rows:
        func = lib.get_function(row["prim_func"], query_imports=True)
        args = [tvm.runtime.tensor(np.zeros(shape, dtype), dev) for shape, dtype in row["args"]]
        func(*args)  # warm-up
        dev.sync()
        first = per_call(lambda f=func, a=args: f(*a), 1)
        number = max(1, min(50, int(20 / max(first, 1e-3))))  # about 20 ms per round
        times[row["kernel"]] = max(
            per_call(lambda f=func, a=args: f(*a), number) - round_trip, 1e-6
        )
    return times


# ----------------------------------------------------------------------------- output
def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}" if n < 1e7 else f"{n / 1e6:.1f}"


def per_layer(
    report: dict[str, Any], times: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Per-layer sums of both variants: output / workspace bytes, kernels, and ms (after)."""
    layers = report["layers"]
    out = [
        {"layer": i, "name": layer["name"]}
        for i, layer in enumerate([{"name": "(before the first layer)"}, *layers], start=-1)
    ]
    out.append({"layer": None, "name": "(not matched to a layer)"})

    def slot(idx: int | None) -> dict[str, Any]:
        return out[-1] if idx is None else out[idx + 1]

    for key, variant in report["variants"].items():
        for row in variant["kernels"]:
            s = slot(row["layer"])
            s[f"{key}_output"] = s.get(f"{key}_output", 0) + row["output_bytes"]
            s[f"{key}_workspace"] = s.get(f"{key}_workspace", 0) + row["workspace_bytes"]
            s[f"{key}_kernels"] = s.get(f"{key}_kernels", 0) + 1
            if key == "after" and times is not None and row["kernel"] in times:
                s["ms"] = s.get("ms", 0.0) + times[row["kernel"]]
    return [s for s in out if any(k.endswith("_kernels") for k in s)]


def format_report(report: dict[str, Any], times: dict[str, float] | None = None) -> str:
    """The report as a plain-text table: one line per layer, totals, definitions."""
    head = (
        f"{'#':>3}  {'layer':34} {'before: out MB':>14} {'ws MB':>9}  "
        f"{'after: out MB':>13} {'ws MB':>9}" + ("  {:>8}".format("ms") if times else "")
    )
    lines = [
        f"edgecomp memory report, target {report['target']} ({report['threads']} threads)",
        f"before = {VARIANTS['before']}; after = {VARIANTS['after']}",
        "",
        head,
        "-" * len(head),
    ]
    for s in per_layer(report, times):
        idx = "" if s["layer"] is None or s["layer"] < 0 else str(s["layer"])
        line = (
            f"{idx:>3}  {s['name'][:34]:34} {_mb(s.get('before_output', 0)):>14}"
            f" {_mb(s.get('before_workspace', 0)):>9}  {_mb(s.get('after_output', 0)):>13}"
            f" {_mb(s.get('after_workspace', 0)):>9}"
        )
        if times:
            line += f"  {s['ms']:8.3f}" if "ms" in s else f"  {'':>8}"
        lines.append(line)
    lines.append("-" * len(head))
    b, a = report["variants"]["before"], report["variants"]["after"]
    for label, key in [
        ("intermediate tensors (sum)", "intermediate_bytes"),
        ("kernel workspaces (sum)", "workspace_bytes"),
        ("largest kernel workspace", "max_workspace_bytes"),
        ("planned peak", "planned_peak_bytes"),
        ("planned storage (sum)", "planned_storage_bytes"),
        ("weights (constants)", "weight_bytes"),
    ]:
        lines.append(f"     {label:34} {_mb(b[key]):>14} {'':9}  {_mb(a[key]):>13}")
    if times:
        total_ms = sum(times.get(r["kernel"], 0.0) for r in a["kernels"])
        lines.append(f"     {'kernel time (sum, ms)':34} {'':>37}  {total_ms:8.3f}")
    if not report.get("layers_matched", True):
        lines.append("note: a lowering did not follow the layer order; its rest is unmatched")
    lines += ["", FOOTER]
    return "\n".join(lines)


def plot_report(
    report: dict[str, Any], times: dict[str, float] | None, path: str | os.PathLike[str]
) -> Path:
    """Bar plot per layer: intermediate + workspace bytes before / after (log), time if given."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on build machines and boards
    import matplotlib.pyplot as plt

    rows = [s for s in per_layer(report, times) if s["layer"] is not None and s["layer"] >= 0]
    x = np.arange(len(rows))
    total = {
        key: np.array(
            [s.get(f"{key}_output", 0) + s.get(f"{key}_workspace", 0) for s in rows], float
        )
        / 1e6
        for key in VARIANTS
    }
    panels = 2 if times else 1
    fig, axes = plt.subplots(
        panels, 1, figsize=(max(8.0, 0.45 * len(rows)), 3.5 * panels), sharex=True, squeeze=False
    )
    ax = axes[0][0]
    ax.bar(x - 0.2, total["before"], 0.4, label=VARIANTS["before"])
    ax.bar(x + 0.2, total["after"], 0.4, label=VARIANTS["after"])
    ax.set_yscale("log")  # per-layer memory spans 3-4 orders of magnitude on VGG
    ax.set_ylabel("output + workspace (MB)")
    ax.legend(fontsize=8)
    ax.set_title("per-layer memory")
    if times:
        axt = axes[1][0]
        axt.bar(x, [s.get("ms", 0.0) for s in rows], 0.6, color="tab:green")
        axt.set_ylabel("time, after (ms)")
    bottom = axes[-1][0]
    bottom.set_xticks(x)
    bottom.set_xticklabels([f"{s['layer']} {s['name']}" for s in rows], rotation=70, fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out


def load_report(package_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``report.json`` of a package (checked against the manifest's checksum)."""
    from edgecomp.package import read_package

    package = read_package(package_path)
    file = package.path / REPORT_FILE
    if REPORT_FILE not in package.manifest.get("files", {}) or not file.is_file():
        raise EdgecompError(
            f"package {package.path} has no {REPORT_FILE}; compile it again with this edgecomp"
        )
    return json.loads(file.read_text())


def run_report(
    package_path: str | os.PathLike[str],
    loaded: Any | None = None,
    plot: str | os.PathLike[str] | None = None,
) -> str:
    """What ``edgecomp report OUTDIR`` prints: the table, with times when ``loaded`` is given.

    Parameters
    ----------
    package_path : path
        The package folder.
    loaded : edgecomp.runner.Loaded, optional
        The package opened on a device (``--local``): adds per-kernel times.
    plot : path, optional
        Also write the PNG plot there.
    """
    report = load_report(package_path)
    times = layer_times(loaded) if loaded is not None else None
    text = format_report(report, times)
    if plot is not None:
        text += f"\nwrote {plot_report(report, times, plot)}"
    return text
