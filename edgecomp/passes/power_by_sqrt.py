"""PowerBySqrt: ``x ** c`` for the constant exponents of LRN and friends as square roots and
products.

TVM lowers ``relax.power`` to a call of the C library's ``powf`` per element, which LLVM
cannot vectorize: AlexNet's two LRNs (``x / (bias + alpha / n * sum x^2) ** 0.75``) spent 3.8
ms of 13 in it on an AVX-512 Xeon. Square roots are one vector instruction (``vsqrtps``,
NEON ``fsqrt``), correctly rounded, so ``t ** 0.75 = sqrt(t) * sqrt(sqrt(t))`` is within an ulp
or two of ``powf`` and as NaN as it for ``t < 0``. Other exponents keep ``relax.power``.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

_sqrt = relax.op.sqrt
_mul = relax.op.multiply

# Exponent -> the same power from square roots and products.
_BY_SQRT: dict[float, Callable[[relax.Expr], relax.Expr]] = {
    0.25: lambda t: _sqrt(_sqrt(t)),
    0.5: _sqrt,
    0.75: lambda t: _mul(_sqrt(t), _sqrt(_sqrt(t))),
    1.0: lambda t: t,
    1.5: lambda t: _mul(t, _sqrt(t)),
    2.0: lambda t: _mul(t, t),
}


def _exponent(const: relax.Expr) -> float | None:
    """The scalar value of a constant exponent, else None."""
    value = const.value.numpy()
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _shape(expr: relax.Expr) -> list[str] | None:
    shape = getattr(expr.ty, "shape", None)
    return None if shape is None else [str(d) for d in shape.values]


@tvm.transform.module_pass(opt_level=0, name="edgecomp.PowerBySqrt")
class PowerBySqrt:
    """Replace ``power(t, c)`` with ``c`` in 0.25, 0.5, 0.75, 1, 1.5, 2 (a scalar constant of a
    floating-point tensor whose shape it does not change) by square roots and products."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """Rewrite each Relax function of ``mod``."""
        base, exponent = wildcard(), is_const()
        pattern = is_op("relax.power")(base, exponent)

        def rewrite(expr: relax.Expr, matched: dict) -> relax.Expr:
            t, c = matched[base], matched[exponent]
            by_sqrt = _BY_SQRT.get(_exponent(c))  # type: ignore[arg-type]
            if by_sqrt is None or not str(t.ty.dtype).startswith("float"):
                return expr
            if _shape(t) is None or _shape(t) != _shape(expr):
                return expr  # the exponent broadcasts the base to a larger shape
            return by_sqrt(t)

        out = tvm.IRModule(mod.functions, attrs=mod.attrs)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                out[gv] = rewrite_call(pattern, rewrite, func)
        return out
