"""Weights beside the library: lift a lowered module's constants into a ``.params`` file.

``edgecomp compile --weights external`` runs the whole lowering with the weights as constants,
so every compile-time rewrite of them (folded transposes and bias reshapes, MEC's packed weight
panels, the factor chains' packed filters) still happens once, at compile time. Only then,
just before ``tvm.compile``, :func:`lift_weights` turns each large constant of ``main`` into a
parameter of ``main``, after the model's inputs, and returns the constants' values. Kernels
see the same tensors either way, so the external build runs at the embedded build's speed;
``model.so`` then holds code only, and the weights go to ``weights.params``
(``tvm.runtime.save_param_dict``; TVM's runtime reads it with ``runtime.LoadParamsFromFile``).

A runner calls ``main(*inputs, *weights)`` with the weights in the order of their names
(``p0000``, ``p0001`` ...), which is the order of ``main``'s extra parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from edgecomp.errors import EdgecompError

WEIGHTS_FILE = "weights.params"
WEIGHT_MODES = ("auto", "embedded", "external")
# Constants smaller than this stay in model.so: scalars and tiny vectors are not worth a
# parameter each, and embedding them links everywhere.
MIN_LIFTED_BYTES = 1024


def _nbytes(data: tvm.runtime.Tensor) -> int:
    return int(np.prod(data.shape)) * np.dtype(str(data.dtype)).itemsize


@mutator
class _LiftConstants(PyExprMutator):  # type: ignore[misc]
    """Replace every constant of at least ``min_bytes`` by a new parameter variable."""

    def __init__(self, min_bytes: int) -> None:
        super().__init__()
        self.min_bytes = min_bytes
        self.lifted: list[tuple[str, relax.Var, tvm.runtime.Tensor]] = []
        self._seen: dict[relax.Expr, relax.Var] = {}

    def visit_generic_const_(self, op: tvm.ir.expr.GenericConst) -> relax.Expr:
        data = op.value
        if _nbytes(data) < self.min_bytes:
            return op
        if op not in self._seen:
            name = f"p{len(self.lifted):04d}"
            var = relax.Var(name, op.ty)
            self._seen[op] = var
            self.lifted.append((name, var, data))
        return self._seen[op]


def constant_bytes(mod: tvm.IRModule) -> int:
    """Bytes of the constants in ``mod``'s Relax functions (what embedding puts in model.so)."""
    total = 0

    def visit(expr: relax.Expr) -> None:
        nonlocal total
        # TVM 0.27 has one Constant base for Relax tensor constants and TIR immediates.
        data = getattr(expr, "value", None)
        if isinstance(expr, tvm.ir.expr.Constant) and isinstance(data, tvm.runtime.Tensor):
            total += _nbytes(data)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return total


def lift_weights(
    mod: tvm.IRModule, min_bytes: int = MIN_LIFTED_BYTES
) -> tuple[tvm.IRModule, dict[str, tvm.runtime.Tensor]]:
    """Turn ``main``'s large constants into trailing parameters of ``main``.

    Parameters
    ----------
    mod
        A lowered module (what :func:`edgecomp.pipeline.lower` returns), weights as constants.
    min_bytes
        Constants smaller than this stay in the module.

    Returns
    -------
    (tvm.IRModule, dict)
        The module whose ``main`` takes ``(*inputs, p0000, p0001, ...)``, and the lifted
        values by parameter name (sorted names = parameter order).
    """
    main = mod["main"]
    lifter = _LiftConstants(min_bytes)
    body = lifter.visit_expr(main.body)
    params = list(main.params) + [var for _, var, _ in lifter.lifted]
    lifted = relax.Function(params, body, main.ret_ty, main.is_pure, main.attrs)
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    out["main"] = lifted
    return out, {name: data for name, _, data in lifter.lifted}


def choose_mode(mode: str, board_limit_mb: float | None, weight_bytes: int) -> str:
    """Resolve ``--weights auto``: external where the board cannot link that many weights.

    ``board_limit_mb`` is the board file's ``max_embedded_weights_mb`` (None: no limit).
    """
    if mode not in WEIGHT_MODES:
        raise EdgecompError(f"--weights {mode!r}: choose one of {', '.join(WEIGHT_MODES)}")
    if mode != "auto":
        return mode
    if board_limit_mb is not None and weight_bytes > board_limit_mb * 1e6:
        return "external"
    return "embedded"


def save_weights(params: dict[str, tvm.runtime.Tensor], path: str | os.PathLike[str]) -> None:
    """Write the lifted weights as a TVM ``.params`` file."""
    Path(path).write_bytes(tvm.runtime.save_param_dict(params))


def load_weights(
    path: str | os.PathLike[str], device: tvm.runtime.Device | None = None
) -> list[tvm.runtime.Tensor]:
    """The weights of a ``.params`` file, in ``main``'s parameter order, on ``device``."""
    try:
        params = tvm.runtime.load_param_dict(Path(path).read_bytes())
    except OSError as err:
        raise EdgecompError(f"cannot read the weights file {path}: {err}") from err
    ordered = [params[name] for name in sorted(params)]
    if device is None or device == tvm.cpu():
        return ordered
    return [tvm.runtime.tensor(t.numpy(), device) for t in ordered]
