"""PoolsInLayout and SinkTransposes: the transposes ``ConvertLayout`` leaves between layers.

``ConvertLayout`` (phase 2, CPU targets) gives convolutions NHWC and lets every other op follow
its first input. Two graph forms kept NCHW stretches, with transposes between layers:

- a pool on an NCHW tensor, GoogLeNet's ``max-pool -> 1x1`` branch on the model's input, ran
  NCHW with TOPI's kernel before the transpose its convolution asked for (1.3 ms of the
  inception block's 3.5 on the AVX-512 host; 0.065 ms in NHWC);
- a concatenation whose first input is NCHW, DenseNet's ``concat(input, new features)``, was
  NCHW, and so were every BatchNormalization and ReLU after it and every later concatenation:
  two transposes per layer.

``PoolsInLayout`` (after ``ConvertLayout``) writes each pool still NCHW as ``transpose -> pool
in NHWC -> transpose back``; the first transpose is the one the convolutions on the same input
already have (``EliminateCommonSubexpr`` merges them). ``SinkTransposes`` (after that) moves
each transpose forward through elementwise ops (constant operands transposed along), and
through concatenations (their other inputs transposed instead), until it meets the transpose
the next convolution asks for: the pair cancels. A transpose that reaches an op it cannot pass
stays. It also drops the identity permutations ``ConvertLayout`` leaves where a transpose
written in the model meets NHWC data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

_POOLS = ("relax.nn.max_pool2d", "relax.nn.avg_pool2d")
_PERMUTE = "relax.permute_dims"
# Ops whose result at an index depends only on their inputs at that index (after broadcasting).
_ELEMENTWISE = frozenset(
    f"relax.{name}"
    for name in (
        "nn.relu nn.silu nn.gelu nn.gelu_tanh nn.leakyrelu sigmoid tanh exp sqrt rsqrt square"
        " negative abs clip add subtract multiply divide maximum minimum power"
    ).split()
)


def _axes(layout_from: str, layout_to: str) -> list[int]:
    return [layout_from.index(axis) for axis in layout_to]


def _inverse(perm: Sequence[int]) -> list[int]:
    return [int(i) for i in np.argsort(perm)]


@mutator
class _PoolRewriter(PyExprMutator):  # type: ignore[misc]
    def __init__(self, mod: tvm.IRModule, layout: str) -> None:
        super().__init__(mod)
        self.layout = layout

    def visit_call_(self, op: relax.Call) -> relax.Expr:  # noqa: N802 - TVM's visitor name
        call = super().visit_call_(op)
        if getattr(call.op, "name", None) not in _POOLS:
            return call
        attrs = call.attrs
        if attrs.layout != "NCHW" or attrs.out_layout != "NCHW":
            return call
        pool = relax.op.nn.max_pool2d if call.op.name == _POOLS[0] else relax.op.nn.avg_pool2d
        data = self.builder_.emit(relax.op.permute_dims(call.args[0], _axes("NCHW", self.layout)))
        pooled = self.builder_.emit(
            pool(
                data,
                pool_size=attrs.pool_size,
                strides=attrs.strides,
                padding=attrs.padding,
                dilation=attrs.dilation,
                ceil_mode=attrs.ceil_mode,
                count_include_pad=attrs.count_include_pad,
                layout=self.layout,
                out_layout=self.layout,
            )
        )
        return relax.op.permute_dims(pooled, _axes(self.layout, "NCHW"))


@mutator
class _Sinker(PyExprMutator):  # type: ignore[misc]
    """Each rewritten op is emitted on the untransposed data and returned transposed: the
    transpose moves one op forward, and the next op sees it again (bindings visit in order)."""

    def _transposed(self, expr: relax.Expr) -> tuple[relax.Expr, list[int]] | None:
        """``(u, perm)`` when ``expr`` is a variable bound to ``permute_dims(u, perm)``."""
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        if not isinstance(value, relax.Call) or getattr(value.op, "name", "") != _PERMUTE:
            return None
        ndim = value.args[0].ty.ndim
        axes = value.attrs.axes
        if ndim < 0:
            return None
        perm = [int(a) for a in axes] if axes is not None else list(reversed(range(ndim)))
        return value.args[0], perm

    def visit_call_(self, op: relax.Call) -> relax.Expr:  # noqa: N802 - TVM's visitor name
        call = super().visit_call_(op)
        name = getattr(call.op, "name", "")
        if name == _PERMUTE:
            return self._compose(call)
        if name in _ELEMENTWISE:
            return self._elementwise(call)
        if name == "relax.concat" and isinstance(call.args[0], relax.Tuple):
            return self._concat(call)
        return call

    def _compose(self, call: relax.Call) -> relax.Expr:
        inner = self._transposed(call.args[0])
        outer = self._transposed_axes(call)
        if outer == list(range(len(outer or []))) and outer:
            return call.args[0]  # ConvertLayout's identity permutations: a copy each
        if inner is None or outer is None:
            return call
        data, perm = inner
        axes = [perm[a] for a in outer]
        return data if axes == list(range(len(axes))) else relax.op.permute_dims(data, axes)

    @staticmethod
    def _transposed_axes(call: relax.Call) -> list[int] | None:
        ndim = call.args[0].ty.ndim
        if call.attrs.axes is not None:
            return [int(a) for a in call.attrs.axes]
        return list(reversed(range(ndim))) if ndim >= 0 else None

    def _elementwise(self, call: relax.Call) -> relax.Expr:
        moved = [self._transposed(a) for a in call.args]
        perms = {tuple(m[1]) for m in moved if m is not None}
        if len(perms) != 1:
            return call
        perm = list(perms.pop())
        args = []
        for arg, m in zip(call.args, moved, strict=True):
            if m is not None:
                args.append(m[0])
            elif isinstance(arg, tvm.ir.expr.Constant):
                value = arg.value.numpy()
                if value.ndim > len(perm):
                    return call
                value = value.reshape((1,) * (len(perm) - value.ndim) + value.shape)
                args.append(relax.const(np.ascontiguousarray(value.transpose(_inverse(perm)))))
            elif isinstance(arg.ty, relax.TensorType):
                return call  # a computed tensor: it would need a transpose of its own
            else:
                args.append(arg)  # prim values (clip's bounds)
        inner = self.builder_.emit(relax.Call(call.op, args, call.attrs, call.ty_args))
        return relax.op.permute_dims(inner, perm)

    def _concat(self, call: relax.Call) -> relax.Expr:
        fields = list(call.args[0].fields)
        moved = [self._transposed(f) for f in fields]
        perms = {tuple(m[1]) for m in moved if m is not None}
        if len(perms) != 1:
            return call
        perm = list(perms.pop())
        inverse = _inverse(perm)
        parts = [
            m[0] if m is not None else self.builder_.emit(relax.op.permute_dims(f, inverse))
            for f, m in zip(fields, moved, strict=True)
        ]
        axis = int(call.attrs.axis) % len(perm)
        inner = self.builder_.emit(relax.op.concat(parts, axis=perm[axis]))
        return relax.op.permute_dims(inner, perm)


def _rewrite(mod: tvm.IRModule, rewriter: PyExprMutator) -> tvm.IRModule:
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get())


@tvm.transform.module_pass(opt_level=0, name="edgecomp.PoolsInLayout")
class PoolsInLayout:
    """Write NCHW pools as ``transpose -> pool in layout -> transpose back``."""

    def __init__(self, layout: str = "NHWC") -> None:
        self.layout = layout

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """Rewrite each Relax function of ``mod``."""
        return _rewrite(mod, _PoolRewriter(mod, self.layout))


@tvm.transform.module_pass(opt_level=0, name="edgecomp.SinkTransposes")
class SinkTransposes:
    """Move transposes forward through elementwise ops and concatenations; cancel the pairs
    that undo each other."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """Rewrite each Relax function of ``mod``."""
        return _rewrite(mod, _Sinker(mod))
