"""Compile: ONNX file -> Relax -> (decompose) -> lower with edgecomp kernels -> build -> package."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from edgecomp.errors import EdgecompError
from edgecomp.frontend import import_onnx
from edgecomp.models import load_onnx
from edgecomp.package import Package, write_package
from edgecomp.passes.refuse_chains import count_chains, fused_chain_calls
from edgecomp.progress import console, step
from edgecomp.targets import Board, load_board


@dataclass(frozen=True)
class DecomposeOptions:
    """What ``--decompose``, ``--rank-policy``, ``--calib`` and ``--refuse`` asked for."""

    method: str
    policy: str
    calib: np.ndarray | None = None
    # Fuse factor chains into one kernel each (T1000): "auto" where that lowers the planned
    # peak, "all", or "none" (separate ops); see edgecomp.pipeline.lower.
    refuse: str = "auto"
    # Also factorize fully connected layers (Gemm / MatMul with a constant weight).
    fc: bool = True
    # With calib: refit each decomposed layer's last factor and bias (edgecomp.passes.refit).
    refit: bool = True

    def transform(self, on_layer: Any = None) -> Any:
        """The decomposition pass (``pipeline.lower``'s phase 1) these options configure."""
        from edgecomp.passes.decompose_conv import DecomposeConv

        return DecomposeConv(
            self.method,
            self.policy,
            calib=self.calib,
            fc=self.fc,
            refit=self.refit and self.calib is not None,
            on_layer=on_layer,
        )

    def to_json(self) -> dict[str, Any]:
        """The options as recorded in the manifest."""
        return {
            "decompose": self.method,
            "rank_policy": self.policy,
            "calibrated": self.calib is not None,
            "refit": self.refit and self.calib is not None,
            "decompose_fc": self.fc,
            "refuse": self.refuse,
        }


def decompose_model(mod: tvm.IRModule, options: DecomposeOptions) -> tuple[tvm.IRModule, list[Any]]:
    """Decompose ``mod`` as ``options`` ask, with a line per layer as it goes; return the new
    module and the per-layer records (:class:`edgecomp.passes.decompose_conv.LayerRecord`)."""
    from edgecomp.pipeline import decompose_phase
    from edgecomp.progress import layer_progress

    what = "convolutions and fully connected layers" if options.fc else "convolutions"
    with layer_progress(f"decomposing {what} ({options.method}, {options.policy})") as on_layer:
        transform = options.transform(on_layer)
        return decompose_phase(mod, transform), transform.report


def check_some_layer_decomposed(layers: list[Any], policy: str, fc: bool = True) -> None:
    """Raise when the policy left every layer dense, saying which and why."""
    if not layers:
        what = "convolution or fully connected layer" if fc else "convolution"
        raise EdgecompError(
            f"--decompose: the model has no {what} with a constant weight to decompose"
            + ("" if fc else " (fully connected layers are off: --no-decompose-fc)")
        )
    if all(r.skipped is not None for r in layers):
        why = "; ".join(f"{r.name}: {r.skipped}" for r in layers)
        raise EdgecompError(
            f"--rank-policy {policy}: no layer can meet it, all stay dense ({why}); "
            "try a smaller reduction or a larger error budget"
        )


def build(
    mod: tvm.IRModule, board: Board, lowered: tvm.IRModule | None = None
) -> tvm.runtime.Executable:
    """Lower an imported Relax module with edgecomp's kernels and build it for ``board``
    (``lowered``: the caller's ``lower(mod, target)``, when it has it already)."""
    from edgecomp.pipeline import lower

    target = board.tvm_target()
    try:
        return tvm.compile(lowered or lower(mod, target), target=target)
    except EdgecompError:
        raise
    except Exception as err:  # a TVM build failure on a valid model is our bug: keep the trace
        raise RuntimeError(f"building for {board.name} failed; please report it: {err}") from err


def import_model(
    model_path: str | os.PathLike[str],
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    decompose: DecomposeOptions | None = None,
) -> tuple[tvm.IRModule, Any, dict[str, Any]]:
    """Import an ONNX file and decompose it as asked: the module ``compile`` and ``tune``
    both lower; with its signature and the options the manifest records."""
    from edgecomp.analyze import weight_bytes

    model = load_onnx(model_path)
    with step("importing the ONNX model"):
        mod, signature = import_onnx(model, input_shapes)
    options: dict[str, Any] = {}
    before = weight_bytes(mod)
    if decompose is not None:
        mod, layers = decompose_model(mod, decompose)
        check_some_layer_decomposed(layers, decompose.policy, decompose.fc)
        options.update(decompose.to_json())
        options["layers"] = [
            {
                "layer": r.name,
                "kind": r.kind,
                "rank": r.rank,
                "weight_error": r.weight_error,
                "refit_error": r.refit_error,
                "kept": r.skipped,
            }
            for r in layers
        ]
    after = weight_bytes(mod)
    options["weight_bytes"] = {"before": before, "after": after}
    console.print(
        f"weights: {before / 1e6:.1f} MB"
        + (
            f" -> {after / 1e6:.1f} MB ({before / max(after, 1):.2f}x smaller)"
            if decompose is not None
            else ""
        )
    )
    return mod, signature, options


def compile_model(
    model_path: str | os.PathLike[str],
    board: str | Board,
    outdir: str | os.PathLike[str],
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    decompose: DecomposeOptions | None = None,
    weights: str = "auto",
    tuning_db: str | os.PathLike[str] | None = None,
) -> Package:
    """Compile an ONNX model for a board into a deployable package folder.

    Parameters
    ----------
    model_path
        The ONNX file.
    board
        A board name (``rasp4b``), a board file path, or a loaded Board.
    outdir
        Where ``model.so`` and ``manifest.json`` go; left untouched if anything fails.
    input_shapes
        Static shapes for inputs with dynamic dimensions.
    decompose
        Replace dense convolutions by factor chains first (see :mod:`edgecomp.decompose`).
    weights
        ``embedded`` in ``model.so``, ``external`` (beside it in ``weights.params``), or
        ``auto``: external where the board's linker cannot embed them (the board file's
        ``max_embedded_weights_mb``, e.g. VGG-19 on ``rasp3b``), embedded elsewhere.
    tuning_db
        An ``edgecomp tune`` work dir: its best record per kernel is applied, the other
        kernels keep edgecomp's default schedules. Default: the records edgecomp ships for
        the board (``schedules/BOARD``), if any.

    Examples
    --------
    >>> compile_model("digits_cnn.onnx", "rasp4b", "out/rasp4b")  # doctest: +SKIP
    """
    from edgecomp.weights import choose_mode, constant_bytes, lift_weights

    board = board if isinstance(board, Board) else load_board(board)
    choose_mode(weights, None, 0)  # reject a bad mode before the long work starts
    board.fcompile()  # fail on a missing toolchain before the long work starts
    mod, signature, options = import_model(model_path, input_shapes, decompose)
    from edgecomp.pipeline import lower_unscheduled, schedule
    from edgecomp.report import REPORT_FILE, memory_report
    from edgecomp.tuning import tuning_database

    database, db_info, tiles = tuning_database(tuning_db, board)
    with step(f"building for {board.name}"):
        refuse = decompose.refuse if decompose is not None else "auto"
        fused = lower_unscheduled(mod, board.tvm_target(), refuse=refuse, tiles=tiles)
        lowered, applied = schedule(fused, board.tvm_target(), database)
        mode = choose_mode(weights, board.max_embedded_weights_mb, constant_bytes(lowered))
        # External weights are lifted from the lowered module, after every compile-time
        # rewrite of them (folding, MEC's weight packing): the kernels are the same.
        built, params = lift_weights(lowered) if mode == "external" else (lowered, None)
        executable = build(mod, board, built)
    if db_info is not None:
        kernels = sum(1 for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
        db_info["applied"] = applied
        options["tuning_db"] = db_info
        console.print(
            f"tuned schedules applied to {applied} of {kernels} tasks ({db_info['path']})"
        )
    if weights == "auto" and mode == "external":
        console.print(
            f"weights: external ({constant_bytes(lowered) / 1e6:.0f} MB is more than board"
            f" {board.name} links into model.so: {board.max_embedded_weights_mb} MB)"
        )
    if decompose is not None:
        fused, chains = fused_chain_calls(lowered), count_chains(mod)
        options["fused_chains"] = {"fused": fused, "chains": chains}
        console.print(
            f"re-fusion (--refuse {refuse}): {fused} of {chains} factor chains run as one fused"
            " kernel each"
            + (" (those whose fusing lowers the planned peak)" if refuse == "auto" else "")
        )
    extra = {}
    if not board.is_gpu:  # the memory report counts CPU kernels' buffers
        with step("counting intermediate and workspace memory per layer (report.json)"):
            report = memory_report(mod, board.tvm_target(), after=lowered, refuse=refuse)
        extra[REPORT_FILE] = json.dumps(report, indent=1)
    with step(f"linking {Path(outdir) / 'model.so'}"):
        return write_package(
            executable,
            board,
            signature,
            outdir,
            source=model_path,
            options=options,
            extra_files=extra,
            weights=params,
        )
