"""``edgecomp analyze``: what decomposing a model's layers would do, layer by layer."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

from edgecomp.frontend import import_onnx
from edgecomp.models import load_onnx
from edgecomp.passes.decompose_conv import LayerRecord


@dataclass
class Analysis:
    """Per-layer records and the model's weight bytes before and after decomposition."""

    layers: list[LayerRecord]
    weight_bytes_before: int
    weight_bytes_after: int


def weight_bytes(mod: tvm.IRModule) -> int:
    """Bytes of the constants (weights) the Relax functions of ``mod`` use, each counted once."""
    seen: dict[int, int] = {}

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, Constant) and hasattr(expr.value, "numpy"):  # not a shape value
            seen[expr.__chandle__()] = int(expr.value.numpy().nbytes)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sum(seen.values())


def analyze(
    model_path: str | os.PathLike[str],
    method: str,
    policy: str,
    calib: np.ndarray | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    fc: bool = True,
    refit: bool = True,
) -> Analysis:
    """Decompose the model's layers (without building it) and return the per-layer report.

    With ``calib`` (inputs of the model), each layer's output error on them is measured too,
    and, with ``refit``, the error after the calibrated refit.
    """
    from edgecomp.build import DecomposeOptions, decompose_model

    mod, _ = import_onnx(load_onnx(model_path), input_shapes)
    options = DecomposeOptions(method, policy, calib, fc=fc, refit=refit)
    new, layers = decompose_model(mod, options)
    return Analysis(layers, weight_bytes(mod), weight_bytes(new))


def _rank_text(r: LayerRecord) -> str:
    if r.skipped is not None:
        return "-"
    if isinstance(r.rank, tuple):
        return "x".join(map(str, r.rank))
    if r.factor_shapes is not None:
        a, b = ("x".join(map(str, s)) for s in r.factor_shapes)
        return f"{r.rank} ({a} (x) {b})"
    return str(r.rank)


def format_table(report: list[LayerRecord] | Analysis) -> str:
    """The report as a plain-text table, with the whole model's totals at the end."""
    analysis = report if isinstance(report, Analysis) else None
    report = report.layers if isinstance(report, Analysis) else report
    header = (
        "layer",
        "kernel",
        "input",
        "rank",
        "params",
        "MFLOPs",
        "weight err",
        "output err",
        "refit err",
    )
    rows = []
    for r in report:
        kept = r.skipped is not None
        params = f"{r.params_before:,}" if kept else f"{r.params_before:,} -> {r.params_after:,}"
        flops = (
            f"{r.flops_before / 1e6:.2f}"
            if kept
            else f"{r.flops_before / 1e6:.2f} -> {r.flops_after / 1e6:.2f}"
            f" ({r.flops_before / max(r.flops_after, 1):.2f}x)"
        )
        rows.append(
            (
                r.name,
                "x".join(map(str, r.weight_shape)),
                "x".join(map(str, r.input_shape[1:])),
                _rank_text(r),
                params if r.params_before else "",
                flops if r.flops_before else "",
                "" if r.weight_error is None or kept else f"{r.weight_error:.4f}",
                "" if r.output_error is None or kept else f"{r.output_error:.4f}",
                "" if r.refit_error is None or kept else f"{r.refit_error[1]:.4f}",
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(header), line(tuple("-" * w for w in widths))]
    for r, row in zip(report, rows, strict=True):
        out.append(line(row) + (f"  kept dense: {r.skipped}" if r.skipped else ""))
    for kind, label in (("conv", "convolutions"), ("fc", "fully connected layers")):
        part = [r for r in report if r.kind == kind]
        if not part:
            continue
        method = part[0].method
        before = sum(r.flops_before for r in part)
        after = sum(r.flops_before if r.skipped else r.flops_after for r in part)
        p_before = sum(r.params_before for r in part)
        p_after = sum(r.params_before if r.skipped else r.params_after for r in part)
        done = sum(r.skipped is None for r in part)
        out.append(
            f"{method}: {done} of {len(part)} {label} decomposed; params"
            f" {p_before:,} -> {p_after:,} ({p_before / max(p_after, 1):.2f}x), MFLOPs"
            f" {before / 1e6:.2f} -> {after / 1e6:.2f} ({before / max(after, 1):.2f}x)"
        )
    if analysis is not None:
        b, a = analysis.weight_bytes_before, analysis.weight_bytes_after
        out.append(
            f"model weights: {b / 1e6:.2f} MB -> {a / 1e6:.2f} MB ({b / max(a, 1):.2f}x smaller)"
        )
    return "\n".join(out)
