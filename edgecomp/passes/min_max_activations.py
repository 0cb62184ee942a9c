"""MinMaxActivations: clipping and LeakyReLU as ``relax.maximum`` / ``relax.minimum``.

Three activations have no layout rule, so ``ConvertLayout`` wraps them in transposes back to
NCHW and they cannot join the convolution's epilogue:

- ``relax.clip(x, lo, hi)``, what HardSigmoid and HardSwish import as;
- the prim funcs ``maximum`` / ``minimum`` that TVM's ONNX importer emits for Clip (ReLU6)
  with ``emit_te``, called with a scalar constant bound;
- ``relax.nn.leakyrelu(x, alpha)`` (YOLO v3 / v4 after every convolution): ``max(x, alpha x)``
  for ``alpha <= 1``, ``min(x, alpha x)`` above.

``maximum`` / ``minimum`` / ``multiply`` with scalar constants follow any layout and fuse like
any elementwise op.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from edgecomp.kernels.schedules import all_blocks

_TOPI_BLOCKS = {"T_maximum": relax.op.maximum, "T_minimum": relax.op.minimum}


def _bound(value: object) -> float | None:
    number = getattr(value, "value", None)
    return float(number) if isinstance(number, (int, float)) else None


def _topi_binary(func: object) -> Callable[[relax.Expr, relax.Expr], relax.Expr] | None:
    """``relax.op.maximum`` / ``minimum`` when ``func`` is the one-block prim func that
    ``topi.maximum`` / ``topi.minimum`` make, else None."""
    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    blocks = [sch.get(b).name_hint for b in all_blocks(sch)]
    names = [b for b in blocks if b != "root"]
    return _TOPI_BLOCKS.get(names[0]) if len(names) == 1 else None


def _shape(ty: object) -> list[int] | None:
    shape = getattr(ty, "shape", None)
    try:
        return [int(d) for d in shape.values] if shape is not None else None
    except TypeError:  # symbolic
        return None


@mutator
class _Rewriter(PyExprMutator):  # type: ignore[misc]
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod_ = mod

    def visit_call_(self, op: relax.Call) -> relax.Expr:  # noqa: N802 - TVM's visitor name
        call = super().visit_call_(op)
        if call.op == tvm.ir.Op.get("relax.nn.leakyrelu"):
            x, alpha = call.args[0], float(call.attrs.alpha)
            scaled = relax.op.multiply(x, relax.const(alpha, str(x.ty.dtype)))
            return (relax.op.maximum if alpha <= 1.0 else relax.op.minimum)(x, scaled)
        if call.op == tvm.ir.Op.get("relax.clip"):
            lo, hi = _bound(call.args[1]), _bound(call.args[2])
            if lo is None or hi is None:
                return call
            dtype = str(call.args[0].ty.dtype)
            low = relax.op.maximum(call.args[0], relax.const(lo, dtype))
            return relax.op.minimum(low, relax.const(hi, dtype))
        if call.op == tvm.ir.Op.get("relax.call_tir") and isinstance(call.args[0], relax.GlobalVar):
            op_fn = _topi_binary(self.mod_[call.args[0]])
            args = list(getattr(call.args[1], "fields", []))
            if op_fn is None or len(args) != 2:
                return call
            data, bound = args
            if not isinstance(bound, tvm.ir.expr.Constant) or bound.value.numpy().size != 1:
                return call
            if _shape(data.ty) is None or _shape(data.ty) != _shape(call.ty):
                return call  # a bound that broadcasts the data to a larger shape
            return op_fn(data, bound)
        return call


@tvm.transform.module_pass(opt_level=0, name="edgecomp.MinMaxActivations")
class MinMaxActivations:
    """Rewrite clipping by scalar constants and LeakyReLU into ``relax.maximum`` /
    ``relax.minimum``."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """Rewrite each Relax function of ``mod``; the prim funcs left unused are dropped."""
        rewriter = _Rewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
