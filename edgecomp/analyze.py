"""``edgecomp analyze``: what decomposing a model's convolutions would do, layer by layer."""

from __future__ import annotations

import os

import numpy as np

from edgecomp.frontend import import_onnx
from edgecomp.models import load_onnx
from edgecomp.passes.decompose_conv import LayerRecord, decompose_conv


def analyze(
    model_path: str | os.PathLike[str],
    method: str,
    policy: str,
    calib: np.ndarray | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> list[LayerRecord]:
    """Decompose the model's convolutions (without building it) and return the per-layer report.

    With ``calib`` (inputs of the model), each layer's output error on them is measured too.
    """
    mod, _ = import_onnx(load_onnx(model_path), input_shapes)
    return decompose_conv(mod, method, policy, calib=calib)[1]


def _rank_text(r: LayerRecord) -> str:
    if r.skipped is not None:
        return "-"
    if isinstance(r.rank, tuple):
        return "x".join(map(str, r.rank))
    if r.factor_shapes is not None:
        a, b = ("x".join(map(str, s)) for s in r.factor_shapes)
        return f"{r.rank} ({a} (x) {b})"
    return str(r.rank)


def format_table(report: list[LayerRecord]) -> str:
    """The report as a plain-text table, with the whole model's conv totals at the end."""
    header = ("layer", "kernel", "input", "rank", "params", "MFLOPs", "weight err", "output err")
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
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(header), line(tuple("-" * w for w in widths))]
    for r, row in zip(report, rows, strict=True):
        out.append(line(row) + (f"  kept dense: {r.skipped}" if r.skipped else ""))
    method = report[0].method if report else "?"
    before = sum(r.flops_before for r in report)
    after = sum(r.flops_before if r.skipped else r.flops_after for r in report)
    p_before = sum(r.params_before for r in report)
    p_after = sum(r.params_before if r.skipped else r.params_after for r in report)
    done = sum(r.skipped is None for r in report)
    out.append(
        f"{method}: {done} of {len(report)} convolutions decomposed; conv params"
        f" {p_before:,} -> {p_after:,} ({p_before / max(p_after, 1):.2f}x), conv MFLOPs"
        f" {before / 1e6:.2f} -> {after / 1e6:.2f} ({before / max(after, 1):.2f}x)"
    )
    return "\n".join(out)
