"""The factor chain as one unit of the IR: what ``DecomposeConv`` emits, ``RefuseChains`` consumes.

Each decomposed convolution becomes a call to a private Relax function, a composite function as
TVM's ``FuseOpsByPattern`` makes them, with the factors as constant arguments::

    lv = cls.cp_chain(x, s, v, h, u)

Its attributes say what it is: ``Composite`` = ``edgecomp.chain.<kind>`` and
``edgecomp.chain_spec`` = the :class:`~edgecomp.kernels.chain_spec.ChainSpec` as JSON. Its body
is the chain as plain ops (:func:`emit_chain_ops`), so the module stays a correct Relax program
between any two phases. The factors, per kind (a grouped conv's factors, one set per group,
concatenated along the first axis):

- ``cp`` rank R: ``s [R, C, 1, 1]``, ``v [R, 1, kh, 1]``, ``h [R, 1, 1, kw]``, ``u [K, R, 1, 1]``;
  ops: conv 1x1 (C->R) -> depthwise (kh, 1) with the rows' stride, padding and dilation ->
  depthwise (1, kw) with the columns' -> conv 1x1 (R->K).
- ``tucker2`` (R3 in, R4 out): ``u_in [R3, C, 1, 1]``, ``core [R4, R3, kh, kw]``,
  ``u_out [K, R4, 1, 1]``; ops: conv 1x1 -> the kh x kw core with the conv's geometry -> 1x1.
- ``gkpd`` rank R (groups 1): ``a [R, K1, C1, kh1, kw1]``, ``b [R, K2, C2, kh2, kw2]``; ops: the
  two-convolution form of :mod:`edgecomp.decompose.kronecker`, B repeated for every input
  channel group and A for every output group by ``tile`` ops (folded at compile time).

``RefuseChains`` reads the spec and the factors from the call (:func:`chain_of`), never from the
ops. A chain it fuses becomes a call to an ``edgecomp.fused_chain.<kind>`` composite, the bias
add and ReLU that follow taken in (spec ``bias`` / ``relu``; the bias ``[K]`` an extra
argument); legalization emits its fused kernel. Every other chain is inlined: its plain ops
replace the call.
"""

from __future__ import annotations

from dataclasses import replace

import tvm
from tvm import relax

from edgecomp.kernels.chain_spec import CHAIN, COMPOSITE, FUSED, SPEC_ATTR, ChainSpec

KINDS = ("cp", "tucker2", "gkpd")


def _conv(bb: relax.BlockBuilder, x: relax.Expr, w: relax.Expr, **kw: object) -> relax.Var:
    return bb.emit(relax.op.nn.conv2d(x, w, out_dtype="float32", **kw))


def emit_chain_ops(
    bb: relax.BlockBuilder,
    spec: ChainSpec,
    x: relax.Expr,
    weights: list[relax.Expr],
    bias: relax.Expr | None = None,
) -> relax.Var:
    """Emit the chain of ``spec`` as plain ops on ``x`` in ``bb``'s current block (then the bias
    add and the ReLU when the spec has them); return the output variable."""
    g, groups = spec.geom, spec.groups
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = g.strides, g.padding, g.dilation
    if spec.kind == "cp":
        s, v, h, u = weights
        r = spec.ranks[0] * groups
        y = _conv(bb, x, s, groups=groups)
        y = _conv(bb, y, v, strides=(sh, 1), padding=(pt, 0, pb, 0), dilation=(dh, 1), groups=r)
        y = _conv(bb, y, h, strides=(1, sw), padding=(0, pl, 0, pr), dilation=(1, dw), groups=r)
        y = _conv(bb, y, u, groups=groups)
    elif spec.kind == "tucker2":
        u_in, core, u_out = weights
        y = _conv(bb, x, u_in, groups=groups)
        geom = {"strides": g.strides, "padding": g.padding, "dilation": g.dilation}
        y = _conv(bb, y, core, groups=groups, **geom)
        y = _conv(bb, y, u_out, groups=groups)
    else:
        y = _gkpd_ops(bb, spec, x, *weights)
    if bias is not None:
        y = bb.emit(relax.op.add(y, relax.op.reshape(bias, (1, spec.out_channels, 1, 1))))
    if spec.relu:
        y = bb.emit(relax.op.nn.relu(y))
    return y


def _gkpd_ops(
    bb: relax.BlockBuilder, spec: ChainSpec, x: relax.Expr, a: relax.Expr, b: relax.Expr
) -> relax.Var:
    r, k1, c1, kh1, kw1, k2, c2, kh2, kw2 = spec.ranks
    n = spec.in_shape[0]
    g = spec.geom
    # WB[c1*R*K2 + r*K2 + k2] = B_r[k2]: B stacked over r, repeated for each channel group c1.
    wb = relax.op.tile(relax.op.reshape(b, (r * k2, c2, kh2, kw2)), (c1, 1, 1, 1))
    # WA[k2*K1 + k1, r*C1 + c1] = A_r[k1, c1]: A repeated for each output group k2.
    a_t = relax.op.permute_dims(a, (1, 0, 2, 3, 4))
    wa = relax.op.tile(relax.op.reshape(a_t, (k1, r * c1, kh1, kw1)), (k2, 1, 1, 1))
    z = _conv(bb, x, bb.emit(wb), padding=g.padding, dilation=g.dilation, groups=c1)
    _, _, hz, wz = (int(d) for d in z.ty.shape.values)
    z = bb.emit(relax.op.reshape(z, (n, c1, r, k2, hz, wz)))
    z = bb.emit(relax.op.permute_dims(z, (0, 3, 2, 1, 4, 5)))
    z = bb.emit(relax.op.reshape(z, (n, k2 * r * c1, hz, wz)))
    dil = (kh2 * g.dilation[0], kw2 * g.dilation[1])
    y = _conv(bb, z, bb.emit(wa), strides=g.strides, dilation=dil, groups=k2)
    _, _, ho, wo = (int(d) for d in y.ty.shape.values)
    y = bb.emit(relax.op.reshape(y, (n, k2, k1, ho, wo)))
    y = bb.emit(relax.op.permute_dims(y, (0, 2, 1, 3, 4)))
    return bb.emit(relax.op.reshape(y, (n, k1 * k2, ho, wo)))


def chain_call(
    bb: relax.BlockBuilder,
    spec: ChainSpec,
    x: relax.Expr,
    weights: list[relax.Expr],
    bias: relax.Expr | None = None,
    fused: bool = False,
) -> relax.Call:
    """Add the composite function of ``spec`` to ``bb``'s module; return the call of it on ``x``
    with the factors ``weights`` (constants), and ``bias`` when the spec has one.

    ``fused``: an ``edgecomp.fused_chain.<kind>`` composite (``RefuseChains``), else an
    ``edgecomp.chain.<kind>`` one (``DecomposeConv``).
    """
    args = [x, *weights] + ([bias] if bias is not None else [])
    params = [relax.Var(f"p{i}", a.ty) for i, a in enumerate(args)]
    fb = relax.BlockBuilder()
    with fb.function(f"{spec.kind}_chain", params, private=True):
        with fb.dataflow():
            bias_param = params[-1] if bias is not None else None
            out = fb.emit_output(
                emit_chain_ops(fb, spec, params[0], list(params[1 : 1 + len(weights)]), bias_param)
            )
        fb.emit_func_output(out)
    func = fb.get()[f"{spec.kind}_chain"]
    func = func.with_attr(COMPOSITE, (FUSED if fused else CHAIN) + spec.kind)
    func = func.with_attr(SPEC_ATTR, spec.to_json())
    gvar = bb.add_func(func, f"{spec.kind}_chain" + ("_fused" if fused else ""))
    return relax.Call(gvar, args)


def chain_of(
    mod: tvm.IRModule, call: relax.Expr
) -> tuple[ChainSpec, list[relax.Expr], bool] | None:
    """(spec, factor arguments, fused) when ``call`` calls a chain's composite function of
    ``mod``, else None. The spec's input shape is the call's data shape (NCHW)."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.GlobalVar)):
        return None
    if call.op not in mod.get_global_vars():
        return None
    func = mod[call.op]
    attrs = func.attrs if isinstance(func, relax.Function) else None
    if attrs is None or not str(attrs.get(COMPOSITE, "")).startswith((CHAIN, FUSED)):
        return None
    kind = str(attrs[COMPOSITE])
    spec = ChainSpec.from_json(str(attrs[SPEC_ATTR]))
    shape = tuple(int(d) for d in call.args[0].ty.shape.values)  # type: ignore[attr-defined]
    spec = replace(spec, in_shape=shape)  # type: ignore[arg-type]
    weights = list(call.args[1:])
    if spec.bias:
        weights = weights[:-1]
    return spec, weights, kind.startswith(FUSED)
