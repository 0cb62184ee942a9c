"""RemoveDropout: ``dropout(x)[0]`` -> ``x``, since dropout is the identity at inference.

TVM's ONNX importer keeps Dropout as ``relax.nn.dropout``, whose tuple output also stops
``ConvertLayout`` (it cannot infer the layout of a tuple); LegalizeOps would only turn it
into a copy.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, is_tuple_get_item, rewrite_call, wildcard


@tvm.transform.module_pass(opt_level=0, name="edgecomp.RemoveDropout")
class RemoveDropout:
    """Replace every ``dropout(x)[0]`` of every Relax function by ``x``."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """Rewrite each Relax function of ``mod``; functions without dropout are unchanged."""
        data = wildcard()
        pattern = is_tuple_get_item(is_op("relax.nn.dropout")(data), 0)
        out = tvm.IRModule(mod.functions, attrs=mod.attrs)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                out[gv] = rewrite_call(pattern, lambda _expr, matched: matched[data], func)
        return out
